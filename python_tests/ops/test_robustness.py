"""Regression tests of extreme inputs (docs/algorithm.md §7): each either raises a named
ValueError in the op and the reference alike, or gives well-formed output equal to the
reference's. Every case here once crashed the process or returned malformed tokens."""

import math

import pytest
import torch

import sss_ext
from decoding_helpers import tiny_llama

NEG_INF = float("-inf")
OPS = {"op": sss_ext, "reference": sss_ext.reference}


def half_uniforms(*shape):
    return torch.full(shape, 0.5, dtype=torch.float64)


@pytest.mark.parametrize("entry", OPS)
def test_temperature_without_finite_inverse_is_refused(entry):
    module = OPS[entry]
    logits = torch.randn(4, 50272, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="temperature must be 0 .*finite inverse"):
        module.sample(logits, 1e-310, 0, 0.9, uniforms=half_uniforms(4))
    target = torch.randn(2, 3, 50272, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="temperature must be 0 .*finite inverse"):
        module.verify(target, target, torch.zeros(2, 2, dtype=torch.long), temperature=1e-310, top_p=0.9,
                      uniforms=half_uniforms(2, 3))


@pytest.mark.parametrize("entry", OPS)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_scaled_logits_outside_range_are_refused(entry, top_p):
    module = OPS[entry]
    logits = torch.randn(4, 50272, generator=torch.Generator().manual_seed(0)) + 3.0  # some |z| > 1
    with pytest.raises(ValueError, match=r"logits / temperature leaves the supported range \[-1e300, 1e300\]"):
        module.sample(logits, 1e-300, 0, top_p, uniforms=half_uniforms(4))
    target = logits.reshape(2, 2, 50272)
    with pytest.raises(ValueError, match=r"target_logits / temperature leaves the supported range"):
        module.verify(target, target, torch.zeros(2, 1, dtype=torch.long), temperature=1e-300, top_p=top_p,
                      uniforms=half_uniforms(2, 2))


@pytest.mark.parametrize("entry", OPS)
@pytest.mark.parametrize("vocab_size,top_p", [(50272, 0.9), (50272, 1.0), (5, 1.0)])
def test_tilted_score_overflow_is_refused(entry, vocab_size, top_p):
    module = OPS[entry]
    t = torch.randn(2, 3, vocab_size, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"tilted score .* outside \[-1e300, 1e300\].*smaller shift"):
        module.verify(t, t + 1, torch.zeros(2, 2, dtype=torch.long), t - 1, shift=1e308, top_p=top_p,
                      uniforms=half_uniforms(2, 3))


def test_scaled_range_boundary_is_inclusive():
    # |z| * (1/tau) = 1e300 exactly is allowed; the op and the reference agree on the draw.
    logits = torch.tensor([[1.0, 0.5, NEG_INF]])
    for entry in OPS.values():
        assert entry.sample(logits, 1e-300, uniforms=half_uniforms(1)).item() == 0


@pytest.mark.parametrize("op", ["verify", "sample"])
def test_uniforms_on_another_device_are_refused(op):
    if op == "verify":
        t = torch.randn(1, 3, 5)
        call = lambda u: sss_ext.verify(t, t, torch.zeros(1, 2, dtype=torch.long), uniforms=u)  # noqa: E731
        direct = lambda u: torch.ops.sss_ext.verify(t, t, torch.zeros(1, 2, dtype=torch.long), None, u, 1.0, 0, 1.0, 1.0, "exact")  # noqa: E731
        shape = (1, 3)
    else:
        t = torch.randn(2, 5)
        call = lambda u: sss_ext.sample(t, uniforms=u)  # noqa: E731
        direct = lambda u: torch.ops.sss_ext.sample(t, u, 1.0, 0, 1.0)  # noqa: E731
        shape = (2,)
    for uniforms in (torch.full(shape, 0.5, dtype=torch.float64, device="meta"),
                     torch.full((7,), 0.5, dtype=torch.float64, device="meta")):
        with pytest.raises(ValueError, match="uniforms"):
            call(uniforms)
        with pytest.raises(ValueError, match="one device"):
            direct(uniforms)


def test_paper_mode_with_huge_log_z_matches_reference():
    # log Z ~ 998 > 709.8: exp(log Z) overflows float64, the residual (p* - r~/Z)+ does not.
    target = torch.zeros(1, 2, 4)
    draft = torch.tensor([[[1000.0, 1000.0, 1000.0, 0.0], [0.0] * 4]])
    ref = torch.tensor([[[0.0, 0.0, 0.0, 1000.0], [0.0] * 4]])
    kwargs = dict(target_logits=target, draft_logits=draft, draft_tokens=torch.tensor([[3]]), ref_logits=ref,
                  mode="paper", uniforms=half_uniforms(1, 2))
    got, expected = sss_ext.verify(**kwargs), sss_ext.reference.verify(**kwargs)
    assert expected.log_z[0, 0].item() > 709.8
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.num_accepted, expected.num_accepted)
    # p* = (1/3, 1/3, 1/3, 0) and the residual is p* up to 1/Z: u = 0.5 draws the middle token.
    assert got.num_accepted.item() == 0 and got.tokens[0, 0].item() == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_unused_draft_position_is_not_checked(bad):
    t = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(3))
    draft = t.clone()
    draft[1, 2] = NEG_INF if bad == "all -inf" else bad  # position K without a reference: never read
    kwargs = dict(target_logits=t, draft_logits=draft, draft_tokens=torch.tensor([[0, 1], [2, 3]]), uniforms=half_uniforms(2, 3))
    got, expected = sss_ext.verify(**kwargs), sss_ext.reference.verify(**kwargs)
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.num_accepted, expected.num_accepted)


@pytest.mark.parametrize("entry", OPS)
@pytest.mark.parametrize("bad", [0.0, 1.0, float("nan")])
def test_greedy_sample_checks_uniforms(entry, bad):
    uniforms = torch.tensor([0.5, bad], dtype=torch.float64)
    with pytest.raises(ValueError, match="uniforms must lie in the open interval"):
        OPS[entry].sample(torch.randn(2, 5), 0.0, uniforms=uniforms)


@pytest.mark.parametrize("entry", OPS)
def test_top_k_beyond_int64_and_wrong_generator_are_named(entry):
    module = OPS[entry]
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        module.sample(logits, 1.0, 2**63)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        module.sample(logits, 1.0, generator=object())


@pytest.mark.parametrize("entry", OPS)
def test_huge_scaled_logits_keep_the_log_sum(entry):
    module = OPS[entry]
    probs = sss_ext.warp_probs(torch.tensor([[1e20, 1e20, 1e20, 0.0]]))
    assert torch.allclose(probs, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]], dtype=torch.float64), atol=1e-15)
    # A draft tied three ways under p*, proposed with certainty: accepted with probability 1/3.
    target = torch.tensor([[[1e20, 1e20, 1e20, 0.0]] * 2])
    draft = torch.tensor([[[0.0, NEG_INF, NEG_INF, NEG_INF]] * 2])
    for u, accepted in [(0.33, 1), (0.34, 0)]:
        out = module.verify(target, draft, torch.tensor([[0]]), uniforms=torch.tensor([[u, 0.5]], dtype=torch.float64))
        assert out.num_accepted.item() == accepted
        assert math.isfinite(out.log_z.sum().item())


def test_generate_refuses_out_of_range_shift_before_emitting():
    target, draft, ref = (tiny_llama(50272, seed) for seed in (1, 2, 3))
    config = sss_ext.SamplingConfig(max_new_tokens=4, num_draft_tokens=2, shift=1e308, top_p=0.9, seed=0)
    with pytest.raises(ValueError, match="tilted score"):
        sss_ext.generate(target, draft, torch.tensor([[1, 2, 3]]), ref_model=ref, method="sss", config=config)


@pytest.mark.parametrize("entry", OPS)
def test_reference_is_not_read_at_zero_shift(entry):
    # shift = 0: p* = warp(q) and log Z = 0, so ref_logits (even NaN) changes nothing.
    t = torch.randn(3, 3, 7, generator=torch.Generator().manual_seed(4))
    kwargs = dict(target_logits=t, draft_logits=t + 0.5, draft_tokens=torch.tensor([[0, 1], [2, 3], [4, 5]]),
                  uniforms=sss_ext.draw_uniforms((3, 3), "cpu", torch.Generator().manual_seed(5)), shift=0.0)
    without = OPS[entry].verify(**kwargs)
    with_nan_ref = OPS[entry].verify(**kwargs, ref_logits=torch.full_like(t, float("nan")))
    assert torch.equal(with_nan_ref.tokens, without.tokens) and torch.equal(with_nan_ref.num_accepted, without.num_accepted)
    assert bool((with_nan_ref.log_z == 0).all())
