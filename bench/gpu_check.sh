#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (no network; its image has torch and triton already). In order of
# importance, so that its time limit (DEADLINE seconds for the whole script, default 480) cuts the least important:
#   1. install fusedloss offline, plus the peers' wheels carried in .whl/ (Liger-Kernel, Cut Cross-Entropy, Inf-CL);
#   2. the benchmarks at full size and their report (bench/run.py: the performance targets' files first, every
#      configuration timed twice, each forward + backward checked against fp64 eager), at most BENCH_BUDGET s;
#   3. the CUDA test tier (FUSEDLOSS_TEST_DEVICE=cuda), at most TEST_BUDGET s;
#   4. the linear cross-entropy's phases, both schedules (bench/phases_linear_cross_entropy.py), at most
#      PHASES_BUDGET s (default 150);
#   5. the large-vocabulary cross-entropy config sweep (bench/sweep_cross_entropy.py), with what is left.
# The opt-in schedules (single-read cross-entropy, "tma" and fast linear cross-entropy, fixed-shift contrastive) are
# providers of the benchmarks in step 2, timed in the same run and harness as the defaults and the peers.
# Everything lands in $OUT (the device tool brings it back): gpu.txt, bench.log, results.{json,md,png}, tests.log,
# phases.{json,md}, sweep_cross_entropy.json.
# Knobs: DEADLINE, BENCH_BUDGET (default 300), TEST_BUDGET (default 150), BENCH_FILE_TIMEOUT (seconds per bench
# file), BENCH_FILES (default: all), BENCH_SELECT / TEST_SELECT (pytest -k), TESTS (paths, default tests),
# FUSEDLOSS_BENCH_PROBE_S (the largest-batch probe, seconds per provider, default 60), SKIP_BENCH=1, SKIP_TESTS=1, SKIP_PHASES=1,
# SKIP_SWEEP=1.
# Dry run on a CPU machine: OUT=/tmp/gpu bash bench/gpu_check.sh (the CUDA tier then skips, benchmarks are quick).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PY:-python3}
END=$((SECONDS + ${DEADLINE:-480}))
left() {  # seconds left before the deadline, at most $1
  local rest=$((END - SECONDS))
  echo $((rest < $1 ? rest : $1))
}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-build-isolation --no-deps -e . || exit 1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/gpu.txt"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  budget=$(left "${BENCH_BUDGET:-300}")
  # run.py stops itself at its deadline and still writes the report; the outer timeout is only a safety net.
  timeout $((budget + 60)) $PY bench/run.py --out "$OUT" -k "${BENCH_SELECT:-}" --deadline "$budget" \
    ${BENCH_FILE_TIMEOUT:+--file-timeout "$BENCH_FILE_TIMEOUT"} ${BENCH_FILES:-} 2>&1 | tee "$OUT/bench.log" | tail -60
fi
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$(left 9999)" -gt 30 ]; then
  # The CUDA tier is mostly Triton compile time: spread it over processes when pytest-xdist is there.
  parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n ${TEST_PROCS:-8}")
  FUSEDLOSS_TEST_DEVICE=cuda timeout "$(left "${TEST_BUDGET:-150}")" $PY -m pytest ${TESTS:-tests} -q \
    -p no:cacheprovider --maxfail=20 $parallel -k "${TEST_SELECT:-}" 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [ "${SKIP_PHASES:-0}" != 1 ] && [ "$(left 9999)" -gt 30 ]; then
  # (--dry without a GPU: tiny sizes in Triton's interpreter, so that a CPU dry run of this script runs every step)
  dry=$($PY -c "import torch; print('' if torch.cuda.is_available() else '--dry')")
  timeout "$(left "${PHASES_BUDGET:-150}")" $PY bench/phases_linear_cross_entropy.py --out "$OUT" $dry 2>&1 \
    | tee "$OUT/phases.log" | tail -30
fi
if [ "${SKIP_SWEEP:-0}" != 1 ] && [ "$(left 9999)" -gt 30 ]; then
  # The sweep writes its JSON after every configuration, so the time limit keeps what it measured.
  timeout "$(left 9999)" $PY bench/sweep_cross_entropy.py --out "$OUT/sweep_cross_entropy.json" 2>&1 | tail -8
fi
