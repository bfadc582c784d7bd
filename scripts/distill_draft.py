"""Distil the reference draft ``d`` (first layers of the target, shared frozen embeddings
and head) on the target's next-token distributions along target-sampled continuations of
the training prompts (``scripts/gen_distill_data.py``).

Loss per continuation position: KL(q || d) over the target's top-k tokens plus one bucket
for the remaining mass (exact KL of the coarsened distributions; top-64 holds almost all
of q's mass). Every ``--eval-every`` steps the acceptance rate ``sum_v min(q, d)`` is
measured with the *full* target distribution on held-out sequences (the last
``--val-seqs`` sequences of the last data file; no continuation of their
prompts is trained on), at temperature 1 and at the benchmark's
temperature; the best checkpoint is written to sss_ext/models/weights/draft_layers.safetensors
(bf16) and MANIFEST.json at once, so the job can be stopped at any time.

    nice -n 19 python scripts/distill_draft.py --max-cpu-minutes 60
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from sss_ext.models.draft import DRAFT_FILE, build_draft, load_draft, save_draft
from sss_ext.models.manifest import update_manifest
from sss_ext.models.paths import WEIGHTS_DIR, cache_dir
from sss_ext.models.target import load_target

from gen_distill_data import load_distill_data  # scripts/ is on sys.path when run as a script


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cont_logits(model, input_ids, mask, new_tokens):
    """Logits of the ``new_tokens`` continuation tokens (positions -new_tokens-1 .. -2)."""
    out = model.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    hidden = out.last_hidden_state[:, -new_tokens - 1 : -1]
    return model.lm_head(hidden).float()


def distill_loss(d_logits, topk_idx, topk_logp, rest_logp):
    """Mean over positions of KL(q_coarse || d_coarse), buckets = q's top-k tokens + the rest."""
    d_logp = torch.log_softmax(d_logits, dim=-1)
    d_top = d_logp.gather(-1, topk_idx.long())
    d_rest = torch.log1p(-d_top.exp().sum(-1).clamp(max=1 - 1e-6))
    q_top = topk_logp.float()
    kl = (q_top.exp() * (q_top - d_top)).sum(-1) + rest_logp.exp() * (rest_logp - d_rest)
    return kl.mean()


@torch.no_grad()
def acceptance(q_logits, d_logits, temperature: float) -> float:
    q = torch.softmax(q_logits / temperature, -1)
    d = torch.softmax(d_logits / temperature, -1)
    return float(torch.minimum(q, d).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, nargs="+", default=[cache_dir() / "distill" / "target_T0.8_n32_s0.pt"],
                    help="files of scripts/gen_distill_data.py; the last --val-seqs sequences of the last one are held out")
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--max-cpu-minutes", type=float, default=60.0,
                    help="budget in process CPU time (all threads; unaffected by pauses or other jobs)")
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--val-seqs", type=int, default=24)
    ap.add_argument("--bench-temperature", type=float, default=0.7)
    ap.add_argument("--resume", action="store_true", help="start from the shipped draft")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / DRAFT_FILE)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_cpu, t_wall = time.process_time(), time.time()
    layer_ids = tuple(int(x) for x in args.layers.split(","))
    target, _ = load_target()
    draft = load_draft(target, args.out) if args.resume else build_draft(target, layer_ids)
    data = load_distill_data(args.data)
    n_new = data["new_tokens"]
    n = data["input_ids"].shape[0]
    val = slice(n - args.val_seqs, n)
    # held out by prompt: no continuation of a validation prompt (from any data file) is trained on
    train_rows = torch.nonzero(~torch.isin(data["prompt_index"], data["prompt_index"][val])).squeeze(1)
    train_n = len(train_rows)
    # full target logits on the held-out sequences (once)
    vi, vm = data["input_ids"][val], data["attention_mask"][val]
    with torch.no_grad():
        q_val = torch.cat([cont_logits(target, vi[i : i + 8], vm[i : i + 8], n_new) for i in range(0, args.val_seqs, 8)])

    def evaluate():
        draft.eval()
        with torch.no_grad():
            d_val = torch.cat([cont_logits(draft, vi[i : i + 8], vm[i : i + 8], n_new) for i in range(0, args.val_seqs, 8)])
        draft.train()
        return acceptance(q_val, d_val, 1.0), acceptance(q_val, d_val, args.bench_temperature)

    params = [p for p in draft.parameters() if p.requires_grad]
    print(f"train seqs={train_n} val seqs={args.val_seqs} trainable params={sum(p.numel() for p in params)/1e6:.2f}M", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    acc1, acct = evaluate()
    history = [{"step": 0, "acc_T1": acc1, f"acc_T{args.bench_temperature}": acct, "wall_s": round(time.time() - t_wall)}]
    print(history[-1], flush=True)
    init = {"acc_T1": acc1, "acc_bench_T": acct}
    best = -1.0
    g = torch.Generator().manual_seed(args.seed)
    step, seen_tokens = 0, 0
    draft.train()
    deadline = t_cpu + 60 * args.max_cpu_minutes
    warmup = 20
    while step < args.max_steps and time.process_time() < deadline:
        perm = torch.randperm(train_n, generator=g)
        for start in range(0, train_n - args.batch_size + 1, args.batch_size):
            idx = train_rows[perm[start : start + args.batch_size]]
            lr = args.lr * min(1.0, (step + 1) / warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            d_logits = cont_logits(draft, data["input_ids"][idx], data["attention_mask"][idx], n_new)
            loss = distill_loss(d_logits, data["topk_idx"][idx], data["topk_logp"][idx], data["rest_logp"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            seen_tokens += idx.numel() * n_new
            if step % 5 == 0:
                print(f"step {step} loss {loss.item():.4f} wall={time.time() - t_wall:.0f}s", flush=True)
            if step % args.eval_every == 0 or time.process_time() >= deadline or step >= args.max_steps:
                acc1, acct = evaluate()
                history.append({"step": step, "loss": round(loss.item(), 4), "acc_T1": acc1,
                                f"acc_T{args.bench_temperature}": acct, "wall_s": round(time.time() - t_wall)})
                print(history[-1], flush=True)
                if acc1 > best:
                    best = acc1
                    save_draft(draft, args.out, metadata={"layer_ids": ",".join(map(str, layer_ids)), "step": step})
                    update_manifest("draft", {
                        "script": "scripts/distill_draft.py", "args": {k: str(v) for k, v in vars(args).items()},
                        "data": [path.name for path in args.data], "data_meta": [{k: str(v) for k, v in meta.items()} for meta in data["meta"]],
                        "layer_ids": list(layer_ids), "step": step, "tokens_seen": seen_tokens,
                        "heldout_acceptance_T1": acc1, f"heldout_acceptance_T{args.bench_temperature}": acct,
                        "undistilled_acceptance_T1": init["acc_T1"],
                        f"undistilled_acceptance_T{args.bench_temperature}": init["acc_bench_T"],
                        "cpu_seconds": round(time.process_time() - t_cpu, 1), "wall_seconds": round(time.time() - t_wall, 1),
                        "history": history,
                    })
            if time.process_time() >= deadline or step >= args.max_steps:
                break
    print(f"done step={step} best acc_T1={best:.4f} cpu={time.process_time() - t_cpu:.0f}s wall={time.time() - t_wall:.0f}s")


if __name__ == "__main__":
    main()
