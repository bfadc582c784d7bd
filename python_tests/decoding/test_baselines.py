"""Baselines of docs/algorithm.md §9: each keeps its defining property."""

import math

import pytest
import torch

import sss_ext
from sss_ext.decoding.baselines import _softmax_pick
from decoding_helpers import chi_square_pvalue, full_logits, one_thread, sum_reward, trio  # noqa: F401  (one_thread: autouse fixture)

PROMPTS = [[1, 2], [3], [4, 5, 6]]


@pytest.fixture(scope="module")
def models():
    return trio(10)


class RecordingReward:
    """Deterministic reward over token ids: occurrences of token 3 plus a tiny length tie-break."""

    def __init__(self):
        self.calls = []

    def __call__(self, sequences):
        self.calls.append([s.clone() for s in sequences])
        return [float((s == 3).sum()) + 0.01 * float((s == 7).sum()) for s in sequences]


def test_best_of_n_returns_the_highest_reward(models):
    q, _, _ = models
    reward = RecordingReward()
    out = sss_ext.generate(q, None, PROMPTS, method="bon", reward_fn=reward, num_samples=6, max_new_tokens=8,
                           eos_token_id=0, seed=1)
    assert len(reward.calls) == 1 and len(reward.calls[0]) == 6 * len(PROMPTS)
    for prompt, sequence, extra in zip(PROMPTS, out.sequences, out.extras):
        assert len(extra["candidates"]) == 6
        rewards = reward([torch.cat([torch.tensor(prompt), c]) for c in extra["candidates"]])
        assert extra["rewards"] == rewards
        assert extra["chosen"] == rewards.index(max(rewards))
        assert sequence.tolist() == extra["candidates"][extra["chosen"]].tolist()
    assert len({tuple(c.tolist()) for c in out.extras[0]["candidates"]}) > 1
    assert out.stats.total.reward_calls == 1 and out.stats.total.reward_sequences == 18


def test_best_of_one_is_vanilla_sampling(models):
    q, _, _ = models
    bon = sss_ext.generate(q, None, PROMPTS, method="bon", reward_fn=sum_reward(3), num_samples=1, max_new_tokens=8, seed=4)
    vanilla = sss_ext.generate(q, None, PROMPTS, method="vanilla", max_new_tokens=8, seed=4)
    assert [s.tolist() for s in bon.sequences] == [s.tolist() for s in vanilla.sequences]


def test_spec_rejection_with_zero_rate_is_best_of_n(models):
    q, _, _ = models
    kwargs = dict(num_samples=5, max_new_tokens=9, eos_token_id=0, seed=2)
    bon = sss_ext.generate(q, None, PROMPTS, method="bon", reward_fn=sum_reward(3), **kwargs)
    rejection = sss_ext.generate(q, None, PROMPTS, method="spec-rejection", reward_fn=sum_reward(3), rejection_rate=0.0,
                                 rejection_interval=2, **kwargs)
    assert [s.tolist() for s in rejection.sequences] == [s.tolist() for s in bon.sequences]
    for name in ("target_calls", "target_tokens", "reward_calls", "reward_sequences"):
        assert getattr(rejection.stats.total, name) == getattr(bon.stats.total, name)
    assert all(extra["decisions"] == [] for extra in rejection.extras)


def test_spec_rejection_drops_the_lowest_partial_rewards(models):
    q, _, _ = models
    reward = RecordingReward()
    n, interval, rate, length = 8, 2, 0.5, 10
    out = sss_ext.generate(q, None, PROMPTS, method="spec-rejection", reward_fn=reward, num_samples=n,
                           rejection_interval=interval, rejection_rate=rate, max_new_tokens=length, ignore_eos=True, seed=3)
    bon = sss_ext.generate(q, None, PROMPTS, method="bon", reward_fn=sum_reward(3), num_samples=n, max_new_tokens=length,
                           ignore_eos=True, seed=3)
    decision_calls = reward.calls[:-1]
    alive, expected_decisions = n, 0
    for _ in range(math.ceil(length / interval) - 1):  # a boundary where nothing would be dropped costs no reward call
        drop = math.floor(rate * alive)
        expected_decisions += drop > 0
        alive -= drop
    assert len(decision_calls) == expected_decisions == 3
    assert out.stats.total.reward_calls == len(reward.calls)
    for call_index, call in enumerate(decision_calls):  # partial responses: prompt + (call+1)*m tokens
        assert {len(s) for s in call} <= {len(p) + (call_index + 1) * interval for p in PROMPTS}
    for prompt, sequence, extra in zip(PROMPTS, out.sequences, out.extras):
        alive = n
        for decision in extra["decisions"]:
            assert len(decision["rows"]) == alive
            assert len(decision["dropped"]) == math.floor(rate * alive)
            scores = dict(zip(decision["rows"], decision["scores"]))
            kept = [scores[row] for row in decision["rows"] if row not in decision["dropped"]]
            assert max(scores[row] for row in decision["dropped"]) <= min(kept)
            alive -= len(decision["dropped"])
        assert len(extra["finished"]) == alive
        assert extra["rewards"][extra["finished"].index(extra["chosen"])] == max(extra["rewards"])
        assert sequence.tolist() == extra["candidates"][extra["finished"].index(extra["chosen"])].tolist()
        assert sequence.numel() == length
    # early rejection saves target work compared with best-of-N
    assert out.stats.total.target_tokens < bon.stats.total.target_tokens
    assert out.stats.total.target_calls == bon.stats.total.target_calls


@torch.no_grad()
def _log_prob(model, prompt, response, temperature):
    total = 0.0
    for i, token in enumerate(response):
        probs = sss_ext.warp_probs(full_logits(model, prompt + response[:i]), temperature)
        total += math.log(float(probs[token]))
    return total


def test_soft_bon_scores_and_accounting(models):
    q, r, _ = models
    beta, n, length = 2.0, 4, 5
    out = sss_ext.generate(q, r, PROMPTS, method="soft-bon", reward_fn=sum_reward(3), num_samples=n, beta=beta,
                           temperature=0.9, max_new_tokens=length, ignore_eos=True, seed=5)
    for prompt, sequence, extra in zip(PROMPTS, out.sequences, out.extras):
        assert not extra["fallback"]
        for index, candidate in enumerate(extra["candidates"]):
            response = candidate.tolist()
            log_q = _log_prob(q, prompt, response, 0.9)
            log_r = _log_prob(r, prompt, response, 0.9)
            reward = float(sum(t == 3 for t in prompt + response))
            assert extra["log_q"][index] == pytest.approx(log_q, abs=1e-4)
            assert extra["log_r"][index] == pytest.approx(log_r, abs=1e-4)
            assert extra["scores"][index] == pytest.approx(beta * reward + log_q - log_r, abs=1e-3)
        assert sequence.tolist() == extra["candidates"][extra["chosen"]].tolist()
    total = out.stats.total
    assert total.target_calls == 1  # one batched target forward scores every candidate
    assert total.draft_calls == 1 + length  # prefill + one step per token
    assert total.reward_calls == 1 and total.reward_sequences == n * len(PROMPTS)


def test_soft_bon_falls_back_to_the_target_below_the_threshold(models):
    q, r, _ = models
    n, length = 4, 5
    out = sss_ext.generate(q, r, PROMPTS, method="soft-bon", reward_fn=sum_reward(3), num_samples=n, beta=50.0,
                           soft_bon_threshold=1e9, max_new_tokens=length, ignore_eos=True, seed=6)
    for prompt, sequence, extra in zip(PROMPTS, out.sequences, out.extras):
        assert extra["fallback"]
        rewards = extra["fallback_rewards"]
        assert len(extra["fallback_candidates"]) == n
        # beta = 50: the soft pick is the best target candidate
        assert rewards[extra["fallback_chosen"]] == max(rewards)
        assert sequence.tolist() == extra["fallback_candidates"][extra["fallback_chosen"]].tolist()
    total = out.stats.total
    assert total.target_calls == 1 + 1 + length  # scoring + fallback prefill + fallback steps
    assert total.reward_calls == 2
    never = sss_ext.generate(q, r, PROMPTS, method="soft-bon", reward_fn=sum_reward(3), num_samples=n,
                             soft_bon_threshold=-1e9, max_new_tokens=length, ignore_eos=True, seed=6)
    assert not any(extra["fallback"] for extra in never.extras)


def test_soft_pick_follows_the_softmax():
    scores = torch.tensor([0.3, -1.0, 1.2, float("-inf"), 0.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    uniforms = torch.rand(20000, generator=generator, dtype=torch.float64)
    counts = {}
    for u in uniforms.tolist():
        pick = _softmax_pick(scores, u)
        counts[(pick,)] = counts.get((pick,), 0) + 1
    law = {(i,): float(p) for i, p in enumerate(torch.softmax(scores, 0)) if p > 0}
    assert chi_square_pvalue(counts, law) > 0.01
    assert (3,) not in counts
    wrong = {(i,): 1 / 4 for i in (0, 1, 2, 4)}
    assert chi_square_pvalue(counts, wrong) < 0.01
    assert _softmax_pick(torch.full((3,), float("-inf"), dtype=torch.float64), 0.5) == -1


def test_reward_model_from_transformers(models):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    q, _, _ = models
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=32, num_labels=1, pad_token_id=0, max_position_embeddings=64)
    reward_model = LlamaForSequenceClassification(config).eval()
    out = sss_ext.generate(q, None, PROMPTS, method="bon", reward_fn=reward_model, num_samples=3, max_new_tokens=4,
                           ignore_eos=True, seed=8)
    for prompt, extra in zip(PROMPTS, out.extras):
        for candidate, score in zip(extra["candidates"], extra["rewards"]):
            ids = torch.cat([torch.tensor(prompt), candidate])[None]
            with torch.no_grad():
                expected = float(reward_model(input_ids=ids).logits[0, 0])
            assert score == pytest.approx(expected, abs=1e-5)
    assert out.stats.total.reward_calls == 1
