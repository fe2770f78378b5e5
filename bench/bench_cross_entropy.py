"""Cross-entropy family: fusedloss vs eager PyTorch, torch.compile and Liger-Kernel.

Work, per (N rows, V classes) problem with element size s bytes (the minimum any implementation must move):
    forward            bytes = N V s (logits read once) + 8 N (int64 targets) + 4 N (fp32 per-row losses)
    forward + backward bytes = 2 N V s (logits read once, gradient written once) + 8 N + 4 N
The fused kernel reads each row twice (its gradient pass re-reads the row, from HBM at LLM vocabularies:
bench/NOTES.md), so its fraction of the copy bandwidth by this count is its efficiency against the one-read ideal.

Configurations: ``plain`` (F.cross_entropy), ``ls+z`` (label smoothing 0.1, z-loss 1e-4: the most Liger-Kernel
supports) and ``ls+focal+z`` (plus focal gamma 2: the configuration of the performance target).

Sizes: ``--quick`` (CPU, fp32): N x V = 512 x 1000 and 256 x 32000. GPU (bf16): N = 16384 rows at V = 32000, 128256
(Llama 3) and 256000 (Gemma).
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss

from benchutil import at_least_fp32, compiled, row, skip_if_oom

CONFIGS = {
    "plain": {},
    "ls+z": {"label_smoothing": 0.1, "z_loss": 1e-4},
    "ls+focal+z": {"label_smoothing": 0.1, "z_loss": 1e-4, "focal_gamma": 2.0},
}


def eager_loss(x, y, label_smoothing=0.0, z_loss=0.0, focal_gamma=0.0):
    """What a user writes in eager PyTorch for the same loss (fp32 math, as the fused kernel does)."""
    if not (z_loss or focal_gamma):
        return F.cross_entropy(x, y, label_smoothing=label_smoothing)
    xf = at_least_fp32(x)
    ce = F.cross_entropy(xf, y, label_smoothing=label_smoothing, reduction="none")
    lse = torch.logsumexp(xf, dim=-1)
    if focal_gamma:
        p_t = torch.exp(xf.gather(1, y[:, None]).squeeze(1) - lse)
        ce = (1 - p_t) ** focal_gamma * ce
    return (ce + z_loss * lse * lse).mean()


def liger(label_smoothing=0.0, z_loss=0.0, focal_gamma=0.0):
    """``LigerCrossEntropyLoss``, defaults otherwise (it writes the gradient over the logits, in place)."""
    from liger_kernel.transformers import LigerCrossEntropyLoss

    if focal_gamma:
        pytest.skip("Liger-Kernel's cross-entropy has no focal term")
    return LigerCrossEntropyLoss(label_smoothing=label_smoothing, lse_square_scale=z_loss)


# provider -> (the loss for a configuration's keyword arguments, how it is called)
PROVIDERS = {
    "fusedloss": (lambda **kw: lambda x, y: fusedloss.cross_entropy(x, y, **kw),
                  "fusedloss.cross_entropy(x, y, **config)"),
    "fusedloss-single_read": (lambda **kw: lambda x, y: fusedloss.cross_entropy(x, y, schedule="single_read", **kw),
                              "fusedloss.cross_entropy(..., schedule='single_read') (each row read once)"),
    "eager": (lambda **kw: lambda x, y: eager_loss(x, y, **kw),
              "F.cross_entropy; with z-loss or focal, fp32 log-sum-exp and per-row terms"),
    "torch.compile": (lambda **kw: compiled(lambda x, y: eager_loss(x, y, **kw), ("ce", *sorted(kw.items()))),
                      "torch.compile(eager, dynamic=False)"),
    "liger": (liger, "LigerCrossEntropyLoss(label_smoothing=..., lse_square_scale=z_loss)"),
}
GPU_ONLY = {"torch.compile": "torch", "liger": "liger_kernel", "fusedloss-single_read": "triton"}  # -> module needed
COMPILE_AT = ("medium", "ls+focal+z", "fwd_bwd")  # torch.compile runs here only (compile time)


def shapes(quick):
    if quick:
        return {"small": (512, 1000), "medium": (256, 32000)}
    return {"small": (16384, 32000), "medium": (16384, 128256), "large": (16384, 256000)}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_cross_entropy(run_bench, device, quick, provider, config, mode, size):
    sizes = shapes(quick)
    if size not in sizes:
        pytest.skip("no such size in --quick mode")
    if device.type == "cpu" and provider in GPU_ONLY:
        pytest.skip(f"{provider} is benchmarked on GPU only")
    if provider in GPU_ONLY:
        pytest.importorskip(GPU_ONLY[provider], reason=f"{provider} is not installed")
    if provider == "fusedloss-single_read" and mode == "fwd":
        pytest.skip("the single-read schedule is the fused forward + backward path")
    if provider == "torch.compile" and (size, config, mode) != COMPILE_AT:
        pytest.skip("torch.compile is timed on one problem only (compile time): V = 128256, ls+focal+z, "
                    "forward+backward")
    n, v = sizes[size]
    make, settings = PROVIDERS[provider]
    kw = CONFIGS[config]
    fn = make(**kw)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(n, v, device=device, dtype=dtype, generator=gen))
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    passes = 1 if mode == "fwd" else 2  # logits read; + gradient written
    run_bench(fn, [x, y], differentiable=[x] if mode == "fwd_bwd" else [],
              reference=lambda a, b: eager_loss(a, b, **kw), bytes=passes * n * v * x.element_size() + 12 * n,
              **row("cross_entropy", provider, mode, f"{n}x{v}", config, dtype, settings))
