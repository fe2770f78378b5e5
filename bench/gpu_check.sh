#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (no network; its image has torch and triton already):
#   1. install fusedloss offline, plus the peers' wheels carried in .whl/ (Liger-Kernel, Cut Cross-Entropy, Inf-CL);
#   2. run the CUDA test tier (FUSEDLOSS_TEST_DEVICE=cuda);
#   3. sweep the large-vocabulary cross-entropy configs (bench/sweep_cross_entropy.py);
#   4. run the benchmarks at full size and render the report.
# Everything lands in $OUT (the device tool brings it back, 8 files at most): gpu.txt, tests.log,
# sweep_cross_entropy.json, bench.log, results.{json,md,png}.
# Knobs: TESTS (paths, default tests), TEST_SELECT / BENCH_SELECT (pytest -k), TEST_TIMEOUT / SWEEP_TIMEOUT / BENCH_TIMEOUT (seconds),
# BENCH_FILE_TIMEOUT (seconds per bench file), BENCH_FILES (default: all), SKIP_TESTS=1, SKIP_SWEEP=1,
# SKIP_BENCH=1.
# Dry run on a CPU machine: OUT=/tmp/gpu bash bench/gpu_check.sh (the CUDA tier then skips, benchmarks are quick).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PY:-python3}

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

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # The CUDA tier is mostly Triton compile time: spread it over processes when pytest-xdist is there.
  parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n ${TEST_PROCS:-8}")
  FUSEDLOSS_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-240}" $PY -m pytest ${TESTS:-tests} -q -p no:cacheprovider \
    --maxfail=20 $parallel -k "${TEST_SELECT:-}" 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [ "${SKIP_SWEEP:-0}" != 1 ]; then
  timeout "${SWEEP_TIMEOUT:-120}" $PY bench/sweep_cross_entropy.py --out "$OUT/sweep_cross_entropy.json" 2>&1 \
    | tail -8
fi
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
timeout "${BENCH_TIMEOUT:-300}" $PY bench/run.py --out "$OUT" -k "${BENCH_SELECT:-}" \
  --file-timeout "${BENCH_FILE_TIMEOUT:-150}" ${BENCH_FILES:-} 2>&1 | tee "$OUT/bench.log" | tail -80
