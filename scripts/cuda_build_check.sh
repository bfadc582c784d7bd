#!/usr/bin/env bash
# The CUDA variant without a GPU: a separate venv (.venv-cuda) with a CUDA build of torch,
# the extension built with SSS_EXT_CUDA=1 in a scratch copy of the sources (build/cuda, so
# the CPU build in sss_ext/ stays as it is), then checks that it links, imports with no GPU
# visible, reports its CUDA kernels and passes the CPU op tests; the GPU tests skip naming
# the missing device; benchmarks/gpu_check.sh --dry-run exercises the GPU script's plumbing.
# CMake builds the kernels without torch (sss_ext::kernels_cuda and the C++ examples).
# First, one build for several torch releases: the CPU extension of the checkout (built by
# stage 1 with the torch of .venv) runs the CPU op tests under this venv's torch, unrebuilt.
#
#   bash scripts/cuda_build_check.sh     # knobs: CUDA_TORCH (default 2.14.1), TORCH_CUDA_ARCH_LIST (default 9.0),
#                                        # PREPARE_ONLY=1 (install .venv-cuda and stop)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CUDA_TORCH=${CUDA_TORCH:-2.14.1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit's root: /usr/local/cuda, else where nvcc's headers are
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    [ -f "$candidate/include/cuda_runtime.h" ] && CUDA_HOME=$candidate && break
  done
fi
export CUDA_HOME=${CUDA_HOME:?no CUDA toolkit found: set CUDA_HOME}
export SSS_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
VENV=$ROOT/.venv-cuda
WORK=$ROOT/build/cuda

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$CUDA_TORCH"
grep -v '^torch==' requirements.txt > "$VENV/requirements-no-torch.txt"
"$VENV/bin/pip" install -q -r "$VENV/requirements-no-torch.txt"
PY=$VENV/bin/python
echo "cuda: torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'), CUDA_HOME=$CUDA_HOME"
[ "${PREPARE_ONLY:-0}" = 1 ] && exit 0  # .ci/run installs the environment ahead, in the background

copy_sources() {  # the tracked and untracked, not ignored, files of the checkout into $1
  rm -rf "$1" && mkdir -p "$1"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && cp --parents "$f" "$1"
  done)
}

# The stable ABI (README "ABI"): the checkout's CPU build, copied as it is next to the
# sources, must load under this torch and pass registration/opcheck, bad input, ragged verify
# and the exactness tests against the reference (the float32 sweep at one temperature: every
# mode, truncation and layout).
CPU_BUILD=$(ls "$ROOT"/sss_ext/_C*.so 2>/dev/null | head -1 || true)
[ -n "$CPU_BUILD" ] || { echo "cuda: no CPU build sss_ext/_C*.so in the checkout (stage 1 builds it)" >&2; exit 1; }
STABLE=$ROOT/build/stable-abi
copy_sources "$STABLE"
cp "$CPU_BUILD" "$STABLE/sss_ext/"
(cd "$STABLE" && "$PY" -m sss_ext.info \
  && "$PY" -c "import sss_ext, torch; info = sss_ext.BUILD_INFO; assert sss_ext._C.__file__.startswith('$STABLE') \
and not info['cuda'] and info['torch_version'] != torch.__version__, (sss_ext._C.__file__, info)" \
  && "$PY" -m pytest -q -p no:cacheprovider python_tests/tools/test_abi.py python_tests/ops/test_registration.py \
  python_tests/ops/test_bad_input.py python_tests/ops/test_ragged_verify.py python_tests/ops/test_verify_matches_reference.py \
  -k "not largest and (not sweep or (float32 and 0.7-))") \
  || { echo "cuda: the CPU build of the checkout failed under torch $CUDA_TORCH" >&2; exit 1; }

copy_sources "$WORK"
cd "$WORK"
began=$SECONDS
if ! "$PY" setup.py build_ext --inplace > build.log 2>&1; then
  tail -40 build.log; echo "cuda: build failed" >&2; exit 1
fi
grep -m3 "sss_ext:" build.log
if grep -n "warning" build.log; then echo "cuda: the build printed warnings" >&2; exit 1; fi
echo "cuda: built and linked in $((SECONDS - began)) s"

# The kernels alone with CMake, no torch (docs/cpp_api.md): sss_ext::kernels_cuda and the
# C++ examples for sm_90. With a GPU visible the CUDA example runs and must print the CPU
# example's tokens (launch.h's exactness rule allows a difference only within float32
# rounding of a decision boundary: a difference fails here, to be examined).
began=$SECONDS
if ! { cmake -S . -B cmake-build -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCMAKE_CUDA_ARCHITECTURES=90 \
       && cmake --build cmake-build --parallel "$MAX_JOBS"; } > cmake.log 2>&1; then
  tail -40 cmake.log; echo "cuda: the CMake build failed" >&2; exit 1
fi
grep -q "sss_ext: CPU and CUDA kernels" cmake.log || { echo "cuda: CMake did not build sss_ext::kernels_cuda" >&2; exit 1; }
if grep -n "warning" cmake.log; then echo "cuda: the CMake build printed warnings" >&2; exit 1; fi
cmake-build/examples/cpp/verify_example > example_cpu.txt
echo "cuda: CMake built sss_ext::kernels_cuda and the C++ examples in $((SECONDS - began)) s"
if nvidia-smi -L > /dev/null 2>&1; then
  cmake-build/examples/cpp/verify_example_cuda > example_cuda.txt
  diff <(sed 's/ log_z=.*//' example_cpu.txt) <(sed 's/ log_z=.*//' example_cuda.txt) \
    || { echo "cuda: the CUDA example's tokens differ from the CPU example's" >&2; exit 1; }
  echo "cuda: the CUDA example ran on the GPU and printed the CPU example's tokens"
else
  echo "cuda: no GPU visible: the CUDA example is built, not run"
fi

export CUDA_VISIBLE_DEVICES=""
"$PY" -m sss_ext.info | tee info.txt
grep -q "CUDA kernels: verify, sample, verify_tree" info.txt || { echo "cuda: sss_ext.info does not report the CUDA kernels" >&2; exit 1; }
"$PY" -c "import sss_ext, torch; assert sss_ext.BUILD_INFO['cuda'] and not torch.cuda.is_available(); print('cuda: import sss_ext works with no GPU visible')"
# A representative subset of the CPU suite on the CUDA build: registration, bad input,
# robustness, edge cases, exact enumeration, the float32 exactness sweep; the decoding and
# model tests run the same CPU kernels in the CPU stage. The CUDA tests skip, naming the
# missing device (the kernels' source runs on the CPU in stage 1: cuda/test_cuda_on_cpu.py).
"$PY" -m pytest -q -p no:cacheprovider -rs python_tests/ops/test_registration.py python_tests/ops/test_bad_input.py \
  python_tests/ops/test_robustness.py python_tests/ops/test_edge_cases.py python_tests/ops/test_exact_enumeration.py \
  python_tests/ops/test_verify_matches_reference.py python_tests/cuda/test_cuda.py \
  -k "(not sweep and not largest) or float32"
PYTHON=$PY bash benchmarks/gpu_check.sh --dry-run
