"""Random verification inputs for the op tests: correlated target/draft/reference logits
(so acceptance is neither ~0 nor ~1), draft tokens drawn from the warped proposal, and
contiguous or strided layouts."""

from __future__ import annotations

import torch

import sss_ext

LAYOUTS = ("contiguous", "sliced", "permuted")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, different strides. Shape: (B, P, V) -> (B, P, V)."""
    if layout == "contiguous":
        return x.contiguous()
    batch, positions, vocab = x.shape
    if layout == "sliced":  # unit vocab stride, padded rows and positions
        big = torch.zeros(batch, positions + 2, vocab + 3, dtype=x.dtype, device=x.device)
        big[:, 1 : positions + 1, 2 : vocab + 2] = x
        return big[:, 1 : positions + 1, 2 : vocab + 2]
    if layout == "permuted":  # vocabulary not innermost
        return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    raise ValueError(layout)


def make_logits(batch, positions, vocab, generator, scale=2.0):
    target = scale * torch.randn(batch, positions, vocab, generator=generator, dtype=torch.float64)
    draft = target + 0.7 * torch.randn(batch, positions, vocab, generator=generator, dtype=torch.float64)
    ref = draft + 0.7 * torch.randn(batch, positions, vocab, generator=generator, dtype=torch.float64)
    return target, draft, ref


def make_verify_inputs(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k=0, top_p=1.0,
                       layout="contiguous", seed=0, device="cpu"):
    """Keyword arguments for sss_ext.verify / sss_ext.reference.verify (uniforms included)."""
    generator = torch.Generator().manual_seed(seed)
    K = num_draft_tokens
    target, draft, ref = (t.to(dtype) for t in make_logits(batch, K + 1, vocab_size, generator))
    if temperature > 0:
        probs = sss_ext.warp_probs(draft[:, :K].reshape(-1, vocab_size), temperature, top_k, top_p)
        draft_tokens = torch.multinomial(probs, 1, generator=generator).reshape(batch, K)
    else:
        draft_tokens = draft[:, :K].to(torch.float64).argmax(-1)
    # A few arbitrary (possibly never-proposed) tokens exercise the r~(x) = 0 path.
    arbitrary = torch.rand(batch, K, generator=generator) < 0.1
    draft_tokens = torch.where(arbitrary, torch.randint(0, vocab_size, (batch, K), generator=generator), draft_tokens)
    uniforms = sss_ext.draw_uniforms((batch, K + 1), "cpu", generator)
    if layout != "contiguous":
        draft_tokens = torch.stack([draft_tokens, draft_tokens], dim=-1)[..., 0]
        uniforms = torch.stack([uniforms, uniforms], dim=-1)[..., 1]
    put = lambda t: _layout(t.to(device), layout)  # noqa: E731
    return dict(
        target_logits=put(target),
        draft_logits=put(draft if with_ref or seed % 2 else draft[:, :K]),
        draft_tokens=draft_tokens.to(device),
        ref_logits=put(ref) if with_ref else None,
        uniforms=uniforms.to(device),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
