"""Cross-entropy family: fused kernel vs eager PyTorch, torch.compile and Liger-Kernel.

Work, per (N rows, V classes) problem with element size s bytes (the minimum any implementation must move):
    forward            bytes = N V s (logits read once) + 8 N (int64 targets) + 4 N (fp32 per-row losses)
    forward + backward bytes = 2 N V s (logits read once, gradient written once) + 8 N + 4 N
The fused kernel reads each row twice (pass 2 re-reads it, in reverse block order, mostly from L2), so its
fraction of the copy bandwidth by this count is its efficiency against the one-read ideal.

Configurations: ``plain`` (F.cross_entropy), ``ls+z`` (label smoothing 0.1, z-loss 1e-4: the most Liger
supports) and ``ls+focal+z`` (plus focal gamma 2: the issue's target configuration).
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from benchutil import skip_if_oom

CONFIGS = {
    "plain": {},
    "ls+z": {"label_smoothing": 0.1, "z_loss": 1e-4},
    "ls+focal+z": {"label_smoothing": 0.1, "z_loss": 1e-4, "focal_gamma": 2.0},
}


def eager_loss(x, y, label_smoothing=0.0, z_loss=0.0, focal_gamma=0.0):
    """What a user writes in eager PyTorch for the same loss (fp32 math, as the fused kernel does)."""
    if not (z_loss or focal_gamma):
        return F.cross_entropy(x, y, label_smoothing=label_smoothing)
    xf = x.float()
    ce = F.cross_entropy(xf, y, label_smoothing=label_smoothing, reduction="none")
    lse = torch.logsumexp(xf, dim=-1)
    if focal_gamma:
        p_t = torch.exp(xf.gather(1, y[:, None]).squeeze(1) - lse)
        ce = (1 - p_t) ** focal_gamma * ce
    return (ce + z_loss * lse * lse).mean()


_compiled = {}


def compiled_loss(x, y, **kw):
    key = tuple(sorted(kw.items()))
    if key not in _compiled:
        _compiled[key] = torch.compile(lambda a, b: eager_loss(a, b, **kw), dynamic=False)
    return _compiled[key](x, y)


def liger_loss():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None

    cache = {}

    def loss(x, y, label_smoothing=0.0, z_loss=0.0, focal_gamma=0.0):
        if focal_gamma:
            pytest.skip("Liger-Kernel's cross-entropy has no focal term")
        key = (label_smoothing, z_loss)
        if key not in cache:
            cache[key] = LigerCrossEntropyLoss(label_smoothing=label_smoothing, lse_square_scale=z_loss)
        return cache[key](x, y)

    return loss


PROVIDERS = {
    "fusedloss": lambda x, y, **kw: fusedloss.cross_entropy(x, y, **kw),
    "eager": eager_loss,
    "torch.compile": compiled_loss,
    "liger": liger_loss(),
}


def shapes(quick):
    if quick:
        return [(512, 1000), (512, 32000)]
    return [(16384, 32000), (16384, 128256), (16384, 256000)]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_cross_entropy(run_bench, device, quick, provider, config, mode, size):
    sizes = dict(zip(["small", "medium", "large"], shapes(quick)))
    if size not in sizes:
        pytest.skip("no such size in --quick mode")
    n, v = sizes[size]
    fn = PROVIDERS[provider]
    if fn is None:
        pytest.skip(f"{provider} is not importable")
    if device.type == "cpu" and provider in ("torch.compile", "liger"):
        pytest.skip(f"{provider} is benchmarked on GPU only")
    if provider == "torch.compile" and (config != "ls+focal+z" or mode != "fwd_bwd"):
        pytest.skip("torch.compile is timed on the target configuration's forward+backward only (compile time)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kw = CONFIGS[config]
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(n, v, device=device, dtype=dtype, generator=gen))
    y = torch.randint(0, v, (n,), device=device, generator=gen)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x, y, **kw)
        bytes_moved = n * v * x.element_size() + 12 * n
    else:
        x.requires_grad_(True)

        def step():
            x.grad = None
            fn(x, y, **kw).backward()
        bytes_moved = 2 * n * v * x.element_size() + 12 * n
    skip_if_oom(step)
    skip_if_oom(lambda: _run(run_bench, step, bytes_moved, provider, config, mode, n, v, dtype, device))


def _run(run_bench, step, bytes_moved, provider, config, mode, n, v, dtype, device):
    run_bench(step, bytes=bytes_moved, rounds=10 if device.type == "cuda" else 5, warmup_rounds=2,
              family="cross_entropy", provider=provider, config=config, mode=mode, shape=f"{n}x{v}",
              dtype=str(dtype).replace("torch.", ""), backend=fusedloss.backend(device))
