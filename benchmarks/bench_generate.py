"""End-to-end decoding speed on CPU: vanilla, sd and sss at batch 1 and batch 8.

Small random Llama models built from configs (nothing downloaded). For every
(method, batch) cell: tokens/s, target calls per generated token, acceptance rate, and
the split of time between the models' own forward passes (timed with forward pre/post
hooks on the three top-level modules) and everything else (the decoding loop: sampling
and verification ops, cache rollback, bookkeeping). ``loop_overhead_pct`` is
``(total - forward) / forward`` in CPU time of the single compute thread
(``time.thread_time``; robust to other jobs on a shared machine); wall-clock figures are
recorded too. sss at batch 8 is also run under cProfile to show the split by function.

Writes ``benchmarks/results/generate_cpu.csv`` and ``generate_cpu.md``.

    python benchmarks/bench_generate.py [--new-tokens 64] [--repeats 3] [--hidden-sizes 512 256]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import os
import platform
import pstats
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sss_ext

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


class ForwardTimer:
    """Wall and CPU (thread) time spent inside the top-level forward of each model."""

    def __init__(self, models):
        self.seconds = {name: 0.0 for name in models}
        self.cpu_seconds = {name: 0.0 for name in models}
        self.handles = []
        for name, model in models.items():
            start = {}

            def before(module, args, start=start):
                start["wall"], start["cpu"] = time.perf_counter(), time.thread_time()

            def after(module, args, output, start=start, name=name):
                self.seconds[name] += time.perf_counter() - start["wall"]
                self.cpu_seconds[name] += time.thread_time() - start["cpu"]

            self.handles.append(model.register_forward_pre_hook(before))
            self.handles.append(model.register_forward_hook(after))

    def reset(self):
        for name in self.seconds:
            self.seconds[name] = 0.0
            self.cpu_seconds[name] = 0.0

    def close(self):
        for handle in self.handles:
            handle.remove()


def prompts_for(batch, vocab_size, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 21, (batch,), generator=generator).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def run_cell(models, method, batch, args, timer):
    target, draft, ref = models
    prompts = prompts_for(batch, args.vocab_size, seed=batch)
    kwargs = dict(method=method, max_new_tokens=args.new_tokens, num_draft_tokens=args.num_draft_tokens,
                  temperature=1.0, ignore_eos=True)
    ref_model = ref if method == "sss" else None
    sss_ext.generate(target, draft, prompts, ref_model=ref_model, **{**kwargs, "max_new_tokens": 8}, seed=99)  # warm-up
    rows = []
    for repeat in range(args.repeats):
        timer.reset()
        start, start_cpu = time.perf_counter(), time.thread_time()
        out = sss_ext.generate(target, draft, prompts, ref_model=ref_model, seed=repeat, **kwargs)
        wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        forward, forward_cpu = sum(timer.seconds.values()), sum(timer.cpu_seconds.values())
        total = out.stats.total
        rows.append({
            "method": method, "batch_size": batch, "new_tokens": total.new_tokens, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": total.new_tokens / wall, "tokens_per_cpu_s": total.new_tokens / cpu,
            "target_calls": total.target_calls, "target_calls_per_token": total.target_calls / (total.new_tokens / batch),
            "acceptance_rate": total.acceptance_rate if total.proposed_drafts else float("nan"),
            "mean_accepted_length": total.mean_accepted_length if total.rounds else float("nan"),
            "forward_target_cpu_s": timer.cpu_seconds["target"], "forward_draft_cpu_s": timer.cpu_seconds["draft"],
            "forward_ref_cpu_s": timer.cpu_seconds["ref"], "forward_cpu_s": forward_cpu, "loop_cpu_s": cpu - forward_cpu,
            "loop_overhead_pct": 100.0 * (cpu - forward_cpu) / forward_cpu,
            "forward_wall_s": forward, "loop_overhead_wall_pct": 100.0 * (wall - forward) / forward,
        })
    # median repeat by CPU time
    rows.sort(key=lambda r: r["cpu_s"])
    return rows[len(rows) // 2]


def profile_cell(models, method, batch, args) -> str:
    target, draft, ref = models
    prompts = prompts_for(batch, args.vocab_size, seed=batch)
    profiler = cProfile.Profile(timer=time.thread_time)
    profiler.enable()
    sss_ext.generate(target, draft, prompts, ref_model=ref if method == "sss" else None, method=method,
                     max_new_tokens=args.new_tokens, num_draft_tokens=args.num_draft_tokens, ignore_eos=True, seed=0)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(18)
    return stream.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[512, 256],
                        help="one model configuration per hidden size (all three models share it)")
    parser.add_argument("--target-layers", type=int, default=6, help="layers of the target (the drafts have 1)")
    parser.add_argument("--logit-scale", type=float, default=8.0, help="multiplies the output head (peakier distributions)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; with 1, thread CPU time measures the work even on a shared machine")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections, all_rows = [], []
    for hidden_size in args.hidden_sizes:
        models = build_models(args.vocab_size, args.logit_scale, hidden_size, args.target_layers)
        parameters = [sum(p.numel() for p in m.parameters()) for m in models]
        timer = ForwardTimer({"target": models[0], "draft": models[1], "ref": models[2]})
        results = []
        with torch.no_grad():
            for method in ("vanilla", "sd", "sss"):
                for batch in (1, 8):
                    row = {"hidden_size": hidden_size, "target_parameters": parameters[0], "draft_parameters": parameters[1],
                           **run_cell(models, method, batch, args, timer)}
                    results.append(row)
                    print(f"hidden {hidden_size} {method:8s} batch {batch}: {row['tokens_per_cpu_s']:8.1f} tok/CPU-s "
                          f"({row['tokens_per_s']:.1f} tok/s wall)  target calls/token {row['target_calls_per_token']:.3f}  "
                          f"acceptance {row['acceptance_rate']:.3f}  loop overhead {row['loop_overhead_pct']:.1f}%", flush=True)
        timer.close()
        for row in results:
            base = next(r for r in results if r["method"] == row["method"] and r["batch_size"] == 1)
            row["speedup_vs_batch1"] = row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
            row["speedup_vs_batch1_wall"] = row["tokens_per_s"] / base["tokens_per_s"]
        profile = profile_cell(models, "sss", 8, args)
        sections.append(section_markdown(results, profile, args, hidden_size, parameters))
        all_rows += results

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generate_cpu.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(all_rows[0].keys()))
        writer.writeheader()
        for row in all_rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    header = [
        "# End-to-end decoding speed on CPU (`benchmarks/bench_generate.py`)",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s); load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(the machine was shared with other jobs)",
        f"- random Llama models, float32, vocabulary {args.vocab_size}, output head x{args.logit_scale}: target with "
        f"{args.target_layers} layers; draft r and reference d are self-speculative 1-layer models (the target's "
        "embeddings, first layer and head; r's layer weights perturbed, so r != d)",
        f"- {args.new_tokens} new tokens per prompt (EOS ignored), prompts of 12-20 tokens, K = {args.num_draft_tokens}, "
        f"temperature 1, median of {args.repeats} runs; one configuration per hidden size",
        "- timing: CPU time of the single compute thread (`time.thread_time`), which other jobs on the machine do not "
        "inflate the way they inflate wall time; wall-clock tokens/s are shown too. Forward time = time inside the "
        "three models' top-level `forward` (hooks); loop overhead = (total - forward) / forward, i.e. everything "
        "sss_ext adds: sss_ext.sample / sss_ext.verify kernels, masks and positions, cache rollback, bookkeeping",
        "",
    ]
    with open(os.path.join(args.out, "generate_cpu.md"), "w") as handle:
        handle.write("\n".join(header + [line for section in sections for line in section]))


def section_markdown(results, profile, args, hidden_size, parameters):
    lines = [
        f"## hidden size {hidden_size}: target {parameters[0] / 1e6:.1f}M parameters, draft / reference "
        f"{parameters[1] / 1e6:.2f}M each",
        "",
        "| method | batch | tokens / CPU-s | speed-up vs batch 1 | tokens/s wall | target calls / token | acceptance | "
        "accepted / round | forward CPU s (q / r / d) | loop CPU s | loop overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acceptance = "-" if r["acceptance_rate"] != r["acceptance_rate"] else f"{r['acceptance_rate']:.3f}"
        accepted = "-" if r["mean_accepted_length"] != r["mean_accepted_length"] else f"{r['mean_accepted_length']:.2f}"
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_cpu_s']:.1f} | {r['speedup_vs_batch1']:.2f}x | "
            f"{r['tokens_per_s']:.1f} | {r['target_calls_per_token']:.3f} | {acceptance} | {accepted} | "
            f"{r['forward_target_cpu_s']:.3f} / {r['forward_draft_cpu_s']:.3f} / {r['forward_ref_cpu_s']:.3f} | "
            f"{r['loop_cpu_s']:.3f} | {r['loop_overhead_pct']:.1f}% |")
    worst = max(results, key=lambda r: r["loop_overhead_pct"])
    speedups = {r["method"]: r["speedup_vs_batch1"] for r in results if r["batch_size"] == 8}
    lines += [
        "",
        "Goals:",
        "",
        f"- decoding loop < 10% over the models' forward time: {'met' if worst['loop_overhead_pct'] < 10 else 'missed'} "
        f"(worst cell {worst['method']} batch {worst['batch_size']}: {worst['loop_overhead_pct']:.1f}%)",
        "- batch 8 > 4x the tokens/s of batch 1: "
        + ", ".join(f"{m} {v:.2f}x ({'met' if v > 4 else 'missed'})" for m, v in speedups.items()),
        "",
        f"cProfile of sss at batch 8, hidden {hidden_size} (top functions by own CPU time; the models' work is "
        "`linear`, `scaled_dot_product_attention`, `cat` inside the cache update, ...; `torch._ops.sss_ext.` rows are "
        "one of the two fused ops, sample or verify (cProfile gives both the same name and keeps one row)):",
        "",
        "```",
        profile.strip(),
        "```",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
