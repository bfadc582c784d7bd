"""Time the verification op against the PyTorch reference.

CPU (default): B=8, K=4, V=50272, float32 and bfloat16, with and without a reference
draft, all intra-op threads; writes benchmarks/results/verify_cpu.{csv,md}.
``--device cuda`` runs the GPU grid of benchmarks/bench_verify_gpu.py instead.

Usage: python benchmarks/bench_verify.py [--device cpu|cuda] [--repeats N] [--threads T]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sss_ext  # noqa: E402
from sss_ext.testing import make_verify_inputs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_ms(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds per call (CPU time sums all threads)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def runnable_tasks() -> int:
    """Tasks running or runnable on the machine right now (this benchmark's threads included)."""
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[0])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_cpu(repeats: int) -> list[dict]:
    rows = []
    batch, num_draft_tokens, vocab_size = 8, 4, 50272
    for dtype in (torch.float32, torch.bfloat16):
        for with_ref in (False, True):
            kw = make_verify_inputs(batch, num_draft_tokens, vocab_size, dtype, with_ref, 1.0, seed=1)
            op_ms, op_cpu_ms = median_ms(lambda: sss_ext.verify(**kw), repeats)
            ref_ms, ref_cpu_ms = median_ms(lambda: sss_ext.reference.verify(**kw), max(3, repeats // 3))
            same = torch.equal(sss_ext.verify(**kw).tokens, sss_ext.reference.verify(**kw).tokens)
            rows.append(dict(batch=batch, num_draft_tokens=num_draft_tokens, vocab_size=vocab_size,
                             dtype=str(dtype).replace("torch.", ""), with_ref=with_ref, threads=torch.get_num_threads(),
                             op_ms=round(op_ms, 3), reference_ms=round(ref_ms, 3), speedup=round(ref_ms / op_ms, 2),
                             op_cpu_ms=round(op_cpu_ms, 3), reference_cpu_ms=round(ref_cpu_ms, 3),
                             cpu_time_ratio=round(ref_cpu_ms / op_cpu_ms, 2), tokens_equal=same,
                             runnable_tasks=runnable_tasks()))
            print(rows[-1], flush=True)
    return rows


def write(rows: list[dict], name: str, title: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n")
        f.write(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
                f"median wall time (`op_ms`, `reference_ms`; `speedup` is their ratio) and process CPU time summed over threads "
                f"of repeated calls with given uniforms; `runnable_tasks` counts the tasks running or runnable on the machine "
                f"when the row was measured (this benchmark's own included), to show whether other work shared the cores (`python benchmarks/bench_verify.py`).\n\n")
        f.write("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(v) for v in row.values()) + " |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, i.e. all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        import bench_verify_gpu

        bench_verify_gpu.main()
        return
    write(run_cpu(args.repeats), "verify_cpu", "sss_ext.verify vs PyTorch reference on CPU")


if __name__ == "__main__":
    main()
