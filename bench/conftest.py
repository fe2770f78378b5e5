"""pytest-benchmark fixtures shared by every ``bench/bench_*.py``.

Each benchmark states its work (bytes moved, or FLOPs) and records in ``extra_info`` the achieved GB/s or
TFLOP/s, the fraction of the ceiling measured in the same session (device copy bandwidth, bf16 matmul rate),
peak memory, dtype, shape, provider and device. ``bench/report.py`` renders the JSON.

Sizes: ``--quick`` (the default without a GPU) uses small CPU shapes so the suite runs anywhere; on a GPU the
full sizes of each issue's performance target run.

GPU timing: the timed callable ends with ``torch.cuda.synchronize()``, so each round is the wall time of the
device work (launch overhead included, which is why the sizes are large enough for it not to matter).
"""

import os
import time

import pytest
import torch
from benchutil import sync

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="small CPU-sized problems (the default when no CUDA device is visible)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: skipped on CPU (e.g. torch.compile and GPU-only peers)")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick") or not torch.cuda.is_available()


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _median_seconds(fn, device, repeat):
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _copy_fn(n_bytes, device):
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _matmul_fn(n, dtype, device):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b


@pytest.fixture(scope="session")
def ceilings(device, quick):
    """The two ceilings, measured once per session on this device.

    - copy bandwidth: a device-to-device copy of 2 GiB (64 MiB on CPU), counting bytes read + bytes written;
    - matmul rate: an 8192^3 bf16 matmul on GPU (1024^3 fp32 on CPU), 2 * n^3 FLOPs, random data (zeros run
      faster and would flatter the ceiling).
    """
    n_bytes = (64 << 20) if device.type == "cpu" else (2 << 30)
    copy_s = _median_seconds(_copy_fn(n_bytes, device), device, 10)
    n = 1024 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    mm_s = _median_seconds(_matmul_fn(n, dtype, device), device, 10)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "copy_gbps": 2 * n_bytes / copy_s / 1e9,
        "matmul_tflops": 2 * n**3 / mm_s / 1e12,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


@pytest.fixture
def run_bench(benchmark, device, ceilings):
    """``run_bench(fn, *, bytes=None, flops=None, rounds=..., **info)``: time ``fn`` with pytest-benchmark,
    measure its peak device memory in a separate call, and fill ``extra_info``.

    ``peak_mem_mb`` is the peak allocated during one call beyond what was allocated before it: the inputs and,
    for a forward+backward step that frees and reallocates ``x.grad``, the gradient too. So it is the memory a
    loss needs on top of its inputs and outputs (eager's fp32 intermediates, a fused kernel's workspace)."""

    def run(fn, *, bytes=None, flops=None, rounds=20, warmup_rounds=3, **info):
        def timed():
            fn()
            sync(device)

        peak = None
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            timed()
            peak = torch.cuda.max_memory_allocated(device) - base
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        median = benchmark.stats.stats.median
        extra = benchmark.extra_info
        extra.update(info)
        extra["device"] = ceilings["device_name"]
        extra["median_ms"] = median * 1e3
        extra["peak_mem_mb"] = None if peak is None else peak / 2**20
        extra["copy_gbps_ceiling"] = ceilings["copy_gbps"]
        extra["matmul_tflops_ceiling"] = ceilings["matmul_tflops"]
        if bytes is not None:
            extra["bytes"] = bytes
            extra["gbps"] = bytes / median / 1e9
            extra["frac_copy_bw"] = extra["gbps"] / ceilings["copy_gbps"]
        if flops is not None:
            extra["flops"] = flops
            extra["tflops"] = flops / median / 1e12
            extra["frac_matmul"] = extra["tflops"] / ceilings["matmul_tflops"]
        return median

    return run
