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
* ``wall_time``: seconds from the start of ``generate`` until the prompt's last row
  finished (per prompt) or until everything finished (total).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

ROLES = ("target", "draft", "ref")


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

    Per-prompt counters live in int64 tensors so a batched call costs a few tensor ops,
    not a Python loop over rows.

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
        self._batch_key = None  # prompt_index tensor of the last forward (RowBook replaces it when rows leave)

    def _per_prompt_counts(self, prompt_index: torch.Tensor) -> torch.Tensor:
        return torch.bincount(prompt_index.cpu(), minlength=self.num_prompts)  # a no-op copy for host tensors

    def forward(self, role: str, prompt_index: torch.Tensor, width: int) -> None:
        """One forward call of ``role`` over ``len(prompt_index)`` rows of ``width`` positions."""
        if prompt_index is not self._batch_key:  # the active rows changed: recount them once
            self._batch_key = prompt_index
            self._batch_counts = self._per_prompt_counts(prompt_index)
            self._batch_present = (self._batch_counts > 0).to(torch.int64)
        self.total[f"{role}_calls"] += 1
        self.total[f"{role}_tokens"] += int(prompt_index.numel()) * width
        self.per_prompt[f"{role}_calls"] += self._batch_present
        self.per_prompt[f"{role}_tokens"] += self._batch_counts * width

    def reward(self, prompt_index: torch.Tensor) -> None:
        """One reward call over ``len(prompt_index)`` sequences."""
        self.total["reward_calls"] += 1
        self.total["reward_sequences"] += int(prompt_index.numel())
        counts = self._per_prompt_counts(prompt_index)
        self.per_prompt["reward_calls"] += (counts > 0).to(torch.int64)
        self.per_prompt["reward_sequences"] += counts

    def rows(self, name: str, prompt_index: torch.Tensor, values: torch.Tensor | int) -> None:
        """Add per-row ``values`` (e.g. accepted drafts) to counter ``name``."""
        prompt_index = prompt_index.cpu()
        if isinstance(values, int):
            values = torch.full(prompt_index.shape, values, dtype=torch.int64)
        values = values.to(device="cpu", dtype=torch.int64)
        self.total[name] += int(values.sum())
        self.per_prompt[name].index_add_(0, prompt_index, values)

    def prompts_finished(self, prompt_indices) -> None:
        now = time.perf_counter() - self.start
        for index in prompt_indices:
            self.finish_time[int(index)] = now

    def set_new_tokens(self, per_prompt_tokens: list[int]) -> None:
        self.per_prompt["new_tokens"] = torch.tensor(per_prompt_tokens, dtype=torch.int64)
        self.total["new_tokens"] = int(sum(per_prompt_tokens))

    def report(self) -> StatsReport:
        wall = time.perf_counter() - self.start
        total = GenerationStats(**self.total, wall_time=wall)
        columns = {name: self.per_prompt[name].tolist() for name in self._COUNTERS}
        finish = self.finish_time.tolist()
        per_prompt = [
            GenerationStats(**{name: columns[name][index] for name in self._COUNTERS},
                            wall_time=finish[index] if finish[index] > 0 else wall)
            for index in range(self.num_prompts)
        ]
        return StatsReport(total=total, per_prompt=per_prompt)
