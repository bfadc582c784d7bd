"""``weights/MANIFEST.json``: what each rebuild script produced, its seed, CPU time and metrics."""

from __future__ import annotations

import json
import platform
import time

import torch

from .paths import WEIGHTS_DIR

MANIFEST = WEIGHTS_DIR / "MANIFEST.json"


def read_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


def update_manifest(section: str, entry: dict) -> dict:
    data = read_manifest()
    entry = dict(entry)
    entry.setdefault("recorded", time.strftime("%Y-%m-%d %H:%M:%S"))
    entry.setdefault("machine", f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    data[section] = entry
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
