"""Edge cases of docs/algorithm.md §1-§5 and the special cases that pin the rule down."""

import pytest
import torch

import sss_ext
from sss_ext.uniforms import draw_uniforms
from sss_ext.reference import inverse_cdf

NEG_INF = float("-inf")


def both(device, **kwargs):
    """Op result (on `device`) and reference result, asserted identical."""
    expected = sss_ext.reference.verify(**kwargs)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = sss_ext.verify(**on_device)
    assert torch.equal(got.tokens.cpu(), expected.tokens) and torch.equal(got.num_accepted.cpu(), expected.num_accepted)
    return got


def test_uniforms_are_never_zero_or_one():
    u = draw_uniforms((1_000_000,), "cpu", torch.Generator().manual_seed(0))
    assert u.dtype == torch.float64 and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 2e-3


@pytest.mark.parametrize("bad", [0.0, 1.0, float("nan"), -0.5])
def test_uniforms_outside_open_interval_are_rejected(device, bad):
    logits = torch.randn(2, 2, 5, device=device)
    uniforms = torch.full((2, 2), 0.5, dtype=torch.float64, device=device)
    uniforms[1, 0] = bad
    with pytest.raises(ValueError, match="uniforms"):
        sss_ext.verify(logits, logits, torch.zeros(2, 1, dtype=torch.long, device=device), uniforms=uniforms)


def test_zero_residual_mass_falls_back_to_p_star(device):
    # q = r = d: p* == r~ exactly, so a rejected draft leaves (p* - r~)+ == 0.
    logits = torch.tensor([[[0.3, -1.0, NEG_INF, 0.8]] * 2])
    drafts = torch.tensor([[2]])  # r~(x) = 0: rejected
    for u_last, token in [(0.1, 0), (0.5, 3), (0.99, 3)]:
        uniforms = torch.tensor([[0.5, u_last]], dtype=torch.float64)
        result = both(device, target_logits=logits, draft_logits=logits, draft_tokens=drafts, ref_logits=logits, uniforms=uniforms)
        assert result.num_accepted.item() == 0
        p_star = torch.softmax(logits[0, 0].double(), -1)
        assert result.tokens[0, 0].item() == inverse_cdf(p_star[None], uniforms[:, 1]).item() == token


@pytest.mark.parametrize("masked_in", ["draft", "target"])
def test_draft_token_with_zero_probability_is_rejected(device, masked_in):
    target = torch.zeros(1, 2, 4)
    draft = torch.zeros(1, 2, 4)
    (draft if masked_in == "draft" else target)[0, 0, 1] = NEG_INF
    uniforms = torch.tensor([[1e-300, 0.5]], dtype=torch.float64)  # would accept any positive ratio
    result = both(device, target_logits=target, draft_logits=draft, draft_tokens=torch.tensor([[1]]), uniforms=uniforms)
    assert result.num_accepted.item() == 0
    if masked_in == "target":  # p*(1) = 0: never emitted; with r~(1) = 0 the residual may still pick it
        assert result.tokens[0, 0].item() != 1


def test_masked_vocabulary_is_never_emitted(device):
    g = torch.Generator().manual_seed(0)
    batch, K, V = 4000, 3, 9
    target, draft, ref = (torch.randn(batch, K + 1, V, generator=g) for _ in range(3))
    for logits, column in ((target, 2), (draft, 5), (ref, 7)):
        logits[..., column] = NEG_INF
    drafts = sss_ext.sample(draft[:, :K].reshape(-1, V), generator=g).reshape(batch, K)
    result = both(device, target_logits=target, draft_logits=draft, draft_tokens=drafts, ref_logits=ref,
                  uniforms=draw_uniforms((batch, K + 1), "cpu", g))
    emitted = result.tokens[result.tokens >= 0]
    assert not torch.isin(emitted.cpu(), torch.tensor([2, 5, 7])).any()


def test_vocabulary_of_one(device):
    logits = torch.zeros(3, 5, 1)
    result = both(device, target_logits=logits, draft_logits=logits, draft_tokens=torch.zeros(3, 4, dtype=torch.long),
                  ref_logits=logits, uniforms=torch.full((3, 5), 0.999, dtype=torch.float64))
    assert result.num_accepted.tolist() == [4, 4, 4] and result.tokens.eq(0).all()


def test_q_equal_d_accepts_every_draft(device):
    g = torch.Generator().manual_seed(1)
    batch, K, V = 500, 6, 50
    target, draft = torch.randn(batch, K + 1, V, generator=g), torch.randn(batch, K + 1, V, generator=g)
    drafts = sss_ext.sample(draft[:, :K].reshape(-1, V), generator=g).reshape(batch, K)
    result = both(device, target_logits=target, draft_logits=draft, draft_tokens=drafts, ref_logits=target,
                  uniforms=draw_uniforms((batch, K + 1), "cpu", g))
    assert result.num_accepted.eq(K).all()


def test_r_equal_d_is_standard_speculative_sampling(device):
    g = torch.Generator().manual_seed(2)
    batch, K, V = 300, 4, 30
    target, draft = torch.randn(batch, K + 1, V, generator=g), torch.randn(batch, K + 1, V, generator=g)
    drafts = sss_ext.sample(draft[:, :K].reshape(-1, V), generator=g).reshape(batch, K)
    common = dict(target_logits=target, draft_logits=draft, draft_tokens=drafts, uniforms=draw_uniforms((batch, K + 1), "cpu", g))
    tilted = both(device, **common, ref_logits=draft)
    standard = both(device, **common, shift=0.0, ref_logits=draft)
    plain = both(device, **common)
    assert torch.equal(standard.tokens, plain.tokens)
    # r = d cancels only up to rounding of s = zq/tau + (zr/tau - zd/tau): allow a rare flip.
    assert (tilted.tokens != plain.tokens).any(dim=1).double().mean() < 0.01


def test_greedy_accepts_exactly_the_tilted_argmax(device):
    g = torch.Generator().manual_seed(3)
    batch, K, V = 64, 4, 11
    target, draft, ref = (torch.randn(batch, K + 1, V, generator=g) for _ in range(3))
    best = (target + 1.5 * (draft - ref)).argmax(-1)
    drafts = torch.where(torch.rand(batch, K, generator=g) < 0.8, best[:, :K], (best[:, :K] + 1) % V)
    result = both(device, target_logits=target, draft_logits=draft, draft_tokens=drafts, ref_logits=ref, temperature=0.0, shift=1.5)
    for row in range(batch):
        n = int(result.num_accepted[row])
        assert torch.equal(drafts[row, :n], best[row, :n]) and (n == K or drafts[row, n] != best[row, n])
        assert result.tokens[row, n] == best[row, n] and result.tokens[row, n + 1 :].eq(-1).all()


def test_greedy_ties_break_to_lowest_index(device):
    logits = torch.tensor([[[1.0, 3.0, 3.0, 2.0]]])
    result = both(device, target_logits=logits, draft_logits=logits[:, :0], draft_tokens=torch.zeros(1, 0, dtype=torch.long),
                  temperature=0.0)
    assert result.tokens.tolist() == [[1]]
    assert sss_ext.sample(logits[0].to(device), temperature=0.0).item() == 1


def test_top_p_cuts_a_token_whose_prior_mass_is_exactly_p(device):
    """A ranked token is kept iff the mass before it is < p * total (docs/algorithm.md §2): on four
    equal scores with p = 0.5 the mass before the third token is exactly half, so two tokens stay."""
    logits = torch.zeros(1, 4)
    assert torch.equal(sss_ext.warp_probs(logits, 1.0, 0, 0.5), torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64))
    u = torch.tensor([0.99], dtype=torch.float64)
    assert sss_ext.reference.sample(logits, 1.0, 0, 0.5, uniforms=u).item() == 1
    assert sss_ext.sample(logits.to(device), 1.0, 0, 0.5, uniforms=u.to(device)).item() == 1


def test_output_layout_invariants(device):
    g = torch.Generator().manual_seed(4)
    batch, K, V = 200, 5, 20
    target, draft, ref = (torch.randn(batch, K + 1, V, generator=g) for _ in range(3))
    drafts = sss_ext.sample(draft[:, :K].reshape(-1, V), generator=g).reshape(batch, K)
    result = sss_ext.verify(target.to(device), draft.to(device), drafts.to(device), ref.to(device), generator=torch.Generator(device).manual_seed(0))
    assert result.tokens.shape == (batch, K + 1) and result.tokens.dtype == torch.int64
    assert result.num_accepted.shape == (batch,) and result.log_z.shape == (batch, K + 1) and result.log_z.dtype == torch.float32
    emitted = (result.tokens >= 0).sum(dim=1)
    assert torch.equal(emitted, result.num_accepted + 1)  # always num_accepted + 1 tokens, then -1
    for row in range(batch):
        n = int(result.num_accepted[row])
        assert torch.equal(result.tokens[row, :n], drafts[row, :n].to(device))


def test_log_z_matches_definition(device):
    g = torch.Generator().manual_seed(5)
    target, draft, ref = (torch.randn(2, 3, 13, generator=g, dtype=torch.float64) for _ in range(3))
    shift, temperature = 1.7, 0.9
    log_q, log_r, log_d = (torch.log_softmax(t / temperature, -1) for t in (target, draft, ref))
    z = torch.exp(log_q + shift * (log_r - log_d)).sum(-1)
    result = sss_ext.verify(target.float().to(device), draft.float().to(device), torch.zeros(2, 2, dtype=torch.long, device=device),
                            ref.float().to(device), temperature=temperature, shift=shift)
    torch.testing.assert_close(result.log_z.cpu().double(), torch.log(z), rtol=1e-5, atol=1e-5)


def test_generator_makes_runs_reproducible(device):
    logits = torch.randn(50, 3, 40, device=device)
    drafts = torch.randint(0, 40, (50, 2), device=device)
    run = lambda seed: sss_ext.verify(logits, logits * 0.5, drafts, logits * 0.3, generator=torch.Generator(device).manual_seed(seed))  # noqa: E731
    assert torch.equal(run(7).tokens, run(7).tokens)
    assert not torch.equal(run(7).tokens, run(8).tokens)
