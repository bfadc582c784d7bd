"""sss_ext.compat.flashinfer.chain_speculative_sampling: the counters on cases whose answer is
known exactly, the seed/offset mapping, the tilt keywords, and a named ValueError for each bad
argument."""

import math

import pytest
import torch

import sss_ext
from sss_ext.compat.flashinfer import chain_speculative_sampling, seeded_uniforms
from probability_helpers import draw_from, probability_verify, random_probs

V = 4


def one_row(draft_rows, target_rows, ids, device="cpu"):
    """(1, K, V) draft, (1, K+1, V) target and (1, K) int32 ids from nested lists."""
    return (torch.tensor([draft_rows], device=device), torch.tensor([ids], dtype=torch.int32, device=device),
            torch.tensor([target_rows], device=device))


def test_target_equal_to_draft_accepts_everything(device):
    g = torch.Generator().manual_seed(0)
    batch, k = 50, 4
    draft = random_probs((batch, k, 16), g)
    bonus = random_probs((batch, 1, 16), g)
    ids = draw_from(draft, g).to(torch.int32)
    target = torch.cat([draft, bonus], dim=1)
    out, accepted, emitted = chain_speculative_sampling(draft.to(device), ids.to(device), target.to(device), seed=3, offset=0)
    assert torch.equal(out[:, :k].cpu(), ids)
    assert bool((out[:, k] >= 0).all())
    assert accepted.tolist() == [k] * batch and emitted.tolist() == [k] * batch


def test_a_certain_acceptance_after_the_first_rejection_counts_as_accepted_not_emitted(device):
    """Position 0: target 0 at the draft (certain rejection); position 1: target >= draft (its
    own coin certainly accepts); position 2: target 0 (certain rejection). emitted 0, accepted 1.
    Then a row accepted at 0, rejected at 1, accepted at 2: emitted 1, accepted 2."""
    uniform = [0.25] * V
    rejected_at_0 = one_row([uniform, uniform, uniform],
                            [[0.0, 1 / 3, 1 / 3, 1 / 3], [0.1, 0.7, 0.1, 0.1], [1 / 3, 0.0, 1 / 3, 1 / 3], uniform],
                            [0, 1, 1], device)
    out, accepted, emitted = chain_speculative_sampling(*rejected_at_0, seed=0, offset=0)
    assert out[0, 1:].tolist() == [-1, -1, -1] and out[0, 0] != 0
    assert accepted.tolist() == [1] and emitted.tolist() == [0]
    rejected_at_1 = one_row([uniform, uniform, uniform],
                            [[0.1, 0.7, 0.1, 0.1], [1 / 3, 1 / 3, 0.0, 1 / 3], [0.0, 0.0, 0.0, 1.0], uniform],
                            [1, 2, 3], device)
    out, accepted, emitted = chain_speculative_sampling(*rejected_at_1, seed=0, offset=0)
    assert out[0, 0] == 1 and out[0, 2:].tolist() == [-1, -1]
    assert accepted.tolist() == [2] and emitted.tolist() == [1]


def test_the_accepted_counter_uses_each_positions_own_uniform(device):
    """With seed and offset the uniforms are known (seeded_uniforms): after the first rejection
    each position counts iff u_i < target_i(x_i) / draft_i(x_i) with its own u_i."""
    g = torch.Generator().manual_seed(1)
    batch, k, vocab = 400, 5, 7
    draft = random_probs((batch, k, vocab), g)
    target = random_probs((batch, k + 1, vocab), g, zero_fraction=0.2)
    ids = draw_from(draft, g)
    out, accepted, emitted = chain_speculative_sampling(draft.to(device), ids.to(device), target.to(device), seed=77, offset=5)
    u = seeded_uniforms(77, 5, batch, k + 1, "cpu")
    tokens, num_accepted, margin = probability_verify(target, draft, ids, u)
    ratio = target[:, :k].double().gather(-1, ids[..., None]).squeeze(-1) / draft.double().gather(-1, ids[..., None]).squeeze(-1)
    coins = u[:, :k] < ratio
    expected_accepted = coins.sum(dim=1)
    clear = margin > 1e-5
    assert torch.equal(emitted.cpu().long()[clear], num_accepted[clear])
    assert torch.equal(out.cpu().long()[clear], tokens[clear])
    assert torch.equal(accepted.cpu().long()[clear], expected_accepted[clear])
    assert bool((accepted.cpu().long() > emitted.cpu().long()).any())  # some rows count acceptances after a rejection


def test_counters_are_added_to_in_place_and_returned(device):
    args = [t.to(device) for t in one_row([[0.25] * V] * 2, [[0.25] * V] * 3, [0, 3])]
    accepted = torch.full((1,), 5, dtype=torch.int32, device=device)
    emitted = torch.full((1,), 7, dtype=torch.int32, device=device)
    for call in range(1, 4):
        result = chain_speculative_sampling(*args, accepted, emitted, seed=call, offset=0)
        assert result[1] is accepted and result[2] is emitted
        assert accepted.tolist() == [5 + 2 * call] and emitted.tolist() == [7 + 2 * call]
        assert accepted.dtype == emitted.dtype == torch.int32
    fresh = chain_speculative_sampling(*args)
    assert fresh[1].tolist() == [2] and fresh[2].tolist() == [2] and fresh[1].dtype == torch.int32


def test_seed_and_offset_fix_the_draws(device):
    g = torch.Generator().manual_seed(2)
    batch, k, vocab = 64, 3, 9
    draft = random_probs((batch, k, vocab), g).to(device)
    target = random_probs((batch, k + 1, vocab), g).to(device)
    ids = draw_from(draft.cpu(), g).to(device)
    run = lambda **kw: chain_speculative_sampling(draft, ids, target, **kw)[0].cpu()  # noqa: E731
    first = run(seed=11, offset=0)
    assert torch.equal(first, run(seed=11, offset=0))
    assert torch.equal(first, run(seed=torch.tensor([11]), offset=torch.tensor(0)))
    assert not torch.equal(first, run(seed=11, offset=k + 1)) and not torch.equal(first, run(seed=12, offset=0))
    # The draws are verify's uniforms: the same tokens as verify with seeded_uniforms.
    u = seeded_uniforms(11, 0, batch, k + 1, device)
    direct = sss_ext.verify(sss_ext.logits_from_probs(target), sss_ext.logits_from_probs(draft), ids.long(), uniforms=u)
    assert torch.equal(first, direct.tokens.cpu().to(torch.int32))
    # A generator: reproducible from its seed, and verify's draws from it.
    from_generator = run(generator=torch.Generator(device).manual_seed(4))
    direct = sss_ext.verify(sss_ext.logits_from_probs(target), sss_ext.logits_from_probs(draft), ids.long(),
                            generator=torch.Generator(device).manual_seed(4))
    assert torch.equal(from_generator, direct.tokens.cpu().to(torch.int32))


def test_seeded_uniforms_are_per_row_counter_streams():
    u = seeded_uniforms(5, 100, 6, 8, "cpu")
    assert u.dtype == torch.float64 and u.shape == (6, 8) and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(seeded_uniforms(5, 100, 3, 8, "cpu"), u[:3])  # a row's draws ignore the batch size
    assert torch.equal(seeded_uniforms(5, 103, 6, 5, "cpu"), u[:, 3:])  # offset o + j is draw j of offset o
    assert torch.equal(seeded_uniforms(2**64 - 1, 0, 2, 2, "cpu"), seeded_uniforms(torch.tensor([-1]), 0, 2, 2, "cpu"))
    assert len(set(u.flatten().tolist())) == u.numel()
    many = seeded_uniforms(123, 0, 20000, 4, "cpu")
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float((many < 0.1).double().mean()) - 0.1) < 0.01


def test_tilt_keywords_match_verify_on_the_logarithms(device):
    """ref_probs and shift: the call is verify(log target, log draft, ids, log ref, shift=...)
    with the seeded uniforms; shift=0 is the untilted call."""
    g = torch.Generator().manual_seed(3)
    batch, k, vocab = 32, 3, 11
    draft = random_probs((batch, k + 1, vocab), g, zero_fraction=0.1).to(device)
    target = random_probs((batch, k + 1, vocab), g, zero_fraction=0.1).to(device)
    ref = random_probs((batch, k + 1, vocab), g, zero_fraction=0.1).to(device)
    ids = draw_from(draft[:, :k].cpu(), g).to(device)
    u = seeded_uniforms(9, 0, batch, k + 1, device)
    log = sss_ext.logits_from_probs
    for shift in (0.0, 1.0, 2.5):
        out, accepted, emitted = chain_speculative_sampling(draft, ids, target, seed=9, offset=0, ref_probs=ref, shift=shift)
        direct = sss_ext.verify(log(target), log(draft), ids, log(ref), shift=shift, uniforms=u)
        assert torch.equal(out.cpu(), direct.tokens.cpu().to(torch.int32))
        assert torch.equal(emitted.cpu(), direct.num_accepted.cpu().to(torch.int32))
        assert bool((accepted >= emitted).all())
    untilted = chain_speculative_sampling(draft[:, :k], ids, target, seed=9, offset=0)
    assert torch.equal(chain_speculative_sampling(draft, ids, target, seed=9, offset=0, ref_probs=ref, shift=0.0)[0], untilted[0])


def good(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return dict(draft_probs=random_probs((2, 3, 5), g).to(device), draft_token_ids=torch.randint(5, (2, 3), generator=g,
                dtype=torch.int32).to(device), target_probs=random_probs((2, 4, 5), g).to(device))


def replaced(**changes):
    def apply(kwargs):
        for name, value in changes.items():
            kwargs[name] = value(kwargs) if callable(value) else value
    return apply


BAD = [
    ("target K", replaced(target_probs=lambda a: a["target_probs"][:, :3]), r"target_probs must have shape \(B, K\+1, V\) = \(2, 4, 5\)"),
    ("target batch", replaced(target_probs=lambda a: a["target_probs"][:1]), r"target_probs must have shape \(B, K\+1, V\)"),
    ("draft K", replaced(draft_probs=lambda a: a["draft_probs"][:, :2]), r"draft_probs must have shape \(B, K, V\) = \(2, 3, 5\)"),
    ("draft vocab", replaced(draft_probs=lambda a: random_probs((2, 3, 6), torch.Generator())), r"draft_probs must have shape \(B, K, V\)"),
    ("draft 2-D", replaced(draft_probs=lambda a: a["draft_probs"][0]), r"draft_probs must be 3-D \(B, K, V\)"),
    ("draft None", replaced(draft_probs=None), "draft_probs must be a torch.Tensor of probabilities, got NoneType"),
    ("draft int", replaced(draft_probs=lambda a: torch.ones(2, 3, 5, dtype=torch.int64)), "draft_probs must have dtype float32"),
    ("ids float", replaced(draft_token_ids=lambda a: a["draft_token_ids"].float()), "draft_token_ids must have dtype int32 or int64"),
    ("ids 1-D", replaced(draft_token_ids=lambda a: a["draft_token_ids"][0]), r"draft_token_ids must be 2-D \(B, K\)"),
    ("ids list", replaced(draft_token_ids=[[0, 1, 2], [0, 1, 2]]), "draft_token_ids must be a torch.Tensor"),
    ("ids out of range", replaced(draft_token_ids=lambda a: torch.full((2, 3), 5, dtype=torch.int32)), r"draft_tokens must hold token ids in \[0, 5\)"),
    ("ref needs draft K+1", replaced(ref_probs=lambda a: a["target_probs"]),
     r"draft_probs must have shape \(B, K\+1, V\) when ref_probs is given .* = \(2, 4, 5\)"),
    ("ref shape", replaced(draft_probs=lambda a: a["target_probs"], ref_probs=lambda a: a["target_probs"][:, :3]),
     r"ref_probs must have shape \(B, K\+1, V\)"),
    ("negative shift", replaced(shift=-1.0), r"shift \(lambda\) must be a finite float >= 0"),
    ("counter int64", replaced(maybe_output_accepted_token_num=torch.zeros(2, dtype=torch.int64)),
     "maybe_output_accepted_token_num must have dtype int32"),
    ("counter shape", replaced(maybe_output_emitted_draft_token_num=torch.zeros(3, dtype=torch.int32)),
     r"maybe_output_emitted_draft_token_num must have shape \(B,\) = \(2,\)"),
    ("counter list", replaced(maybe_output_emitted_draft_token_num=[0, 0]), "maybe_output_emitted_draft_token_num must be None or an int32 tensor"),
    ("seed without offset", replaced(seed=1), "seed and offset must be given together .* offset is None"),
    ("offset without seed", replaced(offset=1), "seed and offset must be given together .* seed is None"),
    ("seed float", replaced(seed=1.0, offset=0), r"seed must be an int in \[0, 2\*\*64\) or a one-element int64 tensor, got float"),
    ("seed bool", replaced(seed=True, offset=0), "seed must be an int"),
    ("seed negative", replaced(seed=-1, offset=0), r"seed must be an int in \[0, 2\*\*64\) \(FlashInfer's uint64\), got -1"),
    ("offset too big", replaced(seed=0, offset=2**64), r"offset must be an int in \[0, 2\*\*64\)"),
    ("seed int32 tensor", replaced(seed=torch.tensor([1], dtype=torch.int32), offset=0), "seed must be an int or a one-element int64 tensor, got a tensor of dtype int32"),
    ("per-row seeds", replaced(seed=torch.tensor([1, 2]), offset=0), "per-row seeds are not supported"),
    ("per-row offsets", replaced(seed=0, offset=torch.zeros(2, dtype=torch.int64)), "per-row offsets are not supported"),
    ("deterministic string", replaced(deterministic="yes"), "deterministic must be a bool"),
    ("generator type", replaced(generator=5), "generator must be a torch.Generator"),
    ("tolerance", replaced(tolerance=-1.0), "tolerance must be None"),
    ("target not normalised", replaced(target_probs=lambda a: a["target_probs"] * 1.1), r"target_probs rows must sum to 1 within"),
    ("draft NaN", replaced(draft_probs=lambda a: a["draft_probs"].index_put((torch.tensor(1), torch.tensor(2), torch.tensor(0)), torch.tensor(math.nan))),
     r"draft_probs must hold finite probabilities; found NaN or inf at index \(1, 2, 0\)"),
    ("ref negative", replaced(draft_probs=lambda a: a["target_probs"], ref_probs=lambda a: a["target_probs"] * torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0])),
     "ref_probs must hold probabilities >= 0"),
    ("draft all zero", replaced(draft_probs=lambda a: a["draft_probs"].index_fill(1, torch.tensor([1]), 0.0)),
     r"draft_probs has a row with no positive probability \(all zeros\) at index \(0, 1\)"),
]


@pytest.mark.parametrize("mutate, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_arguments_are_refused_by_name(mutate, message):
    kwargs = good()
    mutate(kwargs)
    with pytest.raises(ValueError, match=message):
        chain_speculative_sampling(**kwargs)


def test_mixed_devices_and_dtypes():
    kwargs = good()
    kwargs["draft_token_ids"] = kwargs["draft_token_ids"].to("meta")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        chain_speculative_sampling(**kwargs)
    # Probabilities of different float dtypes and int64 ids are taken (each becomes float32 logits).
    kwargs = good()
    draft64 = kwargs["draft_probs"].double()
    with pytest.raises(ValueError, match="draft_probs rows must sum to 1 within 8.17e-15 .*float64"):
        chain_speculative_sampling(draft64, kwargs["draft_token_ids"], kwargs["target_probs"])  # float32 sums, float64 claim
    draft64 /= draft64.sum(dim=-1, keepdim=True)
    out = chain_speculative_sampling(draft64, kwargs["draft_token_ids"].long(), kwargs["target_probs"].to(torch.bfloat16), seed=0, offset=0)
    assert out[0].dtype == torch.int32 and out[0].shape == (2, 4)


def test_tolerance_and_validate_false_renormalise_rows():
    """Rows off 1 are refused by default, taken with tolerance= or validate=False, and then
    sampled as the renormalised rows: the same tokens as the normalised input."""
    kwargs = good()
    scaled = dict(kwargs, target_probs=kwargs["target_probs"] * 1.05, draft_probs=kwargs["draft_probs"] * 0.97)
    with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
        chain_speculative_sampling(**scaled, seed=1, offset=0)
    expected = chain_speculative_sampling(**kwargs, seed=1, offset=0)
    for extra in (dict(tolerance=0.1), dict(validate=False)):
        result = chain_speculative_sampling(**scaled, seed=1, offset=0, **extra)
        assert all(torch.equal(a, b) for a, b in zip(result, expected))
    # validate=False reads no value; on the CPU the op still refuses the NaN logit of a negative entry.
    negative = dict(kwargs, target_probs=kwargs["target_probs"] * torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="target_logits must be finite or -inf"):
        chain_speculative_sampling(**negative, validate=False)


def test_no_draft_tokens_draws_the_bonus_from_the_target(device):
    """K = 0: one token per row from target_probs[:, 0], both counters 0; with ref_probs, from p*."""
    target = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]] * 3, device=device)
    ids = torch.zeros(3, 0, dtype=torch.int32, device=device)
    out, accepted, emitted = chain_speculative_sampling(torch.zeros(3, 0, 4, device=device), ids, target, seed=1, offset=0)
    assert out.tolist() == [[2]] * 3 and accepted.tolist() == [0] * 3 and emitted.tolist() == [0] * 3
    flat = torch.full((3, 1, 4), 0.25, device=device)
    out, _, _ = chain_speculative_sampling(flat, ids, flat, seed=1, offset=0, ref_probs=target, shift=1.0)
    assert out.tolist() == [[2]] * 3  # p* ∝ target (draft/ref): ref_probs is 0 except at token 2
