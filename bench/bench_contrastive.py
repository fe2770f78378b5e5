"""Contrastive losses: tiled kernels vs eager PyTorch, torch.compile, Inf-CL and the bare matmuls.

Work, per problem (CLIP: N image-text pairs; NT-Xent: M = 2N rows; d features), counted as the matmuls the
loss needs, whoever computes it:
    forward            flops = 2 N^2 d   (one similarity matrix; CLIP's two directions share it)
    forward + backward flops = 6 N^2 d   (plus the two gradient products, dQ = W K and dK = W^T Q, 2 N^2 d each)
(NT-Xent: the same with M rows, since dF = W F + W^T F.) The fused kernels do more: the backward recomputes the
logits (forward + backward 8 N^2 d for CLIP, 6 M^2 d for NT-Xent, recorded as ``hw_flops``); Inf-CL computes the
logits once per direction and per backward kernel. ``frac_matmul`` compares the counted work with the bf16 matmul
rate measured in the same session (an 8192^3 matmul, bench/conftest.py); the ``matmul`` provider times just
those bare matmuls at this shape (``S = Q K^T``, then ``W K`` and ``W^T Q`` with a random ``W``), the practical
ceiling for any implementation.

Sizes: ``--quick`` (CPU): CLIP N = 2048, NT-Xent 2N = 2048, d = 128, fp32 (the torch path on CPU). GPU: CLIP
N = 65536, d = 768, bf16 (the issue's target), CLIP N = 16384, d = 512, NT-Xent 2N = 32768, d = 128. The
"largest batch" probe doubles N from 65536 (CLIP, d = 768, bf16) while the predicted step time keeps it inside
``FUSEDLOSS_BENCH_PROBE_S`` seconds (default 45) and records the time and peak memory of each size; the largest N
reported is the largest one that ran (no extrapolation). The eager baseline is probed the same way until it runs
out of memory.
"""

import os
import time

import pytest
import torch
import torch.nn.functional as F
from benchutil import skip_if_oom, sync

import fusedloss
from fusedloss.losses.contrastive import clip_loss, nt_xent

# ---------------------------------------------------------------------------------------------------------------
# Providers: (features..., scale) -> loss


def eager_clip(image, text, scale):
    """open_clip's ClipLoss, single process: what a user writes."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_nt_xent(features, temperature):
    """The seed's info_nce_loss."""
    features = F.normalize(features, dim=1)
    similarity = features @ features.T / temperature
    n = features.shape[0] // 2
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(features.device)
    mask = torch.eye(2 * n, dtype=torch.bool, device=features.device)
    return F.cross_entropy(similarity.masked_fill(mask, -float("inf")), labels)


_compiled = {}


def _compile(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def inf_cl_clip():
    """Inf-CL's single-GPU flash loss (``inf_cl.flash.cal_flash_loss``), one call per direction; its inputs are
    normalized by the caller and its head_dim (256) must divide d."""
    try:
        from inf_cl.flash import cal_flash_loss
    except ImportError:
        return None

    def loss(image, text, scale):
        if image.shape[1] % 256:
            pytest.skip("Inf-CL's flash loss needs d to be a multiple of its head_dim 256")
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        labels = torch.arange(image.shape[0], device=image.device)
        return (cal_flash_loss(image, text, labels, scale).mean()
                + cal_flash_loss(text, image, labels, scale).mean()) / 2

    return loss


CLIP = {
    "fusedloss": clip_loss,
    "eager": eager_clip,
    "torch.compile": lambda i, t, s: _compile(eager_clip)(i, t, s),
    "inf_cl": inf_cl_clip(),
}
NT_XENT = {
    "fusedloss": nt_xent,
    "eager": eager_nt_xent,
    "torch.compile": lambda f, t: _compile(eager_nt_xent)(f, t),
}


def sizes(quick):
    if quick:
        return {"clip": [(2048, 128)], "nt_xent": [(2048, 128)]}
    return {"clip": [(65536, 768), (16384, 512)], "nt_xent": [(32768, 128)]}


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _info(device, dtype, provider, family, mode, rows, dim, hw_flops):
    return dict(family=family, provider=provider, mode=mode, shape=f"{rows}x{dim}", config="d=%d" % dim,
                dtype=str(dtype).replace("torch.", ""), backend=fusedloss.backend(device), hw_flops=hw_flops)


# ---------------------------------------------------------------------------------------------------------------
# Throughput


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(CLIP) + ["matmul"])
@pytest.mark.parametrize("size", [0, 1])
def test_clip(run_bench, device, quick, provider, mode, size):
    shapes = sizes(quick)["clip"]
    if size >= len(shapes):
        pytest.skip("no such size in --quick mode")
    n, dim = shapes[size]
    _throughput(run_bench, device, "clip", CLIP, provider, mode, n, dim)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(NT_XENT) + ["matmul"])
def test_nt_xent(run_bench, device, quick, provider, mode):
    rows, dim = sizes(quick)["nt_xent"][0]
    _throughput(run_bench, device, "nt_xent", NT_XENT, provider, mode, rows, dim)


def _throughput(run_bench, device, family, providers, provider, mode, rows, dim):
    fn = providers.get(provider)
    if provider != "matmul" and fn is None:
        pytest.skip(f"{provider} is not importable")
    if device.type == "cpu" and provider in ("torch.compile", "inf_cl"):
        pytest.skip(f"{provider} is benchmarked on GPU only")
    if provider == "torch.compile" and (mode != "fwd_bwd" or (family, rows, dim) != ("clip", 65536, 768)):
        pytest.skip("torch.compile is timed on the target problem's forward+backward only (compile time)")
    dtype = _dtype(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n_inputs = 2 if family == "clip" else 1
    feats = [skip_if_oom(lambda: torch.randn(rows, dim, device=device, dtype=dtype, generator=gen))
             for _ in range(n_inputs)]
    scale = torch.tensor(14.285 if family == "clip" else 0.1, device=device)  # logit scale / temperature
    flops = (2 if mode == "fwd" else 6) * rows * rows * dim
    hw = {"fusedloss": (2 if mode == "fwd" else 8 if family == "clip" else 6) * rows * rows * dim,
          "inf_cl": (4 if mode == "fwd" else 16) * rows * rows * dim}.get(provider, flops)

    if provider == "matmul":
        q, k = feats[0], feats[-1]
        w = skip_if_oom(lambda: torch.randn(rows, rows, device=device, dtype=dtype, generator=gen)) \
            if mode == "fwd_bwd" else None

        def step():
            q @ k.T
            if w is not None:
                w @ k
                w.T @ q
    elif mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*feats, scale)
    else:
        for f in feats:
            f.requires_grad_(True)
        if family == "clip":
            scale.requires_grad_(True)

        def step():
            for f in feats:
                f.grad = None
            scale.grad = None
            fn(*feats, scale).backward()
    skip_if_oom(step)
    skip_if_oom(lambda: run_bench(step, flops=flops, rounds=5 if device.type == "cuda" else 3, warmup_rounds=1,
                                  **_info(device, dtype, provider, family, mode, rows, dim, hw)))


# ---------------------------------------------------------------------------------------------------------------
# Largest batch that fits (CLIP, d = 768, bf16), bounded in time


@pytest.mark.parametrize("provider", ["fusedloss", "eager"])
def test_clip_largest_batch(run_bench, device, quick, provider):
    dim = 128 if quick else 768
    start = 1024 if quick else 65536
    budget = float(os.environ.get("FUSEDLOSS_BENCH_PROBE_S", "10" if quick else "45"))
    fn = CLIP[provider]
    dtype = _dtype(device)
    points = []  # (n, seconds, peak bytes)
    t_begin = time.perf_counter()
    n, last_step = start, None
    largest = None
    while True:
        spent = time.perf_counter() - t_begin
        # A step at 2n costs ~4x one at n (quadratic work): stop before the budget would be exceeded.
        if last_step is not None and spent + 4 * last_step > budget:
            break
        try:
            seconds, peak = _one_step(fn, n, dim, dtype, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        points.append((n, seconds, peak))
        largest, last_step = n, seconds
        n *= 2
    if largest is None:
        pytest.skip(f"{provider}: N = {start} does not fit")
    extra = {"probe": [{"n": p, "seconds": s, "peak_mb": None if b is None else b / 2**20} for p, s, b in points]}
    n = largest
    gen = torch.Generator(device=device).manual_seed(0)
    img = torch.randn(n, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    txt = torch.randn(n, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    scale = torch.tensor(14.285, device=device, requires_grad=True)

    def step():
        img.grad = txt.grad = scale.grad = None
        fn(img, txt, scale).backward()

    run_bench(step, flops=6 * n * n * dim, rounds=1, warmup_rounds=0, largest_n=n, probe_budget_s=budget, **extra,
              **_info(device, dtype, provider, "clip_largest_batch", "fwd_bwd", n, dim, None))


def _one_step(fn, n, dim, dtype, device):
    """Seconds and peak extra memory of one forward + backward at batch n (inputs allocated first)."""
    gen = torch.Generator(device=device).manual_seed(0)
    img = torch.randn(n, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    txt = torch.randn(n, dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    scale = torch.tensor(14.285, device=device, requires_grad=True)
    peak = None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn(img, txt, scale).backward()
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    del img, txt, scale
    return seconds, peak

