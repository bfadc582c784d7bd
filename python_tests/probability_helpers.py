"""A float64 oracle of speculative sampling in probability space, and random probability inputs.

The oracle follows docs/algorithm.md §3 on probabilities (rows renormalised): accept draft
``x_i`` iff ``target_i(x_i) > 0``, ``draft_i(x_i) > 0`` and ``u_i < target_i(x_i) / draft_i(x_i)``;
correction from ``relu(target_n - draft_n)`` (``target_n`` if that is zero), bonus from
``target_K``, both by inverse CDF with ``u_K``. It also reports how close each decision came
to its boundary, so that a comparison with the op can skip rows that float32 logarithms may
round the other way.
"""

from __future__ import annotations

import torch

from sss_ext.reference import inverse_cdf


def random_probs(shape, generator, zero_fraction=0.0, dtype=torch.float32, power=3.0):
    """Random rows that sum to 1, with about ``zero_fraction`` of the entries 0 (never a whole row).

    Shape
    -----
    shape: (..., V) -> (..., V) of ``dtype``
    """
    weights = torch.rand(shape, generator=generator, dtype=torch.float64) ** power
    if zero_fraction > 0:
        zeros = torch.rand(shape, generator=generator, dtype=torch.float64) < zero_fraction
        zeros[..., 0] &= zeros[..., 1:].all(dim=-1) == False  # noqa: E712  (keep one entry per row)
        weights = weights.masked_fill(zeros, 0.0)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(dtype)


def draw_from(probs, generator):
    """One token per row of ``probs`` (float64 inverse CDF of torch uniforms). Shape: (..., V) -> (...) int64."""
    flat = probs.reshape(-1, probs.shape[-1]).double()
    u = torch.rand(flat.shape[0], generator=generator, dtype=torch.float64).clamp_min(1e-300)
    return inverse_cdf(flat, u).reshape(probs.shape[:-1])


def cdf_margin(weights, uniforms):
    """Distance of ``u * total`` to the nearest cumulative boundary, relative to the total.

    Shape
    -----
    weights: (B, V) float64; uniforms: (B,) -> (B,)
    """
    cumulative = torch.cumsum(weights, dim=-1)
    total = cumulative[:, -1:]
    return ((cumulative - uniforms[:, None] * total).abs() / total).amin(dim=-1)


def probability_verify(target_probs, draft_probs, draft_ids, uniforms):
    """Tokens (B, K+1) int64 padded with -1, num_accepted (B,), and each row's smallest relative
    margin to a decision boundary (B,).

    Shape
    -----
    target_probs: (B, K+1, V); draft_probs: (B, K, V) or (B, K+1, V); draft_ids: (B, K); uniforms: (B, K+1)
    """
    q = target_probs.double() / target_probs.double().sum(-1, keepdim=True)
    batch, num_draft_tokens = draft_ids.shape
    r = draft_probs.double()[:, :num_draft_tokens]
    r = r / r.sum(-1, keepdim=True)
    ids = draft_ids.long()
    q_x = q[:, :num_draft_tokens].gather(-1, ids[..., None]).squeeze(-1)
    r_x = r.gather(-1, ids[..., None]).squeeze(-1)
    ratio = torch.where(r_x > 0, q_x / r_x, 0.0)
    coins = uniforms[:, :num_draft_tokens]
    accept = (q_x > 0) & (r_x > 0) & (coins < ratio)
    num_accepted = torch.cumprod(accept.long(), dim=-1).sum(-1) if num_draft_tokens else torch.zeros(batch, dtype=torch.long)
    rows = torch.arange(batch)
    weights = q[rows, num_accepted]
    if num_draft_tokens:
        residual = (q[rows, num_accepted.clamp(max=num_draft_tokens - 1)] - r[rows, num_accepted.clamp(max=num_draft_tokens - 1)]).clamp_min(0)
        use_residual = (num_accepted < num_draft_tokens) & (residual.sum(-1) > 0)
        weights = torch.where(use_residual[:, None], residual, weights)
    last = inverse_cdf(weights, uniforms[:, num_draft_tokens])
    tokens = torch.full((batch, num_draft_tokens + 1), -1, dtype=torch.long)
    for b in range(batch):
        n = int(num_accepted[b])
        tokens[b, :n] = ids[b, :n]
        tokens[b, n] = last[b]
    # Margins: every coin that was read (up to and including the first rejection), and the draw.
    read = torch.arange(num_draft_tokens)[None, :] <= num_accepted[:, None]
    coin_margin = torch.where(read & (r_x > 0) & (q_x > 0), (coins - ratio).abs() / ratio.clamp_min(1e-300), float("inf"))
    margin = cdf_margin(weights, uniforms[:, num_draft_tokens])
    if num_draft_tokens:
        margin = torch.minimum(margin, coin_margin.amin(dim=-1))
    return tokens, num_accepted, margin
