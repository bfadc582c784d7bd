"""Block verification (``verification="block"``, docs/algorithm.md §12): the CPU op equals the
float64 reference token for token; the enumerated law of the emitted stream is ``p*``; the op's
samples fit it and a mutated reference's do not; it accepts at least as many drafts as token
verification; greedy calls, refusals, opcheck and torch.compile."""

import itertools
import math

import numpy as np
import pytest
import torch

import sss_ext
from sss_ext import reference
from stats_helpers import chi_square_from_counts
from test_exact_enumeration import EXACT_SETTINGS, HORIZON, TIE_SETTINGS, VOCAB_SIZE, Setting, max_gap, target_law

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_case(seed, batch, num_draft, vocab, dtype=torch.float32, *, with_ref=True, one_hot=False, ragged=False,
                temperature=1.0, top_k=0, top_p=1.0, top_k_ties="keep", scale=2.0):
    """Random logits, drafts drawn from ``r~`` (uniform ids for one-hot drafts) and uniforms.

    Shape
    -----
    -> positional arguments of verify (B, K+1, V) ..., keyword arguments
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, num_draft + 1, vocab)
    target, draft, ref = (scale * torch.randn(shape, generator=generator) for _ in range(3))
    target, draft, ref = (t.to(dtype) for t in (target, draft, ref))
    if one_hot or num_draft == 0 or batch == 0 or temperature == 0.0:
        tokens = torch.randint(vocab, (batch, num_draft), generator=generator)
    else:
        probs = sss_ext.warp_probs(draft[:, :num_draft].reshape(-1, vocab), temperature, top_k, top_p, top_k_ties=top_k_ties)
        tokens = torch.multinomial(probs, 1, generator=generator).reshape(batch, num_draft)
    uniforms = torch.rand((batch, num_draft + 1), generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    kwargs = dict(uniforms=uniforms, temperature=temperature, top_k=top_k, top_p=top_p, top_k_ties=top_k_ties)
    if ragged:
        kwargs["num_draft_tokens"] = torch.randint(num_draft + 1, (batch,), generator=generator)
    if one_hot and with_ref:
        kwargs["aligned_logits"] = draft
    return (target, None if one_hot else draft, tokens, ref if with_ref else None), kwargs


SWEEP_SETTINGS = [
    dict(),
    dict(with_ref=False),
    dict(shift=0.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8, with_ref=False),
    dict(temperature=0.9, top_k=7, top_p=0.9, top_k_ties="exact-k"),
    dict(shift=2.0, temperature=0.8),
    dict(one_hot=True),
    dict(one_hot=True, with_ref=False, top_k=4),
    dict(one_hot=True, temperature=0.8, top_p=0.9),
]


@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
@pytest.mark.parametrize("settings", SWEEP_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_equals_reference(dtype, settings, ragged):
    settings = dict(settings)
    shift = settings.pop("shift", 1.0)
    for seed, (vocab, num_draft) in enumerate(itertools.product([1, 99, 111, 989], range(5))):
        args, kwargs = random_case(seed, 5, num_draft, vocab, dtype, ragged=ragged, **settings)
        got = sss_ext.verify(*args, **kwargs, shift=shift, verification="block")
        want = reference.verify(*args, **kwargs, shift=shift, verification="block")
        assert torch.equal(got.tokens, want.tokens), (vocab, num_draft)
        assert torch.equal(got.num_accepted, want.num_accepted), (vocab, num_draft)
        assert torch.allclose(got.log_z, want.log_z, atol=1e-5, rtol=1e-5)
        token = sss_ext.verify(*args, **kwargs, shift=shift)
        assert torch.equal(got.log_z, token.log_z)  # log Z is per position, as in the token rule


def test_block_and_token_differ_somewhere():
    """Not a renamed token rule: with the same inputs the two accept different prefixes on some rows."""
    args, kwargs = random_case(3, 400, 4, 20, scale=1.0)
    block = sss_ext.verify(*args, **kwargs, verification="block")
    token = sss_ext.verify(*args, **kwargs)
    assert not torch.equal(block.num_accepted, token.num_accepted)


def test_empty_batch():
    args, kwargs = random_case(0, 0, 3, 11)
    out = sss_ext.verify(*args, **kwargs, verification="block")
    assert out.tokens.shape == (0, 4) and out.num_accepted.shape == (0,)


# ---------------------------------------------------------------------------------------
# Exactness by enumeration (V = 3, lookup-table models of test_exact_enumeration).


class OneHotSetting(Setting):
    """A deterministic proposer: the draft after each context is the argmax of r there and the
    proposal is the point mass at it (one-hot drafts, docs/algorithm.md §11)."""

    def _position(self, context):
        p_star, _, z, _ = super()._position(context)
        point = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
        point[int(torch.argmax(self.logits(context)[1]))] = 1.0
        return p_star, point, z, point


def block_round_paths(setting, context, num_draft_tokens, threshold="h", residual="weighted"):
    """Every (probability, tau, drafts, law of Y) of one block-verification round.

    ``threshold="p"`` (``h_i = p_i``) and ``residual="token"`` (``Y`` from ``(P_tau - Q_tau)+``)
    are the negative controls.
    """
    for drafts in itertools.product(range(VOCAB_SIZE), repeat=num_draft_tokens):
        positions = [setting.position(context + drafts[:i]) for i in range(num_draft_tokens + 1)]
        draft_probability = math.prod(float(positions[i][3][x]) for i, x in enumerate(drafts))
        if draft_probability == 0.0:
            continue
        weights = [1.0]  # p_0 .. p_K
        for i, x in enumerate(drafts):
            p_star, r_tilde = positions[i][:2]
            ratio = float(p_star[x] / r_tilde[x]) if p_star[x] > 0 and r_tilde[x] > 0 else 0.0
            weights.append(min(1.0, weights[-1] * ratio))
        h = [None]
        for i in range(1, num_draft_tokens + 1):
            if i == num_draft_tokens or threshold == "p":
                h.append(weights[i])
                continue
            p_star, r_tilde = positions[i][:2]
            mass = float(torch.clamp(weights[i] * p_star - r_tilde, min=0.0).sum())
            denominator = mass + (1.0 - weights[i])
            h.append(mass / denominator if denominator > 0 else 0.0)
        for tau in range(num_draft_tokens + 1):
            probability = (h[tau] if tau else 1.0) * math.prod(1.0 - h[j] for j in range(tau + 1, num_draft_tokens + 1))
            if probability == 0.0:
                continue
            p_star, r_tilde = positions[tau][:2]
            if tau == num_draft_tokens:
                final = p_star
            else:
                scale = weights[tau] if residual == "weighted" else 1.0
                final = torch.clamp(scale * p_star - r_tilde, min=0.0)
                if final.sum() <= 0:
                    final = p_star
            yield draft_probability * probability, tau, drafts, final / final.sum()


def block_sequence_law(setting, num_draft_tokens, **mutation):
    """Law of the first HORIZON emitted tokens of chained block-verification rounds."""
    law = {}
    frontier = [((), 1.0)]
    while frontier:
        context, probability = frontier.pop()
        if len(context) >= HORIZON:
            law[context[:HORIZON]] = law.get(context[:HORIZON], 0.0) + probability
            continue
        for path_probability, tau, drafts, final in block_round_paths(setting, context, num_draft_tokens, **mutation):
            for v in range(VOCAB_SIZE):
                if final[v] > 0:
                    frontier.append((context + drafts[:tau] + (v,), probability * path_probability * float(final[v])))
    return law


ENUMERATED = EXACT_SETTINGS + TIE_SETTINGS[:3] + [OneHotSetting(1.0, 0, 1.0, 1.0, "exact", True),
                                                  OneHotSetting(0.8, 2, 1.0, 0.0, "exact", False)]


def enumerated_id(s):
    return type(s).__name__ + f"-tau{s.temperature}-k{s.top_k}-p{s.top_p}-lam{s.shift}-ref{s.with_ref}-grid{s.grid}-{s.top_k_ties}"


@pytest.mark.parametrize("setting,num_draft_tokens",
                         [(s, k) for s in ENUMERATED for k in (1, 2)] + [(s, 3) for s in (ENUMERATED[0], ENUMERATED[4], ENUMERATED[-2])],
                         ids=lambda x: enumerated_id(x) if isinstance(x, Setting) else f"K{x}")
def test_enumerated_law_is_the_tilted_target(setting, num_draft_tokens):
    law = block_sequence_law(setting, num_draft_tokens)
    assert abs(sum(law.values()) - 1.0) < 1e-12
    assert max_gap(law, target_law(setting)) < 1e-9


# Where (p_tau P_tau - Q_tau)+ and (P_tau - Q_tau)+ normalise to different laws with V = 3.
MUTATION_SETTING = Setting(1.0, 0, 1.0, 1.0, "exact", False, scales=(1.0, 3.0, 1.0))


@pytest.mark.parametrize("mutation", [dict(threshold="p"), dict(residual="token")], ids=["h=p", "token-residual"])
def test_enumerated_mutations_are_not_exact(mutation):
    setting = MUTATION_SETTING
    assert max_gap(block_sequence_law(setting, 2, **mutation), target_law(setting)) > 1e-3


# ---------------------------------------------------------------------------------------
# The op's samples against the enumerated law of one round.

CHI_SQUARE_SETTING = Setting(1.0, 0, 1.0, 1.0, "exact", True, scales=(1.5, 1.5, 1.5))
CHI_SQUARE_DRAFTS = 3


def float32_setting(setting):
    """The setting on the float32-rounded logits that the op reads."""
    rounded = Setting(setting.temperature, setting.top_k, setting.top_p, setting.shift, setting.mode, setting.with_ref,
                      setting.scales, setting.top_k_ties)
    rounded.logits = lambda c: tuple(None if t is None else t.to(torch.float32).to(torch.float64) for t in setting.logits(c))
    return rounded


def round_law(setting, num_draft_tokens, **mutation):
    """Exact law of one round's emitted tokens (accepted drafts, then Y) from the empty context."""
    law = {}
    for probability, tau, drafts, final in block_round_paths(setting, (), num_draft_tokens, **mutation):
        for v in range(VOCAB_SIZE):
            key = drafts[:tau] + (v,)
            law[key] = law.get(key, 0.0) + probability * float(final[v])
    return law


def sampled_rounds(setting, num_draft_tokens, num_rounds, seed):
    """``num_rounds`` independent rounds from the empty context: drafts drawn from ``r~`` and the
    logits of every prefix, as verify inputs.

    Shape
    -----
    -> target, draft, ref (N, K+1, V) float32, draft_tokens (N, K), uniforms (N, K+1)
    """
    generator = torch.Generator().manual_seed(seed)
    drafts = torch.zeros(num_rounds, num_draft_tokens, dtype=torch.int64)
    for i in range(num_draft_tokens):
        contexts = [tuple(row) for row in drafts[:, :i].tolist()]
        laws = {c: setting.position(c)[3] for c in set(contexts)}
        probs = torch.stack([laws[c] for c in contexts])
        drafts[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    rows = [tuple(row) for row in drafts.tolist()]
    table = {}
    for row in set(rows):
        table[row] = [torch.stack([setting.logits(row[:i])[j] for i in range(num_draft_tokens + 1)]) for j in range(3)]
    target, draft, ref = (torch.stack([table[row][j] for row in rows]).to(torch.float32) for j in range(3))
    uniforms = torch.rand((num_rounds, num_draft_tokens + 1), generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return target, draft, ref, drafts, uniforms


def chi_square_of_rounds(output, law):
    keys = sorted(law)
    index = {key: k for k, key in enumerate(keys)}
    counts = np.zeros(len(keys) + 1)
    for tokens, accepted in zip(output.tokens.tolist(), output.num_accepted.tolist()):
        counts[index.get(tuple(tokens[: accepted + 1]), len(keys))] += 1
    return chi_square_from_counts(counts, np.array([law[k] for k in keys] + [0.0]))


@pytest.fixture(scope="module")
def chi_square_inputs():
    setting = float32_setting(CHI_SQUARE_SETTING)
    return setting, sampled_rounds(setting, CHI_SQUARE_DRAFTS, 60_000, seed=7)


def test_op_samples_fit_the_enumerated_round_law(chi_square_inputs):
    setting, (target, draft, ref, drafts, uniforms) = chi_square_inputs
    out = sss_ext.verify(target, draft, drafts, ref, uniforms=uniforms, verification="block")
    assert chi_square_of_rounds(out, round_law(setting, CHI_SQUARE_DRAFTS)) > 1e-3


def test_mutated_reference_samples_are_rejected(chi_square_inputs, monkeypatch):
    """Negative control: the reference with h_i = p_i (the residual term forgotten), on the same
    inputs, must fail the same test."""
    setting, (target, draft, ref, drafts, uniforms) = chi_square_inputs
    monkeypatch.setattr(reference, "block_threshold", lambda mass, weight: weight)
    out = reference.verify(target, draft, drafts, ref, uniforms=uniforms, verification="block")
    assert chi_square_of_rounds(out, round_law(setting, CHI_SQUARE_DRAFTS)) < 1e-6


# ---------------------------------------------------------------------------------------
# Expected accepted length: block >= token, with common random inputs.


def accepted_length_difference(target, draft, ref, rounds, seed, **options):
    """Per-row mean and standard error of num_accepted(block) - num_accepted(token) over
    ``rounds`` rounds with the same drafts and uniforms, and the two means.

    Shape
    -----
    target, draft, ref: (B, K+1, V) logits of each row's positions (the drafts do not change
    them) -> (B,), (B,), (B,), (B,)
    """
    batch, positions, vocab = target.shape
    num_draft = positions - 1
    generator = torch.Generator().manual_seed(seed)
    expand = lambda t: None if t is None else t.repeat_interleave(rounds, dim=0)  # noqa: E731
    target_rows, draft_rows, ref_rows = expand(target), expand(draft), expand(ref)
    probs = sss_ext.warp_probs(draft_rows[:, :num_draft].reshape(-1, vocab), options.get("temperature", 1.0),
                               options.get("top_k", 0), options.get("top_p", 1.0))
    drafts = torch.multinomial(probs, 1, generator=generator).reshape(-1, num_draft)
    uniforms = torch.rand((batch * rounds, positions), generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    block, token = (sss_ext.verify(target_rows, draft_rows, drafts, ref_rows, uniforms=uniforms, verification=v, **options)
                    .num_accepted.reshape(batch, rounds).double() for v in ("block", "token"))
    difference = block - token
    return difference.mean(1), difference.std(1) / math.sqrt(rounds), block.mean(1), token.mean(1)


def assert_block_accepts_more(mean, standard_error):
    # Per row: block >= token in expectation (block verification is optimal, Sun et al.), up to 4.5 standard errors.
    assert bool((mean + 4.5 * standard_error > -0.01).all()), (mean, standard_error)
    # In aggregate: strictly more.
    aggregate_error = float(torch.sqrt((standard_error**2).sum())) / len(mean)
    assert float(mean.mean()) - 4.5 * aggregate_error > 0, (float(mean.mean()), aggregate_error)


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, top_k=20), dict(ref=False)], ids=["sss", "topk", "sd"])
def test_block_accepts_at_least_as_many_on_random_logits(options):
    options = dict(options)
    with_ref = options.pop("ref", True)
    generator = torch.Generator().manual_seed(11)
    shape = (12, 5, 50)
    target = torch.randn(shape, generator=generator)
    draft = target + 0.8 * torch.randn(shape, generator=generator)  # a draft that roughly agrees
    ref = draft + 0.3 * torch.randn(shape, generator=generator) if with_ref else None
    mean, error, _, _ = accepted_length_difference(target, draft, ref, 3000, seed=5, **options)
    assert_block_accepts_more(mean, error)


@pytest.mark.requires("transformers")
def test_block_accepts_at_least_as_many_on_tiny_transformers():
    """Real conditionals: a tiny random Llama target and draft, every prefix of 3 drafts after
    each prompt, drafts drawn from the draft model."""
    from decoding_helpers import trio

    vocab, num_draft, rounds = 12, 3, 3000
    target_model, draft_model, _ = trio(vocab, scales=(2.0, 2.0, 2.0))
    prompts = [[1, 2], [5], [7, 3, 3], [0, 11]]
    means, errors = [], []
    generator = torch.Generator().manual_seed(3)
    for prompt in prompts:
        continuations = torch.tensor(list(itertools.product(range(vocab), repeat=num_draft)))
        ids = torch.cat([torch.tensor(prompt).expand(len(continuations), -1), continuations], dim=1)
        with torch.no_grad():
            tables = [model(input_ids=ids, use_cache=False).logits[:, len(prompt) - 1:].float() for model in (target_model, draft_model)]
        drafts = torch.zeros(rounds, num_draft, dtype=torch.int64)
        row = torch.zeros(rounds, dtype=torch.int64)  # index of the drafts so far among the continuations' prefixes
        for i in range(num_draft):
            probs = torch.softmax(tables[1][row * vocab ** (num_draft - i), i].double(), dim=-1)
            drafts[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            row = row * vocab + drafts[:, i]
        target, draft = (table[row] for table in tables)
        uniforms = torch.rand((rounds, num_draft + 1), generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        block, token = (sss_ext.verify(target, draft, drafts, uniforms=uniforms, verification=v).num_accepted.double()
                        for v in ("block", "token"))
        means.append((block - token).mean())
        errors.append((block - token).std() / math.sqrt(rounds))
    assert_block_accepts_more(torch.stack(means), torch.stack(errors))


# ---------------------------------------------------------------------------------------
# Greedy, refusals, compile.


@pytest.mark.parametrize("settings", [dict(), dict(with_ref=False), dict(one_hot=True), dict(ragged=True)],
                         ids=["sss", "sd", "one-hot", "ragged"])
def test_greedy_block_is_greedy_token(settings):
    args, kwargs = random_case(2, 64, 4, 3, temperature=0.0, scale=0.3, **settings)
    block = sss_ext.verify(*args, **kwargs, verification="block")
    token = sss_ext.verify(*args, **kwargs)
    for name in ("tokens", "num_accepted", "log_z"):
        assert torch.equal(getattr(block, name), getattr(token, name))
    assert torch.equal(reference.verify(*args, **kwargs, verification="block").tokens, token.tokens)
    assert int(token.num_accepted.max()) > 0  # some drafts are accepted


@pytest.mark.parametrize("verify", [sss_ext.verify, reference.verify], ids=["op", "reference"])
@pytest.mark.parametrize("value", ["tokens", "", "Block", None, 1])
def test_bad_verification_is_refused(verify, value):
    args, kwargs = random_case(0, 2, 2, 5)
    with pytest.raises(ValueError, match=r"verification must be one of \('token', 'block'\)"):
        verify(*args, **kwargs, verification=value)


@pytest.mark.parametrize("verify", [sss_ext.verify, reference.verify], ids=["op", "reference"])
def test_paper_mode_with_block_is_refused(verify):
    args, kwargs = random_case(0, 2, 2, 5)
    with pytest.raises(ValueError, match=r"verification='block' needs mode='exact'.*mode='paper'"):
        verify(*args, **kwargs, mode="paper", verification="block")


def test_torch_compile_fullgraph_matches_eager():
    args, kwargs = random_case(4, 6, 3, 50, ragged=True, temperature=0.9)

    def block_round(target_logits, draft_logits, draft_tokens, ref_logits, uniforms, num_draft_tokens):
        out = sss_ext.verify(target_logits, draft_logits, draft_tokens, ref_logits, temperature=0.9, uniforms=uniforms,
                             num_draft_tokens=num_draft_tokens, verification="block")
        return out.tokens, out.num_accepted

    inputs = (*args, kwargs["uniforms"], kwargs["num_draft_tokens"])
    compiled = torch.compile(block_round, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(*inputs), block_round(*inputs)):
        assert torch.equal(got, expected)
