"""Control for the adaptive draft-length policy: one count per round for the batch against
each row choosing its own count.

The loop's adaptive policy (``sss_ext/decoding/draft_length.py``) picks one ``K'`` per round,
the one with the most expected tokens of all rows per unit round cost. This probe replaces
that choice by each row's own best ``k`` (the same geometric model and measured costs, one row
at a time; the round then drafts ``max_b k_b`` steps and row ``b`` verifies ``k_b``) and times
both on the random-model grid of ``bench_generate.py`` at batch 8, runs interleaved. It patches
``DraftLengths.choose`` in this process only.

    python benchmarks/probes/per_row_draft_length.py [--hidden-sizes 256 512] [--repeats 5]

Writes ``benchmarks/results/per_row_draft_length_cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_generate as bench  # noqa: E402
from sss_ext.decoding import draft_length  # noqa: E402

BATCH_CHOICE = draft_length.DraftLengths.choose


def per_row_choice(self, remaining):
    """Each row's own best count: ``argmax_k E_b[accepted + 1] / cost(k)`` with its own acceptance."""
    if not self.adaptive:
        return BATCH_CHOICE(self, remaining)
    lengths = torch.arange(1, self.max_draft_tokens + 1, dtype=torch.int64, device=remaining.device)
    tokens = draft_length.expected_tokens(self.acceptance[:, None], lengths)  # (B, max_draft_tokens)
    cost = draft_length.round_costs(lengths, self.costs, self.extra_draft_steps)
    return torch.minimum((remaining - 1).clamp(min=0), lengths[torch.argmax(tokens / cost, dim=1)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-draft-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=bench.RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = argparse.Namespace(vocab_size=2048, num_draft_tokens=args.max_draft_tokens, threads=1)
    config = dict(num_draft_tokens=args.max_draft_tokens, draft_length_policy="adaptive")
    choices = [("one count per round (the loop's policy)", BATCH_CHOICE), ("each row its own count", per_row_choice)]
    lines = ["| hidden | method | choice | tokens/s (median) | tokens/s (range) | target calls / token | drafts / round |",
             "|---|---|---|---|---|---|---|"]
    ratios_text = []
    for hidden_size in args.hidden_sizes:
        models = bench.build_models(settings.vocab_size, 8.0, hidden_size, 6)
        timer = bench.LoopTimer(time.thread_time)
        for method in ("sd", "sss"):
            runs = {name: [] for name, _ in choices}
            with torch.no_grad():
                for repeat in range(args.repeats + 1):  # the first repeat warms up
                    for name, choose in (choices if repeat % 2 else choices[::-1]):
                        draft_length.DraftLengths.choose = choose
                        row = bench.run_once(models, method, args.batch, args.new_tokens, settings, timer, repeat, **config)
                        if repeat:
                            runs[name].append(row)
            draft_length.DraftLengths.choose = BATCH_CHOICE
            for name, _ in choices:
                row = bench.median_run(runs[name])
                speeds = [r["tokens_per_s"] for r in runs[name]]
                lines.append(f"| {hidden_size} | {method} | {name} | {row['tokens_per_s']:.1f} | {min(speeds):.1f}-{max(speeds):.1f} | "
                             f"{row['target_calls_per_token']:.3f} | {row['drafts_per_round']:.2f} |")
            ratios = bench.paired_ratios(runs[choices[1][0]], runs[choices[0][0]])
            ratios_text.append(f"- hidden {hidden_size}, {method}: per-row / per-round tokens/s, paired by repeat: median "
                               f"{ratios[len(ratios) // 2]:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x")
            print(lines[-2], lines[-1], ratios_text[-1], sep="\n", flush=True)
    header = ["# Per-round against per-row adaptive draft counts (`benchmarks/probes/per_row_draft_length.py`)", "",
              *bench.machine_lines(settings),
              f"- random models of `bench_generate.py`, batch {args.batch}, {args.new_tokens} new tokens per row, EOS "
              f"ignored, K <= {args.max_draft_tokens}, measured costs; {args.repeats} runs of each choice, interleaved; "
              "times: CPU time of the compute thread", ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "per_row_draft_length_cpu.md"), "w") as handle:
        handle.write("\n".join(header + lines + [""] + ratios_text) + "\n")


if __name__ == "__main__":
    main()
