#!/usr/bin/env bash
# The one command for a GPU machine (issue 3): build the CUDA kernels, run the CUDA tests,
# compute-sanitizer memcheck + racecheck on a small sweep, the GPU benchmark, then the rest
# of python_tests (CUDA parametrisations first, CPU after) -- all inside ~9 minutes.
#
#   bash benchmarks/gpu_check.sh        # results: $OUT (device tool) or benchmarks/results/gpu_check
#
# $OUT receives: summary.txt (one line per step, rc and seconds), test_cuda.log,
# verify_cuda_<gpu>.{csv,md} and logs.tar.gz (every log). Exit status: 1 if the build, the
# CUDA tests or a sanitizer run failed. Knobs: PYTHON, GPU_CHECK_BUDGET (seconds, default 530),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu_check}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-530}
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

{
  nvidia-smi
  nvcc --version
  command -v compute-sanitizer
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >"$LOGS/env.log" 2>&1
grep -E "^torch|NVIDIA H|release" "$LOGS/env.log" | tee -a "$SUMMARY"

# 1. Build (CUDA kernels required).
export SSS_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
step build 300 "$PY" setup.py build_ext --inplace || FAILED=1
"$PY" -c "import sss_ext; print('BUILD_INFO', sss_ext.BUILD_INFO)" 2>&1 | tail -n 1 | tee -a "$SUMMARY"

# 2. CUDA tests (reference sweep, chi-square, opcheck, graphs, invalid rows, alignment).
step test_cuda 240 "$PY" -m pytest python_tests/test_cuda.py -q -rfEs -s -p no:cacheprovider || FAILED=1
grep -E "CUDA vs reference|passed|failed" "$LOGS/test_cuda.log" 2>/dev/null | tee -a "$SUMMARY"
cp "$LOGS/test_cuda.log" "$OUT/" 2>/dev/null

# 3. compute-sanitizer on a small sweep (no caching allocator, so every tensor is its own allocation).
cat >"$LOGS/sanitize_sweep.py" <<'EOF'
import itertools, os, torch, sss_ext
small = os.environ.get("SWEEP") == "small"
g = torch.Generator(device="cuda").manual_seed(0)
shapes = [(3, 2, 7), (2, 3, 111), (1, 2, 5000)] + ([] if small else [(2, 1, 50272)])
for (B, K, V), dtype, (mode, ref), tau, (top_k, top_p), offset in itertools.product(
        shapes, (torch.float32, torch.bfloat16, torch.float16), (("exact", False), ("paper", True)), (0.0, 0.8),
        ((0, 1.0), (5, 0.9)), (0, 3)):
    base = torch.randn(3, B, K + 1, V + 8, generator=g, device="cuda").to(dtype)
    target, draft, reference = (base[n, ..., offset : offset + V] for n in range(3))  # misaligned rows when offset > 0
    tokens = torch.randint(0, V, (B, K), generator=g, device="cuda")
    out = sss_ext.verify(target, draft, tokens, reference if ref else None, temperature=tau, top_k=top_k, top_p=top_p,
                         mode=mode, generator=g, validate=False)
    sss_ext.sample(target[:, 0], tau, top_k, top_p, generator=g, validate=False)
# Invalid rows with validate=False: -1 rows, never an out-of-bounds read.
B, K, V = 6, 2, 300
target, draft, reference = (torch.randn(B, K + 1, V, generator=g, device="cuda") for _ in range(3))
tokens = torch.randint(0, V, (B, K), generator=g, device="cuda")
uniforms = sss_ext.checks.draw_uniforms((B, K + 1), "cuda", g)
tokens[1, 0], tokens[2, 1] = 2**40, -5
uniforms[3, 1] = float("nan")
target[4, 0, 9] = float("nan")
reference[5, 2, :] = float("-inf")
for tau, top_p in ((0.0, 1.0), (0.9, 1.0), (0.9, 0.8)):
    out = sss_ext.verify(target, draft, tokens, reference, temperature=tau, top_p=top_p, uniforms=uniforms, validate=False)
    assert out.num_accepted[1:].eq(-1).all(), out.num_accepted
torch.cuda.synchronize()
print("sanitize sweep done")
EOF
for tool in memcheck racecheck; do
  size=$([ $tool = racecheck ] && echo small || echo full)
  SWEEP=$size PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "$tool" 120 \
    compute-sanitizer --tool "$tool" --error-exitcode 3 --kernel-name kns=sss_ext "$PY" "$LOGS/sanitize_sweep.py"
  rc=$?
  if [ $rc != 0 ] && grep -qiE "unrecognized|unknown option|invalid.*kernel-name" "$LOGS/$tool.log" 2>/dev/null; then  # older filter syntax
    SWEEP=$size PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "$tool-unfiltered" 120 \
      compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" "$LOGS/sanitize_sweep.py"
    rc=$?
  fi
  [ $rc != 0 ] && FAILED=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize sweep done" "$LOGS/$tool"*.log 2>/dev/null | tee -a "$SUMMARY"
done

# 4. Benchmark: the goal configuration first, the rest of the grid while the budget lasts.
bench_budget=$(($(left) - 150))
((bench_budget > 180)) && bench_budget=180
step bench $((bench_budget + 60)) "$PY" benchmarks/bench_verify_gpu.py --budget-seconds "$bench_budget"
cp benchmarks/results/verify_cuda_* "$OUT/" 2>/dev/null
grep -h "^Goal" benchmarks/results/verify_cuda_*.md 2>/dev/null | tee -a "$SUMMARY"

# 5. The rest of the suite: CUDA parametrisations first, then the CPU tests (pytest-xdist when present).
workers() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }
step tests_cuda_params 150 "$PY" -m pytest python_tests -q -k cuda --ignore=python_tests/test_cuda.py -p no:cacheprovider $(workers 4)
step tests_cpu 600 env OMP_NUM_THREADS=2 "$PY" -m pytest python_tests -q -k "not cuda" --ignore=python_tests/test_cuda.py \
  -p no:cacheprovider $(workers 8)

echo "total $((SECONDS - START))s; failed=$FAILED" | tee -a "$SUMMARY"
tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
exit $FAILED
