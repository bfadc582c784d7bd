"""Alignment benchmark on the default offline models: gold reward per unit of target compute.

Target q = SmolLM2-135M-Instruct, aligned draft r = DPO(d), reference draft d = distilled
4-layer draft (``sss_ext.models.load_default``). Task: continue the opening words of a
review (``sss_ext/models/prompts/eval.jsonl``, subjects disjoint from every training prompt).
Proxy reward (VADER) drives bon / spec-rejection / soft-bon; the gold reward (MiniLM +
logistic head) only scores the final outputs.

Every method generates exactly ``--max-new-tokens`` tokens (``ignore_eos``) at one
temperature, so costs are comparable. Per method it reports: mean gold reward with a 95%
bootstrap interval, proxy reward, mean target log-likelihood of the output and KL to the
target where the method's density is tractable (Monte Carlo), target forward calls as the
decoding layer counts them (one batched call = 1) *and* target row-forwards (each batch row
of each target call = 1; what an unbatched implementation would run), target tokens, draft
/ reference calls, reward calls, wall time, acceptance rate, mean |Z - 1| over emitted
positions (SSS). Best-of-N for N < N_max reuses the first N of the N_max candidates of
each prompt (i.i.d. samples, so the estimate is unbiased); its costs are the N_max run's
scaled by N / N_max (exact for target calls/tokens since every row runs the same number of
steps; approximate for wall time, marked in the table). sss-sir does the same: N < N_max
resamples among the first N of the N_max candidates by their weights (fresh uniforms), and
reports the mean effective sample size of the weights.

    nice -n 19 python benchmarks/bench_alignment.py                 # full run (see README)
    python benchmarks/bench_alignment.py --prompts 3 --max-new-tokens 4 --quick --out /tmp/x
    torchrun --nproc-per-node 2 benchmarks/bench_alignment.py --threads 1 ...   # prompts sharded over 2 CPU ranks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "benchmarks" / "results"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=240, help="evaluation prompts (the eval split has 240)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=40, help="prompts per generate() call (CPU decoding is memory-bound: bigger is cheaper per token)")
    ap.add_argument("--bon-max", type=int, default=16)
    ap.add_argument("--sir-max", type=int, default=8, help="N of sss-sir (lambda 1 and 2); N = 2, 4, ... < it reuse its candidates")
    ap.add_argument("--spec-rejection-n", type=int, default=16)
    ap.add_argument("--soft-bon-n", type=int, default=8)
    ap.add_argument("--soft-bon-beta", type=float, default=10.0, help="weight of the proxy reward (VADER, in [-1, 1])")
    ap.add_argument("--k0", type=int, default=2, help="K of sd, sss-paper and the lambda sweep")
    ap.add_argument("--adaptive-k", type=int, default=0,
                    help="also run sd and sss (lambda=1) with the adaptive draft-length policy, K at most this (0: not)")
    ap.add_argument("--full-grid", action="store_true", help="all 9 (lambda, K) pairs instead of the two sweeps")
    ap.add_argument("--only", default="", help="comma-separated method-label prefixes to run")
    ap.add_argument("--quick", action="store_true", help="smallest configuration of every method (tests)")
    ap.add_argument("--no-ll", action="store_true", help="skip the target log-likelihood / KL pass")
    ap.add_argument("--ll-prompts", type=int, default=0, help="log-likelihood / KL on the first M outputs only (0: all)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of <out>_state.json measured with the same settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "alignment")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite table, CSV, JSON and plots from <out>_state.json")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    import torch

    from alignment.session import report_only, run_all

    torch.set_num_threads(args.threads)
    if args.report_only:
        report_only(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
