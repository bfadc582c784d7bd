"""GPU benchmark of sss_ext.verify.

Grid: B in {1, 8, 32, 128}, K in {1, 4, 8}, V in {32000, 50272, 128256}, bfloat16 / float32,
with and without a reference draft (temperature 1, no truncation, exact mode).

Method: every configuration is captured in a CUDA graph that calls the op on a rotation
of input copies whose total size exceeds twice the L2 cache (so each call reads cold
inputs); the graph is replayed after warm-up and timed with CUDA events; the reported time
is the median over replays of (replay time / calls in the graph). A device-to-device copy
of 1 GiB is timed the same way in the same run: copy bandwidth = 2 * bytes / time.
"bytes read" counts what the kernels actually read: every logits row once (the normaliser
pass), the rows of the drawn position again (correction/bonus draw, from the measured
num_accepted) and one draw chunk of it a third time. The bandwidth floor is
(every logits row once) / copy bandwidth. The PyTorch reference (sss_ext.reference.verify,
float64) is timed eagerly on the same GPU with the same rotation. FlashInfer's
chain_speculative_sampling is timed too when `import flashinfer` works (it takes
probabilities, so it has no reference draft and no tilt).

Writes benchmarks/results/verify_cuda_<gpu>.{csv,md}.
Usage: python benchmarks/bench_verify_gpu.py [--quick] [--budget-seconds S] [--replays N]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sss_ext  # noqa: E402
from sss_ext.testing import make_verify_inputs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCHES = (1, 8, 32, 128)
DRAFTS = (1, 4, 8)
VOCABS = (32000, 50272, 128256)
DTYPES = (torch.bfloat16, torch.float32)
GOAL = dict(batch=32, num_draft=4, vocab=128256, dtype="bfloat16", with_ref=True)  # goal: <= 1.5x floor, >= 10x reference
VEC = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}  # elements per 16-byte load (csrc/kernels/cuda)


def gpu_name() -> str:
    return torch.cuda.get_device_name()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20))


def graph_time_us(calls, replays: int) -> tuple[float, float, float]:
    """Median / 10th / 90th percentile of per-call time (us) of `calls` captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocations, caches) off the capture stream
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    times.sort()
    del graph
    return statistics.median(times), times[len(times) // 10], times[(9 * len(times)) // 10]


def eager_time_us(calls, repeats: int) -> float:
    """Median time (us) of eager calls (host syncs inside included), rotating through `calls`."""
    calls[0]()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for n in range(repeats):
        start.record()
        calls[n % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 2**30, replays: int = 20) -> float:
    """Device-to-device copy bandwidth, (read + write bytes) / time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us, _, _ = graph_time_us([lambda: dst.copy_(src)], replays)
    del src, dst
    return 2 * nbytes / (us * 1e-6) / 1e9


def make_copy(batch, num_draft, vocab, dtype, with_ref, seed):
    """One set of verify inputs on the GPU (sss_ext.testing, the builder the tests use)."""
    kwargs = make_verify_inputs(batch, num_draft, vocab, dtype, with_ref, 1.0, seed=2 * seed + 1, device="cuda")
    return {name: kwargs[name] for name in ("target_logits", "draft_logits", "draft_tokens", "ref_logits", "uniforms")}


def logits_bytes(batch, num_draft, vocab, dtype, with_ref) -> int:
    """Every logits row the op needs, read once."""
    size = torch.finfo(dtype).bits // 8
    rows = batch * (num_draft + 1) * (3 if with_ref else 2)
    if not with_ref:
        rows -= batch  # the draft row of the bonus position is not read without a reference
    return rows * vocab * size


def draw_bytes(num_accepted: torch.Tensor, num_draft, vocab, dtype, with_ref) -> int:
    """Rows of the drawn position read again by the draw (plus one chunk rescanned)."""
    size = torch.finfo(dtype).bits // 8
    residual = (num_accepted < num_draft).to(torch.int64)  # (B,)
    streams = int((torch.full_like(residual, 3) if with_ref else 1 + residual).sum())
    vectors = math.ceil(vocab / VEC[dtype])  # draw chunks: a function of V only (csrc/kernels/cuda/launch_impl.cuh)
    chunks = min(64, max(1, math.ceil(vectors / 512)))
    return int(streams * vocab * size * (1 + 1 / chunks))


def flashinfer_time_us(copies, replays):
    """FlashInfer chain_speculative_sampling on float32 probabilities (no reference draft)."""
    try:
        import flashinfer  # noqa: F401
        from flashinfer.sampling import chain_speculative_sampling
    except Exception:
        return None
    try:
        prepared = []
        for c in copies:
            K = c["draft_tokens"].shape[1]
            prepared.append((torch.softmax(c["draft_logits"][:, :K].float(), -1), c["draft_tokens"].to(torch.int32),
                             torch.softmax(c["target_logits"].float(), -1)))
        calls = [lambda p=p: chain_speculative_sampling(p[0], p[1], p[2]) for p in prepared]
        us, _, _ = graph_time_us(calls, replays)
        return us
    except Exception as error:  # API differences between FlashInfer versions
        print(f"  flashinfer skipped: {type(error).__name__}: {error}", flush=True)
        return None


def run_case(batch, num_draft, vocab, dtype, with_ref, copy_gbps, replays, temperature, memory_budget):
    per_copy = logits_bytes(batch, num_draft, vocab, dtype, with_ref)
    copies_needed = max(2, math.ceil(2 * l2_bytes() / per_copy))
    copies_needed = max(1, min(copies_needed, memory_budget // max(per_copy, 1)))
    copies = [make_copy(batch, num_draft, vocab, dtype, with_ref, seed=n) for n in range(copies_needed)]
    calls_per_graph = max(len(copies), 8)
    calls = [lambda c=copies[n % len(copies)]: sss_ext.verify(**c, temperature=temperature, validate=False)
             for n in range(calls_per_graph)]
    us, p10, p90 = graph_time_us(calls, replays)

    got = sss_ext.verify(**copies[0], temperature=temperature)
    row = dict(batch=batch, num_draft=num_draft, vocab=vocab, dtype=str(dtype).replace("torch.", ""), with_ref=with_ref,
               us=round(us, 2), us_p10=round(p10, 2), us_p90=round(p90, 2))
    min_bytes = per_copy
    read = per_copy + draw_bytes(got.num_accepted, num_draft, vocab, dtype, with_ref)
    floor_us = min_bytes / (copy_gbps * 1e3)
    row.update(bytes_read=read, min_bytes=min_bytes, gbps=round(read / (us * 1e3), 1),
               ratio_to_copy=round(read / (us * 1e3) / copy_gbps, 3), floor_us=round(floor_us, 2),
               ratio_to_floor=round(us / floor_us, 3), accepted_mean=round(float(got.num_accepted.double().mean()), 3))
    try:
        expected = sss_ext.reference.verify(**copies[0], temperature=temperature)
        row["rows_differing"] = int(((got.tokens != expected.tokens).any(1) | (got.num_accepted != expected.num_accepted)).sum())
        del expected
        reference_calls = [lambda c=c: sss_ext.reference.verify(**c, temperature=temperature) for c in copies[:2]]
        reference_us = eager_time_us(reference_calls, repeats=5)
        row.update(reference_us=round(reference_us, 1), speedup=round(reference_us / us, 1))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        row.update(rows_differing="", reference_us="OOM", speedup="")
    fi = flashinfer_time_us(copies, replays) if not with_ref and dtype == torch.float32 else None
    row["flashinfer_us"] = "" if fi is None else round(fi, 2)
    del copies, calls
    torch.cuda.empty_cache()
    return row


def grid(quick: bool):
    """Configurations in the order they run: the goal first, then K = 4 at V in {32000, 128256}
    (the quick grid), then the rest, so a time budget cuts the least informative ones."""
    cases = list(itertools.product(BATCHES, DRAFTS, VOCABS, DTYPES, (True, False)))
    goal = (GOAL["batch"], GOAL["num_draft"], GOAL["vocab"], torch.bfloat16, GOAL["with_ref"])
    core = [c for c in cases if c[1] == 4 and c[2] in (32000, 128256) and c != goal]
    rest = [c for c in cases if c not in core and c != goal]
    return [goal] + core + ([] if quick else rest)


def write(rows, copy_gbps, skipped, out_dir=RESULTS):
    os.makedirs(out_dir, exist_ok=True)
    name = f"verify_cuda_{slug(gpu_name())}"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    goal = next((r for r in rows if all(str(r[k]) == str(v) for k, v in GOAL.items())), None)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# sss_ext.verify on {gpu_name()}\n\n")
        f.write(f"torch {torch.__version__}, CUDA {torch.version.cuda}, sss_ext built with CUDA {sss_ext.BUILD_INFO['cuda_version']}; "
                f"device-to-device copy bandwidth measured in this run: {copy_gbps:.0f} GB/s (read + write).\n\n")
        f.write("Times: CUDA graph of calls over rotating input copies (> 2x L2, cold), CUDA events, median of replays "
                "(us per call). `floor_us` = every logits row once at copy bandwidth; `gbps` = bytes actually read / time; "
                "`speedup` = sss_ext.reference.verify (eager, float64, same GPU) / op. Temperature 1, no truncation.\n\n")
        if goal is not None and goal.get("speedup") not in (None, ""):
            ok = goal["ratio_to_floor"] <= 1.5 and goal["speedup"] >= 10
            f.write(f"Goal (B=32, K=4, V=128256, bf16, with ref): {goal['us']} us = {goal['ratio_to_floor']}x the bandwidth floor "
                    f"(goal <= 1.5x), {goal['speedup']}x the reference (goal >= 10x): {'met' if ok else 'NOT met'}.\n\n")
        if skipped:
            f.write(f"{skipped} configurations skipped (time budget).\n\n")
        f.write("| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
        for row in rows:
            f.write("| " + " | ".join(str(row.get(k, "")) for k in fields) + " |\n")
    return os.path.join(out_dir, f"{name}.csv"), os.path.join(out_dir, f"{name}.md")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K=4 and V in {32000, 128256} only")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"), help="stop starting new configurations after this")
    parser.add_argument("--replays", type=int, default=30, help="timed graph replays per configuration")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out-dir", default=RESULTS)
    args, _ = parser.parse_known_args(argv)  # bench_verify.py --device cuda forwards its own flags
    if not (sss_ext.BUILD_INFO["cuda"] and torch.cuda.is_available()):
        raise SystemExit("bench_verify_gpu needs an sss_ext build with CUDA kernels and a visible GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.time()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{gpu_name()}: copy bandwidth {copy_gbps:.0f} GB/s, L2 {l2_bytes() / 2**20:.0f} MiB", flush=True)
    free, _ = torch.cuda.mem_get_info()
    memory_budget = int(free * 0.25)
    rows, cases = [], grid(args.quick)
    for n, (batch, num_draft, vocab, dtype, with_ref) in enumerate(cases):
        if n > 0 and time.time() - start > args.budget_seconds:  # the goal configuration always runs
            print(f"time budget reached: {len(cases) - n} configurations skipped", flush=True)
            write(rows, copy_gbps, len(cases) - n, args.out_dir)
            return
        rows.append(run_case(batch, num_draft, vocab, dtype, with_ref, copy_gbps, args.replays, args.temperature, memory_budget))
        print(rows[-1], flush=True)
        if n % 8 == 0:
            write(rows, copy_gbps, len(cases) - n - 1, args.out_dir)  # partial results survive a timeout
    paths = write(rows, copy_gbps, 0, args.out_dir)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
