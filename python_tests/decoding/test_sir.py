"""sss-sir: importance resampling of SSS candidates toward the sequence-level tilt (docs/algorithm.md §10).

On three tiny random transformers (vocabulary 5, EOS = 0, 3 new tokens) every continuation
is enumerated in float64: its SSS probability ``prod_t p*_t``, its log-weight
``sum_t log Z_t`` over the emitted tokens and ``pi* ∝ prod_t p*_t * prod_t Z_t``. The law of
SIR with ``N`` candidates is ``P_N(y) = N p(y) w(y) E[1 / (w(y) + S_{N-1})]``, ``S_{N-1}`` the
sum of ``N - 1`` independent weights of SSS candidates: exact for ``N <= 2``, a large NumPy
Monte Carlo of ``S_{N-1}`` otherwise.

Checked: (a) every candidate's reported log-weight is the enumerated one; (b) the output law
of the implementation fits ``P_2`` by a chi-square test on 10^5 draws and is rejected
against ``p`` and ``pi*`` (negative controls); (c) ``TV(P_N, pi*)`` falls with ``N`` in
{1, 4, 32} to below 0.02 while token-level SSS is more than 0.05 away; (d) with ``lambda = 0``
or ``r = d`` every weight is 1 and the output follows the target.
"""

import json

import numpy as np
import pytest
import torch

import sss_ext
from decoding_helpers import chi_square_pvalue, count_sequences, one_thread, sequence_law, trio  # noqa: F401
from sss_ext.decoding.sir import resample, weight_summaries

VOCAB, LENGTH, EOS = 5, 3, 0
PROMPT = [1, 2]
ALPHA = 0.01
SIR_DRAWS = 100_000


@pytest.fixture(scope="module")
def models():
    return trio(VOCAB, scales=(1.0, 2.0, 2.0), seeds=(1, 2, 3))


@torch.no_grad()
def enumerate_sss(models, shift: float = 1.0, prompt=PROMPT):
    """Every continuation of ``prompt``: (keys, SSS probability, log-weight sum_t log Z_t), float64, no cache.

    Shape
    -----
    -> S keys (tuples), (S,), (S,)
    """
    prefixes, mass, log_weight, laws = [()], {(): 1.0}, {(): 0.0}, {}
    for _ in range(LENGTH):
        ids = torch.tensor([list(prompt) + list(prefix) for prefix in prefixes])
        zq, zr, zd = (m(input_ids=ids, use_cache=False).logits[:, -1].double() for m in models)
        scores = zq + shift * (zr - zd)
        log_z = torch.logsumexp(scores, -1) - torch.logsumexp(zq, -1) - shift * (torch.logsumexp(zr, -1) - torch.logsumexp(zd, -1))
        probs = torch.softmax(scores, -1)
        grown = []
        for row, prefix in enumerate(prefixes):
            for token in range(VOCAB):
                sequence = prefix + (token,)
                entry = (mass[prefix] * float(probs[row, token]), log_weight[prefix] + float(log_z[row]))
                if token == EOS:
                    laws[sequence] = entry
                else:
                    mass[sequence], log_weight[sequence] = entry
                    grown.append(sequence)
        prefixes = grown
    for prefix in prefixes:
        laws[prefix] = (mass[prefix], log_weight[prefix])
    keys = list(laws)
    return keys, np.array([laws[k][0] for k in keys]), np.array([laws[k][1] for k in keys])


def tilted_sequence_law(probs, log_weights):
    """pi* ∝ p * w. Shape: (S,), (S,) -> (S,)"""
    unnormalised = probs * np.exp(log_weights - log_weights.max())
    return unnormalised / unnormalised.sum()


def sir_law(probs, log_weights, num_candidates: int, draws: int = 400_000, seed: int = 0):
    """Law of the resampled candidate: ``N p(y) w(y) E[1 / (w(y) + S_{N-1})]``.

    Exact for N <= 2; otherwise ``S_{N-1}`` is drawn ``draws`` times from the exact SSS law.

    Shape
    -----
    probs, log_weights: (S,) -> (S,)
    """
    if num_candidates == 1:
        return probs.copy()
    weights = np.exp(log_weights - log_weights.max())
    if num_candidates == 2:
        return 2 * probs * weights * (probs[None, :] / (weights[:, None] + weights[None, :])).sum(axis=1)
    rng = np.random.default_rng(seed)
    rest = weights[rng.choice(probs.size, size=(draws, num_candidates - 1), p=probs)].sum(axis=1)
    expectation = np.zeros_like(probs)
    for start in range(0, draws, 50_000):  # (chunk, S) at a time
        expectation += (1.0 / (weights[None, :] + rest[start:start + 50_000, None])).sum(axis=0)
    law = probs * weights * expectation
    return law / law.sum()  # sums to 1 up to the Monte Carlo error


def total_variation(first, second):
    return 0.5 * float(np.abs(first - second).sum())


@pytest.fixture(scope="module")
def laws(models):
    keys, probs, log_weights = enumerate_sss(models)
    return {"keys": keys, "sss": probs, "log_weights": log_weights, "pi_star": tilted_sequence_law(probs, log_weights)}


def _generate(models, prompts: int, num_candidates: int, seed: int, *, ref=None, **overrides):
    q, r, d = models
    return sss_ext.generate(q, r, torch.tensor([PROMPT] * prompts), ref_model=d if ref is None else ref, method="sss-sir",
                            max_new_tokens=LENGTH, num_draft_tokens=2, eos_token_id=EOS, seed=seed,
                            num_candidates=num_candidates, **overrides)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_candidate_carries_its_enumerated_log_weight(models, laws, seed):
    """(a) log w of every candidate = sum of log Z_t over exactly its emitted tokens (EOS included).

    Two prompts of different lengths alternate, so candidates of different prompts share the batch.
    """
    other = [3, 4, 1]
    expected = [dict(zip(laws["keys"], laws["log_weights"])), dict(zip(*enumerate_sss(models, prompt=other)[::2]))]
    q, r, d = models
    out = sss_ext.generate(q, r, [PROMPT, other] * 75, ref_model=d, method="sss-sir", max_new_tokens=LENGTH,
                           num_draft_tokens=2, eos_token_id=EOS, seed=seed, num_candidates=4)
    ended_early = 0
    for prompt, extra in enumerate(out.extras):
        assert len(extra["candidates"]) == len(extra["log_weights"]) == 4
        for candidate, log_weight in zip(extra["candidates"], extra["log_weights"]):
            key = tuple(candidate.tolist())
            want = expected[prompt % 2][key]
            assert abs(log_weight - want) < 1e-5, (prompt, key, log_weight, want)
            ended_early += len(key) < LENGTH
        chosen = extra["chosen"]
        assert torch.equal(out.sequences[prompt], extra["candidates"][chosen])
        assert out.log_z[prompt] == extra["log_weights"][chosen]
    assert ended_early > 0  # EOS inside a round: nothing after it may count


@pytest.mark.slow
def test_output_law_is_the_finite_n_sir_law(models, laws):
    """(b) 10^5 draws of N = 2 fit P_2 (chi-square); the same draws reject p (SSS) and pi* (negative controls)."""
    keys = laws["keys"]
    exact = dict(zip(keys, sir_law(laws["sss"], laws["log_weights"], 2)))
    assert total_variation(np.array(list(exact.values())), laws["sss"]) > 0.05
    assert total_variation(np.array(list(exact.values())), laws["pi_star"]) > 0.05
    out = _generate(models, SIR_DRAWS, 2, seed=5)
    counts = count_sequences(out.sequences)
    p_value = chi_square_pvalue(counts, exact)
    print(f"sss-sir N=2 vs P_2: p = {p_value:.4f}")
    assert p_value > ALPHA
    for name in ("sss", "pi_star"):
        negative = chi_square_pvalue(counts, dict(zip(keys, laws[name])))
        print(f"sss-sir N=2 vs {name} (negative control): p = {negative:.3g}")
        assert negative < ALPHA


def test_sir_law_approaches_the_sequence_level_tilt(laws):
    """(c) TV(P_N, pi*) decreases over N = 1, 4, 32 and is < 0.02 at 32; token-level SSS is > 0.05 away."""
    distances = [total_variation(sir_law(laws["sss"], laws["log_weights"], n), laws["pi_star"]) for n in (1, 4, 32)]
    print("TV(P_N, pi*) for N = 1, 4, 32:", [f"{d:.4f}" for d in distances])
    assert distances[0] > 0.05  # SSS itself (N = 1): the negative control
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.02
    # the Monte Carlo of S_{N-1} agrees with the exact N = 2 formula
    exact = sir_law(laws["sss"], laws["log_weights"], 2)
    rng = np.random.default_rng(1)
    weights = np.exp(laws["log_weights"] - laws["log_weights"].max())
    rest = weights[rng.choice(weights.size, size=400_000, p=laws["sss"])]
    monte_carlo = 2 * laws["sss"] * weights * (1.0 / (weights[None, :] + rest[:, None])).mean(axis=0)
    assert total_variation(exact, monte_carlo) < 2e-3


def test_n_32_output_fits_its_law(models, laws):
    """The implementation at N = 32 (2000 draws) fits P_32 and is rejected against SSS's law."""
    keys = laws["keys"]
    out = _generate(models, 2000, 32, seed=6)
    counts = count_sequences(out.sequences)
    p_value = chi_square_pvalue(counts, dict(zip(keys, sir_law(laws["sss"], laws["log_weights"], 32))))
    negative = chi_square_pvalue(counts, dict(zip(keys, laws["sss"])))
    print(f"sss-sir N=32 vs P_32: p = {p_value:.4f}; vs SSS (negative control): p = {negative:.3g}")
    assert p_value > ALPHA
    assert negative < ALPHA
    assert 1.0 < out.stats.total.effective_sample_size < 32.0


@pytest.mark.parametrize("case", ["shift=0", "r=d"])
def test_unit_weights_give_the_target_law(models, case):
    """(d) lambda = 0 or r = d: every weight is 1 (ESS = N) and the output follows prod_t q_t."""
    q, r, d = models
    overrides, ref = ({"shift": 0.0}, None) if case == "shift=0" else ({}, r)
    out = _generate(models, 12000, 2, seed=7, ref=ref, **overrides)
    log_weights = torch.tensor([extra["log_weights"] for extra in out.extras])
    if case == "shift=0":
        assert bool((log_weights == 0).all())
    else:  # zr - zd is 0 up to the rounding of two forwards over the same tokens
        print(f"r=d: max |log w| = {float(log_weights.abs().max()):.3g}")
        assert float(log_weights.abs().max()) < 1e-6
    assert abs(out.stats.total.effective_sample_size - 2.0) < 1e-9
    counts = count_sequences(out.sequences)
    target = sequence_law((q, r, d), PROMPT, LENGTH, lambda zq, zr, zd: torch.softmax(zq, -1), eos=EOS)
    p_value = chi_square_pvalue(counts, target)
    print(f"sss-sir ({case}) vs prod q: p = {p_value:.4f}")
    assert p_value > ALPHA
    tilted = sequence_law((q, r, d), PROMPT, LENGTH, lambda zq, zr, zd: torch.softmax(zq + zr - zd, -1), eos=EOS)
    assert chi_square_pvalue(counts, tilted) < ALPHA  # negative control: the lambda = 1 tilt is rejected


def test_one_candidate_is_sss(models):
    """N = 1 draws the same SSS rounds as method "sss" with the same seed."""
    q, r, d = models
    prompts = torch.tensor([PROMPT] * 50)
    sir = _generate(models, 50, 1, seed=8)
    sss = sss_ext.generate(q, r, prompts, ref_model=d, method="sss", max_new_tokens=LENGTH, num_draft_tokens=2,
                           eos_token_id=EOS, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(sir.sequences, sss.sequences))
    assert np.allclose(sir.log_z, sss.log_z)
    assert sir.stats.total.effective_sample_size == 1.0


def test_stats_and_costs(models):
    """Per-prompt ESS and spread, candidates run as rows: N times the target rows of SSS, one call per round."""
    out = _generate(models, 3, 4, seed=9)
    for stats, extra in zip(out.stats.per_prompt, out.extras):
        weights = np.exp(np.array(extra["log_weights"]))
        assert stats.effective_sample_size == pytest.approx(weights.sum() ** 2 / (weights**2).sum(), rel=1e-9)
        assert stats.log_weight_spread == pytest.approx(np.std(extra["log_weights"]), rel=1e-9, abs=1e-12)
        assert stats.target_calls >= 1 and stats.rounds >= 4  # 4 candidate rows, at least one round each
    mean_ess = np.mean([s.effective_sample_size for s in out.stats.per_prompt])
    assert out.stats.total.effective_sample_size == pytest.approx(mean_ess)
    json.dumps(out.stats.to_dict())
    plain = sss_ext.generate(*models[:2], [PROMPT], ref_model=models[2], method="sss", max_new_tokens=LENGTH)
    assert plain.stats.total.effective_sample_size is None and plain.stats.per_prompt[0].log_weight_spread is None


def test_resample_follows_softmax_of_the_log_weights():
    log_weights = torch.tensor([[0.0, np.log(3.0)], [-np.inf, 5.0], [np.inf, np.inf], [-np.inf, -np.inf]], dtype=torch.float64)
    assert resample(log_weights, torch.full((4,), 0.2, dtype=torch.float64)).tolist() == [0, 1, 0, 0]
    assert resample(log_weights, torch.full((4,), 0.6, dtype=torch.float64)).tolist() == [1, 1, 1, 1]
    huge = torch.tensor([[1e6, 1e6 + np.log(3.0)]], dtype=torch.float64)  # no overflow: shifted by the maximum
    assert resample(huge, torch.tensor([0.24], dtype=torch.float64)).tolist() == [0]
    assert resample(huge, torch.tensor([0.26], dtype=torch.float64)).tolist() == [1]
    ess, spread = weight_summaries(torch.tensor([[0.0, 0.0, 0.0], [0.0, -800.0, -800.0]], dtype=torch.float64))
    assert ess.tolist() == [3.0, 1.0]
    assert spread[0] == 0.0 and spread[1] == pytest.approx(np.std([0.0, -800.0, -800.0]))
    with pytest.raises(ValueError, match="NaN"):
        resample(torch.tensor([[0.0, float("nan")]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))


def test_bad_configuration_is_refused(models):
    with pytest.raises(ValueError, match="num_candidates"):
        sss_ext.SamplingConfig(num_candidates=0)
    with pytest.raises(ValueError, match="num_candidates"):
        sss_ext.SamplingConfig(num_candidates=2.0)
    for truncation in ({"top_k": 3}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="top_k=0 and top_p=1.0"):
            _generate(models, 2, 2, seed=0, **truncation)
    _generate(models, 2, 2, seed=0, top_k=VOCAB)  # top_k >= vocab_size keeps every token
    with pytest.raises(ValueError, match="ref_model"):
        sss_ext.generate(*models[:2], [PROMPT], method="sss-sir", max_new_tokens=2)


def test_hf_hook_and_cli_accept_sss_sir(models, tmp_path):
    import sss_ext.hf
    from sss_ext import cli

    q, r, d = models
    result = q.generate(torch.tensor([PROMPT]), custom_generate=sss_ext.hf.decode, draft_model=r, ref_model=d,
                        method="sss-sir", num_candidates=3, max_new_tokens=LENGTH, do_sample=True, top_k=0, seed=4,
                        return_dict_in_generate=True)
    out = result.sequences
    direct = sss_ext.generate(q, r, [PROMPT], ref_model=d, method="sss-sir", num_candidates=3, max_new_tokens=LENGTH,
                              seed=4, ignore_eos=True)
    assert out[0, len(PROMPT):].tolist() == direct.sequences[0].tolist()
    assert len(result.sss_output.extras[0]["candidates"]) == 3
    args = cli.build_parser().parse_args(["generate", "--method", "sss-sir", "--num-candidates", "5", "--prompts", "x", "--out", "y"])
    assert args.method == "sss-sir" and args.num_candidates == 5
