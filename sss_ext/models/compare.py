"""Run decoding methods on the default models side by side and summarise them.

Shared by the first-command demo (:mod:`sss_ext.models.demo`, held-out evaluation prompts,
gold reward) and the script that chooses the demo's SSS settings
(``scripts/choose_demo_settings.py``, training prompts, proxy reward only).

Costs are per prompt: *target passes* count every sequence row of every target forward
(a batched forward over ``N`` rows counts ``N``: what an unbatched implementation runs), so
Best-of-N pays ``N`` passes per token and speculative methods about one per round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..decoding.api import generate
from ..decoding.config import SamplingConfig
from ..decoding.methods import get_method
from ..decoding.observe import RecordingObserver

__all__ = ["MethodRun", "run_method", "method_label", "bootstrap_mean_ci", "paired_difference_ci", "SELECTION_RULE",
           "choose_settings", "describe"]


@dataclass
class MethodRun:
    """One method over a list of prompts.

    Attributes
    ----------
    label : str
        Name shown in tables (``method_label``).
    method : str
        The :func:`sss_ext.generate` method.
    config : SamplingConfig
        The settings it ran with.
    texts : list of str
        Continuations, one per prompt.
    target_passes : float
        Target row-forwards per prompt.
    wall_seconds : float
        Wall time of the ``generate`` call (all prompts).
    acceptance_rate : float or None
        Accepted / proposed drafts (speculative methods).
    """

    label: str
    method: str
    config: SamplingConfig
    texts: list
    target_passes: float
    wall_seconds: float
    acceptance_rate: float | None = None


def method_label(method: str, config: SamplingConfig) -> str:
    """``"vanilla"``, ``"Best-of-4"``, ``"SSS lambda=2 K=2"``: the method with the settings that matter."""
    if method == "bon":
        return f"Best-of-{config.num_samples}"
    if method in ("sss", "sss-paper"):
        return f"{method.upper()} lambda={config.shift:g} K={config.num_draft_tokens}"
    if method == "sd":
        return f"SD K={config.num_draft_tokens}"
    return method


def run_method(models, prompts: list[str], method: str, config: SamplingConfig, reward_fn=None) -> MethodRun:
    """Generate one continuation per prompt with ``method`` in one batched call; count target row-forwards.

    ``models`` is a :class:`~sss_ext.models.DefaultModels`; ``reward_fn`` is used by methods
    that need a reward (Best-of-N: the proxy reward).
    """
    observer = RecordingObserver()
    start = time.perf_counter()
    out = generate(models.target, models.draft, prompts, ref_model=models.ref_draft, tokenizer=models.tokenizer,
                   method=method, config=config, reward_fn=reward_fn if get_method(method).needs_reward else None,
                   observer=observer)
    wall = time.perf_counter() - start
    acceptance = out.stats.total.acceptance_rate
    return MethodRun(label=method_label(method, config), method=method, config=config, texts=list(out.texts),
                     target_passes=observer.forward_total("target", "row_calls") / len(prompts), wall_seconds=wall,
                     acceptance_rate=None if acceptance != acceptance else float(acceptance))


def _bootstrap_means(values: torch.Tensor, num_resamples: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (num_resamples, len(values)), generator=generator)
    return values.double()[index].mean(1)


def bootstrap_mean_ci(values, level: float = 0.95, num_resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap interval over the entries.

    Shape
    -----
    values: (P,) one score per prompt, P >= 2
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() < 2:
        raise ValueError(f"values must hold at least 2 scores for an interval, got {values.numel()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    means = _bootstrap_means(values, num_resamples, seed)
    tail = (1.0 - level) / 2
    return float(values.mean()), float(means.quantile(tail)), float(means.quantile(1.0 - tail))


def paired_difference_ci(first, second, level: float = 0.95, num_resamples: int = 4000, seed: int = 0):
    """(mean, low, high) of ``first - second`` per prompt (the same prompts resampled for both).

    Shape
    -----
    first, second: (P,) scores of two methods on the same P >= 2 prompts
    """
    first = torch.as_tensor(first, dtype=torch.float64).flatten()
    second = torch.as_tensor(second, dtype=torch.float64).flatten()
    if first.shape != second.shape:
        raise ValueError(f"first and second must score the same prompts, got shapes {tuple(first.shape)} and {tuple(second.shape)}")
    return bootstrap_mean_ci(first - second, level, num_resamples, seed)


#: the rule ``choose_settings`` applies, as recorded in the manifest
SELECTION_RULE = (
    "Among the SSS candidates (lambda, K) measured on training prompts, keep those whose target passes per prompt "
    "are at most {pass_fraction:g} of Best-of-{num_samples}'s and whose mean proxy reward (VADER) is at least "
    "Best-of-{num_samples}'s; choose the smallest lambda (the least shift away from the target), then the smallest K. "
    "If none qualifies, choose the candidate with the highest mean proxy reward within the pass budget. "
    "The gold reward and the evaluation prompts are never used."
)


def choose_settings(candidates: list[dict], baseline: dict, pass_fraction: float) -> tuple[dict, bool]:
    """(chosen candidate, whether it met the rule) under :data:`SELECTION_RULE`.

    Every candidate holds ``shift``, ``num_draft_tokens``, ``proxy_mean`` and
    ``target_passes``; ``baseline`` (Best-of-N) holds ``proxy_mean`` and ``target_passes``.
    """
    if not candidates:
        raise ValueError("candidates must not be empty")
    if not 0.0 < pass_fraction <= 1.0:
        raise ValueError(f"pass_fraction must be in (0, 1], got {pass_fraction!r}")
    budget = [c for c in candidates if c["target_passes"] <= pass_fraction * baseline["target_passes"]]
    qualified = [c for c in budget if c["proxy_mean"] >= baseline["proxy_mean"]]
    if qualified:
        return min(qualified, key=lambda c: (c["shift"], c["num_draft_tokens"])), True
    pool = budget or candidates
    return max(pool, key=lambda c: (c["proxy_mean"], -c["shift"], -c["num_draft_tokens"])), False


def _versus(difference: tuple[float, float, float]) -> str:
    """'above' / 'below' when the paired interval excludes 0, else 'level with'."""
    _, low, high = difference
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    return "level with"


def _times(ours: float, theirs: float, noun: str) -> str:
    """'6.2x fewer target passes' / '1.3x more wall time' (ours relative to theirs); a ratio that
    rounds to 1.0x is 'about the same wall time' / 'about as many target passes'."""
    if ours <= 0 or theirs <= 0:
        return f"{ours:.3g} vs {theirs:.3g} {noun}"
    countable = noun.endswith("passes")
    ratio = max(ours, theirs) / min(ours, theirs)
    if f"{ratio:.1f}" == "1.0":
        return f"about as many {noun}" if countable else f"about the same {noun}"
    if ours < theirs:
        return f"{ratio:.1f}x {'fewer' if countable else 'less'} {noun}"
    return f"{ratio:.1f}x more {noun}"


def describe(sss: MethodRun, best_of_n: MethodRun, vanilla: MethodRun, gold: dict) -> str:
    """One sentence saying what the demo's table shows, computed from the numbers.

    ``gold`` maps each run's label to its per-prompt gold rewards, shape (P,). SSS is called
    above / below another method when the paired 95% bootstrap interval of the per-prompt
    difference excludes 0, level with it otherwise.
    """
    versus_bon = paired_difference_ci(gold[sss.label], gold[best_of_n.label])
    versus_vanilla = paired_difference_ci(gold[sss.label], gold[vanilla.label])
    mean = {label: float(torch.as_tensor(values, dtype=torch.float64).mean()) for label, values in gold.items()}
    return (
        f"{sss.label} scores {_versus(versus_bon)} {best_of_n.label} on mean gold reward "
        f"({mean[sss.label]:.3f} vs {mean[best_of_n.label]:.3f}; paired difference {versus_bon[0]:+.3f}, "
        f"95% CI [{versus_bon[1]:+.3f}, {versus_bon[2]:+.3f}]) with "
        f"{_times(sss.target_passes, best_of_n.target_passes, 'target passes')} per prompt and "
        f"{_times(sss.wall_seconds, best_of_n.wall_seconds, 'wall time')}, and {_versus(versus_vanilla)} "
        f"{vanilla.label} sampling ({mean[vanilla.label]:.3f}; difference {versus_vanilla[0]:+.3f}, "
        f"95% CI [{versus_vanilla[1]:+.3f}, {versus_vanilla[2]:+.3f}]) with "
        f"{_times(sss.target_passes, vanilla.target_passes, 'target passes')}."
    )
