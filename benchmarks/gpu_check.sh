#!/usr/bin/env bash
# The one command for a GPU machine, in order of value, inside one 8-minute device call:
# build for sm_90, the CUDA tests (test_cuda.py -x and the ragged CUDA tests),
# compute-sanitizer racecheck and synccheck on the truncation-path and ragged rows of the
# CUDA-on-CPU harness matrix, initcheck on one truncated verify, memcheck with rows ending at
# their allocation's end, then the GPU benchmark. Every step has a cap (CAPS below) and the
# caps add up to less than the budget, so every step gets its turn.
#
#   bash benchmarks/gpu_check.sh            # results: $OUT (device tool) or benchmarks/results/gpu_check
#   bash benchmarks/gpu_check.sh --dry-run  # no GPU needed: checks that the caps fit the budget, imports
#                                           # the existing build, runs the sanitizer workloads on the
#                                           # CPU and the benchmark's --help; GPU steps print
#                                           # "skipped (no GPU)"; results in $OUT or a temporary folder
#
# $OUT receives: summary.txt (one line per step, rc and seconds), test_cuda.log,
# verify_cuda_<gpu>.{csv,md} and logs.tar.gz (every log). Exit status: 1 if the build, the
# CUDA tests or a sanitizer run failed (dry run: if a plumbing check failed or the caps do
# not fit). Knobs: PYTHON (default .venv/bin/python when present, else python3),
# GPU_CHECK_BUDGET (seconds, default 480), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,20p' "$0"
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (try --help)" >&2
      exit 2
      ;;
  esac
done
if ((DRY_RUN)); then
  OUT=${OUT:-$(mktemp -d)/gpu_check}
else
  OUT=${OUT:-$PWD/benchmarks/results/gpu_check}
fi
mkdir -p "$OUT"
LOGS=$(mktemp -d)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python  # scripts/setup_env.sh's environment
else
  PY=python3
fi
BUDGET=${GPU_CHECK_BUDGET:-480}
# Seconds each step may take at most, in the order the steps run.
declare -A CAPS=([build]=130 [import]=15 [test_cuda]=110 [racecheck]=40 [synccheck]=40 [initcheck]=25 [memcheck]=40 [bench]=60)
ORDER="build import test_cuda racecheck synccheck initcheck memcheck bench"
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CMD...: runs CMD with a timeout of min(CAPS[NAME], time left), logs to $LOGS/NAME.log.
step() {
  local name=$1 cap=${CAPS[$1]:-30} budget rc began
  shift
  budget=$(left)
  ((budget > cap)) && budget=$cap
  if ((budget < 15)); then
    echo "$name: skipped (time budget)" | tee -a "$SUMMARY"
    return 124
  fi
  began=$SECONDS
  timeout "$budget" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc $((SECONDS - began))s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$SUMMARY"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  return $rc
}

# gpu_step NAME [CAP CMD...]: a step that needs the GPU; "skipped (no GPU)" in a dry run.
gpu_step() {
  if ((DRY_RUN)); then
    echo "$1: skipped (no GPU)" | tee -a "$SUMMARY"
    return 0
  fi
  step "$@"
}

{
  nvidia-smi
  nvcc --version
  command -v compute-sanitizer
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
} >"$LOGS/env.log" 2>&1
grep -E "^torch|NVIDIA H|release" "$LOGS/env.log" | tee -a "$SUMMARY"
if ((DRY_RUN)); then
  echo "dry run: python $PY, results in $OUT" | tee -a "$SUMMARY"
fi

# 0. The caps must fit the budget (checked in a dry run too).
total_caps=0
for name in $ORDER; do total_caps=$((total_caps + CAPS[$name])); done
echo "caps: $(for name in $ORDER; do printf '%s=%ss ' "$name" "${CAPS[$name]}"; done)= ${total_caps}s of ${BUDGET}s" | tee -a "$SUMMARY"
if ((total_caps > BUDGET)); then
  echo "caps: ${total_caps}s exceed the budget of ${BUDGET}s" | tee -a "$SUMMARY"
  FAILED=1
fi
test_file() { find python_tests -name "$1" | head -1; }

# 1. Build for sm_90 only (CUDA kernels required); a dry run imports the tree's existing build instead.
export SSS_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
gpu_step build "$PY" setup.py build_ext --inplace || FAILED=1
step import "$PY" -c "import sss_ext; print('BUILD_INFO', sss_ext.BUILD_INFO)" || FAILED=1

# 2. CUDA tests, stopping at the first failure: reference sweep, chi-square with controls,
#    opcheck, graphs, determinism, invalid rows, alignment, awkward sizes; the ragged CUDA rows.
#    Without a GPU they skip with their reason (pytest exits 5: nothing ran).
step test_cuda "$PY" -m pytest "$(test_file test_cuda.py)" "$(test_file test_ragged_verify.py)" -x -q -rfEs -s \
  -k "test_cuda.py or cuda" -p no:cacheprovider
rc=$?
((rc != 0)) && ! ((DRY_RUN && rc == 5)) && FAILED=1  # dry run: every CUDA test skips (pytest's 5)
grep -E "CUDA vs reference|passed|failed|SKIPPED" "$LOGS/test_cuda.log" 2>/dev/null | tee -a "$SUMMARY"
cp "$LOGS/test_cuda.log" "$OUT/" 2>/dev/null

# 3. compute-sanitizer on the harness's truncation-path and ragged rows (benchmarks/gpu_sanitize.py);
#    no caching allocator, so every tensor is its own allocation. A dry run runs the workloads on the CPU.
for tool in racecheck synccheck initcheck memcheck; do
  workload=$([ $tool = initcheck ] && echo initcheck || ([ $tool = memcheck ] && echo memcheck || echo truncation))
  if ((DRY_RUN)); then
    step "$tool" "$PY" benchmarks/gpu_sanitize.py "$workload" --device cpu || FAILED=1
    continue
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "$tool" \
    compute-sanitizer --tool "$tool" --error-exitcode 3 --kernel-name kns=sss_ext "$PY" benchmarks/gpu_sanitize.py "$workload"
  rc=$?
  if [ $rc != 0 ] && grep -qiE "unrecognized|unknown option|invalid.*kernel-name" "$LOGS/$tool.log" 2>/dev/null; then  # older filter syntax
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "$tool" compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" benchmarks/gpu_sanitize.py "$workload"
    rc=$?
  fi
  [ $rc != 0 ] && FAILED=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_sanitize .* done" "$LOGS/$tool.log" 2>/dev/null | tee -a "$SUMMARY"
done

# 4. Benchmark: the goal configuration first, the rest of the grid while its cap lasts.
if ((DRY_RUN)); then
  step bench "$PY" benchmarks/bench_verify_gpu.py --help || FAILED=1
else
  step bench "$PY" benchmarks/bench_verify_gpu.py --budget-seconds $((CAPS[bench] - 20))
  cp benchmarks/results/verify_cuda_* "$OUT/" 2>/dev/null
  grep -h "^Goal" benchmarks/results/verify_cuda_*.md 2>/dev/null | tee -a "$SUMMARY"
fi

echo "total $((SECONDS - START))s; failed=$FAILED" | tee -a "$SUMMARY"
tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
if ((DRY_RUN)); then
  echo "summary: $SUMMARY"
fi
exit $FAILED
