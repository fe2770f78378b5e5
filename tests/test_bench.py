"""The benchmark files run: every ``bench/bench_*.py`` at its quick CPU sizes (each provider's call, timed briefly,
and its result checked against fp64 eager by bench/conftest.py), in a subprocess with the benchmark suite's own
settings, so that the README's first command keeps working (a broken provider fails here, not only in a GPU run)."""

import glob
import os
import subprocess
import sys

import pytest

from conftest import DEVICE

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_benchmark_files_run_at_quick_sizes():
    if DEVICE != "cpu":
        pytest.skip("the CPU session runs the quick sizes; bench/gpu_check.sh runs the full ones on a GPU")
    pytest.importorskip("pytest_benchmark", reason="the test extra installs pytest-benchmark")
    own = ("TRITON_INTERPRET", "FUSEDLOSS_BACKEND", "FUSEDLOSS_POISON")  # the test tiers' settings, not the suite's
    env = {k: v for k, v in os.environ.items() if k not in own}
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(BENCH, "bench_*.py")))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--quick", *files],
                         cwd=BENCH, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
