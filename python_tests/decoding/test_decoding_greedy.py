"""Temperature 0 (acceptance point 3): sd reproduces the target's greedy decoding token for token,
sss reproduces greedy decoding of the tilted logits ``zq + shift * (zr - zd)``."""

import pytest
import torch

import sss_ext
from decoding_helpers import greedy_reference, one_thread, trio  # noqa: F401  (one_thread: autouse fixture)

PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [2, 2]]
LENGTH = 16


@pytest.fixture(scope="module")
def models():
    return trio(12, num_hidden_layers=2)


@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_sd_greedy_equals_target_greedy(models, num_draft_tokens):
    q, r, _ = models
    out = sss_ext.generate(q, r, PROMPTS, method="sd", temperature=0.0, max_new_tokens=LENGTH,
                           num_draft_tokens=num_draft_tokens, ignore_eos=True)
    for prompt, sequence in zip(PROMPTS, out.sequences):
        assert sequence.tolist() == greedy_reference([q], prompt, LENGTH, lambda zq: zq)
    assert out.stats.total.accepted_drafts < out.stats.total.proposed_drafts  # the draft really disagreed


@pytest.mark.parametrize("shift", [1.0, 0.5])
def test_sss_greedy_equals_tilted_greedy(models, shift):
    q, r, d = models
    out = sss_ext.generate(q, r, PROMPTS, ref_model=d, method="sss", temperature=0.0, max_new_tokens=LENGTH,
                           num_draft_tokens=3, shift=shift, ignore_eos=True)
    tilted = lambda zq, zr, zd: zq + shift * (zr - zd)  # noqa: E731
    for prompt, sequence in zip(PROMPTS, out.sequences):
        assert sequence.tolist() == greedy_reference([q, r, d], prompt, LENGTH, tilted)
    target_greedy = [greedy_reference([q], p, LENGTH, lambda zq: zq) for p in PROMPTS]
    assert [s.tolist() for s in out.sequences] != target_greedy  # the shift changed the decoding


def test_vanilla_and_draft_greedy(models):
    q, r, _ = models
    for method, model in (("vanilla", q), ("draft", r)):
        out = sss_ext.generate(q, r, PROMPTS, method=method, temperature=0.0, max_new_tokens=LENGTH, ignore_eos=True)
        for prompt, sequence in zip(PROMPTS, out.sequences):
            assert sequence.tolist() == greedy_reference([model], prompt, LENGTH, lambda z: z)


def test_greedy_stops_at_eos(models):
    q, r, _ = models
    reference = greedy_reference([q], PROMPTS[0], LENGTH, lambda zq: zq)
    eos = reference[5]
    out = sss_ext.generate(q, r, [PROMPTS[0]], method="sd", temperature=0.0, max_new_tokens=LENGTH,
                           num_draft_tokens=3, eos_token_id=eos)
    assert out.sequences[0].tolist() == reference[: reference.index(eos) + 1]
