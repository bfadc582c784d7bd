"""Goodness-of-fit helpers for the statistical tests (docs/algorithm.md §8)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import optimize, stats

ALPHA = 0.01  # per test on the CPU, where fixed seeds make a correct kernel's run the same every time
# On a GPU the random streams differ from the CPU's, so a first run is genuinely random: the
# chi-square tests a CUDA run makes that a correct kernel must pass share one family-wise
# error rate, Bonferroni over them (test_cuda.py: 4 cases x 2 positions, the paper control's
# exact run, 2 sample fits; test_statistics.py on the cuda device: 5 cases (each Bonferroni
# over its positions), the two controls' honest runs, 3 sample fits; compat/test_flashinfer_law.py
# on the cuda device: 5 cases, the residual control's honest run).
CUDA_FAMILY_ALPHA = 1e-3
CUDA_CHI_SQUARE_TESTS = 27


def alpha_for(device) -> float:
    """Level of one chi-square test that a correct kernel must pass on `device`."""
    return ALPHA if torch.device(device).type == "cpu" else CUDA_FAMILY_ALPHA / CUDA_CHI_SQUARE_TESTS


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


def detectable_tv(num_samples: int, probs: torch.Tensor, alpha: float = ALPHA, power: float = 0.9) -> float:
    """The smallest total-variation gap that the chi-square test at level `alpha` detects with
    probability `power` from `num_samples` draws, whatever the direction of the gap.

    A law p' at TV distance d from p gives the statistic noncentrality N * sum (p' - p)^2 / p
    >= N * (sum |p' - p|)^2 / sum p = 4 N d^2 (Cauchy-Schwarz; the bound is attained), so the
    gap is detected with `power` once 4 N d^2 reaches the noncentrality that gives that power.
    """
    expected = probs.double() * num_samples
    bins = int((expected >= 5).sum().item()) + int(bool((expected < 5).any()))  # pooled as chi_square_from_counts does
    dof = max(bins - 1, 1)
    critical = stats.chi2.ppf(1 - alpha, dof)
    noncentrality = optimize.brentq(lambda lam: stats.ncx2.sf(critical, dof, lam) - power, 1e-9, 1e6)
    return float(np.sqrt(noncentrality / (4 * num_samples)))
