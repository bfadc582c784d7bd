"""CUDA kernels of sss_ext (issue 3), GPU only: token equality with the float64 reference
over the parametrised sweep, exactness by chi-square (with a negative control that must
fail), opcheck, CUDA-graph capture and replay, the invalid-row contract of validate=False,
128-bit loads on misaligned rows, and no host sync."""

from __future__ import annotations

import itertools

import pytest
import torch

import sss_ext

if not (sss_ext.BUILD_INFO["cuda"] and torch.cuda.is_available()):
    pytest.skip(
        f"CUDA tests need an sss_ext build with CUDA kernels (BUILD_INFO['cuda']={sss_ext.BUILD_INFO['cuda']}) "
        f"and a visible GPU (torch.cuda.is_available()={torch.cuda.is_available()})",
        allow_module_level=True,
    )

from stats_helpers import chi_square_pvalue  # noqa: E402

DEVICE = torch.device("cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = (("exact", False), ("exact", True), ("paper", True))  # (mode, with_ref)
TEMPERATURES = (0.0, 0.7, 1.0)
TRUNCATIONS = ((0, 1.0), (5, 1.0), (0, 0.8), (20, 0.9))  # (top_k, top_p)
SHAPES = list(itertools.product((1, 3, 99), (1, 4, 8), (2, 7, 111, 50272)))  # (B, K, V)
LAYOUTS = ("contiguous", "sliced", "permuted", "strided")
MIN_EQUAL_FRACTION = 0.9999


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, other strides. sliced: rows start at odd offsets inside a padded buffer;
    permuted: vocabulary not innermost (the adapter copies). Shape: (B, P, V) -> (B, P, V)."""
    if layout in ("contiguous", "strided"):
        return x.contiguous()
    batch, positions, vocab = x.shape
    if layout == "sliced":
        big = torch.zeros(batch, positions + 2, vocab + 5, dtype=x.dtype, device=x.device)
        big[:, 1 : positions + 1, 3 : vocab + 3] = x
        return big[:, 1 : positions + 1, 3 : vocab + 3]
    return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values with non-unit strides in every dimension. Shape: (B, N) -> (B, N)."""
    return torch.stack([t, t], dim=-1)[..., 1]


def make_inputs(batch, num_draft, vocab, dtype, with_ref, temperature, top_k=0, top_p=1.0, layout="contiguous", seed=0):
    """Keyword arguments of sss_ext.verify / sss_ext.reference.verify on the GPU: correlated
    target/draft/reference logits, drafts drawn from the warped proposal (10% arbitrary ids),
    uniforms on the open grid."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    K = num_draft
    shape = (batch, K + 1, vocab)
    target = 2.0 * torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float64)
    draft = target + 0.7 * torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float64)
    ref = draft + 0.7 * torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float64)
    target, draft, ref = (t.to(dtype) for t in (target, draft, ref))
    if K == 0:
        draft_tokens = torch.zeros(batch, 0, dtype=torch.int64, device=DEVICE)
    elif temperature > 0:
        probs = sss_ext.warp_probs(draft[:, :K].reshape(-1, vocab), temperature, top_k, top_p)
        draft_tokens = torch.multinomial(probs, 1, generator=g).reshape(batch, K)
    else:
        draft_tokens = draft[:, :K].to(torch.float64).argmax(-1)
    arbitrary = torch.rand(batch, K, generator=g, device=DEVICE) < 0.1
    draft_tokens = torch.where(arbitrary, torch.randint(0, vocab, (batch, K), generator=g, device=DEVICE), draft_tokens)
    uniforms = sss_ext.checks.draw_uniforms((batch, K + 1), DEVICE, g)
    if layout == "strided":
        draft_tokens, uniforms = strided(draft_tokens), strided(uniforms)
    return dict(
        target_logits=relayout(target, layout),
        draft_logits=relayout(draft if with_ref or seed % 2 else draft[:, :K], layout),
        draft_tokens=draft_tokens,
        ref_logits=relayout(ref, layout) if with_ref else None,
        uniforms=uniforms,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )


def equal_rows(got, expected) -> torch.Tensor:
    """Rows whose tokens and num_accepted agree. Shape: -> (B,) bool."""
    return (got.tokens == expected.tokens).all(dim=1) & (got.num_accepted == expected.num_accepted)


# ---------------------------------------------------------------------------------------
# Reference equality


def test_sweep_matches_reference():
    """Every (shape, dtype, mode, ref, temperature, truncation); layouts rotate. Rows may differ
    only where float32-vs-float64 rounding moves a decision: >= 99.99% of rows equal."""
    rows = equal = 0
    worst_log_z = 0.0
    report = []
    for (dtype, (mode, with_ref), temperature, (top_k, top_p)) in itertools.product(DTYPES, MODES, TEMPERATURES, TRUNCATIONS):
        for n, (batch, K, vocab) in enumerate(SHAPES):
            layout = LAYOUTS[n % len(LAYOUTS)]
            kwargs = make_inputs(batch, K, vocab, dtype, with_ref, temperature, top_k, top_p, layout, seed=n)
            expected = sss_ext.reference.verify(**kwargs, mode=mode)
            got = sss_ext.verify(**kwargs, mode=mode)
            same = equal_rows(got, expected)
            rows += same.numel()
            equal += int(same.sum())
            worst_log_z = max(worst_log_z, float((got.log_z - expected.log_z).abs().max()))
            if not bool(same.all()):
                report.append(f"  {int((~same).sum())}/{same.numel()} rows: B={batch} K={K} V={vocab} {dtype} {mode} ref={with_ref} "
                              f"tau={temperature} top_k={top_k} top_p={top_p} {layout}")
    summary = f"CUDA vs reference: {rows - equal} of {rows} rows differ ({equal / rows:.6%} equal); worst |log_z error| {worst_log_z:.2e}"
    print("\n" + summary + ("\n" + "\n".join(report) if report else ""))
    assert equal / rows >= MIN_EQUAL_FRACTION, summary + "\n" + "\n".join(report)
    assert worst_log_z < 1e-4, summary


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (0.0, 0, 1.0), (1.0, 50, 1.0)])
def test_large_vocabulary_matches_reference(dtype, temperature, top_k, top_p):
    """V = 128256 splits the vocabulary across many blocks and draw chunks."""
    kwargs = make_inputs(4, 4, 128256, dtype, True, temperature, top_k, top_p, "sliced", seed=3)
    expected = sss_ext.reference.verify(**kwargs)
    got = sss_ext.verify(**kwargs)
    assert bool(equal_rows(got, expected).all())
    torch.testing.assert_close(got.log_z, expected.log_z, rtol=1e-4, atol=1e-4)


def test_sample_matches_reference():
    g = torch.Generator(device=DEVICE).manual_seed(3)
    mismatches = total = 0
    for (batch, vocab), dtype, temperature, (top_k, top_p) in itertools.product(
        ((1, 2), (99, 111), (3, 50272), (989, 7), (8, 128256)), DTYPES, TEMPERATURES, TRUNCATIONS
    ):
        logits = (3 * torch.randn(batch, vocab, generator=g, device=DEVICE)).to(dtype)
        uniforms = sss_ext.checks.draw_uniforms((batch,), DEVICE, g)
        expected = sss_ext.reference.sample(logits, temperature, top_k, top_p, uniforms=uniforms)
        got = sss_ext.sample(logits, temperature, top_k, top_p, uniforms=uniforms)
        mismatches += int((got != expected).sum())
        total += batch
    assert mismatches <= (1 - MIN_EQUAL_FRACTION) * total, f"{mismatches} of {total} sampled tokens differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", (99, 989))
def test_misaligned_rows_match_reference(dtype, vocab):
    """Odd V and rows at every offset: vector loads need a scalar head/tail (same offset in all
    three tensors) or fall back to scalar loads (different offsets)."""
    g = torch.Generator(device=DEVICE).manual_seed(vocab)
    batch, K = 5, 3
    base = torch.randn(batch, K + 1, vocab + 16, generator=g, device=DEVICE).to(dtype)
    draft_tokens = torch.randint(0, vocab, (batch, K), generator=g, device=DEVICE)
    for offsets in [(o, o, o) for o in range(8)] + [(1, 2, 3), (0, 4, 7), (5, 0, 0)]:
        target, draft, ref = (
            (base + 0.3 * n)[..., o : o + vocab] for n, o in enumerate(offsets)
        )  # (B, K+1, V) each, unit vocab stride, row starts misaligned
        for temperature, top_p in ((1.0, 1.0), (0.7, 0.8)):
            uniforms = sss_ext.checks.draw_uniforms((batch, K + 1), DEVICE, g)
            kwargs = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, ref_logits=ref, uniforms=uniforms,
                          temperature=temperature, top_p=top_p)
            expected = sss_ext.reference.verify(**kwargs)
            got = sss_ext.verify(**kwargs)
            assert bool(equal_rows(got, expected).all()), (offsets, temperature, top_p)
            torch.testing.assert_close(got.log_z, expected.log_z, rtol=1e-4, atol=1e-4)
        logits = base[:, 0, offsets[1] : offsets[1] + vocab]
        uniforms = sss_ext.checks.draw_uniforms((batch,), DEVICE, g)
        assert torch.equal(sss_ext.sample(logits, 0.8, uniforms=uniforms), sss_ext.reference.sample(logits, 0.8, uniforms=uniforms))


def test_deterministic():
    kwargs = make_inputs(7, 4, 50272, torch.bfloat16, True, 0.8, 0, 0.9, "contiguous", seed=5)
    first, second = sss_ext.verify(**kwargs), sss_ext.verify(**kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Exactness: the emitted token at a position follows p* there


def tilted_target(target, draft, ref, temperature, shift, top_k, top_p):
    """p* at every position, float64. Shape: (P, V) -> (P, V)."""
    scores = target.double() / temperature
    if ref is not None and shift != 0:
        scores = scores + shift * (draft.double() / temperature - ref.double() / temperature)
    return sss_ext.warp_probs(scores, 1.0, top_k, top_p)


def one_context(vocab, num_draft, seed, ref_gap=0.7):
    """Fixed logits of one context. Shape: -> 3 x (K+1, V) float32."""
    g = torch.Generator().manual_seed(seed)
    target = 1.5 * torch.randn(num_draft + 1, vocab, generator=g)
    draft = target + 0.8 * torch.randn(num_draft + 1, vocab, generator=g)
    ref = draft + ref_gap * torch.randn(num_draft + 1, vocab, generator=g)
    return target.to(DEVICE), draft.to(DEVICE), ref.to(DEVICE)


def emit_many(target, draft, ref, rows, temperature, top_k, top_p, mode, seed):
    """`rows` independent verification rounds of one context; drafts from the warped proposal."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    K, vocab = draft.shape[0] - 1, draft.shape[1]
    proposal = sss_ext.warp_probs(draft[:K], temperature, top_k, top_p)  # (K, V)
    draft_tokens = torch.stack([torch.multinomial(proposal[i], rows, replacement=True, generator=g) for i in range(K)], dim=1)
    expand = lambda t: None if t is None else t.unsqueeze(0).expand(rows, -1, -1)  # noqa: E731  batch stride 0
    return sss_ext.verify(expand(target), expand(draft), draft_tokens, expand(ref), temperature=temperature, top_k=top_k,
                          top_p=top_p, mode=mode, generator=g)


@pytest.mark.parametrize(
    "with_ref,temperature,top_k,top_p",
    [(True, 0.8, 0, 1.0), (True, 1.0, 4, 1.0), (True, 0.9, 0, 0.8), (False, 1.0, 0, 1.0)],
)
def test_chi_square_against_p_star(with_ref, temperature, top_k, top_p):
    """200k rounds: the token emitted at position 0 (and at 1 given one acceptance) follows p*
    (alpha = 0.01); enough draws to detect a total-variation gap of 0.02."""
    target, draft, ref = one_context(vocab=12, num_draft=2, seed=1)
    ref = ref if with_ref else None
    out = emit_many(target, draft, ref, 200_000, temperature, top_k, top_p, "exact", seed=2)
    p_star = tilted_target(target, draft, ref, temperature, 1.0, top_k, top_p)
    assert chi_square_pvalue(out.tokens[:, 0], p_star[0]) > 0.01
    reached = out.num_accepted >= 1
    assert int(reached.sum()) > 20_000
    assert chi_square_pvalue(out.tokens[reached, 1], p_star[1]) > 0.01


def test_chi_square_paper_mode_negative_control():
    """Paper mode drops Z: with |Z - 1| >= 0.1 its output must fail the same fit (a test that
    cannot fail is not a test), while exact mode on the same context passes."""
    target, draft, ref = one_context(vocab=12, num_draft=2, seed=4, ref_gap=1.2)
    log_z = sss_ext.reference.verify(target[None], draft[None], torch.zeros(1, 2, dtype=torch.int64, device=DEVICE), ref[None],
                                     temperature=1.0, uniforms=torch.full((1, 3), 0.5, dtype=torch.float64, device=DEVICE)).log_z
    assert abs(float(log_z[0, 0].exp()) - 1) >= 0.1, "the control needs a context with |Z - 1| >= 0.1"
    p_star = tilted_target(target, draft, ref, 1.0, 1.0, 0, 1.0)
    paper = emit_many(target, draft, ref, 200_000, 1.0, 0, 1.0, "paper", seed=5)
    assert chi_square_pvalue(paper.tokens[:, 0], p_star[0]) < 0.01
    exact = emit_many(target, draft, ref, 200_000, 1.0, 0, 1.0, "exact", seed=5)
    assert chi_square_pvalue(exact.tokens[:, 0], p_star[0]) > 0.01


def test_chi_square_sample():
    g = torch.Generator(device=DEVICE).manual_seed(6)
    logits = 2 * torch.randn(1, 20, generator=g, device=DEVICE)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 0.9)):
        tokens = sss_ext.sample(logits.expand(200_000, -1), temperature, top_k, top_p, generator=g)
        assert chi_square_pvalue(tokens, sss_ext.warp_probs(logits[0], temperature, top_k, top_p)) > 0.01


# ---------------------------------------------------------------------------------------
# Registration, graphs, syncs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature,top_p", [(0.8, 1.0), (0.0, 1.0), (1.0, 0.9)])
def test_opcheck(dtype, temperature, top_p):
    kwargs = make_inputs(3, 4, 111, dtype, True, temperature, 0, top_p, "contiguous", seed=1)
    args = (kwargs["target_logits"], kwargs["draft_logits"], kwargs["draft_tokens"], kwargs["ref_logits"], kwargs["uniforms"],
            temperature, 0, top_p, 1.0, "exact")
    torch.library.opcheck(torch.ops.sss_ext.verify.default, args)
    logits = kwargs["target_logits"][:, 0]
    torch.library.opcheck(torch.ops.sss_ext.sample.default, (logits, kwargs["uniforms"][:, 0].contiguous(), temperature, 0, top_p))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.9, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)])
def test_cuda_graph_replay_matches_eager(temperature, top_k, top_p):
    """verify + sample captured with their uniforms drawn inside the graph (default CUDA
    generator); each replay equals eager calls on the same uniforms."""
    batch, K, vocab = 8, 4, 5000
    kwargs = make_inputs(batch, K, vocab, torch.bfloat16, True, temperature, top_k, top_p, "contiguous", seed=9)
    inputs = {k: kwargs[k] for k in ("target_logits", "draft_logits", "draft_tokens", "ref_logits")}
    logits = kwargs["target_logits"][:, 0]

    def step():
        uniforms = sss_ext.checks.draw_uniforms((batch, K + 1), DEVICE, None)
        sample_uniforms = sss_ext.checks.draw_uniforms((batch,), DEVICE, None)
        out = sss_ext.verify(**inputs, temperature=temperature, top_k=top_k, top_p=top_p, uniforms=uniforms, validate=False)
        sampled = sss_ext.sample(logits, temperature, top_k, top_p, uniforms=sample_uniforms, validate=False)
        return uniforms, sample_uniforms, out, sampled

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        uniforms, sample_uniforms, out, sampled = step()
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append(uniforms.clone())
        eager = sss_ext.verify(**inputs, temperature=temperature, top_k=top_k, top_p=top_p, uniforms=uniforms.clone())
        for a, b in zip(out, eager):
            assert torch.equal(a, b)
        assert torch.equal(sampled, sss_ext.sample(logits, temperature, top_k, top_p, uniforms=sample_uniforms.clone()))
    assert not torch.equal(seen[0], seen[1]), "replays should draw fresh uniforms"


@pytest.mark.parametrize("temperature,top_p", [(0.8, 1.0), (1.0, 0.9), (0.0, 1.0)])
def test_validate_false_does_not_sync(temperature, top_p):
    kwargs = make_inputs(4, 3, 3000, torch.bfloat16, True, temperature, 0, top_p, "sliced", seed=2)
    kwargs.pop("uniforms")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sss_ext.verify(**kwargs, validate=False)
        sampled = sss_ext.sample(kwargs["target_logits"][:, 0], temperature, 0, top_p, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.tokens.shape == (4, 4) and sampled.shape == (4,)


# ---------------------------------------------------------------------------------------
# Invalid inputs with validate=False


@pytest.mark.parametrize("temperature,top_p", [(0.8, 1.0), (0.0, 1.0), (1.0, 0.9)])
def test_invalid_rows_are_minus_one(temperature, top_p):
    """Each row but the first has one defect: it gets num_accepted = -1, tokens all -1 and
    log_z NaN; the valid row is unaffected; nothing reads out of bounds (run under
    compute-sanitizer by benchmarks/gpu_check.sh)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    batch, K, vocab = 11, 2, 50
    target, draft, ref = (torch.randn(batch, K + 1, vocab, generator=g, device=DEVICE) for _ in range(3))
    draft_tokens = torch.randint(0, vocab, (batch, K), generator=g, device=DEVICE)
    uniforms = sss_ext.checks.draw_uniforms((batch, K + 1), DEVICE, g)
    draft_tokens[1, 0] = vocab
    draft_tokens[2, 1] = -1
    draft_tokens[3, 0] = 2**40
    uniforms[4, 2] = 0.0
    uniforms[5, 0] = float("nan")
    uniforms[6, 1] = 1.0
    target[7, 1, 7] = float("nan")
    draft[8, 2, 0] = float("inf")
    ref[9, 0, :] = float("-inf")
    target[10, 2, : vocab // 2] = float("-inf")  # disjoint masks: no tilted support
    draft[10, 2, vocab // 2 :] = float("-inf")
    kwargs = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, ref_logits=ref, temperature=temperature,
                  top_p=top_p, uniforms=uniforms)
    got = sss_ext.verify(**kwargs, validate=False)
    bad = torch.arange(1, batch, device=DEVICE)
    assert bool((got.num_accepted[bad] == -1).all()), got.num_accepted
    assert bool((got.tokens[bad] == -1).all())
    assert bool(torch.isnan(got.log_z[bad]).all())
    expected = sss_ext.reference.verify(**{k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
    assert torch.equal(got.tokens[:1], expected.tokens) and torch.equal(got.num_accepted[:1], expected.num_accepted)
    with pytest.raises(ValueError):
        sss_ext.verify(**kwargs, validate=True)


def test_invalid_sample_rows_are_minus_one():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(5, 30, generator=g, device=DEVICE)
    uniforms = sss_ext.checks.draw_uniforms((5,), DEVICE, g)
    logits[1, 3] = float("nan")
    logits[2, :] = float("-inf")
    logits[3, 0] = float("inf")
    uniforms[4] = 1.0
    got = sss_ext.sample(logits, 1.0, uniforms=uniforms, validate=False)
    assert got[1:].tolist() == [-1, -1, -1, -1]
    assert int(got[0]) == int(sss_ext.reference.sample(logits[:1], 1.0, uniforms=uniforms[:1]))
    greedy = sss_ext.sample(logits, 0.0, uniforms=uniforms, validate=False)  # greedy ignores the uniforms
    assert greedy[1:4].tolist() == [-1, -1, -1] and int(greedy[4]) == int(logits[4].argmax())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    device = torch.device("cuda", 1)
    kwargs = make_inputs(3, 2, 1000, torch.float32, True, 0.9, seed=4)
    expected = sss_ext.reference.verify(**kwargs)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = sss_ext.verify(**moved)
    assert got.tokens.device == device
    assert torch.equal(got.tokens.cpu(), expected.tokens.cpu())
