"""Random verification inputs for tests and benchmarks (the one builder of op inputs).

Correlated target/draft/reference logits (so acceptance is neither ~0 nor ~1), draft tokens
drawn from the warped proposal with a few arbitrary ids (the ``r~(x) = 0`` path), uniforms
on the open grid, in contiguous or awkward memory layouts.
"""

from __future__ import annotations

import torch

from .uniforms import draw_uniforms
from .warp import warp_probs

LAYOUTS = ("contiguous", "sliced", "permuted", "strided")


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, other strides.

    ``sliced``: unit vocabulary stride, rows starting at odd offsets inside a padded buffer;
    ``permuted``: vocabulary not innermost (the adapters copy); ``contiguous`` and
    ``strided`` (which strides the small tensors only) keep the logits contiguous.

    Shape
    -----
    x: (B, P, V) -> (B, P, V)
    """
    if layout in ("contiguous", "strided"):
        return x.contiguous()
    batch, positions, vocab_size = x.shape
    if layout == "sliced":
        big = torch.zeros(batch, positions + 2, vocab_size + 5, dtype=x.dtype, device=x.device)
        big[:, 1 : positions + 1, 3 : vocab_size + 3] = x
        return big[:, 1 : positions + 1, 3 : vocab_size + 3]
    if layout == "permuted":
        return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values with non-unit strides in every dimension. Shape: (B, N) -> (B, N)."""
    return torch.stack([t, t], dim=-1)[..., 1]


def make_logits(batch, positions, vocab_size, generator, *, scale=2.0, device="cpu"):
    """float64 (target, draft, reference) logits, each a noisy copy of the one before.

    Shape
    -----
    -> 3 x (batch, positions, vocab_size)
    """
    shape = (batch, positions, vocab_size)
    target = scale * torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    draft = target + 0.7 * torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    ref = draft + 0.7 * torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    return target, draft, ref


def make_verify_inputs(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k=0, top_p=1.0,
                       layout="contiguous", seed=0, device="cpu", top_k_ties="keep"):
    """Keyword arguments for :func:`sss_ext.verify` / :func:`sss_ext.reference.verify`, uniforms included.

    Values are drawn on ``device`` from a generator seeded with ``seed``. Without a
    reference, odd seeds pass ``draft_logits`` with ``K + 1`` positions and even seeds with ``K``.

    Shape
    -----
    target_logits, ref_logits: (B, K+1, V); draft_logits: (B, K+1 or K, V); draft_tokens: (B, K); uniforms: (B, K+1)
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    K = num_draft_tokens
    target, draft, ref = (t.to(dtype) for t in make_logits(batch, K + 1, vocab_size, generator, device=device))
    if K == 0:
        draft_tokens = torch.zeros(batch, 0, dtype=torch.int64, device=device)
    elif temperature > 0:
        probs = warp_probs(draft[:, :K].reshape(-1, vocab_size), temperature, top_k, top_p, top_k_ties=top_k_ties)
        draft_tokens = torch.multinomial(probs, 1, generator=generator).reshape(batch, K)
    else:
        draft_tokens = draft[:, :K].to(torch.float64).argmax(-1)
    arbitrary = torch.rand(batch, K, generator=generator, device=device) < 0.1
    draft_tokens = torch.where(arbitrary, torch.randint(0, vocab_size, (batch, K), generator=generator, device=device),
                               draft_tokens)
    uniforms = draw_uniforms((batch, K + 1), device, generator)
    if layout != "contiguous":
        draft_tokens, uniforms = strided(draft_tokens), strided(uniforms)
    return dict(
        target_logits=relayout(target, layout),
        draft_logits=relayout(draft if with_ref or seed % 2 else draft[:, :K], layout),
        draft_tokens=draft_tokens,
        ref_logits=relayout(ref, layout) if with_ref else None,
        uniforms=uniforms,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        top_k_ties=top_k_ties,
    )


def poison_past_counts(kwargs: dict, num_draft_tokens: torch.Tensor, seed: int = 0) -> None:
    """Write garbage, in place, wherever a ragged verify call must not read.

    Logits past each row's bonus position ``n`` (and the draft's at ``n`` without a
    reference) become NaN, +inf or all -inf, draft ids from ``n`` on leave ``[0, V)``,
    uniforms past ``n`` become NaN, 0 or 1 (which of them: by ``seed``).

    Shape
    -----
    kwargs as :func:`make_verify_inputs`; num_draft_tokens: (B,)
    """
    draft_tokens = kwargs["draft_tokens"]
    num_draft = draft_tokens.shape[1]
    vocab_size = kwargs["target_logits"].shape[-1]
    position = torch.arange(num_draft + 1, device=num_draft_tokens.device)
    past_bonus = position[None, :] > num_draft_tokens[:, None]  # (B, K+1)
    past_drafts = position[None, :] >= num_draft_tokens[:, None]  # (B, K+1)
    fills = [float("nan"), float("inf"), float("-inf")]
    with_ref = kwargs["ref_logits"] is not None
    for index, (name, mask) in enumerate((("target_logits", past_bonus), ("draft_logits", past_bonus if with_ref else past_drafts),
                                          ("ref_logits", past_bonus))):
        logits = kwargs[name]
        if logits is not None:
            logits.masked_fill_(mask[:, : logits.shape[1], None].expand_as(logits), fills[(index + seed) % 3])
    draft_tokens.masked_fill_(past_drafts[:, :num_draft], (-7, vocab_size + 3)[seed % 2])
    kwargs["uniforms"].masked_fill_(past_bonus, (float("nan"), 0.0, 1.0)[seed % 3])


def make_ragged_verify_inputs(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k=0, top_p=1.0,
                              layout="contiguous", seed=0, device="cpu", poison=True):
    """:func:`make_verify_inputs` plus per-row draft counts in ``[0, K]`` (``num_draft_tokens``).

    With two rows or more, the first row has 0 drafts and the last ``K``; with ``poison``,
    every value a row must not read is garbage (:func:`poison_past_counts`).

    Shape
    -----
    as :func:`make_verify_inputs`; num_draft_tokens: (B,) int64
    """
    kwargs = make_verify_inputs(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k, top_p, layout, seed,
                                device)
    generator = torch.Generator(device=device).manual_seed(seed + 7919)
    counts = torch.randint(0, num_draft_tokens + 1, (batch,), generator=generator, device=device)
    if batch >= 2:
        counts[0], counts[-1] = 0, num_draft_tokens
    if poison:
        poison_past_counts(kwargs, counts, seed)
    kwargs["num_draft_tokens"] = counts
    return kwargs
