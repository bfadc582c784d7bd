"""``draw_uniforms``: the open grid {1, ..., 2**53 - 1} / 2**53, the same values on every path."""

import pytest
import torch

import sss_ext


@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (64, 33), (4,)])
def test_cpu_draw_equals_the_integer_grid_scaled(shape):
    for seed in range(20):
        drawn = sss_ext.draw_uniforms(shape, torch.device("cpu"), torch.Generator().manual_seed(seed))
        grid = torch.randint(1, 2**53, shape, dtype=torch.int64, generator=torch.Generator().manual_seed(seed))
        assert drawn.dtype == torch.float64 and torch.equal(drawn, grid.to(torch.float64) * 2.0**-53)
        assert torch.equal(drawn, sss_ext.draw_uniforms(shape, "cpu", torch.Generator().manual_seed(seed)))
        assert bool(((drawn > 0) & (drawn < 1)).all())


@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (64, 33), (4,)])
def test_integer_grid_path_draws_the_cpu_values(shape):
    """Every device but the plain CPU one (CUDA's path) draws int64 on the grid and scales it.

    ``torch.device("cpu", 0)`` is not ``torch.device("cpu")``, so it takes that path on the CPU:
    the scaling and the bounds of the grid path are checked here without a GPU (which stream of
    integers a CUDA generator gives is ``test_cuda.py``'s concern).
    """
    indexed = torch.device("cpu", 0)
    assert indexed != torch.device("cpu")
    for seed in range(20):
        drawn = sss_ext.draw_uniforms(shape, indexed, torch.Generator().manual_seed(seed))
        grid = drawn * 2.0**53
        assert drawn.dtype == torch.float64 and drawn.shape == shape
        assert bool(((drawn > 0) & (drawn < 1)).all())
        assert torch.equal(grid, grid.round()) and bool(((grid >= 1) & (grid <= 2**53 - 1)).all())
        assert torch.equal(drawn, sss_ext.draw_uniforms(shape, "cpu", torch.Generator().manual_seed(seed)))
