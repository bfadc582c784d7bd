"""Logits processors, stopping criteria and streamers in the decoding loop (docs/algorithm.md §1, "Logits processors").

* every model's logits are processed at every position with that position's own prefix
  (checked against uncached forwards, position by position);
* the law of whole generated sequences equals the processed tilted target
  ``Π_t softmax(proc(zq) + λ(proc(zr) − proc(zd)))`` obtained by enumeration (chi-square,
  alpha = 0.01), and with λ = 0 the processed target law; negative controls must fail: the
  unprocessed law, and a loop that processes every position of a round with the round's
  starting prefix (ignoring the drafts);
* stopping criteria cut a row after the first token where they fire; the streamer gets the
  kept tokens as rows advance; bad hooks raise ``ValueError`` naming the argument.
"""

import pytest
import torch
from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor)

import sss_ext
from decoding_helpers import chi_square_pvalue, count_sequences, full_logits, one_thread, sequence_law, sum_reward, trio  # noqa: F401
from sss_ext.decoding import RecordingObserver
from sss_ext.decoding.hooks import GenerationHooks

VOCAB, LENGTH, ROWS, EOS = 8, 3, 24000, 0
PROMPT = [1, 2]
ALPHA = 0.01


def _processor(prompt_length: int = len(PROMPT)):
    """Repetition penalty, no repeated 2-grams, and no EOS before 2 new tokens."""
    return LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(3.0),
        NoRepeatNGramLogitsProcessor(2),
        MinNewTokensLengthLogitsProcessor(prompt_length, 2, EOS),
    ])


def _processed_tilt(shift: float):
    """p* = softmax(proc(zq) + shift * (proc(zr) - proc(zd))), a token masked (-inf) in any model excluded."""

    def step_law(zq, zr, zd):
        masked = torch.isneginf(zq) | torch.isneginf(zr) | torch.isneginf(zd)
        scores = torch.where(masked, -torch.inf, zq + shift * (zr - zd))
        return torch.softmax(scores, dim=-1)

    return step_law


def _target(zq, zr, zd):
    return torch.softmax(zq, dim=-1)


@pytest.fixture(scope="module")
def models():
    return trio(VOCAB)


def _sample(models, method, seed, **kwargs):
    q, r, d = models
    return sss_ext.generate(q, r, torch.tensor([PROMPT] * ROWS), ref_model=d if method.startswith("sss") else None,
                            method=method, max_new_tokens=LENGTH, num_draft_tokens=2, eos_token_id=EOS, seed=seed,
                            logits_processor=_processor(), **kwargs)


@pytest.fixture(scope="module")
def processed_tilt_law(models):
    return sequence_law(models, PROMPT, LENGTH, _processed_tilt(1.0), eos=EOS, processor=_processor())


@pytest.fixture(scope="module")
def sss_samples(models):
    return _sample(models, "sss", seed=31)


def test_processors_change_the_law(models, processed_tilt_law):
    """The processed and unprocessed laws are far apart, so the controls below can fail."""
    plain = sequence_law(models, PROMPT, LENGTH, _processed_tilt(1.0), eos=EOS)
    keys = set(plain) | set(processed_tilt_law)
    total_variation = 0.5 * sum(abs(plain.get(k, 0.0) - processed_tilt_law.get(k, 0.0)) for k in keys)
    assert total_variation > 0.2


def test_sss_with_processors_matches_the_processed_tilt(sss_samples, processed_tilt_law):
    p_value = chi_square_pvalue(count_sequences(sss_samples.sequences), processed_tilt_law)
    print(f"sss + processors vs prod processed p*: p = {p_value:.4f}")
    assert p_value > ALPHA
    assert 0.0 < sss_samples.stats.total.acceptance_rate < 1.0


def test_sss_with_processors_does_not_match_the_unprocessed_tilt(models, sss_samples):
    """Negative control: the same samples against the tilt of the unprocessed models."""
    law = sequence_law(models, PROMPT, LENGTH, _processed_tilt(1.0), eos=EOS)
    p_value = chi_square_pvalue(count_sequences(sss_samples.sequences), law)
    print(f"sss + processors vs prod unprocessed p* (negative control): p = {p_value:.3g}")
    assert p_value < ALPHA


def test_processing_every_position_with_the_round_start_prefix_fails(models, processed_tilt_law, monkeypatch):
    """Negative control: processors that ignore the drafts of the round (each position sees the
    prefix the round started from) give a different law."""
    process = GenerationHooks.process

    def round_start_prefix(self, book, drafts, logits):
        return torch.cat([process(self, book, [], logits[:, w: w + 1]) for w in range(logits.shape[1])], dim=1)

    monkeypatch.setattr(GenerationHooks, "process", round_start_prefix)
    out = _sample(models, "sss", seed=32)
    p_value = chi_square_pvalue(count_sequences(out.sequences), processed_tilt_law)
    print(f"sss, processors blind to the drafts vs prod processed p* (negative control): p = {p_value:.3g}")
    assert p_value < ALPHA


def test_sd_with_processors_matches_the_processed_target(models):
    """lambda = 0 (standard speculative sampling): exactly the processed target's law, as transformers samples it."""
    law = sequence_law(models, PROMPT, LENGTH, _target, eos=EOS, processor=_processor())
    counts = count_sequences(_sample(models, "sd", seed=33).sequences)
    p_value = chi_square_pvalue(counts, law)
    print(f"sd + processors vs prod proc(q): p = {p_value:.4f}")
    assert p_value > ALPHA
    negative = chi_square_pvalue(counts, sequence_law(models, PROMPT, LENGTH, _target, eos=EOS))
    print(f"sd + processors vs prod q (negative control): p = {negative:.3g}")
    assert negative < ALPHA


@pytest.mark.parametrize("method", ["sss", "sd", "vanilla", "draft"])
def test_every_position_is_processed_with_its_own_prefix(models, method):
    """The logits given to the sampler op equal the processor applied to uncached logits of
    prompt + emitted tokens + the round's drafts before that position, for every model."""
    q, r, d = models
    roles = {"sss": ("target", "draft", "ref"), "sd": ("target", "draft"), "vanilla": ("target",), "draft": ("draft",)}[method]
    model_of = {"target": q, "draft": r, "ref": d}
    prompts = [[1, 2], [3], [4, 5, 6, 7, 1]]
    processor = _processor()
    observer = RecordingObserver(keep_logits=True)
    out = sss_ext.generate(q, r, prompts, ref_model=d, method=method, max_new_tokens=7, num_draft_tokens=3,
                           eos_token_id=EOS, seed=5, logits_processor=processor, observer=observer)
    emitted = [0] * len(prompts)
    checked = masked = 0
    for record in observer.records:
        if record.kind not in ("round", "step"):
            continue
        for batch_row, row in enumerate(record.rows.tolist()):
            prefix = prompts[row] + out.sequences[row][: emitted[row]].tolist()
            drafts = record.draft_tokens[batch_row].tolist() if record.draft_tokens is not None else []
            for role in roles:
                logits = record.logits[role][batch_row]
                logits = logits[None] if logits.dim() == 1 else logits  # a step: (V,)
                for position in range(logits.shape[0]):
                    ids = prefix + drafts[:position]
                    expected = processor(torch.tensor([ids]), full_logits(model_of[role], ids).float()[None])[0]
                    got = logits[position]
                    assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), (method, role, ids)
                    finite = torch.isfinite(expected)
                    torch.testing.assert_close(got[finite], expected[finite], atol=1e-4, rtol=1e-4)
                    checked += 1
                    masked += int(torch.isneginf(expected).sum())
            emitted[row] += int(record.num_emitted[batch_row])
    assert emitted == [int(s.numel()) for s in out.sequences]
    assert checked >= len(roles) * sum(emitted) and masked > 0


def _stop_on(token: int):
    def criterion(input_ids, scores):
        return input_ids[:, -1] == token

    return criterion


@pytest.mark.parametrize("method", ["sss", "sd", "vanilla"])
def test_stopping_criteria_cut_after_the_first_firing_token(models, method):
    """Batch of one: the same seed draws the same tokens, so the stopped sequence is the
    unstopped one cut after the first stop token."""
    q, r, d = models
    kwargs = dict(ref_model=d, method=method, max_new_tokens=12, num_draft_tokens=4, ignore_eos=True)
    cut = 0
    for seed in range(8):
        free = sss_ext.generate(q, r, [PROMPT], seed=seed, **kwargs).sequences[0].tolist()
        stopped = sss_ext.generate(q, r, [PROMPT], seed=seed, stopping_criteria=_stop_on(3), **kwargs).sequences[0].tolist()
        expected = free[: free.index(3) + 1] if 3 in free else free
        assert stopped == expected
        cut += len(stopped) < len(free)
    assert cut >= 2


def test_stopping_criteria_stop_each_row_of_a_batch(models):
    q, r, d = models
    out = sss_ext.generate(q, r, [PROMPT, [3], [4, 5, 6]] * 4, ref_model=d, max_new_tokens=10, num_draft_tokens=3,
                           ignore_eos=True, seed=2, stopping_criteria=_stop_on(5))
    for sequence in out.sequences:
        tokens = sequence.tolist()
        assert 5 not in tokens[:-1]
        assert tokens[-1] == 5 or len(tokens) == 10


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        assert value.shape[0] == 1 and value.dtype == torch.int64
        self.puts.append(value[0].tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("method", ["sss", "sd", "vanilla"])
def test_streamer_receives_the_kept_tokens_as_the_row_advances(models, method):
    q, r, d = models
    streamer = RecordingStreamer()
    observer = RecordingObserver()
    out = sss_ext.generate(q, r, [PROMPT], ref_model=d, method=method, max_new_tokens=12, num_draft_tokens=3,
                           ignore_eos=True, seed=4, streamer=streamer, observer=observer)
    assert sum(streamer.puts, []) == out.sequences[0].tolist()
    assert streamer.ended == 1
    records = [rec for rec in observer.records if rec.kind in ("round", "step")]
    assert len(streamer.puts) == sum(int(rec.num_emitted[0]) > 0 for rec in records) >= 2


def test_hooks_refuse_bad_arguments(models):
    q, r, d = models

    def run(prompts=(PROMPT,), method="sss", **kwargs):
        return sss_ext.generate(q, r, [list(p) for p in prompts], ref_model=d, method=method, max_new_tokens=3,
                                num_draft_tokens=2, reward_fn=sum_reward(3), num_samples=2, **kwargs)

    def nan_processor(input_ids, scores):
        return torch.full_like(scores, float("nan"))

    def mask_all(input_ids, scores):
        return torch.full_like(scores, -float("inf"))

    def wrong_shape(input_ids, scores):
        return scores[:, :-1]

    for kwargs, message in [
        (dict(logits_processor=5), "logits_processor must be None or a callable"),
        (dict(stopping_criteria="stop"), "stopping_criteria must be None or a callable"),
        (dict(streamer=object()), "streamer must have put"),
        (dict(logits_processor=nan_processor), "NaN or \\+inf"),
        (dict(logits_processor=mask_all), "masked every token"),
        (dict(logits_processor=wrong_shape), "must return scores of shape"),
        (dict(stopping_criteria=lambda ids, scores: torch.zeros(2)), "stopping_criteria must return a bool tensor"),
        (dict(context_ids=[torch.tensor(PROMPT)]), "context_ids is only used"),
        (dict(logits_processor=_processor(), context_ids=[torch.tensor([2, 1])]), "must end with prompt 0"),
        (dict(logits_processor=_processor(), context_ids=[torch.tensor([VOCAB, 1, 2])]), "token ids in \\[0, 8\\)"),
        (dict(logits_processor=_processor(), context_ids=[torch.tensor([1.0, 2.0])]), "1-D integer tensor"),
        (dict(logits_processor=_processor(), context_ids=[]), "list of 1"),
        (dict(logits_processor=_processor(), method="soft-bon"), "not supported by method 'soft-bon'"),
        (dict(streamer=RecordingStreamer(), prompts=(PROMPT, [3])), "streamer needs a single generated sequence"),
        (dict(streamer=RecordingStreamer(), method="bon"), "streamer needs a single generated sequence"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(**kwargs)


@pytest.mark.parametrize("max_new_tokens,num_draft_tokens", [(1, 1), (2, 1), (5, 7)])
def test_hooks_at_small_budgets(models, max_new_tokens, num_draft_tokens):
    """Budgets of 1-2 tokens and K beyond the budget: processors, criteria and streamer still agree."""
    q, r, d = models
    streamer = RecordingStreamer()
    out = sss_ext.generate(q, r, [[4]], ref_model=d, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
                           ignore_eos=True, seed=1, logits_processor=_processor(1), stopping_criteria=_stop_on(7),
                           streamer=streamer)
    tokens = out.sequences[0].tolist()
    assert 1 <= len(tokens) <= max_new_tokens and sum(streamer.puts, []) == tokens and streamer.ended == 1
    assert EOS not in tokens[:2] and 7 not in tokens[:-1]
