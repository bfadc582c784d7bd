#!/usr/bin/env bash
# The one command for a GPU machine: build the CUDA kernels, run the CUDA tests and their CPU
# emulation, compute-sanitizer memcheck + racecheck on a small sweep, the GPU benchmark, then
# the rest of python_tests while time is left -- all inside 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh            # results: $OUT (device tool) or benchmarks/results/gpu_check
#   bash benchmarks/gpu_check.sh --dry-run  # no GPU needed: the script's plumbing, an import of the
#                                           # existing build, the CUDA tests' skip and the sweep /
#                                           # benchmark scripts' syntax; GPU stages print
#                                           # "skipped (no GPU)"; results in $OUT or a temporary folder
#
# $OUT receives: summary.txt (one line per step, rc and seconds), test_cuda.log,
# verify_cuda_<gpu>.{csv,md} and logs.tar.gz (every log). Exit status: 1 if the build, the
# CUDA tests or a sanitizer run failed (dry run: if a plumbing check failed). Knobs: PYTHON
# (default .venv/bin/python when present, else python3), GPU_CHECK_BUDGET (seconds, default
# 450), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,17p' "$0"
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
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP_SECONDS CMD...: runs CMD with a timeout of min(CAP, time left), logs to $LOGS/NAME.log.
step() {
  local name=$1 cap=$2 budget rc began
  shift 2
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

# 1. Build (CUDA kernels required); a dry run imports the tree's existing build instead.
export SSS_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
gpu_step build 240 "$PY" setup.py build_ext --inplace || FAILED=1
step import 60 "$PY" -c "import sss_ext; print('BUILD_INFO', sss_ext.BUILD_INFO)" || FAILED=1

# 2. CUDA tests (reference sweep, tau in {0.01, 0.1}, chi-square, opcheck, graphs, determinism,
#    invalid rows, the score range rule, alignment, awkward sizes) and the CPU emulation of the
#    kernels' arithmetic. Without a GPU the CUDA tests skip with their reason.
step test_cuda 200 "$PY" -m pytest python_tests/test_cuda.py python_tests/test_cuda_emulation.py -q -rfEs -s \
  -p no:cacheprovider || FAILED=1
grep -E "CUDA vs reference|passed|failed|SKIPPED" "$LOGS/test_cuda.log" 2>/dev/null | tee -a "$SUMMARY"
cp "$LOGS/test_cuda.log" "$OUT/" 2>/dev/null

# 3. compute-sanitizer on a small sweep (no caching allocator, so every tensor is its own allocation).
cat >"$LOGS/sanitize_sweep.py" <<'PYTHON'
import itertools, os, torch, sss_ext
small = os.environ.get("SWEEP") == "small"
g = torch.Generator(device="cuda").manual_seed(0)
shapes = [(3, 2, 7), (2, 3, 111), (1, 2, 5000)] + ([] if small else [(2, 1, 50272)])
dtypes = (torch.float32, torch.bfloat16) + (() if small else (torch.float16,))
offset_sets = ((0, 0, 0), (1, 0, 5)) + (() if small else ((3, 3, 3),))  # aligned, per-tensor and common misalignment
for (B, K, V), dtype, (mode, ref), tau, (top_k, top_p), offsets in itertools.product(
        shapes, dtypes, (("exact", False), ("paper", True)), (0.0, 0.8), ((0, 1.0), (5, 0.9)), offset_sets):
    base = torch.randn(3, B, K + 1, V + 8, generator=g, device="cuda").to(dtype)
    target, draft, reference = (base[n, ..., o : o + V] for n, o in enumerate(offsets))  # misaligned rows, per tensor
    tokens = torch.randint(0, V, (B, K), generator=g, device="cuda")
    out = sss_ext.verify(target, draft, tokens, reference if ref else None, temperature=tau, top_k=top_k, top_p=top_p,
                         mode=mode, generator=g, validate=False)
    sss_ext.sample(target[:, 0], tau, top_k, top_p, generator=g, validate=False)
# Invalid rows with validate=False: -1 rows, never an out-of-bounds read.
B, K, V = 7, 2, 300
target, draft, reference = (torch.randn(B, K + 1, V, generator=g, device="cuda") for _ in range(3))
tokens = torch.randint(0, V, (B, K), generator=g, device="cuda")
uniforms = sss_ext.draw_uniforms((B, K + 1), "cuda", g)
tokens[1, 0], tokens[2, 1] = 2**40, -5
uniforms[3, 1] = float("nan")
target[4, 0, 9] = float("nan")
reference[5, 2, :] = float("-inf")
for tau, top_p in ((0.0, 1.0), (0.9, 1.0), (0.9, 0.8), (1e-290, 0.8)):
    out = sss_ext.verify(target, draft, tokens, reference, temperature=tau, top_p=top_p, uniforms=uniforms, validate=False)
    assert out.num_accepted[1:6].eq(-1).all(), out.num_accepted
torch.cuda.synchronize()
print("sanitize sweep done")
PYTHON
if ((DRY_RUN)); then
  step sanitize_sweep_syntax 30 "$PY" -m py_compile "$LOGS/sanitize_sweep.py" || FAILED=1
fi
for tool in memcheck racecheck; do
  if ((DRY_RUN)); then
    gpu_step "$tool"
    continue
  fi
  size=$([ $tool = racecheck ] && echo small || echo full)
  cap=$([ $tool = racecheck ] && echo 70 || echo 100)
  SWEEP=$size PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "$tool" "$cap" \
    compute-sanitizer --tool "$tool" --error-exitcode 3 --kernel-name kns=sss_ext "$PY" "$LOGS/sanitize_sweep.py"
  rc=$?
  if [ $rc != 0 ] && grep -qiE "unrecognized|unknown option|invalid.*kernel-name" "$LOGS/$tool.log" 2>/dev/null; then  # older filter syntax
    SWEEP=$size PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "$tool-unfiltered" "$cap" \
      compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" "$LOGS/sanitize_sweep.py"
    rc=$?
  fi
  [ $rc != 0 ] && FAILED=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize sweep done" "$LOGS/$tool"*.log 2>/dev/null | tee -a "$SUMMARY"
done

# 4. Benchmark: the goal configuration first, the rest of the grid while the budget lasts.
if ((DRY_RUN)); then
  step bench_syntax 60 "$PY" benchmarks/bench_verify_gpu.py --help || FAILED=1
  gpu_step bench
else
  bench_budget=$(($(left) - 90))
  ((bench_budget > 120)) && bench_budget=120
  step bench $((bench_budget + 45)) "$PY" benchmarks/bench_verify_gpu.py --budget-seconds "$bench_budget"
  cp benchmarks/results/verify_cuda_* "$OUT/" 2>/dev/null
  grep -h "^Goal" benchmarks/results/verify_cuda_*.md 2>/dev/null | tee -a "$SUMMARY"
fi

# 5. The rest of the suite while time is left: CUDA parametrisations first, then the CPU tests
#    (pytest-xdist when present). CI runs these itself, so a dry run skips them.
workers() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }
gpu_step tests_cuda_params 120 "$PY" -m pytest python_tests -q -k cuda --ignore=python_tests/test_cuda.py \
  --ignore=python_tests/test_cuda_emulation.py -p no:cacheprovider $(workers 4)
gpu_step tests_cpu 600 env OMP_NUM_THREADS=2 "$PY" -m pytest python_tests -q -k "not cuda" --ignore=python_tests/test_cuda.py \
  --ignore=python_tests/test_cuda_emulation.py -p no:cacheprovider $(workers 8)

echo "total $((SECONDS - START))s; failed=$FAILED" | tee -a "$SUMMARY"
tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
if ((DRY_RUN)); then
  echo "summary: $SUMMARY"
fi
exit $FAILED
