"""The law of sss_ext.compat.flashinfer.chain_speculative_sampling by enumeration: over a small
vocabulary, enumerate every output row (accepted drafts, correction or bonus token, -1
padding) together with the accepted counter's excess over the emitted one, from the rule of
docs/algorithm.md §3, and chi-square many sampled rows against it (alpha = 0.01 on the CPU;
stats_helpers), with the power to detect a total-variation gap of 0.015 (0.02 at the CUDA
family's level). Also the tilted
target (ref_probs, shift) against p* from sss_ext.reference, and negative controls that must
fail: the law of a sampler that forgets to subtract the draft from the residual, and drafts
drawn from another law than draft_probs."""

import itertools

import numpy as np
import pytest
import torch

from sss_ext.compat.flashinfer import chain_speculative_sampling
from sss_ext.reference import tilted_scores
from stats_helpers import alpha_for, chi_square_from_counts, detectable_tv

VOCAB_SIZE = 5
NUM_ROWS = 120_000


def distributions(num_draft_tokens, seed, zeros=False, tilted=False):
    """Context-independent rows: target (K+1, V), draft (K or K+1, V), ref (K+1, V) or None, float32."""
    g = torch.Generator().manual_seed(seed)
    rows = num_draft_tokens + 1 if tilted else num_draft_tokens

    def probs(count):
        weights = torch.rand(count, VOCAB_SIZE, generator=g, dtype=torch.float64) ** 2 + 0.02
        if zeros:
            weights[torch.arange(count), torch.randint(VOCAB_SIZE, (count,), generator=g)] = 0.0
        return (weights / weights.sum(-1, keepdim=True)).float()

    return probs(num_draft_tokens + 1), probs(rows), probs(num_draft_tokens + 1) if tilted else None


def tilted_target(target, draft, ref, shift):
    """p* rows from sss_ext.reference's tilted scores of the logarithms. Shape: (K+1, V) float64."""
    if ref is None:
        return target.double() / target.double().sum(-1, keepdim=True)
    s = tilted_scores(torch.log(target.double()), torch.log(draft.double()), torch.log(ref.double()), 1.0, shift)
    return torch.softmax(s, dim=-1)


def enumerated_law(p_star, proposal, num_draft_tokens, subtract_draft=True):
    """{(output row, accepted - emitted): probability} of one call with context-independent rows.

    A prefix x_0..x_{n-1} is accepted with probability prod_i min(r_i, p_i)(x_i); the token after
    it is (p_n - r_n)+(y) (rejection at n, the residual's mass included) or p_K(y) (bonus); each
    later position's own coin accepts with probability sum min(r_i, p_i), independently.
    ``subtract_draft=False`` is the planted bug: the correction drawn from p_n instead.
    """
    p = p_star.double().numpy()
    r = proposal.double().numpy()
    overlap = np.minimum(p[:num_draft_tokens], r[:num_draft_tokens])
    alpha = overlap.sum(-1)
    law = {}
    for n in range(num_draft_tokens + 1):
        if n < num_draft_tokens:
            residual = np.clip(p[n] - r[n], 0, None)
            last = residual if subtract_draft else p[n] * residual.sum()
        else:
            last = p[n]
        later = alpha[n + 1:]
        for prefix in itertools.product(range(VOCAB_SIZE), repeat=n):
            reach = np.prod([overlap[i, x] for i, x in enumerate(prefix)]) if n else 1.0
            for y in range(VOCAB_SIZE):
                for coins in itertools.product((0, 1), repeat=len(later)):
                    extra = np.prod([a if c else 1 - a for a, c in zip(later, coins)]) if len(later) else 1.0
                    key = (prefix + (y,) + (-1,) * (num_draft_tokens - n), sum(coins))
                    law[key] = law.get(key, 0.0) + reach * last[y] * extra
    return law


def sample_rows(target, draft, ref, num_draft_tokens, device, seed, shift=1.0, proposal=None):
    """NUM_ROWS calls' worth of rows in one call; drafts drawn per position from ``proposal``
    (default: draft_probs). Returns keys (output row, accepted - emitted)."""
    g = torch.Generator().manual_seed(seed)
    proposal = draft if proposal is None else proposal
    ids = torch.stack([torch.multinomial(proposal[i].double(), NUM_ROWS, replacement=True, generator=g)
                       for i in range(num_draft_tokens)], dim=1).to(torch.int32)
    expand = lambda t: None if t is None else t.expand(NUM_ROWS, -1, -1).contiguous().to(device)  # noqa: E731
    out, accepted, emitted = chain_speculative_sampling(expand(draft), ids.to(device), expand(target), seed=seed, offset=0,
                                                        ref_probs=expand(ref), shift=shift)
    return out.cpu().numpy(), (accepted - emitted).cpu().numpy()


def encode(rows, extras):
    """One integer per (output row, extra): digits token + 1 in base V + 1, then the extra."""
    rows = np.asarray(rows, dtype=np.int64)
    base = VOCAB_SIZE + 1
    return ((rows + 1) * base ** np.arange(rows.shape[1])).sum(axis=1) + np.asarray(extras) * base ** rows.shape[1]


def p_value(law, rows, extras):
    keys = list(law)
    codes = encode([row for row, _ in keys], [extra for _, extra in keys])
    sampled = encode(rows, extras)
    position = np.searchsorted(np.sort(codes), sampled).clip(max=len(codes) - 1)
    known = np.sort(codes)[position] == sampled
    counts = np.bincount(np.argsort(codes)[position[known]], minlength=len(codes)).astype(float)
    counts = np.append(counts, (~known).sum())  # the last cell: rows the law cannot produce
    probs = np.append(np.array([law[k] for k in keys]), 0.0)
    return chi_square_from_counts(counts, probs), probs


def total_variation(law_a, law_b):
    return 0.5 * sum(abs(law_a.get(k, 0.0) - law_b.get(k, 0.0)) for k in set(law_a) | set(law_b))


CASES = [
    dict(num_draft_tokens=2, zeros=False, tilted=False, shift=1.0),
    dict(num_draft_tokens=2, zeros=True, tilted=False, shift=1.0),  # masked tokens in target and draft
    dict(num_draft_tokens=1, zeros=False, tilted=False, shift=1.0),
    dict(num_draft_tokens=2, zeros=True, tilted=True, shift=1.5),  # p* ∝ target (draft/ref)^1.5
    dict(num_draft_tokens=2, zeros=False, tilted=True, shift=0.0),  # shift 0 with ref: standard
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_output_rows_follow_the_enumerated_law(device, case):
    k = case["num_draft_tokens"]
    target, draft, ref = distributions(k, seed=10 + k, zeros=case["zeros"], tilted=case["tilted"])
    p_star = tilted_target(target, draft, ref, case["shift"])
    law = enumerated_law(p_star, draft, k)
    assert abs(sum(law.values()) - 1.0) < 1e-12
    # The emitted token at every position follows p*: the first one's marginal is p*_0.
    first = np.zeros(VOCAB_SIZE)
    for (row, _), probability in law.items():
        first[row[0]] += probability
    assert np.allclose(first, p_star[0].numpy(), atol=1e-12)
    rows, extras = sample_rows(target, draft, ref, k, device, seed=1, shift=case["shift"])
    p, probs = p_value(law, rows, extras)
    power = detectable_tv(NUM_ROWS, torch.tensor(probs), alpha_for(device))
    print(f"\np = {p:.3g}, detectable TV (power 0.9) = {power:.4f}")
    assert power <= (0.015 if device.type == "cpu" else 0.02)
    assert p > alpha_for(device), p


def test_negative_control_residual_without_the_draft_subtracted(device):
    """The law of a sampler that draws the correction from target instead of relu(target - draft)
    differs from the true one by more than the detectable gap, and the samples reject it."""
    target, draft, _ = distributions(2, seed=12)
    honest = enumerated_law(tilted_target(target, draft, None, 1.0), draft, 2)
    buggy = enumerated_law(tilted_target(target, draft, None, 1.0), draft, 2, subtract_draft=False)
    assert abs(sum(buggy.values()) - 1.0) < 1e-12 and total_variation(honest, buggy) > 0.03
    rows, extras = sample_rows(target, draft, None, 2, device, seed=2)
    assert p_value(honest, rows, extras)[0] > alpha_for(device)
    assert p_value(buggy, rows, extras)[0] < 1e-6


def test_negative_control_drafts_from_another_law(device):
    """Drafts drawn from the uniform law while draft_probs says otherwise: the output no longer
    follows the enumerated law (the proposal must be the law the drafts came from)."""
    target, draft, _ = distributions(2, seed=13)
    law = enumerated_law(tilted_target(target, draft, None, 1.0), draft, 2)
    uniform = torch.full_like(draft, 1.0 / VOCAB_SIZE)
    rows, extras = sample_rows(target, draft, None, 2, device, seed=3, proposal=uniform)
    assert p_value(law, rows, extras)[0] < 1e-6
