"""sss_ext.vllm on tiny random models (head_dim 32, vocabulary 16), processor loaded by the entry point.

One engine for the module: the law of vLLM's returned logprobs against the reference log p*,
a chi-square test of the sample law against p* by enumeration (with the tilt dropped as a
negative control), n > 1, seeds, request-time refusals. Preemption: test_vllm_preemption.py.
"""

import math

import pytest

pytest.importorskip("vllm.v1.sample.logits_processor", reason="vLLM is not installed here (scripts/vllm_check.sh builds .venv-vllm)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sss_ext  # noqa: E402
import vllm_helpers as H  # noqa: E402

from vllm.exceptions import VLLMValidationError  # noqa: E402

SHIFT = "sss_shift"
# vLLM's front end turns the processor's ValueError into VLLMValidationError (HTTP 400 online)
REFUSED = (ValueError, VLLMValidationError)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = H.make_tiny_models(tmp_path_factory.mktemp("tiny"))
    models = tuple(H.load_hf(paths[role]) for role in ("target", "draft", "ref_draft"))
    # the entry point (vllm.logits_processors: sss) loads the processor: no logits_processors=
    llm = H.start_engine(paths["target"], sss=paths, register=False, skip_tokenizer_init=True,
                         max_model_len=64, block_size=32, num_gpu_blocks_override=256, max_num_seqs=256)
    yield paths, models, llm
    H.shutdown(llm)


def _prompt(tokens):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(tokens))


def _params(**kw):
    from vllm import SamplingParams

    shift = kw.pop("shift", None)
    extra = {SHIFT: shift} if shift is not None else None
    kw.setdefault("logprobs", 0)
    kw.setdefault("detokenize", False)
    return SamplingParams(extra_args=extra, **kw)


PROMPTS = [[1, 5, 7], [3, 3, 9, 12, 4], [15, 2], [8, 1, 6, 10, 11, 2, 0]]


def _check_law(models, prompt, completion, shift, temperature=1.0, tol=1e-4):
    tokens, logprobs = H.sampled_logprobs(completion)
    ref = H.reference_logp(models, list(prompt) + tokens, len(prompt), shift, temperature)
    expected = [float(ref[t, tok]) for t, tok in enumerate(tokens)]
    assert np.allclose(logprobs, expected, atol=tol, rtol=0), (shift, tokens, logprobs, expected)


@pytest.mark.parametrize("shift", [0.0, 1.0, 2.0])
def test_logprobs_equal_reference(tiny, shift):
    paths, models, llm = tiny
    outs = llm.generate([_prompt(p) for p in PROMPTS], _params(shift=shift, max_tokens=8, seed=11), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        _check_law(models, prompt, out.outputs[0], shift)


def test_temperature_applies_to_tilted_scores(tiny):
    paths, models, llm = tiny
    outs = llm.generate([_prompt(p) for p in PROMPTS], _params(shift=1.5, max_tokens=6, temperature=0.6, seed=3),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        _check_law(models, prompt, out.outputs[0], 1.5, temperature=0.6)


def test_greedy_is_tilted_argmax(tiny):
    paths, models, llm = tiny
    out = llm.generate([_prompt(PROMPTS[1])], _params(shift=2.0, max_tokens=8, temperature=0.0), use_tqdm=False)[0]
    seq = list(PROMPTS[1]) + list(out.outputs[0].token_ids)
    ref = H.reference_logp(models, seq, len(PROMPTS[1]), 2.0)
    assert list(out.outputs[0].token_ids) == ref.argmax(dim=-1).tolist()


def test_n_and_seed(tiny):
    paths, models, llm = tiny
    params = _params(shift=2.0, max_tokens=6, n=4, seed=123)
    first = llm.generate([_prompt(PROMPTS[0])], params, use_tqdm=False)[0]
    again = llm.generate([_prompt(PROMPTS[0])], params, use_tqdm=False)[0]
    assert len(first.outputs) == 4
    assert [list(c.token_ids) for c in first.outputs] == [list(c.token_ids) for c in again.outputs]
    for completion in first.outputs:
        _check_law(models, PROMPTS[0], completion, 2.0)


def _sequence_law(models, prompt, shift, length=2) -> dict:
    """p* of every continuation of ``length`` tokens, by enumeration (float64)."""
    law = {(): 0.0}
    for _ in range(length):
        grown = {}
        for prefix, logp in law.items():
            ref = H.reference_logp(models, list(prompt) + list(prefix) + [0], len(prompt) + len(prefix), shift)[0]
            for tok in range(ref.shape[0]):
                grown[prefix + (tok,)] = logp + float(ref[tok])
        law = grown
    return {k: math.exp(v) for k, v in law.items()}


def _chi_square_p(counts: dict, law: dict, total: int) -> float:
    from scipy.stats import chi2

    # pool cells with expected count < 5 into one
    stat, dof, rest_obs, rest_exp = 0.0, -1, 0, 0.0
    for cell, p in law.items():
        e, o = p * total, counts.get(cell, 0)
        if e < 5:
            rest_obs, rest_exp = rest_obs + o, rest_exp + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        dof += 1
    return float(chi2.sf(stat, dof))


def test_chi_square_sample_law(tiny):
    """Two-token continuations sampled by vLLM follow p* (enumerated); against q (tilt dropped) they fail."""
    paths, models, llm = tiny
    prompt, shift, total = [4, 9, 1], 2.0, 4000
    outs = llm.generate([_prompt(prompt)], _params(shift=shift, max_tokens=2, n=total, seed=7, logprobs=None),
                        use_tqdm=False)[0]
    counts = {}
    for completion in outs.outputs:
        key = tuple(completion.token_ids)
        counts[key] = counts.get(key, 0) + 1
    p_star = _sequence_law(models, prompt, shift)
    p_plain = _sequence_law(models, prompt, 0.0)
    assert sum(counts.values()) == total
    p_value = _chi_square_p(counts, p_star, total)
    control = _chi_square_p(counts, p_plain, total)
    assert p_value > 1e-3, p_value
    assert control < 1e-6, control  # negative control: the untilted law is rejected


@pytest.mark.parametrize("extra, fragment", [
    ({SHIFT: -1.0}, "out of range"),
    ({SHIFT: float("nan")}, "out of range"),
    ({SHIFT: 1e9}, "out of range"),
    ({SHIFT: "big"}, "must be a number"),
    ({"sss_shfit": 1.0}, "unknown SamplingParams.extra_args"),
])
def test_bad_request_is_refused_and_engine_lives(tiny, extra, fragment):
    from vllm import SamplingParams

    paths, models, llm = tiny
    with pytest.raises(REFUSED, match=fragment) as info:
        llm.generate([_prompt(PROMPTS[0])], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    assert "sss" in str(info.value)
    out = llm.generate([_prompt(PROMPTS[0])], _params(shift=1.0, max_tokens=2), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2


def test_repetition_penalty_refused(tiny):
    paths, models, llm = tiny
    with pytest.raises(REFUSED, match="repetition_penalty"):
        llm.generate([_prompt(PROMPTS[0])], _params(shift=1.0, max_tokens=2, repetition_penalty=1.3), use_tqdm=False)
    # without a shift the penalty is plain vLLM's
    out = llm.generate([_prompt(PROMPTS[0])], _params(max_tokens=2, repetition_penalty=1.3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2
