"""Choose the SSS settings (lambda, K) of the first-command demo on training prompts only.

Runs Best-of-N (proxy reward) and every SSS candidate (lambda, K) on training prompts that
neither the DPO training nor its held-out check used (``train.jsonl`` from index
``--first-prompt``), scores them with the proxy reward (VADER) and the target passes, applies
the rule written in ``sss_ext.models.compare.SELECTION_RULE`` and records the rule, every
candidate's numbers and the choice in the ``demo`` section of ``weights/MANIFEST.json``.
The gold reward and the evaluation prompts are never used. ``python -m sss_ext.models.demo``
reads its settings from there.

    nice -n 19 python scripts/choose_demo_settings.py             # ~3 min on 2 idle cores
    python scripts/choose_demo_settings.py --prompts 2 --max-new-tokens 2 --shifts 1 --num-draft-tokens 2 --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="training prompts measured")
    ap.add_argument("--first-prompt", type=int, default=600,
                    help="index of the first training prompt used (DPO trained on 0-599 and checked on the last 64)")
    ap.add_argument("--num-samples", type=int, default=4, help="N of the Best-of-N baseline (the demo's too)")
    ap.add_argument("--shifts", type=_floats, default=[1.0, 2.0, 3.0], help="lambda candidates, comma-separated")
    ap.add_argument("--num-draft-tokens", type=_ints, default=[2], help="K candidates, comma-separated")
    ap.add_argument("--pass-fraction", type=float, default=0.25,
                    help="a candidate may use at most this fraction of Best-of-N's target passes")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print the choice, leave the manifest alone")
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import sss_ext
    from sss_ext.models import load_default, load_prompts
    from sss_ext.models.compare import SELECTION_RULE, bootstrap_mean_ci, choose_settings, run_method
    from sss_ext.models.manifest import update_manifest

    prompts = load_prompts("train")[args.first_prompt:args.first_prompt + args.prompts]
    if len(prompts) < 2:
        raise SystemExit(f"--prompts/--first-prompt select {len(prompts)} training prompts; need at least 2")
    t_cpu, t_wall = time.process_time(), time.time()
    models = load_default(gold=False)
    base = sss_ext.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                  ignore_eos=True, num_samples=args.num_samples)

    def measure(method, config):
        run = run_method(models, prompts, method, config, reward_fn=models.proxy_reward)
        mean, low, high = bootstrap_mean_ci(models.proxy_reward([p + t for p, t in zip(prompts, run.texts)]))
        row = {"label": run.label, "proxy_mean": mean, "proxy_ci95": [low, high], "target_passes": run.target_passes,
               "wall_seconds": run.wall_seconds, "acceptance_rate": run.acceptance_rate}
        print(f"  {run.label:22s} proxy {mean:+.3f} [{low:+.3f}, {high:+.3f}]  target passes/prompt "
              f"{run.target_passes:6.1f}  wall {run.wall_seconds:5.1f}s", flush=True)
        return row

    print(f"{len(prompts)} training prompts (train.jsonl[{args.first_prompt}:{args.first_prompt + len(prompts)}])", flush=True)
    bon = measure("bon", base)
    candidates = []
    for shift in args.shifts:
        for k in args.num_draft_tokens:
            row = measure("sss", base.replace(shift=shift, num_draft_tokens=k))
            candidates.append(dict(row, shift=shift, num_draft_tokens=k))
    chosen, rule_met = choose_settings(candidates, bon, args.pass_fraction)
    print(f"chosen: lambda={chosen['shift']:g} K={chosen['num_draft_tokens']} (rule met: {rule_met})")
    entry = {
        "script": "scripts/choose_demo_settings.py",
        "args": {k: (str(v) if not isinstance(v, (int, float, bool)) else v) for k, v in vars(args).items()},
        "rule": SELECTION_RULE.format(pass_fraction=args.pass_fraction, num_samples=args.num_samples),
        "prompts": f"train.jsonl[{args.first_prompt}:{args.first_prompt + len(prompts)}]",
        "settings": {"shift": chosen["shift"], "num_draft_tokens": chosen["num_draft_tokens"],
                     "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature},
        "rule_met": rule_met,
        "best_of_n": bon, "candidates": candidates,
        "cpu_seconds": round(time.process_time() - t_cpu, 1), "wall_seconds": round(time.time() - t_wall, 1),
        "load_avg_at_end": round(os.getloadavg()[0], 2),
    }
    if args.dry_run:
        print(entry)
    else:
        update_manifest("demo", entry)
        print("wrote the demo section of sss_ext/models/weights/MANIFEST.json")


if __name__ == "__main__":
    main()
