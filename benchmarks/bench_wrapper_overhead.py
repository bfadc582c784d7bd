"""Per-call cost of the Python wrapper: ``sss_ext.verify`` against the registered op it calls.

Both are timed in one run, interleaved, on the same tiny input (B=1, K=2, V=8, float32,
one thread), where the wrapper's Python part dominates; the wrapper draws its uniforms
(as a caller without ``uniforms=`` does), the raw op is handed the same uniforms tensor.
Prints the median of ``--calls`` calls per repeat and the best median over ``--repeats``.

    python benchmarks/bench_wrapper_overhead.py [--calls 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sss_ext


def median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-draft-tokens", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    B, K, V = args.batch, args.num_draft_tokens, args.vocab_size
    g = torch.Generator().manual_seed(0)
    target, draft = torch.randn(B, K + 1, V, generator=g), torch.randn(B, K + 1, V, generator=g)
    tokens = torch.randint(0, V, (B, K), generator=g)
    uniforms = torch.rand(B, K + 1, generator=g, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    op = torch.ops.sss_ext.verify.default
    calls = {
        "torch.ops.sss_ext.verify.default": lambda: op(target, draft, tokens, None, uniforms, 1.0, 0, 1.0, 1.0, "exact", None, "keep"),
        "sss_ext.verify (uniforms given)": lambda: sss_ext.verify(target, draft, tokens, uniforms=uniforms),
        "sss_ext.verify (uniforms drawn)": lambda: sss_ext.verify(target, draft, tokens),
    }
    for fn in calls.values():  # warm up
        median_us(fn, 200)
    best = {name: float("inf") for name in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            best[name] = min(best[name], median_us(fn, args.calls))
    raw = best["torch.ops.sss_ext.verify.default"]
    print(f"B={B}, K={K}, V={V}, float32, 1 thread, torch {torch.__version__}; best of {args.repeats} medians of {args.calls} calls")
    for name, value in best.items():
        print(f"  {name:36s} {value:7.2f} us  ({value / raw:.2f}x the raw op)")


if __name__ == "__main__":
    main()
