"""Exact enumeration (docs/algorithm.md §8): with lookup-table models, enumerate every draft and
every accept/reject path over several rounds; the implied law of the first T emitted tokens
must equal prod_t p*_t to 1e-10. Then probe the op and the reference cell by cell, so the
enumerated law is the law they actually implement."""

import itertools
import math
import zlib

import pytest
import torch

import sss_ext
from sss_ext.reference import tilted_scores
from sss_ext.warp import warp_log_probs

VOCAB_SIZE, NUM_DRAFT_TOKENS, HORIZON = 3, 2, 4


def table_logits(name: str, context: tuple, scale: float) -> torch.Tensor:
    """A lookup-table 'model': fixed random float64 logits for each context. Shape: (V,)."""
    seed = zlib.crc32(repr((name, context)).encode())
    return scale * torch.randn(VOCAB_SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Setting:
    """One enumerated configuration. `grid` rounds the table logits to multiples of it (ties in
    the scores); `drafted_ties` is the top-k tie rule the drafts were drawn with (default: the
    verifier's `top_k_ties`; another rule is a mismatched proposer)."""

    def __init__(self, temperature, top_k, top_p, shift, mode, with_ref, scales=(1.5, 1.5, 1.5), top_k_ties="keep",
                 grid=None, drafted_ties=None):
        self.temperature, self.top_k, self.top_p, self.shift, self.mode, self.with_ref = temperature, top_k, top_p, shift, mode, with_ref
        self.scales, self.top_k_ties, self.grid = scales, top_k_ties, grid
        self.drafted_ties = top_k_ties if drafted_ties is None else drafted_ties
        self.cache = {}

    def logits(self, context):
        q, r, d = (table_logits(n, context, s) for n, s in zip("qrd", self.scales))
        if self.grid is not None:
            q, r, d = (torch.round(t / self.grid) * self.grid for t in (q, r, d))
        return q, r, (d if self.with_ref else None)

    def position(self, context):
        """p*, r~ (float64 probabilities), Z and the law the drafts were drawn from at one context (memoised)."""
        if context not in self.cache:
            self.cache[context] = self._position(context)
        return self.cache[context]

    def _position(self, context):
        q, r, d = self.logits(context)
        inv = 1.0 / self.temperature
        s = tilted_scores(q, r if d is not None else None, d, inv, self.shift)
        p_star = torch.exp(warp_log_probs(s, self.top_k, self.top_p, self.top_k_ties))
        r_tilde = torch.exp(warp_log_probs(r * inv, self.top_k, self.top_p, self.top_k_ties))
        drafted = torch.exp(warp_log_probs(r * inv, self.top_k, self.top_p, self.drafted_ties))
        z = 1.0 if d is None else math.exp(
            torch.logsumexp(s, -1) - torch.logsumexp(q * inv, -1) - self.shift * (torch.logsumexp(r * inv, -1) - torch.logsumexp(d * inv, -1))
        )
        return p_star, r_tilde, z, drafted


def round_paths(setting, context, num_draft_tokens=NUM_DRAFT_TOKENS):
    """Every (probability, emitted tokens, draft tokens, accept thresholds, final weights) of one round."""
    for drafts in itertools.product(range(VOCAB_SIZE), repeat=num_draft_tokens):
        positions = [setting.position(context + drafts[:i]) for i in range(num_draft_tokens + 1)]
        draft_probability = math.prod(float(positions[i][3][x]) for i, x in enumerate(drafts))
        if draft_probability == 0.0:
            continue
        thresholds = []
        for i, x in enumerate(drafts):
            p_star, r_tilde, z, _ = positions[i]
            m = p_star * (z if setting.mode == "paper" else 1.0)
            thresholds.append(min(1.0, float(m[x] / r_tilde[x])) if p_star[x] > 0 and r_tilde[x] > 0 else 0.0)
        reach = 1.0
        for n in range(num_draft_tokens + 1):
            p_star, r_tilde, z, _ = positions[n]
            if n < num_draft_tokens:
                stop = reach * (1.0 - thresholds[n])
                residual = torch.clamp(p_star * (z if setting.mode == "paper" else 1.0) - r_tilde, min=0.0)
                weights = residual if residual.sum() > 0 else p_star
            else:
                stop, weights = reach, p_star
            if stop > 0:
                yield draft_probability * stop, n, drafts, thresholds, weights / weights.sum()
            if n < num_draft_tokens:
                reach *= thresholds[n]


def sequence_law(setting, draft_length=lambda context: NUM_DRAFT_TOKENS):
    """Law of the first HORIZON emitted tokens, rounds chained from the empty context; a round
    after ``context`` proposes ``draft_length(context)`` drafts."""
    law = {}
    frontier = [((), 1.0)]
    while frontier:
        context, probability = frontier.pop()
        if len(context) >= HORIZON:
            key = context[:HORIZON]
            law[key] = law.get(key, 0.0) + probability
            continue
        for path_probability, n, drafts, _, final in round_paths(setting, context, draft_length(context)):
            for v in range(VOCAB_SIZE):
                if final[v] > 0:
                    frontier.append((context + drafts[:n] + (v,), probability * path_probability * float(final[v])))
    return law


def target_law(setting):
    law = {}
    for sequence in itertools.product(range(VOCAB_SIZE), repeat=HORIZON):
        law[sequence] = math.prod(float(setting.position(sequence[:t])[0][y]) for t, y in enumerate(sequence))
    return law


def max_gap(law_a, law_b):
    return max(abs(law_a.get(k, 0.0) - law_b.get(k, 0.0)) for k in set(law_a) | set(law_b))


EXACT_SETTINGS = [
    Setting(1.0, 0, 1.0, 1.0, "exact", True),
    Setting(0.7, 0, 1.0, 2.0, "exact", True),
    Setting(1.0, 2, 1.0, 1.0, "exact", True),
    Setting(0.8, 0, 0.7, 0.5, "exact", True),
    Setting(1.0, 0, 1.0, 1.0, "exact", False),
    Setting(1.0, 0, 1.0, 0.0, "exact", True),
]
# Logits on an integer grid: the tilted and proposal scores tie often, so top-k = 1 keeps one
# or several tokens under "keep" and the two rules give different laws.
TIE_SETTINGS = [
    Setting(1.0, 1, 1.0, 1.0, "exact", True, grid=1.0),
    Setting(1.0, 1, 1.0, 1.0, "exact", True, grid=1.0, top_k_ties="exact-k"),
    Setting(1.0, 2, 0.9, 1.0, "exact", True, grid=1.0),
    Setting(1.0, 1, 1.0, 1.0, "exact", False, grid=1.0),
]


def setting_id(s):
    return f"tau{s.temperature}-k{s.top_k}-p{s.top_p}-lam{s.shift}-ref{s.with_ref}" + (f"-grid-{s.top_k_ties}" if s.grid else "")


@pytest.mark.parametrize("setting", EXACT_SETTINGS + TIE_SETTINGS, ids=setting_id)
def test_enumerated_law_is_the_tilted_target(setting):
    law = sequence_law(setting)
    assert abs(sum(law.values()) - 1.0) < 1e-12
    assert max_gap(law, target_law(setting)) < 1e-10


def test_tie_settings_have_ties():
    """The tie settings' top-k = 1 keeps several tokens of p* under "keep" at some context."""
    setting = TIE_SETTINGS[0]
    kept = [int((setting.position(c)[0] > 0).sum()) for c in itertools.product(range(VOCAB_SIZE), repeat=2)]
    assert max(kept) > 1, kept


def test_proposal_with_the_other_tie_rule_breaks_exactness():
    """Negative control: drafts drawn under top_k_ties="keep" (HF's sampler) but verified under
    "exact-k" do not give the tilted target: a tied draft the verifier excludes is always rejected."""
    mismatched = Setting(1.0, 2, 1.0, 0.0, "exact", False, grid=1.0, top_k_ties="exact-k", drafted_ties="keep")
    assert max_gap(sequence_law(mismatched), target_law(mismatched)) > 1e-3


def test_paper_mode_is_biased_when_z_is_far_from_one():
    setting = Setting(1.0, 0, 1.0, 1.0, "paper", True, scales=(1.5, 3.0, 0.5))
    z_values = [setting.position(c)[2] for c in [(), (0,), (1,), (2,)]]
    assert max(abs(z - 1.0) for z in z_values) >= 0.1
    assert max_gap(sequence_law(setting), target_law(setting)) > 1e-3  # the negative control fails


def probe_rows(setting, context, num_draft_tokens=NUM_DRAFT_TOKENS):
    """Verify inputs whose uniforms sit inside every (accept/reject path, final-token cell) of a
    round of ``num_draft_tokens`` drafts, laid out for ``K = NUM_DRAFT_TOKENS``: past the round's
    drafts, draft ids are -1, logits NaN and uniforms 0 (a ragged row must not read them).

    Shape
    -----
    -> inputs of verify (B, K+1, V) ..., expected tokens (B, K+1)
    """
    rows, expected = [], []
    for _, n, drafts, thresholds, final in round_paths(setting, context, num_draft_tokens):
        if any(0.0 < t < 1e-6 or 1.0 - 1e-6 < t < 1.0 for t in thresholds):
            continue  # keep probes away from rounding at the boundaries
        coins = [thresholds[i] / 2 for i in range(n)]
        if n < num_draft_tokens:
            coins.append((1.0 + thresholds[n]) / 2)
        coins += [0.5] * (num_draft_tokens - len(coins))
        cumulative = torch.cumsum(final, 0)
        for v in range(VOCAB_SIZE):
            low = float(cumulative[v - 1]) if v else 0.0
            if float(cumulative[v]) - low > 1e-6:
                padding = NUM_DRAFT_TOKENS - num_draft_tokens
                rows.append((drafts + (-1,) * padding, coins + [(low + float(cumulative[v])) / 2] + [0.0] * padding))
                expected.append(list(drafts[:n]) + [v] + [-1] * (NUM_DRAFT_TOKENS - n))
    nan_logits = (torch.full((VOCAB_SIZE,), math.nan, dtype=torch.float64),) * 3
    logits = [[setting.logits(context + drafts[:i]) if i <= num_draft_tokens else nan_logits for i in range(NUM_DRAFT_TOKENS + 1)]
              for drafts, _ in rows]
    stack = lambda j: torch.stack([torch.stack([pos[j] for pos in row]) for row in logits]).to(torch.float32)  # noqa: E731
    inputs = dict(
        target_logits=stack(0),
        draft_logits=stack(1),
        draft_tokens=torch.tensor([d for d, _ in rows]),
        ref_logits=stack(2) if setting.with_ref else None,
        uniforms=torch.tensor([u for _, u in rows], dtype=torch.float64),
    )
    return inputs, torch.tensor(expected)


@pytest.mark.parametrize("setting", EXACT_SETTINGS[:4] + TIE_SETTINGS[:3] + [Setting(1.0, 0, 1.0, 1.0, "paper", True, scales=(1.5, 3.0, 0.5))],
                         ids=lambda s: f"{s.mode}-" + setting_id(s))
def test_op_and_reference_realise_every_enumerated_path(device, setting):
    # float32 logits in the probe: recompute the enumeration from the same rounded values.
    rounded = Setting(setting.temperature, setting.top_k, setting.top_p, setting.shift, setting.mode, setting.with_ref, setting.scales,
                      setting.top_k_ties)
    rounded.logits = lambda c: tuple(None if t is None else t.to(torch.float32).to(torch.float64) for t in setting.logits(c))
    for context in [(), (1,), (2, 0)]:
        inputs, expected = probe_rows(rounded, context)
        kwargs = dict(temperature=setting.temperature, top_k=setting.top_k, top_p=setting.top_p, shift=setting.shift, mode=setting.mode,
                      top_k_ties=setting.top_k_ties)
        assert torch.equal(sss_ext.reference.verify(**inputs, **kwargs).tokens, expected)
        on_device = {k: None if v is None else v.to(device) for k, v in inputs.items()}
        assert torch.equal(sss_ext.verify(**on_device, **kwargs).tokens.cpu(), expected)
