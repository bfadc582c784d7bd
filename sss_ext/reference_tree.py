"""Pure-PyTorch reference of tree verification (multi-draft SSS), in paper notation.

The test oracle of :func:`sss_ext.verify_tree`, float64, following ``docs/algorithm.md``
§13 ("Tree verification"). The per-node distributions are those of the chain reference
(:mod:`sss_ext.reference`) at a position:

* ``p*_c = warp(softmax(s_c))``, ``s = zq/tau + lambda * (zr/tau - zd/tau)``: the tilted target
  of the token after node ``c``'s path;
* ``r~_c = warp(softmax(zr_c/tau))``: the proposal node ``c``'s children were drawn from.

Recursive rejection sampling, starting at the root with ``p = p*_0``, ``q = r~_0``: each child
``x_j`` of the current node, in increasing node index, is accepted iff
``log u < log p(x_j) - log q(x_j)``; acceptance moves to the child with fresh ``p*``, ``r~``.
A rejection replaces ``p`` by ``normalize((p - q)+)`` (kept when that has no mass) and, when
siblings were drawn without replacement, ``q`` by ``q`` without ``x_j``, renormalised. When no
child is left, one token is drawn from ``p`` by inverse CDF with the row's last uniform.
"""

from __future__ import annotations

import torch

from .checks import check_logit_values, check_scaled_range
from .checks_tree import check_num_nodes_meta, check_tree_args, check_tree_uniforms_meta, check_tree_values
from .outputs import TreeVerifyOutput
from .reference import RESIDUAL_TOLERANCE, _check_tilted, inverse_cdf, log_normaliser_z, tilted_scores
from .uniforms import draw_uniforms
from .warp import warp_log_probs


class Law:
    """A distribution over the vocabulary as ``weights / total``.

    ``log_probs`` (a node's fresh ``p*`` or ``r~``, ``total = 1``) gives exact log-probabilities
    for the acceptance test, as the chain reference uses them; after a rejection only the
    weights are kept.

    Shape
    -----
    weights, log_probs: (V,) float64
    """

    def __init__(self, weights: torch.Tensor, total: float, log_probs: torch.Tensor | None = None):
        self.weights, self.total, self.log_probs = weights, total, log_probs

    @classmethod
    def fresh(cls, log_probs: torch.Tensor) -> "Law":
        return cls(torch.exp(log_probs), 1.0, log_probs)

    def probabilities(self) -> torch.Tensor:
        return self.weights if self.log_probs is not None else self.weights / self.total

    def log_prob(self, token: int) -> torch.Tensor:
        if self.log_probs is not None:
            return self.log_probs[token]
        return torch.log(self.weights[token]) - torch.log(torch.tensor(self.total, dtype=torch.float64))


def accepts(p: Law, q: Law, token: int, uniform: torch.Tensor) -> bool:
    """``log u < log p(x) - log q(x)``; ``p(x) = 0`` or ``q(x) = 0`` (or ``q`` without mass) rejects."""
    if q.total == 0.0:
        return False
    log_p, log_q = p.log_prob(token), q.log_prob(token)
    return bool(torch.isfinite(log_p) & torch.isfinite(log_q) & (torch.log(uniform) < log_p - log_q))


def after_rejection(p: Law, q: Law, token: int, replacement: bool) -> tuple[Law, Law]:
    """``p <- normalize((p - q)+)`` (``p`` kept when the residual has no mass, entries within
    ``RESIDUAL_TOLERANCE * p`` counted as zero, as the chain reference); without replacement
    also ``q <- normalize(q with q(x) = 0)``. A ``q`` without mass changes nothing."""
    if q.total == 0.0:
        return p, q
    p_probabilities, q_probabilities = p.probabilities(), q.probabilities()
    difference = p_probabilities - q_probabilities
    residual = torch.where(difference > RESIDUAL_TOLERANCE * p_probabilities, difference, 0.0)
    residual_mass = float(torch.cumsum(residual, dim=-1)[-1])  # in vocabulary order, as inverse_cdf
    if residual_mass > 0:
        p = Law(residual, residual_mass)
    if not replacement:
        remaining = q_probabilities.clone()
        remaining[token] = 0.0
        q = Law(remaining, float(torch.cumsum(remaining, dim=-1)[-1]))
    return p, q


def children_of(parents: list[int]) -> list[list[int]]:
    """Children of each node in increasing node index. Shape: (n,) -> n lists."""
    children = [[] for _ in parents]
    for child, parent in enumerate(parents[1:], start=1):
        children[parent].append(child)
    return children


def _walk(children, draft_tokens, uniforms, log_p_star, log_r_tilde, replacement) -> tuple[list[int], int]:
    """Recursive rejection sampling in one row: the accepted path and the last token.

    Shape
    -----
    draft_tokens: (n,); uniforms: (n,); log_p_star, log_r_tilde: (n, V)
    """
    node, path = 0, [0]
    while True:
        p, q = Law.fresh(log_p_star[node]), Law.fresh(log_r_tilde[node])
        for child in children[node]:
            token = draft_tokens[child]
            if accepts(p, q, token, uniforms[child - 1]):
                break
            p, q = after_rejection(p, q, token, replacement)
        else:
            last = inverse_cdf(p.weights[None], uniforms[-1:])  # the row's last uniform, column n-1
            return path, int(last)
        node = child
        path.append(node)


def _walk_greedy(children, draft_tokens, best) -> tuple[list[int], int]:
    """Greedy: accept the first child whose token is the tilted argmax at its parent."""
    node, path = 0, [0]
    while True:
        accepted = [child for child in children[node] if draft_tokens[child] == best[node]]
        if not accepted:
            return path, int(best[node])
        node = accepted[0]
        path.append(node)


def verify_tree(
    target_logits,
    draft_logits,
    draft_tokens,
    parents,
    ref_logits=None,
    *,
    num_nodes=None,
    uniforms=None,
    replacement=True,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    shift=1.0,
    mode="exact",
    top_k_ties="keep",
    generator=None,
) -> TreeVerifyOutput:
    """Reference tree verification; same signature and results as :func:`sss_ext.verify_tree`.

    Shape
    -----
    target_logits, draft_logits, ref_logits: (B, N, V); draft_tokens, parents: (B, N);
    num_nodes: (B,); uniforms: (B, N)
    -> path (B, N), tokens (B, N), num_accepted (B,), log_z (B, N)
    """
    (batch, N, V), (tau, top_k, top_p, lam) = check_tree_args(
        target_logits, draft_logits, draft_tokens, parents, ref_logits, temperature, top_k, top_p, shift, mode, top_k_ties,
        replacement
    )
    device = target_logits.device
    if num_nodes is not None:
        check_num_nodes_meta(num_nodes, batch, device)
    if uniforms is None:
        uniforms = draw_uniforms((batch, N), device, generator)
    check_tree_uniforms_meta(uniforms, batch, N, device)
    counts = check_tree_values(num_nodes, parents, draft_tokens, uniforms, N, V)
    if lam == 0.0:
        ref_logits = None  # p* = warp(q), Z = 1: the reference is never read

    # Nodes past a row's count are never read, nor the draft's logits at a leaf without the
    # tilt (as at verify's bonus position): zero them so that no check looks at them.
    node = torch.arange(N, device=device)
    used = node < counts[:, None]  # (B, N)
    is_child = used & (node >= 1)
    has_children = torch.zeros_like(parents).scatter_reduce(1, torch.where(is_child, parents, 0), is_child.long(), "amax").bool()
    draft_read = used & (has_children | (ref_logits is not None))
    inverse_temperature = 1.0 if tau == 0.0 else 1.0 / tau
    zq, zd = (None if x is None else x.masked_fill(~used[..., None], 0.0) for x in (target_logits, ref_logits))
    zr = draft_logits.masked_fill(~draft_read[..., None], 0.0)
    for name, logits in (("target_logits", zq), ("draft_logits", zr), ("ref_logits", zd)):
        if logits is not None:
            check_logit_values(name, logits)
            check_scaled_range(name, logits, inverse_temperature)
    zq, zr, zd = (None if x is None else x.to(torch.float64) for x in (zq, zr, zd))

    path = parents.new_full((batch, N), -1)
    tokens = parents.new_full((batch, N), -1)
    num_accepted = parents.new_zeros((batch,))
    log_z_out = torch.zeros(batch, N, dtype=torch.float32, device=device)

    s = tilted_scores(zq, zr if zd is not None else None, zd, inverse_temperature, lam)  # (B, N, V)
    _check_tilted(s)
    if tau == 0.0:
        best = torch.argmax(s, dim=-1)  # (B, N)
    else:
        log_p_star = warp_log_probs(s, top_k, top_p, top_k_ties)
        log_r_tilde = warp_log_probs(zr * inverse_temperature, top_k, top_p, top_k_ties)
        log_z = torch.zeros(batch, N, dtype=torch.float64, device=device) if zd is None else log_normaliser_z(
            s, zq * inverse_temperature, zr * inverse_temperature, zd * inverse_temperature, lam)

    for b in range(batch):
        n = int(counts[b])
        children = children_of(parents[b, :n].tolist())
        row_tokens = draft_tokens[b, :n].tolist()
        if tau == 0.0:
            row_path, last = _walk_greedy(children, row_tokens, best[b].tolist())
        else:
            row_path, last = _walk(children, row_tokens, uniforms[b, :n], log_p_star[b], log_r_tilde[b], replacement)
            log_z_out[b, : len(row_path)] = log_z[b, row_path].to(torch.float32)
        accepted = len(row_path) - 1
        path[b, : accepted + 1] = torch.tensor(row_path)
        tokens[b, :accepted] = torch.tensor([row_tokens[c] for c in row_path[1:]], dtype=torch.int64)
        tokens[b, accepted] = last
        num_accepted[b] = accepted
    return TreeVerifyOutput(path, tokens, num_accepted, log_z_out)
