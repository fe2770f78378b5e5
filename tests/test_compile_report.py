"""The compile report: every kernel variant the launchers produce compiles for sm_80 and sm_90 without spills.

Runs ``bench/compile_report.py`` in a subprocess (it needs the kernels compiled, not interpreted, so it cannot
share this interpreter-mode process) and fails on a compile failure or a spill, printing the report. The
subprocess starts when the test session has collected this test (``start`` is called from conftest's
``pytest_collection_finish``), so its few minutes of compiles overlap the other tests, which run in this process on
one core, instead of adding to them; the test waits for it.
"""

import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_report = {}


def _runs_here():
    return os.environ.get("FUSEDLOSS_TEST_DEVICE", "cpu") == "cpu"


def start():
    """Start the compile report in the background (once per session)."""
    if _report or not _runs_here():
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLOSS_POISON")}
    log = tempfile.TemporaryFile(mode="w+")
    _report["log"] = log
    _report["proc"] = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "compile_report.py")], cwd=ROOT,
                                       env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def stop():
    """Kill the report if it still runs (a session that ends before its test, e.g. ``-x``) and close its log."""
    if _report:
        if _report["proc"].poll() is None:
            _report["proc"].kill()
            _report["proc"].wait()
        _report["log"].close()
        _report.clear()


def test_every_kernel_variant_compiles_without_spills():
    pytest.importorskip("triton")
    if not _runs_here():
        pytest.skip("the compile report runs in the CPU session (CI); on a GPU the kernels are compiled for real")
    start()  # a no-op when the session started it already
    try:
        code = _report["proc"].wait(timeout=1800)
    except subprocess.TimeoutExpired:
        stop()
        pytest.fail("the compile report did not finish in 30 minutes")
    _report["log"].seek(0)
    report = _report["log"].read()
    stop()
    assert code == 0, f"compile report failed:\n{report[-20000:]}"
    assert " 0 failed or spilled" in report, report[-5000:]
