"""Prompt-lookup (n-gram) proposer against the draft-model proposer, on the default models.

Target q = SmolLM2-135M-Instruct, aligned draft r, reference draft d
(``sss_ext.models.load_default``). The same prompts run through every row: vanilla target
sampling, then sd and sss (lambda = ``--shift``) with the draft model ``r`` proposing ``K``
tokens and with the n-gram proposer (``SamplingConfig(proposer="ngram")``) proposing up to
``K`` tokens copied from the row's own prompt and output. Two prompt sets:

* ``openers``: the first ``--prompts`` review openers of the evaluation split (what the demo
  and the alignment benchmark continue), little to copy from;
* ``repeat``: a chat-formatted request to repeat three review openers word for word (a
  copying task, where prompt lookup is meant to help; the 135M target copies only loosely).

Per row: acceptance (accepted / proposed drafts), drafts proposed per row-round, target
passes per generated token (every row of every target forward, prefill included, as the
decoding layer counts per prompt), draft (r) and reference (d) passes per token, and
generated tokens per second of process CPU time and of wall time. With ``--threads 1`` the
CPU time is the compute of one thread (robust to other jobs on a shared machine); wall
times on a shared machine are noisy. All prompts of a set run as one batch.

Writes ``benchmarks/results/<name>.csv`` and ``<name>.md`` (default ``ngram_cpu``).

    python benchmarks/bench_ngram.py [--prompts 8] [--max-new-tokens 32] [--threads 1]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per set (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--shift", type=float, default=2.0, help="lambda of sss")
    parser.add_argument("--draft-k", type=int, default=2, help="K of the draft-model proposer")
    parser.add_argument("--ngram-k", type=int, nargs="+", default=[2, 4], help="K values of the n-gram proposer")
    parser.add_argument("--ngram-sizes", type=int, nargs=2, default=[3, 1], metavar=("MAX", "MIN"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--name", default="ngram_cpu", help="results file stem under benchmarks/results")
    return parser


def prompt_sets(tokenizer, count: int) -> dict[str, list[str]]:
    """The two prompt sets: the review openers, and a request to repeat three of them."""
    from sss_ext.models import load_prompts

    openers = load_prompts("eval")
    repeat = []
    for index in range(count):
        passage = " ".join(openers[3 * index: 3 * index + 3])
        message = [{"role": "user", "content": f'Repeat this text exactly, word for word: "{passage}"'}]
        repeat.append(tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True))
    return {"openers": openers[:count], "repeat": repeat}


def grid(args) -> list[tuple[str, str, str, int]]:
    """(label, method, proposer, K) of every row."""
    rows = [("vanilla", "vanilla", "draft", args.draft_k)]
    for method in ("sd", "sss"):
        rows.append((f"{method} draft K={args.draft_k}", method, "draft", args.draft_k))
        rows.extend((f"{method} ngram K={k}", method, "ngram", k) for k in args.ngram_k)
    return rows


def measure(models, prompts, method, proposer, num_draft_tokens, args) -> dict:
    import sss_ext

    config = sss_ext.SamplingConfig(max_new_tokens=args.max_new_tokens, num_draft_tokens=num_draft_tokens,
                                    temperature=args.temperature, shift=args.shift, seed=args.seed, ignore_eos=True,
                                    proposer=proposer, ngram_sizes=tuple(args.ngram_sizes))
    wall, cpu = time.perf_counter(), time.process_time()
    out = sss_ext.generate(models.target, models.draft, prompts, ref_model=models.ref_draft, tokenizer=models.tokenizer,
                           method=method, config=config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total, per_prompt = out.stats.total, out.stats.per_prompt
    tokens = sum(int(s.numel()) for s in out.sequences)
    passes = {role: sum(getattr(p, f"{role}_calls") for p in per_prompt) / tokens for role in ("target", "draft", "ref")}
    speculative = method != "vanilla"
    return {
        "acceptance": total.acceptance_rate if speculative else None,
        "drafts_per_round": total.proposed_drafts / total.rounds if speculative and total.rounds else None,
        "accepted_per_round": total.accepted_drafts / total.rounds if speculative and total.rounds else None,
        "target_passes_per_token": passes["target"], "draft_passes_per_token": passes["draft"],
        "ref_passes_per_token": passes["ref"], "tokens": tokens, "cpu_s": cpu, "wall_s": wall,
        "tokens_per_cpu_s": tokens / cpu, "tokens_per_wall_s": tokens / wall,
    }


def _cell(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def write(rows: list[dict], args, started: str, seconds: float) -> None:
    csv_path, md_path = RESULTS_DIR / f"{args.name}.csv", RESULTS_DIR / f"{args.name}.md"
    write_csv(rows, csv_path)
    lines = [
        "# Prompt-lookup (n-gram) proposer vs the draft model (`benchmarks/bench_ngram.py`)",
        "",
        *run_lines("bench_ngram.py", started, seconds),
        f"- default models (target SmolLM2-135M-Instruct q, aligned draft r, reference draft d), float32; "
        f"{args.prompts} prompts per set in one batch, {args.max_new_tokens} new tokens each (EOS ignored), "
        f"T = {args.temperature}, sss lambda = {args.shift}, seed {args.seed}, n-gram sizes "
        f"{args.ngram_sizes[0]}..{args.ngram_sizes[1]}",
        "- passes per token: every row of every forward of that model (prefill included) per generated token; "
        "tokens / CPU s: generated tokens per second of process CPU time (one thread: robust to other jobs); "
        "tokens / wall s: noisy on a shared machine",
        "",
    ]
    for prompt_set in dict.fromkeys(row["prompt_set"] for row in rows):
        lines += [f"## {prompt_set}", "",
                  "| row | acceptance | drafts / round | accepted / round | target passes / token | r passes / token "
                  "| d passes / token | tokens / CPU s | tokens / wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["prompt_set"] == prompt_set):
            lines.append(f"| {row['row']} | {_cell(row['acceptance'])} | {_cell(row['drafts_per_round'], 2)} "
                         f"| {_cell(row['accepted_per_round'], 2)} | {_cell(row['target_passes_per_token'])} "
                         f"| {_cell(row['draft_passes_per_token'])} | {_cell(row['ref_passes_per_token'])} "
                         f"| {_cell(row['tokens_per_cpu_s'], 1)} | {_cell(row['tokens_per_wall_s'], 1)} |")
        lines.append("")
    md_path.write_text("\n".join(lines))
    print(md_path.read_text())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from sss_ext.models import load_default

    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    begin = time.perf_counter()
    models = load_default(rewards=False)
    sets = prompt_sets(models.tokenizer, args.prompts)
    rows = []
    for prompt_set, prompts in sets.items():
        for label, method, proposer, k in grid(args):
            result = measure(models, prompts, method, proposer, k, args)
            rows.append({"prompt_set": prompt_set, "row": label, "method": method, "proposer": proposer,
                         "num_draft_tokens": k, **result})
            print(f"[{time.strftime('%H:%M:%S')}] {prompt_set} {label}: acceptance {_cell(result['acceptance'])}, "
                  f"target passes/token {result['target_passes_per_token']:.3f}, "
                  f"{result['tokens_per_cpu_s']:.1f} tokens/CPU s", flush=True)
    write(rows, args, started, time.perf_counter() - begin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
