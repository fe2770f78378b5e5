"""The compile report: every kernel variant the launchers produce compiles for sm_80 and sm_90 without spills.

Runs ``bench/compile_report.py`` in a subprocess (it needs the kernels compiled, not interpreted, so it cannot
share this interpreter-mode process) and fails on a compile failure or a spill, printing the report.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_variant_compiles_without_spills():
    pytest.importorskip("triton")
    if os.environ.get("FUSEDLOSS_TEST_DEVICE", "cpu") != "cpu":
        pytest.skip("the compile report runs in the CPU session (CI); on a GPU the kernels are compiled for real")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLOSS_POISON")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_report.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"compile report failed:\n{report[-20000:]}"
    assert " 0 failed or spilled" in proc.stdout, report[-5000:]
