"""What the CSV + Markdown benchmark scripts (``bench_ngram.py``, ``bench_tree.py``) write alike."""

from __future__ import annotations

import csv
import os
import platform
import sys
from pathlib import Path


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` (dicts with the same keys) as CSV at ``path``, folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_lines(script: str, started: str, seconds: float) -> list[str]:
    """The command, date and machine lines of a results file (Markdown bullets)."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    return [
        f"- command: `{command.strip()}`",
        f"- date: {started} UTC; the whole run took {seconds:.0f} s of wall time",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
    ]
