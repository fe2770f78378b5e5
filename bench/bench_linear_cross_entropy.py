"""Linear + cross-entropy (LM head + loss): fusedloss vs eager, torch.compile, Liger-Kernel, Cut Cross-Entropy and
the bare matmuls.

Work, per problem (N tokens, H hidden, V vocabulary), counted as the matmuls the loss needs, whoever computes it:
    forward            flops = 2 N H V   (the logits, x @ W^T)
    forward + backward flops = 6 N H V   (plus dX = G @ W and dW = G^T @ x, 2 N H V each)
fusedloss's Triton backends do more, ``hw_flops`` = 2 N H V forward and 8 N H V forward + backward: the backward
recomputes the logits instead of keeping them (the floor for exact gradients without the logits is 4/3 of the
bare matmuls). Its torch backend (CPU) keeps a chunk of tokens' logits for the whole vocabulary, so it forms the
gradient in the forward pass: 6 N H V.
``frac_matmul`` compares the counted work with the bf16 matmul rate measured in the same session (an 8192^3
matmul, bench/conftest.py); ``x_bare_matmul`` divides each median by that of the ``matmul`` provider, which times
just the bare matmuls at this shape (x @ W^T; then G @ W and G^T @ x with a random G): the issue's target is
<= 1.15 for fusedloss at N=8192, H=4096, V=128256, bf16, forward + backward.

Memory: ``peak_mem_mb`` (GPU) is the peak allocated during one step beyond what was allocated before it (the
gradients included, bench/conftest.py); ``peak_beyond_grads_frac_logits`` subtracts the gradients of x and W and
divides by the size of the logits in the input dtype (the issue's target: < 0.05).

Providers:
- ``fusedloss``: ``fusedloss.linear_cross_entropy`` (exact gradients);
- ``eager``: ``F.cross_entropy(F.linear(x, W).float(), y)``, as Hugging Face causal LMs write it (logits
  materialized, upcast to fp32);
- ``torch.compile``: that function compiled (forward + backward only: compile time);
- ``liger``: ``LigerFusedLinearCrossEntropyLoss`` (token-chunked, the logits of a chunk materialized);
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy`` with its defaults (``filter_eps="auto"``: gradient entries
  below bf16 resolution are skipped, so its gradient is approximate); ``cce_exact``: ``filter_eps=None``;
- ``matmul``: the bare matmuls, the ceiling.

Sizes: ``--quick`` (CPU, fp32, the torch backend): N = 1024, H = 256, V = 8192. GPU (bf16): the target
N = 8192, H = 4096, V = 128256 (Llama 3's vocabulary), alone so that the file fits gpu_check.sh's per-file time.
"""

import time

import pytest
import torch
import torch.nn.functional as F
from benchutil import skip_if_oom, sync

import fusedloss
from fusedloss.losses.linear_cross_entropy import linear_cross_entropy

CONFIGS = {
    "plain": {},
    "ls+z+cap": {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
}


def eager_loss(x, w, y, label_smoothing=0.0, z_loss=0.0, softcap=None):
    logits = F.linear(x, w).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if not z_loss:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")
    return (ce + z_loss * torch.logsumexp(logits, dim=-1) ** 2).mean()


_compiled = {}


def compiled_loss(x, w, y, **kw):
    key = tuple(sorted(kw.items()))
    if key not in _compiled:
        _compiled[key] = torch.compile(lambda a, b, c: eager_loss(a, b, c, **kw), dynamic=False)
    return _compiled[key](x, w, y)


def liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    cache = {}

    def loss(x, w, y, label_smoothing=0.0, z_loss=0.0, softcap=None):
        key = (label_smoothing, z_loss, softcap)
        if key not in cache:
            cache[key] = LigerFusedLinearCrossEntropyLoss(label_smoothing=label_smoothing, lse_square_scale=z_loss,
                                                          softcap=softcap)
        return cache[key](w, x, y)

    return loss


def cce_loss(filter_eps):
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        return None

    def loss(x, w, y, label_smoothing=0.0, z_loss=0.0, softcap=None):
        if label_smoothing or z_loss:
            pytest.skip("Cut Cross-Entropy has no label smoothing or z-loss")
        return cce(x, w, y, softcap=softcap, filter_eps=filter_eps)

    return loss


PROVIDERS = {
    "fusedloss": linear_cross_entropy,
    "eager": eager_loss,
    "torch.compile": compiled_loss,
    "liger": liger_loss(),
    "cce": cce_loss("auto"),
    "cce_exact": cce_loss(None),
    "matmul": "bare",
}
GPU_ONLY = ("torch.compile", "liger", "cce", "cce_exact")


def shapes(quick):
    if quick:
        return {"quick": (1024, 256, 8192)}
    return {"target": (8192, 4096, 128256)}


def _bare_step(x, w, mode):
    """The matmuls any implementation must do: x @ W^T; then G @ W and G^T @ x (G random, of the logits' shape and
    dtype, made once)."""
    if mode == "fwd":
        return lambda: x @ w.t()
    g = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

    def step():
        x @ w.t()
        g @ w
        g.t() @ x

    return step


_bare_ms = {}


def bare_matmul_ms(x, w, mode, device):
    """Median ms of the bare matmuls at this shape, measured once per session (the ``x_bare_matmul`` ratio)."""
    key = (tuple(x.shape), tuple(w.shape), x.dtype, mode)
    if key not in _bare_ms:
        step = skip_if_oom(lambda: _bare_step(x, w, mode))
        step()
        sync(device)
        times = []
        for _ in range(5 if device.type == "cpu" else 10):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        _bare_ms[key] = sorted(times)[len(times) // 2] * 1e3
        del step
    return _bare_ms[key]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("size", ["quick", "target"])
def test_linear_cross_entropy(run_bench, benchmark, device, quick, provider, config, mode, size):
    sizes = shapes(quick)
    if size not in sizes:
        pytest.skip(f"size {size} is not run {'with' if quick else 'without'} --quick")
    n, hidden, vocab = sizes[size]
    fn = PROVIDERS[provider]
    if fn is None:
        pytest.skip(f"{provider} is not importable")
    if device.type == "cpu" and provider in GPU_ONLY:
        pytest.skip(f"{provider} is benchmarked on GPU only")
    if provider == "torch.compile" and (config != "plain" or mode != "fwd_bwd"):
        pytest.skip("torch.compile is timed on the plain forward+backward only (compile time)")
    if provider in ("matmul", "cce_exact") and config != "plain":
        pytest.skip(f"{provider} runs the plain configuration only")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kw = CONFIGS[config]
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(n, hidden, device=device, dtype=dtype, generator=gen))
    w = skip_if_oom(lambda: torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) / hidden ** 0.5)
    y = torch.randint(0, vocab, (n,), device=device, generator=gen)
    bare = bare_matmul_ms(x, w, mode, device)

    if provider == "matmul":
        step = _bare_step(x, w, mode)
    elif mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x, w, y, **kw)
    else:
        x.requires_grad_(True)
        w.requires_grad_(True)

        def step():
            x.grad = w.grad = None
            fn(x, w, y, **kw).backward()

    skip_if_oom(step)
    matmuls = 2 if mode == "fwd" else 6
    recompute = provider == "fusedloss" and mode == "fwd_bwd" and fusedloss.backend(device) != "torch"
    hw = 8 if recompute else matmuls
    median = skip_if_oom(lambda: run_bench(
        step, flops=matmuls * n * hidden * vocab, rounds=10 if device.type == "cuda" else 3, warmup_rounds=2,
        hw_flops=hw * n * hidden * vocab, family="linear_cross_entropy", provider=provider, config=config,
        mode=mode, shape=f"{n}x{hidden}x{vocab}", dtype=str(dtype).replace("torch.", ""),
        backend=fusedloss.backend(device), bare_matmul_ms=bare))
    extra = benchmark.extra_info  # the same benchmark run_bench filled
    extra["x_bare_matmul"] = median * 1e3 / bare
    logits_bytes = n * vocab * x.element_size()
    extra["logits_mb"] = logits_bytes / 2**20
    if extra.get("peak_mem_mb") is not None:
        grads = (n + vocab) * hidden * x.element_size() if mode == "fwd_bwd" else 0
        extra["peak_beyond_grads_frac_logits"] = (extra["peak_mem_mb"] * 2**20 - grads) / logits_bytes
