"""The harness every ``bench/bench_*.py`` runs through: one way to time, one memory metric, one error metric, for
every provider (fusedloss, the peers, torch.compile, eager) in the same process.

``run_bench(fn, inputs, differentiable=..., reference=..., bytes=... or flops=..., **info)`` measures the step
``fn(*inputs)`` (forward under ``no_grad`` when ``differentiable`` is empty; otherwise forward + ``backward()``
from cleared gradients of ``differentiable``):

- time, GPU: CUDA events around each call with the L2 flushed before it (``benchutil.event_times_ms``), their
  median the primary number; next to it the wall clock of call + synchronize (pytest-benchmark's own rounds, each
  after a flush), which adds launch and sync latency. CPU: the wall clock only, the fastest round (``STATISTIC``),
  on ``FUSEDLOSS_BENCH_THREADS`` threads (default 1: with more threads than idle cores, every parallel op waits
  for a descheduled thread and the same run varies by 10x), recording the share of the rounds' time that this
  thread spent waiting for a CPU taken by other processes (``runqueue_wait_frac``). Rounds: after two warm-up
  calls, as many as fill ~0.05 s per timer on GPU (3 to 50: the whole GPU suite must fit in a few minutes) and
  ~0.3 s on CPU (7 to 60).
  Every configuration runs twice, in two passes over the whole file (``rep1``, ``rep2``), so the two repeats are
  minutes apart; the report gives their spread.
- ``peak_mem_mb``: peak memory allocated during one step beyond the inputs, parameters and the gradients the step
  produces (``benchutil.peak_extra_bytes`` states how: GPU allocator counters, CPU profiler allocation events);
  what a loss costs on top of what any implementation must hold. Measured in ``rep1``.
- ``max_rel_error``: the largest relative norm error of the loss and each gradient against ``reference`` (eager
  PyTorch) on fp64 copies of the inputs (``benchutil.max_rel_error``). Forward + backward rows, ``rep1``.

Work (``bytes`` with its formula, or ``flops``) is stated in each bench file; the report divides it by the time and
compares it with the ceilings measured in the same session on a GPU (``benchutil.measure_ceilings``). The JSON's
``machine_info`` records the device, torch / triton / CUDA versions, the threads and the installed peers'
versions; each row records the ceilings of its session and ``settings``, how its provider was called; ``skipped``
lists what did not run and why (a peer not installed, a baseline out of memory).

Sizes: ``--quick`` (the default without a GPU) runs small CPU shapes; on a GPU the full sizes of the performance
targets run.
"""

import os
import statistics

import pytest
import torch

import fusedloss

from benchutil import (
    PEERS,
    event_times_ms,
    iqr,
    l2_flush,
    max_rel_error,
    measure_ceilings,
    peak_extra_bytes,
    peer_version,
    runqueue_wait_s,
    sync,
    warm_up,
)

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (seconds per timer, min rounds, max rounds) per repeat
ROUNDS = {"cuda": (0.05, 3, 50), "cpu": (0.3, 7, 60)}
# The time of a configuration: the median of the CUDA-event rounds; on a CPU shared with other processes, which only
# ever add time (a 2-core machine running anything else slows a round by 2-10x at random), the fastest round.
STATISTIC = {"cuda": statistics.median, "cpu": min}
_session = {"skipped": {}, "oom": {}}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="small CPU-sized problems (the default when no CUDA device is visible)")


def pytest_configure(config):
    if DEVICE.type == "cpu":
        torch.set_num_threads(int(os.environ.get("FUSEDLOSS_BENCH_THREADS", "1")))


def pytest_generate_tests(metafunc):
    """Every benchmark that uses ``run_bench`` runs twice (``rep1``, ``rep2``)."""
    if "repeat" in metafunc.fixturenames:
        metafunc.parametrize("repeat", [1, 2], ids=["rep1", "rep2"])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """All ``rep1`` items before all ``rep2`` items (a stable sort keeps each file's order within a pass)."""
    def repeat_of(item):
        callspec = getattr(item, "callspec", None)
        return callspec.params.get("repeat", 1) if callspec else 1

    items.sort(key=repeat_of)


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _session["skipped"][_name(report.nodeid)] = reason.removeprefix("Skipped: ")


def _name(nodeid):
    """The test's name without its file and repeat: one entry per configuration."""
    return nodeid.split("::")[-1].replace("[rep1-", "[").replace("[rep2-", "[")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """Before pytest-benchmark writes its JSON: drop a benchmark cut short by an interrupt (bench/run.py's time
    limit), whose rounds are incomplete and which would stop the JSON from being written at all."""
    bench_session = session.config._benchmarksession
    bench_session.benchmarks[:] = [b for b in bench_session.benchmarks if "ms" in b.extra_info]
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info.update({
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else
        f"{machine_info.get('cpu', {}).get('brand_raw', 'CPU')} ({os.cpu_count()} CPUs)",
        "device_type": DEVICE.type,
        "fusedloss_backend": fusedloss.backend(DEVICE),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "timer": "cuda-events, L2 flushed" if DEVICE.type == "cuda" else "wall-clock",
        "peers": {dist: peer_version(dist) for dist in PEERS},
    })


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = [{"name": name, "reason": reason, **_session["oom"].get(name, {})}
                              for name, reason in _session["skipped"].items()]


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick") or DEVICE.type != "cuda"


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def ceilings():
    """The GPU ceilings (copy bandwidth, bf16 matmul rate), measured once per session (so once per file with
    bench/run.py) and recorded in every row; None on CPU."""
    return measure_ceilings(DEVICE)


@pytest.fixture(scope="session")
def flush():
    return l2_flush(DEVICE)


def timed_step(fn, inputs, differentiable):
    """The timed callable: ``fn(*inputs)`` under no_grad when nothing is differentiable, else its backward from
    cleared gradients of ``differentiable``."""
    if not differentiable:
        def step():
            with torch.no_grad():
                fn(*inputs)
        return step
    for t in differentiable:
        t.requires_grad_(True)

    def step():
        for t in differentiable:
            t.grad = None
        fn(*inputs).backward()
    return step


@pytest.fixture
def run_bench(request, benchmark, device, ceilings, flush, repeat):
    def run(fn, inputs, *, differentiable=(), reference=None, bytes=None, flops=None, **info):
        try:
            if ceilings:
                info.update(copy_gbps_ceiling=ceilings["copy_gbps"], matmul_tflops_ceiling=ceilings["matmul_tflops"])
            return _measure(benchmark, device, flush, repeat, fn, inputs, differentiable, reference,
                            dict(info, bytes=bytes, flops=flops))
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            benchmark.extra_info.pop("ms", None)  # not a result: pytest_sessionfinish drops it
            _session["oom"][_name(request.node.nodeid)] = info  # so the report can place it next to its problem
            pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")

    return run


def _measure(benchmark, device, flush, repeat, fn, inputs, differentiable, reference, info):
    step = timed_step(fn, inputs, differentiable)
    rounds = warm_up(step, device, *ROUNDS[device.type])
    extra = benchmark.extra_info
    extra.update(info, repeat=repeat, rounds=rounds)
    if info.get("provider") == "fusedloss":
        extra["backend"] = fusedloss.backend(device)
    if device.type == "cuda":
        times = event_times_ms(step, rounds, flush)
        extra["timer"] = "cuda-events"

        def setup():
            flush()
            sync(device)

        def wall():
            step()
            sync(device)

        benchmark.pedantic(wall, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    else:
        waited = runqueue_wait_s()
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
        times = [t * 1e3 for t in benchmark.stats.stats.data]
        extra["timer"] = "wall-clock"
        if waited is not None:  # how much of the timed rounds other processes took: the run's reproducibility
            extra["runqueue_wait_frac"] = (runqueue_wait_s() - waited) * 1e3 / sum(times)
    statistic = STATISTIC[device.type]
    extra.update(ms=statistic(times), statistic=statistic.__name__, median_ms=statistics.median(times),
                 iqr_ms=iqr(times), times_ms=times)
    extra.update(wall_ms=benchmark.stats.stats.median * 1e3, wall_iqr_ms=benchmark.stats.stats.iqr * 1e3)
    if repeat == 1:
        extra["peak_mem_mb"] = peak_extra_bytes(step, device, differentiable, inputs) / 2**20
        if reference is not None and differentiable:
            try:
                extra["max_rel_error"] = max_rel_error(fn, reference, inputs, differentiable)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                extra["error_note"] = "fp64 reference out of memory"
    return extra["ms"]
