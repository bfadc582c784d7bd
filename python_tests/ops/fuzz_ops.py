"""Property-based fuzzing of the op family (hypothesis).

Not collected directly: ``test_fuzz.py`` runs each property in its own process, so a crash
fails that test instead of killing the run. Every call either raises a named
``ValueError``/``TypeError`` — in the op and the reference alike, stating the same rule — or
returns well-formed output equal to the reference's for the same uniforms.

Generation is stratified: four examples in five are valid, non-empty calls that reach the
kernels (finite logits with a few masked tokens, in-range ids and uniforms, sane temperatures
and shifts); the fifth is adversarial (NaN/inf, huge values, empty batches, out-of-range
arguments). Each example's outcome (compared / refused / empty) is appended to the file
named by ``SSS_FUZZ_CENSUS`` when set; ``test_fuzz.py`` reports and checks the census.

The example budget is ``SSS_FUZZ_EXAMPLES`` (default 150 per property); generation is
derandomised, so a budget always runs the same examples.
"""

from __future__ import annotations

import os
import re

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sss_ext
from sss_ext.checks import check_logit_values, check_scaled_range, check_token_ids

EXAMPLES = int(os.environ.get("SSS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPECIAL = (float("-inf"), float("nan"), float("inf"), 0.0, 1e4, -1e4, 3e38, -3e38, 1e-30)
TEMPERATURES = (0.0, 1e-310, 1e-300, 1e-30, 1e-3, 0.01, 0.7, 1.0, 100.0)
SHIFTS = (0.0, 0.5, 1.0, 2.0, 1e10, 1e300, 1e308)
UNIFORMS = (0.0, 1.0, float("nan"), -0.5, 1e-300, 1.0 - 2.0**-53, 2.0**-53)
VOCAB_SIZES = (1, 2, 3, 7, 64, 999, 50272)
VALID_TEMPERATURES = (0.0, 1e-3, 0.01, 0.7, 1.0, 100.0)
VALID_SHIFTS = (0.0, 0.5, 1.0, 2.0)
CENSUS = os.environ.get("SSS_FUZZ_CENSUS")


def record(outcome_kind: str) -> None:
    """Appends one example's outcome to the census file (compared, refused or empty)."""
    if CENSUS:
        with open(CENSUS, "a") as census:
            census.write(outcome_kind + "\n")
NAMED = re.compile(r"\b(target_logits|draft_logits|aligned_logits|ref_logits|logits|draft_tokens|uniforms|temperature|top_k|top_p|"
                   r"top_k_ties|shift|mode|generator|tilted|verification)\b")
TOP_K_TIES = ("keep", "exact-k")


@st.composite
def logits_tensors(draw, shape, dtype, valid=False):
    """Scaled normals with occasional masks, NaN/inf, huge values and all -inf rows; valid:
    finite values with at most one masked token per row (never a whole row)."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from((0.0, 1.0, 5.0) if valid else (0.0, 1.0, 5.0, 1e3)))
    values = scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = values.view(-1)
    if valid:
        if flat.numel() and shape[-1] > 1 and draw(st.booleans()):  # one masked token in every row
            values.view(-1, shape[-1])[:, draw(st.integers(0, shape[-1] - 1))] = float("-inf")
    elif flat.numel():
        for _ in range(draw(st.integers(0, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL))
        if draw(st.booleans()) and draw(st.booleans()):  # one whole row masked
            values.view(-1, shape[-1])[draw(st.integers(0, flat.numel() // shape[-1] - 1))] = float("-inf")
    tensor = values.to(dtype)
    if draw(st.booleans()):  # strided layout: unit vocabulary stride, padded leading dims
        padded = torch.zeros(*(n + 1 for n in shape), dtype=dtype)
        padded[tuple(slice(0, n) for n in shape)] = tensor
        tensor = padded[tuple(slice(0, n) for n in shape)]
    return tensor


@st.composite
def uniforms_tensors(draw, shape, valid=False):
    seed = draw(st.integers(0, 2**31 - 1))
    u = sss_ext.draw_uniforms(shape, "cpu", torch.Generator().manual_seed(seed))
    flat = u.view(-1)
    if not valid and flat.numel() and draw(st.integers(0, 4)) == 0:
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(UNIFORMS))
    return u


def valid_stratum(draw) -> bool:
    """Four examples in five are valid calls (hypothesis's simplest example is one)."""
    return draw(st.integers(0, 4)) < 4


@st.composite
def verify_calls(draw):
    valid = valid_stratum(draw)
    batch = draw(st.integers(1, 3) if valid else st.integers(0, 3))
    num_draft_tokens = draw(st.integers(0, 3))
    vocab_size = draw(st.sampled_from(VOCAB_SIZES))
    dtype = draw(st.sampled_from(DTYPES))
    with_ref = draw(st.booleans())
    positions = num_draft_tokens + 1
    draft_positions = positions if with_ref or draw(st.booleans()) else num_draft_tokens
    target = draw(logits_tensors((batch, positions, vocab_size), dtype, valid))
    draft = draw(logits_tensors((batch, draft_positions, vocab_size), dtype, valid))
    ref = draw(logits_tensors((batch, positions, vocab_size), dtype, valid)) if with_ref else None
    if draw(st.booleans()) and with_ref:  # correlated models: acceptance neither ~0 nor ~1
        draft = target + draft * 0.1 if draft.shape == target.shape else draft
        ref = draft + ref * 0.1
    if valid:
        draft_tokens = torch.randint(0, vocab_size, (batch, num_draft_tokens), generator=torch.Generator().manual_seed(
            draw(st.integers(0, 2**31 - 1))))
    else:
        draft_tokens = torch.tensor(
            draw(st.lists(st.lists(st.integers(-1 if draw(st.booleans()) else 0, vocab_size), min_size=num_draft_tokens,
                                   max_size=num_draft_tokens), min_size=batch, max_size=batch)),
            dtype=torch.int64).reshape(batch, num_draft_tokens)
        draft_tokens = draft_tokens.clamp(max=vocab_size - 1) if draw(st.booleans()) else draft_tokens
    # One call in three has one-hot drafts (draft_logits None): r then enters only the tilt as
    # aligned_logits, which an invalid call may leave out or pass without a reference.
    aligned = None
    if draw(st.integers(0, 2)) == 0:
        if with_ref or not valid:
            aligned = draft if valid or draw(st.booleans()) else None
        draft = None
    mode = draw(st.sampled_from(("exact", "paper"))) if with_ref and (draft is not None or not valid) else "exact"
    return dict(
        target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, ref_logits=ref, aligned_logits=aligned,
        temperature=draw(st.sampled_from(VALID_TEMPERATURES if valid else TEMPERATURES)),
        top_k=draw(st.sampled_from((0, 1, 2, vocab_size, vocab_size + 3, 2**62))),
        top_p=draw(st.sampled_from((1.0, 0.95, 0.5, 1e-9))),
        top_k_ties=draw(st.sampled_from(TOP_K_TIES)),
        shift=draw(st.sampled_from(VALID_SHIFTS if valid else SHIFTS)),
        mode=mode,
        uniforms=draw(uniforms_tensors((batch, positions), valid)),
        # Block verification on one exact call in two; an invalid call may pair it with paper mode.
        verification=draw(st.sampled_from(("token", "block"))) if mode == "exact" or not valid else "token",
    )


def outcome(fn, kwargs):
    """('ok', result) or ('error', message); anything but ValueError/TypeError propagates."""
    try:
        return "ok", fn(**kwargs)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert NAMED.search(message), f"error does not name an argument: {message}"
        return "error", message


def assert_well_formed(result, batch, num_draft_tokens, vocab_size):
    tokens, num_accepted, log_z = result
    assert tokens.shape == (batch, num_draft_tokens + 1) and tokens.dtype == torch.int64
    assert num_accepted.shape == (batch,) and log_z.shape == (batch, num_draft_tokens + 1)
    assert not torch.isnan(log_z).any()
    for row in range(batch):
        n = int(num_accepted[row])
        assert 0 <= n <= num_draft_tokens
        emitted, padding = tokens[row, : n + 1], tokens[row, n + 1 :]
        assert bool(((emitted >= 0) & (emitted < vocab_size)).all()), tokens[row]
        assert bool((padding == -1).all()), tokens[row]


def _scaled_range(name, call):
    temperature = call["temperature"]
    check_scaled_range(name, call[name], 1.0 if temperature == 0 else 1.0 / temperature)


def _uniforms_open(call):
    if not bool(((call["uniforms"] > 0) & (call["uniforms"] < 1)).all()):
        raise ValueError("uniforms outside (0, 1)")


# Value defects a call can hold several of (the op meets them row by row, the reference input
# by input): the rule's message, and the reference check that confirms the call has it.
VALUE_DEFECTS = (
    (re.compile(r"(target_logits|draft_logits|aligned_logits|ref_logits) (has a row with every logit -inf|must be finite or -inf)"),
     lambda m, call: check_logit_values(m.group(1), call[m.group(1)])),
    (re.compile(r"(target_logits|draft_logits|aligned_logits|ref_logits) / temperature leaves the supported range"),
     lambda m, call: _scaled_range(m.group(1), call)),
    (re.compile(r"draft_tokens must hold token ids"),
     lambda m, call: check_token_ids("draft_tokens", call["draft_tokens"], call["target_logits"].shape[-1])),
    (re.compile(r"uniforms must lie in the open interval"), lambda m, call: _uniforms_open(call)),
)


def confirmed_defect(message: str, call: dict) -> bool:
    """Whether ``message`` states a value defect that ``call`` has by the reference's own checks."""
    for rule, check in VALUE_DEFECTS:
        match = rule.match(message)
        if match:
            try:
                check(match, call)
            except ValueError:
                return True
            return False
    return False


def first_clause(message: str) -> str:
    """The rule a refusal states, without where it was found (op and reference locate it differently)."""
    return re.split(r";|: | at (?:row|index|position|batch)\b| at \(", message)[0].strip()


def op_and_reference(op, reference, call, batch):
    """Both outcomes, asserted alike: both refuse with the same named error, or both return."""
    got_kind, got = outcome(op, call)
    expected_kind, expected = outcome(reference, call)
    assert got_kind == expected_kind, f"op: {got_kind} {got if got_kind == 'error' else ''}; reference: {expected_kind} " \
                                      f"{expected if expected_kind == 'error' else ''}"
    if got_kind == "error" and first_clause(got) != first_clause(expected):
        # Several value defects: the op reports the first it meets row by row, the reference
        # input by input. Each must name a defect the call really has.
        assert confirmed_defect(got, call) and confirmed_defect(expected, call), \
            f"op and reference refuse differently:\n  op: {got}\n  reference: {expected}"
    record("refused" if got_kind == "error" else "empty" if batch == 0 else "compared")
    return got_kind == "ok", got, expected


@FUZZ
@given(verify_calls())
def test_verify_equals_reference_or_both_refuse(call):
    returned, got, expected = op_and_reference(sss_ext.verify, sss_ext.reference.verify, call, call["target_logits"].shape[0])
    if returned:
        batch, num_draft_tokens = call["draft_tokens"].shape
        assert_well_formed(got, batch, num_draft_tokens, call["target_logits"].shape[-1])
        assert torch.equal(got.tokens, expected.tokens), (got.tokens, expected.tokens)
        assert torch.equal(got.num_accepted, expected.num_accepted)
        finite = torch.isfinite(expected.log_z)
        assert torch.equal(finite, torch.isfinite(got.log_z))
        assert torch.allclose(got.log_z[finite], expected.log_z[finite], rtol=1e-5, atol=1e-5)


@st.composite
def sample_calls(draw):
    valid = valid_stratum(draw)
    batch = draw(st.integers(1, 4) if valid else st.integers(0, 4))
    vocab_size = draw(st.sampled_from(VOCAB_SIZES))
    return dict(
        logits=draw(logits_tensors((batch, vocab_size), draw(st.sampled_from(DTYPES)), valid)),
        temperature=draw(st.sampled_from(VALID_TEMPERATURES if valid else TEMPERATURES)),
        top_k=draw(st.sampled_from((0, 1, 3, vocab_size, 2**62))),
        top_p=draw(st.sampled_from((1.0, 0.9, 0.3, 1e-9))),
        top_k_ties=draw(st.sampled_from(TOP_K_TIES)),
        uniforms=draw(uniforms_tensors((batch,), valid)),
    )


@FUZZ
@given(sample_calls())
def test_sample_equals_reference_or_both_refuse(call):
    returned, got, expected = op_and_reference(sss_ext.sample, sss_ext.reference.sample, call, call["logits"].shape[0])
    if returned:
        assert got.shape == (call["logits"].shape[0],) and got.dtype == torch.int64
        assert bool(((got >= 0) & (got < call["logits"].shape[-1])).all())
        assert torch.equal(got, expected)


@FUZZ
@given(sample_calls())
def test_warp_probs_is_a_distribution_or_refuses(call):
    kind, probs = outcome(sss_ext.warp_probs, {k: call[k] for k in ("logits", "temperature", "top_k", "top_p", "top_k_ties")})
    record("refused" if kind == "error" else "compared" if probs.numel() else "empty")
    if kind == "ok" and probs.numel():
        assert not torch.isnan(probs).any()
        assert bool((probs >= 0).all())
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=torch.float64), atol=1e-9)


WRONG_VALUES = (None, 3, 1.5, "x", torch.zeros(0), torch.zeros(2, 2, dtype=torch.int32), torch.zeros(1, 1, 1, 1),
                torch.zeros(2, 3, 5, device="meta"), torch.zeros(2, 3, 5, dtype=torch.float64), object())


@FUZZ
@given(st.sampled_from(("target_logits", "draft_logits", "aligned_logits", "draft_tokens", "ref_logits", "uniforms", "temperature", "top_k",
                        "top_p", "top_k_ties", "shift", "mode", "generator", "verification")),
       st.sampled_from(WRONG_VALUES + (float("nan"), -1, 2.0, float("inf"), "paper", True)),
       st.sampled_from(("op", "reference")))
def test_bad_arguments_raise_named_errors(name, value, entry):
    generator = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 5, generator=generator)
    call = dict(target_logits=t, draft_logits=t + 0.1, draft_tokens=torch.zeros(2, 2, dtype=torch.int64), ref_logits=t - 0.1,
                aligned_logits=None, temperature=1.0, top_k=0, top_p=1.0, top_k_ties="keep", shift=1.0, mode="exact", uniforms=None, generator=None,
                verification="token")
    call[name] = value
    fn = sss_ext.verify if entry == "op" else sss_ext.reference.verify
    kind, result = outcome(fn, call)
    if kind == "ok":  # the substitute happened to be valid: then the output is well formed
        assert_well_formed(result, 2, 2, 5)
