"""The largest CLIP batch that fits (d = 768, bf16, forward + backward), bounded in time; GPU only.

The probe doubles N from 65536 while the predicted next step (4x the last: the work is quadratic in N) keeps the
probe inside ``FUSEDLOSS_BENCH_PROBE_S`` seconds (default 20), and stops at N = 2^20 or at the first
out-of-memory error. Each point records the wall time of one forward + backward at that N (one call, so it includes
any compile for a new shape) and its peak memory beyond inputs and gradients (bench/conftest.py's metric). The
largest N reported is the largest that ran (no extrapolation). Work per point: 6 N^2 d FLOPs counted.

The pytest-benchmark time of this row is the whole probe's duration; the report reads the points from
``extra_info["probe"]``.
"""

import os

import pytest
import torch
from bench_contrastive import eager_clip

import fusedloss

from benchutil import peak_extra_bytes, row, sync, wall_seconds

START, STOP, DIM = 65536, 1 << 20, 768
PROVIDERS = {"fusedloss": fusedloss.clip_loss, "eager": eager_clip}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_clip_largest_batch(benchmark, device, provider):
    if device.type != "cuda":
        pytest.skip("the largest batch is a question of GPU memory; on CPU the probe would only measure time")
    budget = float(os.environ.get("FUSEDLOSS_BENCH_PROBE_S", "20"))
    points = []
    benchmark.pedantic(lambda: _probe(PROVIDERS[provider], device, budget, points), rounds=1, iterations=1)
    if not points:
        pytest.skip(f"{provider}: N = {START} does not fit")
    n, seconds, _ = points[-1]
    benchmark.extra_info.update(
        row("clip_largest_batch", provider, "fwd_bwd", f"{n}x{DIM}", f"d={DIM}", torch.bfloat16),
        largest_n=n, ms=seconds * 1e3, timer="wall-clock, one call", flops=6 * n * n * DIM, probe_budget_s=budget,
        probe=[{"n": p, "seconds": s, "peak_mem_mb": b / 2**20} for p, s, b in points],
        backend=fusedloss.backend(device) if provider == "fusedloss" else None)


def _probe(fn, device, budget, points):
    """Append (N, seconds, peak bytes beyond inputs and gradients) for N = START, 2 START, ... within budget."""
    spent, n = 0.0, START
    while n <= STOP and (not points or spent + 4 * points[-1][1] <= budget):
        gen = torch.Generator(device=device).manual_seed(0)
        try:
            inputs = [torch.randn(n, DIM, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2)]
            inputs.append(torch.tensor(14.285, device=device))
            for t in inputs:
                t.requires_grad_(True)
            seconds = []

            def step(inputs=inputs, seconds=seconds):
                seconds.append(wall_seconds(lambda: fn(*inputs).backward(), device))

            peak = peak_extra_bytes(step, device, inputs, inputs)
        except torch.OutOfMemoryError:
            break
        finally:
            inputs = None
            sync(device)
            torch.cuda.empty_cache()
        points.append((n, seconds[0], peak))
        spent += seconds[0]
        n *= 2
