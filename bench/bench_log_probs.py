"""Per-token log-probs and entropies from the LM head (RL post-training): fusedloss vs eager, torch.compile and the
bare matmuls.

Work, per problem (N tokens, H hidden, V vocabulary), counted as the matmuls the step needs, whoever computes it:
    forward            flops = 2 N H V   (the logits)
    forward + backward flops = 6 N H V   (plus dX = G @ W and dW = G^T @ X)
``linear_log_probs`` does 8 N H V forward + backward (``hw_flops``): its row gradients are known only in the
backward, which recomputes each chunk's logits. Bytes beyond the matmuls' operands: the logits chunk read by the
row kernel once in the forward, read and written (G over it) in the backward.

Providers:
- ``fusedloss``: ``linear_log_probs(x, W, y, temperature=0.7, return_entropy=True)``, both outputs' gradients;
- ``eager``: the frameworks' eager form, ``log_softmax((x @ W.T).float() / T)`` gathered at the target, and the
  entropy ``-(p * log p).sum(-1)`` (logits and their fp32 copies materialized);
- ``torch.compile``: that function compiled (forward + backward only: compile time);
- ``matmul``: the bare matmuls.
Liger-Kernel's fused linear log-prob path is not a provider yet (its API was not pinned down here).

Sizes: ``--quick`` (CPU, fp32, the torch backend): N = 512, H = 256, V = 8192. GPU (bf16): N = 8192, H = 4096,
V = 131072 (the shape of Liger-Kernel's published 50.2 ms on an H100).
"""

import pytest
import torch

import fusedloss

from benchutil import at_least_fp32, compiled, lm_head_matmuls, lm_head_problem, row

TEMPERATURE = 0.7


def eager(x, w, y):
    log_p = torch.log_softmax(at_least_fp32(x @ w.t()) / TEMPERATURE, dim=-1)
    logprobs = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return logprobs + 0.01 * -(log_p.exp() * log_p).sum(-1)


def ours(x, w, y):
    logprobs, entropy = fusedloss.linear_log_probs(x, w, y, temperature=TEMPERATURE, return_entropy=True)
    return logprobs + 0.01 * entropy


PROVIDERS = {"fusedloss": ours, "eager": eager, "torch.compile": None, "matmul": None}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_log_probs(run_bench, device, quick, provider, mode):
    if provider == "torch.compile" and (device.type == "cpu" or mode != "fwd_bwd"):
        pytest.skip("torch.compile is timed on GPU, forward + backward only (compile time)")
    n, hidden, vocab = (512, 256, 8192) if quick else (8192, 4096, 131072)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, w, y = lm_head_problem(device, dtype, n, hidden, vocab)
    matmuls = 2 if mode == "fwd" else 6
    done = 8 if provider == "fusedloss" and mode == "fwd_bwd" else matmuls
    common = dict(flops=matmuls * n * hidden * vocab, hw_flops=done * n * hidden * vocab,
                  logits_mb=n * vocab * x.element_size() / 2**20,
                  **row("log_probs", provider, mode, f"{n}x{hidden}x{vocab}", "T=0.7+entropy", dtype,
                        "linear_log_probs(..., temperature=0.7, return_entropy=True)" if provider == "fusedloss"
                        else None))
    if provider == "matmul":
        lm_head_matmuls(run_bench, x, w, backward=mode == "fwd_bwd", **common)
        return
    fn = compiled(eager, "log_probs") if provider == "torch.compile" else PROVIDERS[provider]
    run_bench(lambda a, b, c: fn(a, b, c).sum(), [x, w, y], differentiable=[x, w] if mode == "fwd_bwd" else [],
              reference=lambda a, b, c: eager(a, b, c).sum(), **common)
