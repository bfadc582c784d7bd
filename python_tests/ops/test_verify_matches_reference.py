"""Exactness of the CPU kernel: with the same uniforms, the op and the reference emit identical
tokens and counts (torch.equal) over a parametrised sweep. The CUDA kernels are held to the
CUDA exactness rule instead (docs/algorithm.md §8), over the same sweep in test_cuda.py."""

import itertools

import pytest
import torch

import sss_ext
from sss_ext.testing import LAYOUTS, make_verify_inputs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = (("exact", False), ("exact", True), ("paper", True))  # (mode, with_ref)
TEMPERATURES = (0.0, 0.01, 0.1, 0.7, 1.0)  # 0.01 and 0.1: precision at low temperature
# (top_k, top_p, top_k_ties); "keep" is the default, "exact-k" the other top-k tie rule.
TRUNCATIONS = ((0, 1.0, "keep"), (5, 1.0, "keep"), (0, 0.8, "keep"), (20, 0.9, "keep"), (5, 1.0, "exact-k"), (20, 0.9, "exact-k"))
SMALL_SHAPES = list(itertools.product((1, 3, 99), (1, 4, 8), (2, 7, 111)))
LARGE_SHAPES = [(1, 1, 50272), (3, 4, 50272)]


@pytest.fixture
def device():
    """The CPU kernel only (overrides conftest's device parametrisation): every row equal."""
    return torch.device("cpu")


def assert_same(device_out, reference_out, context):
    tokens, num_accepted, log_z = (t.cpu() for t in device_out)
    assert torch.equal(num_accepted, reference_out.num_accepted), context
    assert torch.equal(tokens, reference_out.tokens), context
    torch.testing.assert_close(log_z, reference_out.log_z, rtol=1e-5, atol=1e-5, msg=lambda m: f"{context}: {m}")


def run_case(device, shape, dtype, mode, with_ref, temperature, top_k, top_p, layout, seed, top_k_ties="keep",
             verification="token"):
    batch, num_draft_tokens, vocab_size = shape
    kwargs = make_verify_inputs(batch, num_draft_tokens, vocab_size, dtype, with_ref, temperature, top_k, top_p, layout, seed,
                                top_k_ties=top_k_ties)
    expected = sss_ext.reference.verify(**kwargs, mode=mode, verification=verification)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = sss_ext.verify(**on_device, mode=mode, verification=verification)
    assert_same(got, expected, f"shape={shape} dtype={dtype} mode={mode} ref={with_ref} tau={temperature} "
                               f"top_k={top_k} top_p={top_p} ties={top_k_ties} layout={layout} seed={seed} {verification}")
    return expected


@pytest.mark.parametrize("top_k,top_p,top_k_ties", TRUNCATIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("mode,with_ref", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sweep_matches_reference(device, dtype, mode, with_ref, temperature, top_k, top_p, top_k_ties):
    accepted = 0
    # Every combination runs the small shapes; the V = 50272 shapes run untruncated and with both truncations.
    shapes = SMALL_SHAPES + (LARGE_SHAPES if (top_k, top_p, top_k_ties) in (TRUNCATIONS[0], TRUNCATIONS[3]) else [])
    for n, shape in enumerate(shapes):
        layout = LAYOUTS[n % len(LAYOUTS)]
        accepted += int(run_case(device, shape, dtype, mode, with_ref, temperature, top_k, top_p, layout, seed=n,
                                 top_k_ties=top_k_ties).num_accepted.sum())
    assert accepted > 0  # the sweep reaches the acceptance path, not only corrections


@pytest.mark.parametrize("top_k,top_p,top_k_ties", TRUNCATIONS)
@pytest.mark.parametrize("temperature", (0.1, 1.0))
@pytest.mark.parametrize("with_ref", (False, True), ids=("sd", "ref"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sweep_matches_reference(device, dtype, with_ref, temperature, top_k, top_p, top_k_ties):
    """verification="block" (docs/algorithm.md §12) over the small shapes and every layout."""
    accepted = 0
    for n, shape in enumerate(SMALL_SHAPES):
        accepted += int(run_case(device, shape, dtype, "exact", with_ref, temperature, top_k, top_p, LAYOUTS[n % len(LAYOUTS)],
                                 seed=n, top_k_ties=top_k_ties, verification="block").num_accepted.sum())
    assert accepted > 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("top_p", (1.0, 0.9))
def test_largest_shape_matches_reference(device, dtype, top_p):
    run_case(device, (99, 8, 50272), dtype, "exact", True, 1.0, 0, top_p, "sliced", seed=7)


def test_sample_matches_reference(device):
    generator = torch.Generator().manual_seed(3)
    for (batch, vocab_size), dtype, temperature, (top_k, top_p, top_k_ties) in itertools.product(
        ((1, 2), (99, 111), (3, 50272), (989, 7)), DTYPES, TEMPERATURES, TRUNCATIONS
    ):
        logits = (3 * torch.randn(batch, vocab_size, generator=generator)).to(dtype)
        uniforms = sss_ext.draw_uniforms((batch,), "cpu", generator)
        expected = sss_ext.reference.sample(logits, temperature, top_k, top_p, uniforms=uniforms, top_k_ties=top_k_ties)
        got = sss_ext.sample(logits.to(device), temperature, top_k, top_p, uniforms=uniforms.to(device), top_k_ties=top_k_ties)
        assert torch.equal(got.cpu(), expected), (batch, vocab_size, dtype, temperature, top_k, top_p, top_k_ties)
