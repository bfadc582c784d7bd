"""Align the reference draft ``d`` into ``r`` with DPO on proxy-labelled preference pairs.

1. Sample ``--samples`` continuations per training prompt from ``d`` (temperature 1, the
   policy DPO assumes), score prompt+continuation with the *proxy* reward (VADER), and pair
   the best with the worst sample of each prompt (ties dropped).
2. Train a LoRA adapter (peft) on the draft's decoder layers with the DPO loss
   ``-log sigmoid(beta * [(log r(y_w) - log d(y_w)) - (log r(y_l) - log d(y_l))])``
   (``sss_ext.models.dpo.dpo_loss``; reference log-probs computed once with ``d``).
3. Measure proxy reward of ``d`` and ``r`` on held-out training prompts (never paired),
   same seeds, and write weights/dpo_adapter/ + the "dpo" section of MANIFEST.json.

The gold reward is never loaded here.

    nice -n 19 python scripts/dpo_draft.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from sss_ext.models.dpo import dpo_loss, sequence_logps
from sss_ext.models.draft import ADAPTER_DIR, apply_adapter, load_draft
from sss_ext.models.manifest import portable_path, update_manifest
from sss_ext.models.paths import PROMPTS_DIR, WEIGHTS_DIR
from sss_ext.models.rewards import load_proxy_reward
from sss_ext.models.target import EOS_TOKEN_ID, load_target


@torch.no_grad()
def sample(model, tok, prompts, n, max_new, temperature, batch_size, seed):
    """(sequences (N*n, L) left-padded, attention masks, prompt width per batch, texts)."""
    rows = []
    torch.manual_seed(seed)
    expanded = [p for p in prompts for _ in range(n)]
    for s in range(0, len(expanded), batch_size):
        batch = expanded[s : s + batch_size]
        enc = tok(batch, return_tensors="pt", padding=True)
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=EOS_TOKEN_ID)
        width = enc["input_ids"].shape[1]
        for i in range(len(batch)):
            m = enc["attention_mask"][i]
            prompt_ids = enc["input_ids"][i][m.bool()]
            cont = out[i, width:]
            rows.append({"prompt": batch[i], "prompt_ids": prompt_ids, "cont_ids": cont,
                         "text": batch[i] + tok.decode(cont, skip_special_tokens=True)})
    return rows


def collate(rows, key_prompt="prompt_ids", key_cont="cont_ids"):
    """Left-pad prompt+continuation; all continuations have the same length."""
    seqs = [torch.cat([r[key_prompt], r[key_cont]]) for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), EOS_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return ids, mask, len(rows[0][key_cont])


@torch.no_grad()
def tilt_diagnostics(target, ref, aligned, tok, prompts, args, aligned_samples) -> dict:
    """How far DPO moved ``r`` from ``d``, in the quantities SSS depends on (held-out prompts).

    On continuations sampled from the target at ``--eval-temperature``: the normaliser
    ``Z = sum_v q r / d`` of the tilted target (lambda = 1; SSS is exact whatever ``Z``, but
    ``Z`` far from 1 means the tilt is dominated by tokens where ``r / d`` is extreme), and
    the acceptance rates ``sum_v min(q, d)``, ``sum_v min(q, r)`` (speculative sampling with
    ``r``) and ``sum_v min(r, p*)`` (SSS), all with temperature-warped distributions. On
    ``r``'s own held-out samples: the Monte Carlo ``KL(r || d)`` per token.
    """
    temperature = args.eval_temperature
    target_samples = sample(target, tok, prompts, 1, args.max_new_tokens, temperature, 64, args.seed + 2)
    ids, mask, n_new = collate(target_samples)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def logp(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=n_new + 1).logits[:, :-1]
        return torch.log_softmax(logits.double() / temperature, -1)

    lq, lr, ld = logp(target), logp(aligned), logp(ref)
    log_z = torch.logsumexp(lq + lr - ld, -1)
    p_star = (lq + lr - ld - log_z[..., None]).exp()
    ids_r, mask_r, n_r = collate(aligned_samples)
    kl_r_d = (sequence_logps(aligned, ids_r, mask_r, n_r) - sequence_logps(ref, ids_r, mask_r, n_r)) / n_r
    return {
        "tilt_eval_temperature": temperature,
        "tilt_mean_abs_z_minus_1": float((log_z.exp() - 1).abs().mean()),
        "tilt_median_z": float(log_z.exp().median()),
        "acceptance_d_vs_q": float(torch.minimum(lq.exp(), ld.exp()).sum(-1).mean()),
        "acceptance_r_vs_q": float(torch.minimum(lq.exp(), lr.exp()).sum(-1).mean()),
        "acceptance_sss_lambda1": float(torch.minimum(lr.exp(), p_star).sum(-1).mean()),
        "kl_r_to_d_per_token_T1": float(kl_r_d.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=3, help="samples per prompt for the pairs")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--train-prompts", type=int, default=200)
    ap.add_argument("--heldout-prompts", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--eval-temperature", type=float, default=0.7, help="temperature of the Z / acceptance diagnostics")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / ADAPTER_DIR)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_cpu, t_wall = time.process_time(), time.time()
    from peft import LoraConfig, get_peft_model

    target, tok = load_target()
    tok.padding_side = "left"
    ref = load_draft(target)
    proxy = load_proxy_reward()
    rows = [json.loads(line)["prompt"] for line in open(PROMPTS_DIR / "train.jsonl")]
    train_prompts = rows[: args.train_prompts]
    held_prompts = rows[len(rows) - args.heldout_prompts :]
    assert not set(train_prompts) & set(held_prompts)

    samples = sample(ref, tok, train_prompts, args.samples, args.max_new_tokens, 1.0, 200, args.seed)
    rewards = proxy([r["text"] for r in samples])
    pairs = []
    for i in range(0, len(samples), args.samples):
        group = rewards[i : i + args.samples]
        hi, lo = int(group.argmax()), int(group.argmin())
        if group[hi] > group[lo]:
            pairs.append((samples[i + hi], samples[i + lo], float(group[hi] - group[lo])))
    print(f"sampled {len(samples)} from d, {len(pairs)} pairs, mean proxy(d)={rewards.mean():.3f} "
          f"wall={time.time() - t_wall:.0f}s", flush=True)

    # reference log-probs (d) once
    def logps(model, rows_):
        ids, mask, n_new = collate(rows_)
        return sequence_logps(model, ids, mask, n_new)

    with torch.no_grad():
        ref_w = torch.cat([logps(ref, [p[0] for p in pairs[s : s + 32]]) for s in range(0, len(pairs), 32)])
        ref_l = torch.cat([logps(ref, [p[1] for p in pairs[s : s + 32]]) for s in range(0, len(pairs), 32)])

    policy = load_draft(target)
    for name, p in policy.named_parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    policy = get_peft_model(policy, lora)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    history = []
    policy.train()
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(pairs), generator=g).tolist()
        for s in range(0, len(perm), args.batch_size):
            idx = perm[s : s + args.batch_size]
            pw = logps(policy, [pairs[i][0] for i in idx])
            pl = logps(policy, [pairs[i][1] for i in idx])
            loss, margin = dpo_loss(pw, pl, ref_w[idx], ref_l[idx], args.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 5 == 0:
                history.append({"epoch": epoch, "step": step, "loss": round(loss.item(), 4),
                                "reward_accuracy": round(float((margin > 0).float().mean()), 3)})
                print(history[-1], f"wall={time.time() - t_wall:.0f}s", flush=True)

    if args.out.exists():
        shutil.rmtree(args.out)
    policy.save_pretrained(str(args.out))
    (args.out / "README.md").unlink(missing_ok=True)  # peft's generated model card
    config_file = args.out / "adapter_config.json"  # the base model's folder, recorded portably
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = portable_path(config.get("base_model_name_or_path") or "")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    train_cpu = time.process_time() - t_cpu

    # held-out proxy reward: d vs r, same seed for both
    aligned = apply_adapter(ref, args.out)
    res = {}
    for name, model in (("ref_d", ref), ("aligned_r", aligned)):
        outs = sample(model, tok, held_prompts, args.eval_samples, args.max_new_tokens, 1.0, 128, args.seed + 1)
        res[name] = proxy([r["text"] for r in outs])
    closeness = tilt_diagnostics(target, ref, aligned, tok, held_prompts, args, outs)
    print(closeness, flush=True)
    diff = res["aligned_r"] - res["ref_d"]
    boot = torch.stack([diff[torch.randint(len(diff), (len(diff),), generator=g)].mean() for _ in range(1000)])
    metrics = {
        "pairs": len(pairs), "samples_from_d": len(samples), "train_proxy_mean_d_samples": float(rewards.mean()),
        "heldout_prompts": len(held_prompts), "heldout_samples_per_prompt": args.eval_samples,
        "heldout_proxy_ref_d": float(res["ref_d"].mean()), "heldout_proxy_aligned_r": float(res["aligned_r"].mean()),
        "heldout_proxy_gain": float(diff.mean()),
        "heldout_proxy_gain_ci95": [float(boot.quantile(0.025)), float(boot.quantile(0.975))],
        "heldout_positive_frac_ref_d": float((res["ref_d"] > 0.05).float().mean()),
        "heldout_positive_frac_aligned_r": float((res["aligned_r"] > 0.05).float().mean()),
        **closeness,
    }
    entry = {
        "script": "scripts/dpo_draft.py", "args": {k: str(v) for k, v in vars(args).items()},
        "loss": "sss_ext.models.dpo.dpo_loss (sigmoid DPO)", "train_cpu_seconds": round(train_cpu, 1),
        "cpu_seconds": round(time.process_time() - t_cpu, 1), "wall_seconds": round(time.time() - t_wall, 1),
        "history": history, **metrics,
    }
    if args.out.resolve() == (WEIGHTS_DIR / ADAPTER_DIR).resolve():
        update_manifest("dpo", entry)  # the shipped adapter
    else:  # an exploratory run: its record stays beside its adapter
        (args.out / "metrics.json").write_text(json.dumps(entry, indent=1))
    print(metrics)
    print(f"cpu={time.process_time() - t_cpu:.0f}s wall={time.time() - t_wall:.0f}s")


if __name__ == "__main__":
    main()
