"""Statistics of the alignment benchmark: bootstrap intervals, sequence log-likelihoods, the Pareto front."""

from __future__ import annotations

import math

import torch

from sss_ext.models.compare import bootstrap_mean_ci


def bootstrap_ci(values: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """(low, high) percentile-bootstrap interval of the mean (the demo's :func:`bootstrap_mean_ci`)."""
    return bootstrap_mean_ci(values, level=level, num_resamples=n_boot, seed=seed)[1:]


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


def pareto(points):
    """Indices of points not dominated (lower cost, higher gold)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
