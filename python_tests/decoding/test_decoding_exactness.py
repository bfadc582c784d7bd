"""End-to-end exactness of the decoding loop (acceptance point 2).

The empirical law of whole generated sequences is compared with the exact law obtained by
enumerating every prefix under the three tiny models (chi-square, alpha = 0.01, small
cells pooled). Negative controls must fail: the paper rule on a context with Z far from 1,
and each sample set against the other method's law.
"""

import pytest
import torch

import sss_ext
from decoding_helpers import chi_square_pvalue, count_sequences, full_logits, sequence_law, tilted_probs, trio

VOCAB, LENGTH, ROWS, EOS = 8, 3, 24000, 0
PROMPT = [1, 2]
ALPHA = 0.01


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return trio(VOCAB)


def _rows(prompt, count):
    return torch.tensor([prompt] * count)


def _target_law(q, r, d):
    return torch.softmax(q, dim=-1)


@pytest.fixture(scope="module")
def tilted_law(models):
    return sequence_law(models, PROMPT, LENGTH, tilted_probs, eos=EOS)


@pytest.fixture(scope="module")
def target_law(models):
    return sequence_law(models, PROMPT, LENGTH, _target_law, eos=EOS)


@pytest.fixture(scope="module")
def sss_samples(models):
    q, r, d = models
    out = sss_ext.generate(q, r, _rows(PROMPT, ROWS), ref_model=d, method="sss", max_new_tokens=LENGTH,
                           num_draft_tokens=2, eos_token_id=EOS, seed=20)
    return out


def test_models_are_a_meaningful_case(models):
    """The tilt changes the law and Z is far from 1, so the negative controls can fail."""
    q, r, d = models
    zq, zr, zd = (full_logits(m, PROMPT) for m in models)
    probs = [torch.softmax(z, -1) for z in (zq, zr, zd)]
    z_value = float((probs[0] * probs[1] / probs[2]).sum())
    assert abs(z_value - 1.0) >= 0.1
    assert 0.5 * float((tilted_probs(zq, zr, zd) - probs[0]).abs().sum()) > 0.05


def test_sss_matches_product_of_tilted_targets(sss_samples, tilted_law):
    counts = count_sequences(sss_samples.sequences)
    p_value = chi_square_pvalue(counts, tilted_law)
    print(f"sss vs prod p*: p = {p_value:.4f}")
    assert p_value > ALPHA
    # rounds really mixed acceptance lengths
    assert 0.0 < sss_samples.stats.total.acceptance_rate < 1.0


def test_sss_samples_do_not_match_the_target_law(sss_samples, target_law):
    """Negative control: the same samples are rejected against the untilted target law."""
    p_value = chi_square_pvalue(count_sequences(sss_samples.sequences), target_law)
    print(f"sss vs prod q (negative control): p = {p_value:.3g}")
    assert p_value < ALPHA


@pytest.mark.parametrize("method", ["sss", "sd"])
def test_block_verification_matches_the_law(models, tilted_law, target_law, method):
    """verification="block" in the loop: the same law as token by token (negative control: the
    other law), and more accepted drafts per round than token verification with the same seed."""
    q, r, d = models
    law, other = (tilted_law, target_law) if method == "sss" else (target_law, tilted_law)
    kwargs = dict(ref_model=d, method=method, max_new_tokens=LENGTH, num_draft_tokens=2, eos_token_id=EOS, seed=21)
    block = sss_ext.generate(q, r, _rows(PROMPT, ROWS), verification="block", **kwargs)
    counts = count_sequences(block.sequences)
    p_value, negative = chi_square_pvalue(counts, law), chi_square_pvalue(counts, other)
    print(f"{method} block verification: p = {p_value:.4f}; vs the other law (negative control) p = {negative:.3g}")
    assert p_value > ALPHA
    assert negative < ALPHA
    token = sss_ext.generate(q, r, _rows(PROMPT, ROWS), **kwargs)
    assert block.stats.total.mean_accepted_length > token.stats.total.mean_accepted_length


def test_sss_paper_rule_fails_when_z_is_far_from_one(models, tilted_law):
    """Negative control: the paper's rule (no normaliser Z) is biased when |Z - 1| is large."""
    q, r, d = models
    out = sss_ext.generate(q, r, _rows(PROMPT, ROWS), ref_model=d, method="sss-paper", max_new_tokens=LENGTH,
                           num_draft_tokens=2, eos_token_id=EOS, seed=12)
    p_value = chi_square_pvalue(count_sequences(out.sequences), tilted_law)
    print(f"sss-paper vs prod p* (negative control): p = {p_value:.3g}")
    assert p_value < ALPHA


def test_sss_with_temperature_top_k_and_shift(models):
    q, r, d = models
    temperature, top_k, shift = 0.7, 5, 0.5

    def step_law(zq, zr, zd):
        return sss_ext.warp_probs(zq + shift * (zr - zd), temperature, top_k, 1.0)

    law = sequence_law(models, PROMPT, LENGTH, step_law)
    out = sss_ext.generate(q, r, _rows(PROMPT, ROWS), ref_model=d, method="sss", max_new_tokens=LENGTH, num_draft_tokens=3,
                           temperature=temperature, top_k=top_k, shift=shift, ignore_eos=True, seed=13)
    p_value = chi_square_pvalue(count_sequences(out.sequences), law)
    print(f"sss (t=0.7, top_k=5, shift=0.5) vs prod p*: p = {p_value:.4f}")
    assert p_value > ALPHA


@pytest.mark.parametrize("num_draft_tokens,length", [(2, LENGTH), (1, 4)], ids=["K2-T3", "K1-T4-carry"])
def test_sd_matches_the_target_law(models, num_draft_tokens, length):
    """Standard SD follows the target; K=1, T=4 exercises the carried draft token (all drafts accepted)."""
    q, r, _ = models
    target_law = sequence_law(models, PROMPT, length, _target_law, eos=EOS)
    tilted_law = sequence_law(models, PROMPT, length, tilted_probs, eos=EOS)
    out = sss_ext.generate(q, r, _rows(PROMPT, ROWS), method="sd", max_new_tokens=length, num_draft_tokens=num_draft_tokens,
                           eos_token_id=EOS, seed=14)
    counts = count_sequences(out.sequences)
    p_value = chi_square_pvalue(counts, target_law)
    print(f"sd (K={num_draft_tokens}, T={length}) vs prod q: p = {p_value:.4f}")
    assert p_value > ALPHA
    negative = chi_square_pvalue(counts, tilted_law)
    print(f"sd (K={num_draft_tokens}, T={length}) vs prod p* (negative control): p = {negative:.3g}")
    assert negative < ALPHA


def test_law_does_not_depend_on_batch_composition(models, tilted_law):
    """Rows of one prompt inside a batch of other prompts and lengths keep their exact law."""
    q, r, d = models
    others = ([3], [4, 5, 6, 7, 1])
    prompts = []
    for index in range(ROWS):
        prompts.append(PROMPT if index % 2 == 0 else list(others[(index // 2) % 2]))
    out = sss_ext.generate(q, r, prompts, ref_model=d, method="sss", max_new_tokens=LENGTH, num_draft_tokens=2,
                           eos_token_id=EOS, seed=15)
    mine = [out.sequences[i] for i in range(0, ROWS, 2)]
    p_value = chi_square_pvalue(count_sequences(mine), tilted_law)
    print(f"sss in a mixed batch vs prod p*: p = {p_value:.4f}")
    assert p_value > ALPHA
    long_prompt = list(others[1])
    law = sequence_law(models, long_prompt, LENGTH, tilted_probs, eos=EOS)
    theirs = [out.sequences[i] for i in range(3, ROWS, 4)]
    p_value = chi_square_pvalue(count_sequences(theirs), law)
    print(f"sss, other prompt in the mixed batch vs its prod p*: p = {p_value:.4f}")
    assert p_value > ALPHA
