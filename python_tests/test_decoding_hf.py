"""``target.generate(..., custom_generate=sss_ext.hf.decode, draft_model=..., ref_model=...)`` (transformers 5.23)."""

import pytest
import torch

import sss_ext
import sss_ext.hf
from decoding_helpers import greedy_reference, one_thread, trio  # noqa: F401  (one_thread: autouse fixture)


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
    out = q.generate(input_ids, attention_mask=attention_mask, custom_generate=sss_ext.hf.decode, draft_model=r,
                     ref_model=d, max_new_tokens=8, do_sample=False, pad_token_id=0, num_draft_tokens=3)
    assert out.shape == (2, 5 + 8)
    assert torch.equal(out[:, :5], input_ids)
    tilted = lambda zq, zr, zd: zq + zr - zd  # noqa: E731
    for row, prompt in enumerate(([1, 2, 3], [5, 6, 7, 8, 9])):
        assert out[row, 5:].tolist() == greedy_reference([q, r, d], prompt, 8, tilted)
    stats = sss_ext.hf.decode.last_output.stats.total
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
    q.generate(torch.tensor([[1, 2, 3]]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d, max_new_tokens=6,
               do_sample=True, seed=3, observer=observer)
    assert observer.rounds() and observer.forward_total("target") == sss_ext.hf.decode.last_output.stats.total.target_calls
