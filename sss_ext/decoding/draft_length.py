"""Per-row draft lengths for speculative rounds: the fixed ``K`` or an adaptive choice.

The adaptive policy keeps, per row, the accepted drafts and the rejections it has seen
(with a prior worth ``PRIOR_ROUNDS`` rounds at acceptance ``PRIOR_ACCEPTANCE``). Under a
geometric model where each draft is accepted with the row's rate ``alpha`` until the first
rejection, ``k`` drafts emit ``E[accepted + 1] = (1 - alpha**(k+1)) / (1 - alpha)``
tokens. The batch's draft steps and verifying forwards run ``K' = max_b k_b`` positions for
every row, so a row verifying fewer than ``K'`` would save nothing and lose tokens: the
policy picks one ``K'`` per round, the one with the most expected tokens of all rows per
unit round cost (for one row: that row's own best ``k``), and each row verifies
``min(K', its remaining budget - 1)``. A round costs ``(k + extra) * c_draft + c_round + c_position * (k + 1)``
(``extra``: draft steps run whatever ``k`` is, 1 for SSS's ``zr[k]``; ``c_round +
c_position * width``: the rest of the round, verifying forward(s) over ``width = k + 1``
positions, the op, cache rollback and bookkeeping), ``k`` in ``[1, num_draft_tokens]``. With
``SamplingConfig.draft_cost_ratio`` the costs are ``(ratio, 1, 0)``; when that is None they
are measured from the run's own wall-clock times: the mean time of a draft step, and a
least-squares line of the rest of the round against its width, both over the recent rounds
(weights decaying by ``COST_DECAY`` per round), by a :class:`RoundCostMeter` that listens
to the run's monitor (:mod:`sss_ext.decoding.monitor`). On CUDA the times are CUDA events on
the current stream, read once a later round's host sync has completed them (the meter adds
no sync of its own); on CPU they are ``time.perf_counter``. :class:`DraftLengths` itself is
the policy only: ``choose`` a round's per-row counts, ``update`` with what was accepted,
``select_rows`` when rows leave.

Any ``k`` fixed before a round's drafts are drawn keeps the output law (each round is an
exact speculative round with that row's ``k``, docs/algorithm.md §6), so the policy changes
speed only.
"""

from __future__ import annotations

import time
from collections import deque

import torch

PRIOR_ACCEPTANCE = 0.5
PRIOR_ROUNDS = 2.0
# Weight of a round's timings in the measured costs, per later round.
COST_DECAY = 0.8


def expected_tokens(acceptance: torch.Tensor, num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """``E[accepted + 1]`` of a round of ``k`` drafts each accepted with probability ``alpha``.

    Shape
    -----
    acceptance: (B, 1); num_draft_tokens: (N,) -> (B, N)
    """
    powers = acceptance ** (num_draft_tokens + 1).to(acceptance.dtype)
    geometric = (1.0 - powers) / (1.0 - acceptance).clamp(min=1e-12)
    return torch.where(acceptance >= 1.0, (num_draft_tokens + 1).to(acceptance.dtype), geometric)


def round_costs(num_draft_tokens: torch.Tensor, costs: tuple[float, float, float], extra_draft_steps: int) -> torch.Tensor:
    """Cost of a round of ``k`` drafts: ``(k + extra) * c_draft + c_round + (k + 1) * c_position``.

    Shape
    -----
    num_draft_tokens: (N,) int64 -> (N,) float64
    """
    draft_cost, round_cost, position_cost = costs
    steps = num_draft_tokens.to(torch.float64)
    return (steps + extra_draft_steps) * draft_cost + round_cost + (steps + 1.0) * position_cost


def best_draft_length(acceptance: torch.Tensor, max_draft_tokens: int, costs: tuple[float, float, float],
                      extra_draft_steps: int) -> int:
    """The ``k`` in ``[1, max_draft_tokens]`` maximising the rows' expected tokens per unit round cost.

    Parameters
    ----------
    acceptance : torch.Tensor
        float64 per-row acceptance rates in ``[0, 1]``.
    max_draft_tokens : int
        Largest ``k`` (``>= 1``).
    costs : (float, float, float)
        ``(c_draft, c_round, c_position)``, each ``>= 0`` with ``c_round + c_position > 0``:
        a draft step, the fixed rest of a round, and each verified position.
    extra_draft_steps : int
        Draft steps a round runs besides its ``k`` proposals.

    Shape
    -----
    acceptance: (B,), B >= 1
    """
    lengths = torch.arange(1, max_draft_tokens + 1, dtype=torch.int64, device=acceptance.device)
    tokens = expected_tokens(acceptance[:, None], lengths).sum(dim=0)  # (max_draft_tokens,)
    # argmax picks the first maximum: the shortest k among equals
    return int(lengths[torch.argmax(tokens / round_costs(lengths, costs, extra_draft_steps))])


class DraftLengths:
    """Draft tokens per row for each round: the policy (choose, update, select_rows).

    Parameters
    ----------
    config : SamplingConfig
        ``num_draft_tokens`` (``K``), ``draft_length_policy``, ``draft_cost_ratio``.
    batch_size : int
        Rows at the start of the run.
    extra_draft_steps : int
        Draft steps a round runs besides its proposals (1 for SSS, 0 for standard SD).
    device : torch.device
    meter : RoundCostMeter, optional
        Measured round costs (used when ``draft_cost_ratio`` is None); see :meth:`measures`.

    Shape
    -----
    accepted, rejected: (B,) float64 counts of the active rows (prior included)
    """

    def __init__(self, config, batch_size: int, extra_draft_steps: int, device, meter: "RoundCostMeter | None" = None):
        self.max_draft_tokens = config.num_draft_tokens
        self.adaptive = config.draft_length_policy == "adaptive"
        self.fixed_ratio = config.draft_cost_ratio
        self.extra_draft_steps = extra_draft_steps
        self.meter = meter
        self.accepted = torch.full((batch_size,), PRIOR_ACCEPTANCE * PRIOR_ROUNDS, dtype=torch.float64, device=device)
        self.rejected = torch.full((batch_size,), (1.0 - PRIOR_ACCEPTANCE) * PRIOR_ROUNDS, dtype=torch.float64, device=device)

    @staticmethod
    def measures(config) -> bool:
        """Whether the policy of ``config`` reads measured costs (adaptive, no ``draft_cost_ratio``)."""
        return config.draft_length_policy == "adaptive" and config.draft_cost_ratio is None

    @property
    def acceptance(self) -> torch.Tensor:
        """Per-row acceptance estimate. Shape: -> (B,) float64"""
        return self.accepted / (self.accepted + self.rejected)

    @property
    def costs(self) -> tuple[float, float, float]:
        """``(c_draft, c_round, c_position)``: given by the ratio, else measured (``(0, 1, 0)`` before any round)."""
        if self.fixed_ratio is not None:
            return self.fixed_ratio, 1.0, 0.0
        return self.meter.costs if self.meter is not None else (0.0, 1.0, 0.0)

    def choose(self, remaining: torch.Tensor) -> torch.Tensor:
        """Per-row draft counts of the next round: ``min(K', remaining - 1)`` with ``K' = K`` (fixed
        policy) or the adaptive choice, so no row drafts past its own budget.

        Shape
        -----
        remaining: (B,) tokens each row may still emit -> (B,) int64 in [0, K]
        """
        length = self.max_draft_tokens
        if self.adaptive:
            length = best_draft_length(self.acceptance, self.max_draft_tokens, self.costs, self.extra_draft_steps)
        return (remaining - 1).clamp(min=0, max=length)

    def update(self, num_draft_tokens: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Counts a round: ``num_accepted`` of ``num_draft_tokens`` drafts, a rejection when short.

        Shape
        -----
        num_draft_tokens, num_accepted: (B,) int64
        """
        if not self.adaptive:
            return
        self.accepted += num_accepted.to(torch.float64)
        self.rejected += (num_accepted < num_draft_tokens).to(torch.float64)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the rows that stay in the batch. Shape: rows (B',) int64"""
        self.accepted = self.accepted[rows]
        self.rejected = self.rejected[rows]


class RoundCostMeter:
    """The measured costs of a speculative run's rounds: times of the draft steps and of the rest.

    Listens to the run monitor's round seams (``round_started``, ``drafted``,
    ``round_finished``); a round's times are read once its marks completed (at a later round's
    start or end), so the meter never waits for the device.

    Parameters
    ----------
    device : torch.device
        CUDA: CUDA events on the current stream; otherwise host time.
    """

    def __init__(self, device):
        self._clock = CudaClock(device) if torch.device(device).type == "cuda" else WallClock()
        # decayed sums over rounds: weight, draft seconds per step, width, rest seconds, width^2, width * rest
        self._sums = [0.0] * 6
        self._marks = None  # (start, drafted, steps) of the round in progress
        self._pending = deque()  # (start, drafted, end, steps, width) of rounds not yet read

    @property
    def costs(self) -> tuple[float, float, float]:
        """``(c_draft, c_round, c_position)`` from the rounds read so far (``(0, 1, 0)`` before any)."""
        weight, draft, width, rest, width_squared, width_rest = self._sums
        if weight == 0.0:
            return 0.0, 1.0, 0.0
        mean_width, mean_rest = width / weight, rest / weight
        variance = width_squared / weight - mean_width**2
        slope = (width_rest / weight - mean_width * mean_rest) / variance if variance > 1e-9 else 0.0
        slope = max(slope, 0.0)
        intercept = mean_rest - slope * mean_width
        if intercept < 0.0:  # proportional to the width
            intercept, slope = 0.0, width_rest / width_squared
        return draft / weight, intercept, slope

    def round_started(self) -> None:
        """The round begins (its draft steps come first)."""
        self._read_finished_rounds()
        self._marks = (self._clock.mark(),)

    def drafted(self, steps: int) -> None:
        """The round's ``steps`` draft steps are done."""
        if self._marks is not None:
            self._marks = (self._marks[0], self._clock.mark(), steps)

    def round_finished(self, width: int) -> None:
        """The round, which verified ``width`` positions, is done."""
        if self._marks is None:
            return
        start, drafted, steps = self._marks
        self._marks = None
        if steps > 0:
            self._pending.append((start, drafted, self._clock.mark(), steps, width))
            self._read_finished_rounds()

    def _read_finished_rounds(self) -> None:
        """Adds the rounds whose marks have completed to the measured costs."""
        while self._pending and self._clock.ready(self._pending[0][2]):
            start, drafted, end, steps, width = self._pending.popleft()
            step_seconds = self._clock.seconds(start, drafted) / steps
            rest_seconds = self._clock.seconds(drafted, end)
            new = (1.0, step_seconds, width, rest_seconds, width * width, width * rest_seconds)
            self._sums = [COST_DECAY * old + value for old, value in zip(self._sums, new)]


class WallClock:
    """Host time marks (CPU rounds run synchronously)."""

    def mark(self) -> float:
        return time.perf_counter()

    def ready(self, mark: float) -> bool:
        return True

    def seconds(self, begin: float, end: float) -> float:
        return end - begin


class CudaClock:
    """CUDA events on the device's current stream: marks cost no sync, and are read once completed."""

    def __init__(self, device):
        self.device = torch.device(device)

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def ready(self, mark: torch.cuda.Event) -> bool:
        return mark.query()

    def seconds(self, begin: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return begin.elapsed_time(end) / 1000.0
