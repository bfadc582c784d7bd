"""The decoding loop with the prompt-lookup proposer (``SamplingConfig(proposer="ngram")``).

* Exactness: the empirical law of whole sequences equals the law obtained by enumerating
  every prefix under the tiny models (chi-square, alpha = 0.01): the target law for sd, the
  tilted law for sss. Negative controls: the same samples against the other law, and a
  planted wrong acceptance (the one-hot proposal verified as if it had been drawn from the
  target, sd, or from ``r``, sss) that must fail.
* Batch invariance: a prompt's tokens are the same alone and inside a batch (same seed).
* Greedy: temperature 0 gives the target's (sd) or the tilted (sss) greedy decoding.
* Each round's proposals are the proposer's output on the row's history, the cached logits
  equal recomputation, and the stats count drafts, acceptances and forwards per model.
"""

import pytest
import torch

import sss_ext
from sss_ext.decoding.ngram import propose_ngrams
from sss_ext.decoding.observe import RecordingObserver
from decoding_helpers import (chi_square_pvalue, count_sequences, full_logits, greedy_reference, one_thread,  # noqa: F401
                              sequence_law, tilted_probs, trio)

VOCAB, LENGTH, ROWS, EOS = 8, 4, 24000, 0
PROMPT = [1, 2, 3, 1, 2]  # the suffix (1, 2) matches at once: the first round already verifies drafts
ALPHA = 0.01


@pytest.fixture(scope="module")
def models():
    # a peaky target (logit scale 3) so that copied tokens are often accepted
    return trio(VOCAB, scales=(3.0, 3.0, 3.0))


def _target_law(zq, zr, zd):
    return torch.softmax(zq, dim=-1)


@pytest.fixture(scope="module")
def laws(models):
    return {"sd": sequence_law(models, PROMPT, LENGTH, _target_law, eos=EOS),
            "sss": sequence_law(models, PROMPT, LENGTH, tilted_probs, eos=EOS)}


def _generate(models, method, rows=ROWS, **kwargs):
    q, r, d = models
    return sss_ext.generate(q, r if method == "sss" else None, torch.tensor([PROMPT] * rows),
                            ref_model=d if method == "sss" else None, method=method, proposer="ngram",
                            max_new_tokens=LENGTH, num_draft_tokens=3, eos_token_id=EOS, **kwargs)


@pytest.mark.parametrize("method", ["sd", "sss"])
def test_ngram_law_is_exact(models, laws, method):
    out = _generate(models, method, seed=21)
    counts = count_sequences(out.sequences)
    p_value = chi_square_pvalue(counts, laws[method])
    other = "sss" if method == "sd" else "sd"
    negative = chi_square_pvalue(counts, laws[other])
    total = out.stats.total
    print(f"{method} ngram vs its law: p = {p_value:.4f}; vs the {other} law (negative control): p = {negative:.3g}; "
          f"acceptance {total.acceptance_rate:.3f}, drafts per row {total.proposed_drafts / ROWS:.2f}")
    assert p_value > ALPHA
    assert negative < ALPHA
    # thousands of drafts were accepted and thousands rejected: both branches of the rule ran
    assert min(total.accepted_drafts, total.proposed_drafts - total.accepted_drafts) > 1000
    assert total.draft_calls == (total.target_calls if method == "sss" else 0)


@pytest.mark.parametrize("method", ["sd", "sss"])
def test_planted_wrong_acceptance_fails(models, laws, monkeypatch, method):
    """Negative control: verifying the one-hot drafts as if they were drawn from the target (sd, always
    accepted) or from ``r`` (sss) instead of a point mass breaks the law, and the test sees it."""
    real = sss_ext.ops.verify

    def planted(target_logits, draft_logits, draft_tokens, ref_logits=None, *, aligned_logits=None, **kwargs):
        if draft_logits is None:
            draft_logits = target_logits if aligned_logits is None else aligned_logits
        return real(target_logits, draft_logits, draft_tokens, ref_logits, **kwargs)

    monkeypatch.setattr(sss_ext.ops, "verify", planted)
    out = _generate(models, method, rows=ROWS // 2, seed=22)
    p_value = chi_square_pvalue(count_sequences(out.sequences), laws[method])
    print(f"{method} ngram with a planted wrong acceptance vs its law: p = {p_value:.3g}")
    assert p_value < ALPHA


PROMPTS = [[1, 2, 3, 1, 2], [4], [5, 6, 5, 6, 5, 6, 5], [2, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


@pytest.mark.parametrize("method", ["sd", "sss"])
def test_a_prompt_gets_the_same_tokens_alone_and_in_a_batch(models, method):
    q, r, d = trio(10, num_hidden_layers=2)
    kwargs = dict(ref_model=d if method == "sss" else None, method=method, proposer="ngram", max_new_tokens=16,
                  num_draft_tokens=3, eos_token_id=0, seed=5, temperature=0.8)
    batched = sss_ext.generate(q, r, PROMPTS, **kwargs)
    for index, prompt in enumerate(PROMPTS):
        alone = sss_ext.generate(q, r, [prompt], prompt_indices=[index], **kwargs)
        assert alone.sequences[0].tolist() == batched.sequences[index].tolist()
    assert batched.stats.total.proposed_drafts > 0 and batched.stats.total.accepted_drafts > 0


@pytest.fixture(scope="module")
def deep_models():
    return trio(12, num_hidden_layers=2)


@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_sd_greedy_equals_target_greedy(deep_models, num_draft_tokens):
    q, _, _ = deep_models
    out = sss_ext.generate(q, None, PROMPTS, method="sd", proposer="ngram", temperature=0.0, max_new_tokens=16,
                           num_draft_tokens=num_draft_tokens, ignore_eos=True)
    for prompt, sequence in zip(PROMPTS, out.sequences):
        assert sequence.tolist() == greedy_reference([q], prompt, 16, lambda zq: zq)
    total = out.stats.total
    assert 0 < total.accepted_drafts < total.proposed_drafts  # greedy loops repeat: copied drafts are accepted


@pytest.mark.parametrize("shift", [1.0, 0.5])
def test_sss_greedy_equals_tilted_greedy(deep_models, shift):
    q, r, d = deep_models
    out = sss_ext.generate(q, r, PROMPTS, ref_model=d, method="sss", proposer="ngram", temperature=0.0, max_new_tokens=16,
                           num_draft_tokens=3, shift=shift, ignore_eos=True)
    tilted = lambda zq, zr, zd: zq + shift * (zr - zd)  # noqa: E731
    for prompt, sequence in zip(PROMPTS, out.sequences):
        assert sequence.tolist() == greedy_reference([q, r, d], prompt, 16, tilted)
    assert out.stats.total.accepted_drafts > 0


@pytest.mark.parametrize("method", ["sd", "sss"])
def test_rounds_propose_lookups_and_caches_hold_the_accepted_prefix(method):
    """Per round: the drafts are propose_ngrams of the row's history, the cached logits of every model
    equal a no-cache forward over the row's sequence, and the counters add up."""
    q, r, d = models = trio(10, num_hidden_layers=2)
    observer = RecordingObserver(keep_logits=True)
    out = sss_ext.generate(q, r if method == "sss" else None, PROMPTS, ref_model=d if method == "sss" else None,
                           method=method, proposer="ngram", ngram_sizes=(2, 1), max_new_tokens=14, num_draft_tokens=3,
                           eos_token_id=0, seed=3, observer=observer)
    sequences = {row: list(prompt) for row, prompt in enumerate(PROMPTS)}
    error, proposed, accepted, mixed = 0.0, 0, 0, False
    rounds = observer.rounds()
    for record in rounds:
        counts = record.num_draft_tokens
        remaining = torch.tensor([14 - (len(sequences[row]) - len(PROMPTS[row])) for row in record.rows.tolist()])
        for b, row in enumerate(record.rows.tolist()):
            history = torch.tensor([sequences[row]])
            drafts, count = propose_ngrams(history, torch.tensor([history.shape[1]]), min(3, int(remaining[b]) - 1), (2, 1))
            assert int(counts[b]) == int(count[0])
            assert record.draft_tokens[b, : int(counts[b])].tolist() == drafts[0, : int(count[0])].tolist()
            for i in range(int(counts[b]) + 1):
                context = sequences[row] + record.draft_tokens[b, :i].tolist()
                for model, role in zip(models, ("target", "draft", "ref")):
                    logits = record.logits.get(role)
                    if logits is not None:
                        error = max(error, float((full_logits(model, context) - logits[b, i].double()).abs().max()))
        mixed |= len(set(counts.tolist())) > 1
        proposed += int(counts.sum())
        accepted += int(record.verify.num_accepted.sum())
        for b, row in enumerate(record.rows.tolist()):
            sequences[row] += record.tokens[b, : int(record.num_emitted[b])].tolist()
        assert set(record.forwards) == ({"target", "draft", "ref"} if method == "sss" else {"target"})
    assert [sequences[row][len(PROMPTS[row]):] for row in range(len(PROMPTS))] == [s.tolist() for s in out.sequences]
    assert error < 1e-4
    assert mixed, "no round with different draft counts per row"
    total = out.stats.total
    row_rounds = sum(len(record.rows) for record in rounds)
    assert (total.proposed_drafts, total.accepted_drafts, total.rounds) == (proposed, accepted, row_rounds)
    assert total.target_calls == len(rounds) + 1  # one forward per round and the prefill
    assert total.draft_calls == (total.target_calls if method == "sss" else 0)


@pytest.mark.parametrize("method,message", [
    ("vanilla", "method='vanilla' does not take proposer='ngram'"),
    ("sss-paper", "method='sss-paper' does not take proposer='ngram'"),
])
def test_methods_without_the_ngram_proposer_refuse_it(models, method, message):
    q, r, d = models
    with pytest.raises(ValueError, match=message):
        sss_ext.generate(q, r, [PROMPT], ref_model=d, method=method, proposer="ngram", max_new_tokens=2)


def test_sss_with_the_ngram_proposer_still_needs_r_and_d(models):
    q, r, d = models
    with pytest.raises(ValueError, match="needs draft"):
        sss_ext.generate(q, None, [PROMPT], ref_model=d, method="sss", proposer="ngram", max_new_tokens=2)
    with pytest.raises(ValueError, match="needs ref_model"):
        sss_ext.generate(q, r, [PROMPT], method="sss", proposer="ngram", max_new_tokens=2)


def test_sss_without_shift_gives_the_sd_tokens(models):
    """shift = 0: the tilted target is q, and the same uniforms give sd's tokens (r is not read)."""
    sd = _generate(models, "sd", rows=64, seed=23, temperature=0.9)
    sss = _generate(models, "sss", rows=64, seed=23, temperature=0.9, shift=0.0)
    assert [s.tolist() for s in sss.sequences] == [s.tolist() for s in sd.sequences]
    assert sss.stats.total.accepted_drafts > 0


def test_sd_through_custom_generate_equals_hf_greedy_with_a_repetition_penalty(deep_models):
    """The HF hook takes the proposer through sampling_config; with transformers' repetition penalty the
    prefix-dependent processor runs at every verified position, and sd with lookup still equals HF's
    own greedy decoding (no draft model given)."""
    import sss_ext.hf

    q, _, _ = deep_models
    input_ids = torch.tensor([[5, 6, 5, 6, 5, 6, 5]])
    expected = q.generate(input_ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
    result = q.generate(input_ids, custom_generate=sss_ext.hf.decode, method="sd", max_new_tokens=12, do_sample=False,
                        repetition_penalty=1.3, sampling_config=sss_ext.SamplingConfig(proposer="ngram"),
                        return_dict_in_generate=True)
    assert torch.equal(result.sequences, expected)
    stats = result.sss_output.stats.total
    assert stats.proposed_drafts > 0 and stats.draft_calls == 0
