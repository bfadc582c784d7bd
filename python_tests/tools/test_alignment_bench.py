"""benchmarks/bench_alignment.py runs end to end on a handful of prompts (every method)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.requires("matplotlib")
def test_bench_alignment_quick(tmp_path):
    out = tmp_path / "alignment"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_alignment.py"), "--quick", "--prompts", "2",
           "--max-new-tokens", "4", "--chunk", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(Path(str(out) + ".json").read_text())
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"vanilla", "draft", "sd", "sss", "sss-paper", "sss-sir", "bon", "spec-rejection", "soft-bon"}
    for row in data["rows"]:
        assert 0.0 <= row["gold_mean"] <= 1.0
        assert row["gold_ci95_lo"] <= row["gold_mean"] <= row["gold_ci95_hi"]
        assert row["new_tokens_per_prompt"] == 4
        if row["kind"] != "draft":
            assert row["target_row_calls_per_prompt"] > 0
    sss = next(r for r in data["rows"] if r["kind"] == "sss")
    assert sss["acceptance_rate"] is not None and sss["mean_abs_z_minus_1"] is not None and sss["kl_to_target"] is not None
    sir = next(r for r in data["rows"] if r["kind"] == "sss-sir")
    assert 1.0 <= sir["mean_ess"] <= 2.0 and sir["mean_abs_z_minus_1"] is not None
    assert all(r["mean_ess"] is None for r in data["rows"] if r["kind"] != "sss-sir")
    for suffix in (".csv", ".md", "_calls.png", "_wall.png"):
        assert Path(str(out) + suffix).stat().st_size > 0
