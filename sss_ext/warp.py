"""The one warping function: temperature, then top-k, then top-p.

The decoding loop samples draft tokens from ``warp_probs(draft_logits, ...)`` and the
verification op truncates the tilted target with the same rule, so the two can never
disagree about which tokens are allowed.

Truncation rule (shared bit for bit with the C++/CUDA kernels; docs/algorithm.md §2):

* tokens are ranked by score, descending, ties broken by the lower vocabulary index;
* top-k (``0`` or ``k >= V`` keeps all) keeps, with ``top_k_ties="keep"`` (the default, as
  HF's ``TopKLogitsWarper`` and vLLM), every token whose score is ``>=`` the ``k``-th largest
  score, so tokens tied with it survive too; with ``"exact-k"``, exactly the first ``k``
  ranked tokens. "Tied" means equal float64 scores, the values every kernel ranks;
* top-p then keeps the shortest ranked prefix of the top-k survivors whose mass reaches
  ``p`` of their mass: a ranked token is kept iff the mass ranked strictly before it is
  ``< p * total``, where masses are ``exp(score - max)`` summed in rank order.

Either way the kept set is a prefix of the ranking.
"""

from __future__ import annotations

import torch

from .checks import check_logit_values, check_sampling, check_scaled_range, check_top_k_ties


def kept_mask(scores: torch.Tensor, top_k: int, top_p: float, top_k_ties: str = "keep") -> torch.Tensor:
    """Boolean mask of the tokens that survive top-k then top-p.

    Parameters
    ----------
    scores : torch.Tensor
        float64 log-weights (logits times ``1 / temperature``); ``-inf`` allowed.
    top_k, top_p : int, float
        ``0`` / ``1.0`` disable the corresponding truncation.
    top_k_ties : {"keep", "exact-k"}
        ``"keep"``: top-k keeps every score ``>=`` the ``k``-th largest; ``"exact-k"``: the
        first ``k`` ranked tokens.

    Shape
    -----
    scores: (..., V) -> (..., V) bool
    """
    vocab_size = scores.shape[-1]
    if (top_k == 0 or top_k >= vocab_size) and top_p >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    keep_ranked = torch.ones_like(ranked, dtype=torch.bool)
    if 0 < top_k < vocab_size:
        if top_k_ties == "keep":
            keep_ranked = ranked >= ranked[..., top_k - 1 : top_k]
        else:
            keep_ranked[..., top_k:] = False
    if top_p < 1.0:
        mass = torch.exp(ranked - ranked[..., :1]) * keep_ranked
        cumulative = torch.cumsum(mass, dim=-1)
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
        keep_ranked &= before < top_p * cumulative[..., -1:]
    return torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)


def masked_log_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``scores - logsumexp(scores[keep])`` on kept tokens, ``-inf`` elsewhere.

    Computed as ``(scores - max) - log(sum(exp(scores - max)))`` over the kept tokens, the
    form the kernels use: the maximum and the log-sum stay apart, so ``log(sum)`` survives
    even when ``|max|`` is too large for ``max + log(sum)`` to differ from ``max``.

    Shape
    -----
    scores, keep: (..., V) -> (..., V) float64
    """
    masked = scores.masked_fill(~keep, float("-inf"))
    top = masked.amax(dim=-1, keepdim=True)
    log_sum = torch.log(torch.exp(masked - top).sum(dim=-1, keepdim=True))
    return (masked - top) - log_sum


def warp_log_probs(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0, top_k_ties: str = "keep") -> torch.Tensor:
    """Log-probabilities of ``softmax(scores)`` after top-k/top-p truncation (float64)."""
    scores = scores.to(torch.float64)
    return masked_log_softmax(scores, kept_mask(scores, top_k, top_p, top_k_ties))


def one_hot_argmax(scores: torch.Tensor) -> torch.Tensor:
    """float64 one-hot at the first maximal index. Shape: (..., V) -> (..., V)."""
    index = torch.argmax(scores, dim=-1, keepdim=True)
    return torch.zeros(scores.shape, dtype=torch.float64, device=scores.device).scatter_(-1, index, 1.0)


def warp_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, *,
               top_k_ties: str = "keep") -> torch.Tensor:
    """Sampling distribution of ``logits`` under temperature, top-k and top-p.

    Parameters
    ----------
    logits : torch.Tensor
        Raw logits of any float dtype; ``-inf`` masks a token.
    temperature : float
        ``> 0`` divides the logits; ``0`` gives a one-hot at the argmax (lowest index on ties).
    top_k : int
        Keep the ``top_k`` most likely tokens; ``0`` disables.
    top_p : float
        Keep the smallest most-likely set with mass ``>= top_p``; ``1.0`` disables.
    top_k_ties : {"keep", "exact-k"}
        ``"keep"`` also keeps every token tied with the ``top_k``-th largest scaled logit
        (as HF and vLLM do); ``"exact-k"`` keeps exactly ``top_k``, lower index first.

    Returns
    -------
    torch.Tensor
        float64 probabilities that sum to one over the last dimension.

    Raises
    ------
    ValueError
        For NaN/+inf logits, rows that are all ``-inf``, or scaled logits outside the
        supported range (docs/algorithm.md §7), like the ops.

    Shape
    -----
    logits: (..., V) -> (..., V)
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point torch.Tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension of size >= 1, got shape {tuple(logits.shape)}")
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    top_k_ties = check_top_k_ties(top_k_ties)
    check_logit_values("logits", logits)
    check_scaled_range("logits", logits, 1.0 if temperature == 0.0 else 1.0 / temperature)
    if temperature == 0.0:
        return one_hot_argmax(logits.to(torch.float64))
    return torch.exp(warp_log_probs(logits.to(torch.float64) * (1.0 / temperature), top_k, top_p, top_k_ties))
