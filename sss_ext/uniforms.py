"""The randomness contract (docs/algorithm.md §5): float64 uniforms on the open interval (0, 1)."""

from __future__ import annotations

import torch

_CPU = torch.device("cpu")


def draw_uniforms(shape: tuple, device, generator: torch.Generator | None) -> torch.Tensor:
    """float64 uniforms on the open grid {1, ..., 2**53 - 1} / 2**53: never 0, never 1.

    Parameters
    ----------
    shape : tuple
        Shape of the result, e.g. ``(B, K+1)`` for :func:`sss_ext.verify`.
    device : torch.device or str
        Where the uniforms are drawn (the logits' device).
    generator : torch.Generator, optional
        Source of randomness, on the same device type; the global one when None.

    Shape
    -----
    -> shape, float64
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator must be a {torch.device(device).type} generator, got one on {generator.device}")
    if device == _CPU or device == "cpu":
        # The same values in one draw less: CPU randint takes the same 64-bit integer per
        # element for a float64 result as for int64 (exact below 2**53); scaling by a power of
        # two is exact.
        return torch.randint(1, 2**53, shape, dtype=torch.float64, generator=generator).mul_(2.0**-53)
    grid = torch.randint(1, 2**53, shape, dtype=torch.int64, device=device, generator=generator)
    return grid.to(torch.float64) * 2.0**-53
