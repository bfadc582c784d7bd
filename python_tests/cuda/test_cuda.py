"""CUDA kernels of sss_ext, GPU only: reference agreement over the parametrised sweep (the
exactness rule below), exactness by chi-square (with a negative control that must fail),
opcheck, CUDA-graph capture and replay, determinism, the invalid-row contract of
validate=False (each kind, the score range rule), misaligned rows and awkward sizes, and no
host sync."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sss_ext
import sss_ext.reference_tree
from sss_ext.testing import LAYOUTS, make_verify_inputs

EXACTNESS_RULE = "the CUDA exactness rule (docs/algorithm.md §8, CUDA kernels) does not hold"
MIN_EQUAL_FRACTION = 0.9999
MAX_MISMATCH_MARGIN = 1e-4  # relative decision margin below which float32 rounding may flip a decision

if not sss_ext.BUILD_INFO["cuda"]:
    pytest.skip("no CUDA kernels in this build (see python -m sss_ext.info)", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible (torch.cuda.is_available() is False)", allow_module_level=True)

pytestmark = pytest.mark.cuda

from stats_helpers import ALPHA, alpha_for, chi_square_pvalue  # noqa: E402

DEVICE = torch.device("cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = (("exact", False), ("exact", True), ("paper", True))  # (mode, with_ref)
TEMPERATURES = (0.0, 0.01, 0.1, 0.7, 1.0)
TRUNCATIONS = ((0, 1.0), (5, 1.0), (0, 0.8), (20, 0.9))  # (top_k, top_p)
SHAPES = list(itertools.product((1, 3, 99), (1, 4, 8), (2, 7, 111, 50272)))  # (B, K, V)
def make_inputs(batch, num_draft, vocab, dtype, with_ref, temperature, top_k=0, top_p=1.0, layout="contiguous", seed=0):
    """Keyword arguments of sss_ext.verify / sss_ext.reference.verify on the GPU (sss_ext.testing)."""
    return make_verify_inputs(batch, num_draft, vocab, dtype, with_ref, temperature, top_k, top_p, layout, seed, device=DEVICE)


def equal_rows(got, expected) -> torch.Tensor:
    """Rows whose tokens and num_accepted agree. Shape: -> (B,) bool."""
    return (got.tokens == expected.tokens).all(dim=1) & (got.num_accepted == expected.num_accepted)


def draw_margin(weights: torch.Tensor, u: float) -> float:
    """Smallest |running sum - u * total| / total of an inverse-CDF draw. Shape: (V,) float64."""
    cumulative = torch.cumsum(weights, dim=0)
    total = float(cumulative[-1])
    if not total > 0:
        return math.inf
    return float((cumulative - u * total).abs().min()) / total


def decision_margin(kwargs: dict, mode: str, row: int, num_accepted: tuple[int, ...]) -> float:
    """Smallest float64 margin of the decisions behind row `row`: the acceptance tests up to the
    later of the first rejections in `num_accepted` (|log u - (log p*(x) [+ log Z] - log r~(x))|
    relative to max(1, |log u|)), and the inverse-CDF draws at each first rejection; greedy: the
    gap between the two largest tilted scores at those positions relative to their size."""
    take = lambda t: None if t is None else t[row : row + 1]  # noqa: E731
    zq, zr, zd = (None if kwargs[k] is None else take(kwargs[k]).double()[0]
                  for k in ("target_logits", "draft_logits", "ref_logits"))  # (P, V) each
    x, u = take(kwargs["draft_tokens"])[0], take(kwargs["uniforms"])[0].double()
    tau, top_k, top_p = kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]
    K = x.shape[0]
    inv = 1.0 if tau == 0 else 1.0 / tau
    s = sss_ext.reference.tilted_scores(zq, None if zd is None else zr[: K + 1], zd, inv, 1.0)
    last = min(max(num_accepted), K)
    if tau == 0:
        margins = []
        for j in range(last + 1):
            top2 = torch.topk(s[j], min(2, s.shape[-1])).values
            margins.append(float((top2[0] - top2[-1]).abs() / top2[0].abs().clamp(min=1.0)) if len(top2) > 1 else math.inf)
        return min(margins)
    log_p = sss_ext.warp.warp_log_probs(s, top_k, top_p)
    log_r = sss_ext.warp.warp_log_probs(zr[:K] * inv, top_k, top_p)
    log_z = torch.zeros(K + 1, dtype=torch.float64, device=s.device)
    if zd is not None:
        log_z = sss_ext.reference.log_normaliser_z(s, zq * inv, zr[: K + 1] * inv, zd * inv, 1.0)
    margins = [math.inf]
    for i in range(min(last + 1, K)):
        ratio = log_p[i, x[i]] + (log_z[i] if mode == "paper" else 0.0) - log_r[i, x[i]]
        if torch.isfinite(ratio):
            log_u = torch.log(u[i])
            margins.append(float((log_u - ratio).abs() / log_u.abs().clamp(min=1.0)))
    for j in set(num_accepted):
        p_j = torch.exp(log_p[j])
        if j < K:
            r_j = torch.exp(log_r[j] - log_z[j]) if mode == "paper" else torch.exp(log_r[j])  # paper: (p* - r~ / Z)+
            residual = torch.clamp(p_j - r_j, min=0.0)
            margins.append(draw_margin(residual if float(residual.sum()) > 0 else p_j, float(u[K])))
        else:
            margins.append(draw_margin(p_j, float(u[K])))
    return min(margins)


def compare(got, expected, kwargs, mode, label, report, margins):
    """Counts of (rows, equal rows); every mismatching row's decision margin goes to `margins`."""
    same = equal_rows(got, expected)
    for row in (~same).nonzero().flatten().tolist():
        accepted = (int(got.num_accepted[row]), int(expected.num_accepted[row]))
        margin = decision_margin(kwargs, mode, row, accepted) if min(accepted) >= 0 else math.inf
        margins.append(margin)
        report.append(f"  row {row} (num_accepted cuda/ref {accepted}, margin {margin:.2e}): {label}")
    return same.numel(), int(same.sum())


def assert_exactness_rule(rows, equal, margins, report, what):
    summary = (f"{what}: {rows - equal} of {rows} rows differ ({equal / max(rows, 1):.6%} equal); "
               f"largest decision margin of a mismatch {max(margins, default=0.0):.2e}")
    print("\n" + summary + ("\n" + "\n".join(report) if report else ""))
    assert equal >= MIN_EQUAL_FRACTION * rows, EXACTNESS_RULE + "\n" + summary + "\n" + "\n".join(report)
    assert all(m < MAX_MISMATCH_MARGIN for m in margins), EXACTNESS_RULE + "\n" + summary + "\n" + "\n".join(report)


# ---------------------------------------------------------------------------------------
# Reference equality (EXACTNESS_RULE)


def test_sweep_matches_reference():
    """Every (shape, dtype, mode, ref, temperature, truncation); layouts rotate."""
    rows = equal = 0
    worst_log_z = 0.0
    report, margins = [], []
    for (dtype, (mode, with_ref), temperature, (top_k, top_p)) in itertools.product(DTYPES, MODES, TEMPERATURES, TRUNCATIONS):
        for n, (batch, K, vocab) in enumerate(SHAPES):
            layout = LAYOUTS[n % len(LAYOUTS)]
            kwargs = make_inputs(batch, K, vocab, dtype, with_ref, temperature, top_k, top_p, layout, seed=n)
            expected = sss_ext.reference.verify(**kwargs, mode=mode)
            got = sss_ext.verify(**kwargs, mode=mode)
            label = f"B={batch} K={K} V={vocab} {dtype} {mode} ref={with_ref} tau={temperature} top_k={top_k} top_p={top_p} {layout}"
            counted, same = compare(got, expected, kwargs, mode, label, report, margins)
            rows += counted
            equal += same
            if temperature >= 0.1:  # log Z grows like 1/tau: compare relative to its size below
                worst_log_z = max(worst_log_z, float((got.log_z - expected.log_z).abs().max()))
            else:
                scale = expected.log_z.abs().clamp(min=1.0)
                worst_log_z = max(worst_log_z, float(((got.log_z - expected.log_z).abs() / scale).max()))
    assert_exactness_rule(rows, equal, margins, report, "CUDA vs reference")
    assert worst_log_z < 1e-4, f"worst |log_z error| {worst_log_z:.2e}"


@pytest.mark.parametrize("temperature", [0.01, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_temperature_large_vocabulary(dtype, temperature):
    """tau in {0.01, 0.1} at V = 128256 with a reference: float64 scores keep the normalisers at
    float32-rounding level however large 1/tau makes them."""
    rows = equal = 0
    report, margins = [], []
    for mode, (top_k, top_p) in itertools.product(("exact", "paper"), ((0, 1.0), (0, 0.9), (50, 1.0))):
        kwargs = make_inputs(8, 4, 128256, dtype, True, temperature, top_k, top_p, "contiguous", seed=11)
        expected = sss_ext.reference.verify(**kwargs, mode=mode)
        got = sss_ext.verify(**kwargs, mode=mode)
        counted, same = compare(got, expected, kwargs, mode, f"{mode} top_k={top_k} top_p={top_p}", report, margins)
        rows += counted
        equal += same
        torch.testing.assert_close(got.log_z, expected.log_z, rtol=1e-6, atol=1e-4)
    assert_exactness_rule(rows, equal, margins, report, f"tau={temperature} V=128256")


@pytest.mark.parametrize("batch,vocab", list(itertools.product((1, 99), (1, 99, 111, 989, 128256))))
def test_awkward_sizes(batch, vocab):
    """Vocabularies that are not multiples of the 16-byte vector and of the stats chunk, batch 1
    and 99; sliced rows (misaligned) and every temperature kind."""
    rows = equal = 0
    report, margins = [], []
    for dtype, temperature, (top_k, top_p) in itertools.product(DTYPES, (0.0, 0.8), ((0, 1.0), (3, 0.9))):
        kwargs = make_inputs(batch, 3, vocab, dtype, True, temperature, top_k, top_p, "sliced", seed=vocab + batch)
        expected = sss_ext.reference.verify(**kwargs)
        got = sss_ext.verify(**kwargs)
        counted, same = compare(got, expected, kwargs, "exact", f"{dtype} tau={temperature} top_k={top_k} top_p={top_p}", report,
                                margins)
        rows += counted
        equal += same
        logits = kwargs["target_logits"][:, 0]
        u = kwargs["uniforms"][:, 0].contiguous()
        counted, same = compare_sample(logits, temperature, top_k, top_p, u, report, margins)
        rows += counted
        equal += same
    assert_exactness_rule(rows, equal, margins, report, f"B={batch} V={vocab}")


def compare_sample(logits, temperature, top_k, top_p, uniforms, report, margins, top_k_ties="keep"):
    """sss_ext.sample against the reference; mismatches get their draw margin. -> (rows, equal)."""
    got = sss_ext.sample(logits, temperature, top_k, top_p, uniforms=uniforms, top_k_ties=top_k_ties)
    expected = sss_ext.reference.sample(logits, temperature, top_k, top_p, uniforms=uniforms, top_k_ties=top_k_ties)
    differ = (got != expected).nonzero().flatten().tolist()
    for row in differ:
        if temperature == 0:
            margin = math.inf
        else:
            margin = draw_margin(sss_ext.warp_probs(logits[row], temperature, top_k, top_p, top_k_ties=top_k_ties),
                                 float(uniforms[row]))
        margins.append(margin)
        report.append(f"  sample row {row} (margin {margin:.2e}): V={logits.shape[-1]} {logits.dtype} tau={temperature} "
                      f"top_k={top_k} top_p={top_p} top_k_ties={top_k_ties}")
    return got.numel(), got.numel() - len(differ)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (0.0, 0, 1.0), (1.0, 50, 1.0)])
def test_large_vocabulary_matches_reference(dtype, temperature, top_k, top_p):
    """V = 128256 splits the vocabulary across many blocks and draw chunks."""
    kwargs = make_inputs(4, 4, 128256, dtype, True, temperature, top_k, top_p, "sliced", seed=3)
    expected = sss_ext.reference.verify(**kwargs)
    got = sss_ext.verify(**kwargs)
    report, margins = [], []
    rows, equal = compare(got, expected, kwargs, "exact", f"{dtype} tau={temperature}", report, margins)
    assert_exactness_rule(rows, equal, margins, report, "V=128256")
    torch.testing.assert_close(got.log_z, expected.log_z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_ref", [False, True], ids=["sd", "tilted"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)])
def test_one_hot_drafts_match_reference(dtype, with_ref, temperature, top_k, top_p):
    """draft_logits=None (docs/algorithm.md §11): the drafts' own logits become the tilt's aligned_logits.
    Tokens must be equal; a difference can only come from float32 rounding at a decision
    boundary (probability ~1e-6 per decision here), and is then to be examined."""
    kwargs = make_inputs(99, 4, 50272, dtype, with_ref, temperature, top_k, top_p, seed=4)
    draft_logits = kwargs.pop("draft_logits")
    if with_ref:
        kwargs["aligned_logits"] = draft_logits
    expected = sss_ext.reference.verify(draft_logits=None, **kwargs)
    got = sss_ext.verify(draft_logits=None, **kwargs)
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.num_accepted, expected.num_accepted)
    torch.testing.assert_close(got.log_z, expected.log_z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vocab", [111, 50272])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)])
@pytest.mark.parametrize("with_ref,one_hot,ragged", [(False, False, False), (True, False, True), (True, True, False),
                                                     (False, True, True)], ids=["sd", "tilted-ragged", "one-hot", "one-hot-sd-ragged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_verification_matches_reference(dtype, with_ref, one_hot, ragged, temperature, top_k, top_p, vocab):
    """verification="block" (docs/algorithm.md §12). The residual masses R_i and the draw carry
    float32 exponentials, so a row may differ from the float64 reference only where a uniform
    lies within float32 rounding of a threshold h_i or of a running sum (probability ~1e-6 per
    decision here): at most one row of a case."""
    kwargs = make_inputs(99, 4, vocab, dtype, with_ref, temperature, top_k, top_p, seed=5)
    if one_hot:
        draft_logits = kwargs.pop("draft_logits")
        kwargs.update(draft_logits=None, aligned_logits=draft_logits if with_ref else None)
    if ragged:
        kwargs["num_draft_tokens"] = torch.arange(99, device=DEVICE) % 5
    expected = sss_ext.reference.verify(**kwargs, verification="block")
    got = sss_ext.verify(**kwargs, verification="block")
    differ = (~equal_rows(got, expected)).nonzero().flatten().tolist()
    assert len(differ) <= 1, (differ, got.tokens[differ[:4]], expected.tokens[differ[:4]])
    torch.testing.assert_close(got.log_z, expected.log_z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_ref", [False, True], ids=["sd", "tilted"])
def test_flashinfer_drop_in_matches_cpu(with_ref):
    """sss_ext.compat.flashinfer on CUDA tensors: the seeded uniforms are the CPU's (integer hash),
    so the tokens and counters equal the CPU call's (up to float32 rounding at a decision
    boundary, then to be examined)."""
    from sss_ext.compat.flashinfer import chain_speculative_sampling, seeded_uniforms

    g = torch.Generator().manual_seed(12)
    batch, num_draft, vocab = 99, 4, 32000
    positions = num_draft + 1 if with_ref else num_draft
    probs = [torch.softmax(2 * torch.randn(batch, n, vocab, generator=g), -1) for n in (positions, num_draft + 1, num_draft + 1)]
    draft_probs, target_probs, ref_probs = probs
    ids = torch.multinomial(draft_probs[:, :num_draft].reshape(-1, vocab), 1, generator=g).view(batch, num_draft).int()
    extra = dict(ref_probs=ref_probs, shift=1.0) if with_ref else {}
    assert torch.equal(seeded_uniforms(7, 3, batch, num_draft + 1, "cpu"), seeded_uniforms(7, 3, batch, num_draft + 1, DEVICE).cpu())
    cpu = chain_speculative_sampling(draft_probs, ids, target_probs, seed=7, offset=3, **extra)
    cuda = chain_speculative_sampling(draft_probs.to(DEVICE), ids.to(DEVICE), target_probs.to(DEVICE), seed=7, offset=3,
                                      **{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
    for a, b in zip(cpu, cuda):
        assert torch.equal(a, b.cpu())


def test_sample_matches_reference():
    g = torch.Generator(device=DEVICE).manual_seed(3)
    rows = equal = 0
    report, margins = [], []
    for (batch, vocab), dtype, temperature, (top_k, top_p) in itertools.product(
        ((1, 2), (99, 111), (3, 50272), (989, 7), (8, 128256)), DTYPES, TEMPERATURES, TRUNCATIONS
    ):
        logits = (3 * torch.randn(batch, vocab, generator=g, device=DEVICE)).to(dtype)
        uniforms = sss_ext.draw_uniforms((batch,), DEVICE, g)
        counted, same = compare_sample(logits, temperature, top_k, top_p, uniforms, report, margins)
        rows += counted
        equal += same
    assert_exactness_rule(rows, equal, margins, report, "sample vs reference")


def truncation_rows(case: str, vocab: int, g: torch.Generator) -> torch.Tensor:
    """One float32 logits row that drives one path of the bucketed top-k / top-p selection
    (bucket_select.cuh; run on the CPU by python_tests/cuda/test_cuda_on_cpu.py)."""
    z = torch.randn(vocab, generator=g, device=DEVICE)
    if case == "logits":  # typical: a few thousand tokens per bucket at most -> collect
        return 2.5 * z + 8.0 * (torch.rand(vocab, generator=g, device=DEVICE) < 1e-3)
    if case == "constant":  # one score: the tie path
        return torch.full((vocab,), -1.5, device=DEVICE)
    if case == "flat":  # thousands of tokens per level-1 bucket: the level-2 refinement
        return 0.05 * z
    if case == "two plateaus":  # two scores in one level-1 bucket, each beyond the capacity
        return torch.where(torch.arange(vocab, device=DEVICE) % 2 == 0, 1.0, 1.0 - 2.0**-7)
    if case == "close scores":  # several scores in one level-2 sub-bucket: the radix fallback
        return 1.0 - torch.randint(0, 1000, (vocab,), generator=g, device=DEVICE).float() * 2.0**-20
    if case == "masked":  # most tokens -inf: a deep top-k lands in the -inf bucket
        return torch.where(torch.rand(vocab, generator=g, device=DEVICE) < 0.7, -math.inf, 3.0 * z)
    if case == "wide":  # low temperature: a deep top-k lands in the tail buckets
        return 30.0 * z
    raise ValueError(case)


@pytest.mark.parametrize("top_k_ties", ["keep", "exact-k"])
@pytest.mark.parametrize("case", ["logits", "constant", "flat", "two plateaus", "close scores", "masked", "wide"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_truncation_paths_match_reference(case, dtype, top_k_ties):
    """Every path of the bucketed selection (collect, tie path, level-2 refinement, radix
    fallback, -inf and tail buckets) keeps the reference's tokens under both top-k tie rules:
    64 uniforms spread over (0, 1) per row, top-k and top-p at the boundaries that matter
    (deep and shallow), V from one chunk to V = 128256."""
    g = torch.Generator(device=DEVICE).manual_seed(17)
    rows = equal = 0
    report, margins = [], []
    for vocab in (989, 6144, 128256):
        logits = truncation_rows(case, vocab, g).to(dtype)
        if not torch.isfinite(logits).any():
            continue
        for temperature, top_k, top_p in ((1.0, 50, 1.0), (1.0, 0, 0.9), (0.7, vocab // 2, 1.0), (1.0, vocab // 2, 0.5),
                                          (1.0, 2053, 0.999), (0.1, vocab - 3, 1e-9)):
            batch = 64
            uniforms = (torch.arange(batch, device=DEVICE, dtype=torch.float64) + 0.5) / batch
            counted, same = compare_sample(logits.expand(batch, vocab).contiguous(), temperature, top_k, top_p, uniforms,
                                           report, margins, top_k_ties)
            rows += counted
            equal += same
    assert_exactness_rule(rows, equal, margins, report, f"truncation paths ({case})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", (99, 989, 5000))
def test_misaligned_rows_match_reference(dtype, vocab):
    """Rows at every element offset, the same or different per tensor: each tensor's rows are
    read with 16-byte loads after its own misalignment (element loads at the row ends)."""
    g = torch.Generator(device=DEVICE).manual_seed(vocab)
    batch, K = 5, 3
    base = torch.randn(batch, K + 1, vocab + 16, generator=g, device=DEVICE).to(dtype)
    draft_tokens = torch.randint(0, vocab, (batch, K), generator=g, device=DEVICE)
    rows = equal = 0
    report, margins = [], []
    for offsets in [(o, o, o) for o in range(8)] + [(1, 2, 3), (0, 4, 7), (5, 0, 0), (0, 1, 0), (3, 0, 6)]:
        target, draft, ref = (
            (base + 0.3 * n)[..., o : o + vocab] for n, o in enumerate(offsets)
        )  # (B, K+1, V) each, unit vocab stride, row starts misaligned
        for temperature, top_p in ((1.0, 1.0), (0.7, 0.8), (0.0, 1.0)):
            uniforms = sss_ext.draw_uniforms((batch, K + 1), DEVICE, g)
            kwargs = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, ref_logits=ref, uniforms=uniforms,
                          temperature=temperature, top_k=0, top_p=top_p)
            expected = sss_ext.reference.verify(**kwargs)
            got = sss_ext.verify(**kwargs)
            counted, same = compare(got, expected, kwargs, "exact", f"offsets={offsets} tau={temperature} top_p={top_p}", report,
                                    margins)
            rows += counted
            equal += same
            torch.testing.assert_close(got.log_z, expected.log_z, rtol=1e-4, atol=1e-4)
        logits = base[:, 0, offsets[1] : offsets[1] + vocab]
        uniforms = sss_ext.draw_uniforms((batch,), DEVICE, g)
        counted, same = compare_sample(logits, 0.8, 0, 1.0, uniforms, report, margins)
        rows += counted
        equal += same
    assert_exactness_rule(rows, equal, margins, report, f"misaligned rows V={vocab}")


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.9), (1.0, 40, 0.95), (0.01, 0, 0.9), (0.0, 0, 1.0)])
def test_deterministic(temperature, top_k, top_p):
    """The same call five times gives identical bits (fixed reduction orders, top-p included)."""
    kwargs = make_inputs(7, 4, 128256, torch.bfloat16, True, temperature, top_k, top_p, "contiguous", seed=5)
    first = sss_ext.verify(**kwargs, mode="paper")
    logits = kwargs["target_logits"][:, 0]
    u = kwargs["uniforms"][:, 0].contiguous()
    sampled = sss_ext.sample(logits, temperature, top_k, top_p, uniforms=u)
    for _ in range(4):
        again = sss_ext.verify(**kwargs, mode="paper")
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        assert torch.equal(sampled, sss_ext.sample(logits, temperature, top_k, top_p, uniforms=u))


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
    K = draft.shape[0] - 1
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
    (the CUDA suite's family-wise level, stats_helpers.alpha_for); enough draws to detect a
    total-variation gap of 0.02."""
    target, draft, ref = one_context(vocab=12, num_draft=2, seed=1)
    ref = ref if with_ref else None
    out = emit_many(target, draft, ref, 200_000, temperature, top_k, top_p, "exact", seed=2)
    p_star = tilted_target(target, draft, ref, temperature, 1.0, top_k, top_p)
    assert chi_square_pvalue(out.tokens[:, 0], p_star[0]) > alpha_for(DEVICE)
    reached = out.num_accepted >= 1
    assert int(reached.sum()) > 20_000
    assert chi_square_pvalue(out.tokens[reached, 1], p_star[1]) > alpha_for(DEVICE)


def test_chi_square_paper_mode_negative_control():
    """Paper mode drops Z: with |Z - 1| >= 0.1 its output must fail the same fit (a test that
    cannot fail is not a test), while exact mode on the same context passes."""
    target, draft, ref = one_context(vocab=12, num_draft=2, seed=4, ref_gap=1.2)
    log_z = sss_ext.reference.verify(target[None], draft[None], torch.zeros(1, 2, dtype=torch.int64, device=DEVICE), ref[None],
                                     temperature=1.0, uniforms=torch.full((1, 3), 0.5, dtype=torch.float64, device=DEVICE)).log_z
    assert abs(float(log_z[0, 0].exp()) - 1) >= 0.1, "the control needs a context with |Z - 1| >= 0.1"
    p_star = tilted_target(target, draft, ref, 1.0, 1.0, 0, 1.0)
    paper = emit_many(target, draft, ref, 200_000, 1.0, 0, 1.0, "paper", seed=5)
    assert chi_square_pvalue(paper.tokens[:, 0], p_star[0]) < ALPHA
    exact = emit_many(target, draft, ref, 200_000, 1.0, 0, 1.0, "exact", seed=5)
    assert chi_square_pvalue(exact.tokens[:, 0], p_star[0]) > alpha_for(DEVICE)


def test_chi_square_sample():
    g = torch.Generator(device=DEVICE).manual_seed(6)
    logits = 2 * torch.randn(1, 20, generator=g, device=DEVICE)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 0.9)):
        tokens = sss_ext.sample(logits.expand(200_000, -1), temperature, top_k, top_p, generator=g)
        assert chi_square_pvalue(tokens, sss_ext.warp_probs(logits[0], temperature, top_k, top_p)) > alpha_for(DEVICE)


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
        uniforms = sss_ext.draw_uniforms((batch, K + 1), DEVICE, None)
        sample_uniforms = sss_ext.draw_uniforms((batch,), DEVICE, None)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graph_capture_of_a_first_call(dtype):
    """A shape never called before is captured directly (no eager warm-up): the launch path
    queries nothing from the driver, so the first call may be inside the capture; replays with
    validate=False equal eager calls."""
    batch, K, vocab = 5, 3, 4321 + DTYPES.index(dtype)
    kwargs = make_inputs(batch, K, vocab, dtype, True, 0.9, 7, 0.9, "sliced", seed=13)
    uniforms = kwargs.pop("uniforms")
    static_u = uniforms.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sss_ext.verify(**kwargs, uniforms=static_u, validate=False)
    for seed in range(3):
        static_u.copy_(sss_ext.draw_uniforms((batch, K + 1), DEVICE, torch.Generator(device=DEVICE).manual_seed(seed)))
        graph.replay()
        eager = sss_ext.verify(**kwargs, uniforms=static_u.clone(), validate=False)
        for a, b in zip(out, eager):
            assert torch.equal(a, b)


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
    batch, K, vocab = 13, 2, 50
    target, draft, ref = (torch.randn(batch, K + 1, vocab, generator=g, device=DEVICE) for _ in range(3))
    draft_tokens = torch.randint(0, vocab, (batch, K), generator=g, device=DEVICE)
    uniforms = sss_ext.draw_uniforms((batch, K + 1), DEVICE, g)
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
    draft[11, K, :] = float("-inf")  # the draft row at position K is read (and checked) with a reference
    target[12, 0, 3] = float("inf")
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


def test_unread_rows_are_not_checked():
    """Without a reference the draft row at position K is not read: a NaN there leaves the row
    valid (the CPU kernel reads the same rows)."""
    kwargs = make_inputs(3, 2, 300, torch.float32, False, 0.9, seed=1)
    kwargs["draft_logits"] = torch.cat([kwargs["draft_logits"][:, :2], torch.full_like(kwargs["draft_logits"][:, :1], float("nan"))], 1)
    got = sss_ext.verify(**kwargs, validate=False)
    expected = sss_ext.reference.verify(**{**kwargs, "draft_logits": kwargs["draft_logits"][:, :2]})
    assert bool((got.num_accepted >= 0).all())
    assert torch.equal(got.tokens, expected.tokens)


@pytest.mark.parametrize("temperature", [0.0, 1e-285])
def test_score_range_rule(temperature):
    """Rows with a finite scaled logit |z / tau| > 1e300 or a tilted row maximum outside
    [-1e300, 1e300] (also +inf) are invalid; scores overflowing to -inf below a valid maximum
    only mean probability 0. At tau = 0 the scale is 1, so only the tilt can leave the range."""
    g = torch.Generator(device=DEVICE).manual_seed(7)
    batch, K, vocab = 6, 2, 40
    target = torch.randn(batch, K + 1, vocab, generator=g, device=DEVICE, dtype=torch.float64)
    draft = target.clone()
    ref = target.clone()  # r = d: s = zq / tau on valid rows
    draft[1, 1, 5] += 2.0  # tilt lambda (zr - zd) / tau = 1e20 * 2 / tau: beyond 1e300 (tau > 0) / finite (tau = 0)
    ref[2, 0, :] += 2.0  # every tilted score far below -1e300: the row maximum leaves the range
    ref[3, 2, 7] += 2.0  # one score far below -1e300, the maximum stays in range: valid
    target[4, 0, 9] = 1e20 if temperature > 0 else 1e38  # |z / tau| = 1e305 (tau > 0); 1e38 is in range at tau = 0
    if temperature > 0:
        draft[5, 0, 0] = 1e20
    target, draft, ref = (t.float() for t in (target, draft, ref))
    draft_tokens = torch.randint(0, vocab, (batch, K), generator=g, device=DEVICE)
    uniforms = sss_ext.draw_uniforms((batch, K + 1), DEVICE, g)
    shift = 1e20 if temperature > 0 else 1e300
    kwargs = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, ref_logits=ref, temperature=temperature,
                  shift=shift, uniforms=uniforms)
    got = sss_ext.verify(**kwargs, validate=False)
    invalid = [1, 2, 4, 5] if temperature > 0 else [1, 2]
    valid = [b for b in range(batch) if b not in invalid]
    assert got.num_accepted[invalid].tolist() == [-1] * len(invalid), got.num_accepted
    assert bool((got.tokens[invalid] == -1).all())
    assert bool((got.num_accepted[valid] >= 0).all()), got.num_accepted
    rows = torch.tensor(valid, device=DEVICE)
    expected = sss_ext.reference.verify(**{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
    assert torch.equal(got.tokens[rows], expected.tokens) and torch.equal(got.num_accepted[rows], expected.num_accepted)
    with pytest.raises(ValueError):
        sss_ext.verify(**kwargs, validate=True)
    if temperature > 0:  # sample: the same rule on `logits`
        logits = target[:, 0]
        sampled = sss_ext.sample(logits, temperature, uniforms=uniforms[:, 0].contiguous(), validate=False)
        assert int(sampled[4]) == -1 and bool((sampled[[0, 1, 2, 3, 5]] >= 0).all())


def test_invalid_sample_rows_are_minus_one():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(6, 30, generator=g, device=DEVICE)
    uniforms = sss_ext.draw_uniforms((6,), DEVICE, g)
    logits[1, 3] = float("nan")
    logits[2, :] = float("-inf")
    logits[3, 0] = float("inf")
    uniforms[4] = 1.0
    uniforms[5] = 0.0
    got = sss_ext.sample(logits, 1.0, uniforms=uniforms, validate=False)
    assert got[1:].tolist() == [-1] * 5
    assert int(got[0]) == int(sss_ext.reference.sample(logits[:1], 1.0, uniforms=uniforms[:1]))
    greedy = sss_ext.sample(logits, 0.0, uniforms=uniforms, validate=False)  # uniforms are checked at tau = 0 too
    assert greedy[1:].tolist() == [-1] * 5 and int(greedy[0]) == int(logits[0].argmax())
    with pytest.raises(ValueError):
        sss_ext.sample(logits, 0.0, uniforms=uniforms, validate=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    device = torch.device("cuda", 1)
    kwargs = make_inputs(3, 2, 1000, torch.float32, True, 0.9, seed=4)
    expected = sss_ext.reference.verify(**kwargs)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = sss_ext.verify(**moved)
    assert got.tokens.device == device
    assert torch.equal(got.tokens.cpu(), expected.tokens.cpu())


# ---------------------------------------------------------------------------------------
# Tree verification (sss_ext.verify_tree): the CUDA kernel against the CPU kernel and the
# float64 reference, the invalid-row contract, no host sync, graph capture, opcheck.

TREE_CASES = [
    # (dtype, with_ref, temperature, top_k, top_p, shift)
    (torch.float32, True, 1.0, 0, 1.0, 2.0),
    (torch.float32, False, 0.7, 20, 0.9, 1.0),
    (torch.float32, True, 0.8, 0, 1.0, 0.0),
    (torch.bfloat16, True, 0.9, 5, 1.0, 1.0),
    (torch.float16, False, 1.0, 0, 0.8, 1.0),
    (torch.bfloat16, True, 0.0, 0, 1.0, 1.0),
]
TREE_SHAPES = [(1, 4), (99, 9), (111, 6), (989, 5), (50272, 7)]  # (V, max_nodes)


def random_tree(batch, max_nodes, vocab, dtype, with_ref, seed, ragged=True):
    """verify_tree keyword arguments on the GPU: random trees (parents[c] uniform in [0, c)), half
    the drafts the parent's draft argmax (so that some are accepted), ragged node counts with
    garbage past them. Shape: logits (B, N, V); draft_tokens, parents, uniforms (B, N); num_nodes (B,)."""
    g = torch.Generator().manual_seed(seed)
    target, draft, ref = (x.to(dtype) for x in sss_ext.testing.make_logits(batch, max_nodes, vocab, g))
    parents = torch.tensor([[-1] + [int(torch.randint(0, c, (1,), generator=g)) for c in range(1, max_nodes)] for _ in range(batch)],
                           dtype=torch.int64).reshape(batch, max_nodes)
    likely = draft.gather(1, parents.clamp(min=0)[..., None].expand(-1, -1, vocab)).float().argmax(dim=-1)
    draft_tokens = torch.where(torch.rand(batch, max_nodes, generator=g) < 0.5, likely, torch.randint(0, vocab, (batch, max_nodes), generator=g))
    uniforms = torch.randint(1, 2**53, (batch, max_nodes), generator=g, dtype=torch.float64) * 2.0**-53
    call = dict(target_logits=target, draft_logits=draft, draft_tokens=draft_tokens, parents=parents, ref_logits=ref if with_ref else None,
                uniforms=uniforms)
    if ragged:
        num_nodes = torch.randint(1, max_nodes + 1, (batch,), generator=g)
        unused = torch.arange(max_nodes) >= num_nodes[:, None]
        call.update(num_nodes=num_nodes, parents=parents.masked_fill(unused, 77), draft_tokens=draft_tokens.masked_fill(unused, -5),
                    uniforms=uniforms.masked_fill(unused, 2.0), target_logits=target.masked_fill(unused[..., None], math.nan))
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in call.items()}


def on_cpu(call):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in call.items()}


def equal_tree_rows(got, expected) -> torch.Tensor:
    """Rows whose path, tokens and num_accepted agree. Shape: -> (B,) bool."""
    got, expected = [[t.cpu() for t in (o.path, o.tokens, o.num_accepted)] for o in (got, expected)]
    return (got[0] == expected[0]).all(dim=1) & (got[1] == expected[1]).all(dim=1) & (got[2] == expected[2])


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: f"{str(c[0])[6:]}-ref{int(c[1])}-tau{c[2]}-k{c[3]}-p{c[4]}-lam{c[5]}")
def test_tree_matches_cpu_kernel_and_reference(case, replacement):
    """Every row equals the CPU kernel's (the same semantics, float64 decisions); below
    kExactVocab the normalisers are float64 too, above it float32 sums may move a decision within
    float32 rounding of its boundary (the exactness rule): at most one row of such a call may differ.
    The CPU kernel equals the float64 reference (test_tree_verification.py); here checked on the
    small vocabularies."""
    dtype, with_ref, temperature, top_k, top_p, shift = case
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, shift=shift, replacement=replacement)
    for vocab, max_nodes in TREE_SHAPES:
        call = random_tree(16 if vocab > 10000 else 64, max_nodes, vocab, dtype, with_ref, seed=vocab + max_nodes)
        got = sss_ext.verify_tree(**call, **options)
        expected = sss_ext.verify_tree(**on_cpu(call), **options)
        equal = equal_tree_rows(got, expected)
        allowed = 0 if vocab < 4096 else 1
        assert int((~equal).sum()) <= allowed, (vocab, EXACTNESS_RULE, got, expected)
        rows = equal.nonzero().flatten().cpu()
        assert torch.allclose(got.log_z.cpu()[rows], expected.log_z[rows], rtol=2e-6, atol=2e-5)
        if vocab < 1000:
            reference = sss_ext.reference_tree.verify_tree(**on_cpu(call), **options)
            assert bool(equal_tree_rows(got, reference).all()), (vocab, got, reference)


def test_tree_chain_is_verify_on_cuda():
    """A chain-shaped tree is verify with the same uniforms (docs/algorithm.md §13), on the GPU too."""
    batch, K, vocab = 32, 4, 3000
    kwargs = make_inputs(batch, K, vocab, torch.float32, True, 0.8, 0, 1.0, "contiguous", seed=21)
    chain = sss_ext.verify(**kwargs)
    draft_tokens = torch.cat([torch.zeros_like(kwargs["draft_tokens"][:, :1]), kwargs["draft_tokens"]], dim=1)
    parents = torch.arange(-1, K, device=DEVICE).expand(batch, -1).contiguous()
    draft = kwargs["draft_logits"]
    tree = sss_ext.verify_tree(kwargs["target_logits"], draft, draft_tokens, parents, kwargs["ref_logits"], uniforms=kwargs["uniforms"],
                               temperature=0.8)
    assert torch.equal(tree.tokens, chain.tokens) and torch.equal(tree.num_accepted, chain.num_accepted)


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_tree_invalid_rows_are_minus_one(temperature):
    """Each row but the first has one defect the CPU kernel refuses: num_accepted -1, path and
    tokens -1, log_z NaN; the valid row equals the CPU kernel's; validate=True raises."""
    call = random_tree(8, 5, 50, torch.float32, True, seed=5, ragged=False)
    call["num_nodes"] = torch.full((8,), 5, device=DEVICE)
    call["parents"][1, 3] = 3            # not before its node
    call["parents"][2, 0] = 0            # root without -1
    call["draft_tokens"][3, 2] = 50      # outside [0, V)
    call["uniforms"][4, 4] = 0.0         # the final draw's column
    call["target_logits"][5, 2, 7] = math.nan
    call["num_nodes"][6] = 0             # outside [1, N]
    call["ref_logits"][7, 1] = -math.inf  # an all -inf row
    got = sss_ext.verify_tree(**call, temperature=temperature, validate=False)
    bad = torch.arange(1, 8, device=DEVICE)
    assert bool((got.num_accepted[bad] == -1).all()), got.num_accepted
    assert bool((got.path[bad] == -1).all()) and bool((got.tokens[bad] == -1).all())
    assert bool(torch.isnan(got.log_z[bad]).all())
    first = sss_ext.verify_tree(**on_cpu({k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in call.items()}),
                                temperature=temperature)
    assert torch.equal(got.path[:1].cpu(), first.path) and torch.equal(got.tokens[:1].cpu(), first.tokens)
    with pytest.raises(ValueError):
        sss_ext.verify_tree(**call, temperature=temperature, validate=True)


@pytest.mark.parametrize("replacement", [True, False])
def test_tree_validate_false_does_not_sync_and_captures(replacement):
    """validate=False: no host sync; a first call captured in a CUDA graph replays like eager calls."""
    call = random_tree(6, 6, 5000, torch.bfloat16, True, seed=8)
    uniforms = call.pop("uniforms")
    static_u = uniforms.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sss_ext.verify_tree(**call, uniforms=static_u, replacement=replacement, top_k=7, top_p=0.9, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sss_ext.verify_tree(**call, uniforms=static_u, replacement=replacement, validate=False)
    for seed in range(3):
        static_u.copy_(torch.where(uniforms > 1, uniforms,
                                   sss_ext.draw_uniforms(tuple(uniforms.shape), DEVICE, torch.Generator(device=DEVICE).manual_seed(seed))))
        graph.replay()
        eager = sss_ext.verify_tree(**call, uniforms=static_u.clone(), replacement=replacement, validate=False)
        for a, b in zip(out, eager):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature,top_p,replacement", [(0.8, 1.0, True), (0.0, 1.0, False), (1.0, 0.9, False)])
def test_tree_opcheck(dtype, temperature, top_p, replacement):
    call = random_tree(3, 6, 111, dtype, True, seed=2)
    args = (call["target_logits"], call["draft_logits"], call["draft_tokens"], call["parents"], call["ref_logits"], call["uniforms"],
            temperature, 0, top_p, 1.0, "exact", replacement, call["num_nodes"])
    torch.library.opcheck(torch.ops.sss_ext.verify_tree.default, args)
