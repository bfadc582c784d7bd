"""Probabilities in (sss_ext.logits_from_probs): zeros become -inf logits without NaN, the ops
fed the logarithms sample the probabilities given (tokens equal to a float64 probability-space
oracle with the same uniforms), and every bad input gets a ValueError naming the argument."""

import math

import pytest
import torch

import sss_ext
from sss_ext.probabilities import sum_tolerance
from sss_ext.reference import inverse_cdf
from probability_helpers import cdf_margin, draw_from, probability_verify, random_probs

# Rows whose decision lies within this relative distance of a boundary may round either way
# between float32 logarithms and float64 probabilities (|log p| * 2**-24 < 1e-5).
BOUNDARY = 1e-5
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_probability_is_a_masked_token(dtype):
    probs = random_probs((6, 9), torch.Generator().manual_seed(0), zero_fraction=0.4, dtype=dtype)
    assert bool((probs == 0).any())
    logits = sss_ext.logits_from_probs(probs)
    assert logits.dtype == torch.float32 and logits.shape == probs.shape
    assert not bool(torch.isnan(logits).any())
    assert torch.equal(torch.isneginf(logits), probs == 0)
    expected = torch.log(probs.double()).float() if dtype == torch.float64 else torch.log(probs.float())
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("vocab_size", [1, 2, 99, 111, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_from_probabilities_draws_the_probabilities(device, vocab_size, dtype):
    """sample(logits_from_probs(p), uniforms=u) is the inverse CDF of p (float64) with u, and the
    same as feeding log(p) as logits."""
    g = torch.Generator().manual_seed(vocab_size)
    probs = random_probs((200, vocab_size), g, zero_fraction=0.3 if vocab_size > 1 else 0.0, dtype=dtype)
    u = torch.rand(200, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    tokens = sss_ext.sample(sss_ext.logits_from_probs(probs).to(device), uniforms=u.to(device)).cpu()
    assert torch.equal(tokens, sss_ext.sample(torch.log(probs.double()).float().to(device), uniforms=u.to(device)).cpu())
    weights = probs.double()
    expected = inverse_cdf(weights, u)
    clear = cdf_margin(weights, u) > BOUNDARY
    assert clear.float().mean() > 0.99
    assert torch.equal(tokens[clear], expected[clear])
    assert bool((probs.double().gather(-1, tokens[:, None]) > 0).all())  # never a masked token


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 99), (40, 3, 111), (7, 5, 2)], ids=lambda s: "B%d-K%d-V%d" % s)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_verify_from_probabilities_matches_the_probability_oracle(device, shape, dtype):
    """verify on logits_from_probs of target and draft probabilities (zeros included) gives the
    tokens of the float64 probability-space rule with the same uniforms, and the same as log(p)."""
    batch, num_draft_tokens, vocab_size = shape
    g = torch.Generator().manual_seed(sum(shape))
    zeros = 0.3 if vocab_size > 2 else 0.0
    target = random_probs((batch, num_draft_tokens + 1, vocab_size), g, zero_fraction=zeros, dtype=dtype)
    draft = random_probs((batch, num_draft_tokens, vocab_size), g, zero_fraction=zeros, dtype=dtype)
    ids = draw_from(draft, g)
    u = torch.rand(batch, num_draft_tokens + 1, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    on = lambda t: t.to(device)  # noqa: E731
    out = sss_ext.verify(on(sss_ext.logits_from_probs(target)), on(sss_ext.logits_from_probs(draft)), on(ids), uniforms=on(u))
    logs = sss_ext.verify(on(torch.log(target.double()).float()), on(torch.log(draft.double()).float()), on(ids), uniforms=on(u))
    assert torch.equal(out.tokens, logs.tokens)
    tokens, num_accepted, margin = probability_verify(target, draft, ids, u)
    clear = margin > BOUNDARY
    assert clear.float().mean() >= 0.9
    assert torch.equal(out.tokens.cpu()[clear], tokens[clear])
    assert torch.equal(out.num_accepted.cpu()[clear], num_accepted[clear])


def test_tolerance_covers_softmax_outputs_of_every_dtype():
    """Softmax rows of each dtype, at V up to 128256, pass the default tolerance; a top-k row that
    was not renormalised and logits passed by mistake do not."""
    g = torch.Generator().manual_seed(3)
    for vocab_size in (111, 32000, 128256):
        logits = 4 * torch.randn(4, vocab_size, generator=g)
        for dtype in DTYPES:
            probs = torch.softmax(logits.to(dtype), dim=-1) if dtype != torch.bfloat16 else torch.softmax(logits, -1).to(dtype)
            sss_ext.logits_from_probs(probs)
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(50, dim=-1)
        truncated = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        with pytest.raises(ValueError, match="rows must sum to 1"):
            sss_ext.logits_from_probs(truncated)
        with pytest.raises(ValueError, match="probs must hold probabilities >= 0"):
            sss_ext.logits_from_probs(logits)
    assert sum_tolerance(torch.float64, 128256) < 2e-12
    assert 1e-4 < sum_tolerance(torch.float32, 32000) < 1e-3
    assert sum_tolerance(torch.bfloat16, 128256) < 1e-2 and sum_tolerance(torch.float16, 128256) < 1e-2


BAD = [
    ("not a tensor", [[0.5, 0.5]], {}, "probs must be a torch.Tensor"),
    ("integer dtype", torch.tensor([[1, 0]]), {}, "probs must have dtype float32, float64, bfloat16 or float16"),
    ("bool dtype", torch.tensor([[True, False]]), {}, "probs must have dtype"),
    ("0-d", torch.tensor(1.0), {}, "probs must have a vocabulary dimension"),
    ("empty vocabulary", torch.zeros(2, 0), {}, "probs must have a vocabulary dimension of size >= 1"),
    ("NaN", torch.tensor([[0.5, math.nan]]), {}, r"probs must hold finite probabilities; found NaN or inf at index \(0, 1\)"),
    ("inf", torch.tensor([[0.5, 0.5], [math.inf, 0.0]]), {}, r"found NaN or inf at index \(1, 0\)"),
    ("negative", torch.tensor([[1.25, -0.25]]), {}, r"probs must hold probabilities >= 0; found -0.25 at index \(0, 1\)"),
    ("all-zero row", torch.tensor([[0.5, 0.5], [0.0, 0.0]]), {}, r"no positive probability \(all zeros\) at index \(1,\)"),
    ("sum below 1", torch.tensor([[0.5, 0.4]]), {}, r"rows must sum to 1 within .* sums to 0.9"),
    ("sum above 1", torch.tensor([[0.5, 0.5001]], dtype=torch.float64), {}, r"rows must sum to 1 within .*float64"),
    ("tolerance negative", torch.tensor([[0.5, 0.5]]), {"tolerance": -1e-3}, "tolerance must be None .* or a finite float >= 0"),
    ("tolerance NaN", torch.tensor([[0.5, 0.5]]), {"tolerance": math.nan}, "tolerance must be"),
    ("tolerance bool", torch.tensor([[0.5, 0.5]]), {"tolerance": True}, "tolerance must be"),
]


@pytest.mark.parametrize("probs, kwargs, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_probabilities_are_refused_by_name(probs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sss_ext.logits_from_probs(probs, **kwargs)


def test_the_error_uses_the_name_given_and_tolerance_overrides():
    with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
        sss_ext.logits_from_probs(torch.tensor([[0.5, 0.4]]), name="target_probs")
    logits = sss_ext.logits_from_probs(torch.tensor([[0.5, 0.4]]), tolerance=0.2)
    assert torch.allclose(logits.exp(), torch.tensor([[0.5, 0.4]]))
    # validate=False reads no value: a bad row passes through (the ops then refuse its NaN).
    assert bool(torch.isnan(sss_ext.logits_from_probs(torch.tensor([[1.5, -0.5]]), validate=False)).any())
