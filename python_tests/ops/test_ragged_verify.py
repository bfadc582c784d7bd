"""Per-row draft counts (``num_draft_tokens``, the ragged layout) of the verify op: the op
equals the reference with garbage wherever a row must not read, every row equals the
uniform call on its own positions, zero-draft rows are plain sampling from p*, the
enumerated law holds for draft lengths that change from round to round, and bad counts
get named errors."""

import pytest
import torch

import sss_ext
from sss_ext.testing import LAYOUTS, make_ragged_verify_inputs
from test_exact_enumeration import (
    EXACT_SETTINGS,
    HORIZON,
    NUM_DRAFT_TOKENS,
    VOCAB_SIZE,
    Setting,
    max_gap,
    probe_rows,
    round_paths,
    sequence_law,
    target_law,
)
from test_verify_matches_reference import assert_same

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = (("exact", False), ("exact", True), ("paper", True))  # (mode, with_ref)
TRUNCATIONS = ((0, 1.0), (5, 1.0), (0, 0.8))  # (top_k, top_p)
# (batch, K, V): sizes 1, awkward, K = 0 (every row plain sampling) and a vocabulary of one token
SHAPES = [(1, 1, 2), (2, 1, 1), (3, 0, 7), (5, 3, 37), (9, 8, 111), (4, 4, 1000)]


def on(device, kwargs):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def check_padding(out, num_draft_tokens):
    """-1 after the emitted tokens, log_z 0 past the bonus position, num_accepted <= n."""
    tokens, num_accepted, log_z = (t.cpu() for t in out)
    position = torch.arange(tokens.shape[1])
    assert bool((num_accepted <= num_draft_tokens.cpu()).all())
    assert bool((tokens[position[None] > num_accepted[:, None]] == -1).all())
    assert bool((tokens[position[None] <= num_accepted[:, None]] >= 0).all())
    assert bool((log_z[position[None] > num_draft_tokens.cpu()[:, None]] == 0).all())


@pytest.mark.parametrize("top_k,top_p", TRUNCATIONS)
@pytest.mark.parametrize("temperature", (0.0, 0.7, 1.0))
@pytest.mark.parametrize("mode,with_ref", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ragged_sweep_matches_reference(device, dtype, mode, with_ref, temperature, top_k, top_p):
    accepted = 0
    for n, (batch, num_draft, vocab_size) in enumerate(SHAPES):
        layout = LAYOUTS[n % len(LAYOUTS)]
        kwargs = make_ragged_verify_inputs(batch, num_draft, vocab_size, dtype, with_ref, temperature, top_k, top_p, layout,
                                           seed=n)
        expected = sss_ext.reference.verify(**kwargs, mode=mode)
        got = sss_ext.verify(**on(device, kwargs), mode=mode)
        assert_same(got, expected, f"shape={(batch, num_draft, vocab_size)} counts={kwargs['num_draft_tokens'].tolist()} "
                                   f"dtype={dtype} mode={mode} tau={temperature} top_k={top_k} top_p={top_p} layout={layout}")
        check_padding(got, kwargs["num_draft_tokens"])
        accepted += int(expected.num_accepted.sum())
    assert accepted > 0


@pytest.mark.parametrize("top_k,top_p", ((0, 1.0), (20, 0.9)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_ragged_large_vocabulary_matches_reference(device, dtype, top_k, top_p):
    # V = 50272: the CUDA kernels' fast exponentials and bucketed truncation
    kwargs = make_ragged_verify_inputs(4, 4, 50272, dtype, True, 1.0, top_k, top_p, "sliced", seed=11)
    expected = sss_ext.reference.verify(**kwargs)
    got = sss_ext.verify(**on(device, kwargs))
    assert_same(got, expected, f"dtype={dtype} top_k={top_k} top_p={top_p} counts={kwargs['num_draft_tokens'].tolist()}")
    check_padding(got, kwargs["num_draft_tokens"])


@pytest.mark.parametrize("mode,with_ref", MODES)
@pytest.mark.parametrize("temperature,top_p", ((1.0, 1.0), (0.8, 0.9), (0.0, 1.0)))
def test_every_row_is_the_uniform_call_on_its_positions(device, mode, with_ref, temperature, top_p):
    kwargs = on(device, make_ragged_verify_inputs(6, 5, 50, torch.float32, with_ref, temperature, 0, top_p, seed=3))
    ragged = sss_ext.verify(**kwargs, mode=mode)
    for b, n in enumerate(kwargs["num_draft_tokens"].tolist()):
        row = sss_ext.verify(
            kwargs["target_logits"][b : b + 1, : n + 1],
            kwargs["draft_logits"][b : b + 1, : n + 1] if with_ref else kwargs["draft_logits"][b : b + 1, :n],
            kwargs["draft_tokens"][b : b + 1, :n],
            None if kwargs["ref_logits"] is None else kwargs["ref_logits"][b : b + 1, : n + 1],
            uniforms=kwargs["uniforms"][b : b + 1, : n + 1], temperature=temperature, top_p=top_p, mode=mode,
        )
        assert torch.equal(ragged.tokens[b, : n + 1], row.tokens[0]), (b, n)
        assert torch.equal(ragged.num_accepted[b], row.num_accepted[0]), (b, n)
        assert torch.equal(ragged.log_z[b, : n + 1], row.log_z[0]), (b, n)


@pytest.mark.parametrize("verification", ("token", "block"))
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_ref", (False, True))
def test_garbage_past_the_bonus_position_is_never_read(device, with_ref, seed, verification):
    clean = on(device, make_ragged_verify_inputs(7, 4, 64, torch.float32, with_ref, 0.9, 4, 0.95, seed=seed, poison=False))
    poisoned = on(device, make_ragged_verify_inputs(7, 4, 64, torch.float32, with_ref, 0.9, 4, 0.95, seed=seed))
    assert not torch.equal(clean["draft_tokens"], poisoned["draft_tokens"])  # the poison is there
    for implementation in (sss_ext.verify, sss_ext.reference.verify):
        expected = implementation(**clean, verification=verification)
        got = implementation(**poisoned, verification=verification)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    # the same garbage in a row that does read those positions is refused
    full = dict(poisoned, num_draft_tokens=torch.full_like(poisoned["num_draft_tokens"], 4))
    with pytest.raises(ValueError):
        sss_ext.verify(**full)


@pytest.mark.parametrize("temperature,top_k", ((1.0, 0), (0.6, 3), (0.0, 0)))
def test_zero_drafts_is_sampling_from_the_target(device, temperature, top_k):
    kwargs = on(device, make_ragged_verify_inputs(8, 3, 29, torch.float32, False, temperature, top_k, seed=5))
    kwargs["num_draft_tokens"].zero_()
    out = sss_ext.verify(**kwargs)
    sampled = sss_ext.sample(kwargs["target_logits"][:, 0], temperature, top_k, uniforms=kwargs["uniforms"][:, 0].contiguous())
    assert torch.equal(out.tokens[:, 0], sampled)
    assert bool((out.tokens[:, 1:] == -1).all()) and bool((out.num_accepted == 0).all())


LENGTH_SCHEDULES = {
    "by-context-length": lambda context: (len(context) + 1) % (NUM_DRAFT_TOKENS + 1),
    "by-last-token": lambda context: context[-1] % (NUM_DRAFT_TOKENS + 1) if context else NUM_DRAFT_TOKENS,
}


@pytest.mark.parametrize("schedule", LENGTH_SCHEDULES, ids=str)
@pytest.mark.parametrize("setting", EXACT_SETTINGS[:2] + EXACT_SETTINGS[4:5],
                         ids=lambda s: f"tau{s.temperature}-lam{s.shift}-ref{s.with_ref}")
def test_enumerated_law_with_draft_lengths_chosen_from_the_history(setting, schedule):
    # Draft lengths 0..K chosen from what was emitted so far (as the adaptive policy does).
    law = sequence_law(setting, LENGTH_SCHEDULES[schedule])
    assert abs(sum(law.values()) - 1.0) < 1e-12
    assert max_gap(law, target_law(setting)) < 1e-10


def peeking_law(setting):
    """Law of the first HORIZON tokens when a row's length is chosen after its drafts are drawn:
    it verifies only the drafts before its first draft 0 (not predictable, so not exact)."""
    law, pending = {}, {(): 1.0}  # contexts shorter than HORIZON, each expanded once (shortest first)
    while pending:
        context = min(pending, key=len)
        probability = pending.pop(context)
        for path_probability, n, drafts, _, final in round_paths(setting, context):
            cut = drafts.index(0) if 0 in drafts else len(drafts)
            if n >= cut:  # all drafts before the cut accepted: the bonus at the cut
                n, final = cut, setting.position(context + drafts[:cut])[0]
            for v in range(VOCAB_SIZE):
                if final[v] > 0:
                    longer = context + drafts[:n] + (v,)
                    mass = probability * path_probability * float(final[v])
                    target = law if len(longer) >= HORIZON else pending
                    key = longer[:HORIZON] if len(longer) >= HORIZON else longer
                    target[key] = target.get(key, 0.0) + mass
    return law


def test_enumerated_law_negative_control():
    setting = EXACT_SETTINGS[0]
    law = peeking_law(setting)
    assert abs(sum(law.values()) - 1.0) < 1e-12
    assert max_gap(law, target_law(setting)) > 1e-3  # the check above can fail


@pytest.mark.parametrize("setting", EXACT_SETTINGS[:4] + [Setting(1.0, 0, 1.0, 1.0, "paper", True, scales=(1.5, 3.0, 0.5))],
                         ids=lambda s: f"{s.mode}-tau{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_op_and_reference_realise_every_enumerated_path_with_mixed_lengths(device, setting):
    rounded = Setting(setting.temperature, setting.top_k, setting.top_p, setting.shift, setting.mode, setting.with_ref, setting.scales)
    rounded.logits = lambda c: tuple(None if t is None else t.to(torch.float32).to(torch.float64) for t in setting.logits(c))
    kwargs = dict(temperature=setting.temperature, top_k=setting.top_k, top_p=setting.top_p, shift=setting.shift, mode=setting.mode)
    for context in [(), (1,), (2, 0)]:
        batches = [probe_rows(rounded, context, n) for n in range(NUM_DRAFT_TOKENS + 1)]
        counts = torch.cat([torch.full((len(e),), n) for n, (_, e) in enumerate(batches)])
        inputs = {k: None if batches[0][0][k] is None else torch.cat([b[0][k] for b in batches]) for k in batches[0][0]}
        expected = torch.cat([e for _, e in batches])
        assert torch.equal(sss_ext.reference.verify(**inputs, num_draft_tokens=counts, **kwargs).tokens, expected)
        got = sss_ext.verify(**on(device, inputs), num_draft_tokens=counts.to(device), **kwargs)
        assert torch.equal(got.tokens.cpu(), expected)


@pytest.mark.parametrize("implementation", (sss_ext.verify, sss_ext.reference.verify), ids=("op", "reference"))
@pytest.mark.parametrize("bad", (-1, 4, 2**40), ids=str)
def test_out_of_range_counts_are_named(device, implementation, bad):
    kwargs = on(device, make_ragged_verify_inputs(3, 3, 11, torch.float32, True, 1.0, seed=1))
    kwargs["num_draft_tokens"][1] = bad
    with pytest.raises(ValueError, match=r"num_draft_tokens must hold values in \[0, K\] = \[0, 3\], found .* at row 1"):
        implementation(**kwargs)


@pytest.mark.parametrize("implementation", (sss_ext.verify, sss_ext.reference.verify), ids=("op", "reference"))
@pytest.mark.parametrize(
    "counts,message",
    [(torch.zeros(3, dtype=torch.int32), "dtype int64"), (torch.zeros(4, dtype=torch.int64), r"shape \(B,\)"),
     (torch.zeros(3, 1, dtype=torch.int64), "1-D"), ([0, 1, 2], "torch.Tensor")],
    ids=("int32", "length", "2-D", "list"),
)
def test_malformed_counts_are_named(implementation, counts, message):
    kwargs = make_ragged_verify_inputs(3, 3, 11, torch.float32, True, 1.0, seed=1)
    kwargs["num_draft_tokens"] = counts
    with pytest.raises(ValueError, match=f"num_draft_tokens.*{message}"):
        implementation(**kwargs)


def test_raw_op_checks_counts():
    kwargs = make_ragged_verify_inputs(3, 3, 11, torch.float32, True, 1.0, seed=1)
    args = (kwargs["target_logits"], kwargs["draft_logits"], kwargs["draft_tokens"], kwargs["ref_logits"], kwargs["uniforms"],
            1.0, 0, 1.0, 1.0, "exact")
    with pytest.raises(ValueError, match=r"num_draft_tokens must be an int64 tensor of shape \(B,\)"):
        torch.ops.sss_ext.verify.default(*args, kwargs["num_draft_tokens"][:2])
    with pytest.raises(ValueError, match="num_draft_tokens must hold values"):
        torch.ops.sss_ext.verify.default(*args, torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("options", [dict(with_ref=True, temperature=0.8), dict(with_ref=False, temperature=1.0, top_k=5),
                                     dict(with_ref=True, temperature=0.0)], ids=("sss", "sd-topk", "greedy"))
def test_opcheck_ragged(device, options):
    kwargs = on(device, make_ragged_verify_inputs(5, 4, 33, torch.float32, **options, seed=2))
    args = (kwargs["target_logits"], kwargs["draft_logits"], kwargs["draft_tokens"], kwargs["ref_logits"], kwargs["uniforms"],
            kwargs["temperature"], kwargs["top_k"], kwargs["top_p"], 1.0, "exact", kwargs["num_draft_tokens"])
    torch.library.opcheck(torch.ops.sss_ext.verify.default, args)


def test_compiled_ragged_verify_matches_eager():
    kwargs = make_ragged_verify_inputs(4, 3, 20, torch.float32, True, 1.0, seed=4, poison=False)

    def run(target, draft, tokens, ref, uniforms, counts):
        return sss_ext.verify(target, draft, tokens, ref, uniforms=uniforms, num_draft_tokens=counts)

    args = (kwargs["target_logits"], kwargs["draft_logits"], kwargs["draft_tokens"], kwargs["ref_logits"], kwargs["uniforms"],
            kwargs["num_draft_tokens"])
    compiled = torch.compile(run, fullgraph=True, backend="eager")(*args)
    for a, b in zip(compiled, run(*args)):
        assert torch.equal(a, b)


def test_flattened_engine_layout_maps_onto_the_padded_call():
    """The README's mapping from packed (total_draft_tokens,) drafts and (total + B, V) target rows."""
    generator = torch.Generator().manual_seed(6)
    n = torch.tensor([2, 0, 3, 1])
    B, V, total = n.numel(), 17, int(n.sum())
    flat_draft_tokens = torch.randint(0, V, (total,), generator=generator)
    flat_draft_logits = torch.randn(total, V, generator=generator)
    flat_target_logits = torch.randn(total + B, V, generator=generator)
    u = torch.rand(B, int(n.max()) + 1, generator=generator, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)

    K = int(n.max())
    offsets = torch.cumsum(n, 0) - n
    position = torch.arange(K)
    valid = position[None, :] < n[:, None]
    draft_tokens = flat_draft_tokens.new_zeros(B, K)
    draft_tokens[valid] = flat_draft_tokens
    draft_logits = flat_draft_logits.new_zeros(B, K, V)
    draft_logits[valid] = flat_draft_logits
    target_index = offsets[:, None] + torch.arange(B)[:, None] + torch.arange(K + 1)
    target_logits = flat_target_logits[target_index.clamp(max=flat_target_logits.shape[0] - 1)]
    out = sss_ext.verify(target_logits, draft_logits, draft_tokens, num_draft_tokens=n, uniforms=u)
    flat_output = out.tokens[out.tokens >= 0]

    expected = []
    for b in range(B):
        start, count = int(offsets[b]), int(n[b])
        row = sss_ext.verify(flat_target_logits[start + b : start + b + count + 1][None], flat_draft_logits[start : start + count][None],
                             flat_draft_tokens[start : start + count][None], uniforms=u[b : b + 1, : count + 1])
        expected.append(row.tokens[0, : int(row.num_accepted[0]) + 1])
    assert torch.equal(flat_output, torch.cat(expected))
