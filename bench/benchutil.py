"""Measurement helpers shared by bench/conftest.py, the benchmark files and bench/sweep_cross_entropy.py (imported
by name: pytest and the scripts put bench/ on sys.path).

Every provider of every benchmark goes through the same three measurements (bench/conftest.py drives them):
- time: CUDA events around each call with the L2 flushed before it, and the wall clock of call + synchronize next
  to it (GPU); the wall clock alone (CPU);
- peak memory beyond inputs and gradients (``peak_extra_bytes``);
- error against eager PyTorch on fp64 copies of the inputs (``max_rel_error``).
"""

import importlib.metadata
import statistics
import time

import pytest
import torch

# Written before each timed call on a GPU: larger than the L2 of any current GPU (H100 50 MB, H200 60 MB,
# B200 126 MB), so every call starts with its inputs in HBM, as in a training step.
FLUSH_BYTES = 256 << 20

# The peers, when importable: distribution name (as pip knows it) -> module.
PEERS = {"liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy", "inf-cl": "inf_cl"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def skip_if_oom(fn):
    """Run ``fn``; an out-of-memory error becomes a skip with that reason (a baseline that does not fit is a
    result: bench/conftest.py records the reason in the JSON and the report lists it)."""
    try:
        return fn()
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")


def peer_version(dist):
    """The installed version of a peer's distribution, or None."""
    for name in (dist, dist.replace("-", "_")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


_compiled = {}


def compiled(fn, key):
    """``torch.compile(fn)``, compiled once per ``key`` for the whole session (the first call, in the warm-up,
    pays the compile time)."""
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False)
    return _compiled[key]


def row(family, provider, mode, shape, config, dtype, settings=None):
    """The fields every row records: the report groups rows by (family, shape, config, mode) and names the
    provider; ``settings`` says how the provider was called (a peer's options, the eager formulation)."""
    return dict(family=family, provider=provider, mode=mode, shape=shape, config=config, dtype=dtype_name(dtype),
                settings=settings)


def provider_fn(provider, ours, eager, key):
    """The loss a provider times, for the files whose providers are fusedloss, eager and torch.compile: ``ours``,
    ``eager``, or ``eager`` compiled (once per ``key``; GPU only, like every compiled or peer provider)."""
    if provider == "torch.compile":
        if not torch.cuda.is_available():
            pytest.skip("torch.compile is benchmarked on GPU only")
        return compiled(eager, key)
    return {"fusedloss": ours, "eager": eager}[provider]


def lm_head_problem(device, dtype, n, hidden, vocab):
    """(x, W, y): an LM-head problem of N tokens, H hidden, V classes, seeded, W scaled to logits of order 1."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(n, hidden, device=device, dtype=dtype, generator=gen))
    w = skip_if_oom(lambda: torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) / hidden**0.5)
    return x, w, torch.randint(0, vocab, (n,), device=device, generator=gen)


def lm_head_matmuls(run_bench, x, w, *, backward, **common):
    """Time the bare matmuls of an LM head's step: x @ W^T; with ``backward`` also G @ W and G^T @ x for a random G
    of the logits' shape (the practical ceiling of any LM-head loss)."""
    g = None
    if backward:
        g = skip_if_oom(lambda: torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype))

    def bare(x, w, g):
        x @ w.t()
        if g is not None:
            g @ w
            g.t() @ x

    run_bench(bare, [x, w, g], **common)


def at_least_fp32(t):
    """Upcast to fp32 as a user's eager code does with ``.float()``, but keep fp64 inputs in fp64 (so the fp64
    reference of ``max_rel_error`` stays fp64 throughout)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Time


def l2_flush(device):
    """The callable run before each timed call: zero a buffer larger than L2 (GPU); nothing on CPU."""
    if device.type != "cuda":
        return lambda: None
    buffer = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    return buffer.zero_


def event_times_ms(fn, rounds, flush):
    """CUDA-event time of each of ``rounds`` calls of ``fn`` on the current stream, ``flush`` run before each one
    and outside its events. The host does not wait between rounds, so launch latency hides behind the flush, as in
    ``triton.testing.do_bench``; an implementation that syncs with the host inside ``fn`` pays for it here."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    for start, end in zip(starts, ends):
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def wall_seconds(fn, device):
    """Wall-clock seconds of one call of ``fn`` and the synchronize after it."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def runqueue_wait_s():
    """Seconds this thread has spent runnable but waiting for a CPU (Linux ``/proc/thread-self/schedstat``): the
    share of a CPU timing that other processes took. None where the kernel does not report it."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def warm_up(fn, device, target_s, min_rounds, max_rounds):
    """Call ``fn`` twice (the first call compiles: Triton, torch.compile, lazy inits) and return the number of
    timed rounds that fills ``target_s`` seconds at the second call's wall time, within [min_rounds, max_rounds]."""
    fn()
    one = wall_seconds(fn, device)
    return max(min_rounds, min(max_rounds, int(target_s / max(one, 1e-6))))


def measure_ceilings(device):
    """The two GPU ceilings, timed like the benchmarks (CUDA events, L2 flushed, median of 20):
    - copy: ``dst.copy_(src)`` of 2 GiB, counting bytes read + bytes written;
    - matmul: an 8192^3 bf16 matmul, 2 * 8192^3 FLOPs, on random data (zeros run faster and would flatter it).
    Not measured on CPU: the CPU run exercises the torch backend, and a CPU copy or matmul rate is no ceiling for it.
    """
    if device.type != "cuda":
        return None
    flush = l2_flush(device)
    n_bytes, n = 2 << 30, 8192
    copy_ms = _copy_ms(n_bytes, device, flush)
    matmul_ms = _matmul_ms(n, device, flush)
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * n_bytes / copy_ms / 1e6, "matmul_tflops": 2 * n**3 / matmul_ms / 1e9,
            "matmul_dtype": "bfloat16"}


def _copy_ms(n_bytes, device, flush):
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return statistics.median(event_times_ms(lambda: dst.copy_(src), 20, flush))


def _matmul_ms(n, device, flush):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return statistics.median(event_times_ms(lambda: a @ b, 20, flush))


def iqr(values):
    """Interquartile range (linear interpolation between order statistics, as numpy's default)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


# ---------------------------------------------------------------------------------------------------------------
# Memory


def peak_extra_bytes(step, device, differentiable, inputs):
    """Peak bytes allocated during one call of ``step`` beyond the inputs, parameters and gradients.

    Measured as: clear the ``.grad`` of every tensor in ``differentiable``; ``base`` = bytes allocated; run the
    step; ``peak`` = the most bytes allocated at any moment during it; result = ``peak - base - grads``, where
    ``grads`` is the size of the gradient storages the step leaves in ``.grad`` that are new allocations (a
    gradient written into an input's own storage, as Liger-Kernel's cross-entropy does, allocates nothing). Without
    the gradients cleared first, the previous call's gradients would be in ``base`` and freed by the step.

    GPU: the caching allocator's counters (``reset_peak_memory_stats``, ``max_memory_allocated``). CPU: the
    allocation events of ``torch.profiler`` (``profile_memory=True``; every allocation and free of torch's CPU
    allocator, summed in time order: the running total's maximum is the peak over ``base``). Both count tensor
    memory only, not the allocator's cached-but-free blocks, the CUDA context or Python objects.
    """
    for t in differentiable:
        t.grad = None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        over_base = torch.cuda.max_memory_allocated(device) - base
    else:
        over_base = _cpu_peak_over_base(step)
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    grads = {}
    for t in differentiable:
        if t.grad is not None and t.grad.untyped_storage().data_ptr() not in input_storages:
            grads[t.grad.untyped_storage().data_ptr()] = t.grad.untyped_storage().nbytes()
        t.grad = None
    return over_base - sum(grads.values())


def _cpu_peak_over_base(step):
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))  # frees are negative
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------------------------
# Correctness


def max_rel_error(fn, reference, inputs, differentiable):
    """Largest relative norm error ``||ours - ref|| / ||ref||`` over the loss and the gradient of each tensor in
    ``differentiable``: ``fn`` on ``inputs`` against ``reference`` (eager PyTorch) on fp64 copies of them, integer
    inputs shared. The copies are taken first, since some peers write their gradient over their input."""
    copies = {id(t): t.detach().double().requires_grad_(t.requires_grad) for t in inputs if t.is_floating_point()}
    ref_inputs = [copies.get(id(t), t) for t in inputs]

    def loss_and_grads(f, args, wrt):
        for t in wrt:
            t.grad = None
        loss = f(*args)
        loss.backward()
        return [loss.detach()] + [t.grad for t in wrt]

    ours = loss_and_grads(fn, inputs, differentiable)
    ref = loss_and_grads(reference, ref_inputs, [copies[id(t)] for t in differentiable])
    tiny = torch.finfo(torch.float64).tiny
    error = max(float((a.double() - b).norm() / max(float(b.norm()), tiny)) for a, b in zip(ours, ref))
    for t in differentiable:
        t.grad = None
    return error
