"""``weights/MANIFEST.json``: what each rebuild script produced, its seed, CPU time and metrics.

Paths are recorded portably (:func:`portable_path`): relative to the repository when inside
it, ``~/...`` under the home folder, and the bare name otherwise, so the shipped manifest
names no folder of the machine that built it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .paths import WEIGHTS_DIR

MANIFEST = WEIGHTS_DIR / "MANIFEST.json"
REPO_ROOT = WEIGHTS_DIR.parents[2]


def portable_path(value: str) -> str:
    """An absolute path as the manifest records it; in any other string, the repository's and
    the home folder's absolute paths are shortened the same way (``str`` of a list of paths)."""
    if not os.path.isabs(value):
        return value.replace(f"{REPO_ROOT}/", "").replace(f"{Path.home()}/", "~/")
    path = Path(value)
    for root, prefix in ((REPO_ROOT, ""), (Path.home(), "~/")):
        try:
            return prefix + path.relative_to(root).as_posix()
        except ValueError:
            continue
    return path.name


def portable(entry):
    """``entry`` with every absolute path string replaced by :func:`portable_path`."""
    if isinstance(entry, dict):
        return {key: portable(value) for key, value in entry.items()}
    if isinstance(entry, (list, tuple)):
        return [portable(value) for value in entry]
    return portable_path(entry) if isinstance(entry, str) else entry


def read_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


def update_manifest(section: str, entry: dict) -> dict:
    data = read_manifest()
    entry = portable(dict(entry))
    entry.setdefault("recorded", time.strftime("%Y-%m-%d %H:%M:%S"))
    entry.setdefault("machine", f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    data[section] = entry
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
