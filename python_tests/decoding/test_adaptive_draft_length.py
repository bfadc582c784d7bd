"""The adaptive draft-length policy: its choice follows acceptance and cost, and the decoding
loop with it on keeps the exact output law (chi-square against the enumerated law, as in
test_decoding_exactness.py, with a negative control)."""

import pytest
import torch

import sss_ext
from decoding_helpers import chi_square_pvalue, count_sequences, one_thread, sequence_law, tilted_probs, tiny_llama, trio  # noqa: F401
from sss_ext.decoding.config import SamplingConfig
from sss_ext.decoding import draft_length
from sss_ext.decoding.draft_length import DraftLengths, RoundCostMeter, best_draft_length, expected_tokens

VOCAB, LENGTH, ROWS, EOS = 8, 3, 24000, 0
PROMPT = [1, 2]
ALPHA = 0.01
ADAPTIVE = dict(draft_length_policy="adaptive", draft_cost_ratio=0.1)  # a fixed ratio: reproducible runs


@pytest.fixture(scope="module")
def models():
    return trio(VOCAB)


def test_expected_tokens_is_the_geometric_mean_length():
    acceptance = torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64)
    got = expected_tokens(acceptance, torch.arange(0, 4))
    expected = torch.tensor([[1, 1, 1, 1], [1, 1.5, 1.75, 1.875], [1, 2, 3, 4]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def best_per_row(acceptance, costs, extra_draft_steps):
    return torch.tensor([best_draft_length(a[None], 8, costs, extra_draft_steps) for a in acceptance])


def test_best_length_spans_the_range_and_follows_acceptance():
    acceptance = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    lengths = best_per_row(acceptance, (0.05, 1.0, 0.0), 1)
    assert lengths[0] == 1 and lengths[-1] == 8
    assert bool((lengths[1:] >= lengths[:-1]).all())  # monotone in the acceptance rate
    # a costlier draft never asks for more drafts
    assert bool((best_per_row(acceptance, (0.5, 1.0, 0.0), 1) <= lengths).all())
    # a free draft with any acceptance > 0 takes the maximum
    assert bool((best_per_row(acceptance[1:], (0.0, 1.0, 0.0), 0) == 8).all())


def test_batch_length_weighs_every_row():
    low, high = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.95], dtype=torch.float64)
    costs = (0.1, 1.0, 0.0)
    assert best_draft_length(low, 8, costs, 1) == 1 and best_draft_length(high, 8, costs, 1) == 8
    # the one confident row's tokens outweigh the cost for one other row, not for seven
    assert best_draft_length(torch.cat([low, high]), 8, costs, 1) == 8
    assert 1 < best_draft_length(torch.cat([low.repeat(7), high]), 8, costs, 1) < 8


@pytest.mark.parametrize(
    "changes,message",
    [(dict(draft_length_policy="sometimes"), "draft_length_policy must be one of"),
     (dict(draft_cost_ratio=-0.1), "draft_cost_ratio must be a finite float"),
     (dict(draft_cost_ratio=float("nan")), "draft_cost_ratio must be a finite float"),
     (dict(draft_cost_ratio=True), "draft_cost_ratio must be a finite float")],
)
def test_config_names_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**changes)


def test_policy_counts_rejections_only_when_short():
    lengths = DraftLengths(SamplingConfig(num_draft_tokens=4, **ADAPTIVE), 3, 1, "cpu")
    before = lengths.acceptance.clone()
    lengths.update(torch.tensor([4, 2, 3]), torch.tensor([4, 1, 0]))
    after = lengths.acceptance
    # (1 + accepted) / (2 + accepted + rejections): 5/6, 2/4, 1/3
    torch.testing.assert_close(after, torch.tensor([5 / 6, 0.5, 1 / 3], dtype=torch.float64))
    assert after[0] > before[0] and after[2] < before[2]
    choice = lengths.choose(torch.tensor([10, 10, 2]))
    assert choice[0] == choice[1] >= 1 and choice[2] == 1  # one K' for the batch, capped by the remaining budget
    fixed = DraftLengths(SamplingConfig(num_draft_tokens=4), 3, 1, "cpu")
    assert fixed.choose(torch.tensor([10, 10, 2])).tolist() == [4, 4, 1]  # K, capped by each row's budget


def mean_drafts_per_round(out) -> float:
    total = out.stats.total
    return total.proposed_drafts / total.rounds


def round_counts(target, draft, ref, method, **config):
    """Per-round draft counts of every row (rounds after the first two). Shape: -> (rounds * rows,)"""
    counts = []

    def observe(record):
        if record.kind == "round" and record.index >= 2:
            counts.append(record.num_draft_tokens if record.num_draft_tokens is not None
                          else torch.full_like(record.rows, record.draft_tokens.shape[1]))

    out = sss_ext.generate(target, draft, torch.tensor([PROMPT] * 4), ref_model=ref, method=method, max_new_tokens=60,
                           num_draft_tokens=6, ignore_eos=True, seed=0, shift=0.0, observer=observe, **config)
    return out, torch.cat(counts)


@pytest.mark.parametrize("method", ("sss", "sd"))
def test_draft_equal_to_target_drives_k_to_the_maximum(method):
    target = tiny_llama(VOCAB, seed=1)
    ref = tiny_llama(VOCAB, seed=3, logit_scale=3.0) if method == "sss" else None
    out, counts = round_counts(target, target, ref, method, **ADAPTIVE)
    assert out.stats.total.acceptance_rate > 0.99
    # every round runs K = 6 but where the row's remaining budget caps it (its last round)
    assert float((counts == 6).double().mean()) > 0.7, counts.tolist()


@pytest.mark.parametrize("method", ("sss", "sd"))
def test_unrelated_draft_drives_k_to_the_minimum(method):
    target = tiny_llama(VOCAB, seed=1, logit_scale=12.0)  # peaked and unrelated: acceptance near 0
    draft = tiny_llama(VOCAB, seed=9, logit_scale=12.0)
    ref = tiny_llama(VOCAB, seed=3) if method == "sss" else None
    out, counts = round_counts(target, draft, ref, method, **ADAPTIVE)
    assert out.stats.total.acceptance_rate < 0.15
    assert float((counts == 1).double().mean()) > 0.9, counts.tolist()
    _, fixed = round_counts(target, draft, ref, method)
    assert float((fixed == 6).double().mean()) > 0.9  # the fixed policy does not adapt (negative control)


def test_measured_costs_are_used_when_no_ratio_is_given(monkeypatch):
    # round 1: 2 draft steps in 0.2 s, the rest (width 3) 0.8 s; round 2: 4 steps in 0.4 s, the rest (width 5) 1.2 s
    ticks = iter([0.0, 0.2, 1.0, 10.0, 10.4, 11.6])
    monkeypatch.setattr(draft_length.time, "perf_counter", lambda: next(ticks))
    config = SamplingConfig(num_draft_tokens=4, draft_length_policy="adaptive")
    assert DraftLengths.measures(config)
    meter = RoundCostMeter("cpu")
    lengths = DraftLengths(config, 1, 1, "cpu", meter)
    assert lengths.costs == (0.0, 1.0, 0.0)  # nothing measured yet
    for steps in (2, 4):
        meter.round_started()
        meter.drafted(steps)
        meter.round_finished(steps + 1)
    # draft 0.1 s per step; the rest 0.2 s + 0.2 s per position
    assert lengths.costs == pytest.approx((0.1, 0.2, 0.2))
    fixed_config = SamplingConfig(num_draft_tokens=4, draft_length_policy="adaptive", draft_cost_ratio=0.5)
    assert not DraftLengths.measures(fixed_config)
    fixed = DraftLengths(fixed_config, 1, 1, "cpu", meter)
    assert fixed.costs == (0.5, 1.0, 0.0)  # a given ratio is never measured


class DeferredClock:
    """Marks that complete only when released, like CUDA events before the stream reaches them."""

    def __init__(self, times):
        self.times, self.marks = iter(times), []

    def mark(self):
        self.marks.append({"time": next(self.times), "done": False})
        return self.marks[-1]

    def ready(self, mark):
        return mark["done"]

    def seconds(self, begin, end):
        return end["time"] - begin["time"]

    def release(self):
        for mark in self.marks:
            mark["done"] = True


def test_costs_are_read_only_once_the_marks_complete():
    meter = RoundCostMeter("cpu")
    meter._clock = clock = DeferredClock([0.0, 0.2, 1.0, 10.0, 10.4, 11.6, 20.0])
    meter.round_started()
    meter.drafted(2)
    meter.round_finished(3)
    assert meter.costs == (0.0, 1.0, 0.0)  # not completed: nothing read, nothing waited for
    clock.release()
    meter.round_started()  # the next round reads the completed one
    assert meter.costs == pytest.approx((0.1, 0.8, 0.0))
    meter.drafted(4)
    meter.round_finished(5)
    assert meter.costs == pytest.approx((0.1, 0.8, 0.0))
    clock.release()
    meter.round_started()
    assert meter.costs[0] == pytest.approx(0.1) and meter.costs[2] > 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (torch.cuda.is_available() is False)")
def test_cuda_rounds_are_timed_with_events():
    meter = RoundCostMeter("cuda")
    matrix = torch.randn(2048, 2048, device="cuda")
    meter.round_started()
    matrix @ matrix
    meter.drafted(2)
    for _ in range(4):
        matrix @ matrix
    meter.round_finished(3)
    torch.cuda.synchronize()
    meter.round_started()  # reads the completed round
    draft, rest, _ = meter.costs
    assert draft > 0.0 and rest > draft  # four products after the marks, one before


def test_costly_positions_shorten_the_drafts():
    acceptance = torch.full((1,), 0.8, dtype=torch.float64)
    cheap = best_draft_length(acceptance, 8, (0.05, 1.0, 0.0), 1)
    costly = best_draft_length(acceptance, 8, (0.05, 1.0, 0.5), 1)
    assert costly < cheap


def test_loop_records_the_counts_it_verified(models):
    q, r, d = models
    records = []
    sss_ext.generate(q, r, torch.tensor([PROMPT] * 2), ref_model=d, method="sss", max_new_tokens=12, num_draft_tokens=4,
                     ignore_eos=True, seed=0, draft_length_policy="adaptive",
                     observer=lambda record: records.append(record) if record.kind == "round" else None)
    assert records
    for record in records:
        counts = record.num_draft_tokens
        assert counts is not None and int(counts.max()) == record.draft_tokens.shape[1]
        assert bool((counts >= 0).all()) and bool((record.verify.num_accepted <= counts).all())


def adaptive_sss(models, prompts, seed, **changes):
    q, r, d = models
    options = dict(method="sss", max_new_tokens=LENGTH, num_draft_tokens=3, eos_token_id=EOS, seed=seed, **ADAPTIVE)
    options.update(changes)
    return sss_ext.generate(q, r, prompts, ref_model=d if options["method"] != "sd" else None, **options)


def test_adaptive_sss_matches_product_of_tilted_targets(models):
    law = sequence_law(models, PROMPT, LENGTH, tilted_probs, eos=EOS)
    out = adaptive_sss(models, torch.tensor([PROMPT] * ROWS), seed=40)
    counts = count_sequences(out.sequences)
    p_value = chi_square_pvalue(counts, law)
    print(f"adaptive sss vs prod p*: p = {p_value:.4f}, drafts per round {mean_drafts_per_round(out):.2f}")
    assert p_value > ALPHA
    assert 1.0 < mean_drafts_per_round(out) < 3.0  # rounds really mixed lengths
    untilted = sequence_law(models, PROMPT, LENGTH, lambda zq, zr, zd: torch.softmax(zq, -1), eos=EOS)
    assert chi_square_pvalue(counts, untilted) < ALPHA  # negative control


@pytest.mark.parametrize("num_draft_tokens,length", [(3, LENGTH), (2, 4)], ids=["K3-T3", "K2-T4-carry"])
def test_adaptive_sd_matches_the_target_law(models, num_draft_tokens, length):
    target_law = sequence_law(models, PROMPT, length, lambda zq, zr, zd: torch.softmax(zq, -1), eos=EOS)
    out = adaptive_sss(models, torch.tensor([PROMPT] * ROWS), seed=41, method="sd", num_draft_tokens=num_draft_tokens,
                       max_new_tokens=length)
    p_value = chi_square_pvalue(count_sequences(out.sequences), target_law)
    print(f"adaptive sd (K={num_draft_tokens}, T={length}) vs prod q: p = {p_value:.4f}")
    assert p_value > ALPHA


def test_adaptive_law_with_temperature_top_k_and_mixed_batch(models):
    temperature, top_k, shift = 0.7, 5, 0.5
    law = sequence_law(models, PROMPT, LENGTH, lambda zq, zr, zd: sss_ext.warp_probs(zq + shift * (zr - zd), temperature, top_k, 1.0))
    prompts = [PROMPT if index % 2 == 0 else [4, 5, 6, 7, 1] for index in range(ROWS)]
    out = adaptive_sss(models, prompts, seed=42, temperature=temperature, top_k=top_k, shift=shift, eos_token_id=None,
                       ignore_eos=True)
    mine = [out.sequences[i] for i in range(0, ROWS, 2)]
    p_value = chi_square_pvalue(count_sequences(mine), law)
    print(f"adaptive sss (t=0.7, top_k=5, shift=0.5, mixed batch) vs prod p*: p = {p_value:.4f}")
    assert p_value > ALPHA
