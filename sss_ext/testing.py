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
