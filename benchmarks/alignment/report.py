"""Row order, the markdown table, and the JSON / CSV / markdown (+ plots) output files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .plots import plot


COLUMNS = [
    ("method", "method", "{}"), ("gold_mean", "gold", "{:.3f}"), ("gold_ci", "95% CI", "{}"),
    ("proxy_mean", "proxy", "{:.3f}"), ("kl_to_target", "KL to q", "{:.2f}"),
    ("target_loglik_per_token", "log q/tok", "{:.2f}"),
    ("target_row_calls_per_prompt", "target fwd (rows)", "{:.1f}"),
    ("target_calls_per_prompt", "target calls (batched)", "{:.1f}"),
    ("target_tokens_per_prompt", "target tokens", "{:.0f}"),
    ("draft_calls_per_prompt", "draft calls", "{:.1f}"), ("ref_calls_per_prompt", "ref calls", "{:.1f}"),
    ("reward_sequences_per_prompt", "reward seqs", "{:.1f}"), ("wall_s_per_prompt", "wall s", "{:.2f}"),
    ("target_row_calls_per_token", "target fwd / token", "{:.2f}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("acceptance_rate", "accept", "{:.2f}"), ("mean_abs_z_minus_1", "mean abs(Z-1)", "{:.3f}"),
    ("mean_ess", "mean ESS", "{:.2f}"),
]


# Columns derived from the per-prompt figures: key -> (numerator, denominator)
RATIOS = {"target_row_calls_per_token": ("target_row_calls_per_prompt", "new_tokens_per_prompt"),
          "tokens_per_s": ("new_tokens_per_prompt", "wall_s_per_prompt")}


def fmt(row, key, spec):
    if key == "gold_ci":
        return f"[{row['gold_ci95_lo']:.3f}, {row['gold_ci95_hi']:.3f}]"
    if key in RATIOS:
        numerator, denominator = (row.get(k) for k in RATIOS[key])
        return spec.format(numerator / denominator) if numerator is not None and denominator else "–"
    v = row.get(key)
    if v is None:
        return "–"
    return spec.format(v)


def markdown_table(rows):
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt(r, k, s) for k, _, s in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def sort_rows(rows):
    order = ["vanilla", "draft", "sd", "sss", "sss-paper", "sss-sir", "bon", "spec-rejection", "soft-bon"]
    return sorted(rows, key=lambda r: (order.index(r["kind"]), r["target_row_calls_per_prompt"], r["method"]))


def write_outputs(rows, samples, meta, out, no_plots=False):
    n, length, temp = meta["prompts"], meta["max_new_tokens"], meta["temperature"]
    (Path(str(out) + ".json")).write_text(json.dumps({"meta": meta, "rows": rows, "samples": samples}, indent=1))
    with open(str(out) + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    md = [f"# Alignment benchmark ({n} eval prompts, {length} new tokens, T={temp})", "",
          "Costs are per prompt. `target fwd (rows)`: target forward passes counted per sequence (a batched call over "
          "N rows counts N); `target calls (batched)`: as `sss_ext.generate` counts them (one batched call = 1); "
          "`target fwd / token` and `tokens/s` per generated token of a prompt (wall time per prompt). "
          "Gold = MiniLM + logistic head P(positive) (never seen by any sampler); proxy = VADER compound. "
          f"Machine: {meta['machine']} (shared; wall times are noisy).", "", markdown_table(rows), ""]
    (Path(str(out) + ".md")).write_text("\n".join(md))
    if not no_plots:
        plot(rows, Path(str(out) + "_calls.png"), "target_row_calls_per_prompt",
             "target forward passes per prompt (per sequence row, symlog scale)",
             f"Gold reward vs target compute ({n} prompts, {length} tokens, T={temp})")
        plot(rows, Path(str(out) + "_wall.png"), "wall_s_per_prompt", "wall time per prompt, s (2 shared CPU cores, symlog scale)",
             f"Gold reward vs wall time ({n} prompts, {length} tokens, T={temp})")
    print(markdown_table(rows))
    print(f"wrote {out}.json/.csv/.md and plots")
