"""Efficiency accounting: every forward pass of every model, every reward call.

Conventions (the same for every method):

* ``<role>_calls``: forward invocations of that model. In the total, one batched call
  counts once; per prompt, a call counts once for every prompt with a row in the batch.
* ``<role>_tokens``: positions fed to the model, ``rows x width`` per call, padded slots
  included (that is what the model computes). Totals are the sums over prompts.
* ``reward_calls`` / ``reward_sequences``: invocations of the reward function (or reward
  model forward passes) and the number of sequences they scored.
* ``proposed_drafts`` / ``accepted_drafts`` / ``rounds``: speculative methods only, counted
  per row before truncation at EOS or ``max_new_tokens``.
* ``effective_sample_size`` / ``log_weight_spread``: sss-sir only, the importance weights
  ``w`` of a prompt's candidates: ``(sum w)^2 / sum w^2`` and the standard deviation of
  ``log w``; the total holds their means over the prompts. None for the other methods.
* ``wall_time``: seconds from the start of ``generate`` until the prompt's last row
  finished (per prompt) or until everything finished (total).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationStats:
    """Counters of one prompt, or of a whole call (``total``)."""

    target_calls: int = 0
    target_tokens: int = 0
    draft_calls: int = 0
    draft_tokens: int = 0
    ref_calls: int = 0
    ref_tokens: int = 0
    reward_calls: int = 0
    reward_sequences: int = 0
    new_tokens: int = 0
    rounds: int = 0
    proposed_drafts: int = 0
    accepted_drafts: int = 0
    wall_time: float = 0.0
    effective_sample_size: float | None = None
    log_weight_spread: float | None = None

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts (nan when nothing was proposed)."""
        return self.accepted_drafts / self.proposed_drafts if self.proposed_drafts else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per speculative round (the target emits one more)."""
        return self.accepted_drafts / self.rounds if self.rounds else float("nan")

    @property
    def target_calls_per_token(self) -> float:
        return self.target_calls / self.new_tokens if self.new_tokens else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else float("nan")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("acceptance_rate", "mean_accepted_length", "target_calls_per_token", "tokens_per_second"):
            value = getattr(self, name)
            out[name] = None if value != value else value
        return out


@dataclass
class StatsReport:
    """``total`` over the call and one :class:`GenerationStats` per prompt."""

    total: GenerationStats
    per_prompt: list[GenerationStats] = field(default_factory=list)

    def __getattr__(self, name):
        # out.stats.target_calls reads the total
        if name in ("total", "per_prompt"):
            raise AttributeError(name)
        return getattr(self.total, name)

    def to_dict(self) -> dict:
        return {"total": self.total.to_dict(), "per_prompt": [s.to_dict() for s in self.per_prompt]}


class StatsRecorder:
    """Accumulates counters while a method runs; rows map to prompts through ``prompt_of_row``.

    Per-prompt counters live in int64 tensors (no Python loop over rows); what every row of
    an unchanged batch adds (forward calls, rounds, proposed drafts) accumulates as Python
    ints and is applied once when the batch changes, so a forward call costs no tensor op.

    Shape
    -----
    prompt_of_row: (R,) int64, prompt index of every row (R rows in all, P prompts)
    """

    _COUNTERS = ("target_calls", "target_tokens", "draft_calls", "draft_tokens", "ref_calls", "ref_tokens",
                 "reward_calls", "reward_sequences", "new_tokens", "rounds", "proposed_drafts", "accepted_drafts")

    def __init__(self, num_prompts: int):
        self.num_prompts = num_prompts
        self.start = time.perf_counter()
        self.total = {name: 0 for name in self._COUNTERS}
        self.per_prompt = {name: torch.zeros(num_prompts, dtype=torch.int64) for name in self._COUNTERS}
        self.finish_time = torch.zeros(num_prompts, dtype=torch.float64)
        self.weights = {"effective_sample_size": torch.full((num_prompts,), float("nan"), dtype=torch.float64),
                        "log_weight_spread": torch.full((num_prompts,), float("nan"), dtype=torch.float64)}
        self._batch_key = None  # prompt_index of the last call (RowBook replaces it when rows leave)
        self._per_call = {}  # counter -> calls: adds once per prompt present in the batch
        self._per_row = {}  # counter -> units: adds once per row of the batch

    def _per_prompt_counts(self, prompt_index: torch.Tensor) -> torch.Tensor:
        return torch.bincount(prompt_index.cpu(), minlength=self.num_prompts)  # a no-op copy for host tensors

    def _use_batch(self, prompt_index: torch.Tensor) -> None:
        if prompt_index is self._batch_key:
            return
        self._flush()
        self._batch_key = prompt_index
        self._batch_rows = int(prompt_index.numel())
        self._batch_counts = self._per_prompt_counts(prompt_index)

    def _flush(self) -> None:
        """Apply the pending per-batch counts to the per-prompt tensors."""
        if self._batch_key is None:
            return
        present = (self._batch_counts > 0).to(torch.int64)
        for name, calls in self._per_call.items():
            self.per_prompt[name] += present * calls
        for name, units in self._per_row.items():
            self.per_prompt[name] += self._batch_counts * units
        self._per_call.clear()
        self._per_row.clear()

    def count_forward(self, role: str, prompt_index: torch.Tensor, width: int) -> None:
        """One forward call of ``role`` over ``len(prompt_index)`` rows of ``width`` positions."""
        self._use_batch(prompt_index)
        calls, tokens = f"{role}_calls", f"{role}_tokens"
        self.total[calls] += 1
        self.total[tokens] += self._batch_rows * width
        self._per_call[calls] = self._per_call.get(calls, 0) + 1
        self._per_row[tokens] = self._per_row.get(tokens, 0) + width

    def reward(self, prompt_index: torch.Tensor) -> None:
        """One reward call over ``len(prompt_index)`` sequences."""
        self.total["reward_calls"] += 1
        self.total["reward_sequences"] += int(prompt_index.numel())
        counts = self._per_prompt_counts(prompt_index)
        self.per_prompt["reward_calls"] += (counts > 0).to(torch.int64)
        self.per_prompt["reward_sequences"] += counts

    def rows(self, name: str, prompt_index: torch.Tensor, values: torch.Tensor | int) -> None:
        """Add per-row ``values`` (e.g. accepted drafts; an int: the same for every row) to counter ``name``."""
        if isinstance(values, int):
            self._use_batch(prompt_index)
            self.total[name] += self._batch_rows * values
            self._per_row[name] = self._per_row.get(name, 0) + values
            return
        prompt_index = prompt_index.cpu()
        values = values.to(device="cpu", dtype=torch.int64)
        self.total[name] += int(values.sum())
        self.per_prompt[name].index_add_(0, prompt_index, values)

    def prompts_finished(self, prompt_indices) -> None:
        now = time.perf_counter() - self.start
        for index in prompt_indices:
            self.finish_time[int(index)] = now

    def importance_weights(self, effective_sample_size: torch.Tensor, log_weight_spread: torch.Tensor) -> None:
        """Record the importance-weight summaries of every prompt (sss-sir). Shape: (P,), (P,)"""
        self.weights["effective_sample_size"] = effective_sample_size.to(device="cpu", dtype=torch.float64)
        self.weights["log_weight_spread"] = log_weight_spread.to(device="cpu", dtype=torch.float64)

    def _weight_summaries(self) -> tuple[dict, list[dict]]:
        """(means over the prompts, per-prompt values); None where nothing was recorded."""
        total, per_prompt = {}, [{} for _ in range(self.num_prompts)]
        for name, values in self.weights.items():
            recorded = ~torch.isnan(values)
            total[name] = float(values[recorded].mean()) if bool(recorded.any()) else None
            for index, value in enumerate(values.tolist()):
                per_prompt[index][name] = None if value != value else value
        return total, per_prompt

    def set_new_tokens(self, per_prompt_tokens: list[int]) -> None:
        self.per_prompt["new_tokens"] = torch.tensor(per_prompt_tokens, dtype=torch.int64)
        self.total["new_tokens"] = int(sum(per_prompt_tokens))

    def report(self) -> StatsReport:
        wall = time.perf_counter() - self.start
        self._flush()
        self._batch_key = None
        weights_total, weights_per_prompt = self._weight_summaries()
        total = GenerationStats(**self.total, **weights_total, wall_time=wall)
        columns = {name: self.per_prompt[name].tolist() for name in self._COUNTERS}
        finish = self.finish_time.tolist()
        per_prompt = [
            GenerationStats(**{name: columns[name][index] for name in self._COUNTERS}, **weights_per_prompt[index],
                            wall_time=finish[index] if finish[index] > 0 else wall)
            for index in range(self.num_prompts)
        ]
        return StatsReport(total=total, per_prompt=per_prompt)
