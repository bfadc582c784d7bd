"""The top-k tie rule ``top_k_ties`` (docs/algorithm.md §2): "keep" keeps every token whose
scaled score equals the k-th largest (transformers' TopKLogitsWarper, vLLM), "exact-k" keeps
exactly k, lower index first. Kernels against the reference on tie-heavy rows, the rule
against transformers, and the argument through the decoding loop, CLI and HF hook."""

import itertools

import pytest
import torch

import sss_ext
from decoding_helpers import one_thread, trio  # noqa: F401  (one_thread: autouse fixture)
from sss_ext.warp import kept_mask

RULES = ("keep", "exact-k")


def coarse_logits(shape, generator, scale=3.0, grid=1.0) -> torch.Tensor:
    """bfloat16 logits on a coarse grid: many equal values per row. Shape: shape."""
    return (torch.round(scale * torch.randn(shape, generator=generator) / grid) * grid).to(torch.bfloat16)


def tie_boundary_k(row: torch.Tensor) -> int:
    """Smallest k in [1, V) whose k-th and (k+1)-th largest values are equal (0: none). Shape: (V,)."""
    ranked = torch.sort(row.double(), descending=True).values
    tied = (ranked[:-1] == ranked[1:]).nonzero().flatten()
    return int(tied[0]) + 1 if tied.numel() else 0


def top_k_values(vocab_size: int, row: torch.Tensor) -> list[int]:
    """k = 1, k at a tie boundary, k = V and k > V (k = 0 is untruncated)."""
    return sorted({1, tie_boundary_k(row) or 1, vocab_size, vocab_size + 3})


@pytest.mark.parametrize("vocab_size", [1, 5, 99, 32000])
def test_kept_sets_follow_the_rule(vocab_size):
    """"keep": exactly the scores >= the k-th largest (torch.topk's value, HF's formula), more than
    k on ties; "exact-k": exactly min(k, V) tokens, a prefix of the index-stable ranking."""
    generator = torch.Generator().manual_seed(vocab_size)
    scores = coarse_logits((16, vocab_size), generator).double()
    scores[1, : vocab_size // 2] = float("-inf")  # a -inf boundary: kept with probability 0
    more_than_k = False
    for k in top_k_values(vocab_size, scores[0]):
        keep, exact = kept_mask(scores, k, 1.0, "keep"), kept_mask(scores, k, 1.0, "exact-k")
        kth = torch.topk(scores, min(k, vocab_size), dim=-1).values[:, -1:]
        assert torch.equal(keep, scores >= kth), k
        assert torch.equal(exact.sum(-1), torch.full((16,), min(k, vocab_size))), k
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        assert bool(exact.gather(-1, order)[:, : min(k, vocab_size)].all()), k
        assert bool((exact <= keep).all()), k
        more_than_k |= bool((keep.sum(-1) > exact.sum(-1)).any())
    assert more_than_k == (vocab_size > 1)


@pytest.mark.parametrize("top_k_ties", RULES)
def test_sample_matches_reference_on_ties(device, top_k_ties):
    """The fused sampler draws the reference's tokens on tie-heavy bfloat16 rows for k = 1, at
    a tie boundary, k = V, k > V, with and without top-p; the other rule changes some tokens."""
    generator = torch.Generator().manual_seed(1)
    other = RULES[1 - RULES.index(top_k_ties)]
    differs = 0
    for vocab_size, temperature, top_p in itertools.product((1, 5, 99, 32000), (0.7, 1.0), (1.0, 0.9)):
        batch = 4 if vocab_size == 32000 else 32
        logits = coarse_logits((batch, vocab_size), generator)
        for top_k in top_k_values(vocab_size, logits[0]):
            uniforms = sss_ext.draw_uniforms((batch,), "cpu", generator)
            expected = sss_ext.reference.sample(logits, temperature, top_k, top_p, uniforms=uniforms, top_k_ties=top_k_ties)
            got = sss_ext.sample(logits.to(device), temperature, top_k, top_p, uniforms=uniforms.to(device),
                                 top_k_ties=top_k_ties).cpu()
            assert torch.equal(got, expected), (vocab_size, temperature, top_p, top_k)
            control = sss_ext.sample(logits.to(device), temperature, top_k, top_p, uniforms=uniforms.to(device), top_k_ties=other)
            differs += int((control.cpu() != expected).sum())
    assert differs > 0


@pytest.mark.parametrize("with_ref", [True, False], ids=["sss", "sd"])
@pytest.mark.parametrize("top_k_ties", RULES)
def test_verify_matches_reference_on_ties(device, top_k_ties, with_ref):
    """Verification equals the reference (tokens, counts, log Z) on tie-heavy bfloat16 logits,
    drafts drawn from the proposal under the same rule, for every k of top_k_values."""
    generator = torch.Generator().manual_seed(2)
    accepted = 0
    for vocab_size, top_p in itertools.product((1, 5, 99, 32000), (1.0, 0.8)):
        batch, num_draft_tokens = (2, 2) if vocab_size == 32000 else (16, 3)
        shape = (batch, num_draft_tokens + 1, vocab_size)
        target, draft, ref = (coarse_logits(shape, generator) for _ in range(3))
        for top_k in top_k_values(vocab_size, target[0, 0]):
            probs = sss_ext.warp_probs(draft[:, :num_draft_tokens].reshape(-1, vocab_size), 1.0, top_k, top_p, top_k_ties=top_k_ties)
            draft_tokens = torch.multinomial(probs, 1, generator=generator).reshape(batch, num_draft_tokens)
            kwargs = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, ref_logits=ref if with_ref else None,
                          uniforms=sss_ext.draw_uniforms((batch, num_draft_tokens + 1), "cpu", generator), temperature=1.0,
                          top_k=top_k, top_p=top_p, top_k_ties=top_k_ties)
            expected = sss_ext.reference.verify(**kwargs)
            got = sss_ext.verify(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
            context = (vocab_size, top_p, top_k)
            assert torch.equal(got.num_accepted.cpu(), expected.num_accepted), context
            assert torch.equal(got.tokens.cpu(), expected.tokens), context
            torch.testing.assert_close(got.log_z.cpu(), expected.log_z, rtol=1e-5, atol=1e-5)
            accepted += int(expected.num_accepted.sum())
    assert accepted > 0


def hf_top_k_kept(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Tokens transformers' TopKLogitsWarper leaves finite. Shape: (B, V) -> (B, V) bool."""
    from transformers import TopKLogitsWarper

    return torch.isfinite(TopKLogitsWarper(top_k=top_k)(None, scores.float()))


def test_kept_sets_equal_transformers_top_k_warper():
    """Ported peer test: on 64 bfloat16 rows (V = 32000, k = 50) the kept sets of "keep" equal
    TopKLogitsWarper's on every row, in the reference warp and in the kernel's distribution;
    "exact-k" differs on many rows (every row with a tie across the 50th logit)."""
    generator = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(64, 32000, generator=generator)).to(torch.bfloat16)
    expected = hf_top_k_kept(logits, 50)
    assert torch.equal(kept_mask(logits.double(), 50, 1.0, "keep"), expected)
    assert torch.equal(sss_ext.warp_probs(logits, 1.0, 50) > 0, expected)
    exact = kept_mask(logits.double(), 50, 1.0, "exact-k")
    rows_differ = int((exact != expected).any(-1).sum())
    print(f"\nkept sets differing from TopKLogitsWarper under exact-k: {rows_differ} of 64 rows")
    assert rows_differ >= 16, rows_differ
    assert bool((expected.sum(-1) >= 50).all()) and int(expected.sum(-1).max()) > 50


@pytest.mark.parametrize("top_k_ties", RULES)
def test_drafts_from_transformers_sampler(device, top_k_ties):
    """Drafts proposed by transformers' top-k sampler, verified with target = draft (no ref):
    p* = r~ under "keep", so every draft is accepted; under "exact-k" the tied drafts outside
    its k tokens have r~ = 0 here and are rejected (the mismatch this rule removes)."""
    generator = torch.Generator().manual_seed(5)
    batch, vocab_size = 256, 32000
    logits = (3.0 * torch.randn(batch, 2, vocab_size, generator=generator)).to(torch.bfloat16)
    hf_logits = logits[:, 0].float().masked_fill(~hf_top_k_kept(logits[:, 0], 50), float("-inf"))
    draft_tokens = torch.multinomial(torch.softmax(hf_logits, -1), 1, generator=generator)  # (B, 1)
    out = sss_ext.verify(logits.to(device), logits.to(device), draft_tokens.to(device), temperature=1.0, top_k=50,
                         top_k_ties=top_k_ties, generator=torch.Generator(device=device).manual_seed(0))
    rejected = int((out.num_accepted == 0).sum())
    if top_k_ties == "keep":
        assert rejected == 0
    else:
        outside = ~kept_mask(logits[:, 0].double(), 50, 1.0, "exact-k").gather(-1, draft_tokens).squeeze(-1)
        assert rejected == int(outside.sum()) > 0


def test_config_cli_and_hf_pass_the_rule(monkeypatch):
    """SamplingConfig validates top_k_ties (default "keep"); the CLI flag sets it; the HF hook maps
    HF's top_k (which keeps ties) to "keep"; the loop hands it to every sample/verify call."""
    from sss_ext import cli, hf, ops

    assert sss_ext.SamplingConfig().top_k_ties == "keep"
    with pytest.raises(ValueError, match="top_k_ties must be one of"):
        sss_ext.SamplingConfig(top_k_ties="ties")
    args = cli.build_parser().parse_args(["generate", "--prompts", "p", "--out", "o", "--top-k-ties", "exact-k"])
    assert args.top_k_ties == "exact-k"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--prompts", "p", "--out", "o", "--top-k-ties", "all"])
    settings = hf._sampling_settings(type("GenerationConfig", (), dict(do_sample=True, temperature=0.9, top_k=50, top_p=1.0))())
    assert settings["top_k_ties"] == "keep"

    seen = []
    for name in ("sample", "verify"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name, **k: (seen.append((_n, k.get("top_k_ties"))), _f(*a, **k))[1])
    q, r, d = trio(12)
    sss_ext.generate(q, r, [[1, 2]], ref_model=d, method="sss", max_new_tokens=4, num_draft_tokens=2, top_k=3,
                     top_k_ties="exact-k", ignore_eos=True)
    assert {n for n, _ in seen} == {"sample", "verify"} and {t for _, t in seen} == {"exact-k"}
