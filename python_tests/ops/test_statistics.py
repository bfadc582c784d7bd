"""Statistical tests of the op (docs/algorithm.md §8): many rows of one fixed context,
chi-square against p* (alpha = 0.01 on the CPU; on a GPU one family-wise 1e-3, see
stats_helpers), with the power to detect a TV gap of 0.02 at position 0 and the detectable
gap reported at every later position (at most 0.05), and negative controls that run the op
with a planted defect and must fail."""

import pytest
import torch

import sss_ext
from sss_ext.reference import tilted_scores
from sss_ext.warp import warp_log_probs
from stats_helpers import ALPHA, alpha_for, chi_square_pvalue, detectable_tv

NUM_ROWS = 60_000
VOCAB_SIZE = 16
NUM_DRAFT_TOKENS = 3


def context_logits(seed, draft_scale=1.0, ref_scale=1.0):
    """One context's logits, shared by every row: (K+1, V) each (context-independent models)."""
    g = torch.Generator().manual_seed(seed)
    target = 1.5 * torch.randn(NUM_DRAFT_TOKENS + 1, VOCAB_SIZE, generator=g)
    draft = draft_scale * (target + torch.randn(NUM_DRAFT_TOKENS + 1, VOCAB_SIZE, generator=g))
    ref = ref_scale * (target + torch.randn(NUM_DRAFT_TOKENS + 1, VOCAB_SIZE, generator=g))
    return target, draft, ref


def p_star(target, draft, ref, temperature, top_k, top_p, shift):
    """(K+1, V) float64 tilted target."""
    s = tilted_scores(target.double(), None if ref is None else draft.double(), None if ref is None else ref.double(), 1 / temperature, shift)
    return torch.exp(warp_log_probs(s, top_k, top_p))


def run_rows(device, target, draft, ref, temperature=1.0, top_k=0, top_p=1.0, shift=1.0, mode="exact", proposal=None, seed=0,
             skew_draw=False):
    """NUM_ROWS independent rounds of one context; drafts drawn position by position.
    skew_draw: a planted defect, the correction/bonus draw's uniform squared."""
    g = torch.Generator().manual_seed(seed)
    expand = lambda t: None if t is None else t.expand(NUM_ROWS, -1, -1).to(device)  # noqa: E731
    proposal = proposal or dict(temperature=temperature, top_k=top_k, top_p=top_p)
    drafts = torch.stack(
        [sss_ext.sample(draft[i].expand(NUM_ROWS, -1), **proposal, generator=g) for i in range(NUM_DRAFT_TOKENS)], dim=1
    )
    uniforms = sss_ext.draw_uniforms((NUM_ROWS, NUM_DRAFT_TOKENS + 1), device, torch.Generator(device).manual_seed(seed + 1))
    if skew_draw:
        uniforms[:, NUM_DRAFT_TOKENS] = uniforms[:, NUM_DRAFT_TOKENS] ** 2
    return sss_ext.verify(expand(target), expand(draft), drafts.to(device), expand(ref), temperature=temperature,
                          top_k=top_k, top_p=top_p, shift=shift, mode=mode, uniforms=uniforms)


def emitted_at(result, position):
    """Tokens emitted at `position` by the rows that reach it. Shape: (rows reaching,)."""
    reach = result.num_accepted >= position
    return result.tokens[reach, position].cpu()


CASES = [
    dict(temperature=1.0, shift=1.0, with_ref=True),
    dict(temperature=0.7, shift=2.0, with_ref=True, top_k=6),
    dict(temperature=1.0, shift=0.5, with_ref=True, top_p=0.8),
    dict(temperature=1.0, shift=1.0, with_ref=False),  # standard speculative sampling
    dict(temperature=1.2, shift=1.0, with_ref=False, top_k=8, top_p=0.95),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_emitted_tokens_follow_p_star(device, case):
    case = dict(case)
    with_ref = case.pop("with_ref")
    target, draft, ref = context_logits(seed=11)
    ref = ref if with_ref else None
    sampling = dict(temperature=case["temperature"], top_k=case.get("top_k", 0), top_p=case.get("top_p", 1.0))
    law = p_star(target, draft, ref, shift=case["shift"], **sampling)
    result = run_rows(device, target, draft, ref, shift=case["shift"], **sampling)
    tested = [p for p in range(NUM_DRAFT_TOKENS + 1) if emitted_at(result, p).numel() >= 2000]
    level = alpha_for(device) / len(tested)  # Bonferroni: family-wise alpha over the positions
    power = {p: detectable_tv(emitted_at(result, p).numel(), law[p], level) for p in tested}
    print("\ndetectable TV (power 0.9) by position:", {p: round(tv, 4) for p, tv in power.items()})
    assert power[0] <= 0.02 and max(power.values()) <= 0.05, power
    for position in tested:
        pvalue = chi_square_pvalue(emitted_at(result, position), law[position])
        assert pvalue > level, f"position {position}: p = {pvalue}"
    # Acceptance rate of the first draft is sum_v min(r~, p*) (= 1 - TV).
    r_tilde = torch.exp(warp_log_probs(draft[0].double() / sampling["temperature"], sampling["top_k"], sampling["top_p"]))
    expected_rate = torch.minimum(r_tilde, law[0]).sum().item()
    observed_rate = (result.num_accepted >= 1).double().mean().item()
    sigma = (expected_rate * (1 - expected_rate) / NUM_ROWS) ** 0.5
    assert abs(observed_rate - expected_rate) < 4.5 * sigma


def test_negative_control_paper_mode_with_z_far_from_one(device):
    target, draft, ref = context_logits(seed=5, draft_scale=2.0, ref_scale=0.5)
    law = p_star(target, draft, ref, 1.0, 0, 1.0, 1.0)
    exact = run_rows(device, target, draft, ref, mode="exact")
    paper = run_rows(device, target, draft, ref, mode="paper")
    assert (paper.log_z[0].exp() - 1).abs().max().item() >= 0.1
    assert chi_square_pvalue(emitted_at(exact, 0), law[0]) > alpha_for(device)
    assert chi_square_pvalue(emitted_at(paper, 0), law[0]) < ALPHA  # the biased rule is caught


def test_negative_control_proposal_ignoring_top_k(device):
    target, draft, ref = context_logits(seed=6)
    law = p_star(target, draft, ref, 1.0, 4, 1.0, 1.0)
    wrong = run_rows(device, target, draft, ref, top_k=4, proposal=dict(temperature=1.0, top_k=0, top_p=1.0))
    assert chi_square_pvalue(emitted_at(wrong, 0), law[0]) < ALPHA


def test_negative_control_skewed_bonus_uniforms(device):
    """The op run with a planted randomness defect: the draw's uniforms squared (skewed towards
    the start of the inverse CDF). Its bonus tokens must fail the fit the honest run passes."""
    target, draft, ref = context_logits(seed=7)
    law = p_star(target, draft, ref, 1.0, 0, 1.0, 1.0)
    honest = run_rows(device, target, draft, ref)
    skewed = run_rows(device, target, draft, ref, skew_draw=True)
    bonus = lambda result: result.tokens[result.num_accepted == NUM_DRAFT_TOKENS, NUM_DRAFT_TOKENS].cpu()  # noqa: E731
    assert bonus(skewed).numel() > 2000
    assert chi_square_pvalue(bonus(honest), law[NUM_DRAFT_TOKENS]) > alpha_for(device)
    assert chi_square_pvalue(bonus(skewed), law[NUM_DRAFT_TOKENS]) < ALPHA


def test_sample_follows_warped_distribution(device):
    g = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(VOCAB_SIZE, generator=g)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.6, 5, 1.0), (1.3, 0, 0.75)]:
        tokens = sss_ext.sample(logits.expand(NUM_ROWS, -1).to(device), temperature, top_k, top_p, generator=torch.Generator(device).manual_seed(3))
        assert chi_square_pvalue(tokens, sss_ext.warp_probs(logits, temperature, top_k, top_p)) > alpha_for(device)
    # Negative control: sampling at the wrong temperature is detected.
    tokens = sss_ext.sample(logits.expand(NUM_ROWS, -1).to(device), 1.2, generator=torch.Generator(device).manual_seed(4))
    assert chi_square_pvalue(tokens, sss_ext.warp_probs(logits, 1.0)) < ALPHA
