"""Run one method of the grid over the prompts and summarise it into one table row."""

from __future__ import annotations

import math
import time

import torch

import sss_ext
from sss_ext.decoding.methods import get_method
from sss_ext.decoding.sir import resample, weight_summaries
from sss_ext.uniforms import draw_uniforms

from sss_ext.distributed import DistributedSession, shard_indices

from .instruments import AlignmentObserver
from .statistics import bootstrap_ci, sequence_scores


def run_method(models, prompts, label, method, overrides, args, base_config, session=None):
    """Generate for every prompt, ``args.chunk`` prompts per ``generate`` call; costs summed over the calls.

    Under torchrun (``session`` with several ranks) each rank runs the prompts of
    :func:`sss_ext.distributed.shard_indices` and rank 0 receives every rank's outputs
    (in prompt order) and summed costs; ``wall_time`` is then the sum over ranks (rank-seconds).
    Prompt ``i`` draws from ``(seed, i)``, so its output does not depend on the split.
    """
    session = session if session is not None else DistributedSession()
    config = base_config.replace(**overrides)
    reward_fn = models.proxy_reward if get_method(method).needs_reward else None
    mine = shard_indices(len(prompts), session.rank, session.world_size)
    seqs, extras, prompt_ids = [], [], []
    totals = {}
    observer = AlignmentObserver()
    proxy_calls0 = models.proxy_reward.calls
    wall = 0.0
    for s in range(0, len(mine), args.chunk):
        indices = mine[s : s + args.chunk]
        t0 = time.perf_counter()
        out = sss_ext.generate(models.target, models.draft, [prompts[i] for i in indices], ref_model=models.ref_draft,
                               tokenizer=models.tokenizer, method=method, config=config, reward_fn=reward_fn,
                               observer=observer, prompt_indices=indices)
        wall += time.perf_counter() - t0
        seqs += [x.cpu() for x in out.sequences]
        prompt_ids += [p.cpu() for p in out.prompt_ids]
        extras += out.extras
        for k, v in out.stats.total.to_dict().items():
            if isinstance(v, (int, float)) and v is not None and k not in ("acceptance_rate", "mean_accepted_length",
                                                                            "target_calls_per_token", "tokens_per_second", "wall_time"):
                totals[k] = totals.get(k, 0) + v
        rank = f"rank {session.rank}: " if session.world_size > 1 else ""
        print(f"  {label}: {rank}{s + len(indices)}/{len(mine)} prompts, {wall:.0f}s", flush=True)
    totals["wall_time"] = wall
    totals["target_row_calls"] = observer.target_row_calls
    totals["proxy_reward_sequences"] = models.proxy_reward.calls - proxy_calls0
    parts = session.all_gather((mine, seqs, prompt_ids, extras, totals, observer.log_z))
    by_index = {}
    for indices, part_seqs, part_ids, part_extras, _, _ in parts:
        by_index.update(zip(indices, zip(part_seqs, part_ids, part_extras)))
    seqs, prompt_ids, extras = (list(column) for column in zip(*(by_index[i] for i in range(len(prompts)))))
    totals = {}
    for part in parts:
        for k, v in part[4].items():
            totals[k] = totals.get(k, 0) + v
    observer.log_z = [log_z for part in parts for log_z in part[5]]
    return {"label": label, "method": method, "config": config.to_dict(), "sequences": seqs, "prompt_ids": prompt_ids,
            "extras": extras, "totals": totals, "mean_abs_z_minus_1": observer.mean_abs_z_minus_1()}


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
    # a subset of N candidates runs as rows of the same batched calls: those counts do not scale with N
    batched_scale = 1.0 if method in ("bon", "sss-sir") else scale
    row = {
        "method": label or run["label"], "kind": method, "prompts": n,
        "gold_mean": float(gold.mean()), "gold_ci95_lo": lo, "gold_ci95_hi": hi,
        "gold_positive_frac": float((gold > 0.5).double().mean()),
        "proxy_mean": float(proxy.mean()),
        "target_loglik_mean": float(sc["log_q"].mean()) if sc is not None else None,
        "target_loglik_per_token": float(sc["log_q"].sum() / sum(len(y) for y in seqs[:m])) if sc is not None else None,
        "loglik_prompts": m if sc is not None else 0,
        "kl_to_target": kl, "kl_note": kl_note if tractable or method == "bon" else "not tractable",
        "target_calls_per_prompt": tot.get("target_calls", 0) * batched_scale / n,
        "target_row_calls_per_prompt": tot["target_row_calls"] * scale / n,
        "target_tokens_per_prompt": tot.get("target_tokens", 0) * scale / n,
        "draft_calls_per_prompt": tot.get("draft_calls", 0) * batched_scale / n,
        "draft_tokens_per_prompt": tot.get("draft_tokens", 0) * scale / n,
        "ref_calls_per_prompt": tot.get("ref_calls", 0) * batched_scale / n,
        "reward_calls_per_prompt": tot.get("reward_calls", 0) / n,
        "reward_sequences_per_prompt": tot.get("reward_sequences", 0) * scale / n,
        "wall_s_per_prompt": tot["wall_time"] * scale / n,
        "new_tokens_per_prompt": sum(len(y) for y in seqs) / n,
        "acceptance_rate": (tot["accepted_drafts"] / tot["proposed_drafts"]) if tot.get("proposed_drafts") else None,
        "mean_accepted_per_round": (tot["accepted_drafts"] / tot["rounds"]) if tot.get("rounds") else None,
        "mean_abs_z_minus_1": run["mean_abs_z_minus_1"] if method in ("sss", "sss-paper", "sss-sir") else None,
        "mean_ess": _mean_ess(run),
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


def _mean_ess(run):
    """Mean effective sample size of the prompts' weights (sss-sir; a subset row brings its own in ``run["ess"]``)."""
    if run["method"] != "sss-sir":
        return None
    ess = run.get("ess") or [ex["effective_sample_size"] for ex in run["extras"]]
    return float(sum(ess) / len(ess))


def sir_subsets(models, prompts, run, args):
    """sss-sir for N = 2, 4, ... < N_max: resample among the first N of the N_max candidates by their weights."""
    nmax = run["config"]["num_candidates"]
    generator = torch.Generator().manual_seed(args.seed)
    rows, samples = [], {}
    n = 2
    while n < nmax:
        log_weights = torch.tensor([ex["log_weights"][:n] for ex in run["extras"]], dtype=torch.float64)  # (P, n)
        chosen = resample(log_weights, draw_uniforms((len(prompts),), "cpu", generator)).tolist()
        sequences = [ex["candidates"][pick].cpu() for ex, pick in zip(run["extras"], chosen)]
        ess = weight_summaries(log_weights)[0].tolist()
        label = run["label"].replace(f"N={nmax}", f"N={n}")
        sub = dict(run, config=dict(run["config"], num_candidates=n), ess=ess)
        row, smp = summarise(models, prompts, sub, args, scale=n / nmax, sequences=sequences, label=label,
                             note=f"first {n} of the N={nmax} candidates, resampled; costs scaled by {n}/{nmax}")
        rows.append(row)
        samples[row["method"]] = smp
        n *= 2
    return rows, samples
