"""Goodness-of-fit helpers for the statistical tests (docs/algorithm.md §8)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

ALPHA = 0.01


def chi_square_from_counts(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value of observed ``counts`` against category probabilities.

    Categories with expected count < 5 are pooled into one; an observed category of zero
    probability gives p = 0.
    """
    if np.any(counts[probs == 0] > 0):
        return 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    if keep.sum() < 2:  # a single category: only the zero-probability check above can fail
        return 1.0
    return float(stats.chisquare(observed[keep], expected[keep]).pvalue)


def chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of observed token ids against probabilities (see ``chi_square_from_counts``)."""
    probs = probs.double().cpu().numpy()
    counts = np.bincount(tokens.cpu().numpy(), minlength=probs.size).astype(float)
    return chi_square_from_counts(counts, probs)


def detectable_tv(num_samples: int, probs: torch.Tensor, power_z: float = 4.0) -> float:
    """A conservative TV gap the chi-square test detects: moving mass between the two most
    likely bins changes the statistic by ~N * 2 * gap^2 / p; require that to exceed the
    alpha=0.01 critical value by power_z standard deviations."""
    p = torch.sort(probs.double(), descending=True).values[:2].sum().item() / 2
    dof = int((probs * num_samples >= 5).sum().item())
    critical = stats.chi2.ppf(1 - ALPHA, max(dof, 1))
    needed = critical + power_z * np.sqrt(2 * max(dof, 1))
    return float(np.sqrt(needed * p / (2 * num_samples)))
