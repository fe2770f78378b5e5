"""Test tiers, tolerances and helpers shared by every test module.

Tiers (the ``tier`` fixture):
- ``interpret``: CPU tensors through the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set here
  before fusedloss is imported, since Triton reads it when ``@triton.jit`` decorates);
- ``torch``: CPU tensors through the torch backend (``FUSEDLOSS_BACKEND=torch``);
- ``cuda``: CUDA tensors through the compiled kernels. Triton cannot mix compiled and interpreted kernels in one
  process, so this tier runs in its own session: ``FUSEDLOSS_TEST_DEVICE=cuda pytest`` on a GPU machine. In the
  CPU session it is skipped with that reason.

Every buffer a kernel writes is poisoned with NaN first (``FUSEDLOSS_POISON=1``), so an unwritten element fails.
"""

import dataclasses
import hashlib
import os
import types
from typing import Callable, Optional

import pytest
import torch

DEVICE = os.environ.get("FUSEDLOSS_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FUSEDLOSS_POISON"] = "1"

import fusedloss  # noqa: E402  (after TRITON_INTERPRET)

# Relative norm error of values and gradients against the fp64 eager reference: the project's tolerance table (the
# README states it).
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}

TIERS = ("interpret", "torch", "cuda")


def _tier_skip_reason(name):
    if name == "cuda":
        if DEVICE != "cuda":
            return "CUDA tier: run FUSEDLOSS_TEST_DEVICE=cuda pytest on a GPU machine"
        if not torch.cuda.is_available():
            return "CUDA tier: no CUDA device visible"
        return None
    if DEVICE != "cpu":
        return f"{name} tier runs in the CPU session (FUSEDLOSS_TEST_DEVICE unset)"
    if name == "interpret" and fusedloss.backend("cpu") != "triton-interpret":
        return "interpreter tier needs triton installed"
    return None


@pytest.fixture(params=TIERS)
def tier(request, monkeypatch):
    """The backend under test: ``tier.device`` for the inputs, ``tier.name``, ``tier.backend``."""
    reason = _tier_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    if request.param == "torch":
        monkeypatch.setenv("FUSEDLOSS_BACKEND", "torch")
    device = torch.device("cuda" if request.param == "cuda" else "cpu")
    t = types.SimpleNamespace(name=request.param, device=device, backend=fusedloss.backend(device))
    expected = {"interpret": "triton-interpret", "torch": "torch", "cuda": "triton"}[request.param]
    assert t.backend == expected, f"tier {request.param} would run backend {t.backend}"
    return t


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    seed = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    return torch.Generator().manual_seed(seed)


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| in fp64; NaN anywhere in ``actual`` where ``expected`` is finite
    gives inf. Non-finite entries must match exactly (same inf, or NaN where the reference is NaN)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    finite = torch.isfinite(e)
    if not torch.equal(torch.isnan(a), torch.isnan(e)) or not torch.equal(a[~finite & ~torch.isnan(e)],
                                                                          e[~finite & ~torch.isnan(e)]):
        return float("inf")
    a, e = a[finite], e[finite]
    denom = e.norm()
    diff = (a - e).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def assert_close(actual, expected, dtype, what="value", factor=1.0):
    """Relative norm error within the tolerance of ``dtype`` (times ``factor``, which a test must justify)."""
    err = rel_err(actual, expected)
    tol = TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def peak_allocated_bytes(fn):
    """Peak of live bytes allocated by torch's CPU allocator while ``fn`` runs, over the live bytes at its start:
    the profiler records every allocation and free (``profile_memory=True``, the ``[memory]`` events, with signed
    sizes); their running sum in time order is the live total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def readme_example(name):
    """The code block marked ``<!-- example: name -->`` in the README, for a test to run."""
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path) as f:
        return re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", f.read(), re.S).group(1)


def randn(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False):
    """Normal(0, scale) drawn on the CPU from ``gen`` (so every tier sees the same numbers), then moved."""
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    return x.requires_grad_(requires_grad)


def run_gloo_ranks(tmp_path, worker, backend_name, world, *args):
    """Run ``tests/<worker> RANK WORLD INIT_FILE OUT_FILE *args`` as ``world`` processes (a gloo group through a file
    in ``tmp_path``), on the backend ``backend_name`` names (``"interpret"`` or ``"torch"``) with poisoned buffers,
    and return what each rank saved to its OUT_FILE (a dict whose "backend" entry, ``fusedloss.backend("cpu")`` on
    that rank, is checked and removed). A rank that fails or hangs fails the test with its output."""
    import subprocess
    import sys

    import torch.distributed as dist

    if DEVICE != "cpu":
        pytest.skip("the gloo tests run in the CPU session; the CUDA tier runs the kernels on one GPU")
    if backend_name == "interpret":
        pytest.importorskip("triton")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLOSS_BACKEND")}
    env.update({"TRITON_INTERPRET": "1"} if backend_name == "interpret" else {"FUSEDLOSS_BACKEND": "torch"})
    env["FUSEDLOSS_POISON"] = "1"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), worker)
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(tmp_path / "init"), str(outs[r]),
                               *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a gloo rank of {worker} did not finish in 300 s")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {worker} failed (exit {p.returncode}):\n{log[-4000:]}"
    results = [torch.load(o) for o in outs]
    expected = {"interpret": "triton-interpret", "torch": "torch"}[backend_name]
    assert all(r.pop("backend") == expected for r in results), f"a rank ran another backend than {expected}"
    return results


@dataclasses.dataclass(frozen=True)
class Case:
    """A loss call for ``test_contract.py``: ``make(gen, dtype) -> (args, kwargs)`` builds fresh CPU inputs in
    ``dtype``; ``grad_args`` are the positions of the differentiable tensors; ``compile`` puts the case in the
    (slow) torch.compile test; ``stride0(args, kwargs) -> (args, kwargs)`` replaces some argument by an expanded,
    stride-0 tensor of the same values."""

    name: str
    fn: Callable
    make: Callable
    grad_args: tuple = (0,)
    compile: bool = False
    stride0: Optional[Callable] = None


COMPILE_REPORT_TEST = "test_every_kernel_variant_compiles_without_spills"


def pytest_collection_modifyitems(items):
    """The compile report's test runs last: it waits for the report's subprocess, which so overlaps every other test
    (alphabetically it would come third, and the session would sit idle while the report compiles)."""
    items.sort(key=lambda item: item.nodeid.endswith(COMPILE_REPORT_TEST))  # stable: the others keep their order


def pytest_collection_finish(session):
    """Start the compile report's subprocess as soon as its test is collected (``test_compile_report.start``)."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.nodeid.endswith(COMPILE_REPORT_TEST):
            item.module.start()
            session.config.add_cleanup(item.module.stop)
            return
