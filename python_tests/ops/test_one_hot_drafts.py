"""One-hot drafts (``verify(target_logits, None, draft_tokens, ...)``, docs/algorithm.md §11).

A deterministic proposer (n-gram, greedy drafts) has no draft distribution: draft ``x`` is
accepted with probability ``p*(x)`` and the correction is drawn from ``p*`` without ``x``.
The CPU kernel must equal the reference token for token (sd and the tilted target, ragged
rows, truncation, greedy, 16-bit logits, awkward sizes); the emitted law must equal the
enumerated one (chi-square), and the same test must reject the law of a misuse (the
deterministic drafts verified as if drawn from a draft distribution).
"""

import math

import pytest
import torch

import sss_ext
from sss_ext.reference import tilted_scores
from sss_ext.warp import warp_log_probs
from stats_helpers import ALPHA, chi_square_from_counts

import numpy as np


def _case(batch, num_draft, vocab, *, tilt, seed, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, num_draft + 1, vocab)
    target, aligned, ref = (scale * torch.randn(shape, generator=g) for _ in range(3))
    tokens = torch.randint(vocab, (batch, num_draft), generator=g)
    uniforms = torch.rand((batch, num_draft + 1), generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    kwargs = dict(uniforms=uniforms)
    if tilt:
        kwargs.update(ref_logits=ref.to(dtype), aligned_logits=aligned.to(dtype))
    return target.to(dtype), tokens, kwargs


SETTINGS = [
    dict(),
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=5, top_p=0.9, top_k_ties="exact-k"),
    dict(temperature=0.0),
    dict(shift=0.0),
    dict(shift=2.5, temperature=0.8),
]


@pytest.mark.parametrize("tilt", [False, True], ids=["sd", "tilted"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
@pytest.mark.parametrize("batch,num_draft,vocab", [(1, 1, 1), (3, 2, 99), (5, 4, 111), (2, 0, 7), (0, 3, 11)])
def test_op_equals_reference(tilt, settings, batch, num_draft, vocab):
    target, tokens, kwargs = _case(batch, num_draft, vocab, tilt=tilt, seed=batch * 1000 + vocab)
    got = sss_ext.verify(target, None, tokens, **kwargs, **settings)
    want = sss_ext.reference.verify(target, None, tokens, **kwargs, **settings)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.num_accepted, want.num_accepted)
    assert torch.allclose(got.log_z, want.log_z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_equals_reference_16_bit(dtype):
    target, tokens, kwargs = _case(6, 3, 64, tilt=True, seed=5, dtype=dtype)
    for settings in ({}, {"top_k": 4}):
        got = sss_ext.verify(target, None, tokens, **kwargs, **settings)
        want = sss_ext.reference.verify(target, None, tokens, **kwargs, **settings)
        assert torch.equal(got.tokens, want.tokens)


@pytest.mark.parametrize("tilt", [False, True], ids=["sd", "tilted"])
def test_ragged_rows_equal_reference(tilt):
    target, tokens, kwargs = _case(7, 3, 40, tilt=tilt, seed=11)
    counts = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    got = sss_ext.verify(target, None, tokens, num_draft_tokens=counts, top_k=6, **kwargs)
    want = sss_ext.reference.verify(target, None, tokens, num_draft_tokens=counts, top_k=6, **kwargs)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.num_accepted, want.num_accepted)
    assert bool((got.num_accepted <= counts).all())


def test_correction_never_repeats_the_rejected_draft():
    """Every rejection's correction differs from the draft it replaces (p* without x)."""
    target, tokens, kwargs = _case(4000, 1, 3, tilt=False, seed=3, scale=0.5)
    out = sss_ext.verify(target, None, tokens, **kwargs)
    rejected = out.num_accepted == 0
    assert int(rejected.sum()) > 500
    assert not bool((out.tokens[rejected, 0] == tokens[rejected, 0]).any())


def test_certain_draft_is_always_accepted():
    """p*(x) = 1 (every other target logit -inf): accepted whatever the uniform."""
    batch, vocab = 64, 9
    tokens = torch.randint(vocab, (batch, 2), generator=torch.Generator().manual_seed(0))
    target = torch.full((batch, 3, vocab), float("-inf"))
    target.scatter_(-1, torch.cat([tokens, tokens[:, :1]], 1)[..., None], 0.0)
    uniforms = torch.full((batch, 3), 1 - 1e-12, dtype=torch.float64)
    out = sss_ext.verify(target, None, tokens, uniforms=uniforms)
    assert bool((out.num_accepted == 2).all())


# --- the emitted law by enumeration -------------------------------------------------------

VOCAB, K = 4, 2


def _position_law(target, ref, aligned, shift):
    """p* at each position of one row (float64). Shape: (K+1, V)."""
    s = tilted_scores(target.double(), None if ref is None else aligned.double(), None if ref is None else ref.double(), 1.0, shift)
    return torch.exp(warp_log_probs(s, 0, 1.0, "keep"))


def _outcome_law(p_star, drafts, accept_prob):
    """Law of (num_accepted j, last token v) over the (K+1) * V outcomes: drafts accepted with
    ``accept_prob(i)``; a rejection at j corrects from (p*_j - one-hot x_j)+ / (1 - p*_j(x_j))."""
    law = torch.zeros(K + 1, VOCAB, dtype=torch.float64)
    prefix = 1.0
    for j in range(K + 1):
        if j == K:
            law[j] = prefix * p_star[K]
            break
        a = accept_prob(j)
        residual = p_star[j].clone()
        residual[drafts[j]] = 0.0
        law[j] = prefix * (1 - a) * residual / residual.sum()
        prefix *= a
    return law.flatten()


@pytest.mark.parametrize("tilt", [False, True], ids=["sd", "tilted"])
def test_emitted_law_matches_enumeration(tilt):
    g = torch.Generator().manual_seed(2024)
    target, aligned, ref = (1.2 * torch.randn(1, K + 1, VOCAB, generator=g) for _ in range(3))
    drafts = torch.tensor([2, 1])
    shift = 1.5 if tilt else 1.0
    p_star = _position_law(target[0], ref[0] if tilt else None, aligned[0], shift)
    law = _outcome_law(p_star, drafts, lambda i: float(p_star[i, drafts[i]]))

    n = 60_000
    tilt_args = dict(ref_logits=ref.expand(n, -1, -1), aligned_logits=aligned.expand(n, -1, -1), shift=shift) if tilt else {}
    out = sss_ext.verify(target.expand(n, -1, -1), None, drafts.expand(n, -1), generator=torch.Generator().manual_seed(7),
                         **tilt_args)
    last = out.tokens.gather(1, out.num_accepted[:, None]).squeeze(1)
    counts = np.bincount((out.num_accepted * VOCAB + last).numpy(), minlength=(K + 1) * VOCAB)
    assert chi_square_from_counts(counts, law.numpy()) > ALPHA

    # Negative control: the same drafts verified as if drawn from the aligned draft's softmax
    # (a deterministic proposer passed with a draft distribution) follow another law.
    misuse = sss_ext.verify(target.expand(n, -1, -1), aligned.expand(n, -1, -1), drafts.expand(n, -1),
                            generator=torch.Generator().manual_seed(8),
                            **({k: v for k, v in tilt_args.items() if k != "aligned_logits"}))
    last = misuse.tokens.gather(1, misuse.num_accepted[:, None]).squeeze(1)
    counts = np.bincount((misuse.num_accepted * VOCAB + last).numpy(), minlength=(K + 1) * VOCAB)
    assert chi_square_from_counts(counts, law.numpy()) < 1e-6


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [sss_ext.verify, sss_ext.reference.verify], ids=["op", "reference"])
def test_refusals_name_the_argument(fn):
    target, tokens, kwargs = _case(2, 2, 8, tilt=True, seed=1)
    ref, aligned = kwargs["ref_logits"], kwargs["aligned_logits"]
    with pytest.raises(ValueError, match="need aligned_logits"):
        fn(target, None, tokens, ref)
    with pytest.raises(ValueError, match="aligned_logits without ref_logits"):
        fn(target, None, tokens, aligned_logits=aligned)
    with pytest.raises(ValueError, match="aligned_logits is only for one-hot drafts"):
        fn(target, aligned, tokens, ref, aligned_logits=aligned)
    with pytest.raises(ValueError, match="mode='paper' needs draft_logits"):
        fn(target, None, tokens, ref, aligned_logits=aligned, mode="paper")
    with pytest.raises(ValueError, match=r"aligned_logits must have shape \(B, K\+1, V\)"):
        fn(target, None, tokens, ref, aligned_logits=aligned[:, :2])
    with pytest.raises(ValueError, match="aligned_logits must have the dtype of target_logits"):
        fn(target, None, tokens, ref, aligned_logits=aligned.half())
    with pytest.raises(ValueError, match="draft_tokens must hold token ids in"):
        fn(target, None, tokens + 8, ref, aligned_logits=aligned)
    bad = aligned.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="aligned_logits"):
        fn(target, None, tokens, ref, aligned_logits=bad)


def test_shift_zero_ignores_reference_and_needs_no_aligned_logits():
    target, tokens, kwargs = _case(3, 2, 10, tilt=True, seed=4)
    with_ref = sss_ext.verify(target, None, tokens, kwargs["ref_logits"], shift=0.0, uniforms=kwargs["uniforms"])
    without = sss_ext.verify(target, None, tokens, uniforms=kwargs["uniforms"])
    assert torch.equal(with_ref.tokens, without.tokens)
    assert float(with_ref.log_z.abs().max()) == 0.0


def test_opcheck():
    target, tokens, kwargs = _case(3, 2, 10, tilt=True, seed=9)
    op = torch.ops.sss_ext.verify.default
    args = (target, None, tokens, kwargs["ref_logits"], kwargs["uniforms"], 1.0, 0, 1.0, 1.0, "exact", None, "keep",
            kwargs["aligned_logits"])
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, (target, None, tokens, None, kwargs["uniforms"], 0.8, 3, 0.9, 1.0, "exact", None, "keep", None))
    assert math.isfinite(float(op(*args)[2].sum()))


def test_torch_compile_fullgraph_matches_eager():
    target, tokens, kwargs = _case(3, 2, 10, tilt=True, seed=10)

    def round_(target, tokens, ref, aligned, uniforms):
        out = sss_ext.verify(target, None, tokens, ref, aligned_logits=aligned, uniforms=uniforms, top_k=4)
        return out.tokens, out.num_accepted

    args = (target, tokens, kwargs["ref_logits"], kwargs["aligned_logits"], kwargs["uniforms"])
    compiled = torch.compile(round_, fullgraph=True, backend="aot_eager")(*args)
    eager = round_(*args)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
