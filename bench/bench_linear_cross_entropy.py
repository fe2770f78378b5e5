"""Linear + cross-entropy (LM head + loss): fusedloss vs eager, torch.compile, Liger-Kernel, Cut Cross-Entropy and
the bare matmuls.

Work, per problem (N tokens, H hidden, V vocabulary), counted as the matmuls the loss needs, whoever computes it:
    forward            flops = 2 N H V   (the logits, x @ W^T)
    forward + backward flops = 6 N H V   (plus dX = G @ W and dW = G^T @ x, 2 N H V each)
fusedloss's recompute schedules ("pointer", "tma") do more, ``hw_flops`` = 8 N H V forward + backward: the backward
recomputes the logits instead of keeping them. Its chunked schedule (the default for 16-bit CUDA inputs) and its
torch backend (CPU) keep a chunk of tokens' logits for the whole vocabulary and form the gradient in the forward
pass: 6 N H V. The ``matmul`` provider times just the bare matmuls at this shape (x @ W^T; then G @ W and
G^T @ x with a random G of the logits' shape), the practical ceiling for any implementation; the report divides
each time by it (target for fusedloss at N = 8192, H = 4096, V = 128256, bf16, forward + backward: <= 1.15x).

Memory: the report gives ``peak_mem_mb`` (beyond inputs, weight and their gradients: bench/conftest.py) as a
fraction of the logits, ``logits_mb`` = N V s in the input dtype (target: < 5%).

Providers:
- ``fusedloss``: ``fusedloss.linear_cross_entropy`` with its default schedule ("chunked" for bf16 on CUDA);
  ``fusedloss-pointer``: the recompute schedule (the low-memory mode), ``fusedloss-tma`` its opt-in features,
  ``fusedloss-fast``: ``accumulate_in_input_dtype=True`` (the chunked schedule with dW summed in bf16);
- ``eager``: ``F.cross_entropy(F.linear(x, W).float(), y)``, as Hugging Face causal LMs write it (logits
  materialized, upcast to fp32);
- ``torch.compile``: that function compiled (plain forward + backward only: compile time);
- ``liger``: ``LigerFusedLinearCrossEntropyLoss`` with its defaults (token-chunked, the logits of a chunk
  materialized; dW accumulated in the input dtype); ``liger_fp32``: ``accum_dtype=torch.float32`` (dW accumulated
  in fp32, its recommendation when training is unstable);
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy`` with its defaults (``filter_eps="auto"``: gradient entries
  below the dtype's resolution are skipped, so its gradient is approximate: see the error column);
  ``cce_exact``: ``filter_eps=None``, exact;
- ``torch-chunked``: torch's own ``F.linear_cross_entropy(x, W, y, options=LinearCrossEntropyOptions())`` (torch
  >= 2.13: batch chunks, the gradients computed in the forward), plain configuration only (it has no z-loss or
  soft-cap);
- ``matmul``: the bare matmuls.

Sizes: ``--quick`` (CPU, fp32, the torch backend): N = 512, H = 256, V = 8192. GPU (bf16): the target N = 8192,
H = 4096, V = 128256 (Llama 3's vocabulary).
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

import fusedloss

from benchutil import at_least_fp32, compiled, lm_head_matmuls, lm_head_problem, row

CONFIGS = {
    "plain": {},
    "ls+z+cap": {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
}


def eager_loss(x, w, y, label_smoothing=0.0, z_loss=0.0, softcap=None):
    logits = at_least_fp32(F.linear(x, w))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if not z_loss:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")
    return (ce + z_loss * torch.logsumexp(logits, dim=-1) ** 2).mean()


def liger(accum_dtype):
    def make(label_smoothing=0.0, z_loss=0.0, softcap=None):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        options = {"label_smoothing": label_smoothing, "lse_square_scale": z_loss, "softcap": softcap}
        if accum_dtype is not None:
            if "accum_dtype" not in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
                pytest.skip("this Liger-Kernel version has no accum_dtype (added in 0.6.2)")
            options["accum_dtype"] = accum_dtype
        module = LigerFusedLinearCrossEntropyLoss(**options)
        return lambda x, w, y: module(w, x, y)

    return make


def cce(filter_eps):
    def make(label_smoothing=0.0, z_loss=0.0, softcap=None):
        from cut_cross_entropy import linear_cross_entropy

        if label_smoothing or z_loss:
            pytest.skip("Cut Cross-Entropy has no label smoothing or z-loss")
        return lambda x, w, y: linear_cross_entropy(x, w, y, softcap=softcap, filter_eps=filter_eps)

    return make


# provider -> (the loss for a configuration's keyword arguments, how it is called, module it needs)
PROVIDERS = {
    "fusedloss": (lambda **kw: lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y, **kw),
                  "fusedloss.linear_cross_entropy(x, W, y, **config): the default schedule", None),
    "fusedloss-pointer": (lambda **kw: lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y, schedule="pointer",
                                                                                    **kw),
                          "fusedloss.linear_cross_entropy(..., schedule='pointer'): the recompute schedule", "triton"),
    "fusedloss-tma": (lambda **kw: lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y, schedule="tma", **kw),
                      "fusedloss.linear_cross_entropy(..., schedule='tma') (opt-in)", "triton"),
    "fusedloss-fast": (lambda **kw: lambda x, w, y: fusedloss.linear_cross_entropy(x, w, y,
                                                                                 accumulate_in_input_dtype=True, **kw),
                       "fusedloss.linear_cross_entropy(..., accumulate_in_input_dtype=True): Liger's accuracy", None),
    "eager": (lambda **kw: lambda x, w, y: eager_loss(x, w, y, **kw),
              "F.cross_entropy(F.linear(x, W).float(), y), soft-cap and z-loss in fp32", None),
    "torch.compile": (lambda **kw: compiled(lambda x, w, y: eager_loss(x, w, y, **kw), ("lce", *sorted(kw.items()))),
                      "torch.compile(eager, dynamic=False)", "torch"),
    "liger": (liger(None), "LigerFusedLinearCrossEntropyLoss(label_smoothing, lse_square_scale=z_loss, softcap), "
                           "defaults otherwise (accum_dtype=None: dW accumulated in the input dtype)", "liger_kernel"),
    "liger_fp32": (liger(torch.float32), "LigerFusedLinearCrossEntropyLoss(..., accum_dtype=torch.float32)",
                   "liger_kernel"),
    "cce": (cce("auto"), "cut_cross_entropy.linear_cross_entropy(x, W, y, softcap), defaults (filter_eps='auto': "
                         "gradient filtering)", "cut_cross_entropy"),
    "cce_exact": (cce(None), "cut_cross_entropy.linear_cross_entropy(x, W, y, softcap, filter_eps=None): exact",
                  "cut_cross_entropy"),
    "torch-chunked": (lambda **kw: lambda x, w, y: F.linear_cross_entropy(
                          x, w, y, options=torch.nn.LinearCrossEntropyOptions(), **kw),
                      "F.linear_cross_entropy(x, W, y, options=torch.nn.LinearCrossEntropyOptions()) (torch >= 2.13)",
                      None),
    "matmul": (None, "x @ W.T; G @ W and G.T @ x (forward + backward)", None),
}
GPU_ONLY = ("torch.compile", "liger", "liger_fp32", "cce", "cce_exact", "fusedloss-pointer", "fusedloss-tma",
            "fusedloss-fast")
# compile time; the matmuls have no options; one CCE suffices; torch's own has no z-loss or soft-cap
PLAIN_ONLY = ("torch.compile", "matmul", "cce_exact", "torch-chunked")


def shapes(quick):
    if quick:
        return {"quick": (512, 256, 8192)}
    return {"target": (8192, 4096, 128256)}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("size", ["quick", "target"])
def test_linear_cross_entropy(run_bench, device, quick, provider, config, mode, size):
    sizes = shapes(quick)
    if size not in sizes:
        pytest.skip(f"size {size} is not run {'with' if quick else 'without'} --quick")
    make, settings, module = PROVIDERS[provider]
    if device.type == "cpu" and provider in GPU_ONLY:
        pytest.skip(f"{provider} is benchmarked on GPU only")
    if module is not None:
        pytest.importorskip(module, reason=f"{provider} is not installed")
    if provider == "torch-chunked" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip(f"this torch ({torch.__version__}) has no chunked F.linear_cross_entropy (torch >= 2.13)")
    if provider in PLAIN_ONLY and config != "plain":
        pytest.skip(f"{provider} runs the plain configuration only")
    if provider in ("fusedloss-pointer", "fusedloss-tma", "fusedloss-fast") and mode != "fwd_bwd":
        pytest.skip(f"{provider} differs from the default in its backward (and the fast mode's forward is its step)")
    if provider == "torch.compile" and mode != "fwd_bwd":
        pytest.skip("torch.compile is timed on the forward+backward only (compile time)")
    n, hidden, vocab = sizes[size]
    kw = CONFIGS[config]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, w, y = lm_head_problem(device, dtype, n, hidden, vocab)
    matmuls = 2 if mode == "fwd" else 6
    # the recompute schedules recompute the logits in the backward (8 N H V FLOPs done); the chunked one (the
    # default for 16-bit CUDA inputs) and the torch backend do not
    default_recomputes = not (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16))
    recompute = (mode == "fwd_bwd" and fusedloss.backend(device) != "torch"
                 and (provider in ("fusedloss-pointer", "fusedloss-tma") or (provider == "fusedloss"
                                                                            and default_recomputes)))
    common = dict(flops=matmuls * n * hidden * vocab, hw_flops=(8 if recompute else matmuls) * n * hidden * vocab,
                  logits_mb=n * vocab * x.element_size() / 2**20,
                  **row("linear_cross_entropy", provider, mode, f"{n}x{hidden}x{vocab}", config, dtype, settings))
    if provider == "matmul":
        lm_head_matmuls(run_bench, x, w, backward=mode == "fwd_bwd", **common)
    else:
        run_bench(make(**kw), [x, w, y], differentiable=[x, w] if mode == "fwd_bwd" else [],
                  reference=lambda a, b, c: eager_loss(a, b, c, **kw), **common)
