"""Chain, block and tree verification of SSS on the default models, paired on the same prompts.

Target q = SmolLM2-135M-Instruct, aligned draft r, reference draft d
(``sss_ext.models.load_default``); the first ``--prompts`` review openers of the evaluation
split (the alignment benchmark's prompts), ``--max-new-tokens`` new tokens (EOS ignored),
T = ``--temperature``, lambda = ``--shift``, one seed: every row samples the same law p*
with the same per-prompt random streams. Rows: sss with a chain of K drafts verified token by
token and by block verification, and sss with draft trees (``SamplingConfig.draft_tree``,
siblings without replacement) of as many drafted tokens as the chains and more.

Per row: accepted drafts per round, target passes per generated token (row-forwards, prefill
included), target positions per token (tokens fed to the target), draft passes per token,
the mean gold reward (MiniLM + logistic head, never seen by any sampler) with its 95%
bootstrap interval and the paired difference to the first row with its interval (the law is
the same, so the differences must straddle 0 up to noise), process CPU seconds and wall
seconds of the ``generate`` call (all prompts in one batch).

Writes ``benchmarks/results/<name>.csv`` and ``<name>.md`` (default ``tree_cpu``).

    python benchmarks/bench_tree.py [--prompts 64] [--max-new-tokens 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "benchmarks" / "results"

from benchmarks.report_header import run_lines, write_csv  # noqa: E402

#: (label, verification, K, draft tree) of every row; the first is the reference of the paired differences
ROWS = (
    ("chain K=2", "token", 2, None),
    ("block K=2", "block", 2, None),
    ("tree (2)", "token", 2, (2,)),
    ("chain K=4", "token", 4, None),
    ("block K=4", "block", 4, None),
    ("tree (2,1)", "token", 4, (2, 1)),
    ("tree (4)", "token", 4, (4,)),
    ("tree (2,2,1)", "token", 4, (2, 2, 1)),
    ("tree (4,2,1)", "token", 4, (4, 2, 1)),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="evaluation prompts (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--shift", type=float, default=2.0, help="lambda of sss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--name", default="tree_cpu", help="results file stem under benchmarks/results")
    return parser


def measure(models, prompts, verification, num_draft_tokens, tree, args) -> tuple[dict, list[str]]:
    import sss_ext

    config = sss_ext.SamplingConfig(max_new_tokens=args.max_new_tokens, num_draft_tokens=num_draft_tokens,
                                    temperature=args.temperature, shift=args.shift, seed=args.seed, ignore_eos=True,
                                    verification=verification, draft_tree=tree)
    wall, cpu = time.perf_counter(), time.process_time()
    out = sss_ext.generate(models.target, models.draft, prompts, ref_model=models.ref_draft, tokenizer=models.tokenizer,
                           method="sss", config=config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total, per_prompt = out.stats.total, out.stats.per_prompt
    tokens = sum(int(s.numel()) for s in out.sequences)
    drafted = (num_draft_tokens if tree is None else sum(_level_sizes(tree)))
    return {
        "drafted_per_round": drafted,
        "accepted_per_round": total.mean_accepted_length,
        "target_passes_per_token": sum(p.target_calls for p in per_prompt) / tokens,
        "target_positions_per_token": sum(p.target_tokens for p in per_prompt) / tokens,
        "draft_passes_per_token": sum(p.draft_calls for p in per_prompt) / tokens,
        "tokens": tokens, "cpu_s": cpu, "wall_s": wall,
    }, list(out.texts)


def _level_sizes(tree) -> list[int]:
    sizes, width = [], 1
    for branching in tree:
        width *= branching
        sizes.append(width)
    return sizes


def _cell(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def write(rows: list[dict], args, started: str, seconds: float) -> None:
    csv_path, md_path = RESULTS_DIR / f"{args.name}.csv", RESULTS_DIR / f"{args.name}.md"
    write_csv(rows, csv_path)
    lines = [
        "# Chain, block and tree verification of SSS (`benchmarks/bench_tree.py`)",
        "",
        *run_lines("bench_tree.py", started, seconds),
        f"- default models (target SmolLM2-135M-Instruct q, aligned draft r, reference draft d), float32; the first "
        f"{args.prompts} evaluation prompts in one batch, {args.max_new_tokens} new tokens each (EOS ignored), "
        f"T = {args.temperature}, sss lambda = {args.shift}, seed {args.seed}; trees draw siblings without replacement",
        "- per generated token: target passes (row-forwards, prefill included), target positions (tokens fed to the "
        "target), draft passes; gold: mean MiniLM + logistic-head reward with its 95% bootstrap interval; "
        f"paired: gold minus the `{rows[0]['row']}` row's on the same prompts, with its 95% interval",
        "",
        "| row | drafted / round | accepted / round | target passes / token | target positions / token "
        "| draft passes / token | gold [95% CI] | paired difference [95% CI] | CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['row']} | {row['drafted_per_round']} | {_cell(row['accepted_per_round'], 2)} "
            f"| {_cell(row['target_passes_per_token'])} | {_cell(row['target_positions_per_token'], 2)} "
            f"| {_cell(row['draft_passes_per_token'], 2)} "
            f"| {row['gold']:.3f} [{row['gold_low']:.3f}, {row['gold_high']:.3f}] "
            f"| {row['paired']:+.3f} [{row['paired_low']:+.3f}, {row['paired_high']:+.3f}] "
            f"| {row['cpu_s']:.1f} | {row['wall_s']:.1f} |")
    lines.append("")
    md_path.write_text("\n".join(lines))
    print(md_path.read_text())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from sss_ext.models import load_default, load_prompts
    from sss_ext.models.compare import bootstrap_mean_ci, paired_difference_ci

    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    begin = time.perf_counter()
    models = load_default()
    prompts = load_prompts("eval", args.prompts)
    measure(models, prompts[:1], "token", 2, None, argparse.Namespace(**{**vars(args), "max_new_tokens": 2}))  # warm-up
    rows, first_gold = [], None
    for label, verification, k, tree in ROWS:
        result, texts = measure(models, prompts, verification, k, tree, args)
        gold = models.gold_reward([p + t for p, t in zip(prompts, texts)])
        first_gold = gold if first_gold is None else first_gold
        mean, low, high = bootstrap_mean_ci(gold)
        paired = paired_difference_ci(gold, first_gold) if gold is not first_gold else (0.0, 0.0, 0.0)
        rows.append({"row": label, "verification": verification, "num_draft_tokens": k,
                     "draft_tree": "" if tree is None else " ".join(map(str, tree)), **result,
                     "gold": mean, "gold_low": low, "gold_high": high,
                     "paired": paired[0], "paired_low": paired[1], "paired_high": paired[2]})
        print(f"[{time.strftime('%H:%M:%S')}] {label}: accepted/round {result['accepted_per_round']:.2f}, "
              f"target passes/token {result['target_passes_per_token']:.3f}, gold {mean:.3f}, "
              f"wall {result['wall_s']:.1f} s", flush=True)
    write(rows, args, started, time.perf_counter() - begin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
