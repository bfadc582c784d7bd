"""Fit the gold reward head and measure gold and proxy on held-out human-rated snippets.

Data: VADER ICWSM-2014 ground truth (shared/data/vader_icwsm2014, MIT; read in place, never
copied into the repository): movie-review and Amazon product-review snippets, label =
mean human rating > 0. Seeded split per file into fit / held-out. Gold = logistic
regression (L2) on all-MiniLM-L6-v2 embeddings; proxy = VADER compound (no fitting).
Writes sss_ext/models/weights/gold_head.safetensors and the "rewards" section of MANIFEST.json.

    nice -n 19 python scripts/fit_rewards.py
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from safetensors.torch import save_file

from sss_ext.models.manifest import update_manifest
from sss_ext.models.paths import WEIGHTS_DIR, vader_data_dir
from sss_ext.models.rewards import GOLD_HEAD_FILE, MiniLMEncoder, VaderReward

FILES = {"movie": "movieReviewSnippets_GroundTruth.txt", "amazon": "amazonReviewSnippets_GroundTruth.txt"}


def read_snippets(name: str):
    rows = []
    for line in open(vader_data_dir() / FILES[name], encoding="utf-8", errors="replace"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        if rating == 0.0:
            continue
        rows.append((parts[2], 1.0 if rating > 0 else 0.0))
    return rows


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC with ties counted as 1/2."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200):
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    x, y = x.double(), y.double()
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-per-file", type=int, default=1000)
    ap.add_argument("--heldout-per-file", type=int, default=400)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_cpu, t_wall = time.process_time(), time.time()
    rng = random.Random(args.seed)
    fit, held = [], []
    for name in FILES:
        rows = read_snippets(name)
        rng.shuffle(rows)
        held += [(t, y, name) for t, y in rows[: args.heldout_per_file]]
        fit += [(t, y, name) for t, y in rows[args.heldout_per_file : args.heldout_per_file + args.fit_per_file]]
    enc = MiniLMEncoder(max_length=64)
    x_fit = enc.encode([t for t, _, _ in fit])
    print(f"embedded {len(fit)} fit snippets wall={time.time() - t_wall:.0f}s", flush=True)
    x_held = enc.encode([t for t, _, _ in held])
    y_fit = torch.tensor([y for _, y, _ in fit])
    y_held = torch.tensor([y for _, y, _ in held])
    w, b = fit_logistic(x_fit, y_fit, args.l2)
    gold_held = (x_held.double() @ w + b).float()
    vader = VaderReward()
    proxy_held = vader([t for t, _, _ in held])
    metrics = {"heldout_n": len(held), "fit_n": len(fit), "heldout_auc_gold": auc(gold_held, y_held),
               "heldout_auc_proxy_vader": auc(proxy_held, y_held)}
    for name in FILES:
        sel = torch.tensor([n == name for _, _, n in held])
        metrics[f"heldout_auc_gold_{name}"] = auc(gold_held[sel], y_held[sel])
        metrics[f"heldout_auc_proxy_vader_{name}"] = auc(proxy_held[sel], y_held[sel])
    metrics["heldout_accuracy_gold"] = float(((gold_held > 0).float() == y_held).float().mean())
    metrics["gold_proxy_spearman_heldout"] = float(
        torch.corrcoef(torch.stack([gold_held.argsort().argsort().float(), proxy_held.argsort().argsort().float()]))[0, 1])
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    save_file({"weight": w.float().contiguous(), "bias": b.float().reshape(())},
              str(WEIGHTS_DIR / GOLD_HEAD_FILE), metadata={"encoder": "all-MiniLM-L6-v2 mean-pool L2-norm"})
    cpu = time.process_time() - t_cpu
    update_manifest("rewards", {
        "script": "scripts/fit_rewards.py", "args": vars(args), "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(time.time() - t_wall, 1),
        "data": "VADER ICWSM-2014 movie + amazon snippets, label = mean rating > 0 (read in place)",
        "gold": "sigmoid(logistic head on all-MiniLM-L6-v2 embedding)", "proxy": "VADER compound", **metrics,
    })
    print(metrics)
    print(f"cpu={cpu:.0f}s wall={time.time() - t_wall:.0f}s")


if __name__ == "__main__":
    main()
