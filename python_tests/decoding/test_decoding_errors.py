"""Bad input (acceptance point 6): a ValueError naming the argument, before any model runs."""

import pytest
import torch

import sss_ext
from sss_ext import SamplingConfig
from decoding_helpers import sum_reward, tiny_llama, trio, word_tokenizer


@pytest.fixture(scope="module")
def models():
    return trio(12, max_position_embeddings=16)


@pytest.fixture
def no_forward(models):
    """Fails the test if any model ran a forward pass."""
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in models]
    yield
    for h in handles:
        h.remove()
    assert not calls, "a model ran before the error was raised"


def _raises(match, **kwargs):
    return pytest.raises(ValueError, match=match)


def test_models_with_different_vocab_sizes(models, no_forward):
    q, r, d = models
    other = tiny_llama(13, 5)
    with pytest.raises(ValueError, match="ref_model has vocab_size 13"):
        sss_ext.generate(q, r, [[1, 2]], ref_model=other)
    with pytest.raises(ValueError, match="draft has vocab_size 13"):
        sss_ext.generate(q, other, [[1, 2]], method="sd")


def test_tokenizer_that_does_not_match(models, no_forward):
    q, r, d = models
    with pytest.raises(ValueError, match="tokenizer has 20 tokens"):
        sss_ext.generate(q, r, ["w2 w3"], ref_model=d, tokenizer=word_tokenizer(20))


def test_missing_ref_model_for_sss(models, no_forward):
    q, r, _ = models
    for method in ("sss", "sss-paper"):
        with pytest.raises(ValueError, match="needs ref_model"):
            sss_ext.generate(q, r, [[1, 2]], method=method)


def test_missing_draft_or_target(models, no_forward):
    q, r, d = models
    with pytest.raises(ValueError, match="needs draft"):
        sss_ext.generate(q, None, [[1, 2]], method="sd")
    with pytest.raises(ValueError, match="needs target"):
        sss_ext.generate(None, r, [[1, 2]], method="vanilla")


@pytest.mark.parametrize("method", ["bon", "spec-rejection", "soft-bon"])
def test_missing_reward_fn(models, no_forward, method):
    q, r, _ = models
    with pytest.raises(ValueError, match="needs reward_fn"):
        sss_ext.generate(q, r, [[1, 2]], method=method)
    with pytest.raises(ValueError, match="reward_fn must be callable"):
        sss_ext.generate(q, r, [[1, 2]], method=method, reward_fn=3)


def test_text_reward_needs_a_tokenizer(models, no_forward):
    q, _, _ = models
    with pytest.raises(ValueError, match="reward_input='text' needs tokenizer"):
        sss_ext.generate(q, None, [[1, 2]], method="bon", reward_fn=sum_reward(1), reward_input="text")


@pytest.mark.parametrize("prompts,match", [
    ([], "non-empty list of prompts"),
    ([[1, 2], []], r"prompts_or_input_ids\[1\] is empty"),
    ([""], r"prompts_or_input_ids\[0\] is a string; pass tokenizer"),
    ([[1, 99]], r"prompts_or_input_ids\[0\] holds token id 99"),
    ([[1.5]], r"prompts_or_input_ids\[0\] must be"),
    (torch.zeros((1, 0), dtype=torch.int64), r"prompts_or_input_ids\[0\] is empty"),
])
def test_bad_prompts(models, no_forward, prompts, match):
    q, r, d = models
    with pytest.raises(ValueError, match=match):
        sss_ext.generate(q, r, prompts, ref_model=d)


def test_empty_text_prompt(models, no_forward):
    q, r, d = models
    with pytest.raises(ValueError, match=r"prompts_or_input_ids\[0\] is empty"):
        sss_ext.generate(q, r, [""], ref_model=d, tokenizer=word_tokenizer(12))


def test_prompts_longer_than_the_context(models, no_forward):
    q, r, d = models
    with pytest.raises(ValueError, match=r"prompts_or_input_ids\[1\] has 16 tokens, but the models' context length is 16"):
        sss_ext.generate(q, r, [[1], [2] * 16], ref_model=d)
    with pytest.raises(ValueError, match="max_new_tokens=10 plus the longest prompt"):
        sss_ext.generate(q, r, [[1], [2] * 8], ref_model=d, max_new_tokens=10)


@pytest.mark.parametrize("field,value", [
    ("num_draft_tokens", 0), ("num_draft_tokens", -2), ("max_new_tokens", 0), ("temperature", -1.0),
    ("top_k", -1), ("top_p", 0.0), ("shift", -0.5), ("num_samples", 0), ("rejection_rate", 1.0),
    ("rejection_interval", 0), ("beta", -1.0), ("eos_token_id", -3), ("reward_input", "pixels"),
])
def test_bad_config(models, no_forward, field, value):
    q, r, d = models
    with pytest.raises(ValueError, match=field):
        sss_ext.generate(q, r, [[1, 2]], ref_model=d, **{field: value})
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_bad_method_and_config_type(models, no_forward):
    q, r, d = models
    with pytest.raises(ValueError, match="method must be one of"):
        sss_ext.generate(q, r, [[1, 2]], ref_model=d, method="beam")
    with pytest.raises(ValueError, match="config must be a SamplingConfig"):
        sss_ext.generate(q, r, [[1, 2]], ref_model=d, config={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="unknown SamplingConfig field"):
        sss_ext.generate(q, r, [[1, 2]], ref_model=d, config=SamplingConfig(), num_draft=3)


def test_eos_outside_vocabulary(models, no_forward):
    q, r, d = models
    with pytest.raises(ValueError, match="eos_token_id 50 is outside the vocabulary"):
        sss_ext.generate(q, r, [[1, 2]], ref_model=d, eos_token_id=50)


def test_sliding_window_models_are_refused(models):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=32, sliding_window=4, max_position_embeddings=64)
    sliding = MistralForCausalLM(config).eval()
    q, r, d = models
    with pytest.raises(ValueError, match="target uses cache layers"):
        sss_ext.generate(sliding, r, [[1, 2]], ref_model=d, max_new_tokens=2)


def _in_training_mode(model):
    """A fresh copy of ``model`` in training mode (as ``from_config`` / a constructor returns it)."""
    import copy

    return copy.deepcopy(model).train()


@pytest.mark.parametrize("argument", ["target", "draft", "ref_model"])
def test_models_in_training_mode_are_refused(models, no_forward, argument):
    q, r, d = models
    given = {"target": q, "draft": r, "ref_model": d}
    given[argument] = _in_training_mode(given[argument])
    match = (rf"{argument} is in training mode \(dropout makes the same seed give different outputs\); "
             rf"call {argument}\.eval\(\)")
    with pytest.raises(ValueError, match=match):
        sss_ext.generate(given["target"], given["draft"], [[1, 2]], ref_model=given["ref_model"], method="sss")


def test_model_built_from_a_config_is_in_training_mode(no_forward):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=32, max_position_embeddings=16)
    fresh = AutoModelForCausalLM.from_config(config)
    assert fresh.training
    with pytest.raises(ValueError, match="target is in training mode"):
        sss_ext.generate(fresh, None, [[1, 2]], method="vanilla")


def test_submodule_in_training_mode_is_refused(models, no_forward):
    q, r, d = models
    draft = _in_training_mode(r).eval()
    draft.model.layers[0].train()
    with pytest.raises(ValueError, match="draft is in training mode"):
        sss_ext.generate(q, draft, [[1, 2]], ref_model=d)


def test_reward_model_in_training_mode_is_refused(models, no_forward):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    q, _, _ = models
    config = LlamaConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=32, num_labels=1, pad_token_id=0, max_position_embeddings=16)
    reward_model = LlamaForSequenceClassification(config)  # a constructor returns training mode
    with pytest.raises(ValueError, match=r"reward_fn is in training mode .*call reward_fn\.eval\(\)"):
        sss_ext.generate(q, None, [[1, 2]], method="bon", reward_fn=reward_model)


@pytest.mark.parametrize("method", ["sss", "sd", "vanilla"])
def test_a_round_that_emits_nothing_raises_instead_of_looping(models, monkeypatch, method):
    """Every round must emit at least one token per active row; one that does not (a broken
    emit) ends the run with a RuntimeError within max_new_tokens rounds, not a hang."""
    from sss_ext.decoding.rows import RowBook

    append = RowBook.append
    monkeypatch.setattr(RowBook, "append", lambda self, new, count=None, log_z=None:
                        append(self, new, torch.zeros(new.shape[0], dtype=torch.int64, device=new.device), log_z))
    q, r, d = models
    config = SamplingConfig(max_new_tokens=5, num_draft_tokens=2, seed=0)
    with pytest.raises(RuntimeError, match=r"after 5 rounds with max_new_tokens = 5: a round emitted no token"):
        sss_ext.generate(q, r, [[1, 2, 3]], ref_model=d, config=config, method=method)
