"""Efficiency accounting (acceptance point 4): every forward of every model and every reward call is counted."""

import math

import pytest
import torch

import sss_ext
from decoding_helpers import one_thread, sum_reward, trio  # noqa: F401  (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def models():
    return trio(10)


class CallCounter:
    """Counts real forward invocations and positions of a model through a forward hook."""

    def __init__(self, model):
        self.calls = 0
        self.tokens = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, args, kwargs_or_output, *rest):
        self.calls += 1

    def close(self):
        self.handle.remove()


def _counted(models, fn):
    counters = [CallCounter(m) for m in models]
    try:
        out = fn()
    finally:
        for c in counters:
            c.close()
    return out, [c.calls for c in counters]


@pytest.mark.parametrize("new_tokens,num_draft_tokens", [(10, 3), (7, 2), (5, 4)])
def test_all_drafts_accepted_when_target_is_reference(models, new_tokens, num_draft_tokens):
    """q = d and shift 1 give p* = r: every draft is accepted, target calls = ceil(T / (K+1))."""
    _, r, d = models
    prompts = [[3], [5], [7]]  # one-token prompts: no prefill forward
    out, real_calls = _counted((d, r), lambda: sss_ext.generate(
        d, r, prompts, ref_model=d, method="sss", max_new_tokens=new_tokens, num_draft_tokens=num_draft_tokens,
        ignore_eos=True, seed=1))
    total = out.stats.total
    rounds = math.ceil(new_tokens / (num_draft_tokens + 1))
    assert total.acceptance_rate == 1.0
    assert total.target_calls == rounds
    assert total.ref_calls == rounds
    assert total.target_tokens == len(prompts) * new_tokens  # K'+1 positions per round, sum = T
    assert total.draft_calls == new_tokens  # K'+1 draft steps per round under SSS
    assert total.new_tokens == len(prompts) * new_tokens
    assert total.rounds == len(prompts) * rounds
    assert total.mean_accepted_length == (new_tokens - rounds) / rounds
    # the stats count exactly the forward passes that ran (target and ref are one module here)
    assert real_calls == [total.target_calls + total.ref_calls, total.draft_calls]
    for stats in out.stats.per_prompt:
        assert stats.target_calls == rounds and stats.new_tokens == new_tokens
        assert stats.target_tokens == new_tokens and stats.acceptance_rate == 1.0


def test_sd_with_draft_equal_to_target_accepts_everything(models):
    q, _, _ = models
    out, real_calls = _counted((q,), lambda: sss_ext.generate(
        q, q, [[1, 2, 3], [4, 5]], method="sd", max_new_tokens=10, num_draft_tokens=3, ignore_eos=True, seed=2))
    total = out.stats.total
    assert total.acceptance_rate == 1.0
    assert total.target_calls == 1 + math.ceil(10 / 4)  # prefill + rounds
    # SD runs K' draft steps; the accepted last draft is carried into the next round's first step
    assert total.draft_calls == 1 + 3 + 3 + 1
    assert total.draft_tokens == 2 * (2 + 3 + (2 + 1 + 1) + 2)  # prefill width 2, carried step width 2
    assert real_calls == [total.target_calls + total.draft_calls]


def test_counts_equal_real_forward_calls_with_mixed_acceptance(models):
    q, r, d = models
    out, real_calls = _counted(models, lambda: sss_ext.generate(
        q, r, [[1, 2], [3], [4, 5, 6, 7]], ref_model=d, method="sss", max_new_tokens=12, num_draft_tokens=3,
        eos_token_id=0, seed=4))
    total = out.stats.total
    assert real_calls == [total.target_calls, total.draft_calls, total.ref_calls]
    # one target forward per round for the whole batch (+ the prefill), although rows advance differently
    assert total.target_calls == 1 + max(s.rounds for s in out.stats.per_prompt)
    assert len({s.rounds for s in out.stats.per_prompt}) > 1 or len({s.new_tokens for s in out.stats.per_prompt}) > 1
    assert 0 < total.acceptance_rate < 1
    assert total.accepted_drafts <= total.proposed_drafts
    for name in ("target_tokens", "draft_tokens", "ref_tokens", "rounds", "proposed_drafts", "accepted_drafts", "new_tokens"):
        assert getattr(total, name) == sum(getattr(s, name) for s in out.stats.per_prompt)
    assert total.wall_time >= max(s.wall_time for s in out.stats.per_prompt) > 0


def test_vanilla_and_bon_counts(models):
    q, _, _ = models
    out, real_calls = _counted((q,), lambda: sss_ext.generate(
        q, None, [[1], [2]], method="vanilla", max_new_tokens=6, ignore_eos=True))
    assert out.stats.total.target_calls == 6 == real_calls[0]
    assert out.stats.total.target_tokens == 12
    calls = []

    def reward(texts):
        calls.append(len(texts))
        return [0.0] * len(texts)

    out, real_calls = _counted((q,), lambda: sss_ext.generate(
        q, None, [[1], [2]], method="bon", max_new_tokens=6, ignore_eos=True, num_samples=3, reward_fn=reward))
    total = out.stats.total
    assert total.target_calls == 6 == real_calls[0]
    assert total.target_tokens == 6 * 6
    assert (total.reward_calls, total.reward_sequences) == (len(calls), sum(calls)) == (1, 6)
    assert [s.reward_sequences for s in out.stats.per_prompt] == [3, 3]


def test_stats_to_dict_is_json_ready(models):
    import json

    q, r, d = models
    out = sss_ext.generate(q, r, [[1]], ref_model=d, max_new_tokens=4, reward_fn=sum_reward(1))
    json.dumps(out.stats.to_dict())
    assert out.stats.target_calls == out.stats.total.target_calls
