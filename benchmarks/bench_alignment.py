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
steps; approximate for wall time, marked in the table).

    nice -n 19 python benchmarks/bench_alignment.py                 # full run (see README)
    python benchmarks/bench_alignment.py --prompts 3 --max-new-tokens 4 --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import sss_ext  # noqa: E402
from sss_ext import ops  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------- instruments
class RowCounter:
    """Counts rows x calls and tokens of every forward of a model (a forward pre-hook)."""

    def __init__(self, model):
        self.row_calls = 0
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None:
            self.row_calls += int(ids.shape[0])
            self.calls += 1

    def reset(self):
        self.row_calls = 0
        self.calls = 0

    def close(self):
        self.handle.remove()


class ZRecorder:
    """Wraps ``sss_ext.ops.verify`` to record log Z at every emitted position."""

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self._orig = None

    def __enter__(self):
        self._orig = ops.verify
        recorder = self

        def verify(*args, **kwargs):
            out = recorder._orig(*args, **kwargs)
            pos = torch.arange(out.log_z.shape[1], device=out.log_z.device)
            emitted = pos[None, :] <= out.num_accepted[:, None]
            recorder.values.append(out.log_z[emitted].detach().float().cpu())
            return out

        ops.verify = verify
        return self

    def __exit__(self, *exc):
        ops.verify = self._orig

    def mean_abs_z_minus_1(self):
        if not self.values:
            return None
        logz = torch.cat(self.values)
        return float((logz.exp() - 1).abs().mean()) if logz.numel() else None


# ----------------------------------------------------------------------------- statistics
def bootstrap_ci(values: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    g = torch.Generator().manual_seed(seed)
    v = values.double()
    idx = torch.randint(len(v), (n_boot, len(v)), generator=g)
    means = v[idx].mean(1)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(means.quantile(lo)), float(means.quantile(hi))


@torch.no_grad()
def sequence_scores(models, prompt_ids, seqs, temperature, shift, need_tilted: bool, batch: int = 32):
    """Per sequence: log q~(y), log r~(y), log d~(y) and, if asked, log p*(y) (token-level tilted).

    q~ etc. are the tempered softmaxes the samplers use (no top-k/top-p in this benchmark).
    """
    out = {"log_q": [], "log_r": [], "log_pstar": []}
    for s in range(0, len(seqs), batch):
        rows = [torch.cat([p, y]) for p, y in zip(prompt_ids[s : s + batch], seqs[s : s + batch])]
        lens = [len(y) for y in seqs[s : s + batch]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        n = max(lens)

        def logits_of(model):
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=n + 1).logits[:, :-1].float()

        zq = logits_of(models.target) / temperature
        tgt = ids[:, -n:]
        valid = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, length in enumerate(lens):
            valid[i, n - length :] = True

        def seq_logp(z):
            lp = torch.log_softmax(z, -1).gather(-1, tgt[..., None]).squeeze(-1)
            return (lp * valid).sum(-1)

        out["log_q"].append(seq_logp(zq))
        if need_tilted:
            zr = logits_of(models.draft) / temperature
            zd = logits_of(models.ref_draft) / temperature
            out["log_r"].append(seq_logp(zr))
            out["log_pstar"].append({lam: seq_logp(zq + lam * (zr - zd)) for lam in shift})
    res = {"log_q": torch.cat(out["log_q"])}
    if need_tilted:
        res["log_r"] = torch.cat(out["log_r"])
        res["log_pstar"] = {lam: torch.cat([d[lam] for d in out["log_pstar"]]) for lam in shift}
    return res


# ----------------------------------------------------------------------------- methods
def method_grid(args):
    """(label, method, config overrides), cheapest and most informative first."""
    K0, lam0 = args.k0, 1.0
    grid = [("vanilla", "vanilla", {}), ("draft", "draft", {})]
    if args.quick:
        sss = [(1.0, 2)]
    elif args.full_grid:
        sss = [(lam, k) for lam in (0.5, 1.0, 2.0) for k in (2, 4, 8)]
    else:  # lambda sweep at K0 and K sweep at lambda=1
        sss = sorted({(0.5, K0), (1.0, K0), (2.0, K0), (1.0, 2), (1.0, 4), (1.0, 8)})
    sss.sort(key=lambda lk: (lk != (lam0, K0), lk))
    grid.append((f"sss l={sss[0][0]:g} K={sss[0][1]}", "sss", {"shift": sss[0][0], "num_draft_tokens": sss[0][1]}))
    nmax = 2 if args.quick else args.bon_max
    grid.append((f"bon N={nmax}", "bon", {"num_samples": nmax}))
    grid.append((f"sd K={K0}", "sd", {"num_draft_tokens": K0}))
    for lam, k in sss[1:]:
        grid.append((f"sss l={lam:g} K={k}", "sss", {"shift": lam, "num_draft_tokens": k}))
    grid.append((f"sss-paper l={lam0:g} K={K0}", "sss-paper", {"shift": lam0, "num_draft_tokens": K0}))
    ns = 2 if args.quick else args.spec_rejection_n
    grid.append((f"spec-rejection N={ns}", "spec-rejection",
                 {"num_samples": ns, "rejection_interval": max(1, args.max_new_tokens // 4), "rejection_rate": 0.5}))
    nsoft = 2 if args.quick else args.soft_bon_n
    grid.append((f"soft-bon n={nsoft}", "soft-bon", {"num_samples": nsoft, "beta": args.soft_bon_beta}))
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        grid = [g for g in grid if any(g[0].startswith(k) for k in keep)]
    return grid


def run_method(models, prompts, label, method, overrides, args, base_config, target_counter):
    config = base_config.replace(**overrides)
    reward_fn = models.proxy_reward if method in ("bon", "spec-rejection", "soft-bon") else None
    seqs, extras, prompt_ids = [], [], []
    totals = {}
    target_counter.reset()
    proxy_calls0 = models.proxy_reward.calls
    wall = 0.0
    with ZRecorder() as zrec:
        for s in range(0, len(prompts), args.chunk):
            chunk = prompts[s : s + args.chunk]
            t0 = time.perf_counter()
            out = sss_ext.generate(models.target, models.draft, chunk, ref_model=models.ref_draft,
                                   tokenizer=models.tokenizer, method=method,
                                   config=config.replace(seed=config.seed + s), reward_fn=reward_fn)
            wall += time.perf_counter() - t0
            seqs += [x.cpu() for x in out.sequences]
            prompt_ids += [p.cpu() for p in out.prompt_ids]
            extras += out.extras
            for k, v in out.stats.total.to_dict().items():
                if isinstance(v, (int, float)) and v is not None and k not in ("acceptance_rate", "mean_accepted_length",
                                                                                "target_calls_per_token", "tokens_per_second", "wall_time"):
                    totals[k] = totals.get(k, 0) + v
            print(f"  {label}: {s + len(chunk)}/{len(prompts)} prompts, {wall:.0f}s", flush=True)
    totals["wall_time"] = wall
    totals["target_row_calls"] = target_counter.row_calls
    totals["proxy_reward_sequences"] = models.proxy_reward.calls - proxy_calls0
    return {"label": label, "method": method, "config": config.to_dict(), "sequences": seqs, "prompt_ids": prompt_ids,
            "extras": extras, "totals": totals, "mean_abs_z_minus_1": zrec.mean_abs_z_minus_1()}


def summarise(models, prompts, run, args, scale: float = 1.0, sequences=None, label=None, note=""):
    """One table row. ``scale`` multiplies the cost counters (BoN subsets)."""
    seqs = sequences if sequences is not None else run["sequences"]
    tok = models.tokenizer
    texts = [p + tok.decode(y.tolist(), skip_special_tokens=True) for p, y in zip(prompts, seqs)]
    gold = models.gold_reward(texts).double()
    proxy = models.proxy_reward(texts).double()
    models.proxy_reward.calls -= len(texts)  # evaluation calls are not method calls
    models.gold_reward.calls -= len(texts)
    method, cfg = run["method"], run["config"]
    tractable = method in ("vanilla", "sd", "draft", "sss")
    need_tilted = method in ("draft", "sss")
    lam = cfg["shift"]
    m = min(len(seqs), args.ll_prompts) if args.ll_prompts else len(seqs)
    sc = None
    if not args.no_ll:
        sc = sequence_scores(models, run["prompt_ids"][:m], seqs[:m], args.temperature, [lam], need_tilted)
    n = len(prompts)
    tot = run["totals"]
    kl = None
    kl_note = ""
    if sc is not None:
        if method in ("vanilla", "sd"):
            kl, kl_note = 0.0, "exact (samples q)"
        elif method == "draft":
            kl, kl_note = float((sc["log_r"] - sc["log_q"]).mean()), "MC E[log r - log q]"
        elif method == "sss":
            kl, kl_note = float((sc["log_pstar"][lam] - sc["log_q"]).mean()), "MC E[log p* - log q] (token-level tilted)"
        elif method == "bon":
            N = cfg["num_samples"]
            kl, kl_note = math.log(N) - (N - 1) / N, "upper bound log N - (N-1)/N"
    lo, hi = bootstrap_ci(gold, seed=args.seed)
    row = {
        "method": label or run["label"], "kind": method, "prompts": n,
        "gold_mean": float(gold.mean()), "gold_ci95_lo": lo, "gold_ci95_hi": hi,
        "gold_positive_frac": float((gold > 0.5).double().mean()),
        "proxy_mean": float(proxy.mean()),
        "target_loglik_mean": float(sc["log_q"].mean()) if sc is not None else None,
        "target_loglik_per_token": float(sc["log_q"].sum() / sum(len(y) for y in seqs[:m])) if sc is not None else None,
        "loglik_prompts": m if sc is not None else 0,
        "kl_to_target": kl, "kl_note": kl_note if tractable or method == "bon" else "not tractable",
        "target_calls_per_prompt": tot.get("target_calls", 0) * scale / n if method != "bon" else tot.get("target_calls", 0) / n,
        "target_row_calls_per_prompt": tot["target_row_calls"] * scale / n,
        "target_tokens_per_prompt": tot.get("target_tokens", 0) * scale / n,
        "draft_calls_per_prompt": tot.get("draft_calls", 0) * scale / n,
        "draft_tokens_per_prompt": tot.get("draft_tokens", 0) * scale / n,
        "ref_calls_per_prompt": tot.get("ref_calls", 0) * scale / n,
        "reward_calls_per_prompt": tot.get("reward_calls", 0) / n,
        "reward_sequences_per_prompt": tot.get("reward_sequences", 0) * scale / n,
        "wall_s_per_prompt": tot["wall_time"] * scale / n,
        "new_tokens_per_prompt": sum(len(y) for y in seqs) / n,
        "acceptance_rate": (tot["accepted_drafts"] / tot["proposed_drafts"]) if tot.get("proposed_drafts") else None,
        "mean_accepted_per_round": (tot["accepted_drafts"] / tot["rounds"]) if tot.get("rounds") else None,
        "mean_abs_z_minus_1": run["mean_abs_z_minus_1"] if method in ("sss", "sss-paper") else None,
        "note": note,
    }
    samples = [{"prompt": p, "continuation": t[len(p):], "gold": float(g), "proxy": float(x)}
               for p, t, g, x in zip(prompts[:3], texts[:3], gold[:3], proxy[:3])]
    return row, samples


def bon_subsets(models, prompts, run, args):
    """Best-of-N for N = 2, 4, ... < N_max from the first N candidates of the N_max run."""
    nmax = run["config"]["num_samples"]
    rows, samples = [], {}
    n = 2
    while n < nmax:
        chosen = []
        for ex in run["extras"]:
            r = torch.tensor(ex["rewards"][:n])
            chosen.append(ex["candidates"][int(r.argmax())].cpu())
        sub = dict(run, config=dict(run["config"], num_samples=n))
        row, smp = summarise(models, prompts, sub, args, scale=n / nmax, sequences=chosen, label=f"bon N={n}",
                             note=f"first {n} of the N={nmax} candidates; costs scaled by {n}/{nmax}")
        row["reward_sequences_per_prompt"] = n
        rows.append(row)
        samples[row["method"]] = smp
        n *= 2
    return rows, samples


# ----------------------------------------------------------------------------- output
COLUMNS = [
    ("method", "method", "{}"), ("gold_mean", "gold", "{:.3f}"), ("gold_ci", "95% CI", "{}"),
    ("proxy_mean", "proxy", "{:.3f}"), ("kl_to_target", "KL to q", "{:.2f}"),
    ("target_loglik_per_token", "log q/tok", "{:.2f}"),
    ("target_row_calls_per_prompt", "target fwd (rows)", "{:.1f}"),
    ("target_calls_per_prompt", "target calls (batched)", "{:.1f}"),
    ("target_tokens_per_prompt", "target tokens", "{:.0f}"),
    ("draft_calls_per_prompt", "draft calls", "{:.1f}"), ("ref_calls_per_prompt", "ref calls", "{:.1f}"),
    ("reward_sequences_per_prompt", "reward seqs", "{:.1f}"), ("wall_s_per_prompt", "wall s", "{:.2f}"),
    ("acceptance_rate", "accept", "{:.2f}"), ("mean_abs_z_minus_1", "mean abs(Z-1)", "{:.3f}"),
]


def fmt(row, key, spec):
    if key == "gold_ci":
        return f"[{row['gold_ci95_lo']:.3f}, {row['gold_ci95_hi']:.3f}]"
    v = row.get(key)
    if v is None:
        return "–"
    return spec.format(v)


def markdown_table(rows):
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt(r, k, s) for k, _, s in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def pareto(points):
    """Indices of points not dominated (lower cost, higher gold)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(rows, path: Path, xkey: str, xlabel: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    colors = {"vanilla": "black", "draft": "tab:gray", "sd": "tab:brown", "sss": "tab:blue", "sss-paper": "tab:cyan",
              "bon": "tab:red", "spec-rejection": "tab:orange", "soft-bon": "tab:green"}
    markers = {"vanilla": "s", "draft": "v", "sd": "D", "sss": "o", "sss-paper": "P", "bon": "^",
               "spec-rejection": "X", "soft-bon": "*"}
    pts = [(r[xkey], r["gold_mean"]) for r in rows]
    for kind in colors:
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        sel = sorted(sel, key=lambda r: r[xkey])
        xs, ys = [r[xkey] for r in sel], [r["gold_mean"] for r in sel]
        err = [[r["gold_mean"] - r["gold_ci95_lo"] for r in sel], [r["gold_ci95_hi"] - r["gold_mean"] for r in sel]]
        ax.errorbar(xs, ys, yerr=err, fmt=markers[kind] + ("-" if kind == "bon" else ""), color=colors[kind],
                    label=kind, capsize=2, alpha=0.85, markersize=7)
        for r in sel:
            short = r["method"].replace(kind, "").strip()
            if short:
                ax.annotate(short, (r[xkey], r["gold_mean"]), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
    front = pareto(pts)
    fx = [pts[i][0] for i in front]
    fy = [pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="purple", alpha=0.4, lw=2, label="Pareto front")
    ax.set_xscale("symlog", linthresh=1.0)  # the draft alone runs the target 0 times
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean gold reward (P(positive), MiniLM head)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=240, help="evaluation prompts (the eval split has 240)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=40, help="prompts per generate() call (CPU decoding is memory-bound: bigger is cheaper per token)")
    ap.add_argument("--bon-max", type=int, default=16)
    ap.add_argument("--spec-rejection-n", type=int, default=16)
    ap.add_argument("--soft-bon-n", type=int, default=8)
    ap.add_argument("--soft-bon-beta", type=float, default=10.0, help="weight of the proxy reward (VADER, in [-1, 1])")
    ap.add_argument("--k0", type=int, default=2, help="K of sd, sss-paper and the lambda sweep")
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sss_ext.models import load_default, load_prompts

    if args.report_only:
        state = json.loads(Path(str(args.out) + "_state.json").read_text())
        st = state["settings"]
        from sss_ext.models.manifest import read_manifest

        meta = dict(st, top_k=0, top_p=1.0, ignore_eos=True, proxy_reward="proxy-vader", gold_reward="gold-minilm-logistic",
                    machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                    models={k: read_manifest().get(k, {}).get(m) for k, m in
                            (("draft", "heldout_acceptance_T1"), ("dpo", "heldout_proxy_gain"), ("rewards", "heldout_auc_gold"))},
                    methods_measured=state.get("done", []))
        write_outputs(sort_rows(state["rows"]), state.get("samples", {}), meta, args.out, args.no_plots)
        return

    t0 = time.time()
    target_only = {"vanilla", "bon", "spec-rejection"}
    models = load_default(aligned=not all(m in target_only for _, m, _ in method_grid(args)))
    print(f"models loaded in {time.time() - t0:.1f}s", flush=True)
    prompts = load_prompts("eval", args.prompts)
    base = sss_ext.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=1.0,
                                  seed=args.seed, ignore_eos=True)
    counter = RowCounter(models.target)
    rows, samples = [], {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(str(args.out) + "_state.json")
    settings = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "seed": args.seed, "chunk": args.chunk, "ll_prompts": args.ll_prompts, "no_ll": args.no_ll}
    done_labels = set()
    if args.resume and partial.exists():
        old = json.loads(partial.read_text())
        if old.get("settings") == settings:
            rows, samples = old["rows"], old.get("samples", {})
            done_labels = set(old.get("done", []))
            print(f"resuming: {sorted(done_labels)} already measured", flush=True)
    for label, method, overrides in method_grid(args):
        if label in done_labels:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)
        run = run_method(models, prompts, label, method, overrides, args, base, counter)
        row, smp = summarise(models, prompts, run, args)
        rows.append(row)
        samples[row["method"]] = smp
        if method == "bon":
            sub_rows, sub_samples = bon_subsets(models, prompts, run, args)
            rows.extend(sub_rows)
            samples.update(sub_samples)
        print(f"  -> gold {row['gold_mean']:.3f} [{row['gold_ci95_lo']:.3f}, {row['gold_ci95_hi']:.3f}] "
              f"target fwd rows/prompt {row['target_row_calls_per_prompt']:.1f} wall/prompt {row['wall_s_per_prompt']:.2f}s", flush=True)
        done_labels.add(label)
        partial.write_text(json.dumps({"settings": settings, "rows": rows, "samples": samples, "done": sorted(done_labels)}, indent=1))
    counter.close()
    rows = sort_rows(rows)
    meta = {
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": 0, "top_p": 1.0, "seed": args.seed, "ignore_eos": True, "chunk": args.chunk,
        "proxy_reward": models.proxy_reward.name, "gold_reward": models.gold_reward.name,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "load_avg_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "total_wall_s": time.time() - t0, "argv": sys.argv[1:],
        "models": {k: models.manifest.get(k, {}).get(m) for k, m in
                   (("draft", "heldout_acceptance_T1"), ("dpo", "heldout_proxy_gain"), ("rewards", "heldout_auc_gold"))},
    }
    write_outputs(rows, samples, meta, args.out, args.no_plots)
    print(f"total {time.time() - t0:.0f}s")


def sort_rows(rows):
    order = ["vanilla", "draft", "sd", "sss", "sss-paper", "bon", "spec-rejection", "soft-bon"]
    return sorted(rows, key=lambda r: (order.index(r["kind"]), r["target_row_calls_per_prompt"], r["method"]))


def write_outputs(rows, samples, meta, out, no_plots=False):
    n, length, temp = meta["prompts"], meta["max_new_tokens"], meta["temperature"]
    (Path(str(out) + ".json")).write_text(json.dumps({"meta": meta, "rows": rows, "samples": samples}, indent=1))
    with open(str(out) + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    md = [f"# Alignment benchmark ({n} eval prompts, {length} new tokens, T={temp})", "",
          "Costs are per prompt. `target fwd (rows)`: target forward passes counted per sequence (a batched call over "
          "N rows counts N); `target calls (batched)`: as `sss_ext.generate` counts them (one batched call = 1). "
          "Gold = MiniLM + logistic head P(positive) (never seen by any sampler); proxy = VADER compound. "
          f"Machine: {meta['machine']} (shared; wall times are noisy).", "", markdown_table(rows), ""]
    (Path(str(out) + ".md")).write_text("\n".join(md))
    if not no_plots:
        plot(rows, Path(str(out) + "_calls.png"), "target_row_calls_per_prompt",
             "target forward passes per prompt (per sequence row, symlog scale)",
             f"Gold reward vs target compute ({n} prompts, {length} tokens, T={temp})")
        plot(rows, Path(str(out) + "_wall.png"), "wall_s_per_prompt", "wall time per prompt, s (2 shared CPU cores, symlog scale)",
             f"Gold reward vs wall time ({n} prompts, {length} tokens, T={temp})")
    print(markdown_table(rows))
    print(f"wrote {out}.json/.csv/.md and plots")


if __name__ == "__main__":
    main()
