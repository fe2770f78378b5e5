"""The largest CLIP and SigLIP batches that fit (d = 768, bf16, forward + backward), each probe bounded in time.

Providers: ``fusedloss`` (the exact schedule), ``fusedloss-fixed_shift`` (CLIP on the opt-in fixed-shift schedule;
SigLIP's kernels are the same on both schedules, so it is probed once) and ``eager`` (the logits materialized). The
band GEMMs run where ``FUSEDLOSS_CONTRASTIVE_GEMM`` says, as in bench_contrastive.py.

A probe doubles N from START while the predicted time of the next size (4x the last: the work is quadratic in N)
fits in what is left of ``FUSEDLOSS_BENCH_PROBE_S`` seconds (default 60, per provider), and stops at N = STOP = 2^20
or at the first out-of-memory error; ``stop_reason`` records which. Each point is the wall time of one forward +
backward at that N (the first size runs once more before, untimed, so that Triton's compiles are not counted; a
later size that needs a new integer specialization compiles within its timed call, seconds against its tens) and
its peak memory beyond inputs and gradients (bench/conftest.py's metric). The largest N reported is the largest
that ran (no extrapolation). Work per point: 6 N^2 d FLOPs counted (8 N^2 d done by the kernels).

Expected device time on an H200 (bench/NOTES.md, predictions): CLIP exact ~45 s (2^20: ~33 s), fixed shift ~25 s
(2^20: ~17 s), SigLIP ~40 s, eager a few seconds each (out of memory at 131072); ~2.5 minutes for the file with the
allocations. Without a GPU (or with ``--quick``) the probe is a dry run of its own logic at N = 256 .. 2048, d = 32,
fp32, on the CPU backend the environment selects (``TRITON_INTERPRET=1``: the kernels in Triton's interpreter).

The pytest-benchmark time of a row is the whole probe's duration; the report reads the points from
``extra_info["probe"]``.
"""

import os

import pytest
import torch
from bench_contrastive import eager_clip, eager_siglip, fixed_shift

import fusedloss

from benchutil import peak_extra_bytes, row, sync, wall_seconds

SIZES = {"gpu": (65536, 1 << 20, 768), "cpu": (256, 2048, 32)}  # (START, STOP, d)
PROVIDERS = {
    "clip": {"fusedloss": fusedloss.clip_loss, "fusedloss-fixed_shift": fixed_shift(fusedloss.clip_loss),
             "eager": eager_clip},
    "siglip": {"fusedloss": fusedloss.siglip_loss, "eager": eager_siglip},
}
SCALARS = {"clip": (14.285,), "siglip": (10.0, -10.0)}  # logit_scale (and logit_bias), each a learnable tensor


@pytest.mark.parametrize("provider", list(PROVIDERS["clip"]))
def test_clip_largest_batch(benchmark, device, quick, provider):
    _largest_batch(benchmark, device, quick, "clip", provider)


@pytest.mark.parametrize("provider", list(PROVIDERS["siglip"]))
def test_siglip_largest_batch(benchmark, device, quick, provider):
    _largest_batch(benchmark, device, quick, "siglip", provider)


def _largest_batch(benchmark, device, quick, family, provider):
    if provider == "fusedloss-fixed_shift" and fusedloss.backend(device) == "torch":
        pytest.skip("the fixed-shift schedule is a kernel schedule: the torch backend does not run it")
    start, stop, dim = SIZES["cpu" if quick else "gpu"]
    dtype = torch.float32 if quick else torch.bfloat16
    budget = float(os.environ.get("FUSEDLOSS_BENCH_PROBE_S", "60"))
    points, reason = [], []
    benchmark.pedantic(lambda: reason.append(_probe(family, PROVIDERS[family][provider], device, dtype, dim, start,
                                                    stop, budget, points)), rounds=1, iterations=1)
    if not points:
        pytest.skip(f"{family} {provider}: N = {start} does not fit ({reason[0]})")
    n, seconds, _ = points[-1]
    benchmark.extra_info.update(
        row(f"{family}_largest_batch", provider, "fwd_bwd", f"{n}x{dim}", f"d={dim}", dtype),
        largest_n=n, ms=seconds * 1e3, timer="wall-clock, one call", flops=6 * n * n * dim, probe_budget_s=budget,
        stop_reason=reason[0], probe=[{"n": p, "seconds": s, "peak_mem_mb": b / 2**20} for p, s, b in points],
        backend=fusedloss.backend(device) if provider.startswith("fusedloss") else None)


def _probe(family, fn, device, dtype, dim, start, stop, budget, points):
    """Append (N, seconds, peak bytes beyond inputs and gradients) for N = start, 2 start, ... while the next size's
    predicted time fits the budget; returns why it stopped."""
    spent, n = 0.0, start
    while True:
        if n > stop:
            return f"reached N = {stop}, the largest size probed"
        if points and spent + 4 * points[-1][1] > budget:
            return (f"time bound: N = {n} predicted {4 * points[-1][1]:.3g} s, {budget - spent:.3g} of "
                    f"{budget:g} s left")
        gen = torch.Generator(device=device).manual_seed(0)
        seconds = []
        try:
            inputs = [torch.randn(n, dim, device=device, dtype=dtype, generator=gen) for _ in range(2)]
            inputs += [torch.tensor(v, device=device) for v in SCALARS[family]]
            for t in inputs:
                t.requires_grad_(True)

            def step(inputs=inputs, seconds=seconds):
                seconds.append(wall_seconds(lambda: fn(*inputs).backward(), device))

            if not points:
                step()  # compiles; not timed
                seconds.clear()
            peak = peak_extra_bytes(step, device, inputs, inputs)
        except torch.OutOfMemoryError as exc:
            return f"out of memory at N = {n}: {str(exc).splitlines()[0][:160]}"
        finally:
            inputs = None
            sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        points.append((n, seconds[0], peak))
        spent += seconds[0]
        n *= 2
