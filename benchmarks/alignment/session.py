"""The whole alignment benchmark: load the models, run the grid (resumable), write the outputs; or only rewrite them."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import sss_ext
from sss_ext.decoding.methods import get_method
from sss_ext.distributed import DistributedSession

from .grid import method_grid
from .measure import bon_subsets, run_method, sir_subsets, summarise
from .report import sort_rows, write_outputs

#: (manifest section, key) of the model figures recorded in the metadata
MODEL_FIGURES = (("draft", "heldout_acceptance_T1"), ("dpo", "heldout_proxy_gain"), ("rewards", "heldout_auc_gold"))


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def state_path(out: Path) -> Path:
    return Path(str(out) + "_state.json")


def report_only(args) -> None:
    """Rewrite table, CSV, JSON and plots from ``<out>_state.json``."""
    from sss_ext.models.manifest import read_manifest

    state = json.loads(state_path(args.out).read_text())
    st = state["settings"]
    meta = dict(st, top_k=0, top_p=1.0, ignore_eos=True, proxy_reward="proxy-vader", gold_reward="gold-minilm-logistic",
                machine=machine(), models={k: read_manifest().get(k, {}).get(m) for k, m in MODEL_FIGURES},
                methods_measured=state.get("done", []))
    written = Path(str(args.out) + ".json")
    if written.exists():  # the measuring run's machine, load, command and wall time
        meta = {**meta, **json.loads(written.read_text())["meta"], "methods_measured": meta["methods_measured"]}
    write_outputs(sort_rows(state["rows"]), state.get("samples", {}), meta, args.out, args.no_plots)


def _resume(args, partial: Path, settings: dict):
    """(rows, samples, done labels) of an earlier run with the same settings when ``--resume``."""
    if args.resume and partial.exists():
        old = json.loads(partial.read_text())
        if old.get("settings") == settings:
            done = set(old.get("done", []))
            print(f"resuming: {sorted(done)} already measured", flush=True)
            return old["rows"], old.get("samples", {}), done
    return [], {}, set()


def run_all(args) -> None:
    """Every method of the grid on the default models; the state file is rewritten after each method.

    Under ``torchrun --nproc-per-node N benchmarks/bench_alignment.py ...`` (CPU, gloo) every
    rank generates its shard of the prompts (:func:`.measure.run_method`); rank 0 scores,
    writes the state file and the outputs.
    """
    with DistributedSession.from_env("cpu") as session:
        _run_all(args, session)


def _run_all(args, session: DistributedSession) -> None:
    from sss_ext.models import load_default, load_prompts

    t0 = time.time()
    grid = method_grid(args)
    models = load_default(aligned=any("draft" in get_method(m).models for _, m, _ in grid), gold=session.is_main)
    print(f"models loaded in {time.time() - t0:.1f}s", flush=True)
    prompts = load_prompts("eval", args.prompts)
    base = sss_ext.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=1.0,
                                  seed=args.seed, ignore_eos=True)
    partial = state_path(args.out)
    settings = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "seed": args.seed, "chunk": args.chunk, "ll_prompts": args.ll_prompts, "no_ll": args.no_ll}
    if session.is_main:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, samples, done_labels = session.broadcast(_resume(args, partial, settings) if session.is_main else None)
    for label, method, overrides in grid:
        if label in done_labels:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)
        run = run_method(models, prompts, label, method, overrides, args, base, session)
        if not session.is_main:
            continue
        row, smp = summarise(models, prompts, run, args)
        rows.append(row)
        samples[row["method"]] = smp
        subsets = {"bon": bon_subsets, "sss-sir": sir_subsets}.get(method)
        if subsets is not None:
            sub_rows, sub_samples = subsets(models, prompts, run, args)
            rows.extend(sub_rows)
            samples.update(sub_samples)
        print(f"  -> gold {row['gold_mean']:.3f} [{row['gold_ci95_lo']:.3f}, {row['gold_ci95_hi']:.3f}] "
              f"target fwd rows/prompt {row['target_row_calls_per_prompt']:.1f} wall/prompt {row['wall_s_per_prompt']:.2f}s", flush=True)
        done_labels.add(label)
        partial.write_text(json.dumps({"settings": settings, "rows": rows, "samples": samples, "done": sorted(done_labels)}, indent=1))
    if not session.is_main:
        return
    rows = sort_rows(rows)
    meta = {
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": 0, "top_p": 1.0, "seed": args.seed, "ignore_eos": True, "chunk": args.chunk,
        "proxy_reward": models.proxy_reward.name, "gold_reward": models.gold_reward.name,
        "machine": machine(), "ranks": session.world_size,
        "load_avg_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "total_wall_s": time.time() - t0, "argv": sys.argv[1:],
        "models": {k: models.manifest.get(k, {}).get(m) for k, m in MODEL_FIGURES},
    }
    write_outputs(rows, samples, meta, args.out, args.no_plots)
    print(f"total {time.time() - t0:.0f}s")
