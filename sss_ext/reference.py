"""Pure-PyTorch reference of Reward-Shifted Speculative Sampling, in paper notation.

This is the test oracle: every kernel is checked against it with the same uniforms. It
computes in float64 and follows ``docs/algorithm.md`` §1-§5 line by line.

Notation (per batch row, positions ``i = 0..K``):

* ``zq, zr, zd``: logits of the target ``q``, aligned draft ``r``, reference draft ``d``;
* ``s = zq/tau + lambda * (zr/tau - zd/tau)``: tilted scores, ``p* = warp(softmax(s))``;
* ``r~ = warp(softmax(zr/tau))``: the proposal the draft tokens ``x`` were drawn from;
* accept ``x[i]`` iff ``log u[i] < log p*(x[i]) - log r~(x[i])``; correct from
  ``normalize((p* - r~)+)`` at the first rejection, or draw the bonus from ``p*[K]``;
* one-hot drafts (``draft_logits`` None, a deterministic proposer): ``r~ = 1[v = x]``, so
  ``x`` is accepted with probability ``p*(x)`` and the correction is ``p*`` without ``x``;
  ``zr`` then comes from ``aligned_logits`` and enters only the tilt (docs/algorithm.md §11).

Paper mode replaces ``p*`` by ``m = Z * p*`` in the acceptance ratio and the residual,
``Z = sum_v q (r/d)**lambda``; for ``lambda = 1`` and no truncation that is the published
rule ``min(1, q/d)`` with residual ``(q r / d - r)+``, drawn as the proportional
``(p* - r~ / Z)+`` so that no ``log Z`` overflows.

Block verification (``verification="block"``, docs/algorithm.md §12) keeps ``p*`` and ``r~``
and replaces steps 3-4 by the joint rule of Sun et al.: weights ``p_i``, residual masses
``R_i``, coins against ``h_i``, the longest accepted prefix ``tau`` and the draw from
``(p_tau p*_tau - r~_tau)+``.
"""

from __future__ import annotations

import torch

from .checks import (
    check_logit_values,
    check_num_draft_tokens,
    check_sample_args,
    check_scaled_range,
    check_token_ids,
    check_top_k_ties,
    check_uniforms,
    check_uniforms_meta,
    check_verification,
    check_verify_args,
    MAX_SCALED_SCORE,
    tilt_logits,
)
from .outputs import VerifyOutput
from .uniforms import draw_uniforms
from .warp import warp_log_probs

NEG_INF = float("-inf")
RESIDUAL_TOLERANCE = 1e-9  # kResidualTolerance in csrc/kernels/common.h


def max_and_log_sum(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, log(sum(exp(scores - max))))`` over the last dimension, kept apart.

    Shape
    -----
    scores: (..., V) -> (...), (...)
    """
    top = scores.amax(dim=-1, keepdim=True)
    return top.squeeze(-1), torch.log(torch.exp(scores - top).sum(dim=-1))


def log_normaliser_z(s, zq_t, zr_t, zd_t, shift: float) -> torch.Tensor:
    """``log Z = log sum_v q (r/d)**lambda`` from tempered scores, maxima and log-sums summed apart.

    Shape
    -----
    s, zq_t, zr_t, zd_t: (B, K+1, V) -> (B, K+1)
    """
    (m_s, l_s), (m_q, l_q), (m_r, l_r), (m_d, l_d) = (max_and_log_sum(x) for x in (s, zq_t, zr_t, zd_t))
    return (m_s - m_q - shift * (m_r - m_d)) + (l_s - l_q - shift * (l_r - l_d))


def tilted_scores(zq, zr, zd, inverse_temperature: float, shift: float) -> torch.Tensor:
    """``s = zq/tau + lambda*(zr/tau - zd/tau)``; ``-inf`` wherever a logit entering ``s`` is ``-inf``.

    Division by ``tau`` is a multiplication by ``inverse_temperature = 1/tau`` here and in
    every kernel, so all implementations round identically.

    Shape
    -----
    zq, zr, zd: (B, K+1, V) float64 -> (B, K+1, V)
    """
    zq_t = zq * inverse_temperature
    if zd is None or shift == 0.0:
        return zq_t
    s = zq_t + shift * (zr * inverse_temperature - zd * inverse_temperature)
    masked = torch.isneginf(zq) | torch.isneginf(zr) | torch.isneginf(zd)
    return s.masked_fill(masked, NEG_INF)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """First index whose running mass exceeds ``u * total``; else the last index with mass.

    Shape
    -----
    weights: (B, V) float64 >= 0; uniforms: (B,) -> (B,) int64
    """
    cumulative = torch.cumsum(weights, dim=-1)
    threshold = uniforms * cumulative[:, -1]
    index = torch.searchsorted(cumulative, threshold.unsqueeze(-1), right=True).squeeze(-1)
    vocab_size = weights.shape[-1]
    last_positive = vocab_size - 1 - torch.argmax(torch.flip(weights > 0, dims=[-1]).to(torch.int8), dim=-1)
    return torch.where(index < vocab_size, index, last_positive)


def residual_weight(weighted_target: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
    """``(a - b)+`` with entries within rounding of zero counted as zero (RESIDUAL_TOLERANCE,
    docs/algorithm.md §3): ``a - b`` where it exceeds ``RESIDUAL_TOLERANCE * a``, else 0.

    Shape
    -----
    weighted_target, proposal: (..., V) float64 -> (..., V)
    """
    difference = weighted_target - proposal
    return torch.where(difference > RESIDUAL_TOLERANCE * weighted_target, difference, 0.0)


def block_threshold(mass: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h_i = R_i / (R_i + (1 - p_i))``, 0 where the denominator is 0. Shape: (B,), (B,) -> (B,)."""
    denominator = mass + (1.0 - weight)
    return torch.where(denominator > 0, mass / torch.where(denominator > 0, denominator, 1.0), 0.0)


def _block_verification(log_p_star, log_r_tilde, log_p_x, log_r_x, x, u) -> tuple[torch.Tensor, torch.Tensor]:
    """Block verification (docs/algorithm.md §12) of rows that all verify ``K`` drafts.

    Notation of §12: draft ``x_i`` at position ``i``, ``P_i = p*_i``, ``Q_i = r~_i``;
    ``tau`` (Sun et al.'s name) is §12's ``n``, the accepted prefix length.

    * ``p_0 = 1``, ``p_{i+1} = min(1, p_i P_i(x_i) / Q_i(x_i))`` (in log space; a zero ``P`` or
      ``Q`` at ``x_i`` gives ``p_{i+1} = 0``);
    * ``R_i = sum_v (p_i P_i(v) - Q_i(v))+`` and ``h_i = R_i / (R_i + (1 - p_i))`` for
      ``1 <= i < K`` (0 when the denominator is 0), ``h_K = p_K``;
    * ``tau``: the largest ``i`` in ``1..K`` with ``u[i-1] < h_i``, else 0;
    * emit ``x_0 .. x_{tau-1}``, then ``Y`` from ``P_K`` if ``tau = K``, else from
      ``(p_tau P_tau - Q_tau)+`` (fallback ``P_tau`` when it has no mass), drawn with ``u[K]``.

    Shape
    -----
    log_p_star: (B, K+1, V); log_r_tilde: (B, K, V); log_p_x, log_r_x, x: (B, K); u: (B, K+1)
    -> tokens (B, K+1), num_accepted (B,)
    """
    batch, K = x.shape
    rows = torch.arange(batch, device=x.device)
    log_ratio = torch.where(torch.isfinite(log_p_x) & torch.isfinite(log_r_x), log_p_x - log_r_x, NEG_INF)
    log_weight = [torch.zeros(batch, dtype=torch.float64, device=x.device)]  # log p_i, i = 0..K
    for i in range(K):
        log_weight.append(torch.clamp(log_weight[-1] + log_ratio[:, i], max=0.0))
    weight = torch.exp(torch.stack(log_weight, dim=1))  # (B, K+1)
    p_star = torch.exp(log_p_star)
    r_tilde = torch.exp(log_r_tilde)
    h = weight[:, 1:].clone()  # (B, K): h_1 .. h_K; h_K = p_K
    for i in range(1, K):
        mass = residual_weight(weight[:, i, None] * p_star[:, i], r_tilde[:, i]).sum(dim=-1)
        h[:, i - 1] = block_threshold(mass, weight[:, i])
    index = torch.arange(1, K + 1, device=x.device)
    num_accepted = torch.where(u[:, :K] < h, index, 0).amax(dim=-1) if K > 0 else torch.zeros_like(rows)
    p_tau = p_star[rows, num_accepted]  # (B, V)
    if K > 0:
        residual = residual_weight(weight[rows, num_accepted, None] * p_tau, r_tilde[rows, num_accepted.clamp(max=K - 1)])
        use_residual = (num_accepted < K) & (torch.cumsum(residual, dim=-1)[:, -1] > 0)
        weights = torch.where(use_residual[:, None], residual, p_tau)
    else:
        weights = p_tau
    return _emit(x, num_accepted, inverse_cdf(weights, u[:, K])), num_accepted


def _first_rejection(accept: torch.Tensor) -> torch.Tensor:
    """Number of leading ``True`` per row. Shape: (B, K) bool -> (B,) int64."""
    return torch.cumprod(accept.to(torch.int64), dim=-1).sum(dim=-1)


def _emit(draft_tokens: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Accepted drafts, then ``last``, then -1. Shape: (B, K), (B,), (B,) -> (B, K+1)."""
    batch, num_draft_tokens = draft_tokens.shape
    position = torch.arange(num_draft_tokens + 1, device=draft_tokens.device).expand(batch, -1)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(position < num_accepted[:, None], padded, -1)
    return tokens.scatter(1, num_accepted[:, None], last[:, None])


def _check_tilted(s: torch.Tensor) -> None:
    """p* needs a token with positive probability and a row maximum inside the supported range."""
    top = s.amax(dim=-1)
    if bool(torch.isneginf(top).any()):
        where = tuple(int(i) for i in torch.isneginf(top).nonzero()[0])
        raise ValueError(f"the tilted target p* has no token with positive probability at (row, position) {where}")
    outside = ~(top.abs() <= MAX_SCALED_SCORE)
    if bool(outside.any()):
        where = tuple(int(i) for i in outside.nonzero()[0])
        raise ValueError(
            "the tilted score zq/temperature + shift * (zr/temperature - zd/temperature) has a row maximum outside "
            f"[-1e300, 1e300] at (row, position) {where}: use a smaller shift or a larger temperature"
        )


def verify(
    target_logits,
    draft_logits,
    draft_tokens,
    ref_logits=None,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    shift=1.0,
    mode="exact",
    num_draft_tokens=None,
    uniforms=None,
    generator=None,
    top_k_ties="keep",
    aligned_logits=None,
    verification="token",
) -> VerifyOutput:
    """Reference SSS verification; same signature and results as :func:`sss_ext.verify`.

    Shape
    -----
    target_logits: (B, K+1, V); draft_logits: (B, K+1, V) or (B, K, V) without ref, or None
    (one-hot drafts); draft_tokens: (B, K); ref_logits, aligned_logits: (B, K+1, V);
    num_draft_tokens: (B,); uniforms: (B, K+1)
    -> tokens (B, K+1), num_accepted (B,), log_z (B, K+1)
    """
    (batch, K, V), (tau, top_k, top_p, lam, mode) = check_verify_args(
        target_logits, draft_logits, draft_tokens, ref_logits, temperature, top_k, top_p, shift, mode, aligned_logits
    )
    top_k_ties = check_top_k_ties(top_k_ties)
    verification = check_verification(verification, mode)
    device = target_logits.device
    if num_draft_tokens is not None:
        check_num_draft_tokens(num_draft_tokens, batch, K, device)
        if uniforms is None:
            uniforms = draw_uniforms((batch, K + 1), device, generator)
        check_uniforms_meta(uniforms, (batch, K + 1), "(B, K+1)", device)
        return _verify_ragged(target_logits, draft_logits, draft_tokens, ref_logits, aligned_logits, num_draft_tokens,
                              uniforms, dict(temperature=tau, top_k=top_k, top_p=top_p, shift=lam, mode=mode,
                                             top_k_ties=top_k_ties, verification=verification))
    check_token_ids("draft_tokens", draft_tokens, V)
    if uniforms is None:
        u = draw_uniforms((batch, K + 1), device, generator)
    else:
        u = check_uniforms(uniforms, (batch, K + 1), "(B, K+1)", device)
    # shift = 0 removes the tilt (p* = warp(q), Z = 1): the reference is never used. Without
    # it, draft_logits[:, K] (if given) is never used either. Unused logits are not checked.
    one_hot = draft_logits is None
    r_logits = tilt_logits(draft_logits, aligned_logits, ref_logits, lam, mode)  # what the op reads as r
    if lam == 0.0:
        ref_logits = None
    used_draft = r_logits if ref_logits is not None or r_logits is None else r_logits[:, :K]
    inverse_temperature = 1.0 if tau == 0.0 else 1.0 / tau
    for name, logits in (("target_logits", target_logits), ("aligned_logits" if one_hot else "draft_logits", used_draft),
                         ("ref_logits", ref_logits)):
        if logits is not None:
            check_logit_values(name, logits)
            check_scaled_range(name, logits, inverse_temperature)

    zq = target_logits.to(torch.float64)
    zr = None if r_logits is None else r_logits.to(torch.float64)
    zd = None if ref_logits is None else ref_logits.to(torch.float64)
    x = draft_tokens
    rows = torch.arange(batch, device=device)

    if tau == 0.0:
        # Greedy: p* and r~ are one-hot; accept iff the draft is the tilted argmax.
        s = tilted_scores(zq, zr[:, : K + 1] if zd is not None else None, zd, 1.0, lam)
        _check_tilted(s)
        best = torch.argmax(s, dim=-1)  # (B, K+1)
        num_accepted = _first_rejection(x == best[:, :K])
        tokens = _emit(x, num_accepted, best[rows, num_accepted])
        return VerifyOutput(tokens, num_accepted, torch.zeros(batch, K + 1, dtype=torch.float32, device=device))

    # 1. Tilted target p* (truncated after tilting) and its normaliser Z.
    inv_tau = 1.0 / tau
    s = tilted_scores(zq, zr[:, : K + 1] if zd is not None else None, zd, inv_tau, lam)  # (B, K+1, V)
    _check_tilted(s)
    log_p_star = warp_log_probs(s, top_k, top_p, top_k_ties)
    if zd is None:
        log_z = torch.zeros(batch, K + 1, dtype=torch.float64, device=device)
    else:
        log_z = log_normaliser_z(s, zq * inv_tau, zr[:, : K + 1] * inv_tau, zd * inv_tau, lam)

    # 2. Proposal r~ the drafts were drawn from; one-hot at the drafts for a deterministic proposer.
    if one_hot:
        log_r_tilde = torch.full((batch, K, V), NEG_INF, dtype=torch.float64, device=device).scatter(-1, x[..., None], 0.0)
    else:
        log_r_tilde = warp_log_probs(zr[:, :K] * inv_tau, top_k, top_p, top_k_ties)  # (B, K, V)

    # 3. Accept x[i] iff log u < log m(x) - log r~(x); zero r~ or zero p* rejects.
    log_p_x = log_p_star[:, :K].gather(-1, x[..., None]).squeeze(-1)
    log_r_x = log_r_tilde.gather(-1, x[..., None]).squeeze(-1)
    if verification == "block":
        tokens, num_accepted = _block_verification(log_p_star, log_r_tilde, log_p_x, log_r_x, x, u)
        return VerifyOutput(tokens, num_accepted, log_z.to(torch.float32))
    log_m_x = log_p_x + log_z[:, :K] if mode == "paper" else log_p_x
    accept = torch.isfinite(log_p_x) & torch.isfinite(log_r_x) & (torch.log(u[:, :K]) < log_m_x - log_r_x)
    num_accepted = _first_rejection(accept)

    # 4. Correction from (m - r~)+ at the first rejection j (fallback p*), or bonus from p*[K].
    #    Paper mode draws from the proportional (p* - r~ / Z)+, which no log Z overflows.
    j = num_accepted
    p_j = torch.exp(log_p_star[rows, j])  # (B, V)
    if K > 0:
        log_r_j = log_r_tilde[rows, j.clamp(max=K - 1)]
        if mode == "paper":
            r_j = torch.exp(log_r_j - log_z[rows, j, None]).masked_fill(torch.isneginf(log_r_j), 0.0)
        else:
            r_j = torch.exp(log_r_j)
        residual = residual_weight(p_j, r_j)
        use_residual = (j < K) & (torch.cumsum(residual, dim=-1)[:, -1] > 0)
        weights = torch.where(use_residual[:, None], residual, p_j)
    else:
        weights = p_j
    last = inverse_cdf(weights, u[:, K])

    # 5. Emit accepted drafts, then the correction/bonus token.
    tokens = _emit(x, num_accepted, last)
    return VerifyOutput(tokens, num_accepted, log_z.to(torch.float32))


def _verify_ragged(target_logits, draft_logits, draft_tokens, ref_logits, aligned_logits, num_draft_tokens, uniforms,
                   options) -> VerifyOutput:
    """Rows with ``n`` drafts are the uniform call on positions ``0..n`` of those rows; outputs
    are padded with ``-1`` tokens and ``log_z = 0`` past the bonus position ``n``.

    Shape
    -----
    as :func:`verify`; num_draft_tokens: (B,) with values in [0, K]
    """
    batch, K = draft_tokens.shape
    tokens = draft_tokens.new_full((batch, K + 1), -1)
    num_accepted = draft_tokens.new_zeros((batch,))
    log_z = torch.zeros(batch, K + 1, dtype=torch.float32, device=target_logits.device)
    for n in torch.unique(num_draft_tokens).tolist():
        rows = (num_draft_tokens == n).nonzero().flatten()
        out = verify(
            target_logits[rows, : n + 1],
            None if draft_logits is None else draft_logits[rows, : n + 1] if ref_logits is not None else draft_logits[rows, :n],
            draft_tokens[rows, :n],
            None if ref_logits is None else ref_logits[rows, : n + 1],
            uniforms=uniforms[rows, : n + 1],
            aligned_logits=None if aligned_logits is None else aligned_logits[rows, : n + 1],
            **options,
        )
        tokens[rows, : n + 1] = out.tokens
        num_accepted[rows] = out.num_accepted
        log_z[rows, : n + 1] = out.log_z
    return VerifyOutput(tokens, num_accepted, log_z)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, uniforms=None, generator=None, *, top_k_ties="keep") -> torch.Tensor:
    """Reference of :func:`sss_ext.sample`: one token per row from ``warp(softmax(logits/tau))``.

    Shape
    -----
    logits: (B, V); uniforms: (B,) -> (B,) int64
    """
    (batch, _), (tau, top_k, top_p) = check_sample_args(logits, temperature, top_k, top_p)
    top_k_ties = check_top_k_ties(top_k_ties)
    if uniforms is None:
        u = draw_uniforms((batch,), logits.device, generator)
    else:
        u = check_uniforms(uniforms, (batch,), "(B,)", logits.device)
    check_logit_values("logits", logits)
    check_scaled_range("logits", logits, 1.0 if tau == 0.0 else 1.0 / tau)
    z = logits.to(torch.float64)
    if tau == 0.0:
        return torch.argmax(z, dim=-1)
    return inverse_cdf(torch.exp(warp_log_probs(z * (1.0 / tau), top_k, top_p, top_k_ties)), u)
