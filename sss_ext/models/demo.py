"""The first command: vanilla sampling, Best-of-N and SSS on the default models, side by side.

    python -m sss_ext.models.demo [--prompts 32] [--seed 0] [--threads 2]

Held-out evaluation review openers in; per method the mean gold reward with a 95% bootstrap
interval, the target passes per prompt (every sequence row of every target forward) and the
wall time, one example continuation per method and one sentence computed from the table.
Best-of-N picks by the proxy reward (VADER); the gold reward (MiniLM + logistic head) only
scores the outputs. The SSS settings (lambda, K), N, the token budget and the temperature come
from the ``demo`` section of ``weights/MANIFEST.json``, written by
``scripts/choose_demo_settings.py`` on training prompts with the proxy reward (its rule is
recorded there); they are never tuned on these prompts or on the gold reward.
"""

from __future__ import annotations

import argparse
import os
import time

SETTINGS_SECTION = "demo"
SETTING_NAMES = ("shift", "num_draft_tokens", "num_samples", "max_new_tokens", "temperature")


def demo_settings(manifest: dict) -> dict:
    """The ``settings`` of the manifest's ``demo`` section; ``ValueError`` saying how to write them when absent."""
    settings = manifest.get(SETTINGS_SECTION, {}).get("settings", {})
    missing = [name for name in SETTING_NAMES if name not in settings]
    if missing:
        raise ValueError(f"weights/MANIFEST.json has no demo settings {missing}; run scripts/choose_demo_settings.py")
    return {name: settings[name] for name in SETTING_NAMES}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sss_ext.models.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="held-out evaluation prompts (>= 2, at most 240)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every method")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return ap


def _table(runs, gold) -> list[str]:
    from .compare import bootstrap_mean_ci

    width = max(len(run.label) for run in runs)
    lines = [f"{'method':{width}s}  {'gold [95% CI]':22s}  {'target passes/prompt':>20s}  {'wall s':>7s}  acceptance"]
    for run in runs:
        mean, low, high = bootstrap_mean_ci(gold[run.label])
        acceptance = f"{run.acceptance_rate:.2f}" if run.acceptance_rate is not None else "-"
        gold_cell = f"{mean:.3f} [{low:.3f}, {high:.3f}]"
        lines.append(f"{run.label:{width}s}  {gold_cell:22s}  {run.target_passes:20.1f}  "
                     f"{run.wall_seconds:7.1f}  {acceptance}")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 2 <= args.prompts <= 240:
        raise SystemExit(f"--prompts must be in [2, 240] (the evaluation split has 240), got {args.prompts}")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()  # the weight-loading bars of every model
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import sss_ext

    from . import load_default, load_prompts
    from .compare import describe, run_method
    from .manifest import read_manifest

    try:
        settings = demo_settings(read_manifest())
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    start = time.time()
    models = load_default()
    print(f"loaded target (SmolLM2-135M-Instruct), drafts and rewards in {time.time() - start:.1f}s", flush=True)
    prompts = load_prompts("eval", args.prompts)
    base = sss_ext.SamplingConfig(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                                  seed=args.seed, ignore_eos=True, num_samples=settings["num_samples"],
                                  shift=settings["shift"], num_draft_tokens=settings["num_draft_tokens"])
    chosen_on = models.manifest[SETTINGS_SECTION].get("prompts", "training prompts")
    print(f"SSS settings lambda={base.shift:g}, K={base.num_draft_tokens} chosen on {chosen_on} by the rule in "
          f"sss_ext/models/weights/MANIFEST.json (section demo); {len(prompts)} held-out prompts, "
          f"{base.max_new_tokens} new tokens, T={base.temperature:g}", flush=True)
    run_method(models, prompts[:1], "sss", base.replace(max_new_tokens=2))  # warm-up: first-call allocations
    runs = [run_method(models, prompts, method, base, reward_fn=models.proxy_reward) for method in ("vanilla", "bon", "sss")]
    gold = {run.label: models.gold_reward([p + t for p, t in zip(prompts, run.texts)]) for run in runs}
    print()
    print("\n".join(_table(runs, gold)))
    print(f"\nexample: {prompts[0]!r}")
    for run in runs:
        print(f"  {run.label}: {run.texts[0]!r} (gold {float(gold[run.label][0]):.2f})")
    print()
    print(describe(runs[2], runs[1], runs[0], gold))
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"\n{time.time() - start:.0f}s in all on {torch.get_num_threads()} threads{load}; "
          f"gold = MiniLM + logistic head P(positive), never seen by any sampler; Best-of-{base.num_samples} picks by "
          f"the proxy reward (VADER); the full benchmark: python benchmarks/bench_alignment.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
