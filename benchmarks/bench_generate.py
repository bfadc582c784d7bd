"""End-to-end decoding speed on CPU: vanilla, sd and sss at batch 1 and batch 8.

Small random Llama models built from configs (nothing downloaded). For every
(hidden size, new tokens, method, batch) cell: tokens/s, target calls per generated token,
acceptance rate, and the split of time between the models' own forward passes, the sampler
ops (``sss_ext.sample`` / ``sss_ext.verify``: checks, uniforms, fused kernel) and the rest of
the Python decoding loop (masks, cache rollback, bookkeeping), each as a percentage of the
forward time. Forward and op times come from ``generate(..., observer=LoopTimer(clock))``: the
loop reads the observer's clock around each model call and each sampler-op call.
With ``--threads 1`` times are the compute thread's CPU time (``time.thread_time``;
robust to other jobs on a shared machine); with more threads they are wall-clock times
(run it on a quiet machine). sss at batch 8 is also run under cProfile.

Writes ``benchmarks/results/generate_cpu.csv`` and ``generate_cpu.md``.

With ``--draft-lengths K1 K2 ...`` it compares draft-length policies instead: sd and sss at
batch 1 and 8 with each fixed ``K`` and with the adaptive policy (``K`` at most the largest
given), tokens/s, target calls per token, drafts per round and wall time, written to
``generate_draft_length_cpu.csv`` / ``.md``.

    python benchmarks/bench_generate.py [--threads 2] [--new-tokens 64 256] [--hidden-sizes 512 256]
    python benchmarks/bench_generate.py --draft-lengths 1 2 4 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import os
import platform
import pstats
import re
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sss_ext
from sss_ext.decoding.observe import Observer

DEPTH_SCALE = 0.03
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(vocab_size, hidden_size, layers, heads, seed, logit_scale):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=hidden_size * 11 // 4, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def truncated_copy(model, layers, noise, seed):
    """The first ``layers`` layers of ``model`` with its embeddings and output head, weights perturbed by ``noise``."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = layers
    small = LlamaForCausalLM(config).eval()
    small.load_state_dict(model.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in small.named_parameters():
            if "layers." in name and parameter.dim() == 2:
                parameter.add_(noise * parameter.std() * torch.randn(parameter.shape, generator=generator))
    return small


def build_models(vocab_size, logit_scale, hidden_size=512, layers=6):
    """Target q (6 layers) and two self-speculative 1-layer drafts sharing its embeddings and head.

    Random models are otherwise unrelated (acceptance would be meaningless): the reference
    ``d`` is the target's first layer, the aligned draft ``r`` is ``d`` with perturbed
    layer weights, so ``r != d`` and the reward shift ``r / d`` is not trivial.
    """
    target = build(vocab_size, hidden_size, layers, 8, seed=0, logit_scale=logit_scale)
    with torch.no_grad():  # deeper layers refine rather than replace the first layer's prediction
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(DEPTH_SCALE)
            layer.mlp.down_proj.weight.mul_(DEPTH_SCALE)
    ref = truncated_copy(target, 1, noise=0.0, seed=1)
    draft = truncated_copy(target, 1, noise=0.1, seed=2)
    return target, draft, ref


class LoopTimer(Observer):
    """Time inside each model's forward and inside the sampler ops, from the decoding loop's per-round records.

    ``clock`` is ``time.perf_counter`` (wall) or ``time.thread_time`` (the compute thread's CPU
    time); ``generate`` reads it around every model forward and every ``sss_ext.sample`` /
    ``sss_ext.verify`` call (argument checks, uniforms, fused kernel) because this observer has one.
    """

    def __init__(self, clock):
        self.clock = clock
        self.reset()

    def on_round(self, record):
        self.op_seconds += record.op_seconds
        for role, count in record.forwards.items():
            self.forward_seconds[role] = self.forward_seconds.get(role, 0.0) + count.seconds

    def reset(self):
        self.forward_seconds = {"target": 0.0, "draft": 0.0, "ref": 0.0}
        self.op_seconds = 0.0


def prompts_for(batch, vocab_size, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 21, (batch,), generator=generator).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def cell_options(models, method, new_tokens, args, **config):
    """``generate`` keyword arguments of one cell; ``config``: SamplingConfig fields replacing the defaults."""
    options = dict(method=method, max_new_tokens=new_tokens, num_draft_tokens=args.num_draft_tokens, temperature=1.0,
                   ignore_eos=True, ref_model=models[2] if method == "sss" else None)
    return {**options, **config}


def warm_up(models, method, batch, args, **config):
    options = {**cell_options(models, method, 8, args, **config), "seed": 99}
    sss_ext.generate(models[0], models[1], prompts_for(batch, args.vocab_size, seed=batch), **options)


def run_once(models, method, batch, new_tokens, args, timer, seed, **config):
    """One timed ``generate`` of a cell; times on the benchmark's clock (``timer.clock``)."""
    prompts = prompts_for(batch, args.vocab_size, seed=batch)
    timer.reset()
    start = timer.clock()
    out = sss_ext.generate(models[0], models[1], prompts, seed=seed, observer=timer,
                           **cell_options(models, method, new_tokens, args, **config))
    seconds = timer.clock() - start
    forward = timer.forward_seconds
    forward_total = sum(forward.values())
    ops_seconds = timer.op_seconds
    python_loop = seconds - forward_total - ops_seconds
    total = out.stats.total
    return {
        "method": method, "batch_size": batch, "new_tokens_per_row": new_tokens, "threads": args.threads,
        "clock": "wall" if args.threads > 1 else "thread_cpu", "seconds": seconds,
        "tokens_per_s": total.new_tokens / seconds,
        "target_calls": total.target_calls, "target_calls_per_token": total.target_calls / (total.new_tokens / batch),
        "acceptance_rate": total.acceptance_rate if total.proposed_drafts else float("nan"),
        "mean_accepted_length": total.mean_accepted_length if total.rounds else float("nan"),
        "drafts_per_round": total.proposed_drafts / total.rounds if total.rounds else float("nan"),
        "forward_target_s": forward["target"], "forward_draft_s": forward["draft"], "forward_ref_s": forward["ref"],
        "sampler_ops_s": ops_seconds, "python_loop_s": python_loop,
        "sampler_ops_pct": 100.0 * ops_seconds / forward_total,
        "python_loop_pct": 100.0 * python_loop / forward_total,
        "overhead_pct": 100.0 * (seconds - forward_total) / forward_total,
    }


def median_run(rows):
    """The run of median total time."""
    return sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]


def run_cell(models, method, batch, new_tokens, args, timer, **config):
    """Median (by total time) of ``--repeats`` runs of one cell."""
    warm_up(models, method, batch, args, **config)
    return median_run([run_once(models, method, batch, new_tokens, args, timer, repeat, **config)
                       for repeat in range(args.repeats)])


def profile_cell(models, method, batch, new_tokens, args) -> str:
    target, draft, ref = models
    prompts = prompts_for(batch, args.vocab_size, seed=batch)
    profiler = cProfile.Profile(timer=time.thread_time)
    profiler.enable()
    sss_ext.generate(target, draft, prompts, ref_model=ref if method == "sss" else None, method=method,
                     max_new_tokens=new_tokens, num_draft_tokens=args.num_draft_tokens, ignore_eos=True, seed=0)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(18)
    # The recorded table names files from site-packages/ (or the standard library) on, not the machine's folders.
    return re.sub(r"/\S*/(site-packages|python3\.\d+)/", r"\1/", stream.getvalue())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256], help="new tokens per row (EOS ignored)")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[512, 256],
                        help="one model configuration per hidden size (all three models share it)")
    parser.add_argument("--target-layers", type=int, default=6, help="layers of the target (the drafts have 1)")
    parser.add_argument("--logit-scale", type=float, default=8.0, help="multiplies the output head (peakier distributions)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; 1: times are the thread's CPU time (robust on a shared machine); "
                             "more: wall-clock times (run on a quiet machine)")
    parser.add_argument("--draft-lengths", type=int, nargs="+", default=None,
                        help="compare fixed K (these values) with the adaptive policy instead of the batch grid")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.draft_lengths:
        return compare_draft_lengths(args)
    sections, all_rows = [], []
    for hidden_size in args.hidden_sizes:
        models = build_models(args.vocab_size, args.logit_scale, hidden_size, args.target_layers)
        parameters = [sum(p.numel() for p in m.parameters()) for m in models]
        timer = LoopTimer(time.perf_counter if args.threads > 1 else time.thread_time)
        for new_tokens in args.new_tokens:
            results = []
            with torch.no_grad():
                for method in ("vanilla", "sd", "sss"):
                    for batch in (1, 8):
                        row = {"hidden_size": hidden_size, "target_parameters": parameters[0],
                               "draft_parameters": parameters[1],
                               **run_cell(models, method, batch, new_tokens, args, timer)}
                        results.append(row)
                        print(f"hidden {hidden_size} tokens {new_tokens} {method:8s} batch {batch}: "
                              f"{row['tokens_per_s']:8.1f} tok/s  target calls/token {row['target_calls_per_token']:.3f}  "
                              f"acceptance {row['acceptance_rate']:.3f}  ops {row['sampler_ops_pct']:.1f}%  "
                              f"python loop {row['python_loop_pct']:.1f}%", flush=True)
            for row in results:
                base = next(r for r in results if r["method"] == row["method"] and r["batch_size"] == 1)
                row["speedup_vs_batch1"] = row["tokens_per_s"] / base["tokens_per_s"]
            profile = profile_cell(models, "sss", 8, new_tokens, args)
            sections.append(section_markdown(results, profile, hidden_size, new_tokens, parameters))
            all_rows += results

    write_csv(os.path.join(args.out, "generate_cpu.csv"), all_rows)
    clock = ("wall-clock time (several intra-op threads; run on a quiet machine)" if args.threads > 1 else
             "CPU time of the single compute thread (`time.thread_time`), which other jobs do not inflate")
    header = [
        "# End-to-end decoding speed on CPU (`benchmarks/bench_generate.py`)",
        "",
        *machine_lines(args),
        f"- random Llama models, float32, vocabulary {args.vocab_size}, output head x{args.logit_scale}: target with "
        f"{args.target_layers} layers; draft r and reference d are self-speculative 1-layer models (the target's "
        "embeddings, first layer and head; r's layer weights perturbed, so r != d)",
        f"- prompts of 12-20 tokens, EOS ignored, K = {args.num_draft_tokens}, temperature 1, median of "
        f"{args.repeats} runs",
        f"- times: {clock}. Split: forward = inside the three models' top-level `forward` (timed by the decoding loop for its observer); sampler ops = inside "
        "`sss_ext.sample` / `sss_ext.verify` (argument checks, uniforms, fused kernel); Python loop = the rest of "
        "`sss_ext.generate` (masks and positions, cache rollback and re-alignment, row bookkeeping, statistics). "
        "Percentages are of the forward time",
        "",
    ]
    with open(os.path.join(args.out, "generate_cpu.md"), "w") as handle:
        handle.write("\n".join(header + [line for section in sections for line in section]))


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def machine_lines(args):
    """Machine, load and command lines of a results header."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s); load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        f"- command: `python {os.path.relpath(sys.argv[0])} {' '.join(sys.argv[1:])}`",
    ]


def paired_ratios(runs, baseline_runs):
    """Sorted tokens/s ratios of each run over the baseline's run of the same repeat."""
    return sorted(run["tokens_per_s"] / base["tokens_per_s"] for run, base in zip(runs, baseline_runs))


def paired_summary(method, batch, cells, runs):
    """A line comparing the adaptive policy (the last cell) with the best fixed K, repeat by repeat."""
    best, adaptive = max(cells[:-1], key=lambda r: r["tokens_per_s"]), cells[-1]
    ratios = paired_ratios(runs[adaptive["policy"]], runs[best["policy"]])
    median = ratios[len(ratios) // 2]
    verdict = ("ahead beyond noise" if ratios[0] > 1.0 else "behind beyond noise" if ratios[-1] < 1.0 else "within noise")
    return (f"- {method} batch {batch}: adaptive {adaptive['tokens_per_s']:.1f} tok/s vs best fixed ({best['policy']}) "
            f"{best['tokens_per_s']:.1f} tok/s; paired ratio per repeat median {median:.2f}x, range "
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}x ({verdict}); the slowest fixed "
            f"{min(r['tokens_per_s'] for r in cells[:-1]):.1f} tok/s")


def compare_draft_lengths(args):
    """Fixed K (``args.draft_lengths``) against the adaptive policy (K at most their maximum), sd and sss.

    The policies of a cell run interleaved, one run of each per repeat (in a rotated order), so a
    change of the machine's load between runs hits them alike; a repeat's adaptive run is paired
    with the same repeat's run of the best fixed K (best by median tokens/s).
    """
    max_draft = max(args.draft_lengths)
    policies = [(f"fixed K={k}", dict(num_draft_tokens=k)) for k in sorted(args.draft_lengths)]
    policies.append((f"adaptive K<={max_draft}", dict(num_draft_tokens=max_draft, draft_length_policy="adaptive")))
    lines, all_rows = [], []
    for hidden_size in args.hidden_sizes:
        models = build_models(args.vocab_size, args.logit_scale, hidden_size, args.target_layers)
        timer = LoopTimer(time.perf_counter if args.threads > 1 else time.thread_time)
        for new_tokens in args.new_tokens:
            lines += [f"## hidden size {hidden_size}, {new_tokens} new tokens per row", "",
                      "| method | batch | policy | tokens/s (median) | tokens/s (range) | target calls / token | "
                      "acceptance | drafts / round | wall s |",
                      "|---|---|---|---|---|---|---|---|---|"]
            summary = []
            for method in ("sd", "sss"):
                for batch in (1, 8):
                    runs = {name: [] for name, _ in policies}
                    with torch.no_grad():
                        for name, config in policies:
                            warm_up(models, method, batch, args, **config)
                        for repeat in range(args.repeats):
                            shift = repeat % len(policies)
                            for name, config in policies[shift:] + policies[:shift]:
                                runs[name].append(run_once(models, method, batch, new_tokens, args, timer, repeat, **config))
                    cells = []
                    for name, _ in policies:
                        row = {"hidden_size": hidden_size, "policy": name, **median_run(runs[name]),
                               "tokens_per_s_min": min(r["tokens_per_s"] for r in runs[name]),
                               "tokens_per_s_max": max(r["tokens_per_s"] for r in runs[name])}
                        cells.append(row)
                        print(f"hidden {hidden_size} tokens {new_tokens} {method} batch {batch} {name:16s}: "
                              f"{row['tokens_per_s']:8.1f} tok/s ({row['tokens_per_s_min']:.1f}-{row['tokens_per_s_max']:.1f})  "
                              f"target calls/token {row['target_calls_per_token']:.3f}  "
                              f"drafts/round {row['drafts_per_round']:.2f}", flush=True)
                        lines.append(f"| {method} | {batch} | {name} | {row['tokens_per_s']:.1f} | "
                                     f"{row['tokens_per_s_min']:.1f}-{row['tokens_per_s_max']:.1f} | "
                                     f"{row['target_calls_per_token']:.3f} | {row['acceptance_rate']:.3f} | "
                                     f"{row['drafts_per_round']:.2f} | {row['seconds']:.2f} |")
                    summary.append(paired_summary(method, batch, cells, runs))
                    all_rows += cells
            lines += [""] + summary + [""]
    write_csv(os.path.join(args.out, "generate_draft_length_cpu.csv"), all_rows)
    clock = ("wall-clock time" if args.threads > 1 else "CPU time of the single compute thread (`time.thread_time`)")
    header = [
        "# Draft-length policies on CPU (`benchmarks/bench_generate.py --draft-lengths`)",
        "",
        *machine_lines(args),
        f"- models as in `generate_cpu.md` (vocabulary {args.vocab_size}, output head x{args.logit_scale}, "
        f"{args.target_layers}-layer target, 1-layer self-speculative r and d); prompts of 12-20 tokens, EOS ignored, "
        f"temperature 1; {args.repeats} runs of each policy, interleaved (one of each per repeat, rotated order); "
        f"tokens/s: median and range of the runs; times: {clock}. The adaptive policy measures its costs "
        "from wall-clock round times. Paired ratio: a repeat's adaptive run over the same repeat's run of the "
        "best fixed K; 'within noise' when the paired ratios straddle 1",
        "",
    ]
    with open(os.path.join(args.out, "generate_draft_length_cpu.md"), "w") as handle:
        handle.write("\n".join(header + lines))


def section_markdown(results, profile, hidden_size, new_tokens, parameters):
    lines = [
        f"## hidden size {hidden_size} (target {parameters[0] / 1e6:.1f}M parameters, draft / reference "
        f"{parameters[1] / 1e6:.2f}M each), {new_tokens} new tokens per row",
        "",
        "| method | batch | tokens/s | speed-up vs batch 1 | target calls / token | acceptance | accepted / round | "
        "forward s (q / r / d) | sampler ops | Python loop | ops + loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acceptance = "-" if r["acceptance_rate"] != r["acceptance_rate"] else f"{r['acceptance_rate']:.3f}"
        accepted = "-" if r["mean_accepted_length"] != r["mean_accepted_length"] else f"{r['mean_accepted_length']:.2f}"
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_batch1']:.2f}x | "
            f"{r['target_calls_per_token']:.3f} | {acceptance} | {accepted} | "
            f"{r['forward_target_s']:.3f} / {r['forward_draft_s']:.3f} / {r['forward_ref_s']:.3f} | "
            f"{r['sampler_ops_pct']:.1f}% | {r['python_loop_pct']:.1f}% | {r['overhead_pct']:.1f}% |")
    worst = max(results, key=lambda r: r["python_loop_pct"])
    speedups = {r["method"]: r["speedup_vs_batch1"] for r in results if r["batch_size"] == 8}
    lines += [
        "",
        f"- Python loop < 10% of the forward time: {'met' if worst['python_loop_pct'] < 10 else 'missed'} "
        f"(worst cell {worst['method']} batch {worst['batch_size']}: {worst['python_loop_pct']:.1f}%; with the "
        f"sampler ops {worst['overhead_pct']:.1f}%)",
        "- batch 8 > 4x the tokens/s of batch 1: "
        + ", ".join(f"{m} {v:.2f}x ({'met' if v > 4 else 'missed'})" for m, v in speedups.items()),
        "",
        "<details><summary>cProfile of sss at batch 8 (top functions by own time; the models' work is `linear`, "
        "`scaled_dot_product_attention`, `cat` inside the cache update, ...; `torch._ops.sss_ext.` is one of the "
        "two fused ops, sample or verify: cProfile gives both the same name and keeps one row)</summary>",
        "",
        "```",
        profile.strip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
