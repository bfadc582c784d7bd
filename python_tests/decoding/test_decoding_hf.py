"""``target.generate(..., custom_generate=sss_ext.hf.decode, draft_model=..., ref_model=...)`` (transformers 5.23)."""

import pytest
import torch

import sss_ext
import sss_ext.hf
from decoding_helpers import full_logits, greedy_reference, one_thread, trio, word_tokenizer  # noqa: F401  (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def models():
    return trio(12, num_hidden_layers=2)


def test_transformers_version_is_the_pinned_one():
    import transformers

    assert transformers.__version__ == "5.23.0"


def test_greedy_through_custom_generate(models):
    q, r, d = models
    input_ids = torch.tensor([[0, 0, 1, 2, 3], [5, 6, 7, 8, 9]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    result = q.generate(input_ids, attention_mask=attention_mask, custom_generate=sss_ext.hf.decode, draft_model=r,
                        ref_model=d, max_new_tokens=8, do_sample=False, pad_token_id=0, num_draft_tokens=3,
                        return_dict_in_generate=True)
    out = result.sequences
    assert out.shape == (2, 5 + 8)
    assert torch.equal(out[:, :5], input_ids)
    tilted = lambda zq, zr, zd: zq + zr - zd  # noqa: E731
    for row, prompt in enumerate(([1, 2, 3], [5, 6, 7, 8, 9])):
        assert out[row, 5:].tolist() == greedy_reference([q, r, d], prompt, 8, tilted)
    stats = result.sss_output.stats.total
    assert stats.target_calls > 0 and stats.ref_calls == stats.target_calls


def test_sd_greedy_through_custom_generate_equals_hf_greedy(models):
    q, r, _ = models
    input_ids = torch.tensor([[1, 2, 3]])
    expected = q.generate(input_ids, max_new_tokens=10, do_sample=False)
    out = q.generate(input_ids, custom_generate=sss_ext.hf.decode, draft_model=r, method="sd", max_new_tokens=10, do_sample=False)
    assert torch.equal(out, expected)


def test_sampling_through_custom_generate_equals_generate(models):
    q, r, d = models
    input_ids = torch.tensor([[1, 2, 3]])
    out = q.generate(input_ids, custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d, max_new_tokens=9,
                     do_sample=True, temperature=0.8, top_k=6, seed=7, shift=0.5, return_dict_in_generate=True)
    direct = sss_ext.generate(q, r, [[1, 2, 3]], ref_model=d, max_new_tokens=9, temperature=0.8, top_k=6, top_p=1.0,
                              seed=7, shift=0.5, ignore_eos=True)
    assert out.sequences[0, 3:].tolist() == direct.sequences[0].tolist()


def test_observer_through_custom_generate(models):
    from sss_ext.decoding import RecordingObserver

    q, r, d = models
    observer = RecordingObserver()
    result = q.generate(torch.tensor([[1, 2, 3]]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                        max_new_tokens=6, do_sample=True, seed=3, observer=observer, return_dict_in_generate=True)
    assert observer.rounds() and observer.forward_total("target") == result.sss_output.stats.total.target_calls


# ---- transformers generate features: logits processors, stopping criteria, streamer ----

PADDED_IDS = torch.tensor([[0, 0, 1, 2, 3], [5, 6, 7, 8, 9]])
PADDED_MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
EOS = 1


@pytest.mark.parametrize("method", ["sd", "vanilla"])
@pytest.mark.parametrize("processors", [
    dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3),
    dict(bad_words_ids=[[4], [5, 6]], suppress_tokens=[7], begin_suppress_tokens=[8], min_length=9),
    dict(sequence_bias=[[[11], -4.0], [[5, 11], 6.0]], forced_eos_token_id=EOS, repetition_penalty=0.7),
], ids=["penalty-ngram-min-new", "bad-words-suppress-min-length", "bias-forced-eos"])
def test_greedy_with_processors_equals_transformers_greedy(models, processors, method):
    """lambda = 0: the processed target's argmax at every step, padded rows included (padding is
    part of each prefix, as transformers shows it to its processors)."""
    q, r, _ = models
    common = dict(attention_mask=PADDED_MASK, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=EOS)
    expected = q.generate(PADDED_IDS, **common, **processors)
    out = q.generate(PADDED_IDS, custom_generate=sss_ext.hf.decode, draft_model=r, method=method, num_draft_tokens=3,
                     **common, **processors)
    assert torch.equal(out[:, : expected.shape[1]], expected)
    assert (out[:, expected.shape[1]:] == 0).all()
    plain = q.generate(PADDED_IDS, **common)
    assert not torch.equal(expected[:, 5:], plain[:, 5: expected.shape[1]])  # the processors matter here


@pytest.mark.parametrize("replacement", [False, True])
def test_greedy_tree_with_processors_equals_transformers_greedy(models, replacement):
    """sd with a draft tree through custom_generate: every node's logits pass the prefix
    processors with the node's own path, so greedy decoding is transformers' greedy."""
    q, r, _ = models
    processors = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3, bad_words_ids=[[4], [5, 6]])
    common = dict(attention_mask=PADDED_MASK, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=EOS)
    expected = q.generate(PADDED_IDS, **common, **processors)
    config = sss_ext.SamplingConfig(draft_tree=(3, 2), tree_replacement=replacement)
    out = q.generate(PADDED_IDS, custom_generate=sss_ext.hf.decode, draft_model=r, method="sd", sampling_config=config,
                     **common, **processors)
    assert torch.equal(out[:, : expected.shape[1]], expected)


def test_forced_bos_on_a_one_token_prompt(models):
    q, r, _ = models
    common = dict(max_new_tokens=6, do_sample=False, forced_bos_token_id=9, no_repeat_ngram_size=1)
    expected = q.generate(torch.tensor([[4]]), **common)
    out = q.generate(torch.tensor([[4]]), custom_generate=sss_ext.hf.decode, draft_model=r, method="sd", **common)
    assert torch.equal(out, expected) and int(out[0, 1]) == 9


def _processed_greedy(models, prompt, length, processor, shift=1.0):
    """Uncached greedy decoding of argmax(proc(zq) + shift * (proc(zr) - proc(zd))), masked tokens excluded."""
    out = []
    for _ in range(length):
        ids = prompt + out
        zq, zr, zd = (processor(torch.tensor([ids]), full_logits(m, ids).float()[None])[0] for m in models)
        masked = torch.isneginf(zq) | torch.isneginf(zr) | torch.isneginf(zd)
        out.append(int(torch.argmax(torch.where(masked, -torch.inf, zq + shift * (zr - zd)))))
    return out


def test_greedy_sss_with_processors_follows_the_processed_tilt(models):
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    q, r, d = models
    prompt = [1, 2, 3]
    out = q.generate(torch.tensor([prompt]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d, max_new_tokens=9,
                     do_sample=False, num_draft_tokens=3, repetition_penalty=2.0, no_repeat_ngram_size=2)
    processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(2.0), NoRepeatNGramLogitsProcessor(2)])
    assert out[0, 3:].tolist() == _processed_greedy(models, prompt, 9, processor)
    assert out[0, 3:].tolist() != greedy_reference([q, r, d], prompt, 9, lambda zq, zr, zd: zq + zr - zd)


def test_sampling_with_processors_through_custom_generate_equals_generate(models):
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    q, r, d = models
    out = q.generate(torch.tensor([[1, 2, 3]]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                     max_new_tokens=9, do_sample=True, temperature=0.8, top_k=6, seed=7, repetition_penalty=1.3,
                     no_repeat_ngram_size=2)
    processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2)])
    direct = sss_ext.generate(q, r, [[1, 2, 3]], ref_model=d, max_new_tokens=9, temperature=0.8, top_k=6, seed=7,
                              ignore_eos=True, logits_processor=processor)
    assert out[0, 3:].tolist() == direct.sequences[0].tolist()


class _Custom:
    def __call__(self, input_ids, scores):
        return scores


@pytest.mark.parametrize("kwargs,name", [
    (dict(do_sample=True, min_p=0.1), "MinPLogitsWarper"),
    (dict(do_sample=True, typical_p=0.9), "TypicalLogitsWarper"),
    (dict(do_sample=True, epsilon_cutoff=3e-4), "EpsilonLogitsWarper"),
    (dict(do_sample=True, eta_cutoff=1e-3), "EtaLogitsWarper"),
    (dict(remove_invalid_values=True), "InfNanRemoveLogitsProcessor"),
    (dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [1, 2]), "PrefixConstrainedLogitsProcessor"),
    (dict(watermarking_config={"greenlist_ratio": 0.25}), "WatermarkLogitsProcessor"),
    (dict(logits_processor="custom"), "_Custom"),
    (dict(do_sample=True, temperature=0.7, logits_processor="temperature"), "TemperatureLogitsWarper"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_processors_that_cannot_be_applied_exactly_raise(models, kwargs, name):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    q, r, d = models
    custom = {"custom": _Custom(), "temperature": TemperatureLogitsWarper(0.5)}
    if "logits_processor" in kwargs:
        kwargs = {**kwargs, "logits_processor": LogitsProcessorList([custom[kwargs["logits_processor"]]])}
    if "watermarking_config" in kwargs:
        from transformers import WatermarkingConfig

        kwargs = {**kwargs, "watermarking_config": WatermarkingConfig(**kwargs["watermarking_config"])}
    with pytest.raises(ValueError, match=name):
        q.generate(torch.tensor([[1, 2, 3]]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                   max_new_tokens=4, **kwargs)


def test_processor_after_a_warper_raises(models):
    """generate merges custom processors before its warpers; a list in another order cannot be applied exactly."""
    from transformers import GenerationConfig, LogitsProcessorList, NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper

    q, r, d = models
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.7), NoRepeatNGramLogitsProcessor(2)])
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, max_length=7)
    with pytest.raises(ValueError, match="NoRepeatNGramLogitsProcessor.*come after a temperature"):
        sss_ext.hf.decode(q, torch.tensor([[1, 2, 3]]), logits_processor=processors, generation_config=config,
                          draft_model=r, ref_model=d)


def test_custom_prefix_processor_through_logits_processor(models):
    """A transformers processor passed as logits_processor= (merged before the warpers) is applied."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

    q, r, d = models
    common = dict(max_new_tokens=6, do_sample=False, logits_processor=LogitsProcessorList([NoRepeatNGramLogitsProcessor(1)]))
    out = q.generate(torch.tensor([[1, 2, 3]]), custom_generate=sss_ext.hf.decode, draft_model=r, method="sd", **common)
    assert torch.equal(out, q.generate(torch.tensor([[1, 2, 3]]), **common))
    assert len(set(out[0].tolist())) == out.shape[1]  # no token twice


class _StopOn:
    """A transformers-style stopping criterion: the last token is ``token``."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def _stopping_list(token):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOn(_StopOn, StoppingCriteria):
        pass

    return StoppingCriteriaList([StopOn(token)])


def _cut_after(row: torch.Tensor, prompt_length: int, token: int) -> list[int]:
    new = row[prompt_length:].tolist()
    return new[: new.index(token) + 1] if token in new else new


def test_custom_stopping_criteria_stop_each_row_where_transformers_stops_it(models):
    """transformers keeps generating a row its criterion stopped (without EOS it is never padded)
    until every row stopped; sss_ext.hf.decode ends the row there and pads it."""
    q, r, _ = models
    common = dict(attention_mask=PADDED_MASK, max_new_tokens=10, do_sample=False, pad_token_id=0)
    free = q.generate(PADDED_IDS, **common)
    stopped = q.generate(PADDED_IDS, stopping_criteria=_stopping_list(11), **common)
    out = q.generate(PADDED_IDS, custom_generate=sss_ext.hf.decode, draft_model=r, method="sd", num_draft_tokens=4,
                     stopping_criteria=_stopping_list(11), **common)
    assert stopped.shape[1] < free.shape[1]  # the criterion stopped generation early
    for row in range(2):
        expected = _cut_after(free[row], 5, 11)
        assert out[row, 5:].tolist() == expected + [0] * (10 - len(expected))
        assert stopped[row, 5: 5 + len(expected)].tolist() == expected
    assert len(_cut_after(free[0], 5, 11)) < 4  # a row stopped inside a round of 4 drafts


def _probe_tokenizer():
    """A word tokenizer whose words include ``"abcdef"``: transformers' StopStringCriteria encodes
    that probe to find the string of every token."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "abcdef": 2, **{f"w{index}": index for index in range(3, 12)}}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def test_stop_strings_equal_transformers(models):
    """transformers pops tokenizer= before a custom_generate callable runs: the hook takes text_tokenizer=."""
    q, r, _ = models
    tokenizer = _probe_tokenizer()
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, stop_strings=["w11"])
    prompt = torch.tensor([[5, 6, 7]])
    expected = q.generate(prompt, tokenizer=tokenizer, **common)
    result = q.generate(prompt, custom_generate=sss_ext.hf.decode, draft_model=r, method="sd", num_draft_tokens=4,
                        text_tokenizer=tokenizer, return_dict_in_generate=True, **common)
    out = result.sequences
    assert expected.shape[1] < 15 and int(expected[0, -1]) == 11
    assert torch.equal(out[:, : expected.shape[1]], expected) and (out[:, expected.shape[1]:] == 0).all()
    assert result.sss_output.texts[0].endswith("w11")
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        q.generate(prompt, custom_generate=sss_ext.hf.decode, draft_model=r, method="sd", **common)


def test_max_time_stops_after_the_first_token(models):
    q, r, d = models
    result = q.generate(torch.tensor([[1, 2, 3]]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                        max_new_tokens=8, do_sample=True, seed=1, max_time=1e-9, pad_token_id=0, return_dict_in_generate=True)
    assert result.sss_output.sequences[0].numel() == 1 and (result.sequences[0, 4:] == 0).all()


def test_streamer_through_custom_generate(models):
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended += 1

    q, r, d = models
    streamer = Recorder()
    out = q.generate(torch.tensor([[1, 2, 3]]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                     max_new_tokens=10, do_sample=True, seed=3, num_draft_tokens=3, streamer=streamer)
    assert streamer.puts[0] == [[1, 2, 3]]  # the prompt, put by generate itself
    assert all(len(put) == 1 for put in streamer.puts[1:]) and len(streamer.puts) > 2
    assert sum((put[0] for put in streamer.puts[1:]), []) == out[0, 3:].tolist()
    assert streamer.ended == 1
    with pytest.raises(ValueError, match="streamer needs a single generated sequence"):
        q.generate(PADDED_IDS, attention_mask=PADDED_MASK, custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                   max_new_tokens=4, streamer=Recorder())


def test_text_iterator_streamer_gets_the_text_transformers_streams(models):
    from transformers import TextIteratorStreamer

    q, r, _ = models
    tokenizer = word_tokenizer(12)
    texts = []
    for custom in ({}, {"custom_generate": sss_ext.hf.decode, "draft_model": r, "method": "sd", "num_draft_tokens": 4}):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=5)
        q.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=9, do_sample=False, streamer=streamer, **custom)
        texts.append("".join(streamer))
    assert texts[0] and texts[1] == texts[0]


def test_streamer_lookup_reads_the_calling_generate_and_fails_loudly():
    """The one workaround for transformers not handing streamer= to a custom_generate callable."""

    class Model:
        def generate(self, streamer=None):
            return sss_ext.hf.streamer_of_generate(self)

    class ChangedModel:
        def generate(self, **kwargs):  # a transformers that no longer keeps `streamer` in generate's frame
            return sss_ext.hf.streamer_of_generate(self)

    marker = object()
    assert Model().generate(streamer=marker) is marker
    assert sss_ext.hf.streamer_of_generate(Model()) is None  # decode called directly: no generate frame
    with pytest.raises(RuntimeError, match="could not find the streamer of the calling generate"):
        ChangedModel().generate()


def test_right_padded_prompts_decode_or_say_to_pad_left(models):
    q, r, d = models
    input_ids = torch.tensor([[1, 2, 3, 0, 0], [5, 6, 7, 8, 9]])
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    common = dict(attention_mask=attention_mask, custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                  max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    result = q.generate(input_ids, **common)  # no processor: the prompts are read through the mask
    left = q.generate(torch.tensor([[0, 0, 1, 2, 3], [5, 6, 7, 8, 9]]), **{**common, "attention_mask": attention_mask.flip(1)})
    assert [s.tolist() for s in result.sss_output.sequences] == [s.tolist() for s in left.sss_output.sequences]
    with pytest.raises(ValueError, match="right-padded .* set tokenizer.padding_side = 'left'"):
        q.generate(input_ids, repetition_penalty=1.2, **common)
