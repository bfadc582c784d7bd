#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UBSan (SSS_EXT_SANITIZE=1) in a scratch
# copy of the tracked sources and runs the op tests and the fuzz properties under it. Any
# sanitizer report aborts the process, which fails the run.
#
#   bash scripts/sanitize_check.sh            # uses .venv/bin/python; PYTHON=... to override
#
# Python is not instrumented, so the sanitizer runtimes are preloaded: libasan and
# libstdc++ together (libstdc++ first in the link map, or ASan's interceptors miss
# operator new/delete of the extension).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
WORK=${SANITIZE_DIR:-$PWD/build/sanitize}
rm -rf "$WORK" && mkdir -p "$WORK"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && cp --parents "$f" "$WORK"
done
cd "$WORK"
echo "sanitize: building in $WORK"
if ! SSS_EXT_SANITIZE=1 SSS_EXT_CUDA=0 "$PY" setup.py build_ext --inplace > build.log 2>&1; then
  tail -30 build.log; echo "sanitize: build failed" >&2; exit 1
fi
grep -m1 "sss_ext: ABI" build.log && grep -m1 "sanitizers on" build.log
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$PY" -c "import sss_ext, sys; assert sss_ext.__file__.startswith('$WORK'), sss_ext.__file__; print('sanitize: testing', sss_ext.__file__)"
export SSS_FUZZ_EXAMPLES=${SSS_FUZZ_EXAMPLES:-100}  # the budget docs/testing.md states
# Every kernel path under the sanitizers, kept short (the runtimes slow everything down):
# regression and bad-input tests, edge cases, the fuzz properties, and the float32
# exactness sweep at one temperature (all modes, truncations, shapes and layouts).
"$PY" -m pytest -q -p no:cacheprovider python_tests/ops/test_robustness.py python_tests/ops/test_bad_input.py \
  python_tests/ops/test_edge_cases.py python_tests/ops/test_fuzz.py python_tests/ops/test_verify_matches_reference.py \
  -k "not largest and not test_sample_matches and (not sweep or (float32 and 0.7-))"
echo "sanitize: no sanitizer report"
