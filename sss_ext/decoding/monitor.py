"""The one monitor of a decoding run: what the samplers report, and who listens.

A sampler run (:class:`~sss_ext.decoding.speculative.SpeculativeRun`,
:class:`~sss_ext.decoding.autoregressive.AutoregressiveRun`, soft best-of-n's scoring pass)
reports to one :class:`RunMonitor`:

* ``model_call(role, width, seconds)``: a batched forward of one model over the active rows
  (the KV caches call it; ``seconds`` on the observer's clock, None when untimed);
* ``op(function, *args)``: a sampler-op call (``sss_ext.sample`` / ``sss_ext.verify``), timed
  when the observer has a clock;
* ``round_started()``, ``drafted(steps)``, ``verified(proposed, accepted)``,
  ``round_finished(kind, width, states, **fields)``: the seams of a round (``prefill(states)``
  before the first).

Its listeners are the call's :class:`~sss_ext.decoding.stats.StatsRecorder` (always: the
forward counters of ``GenerateOutput.stats``), the observer's
:class:`~sss_ext.decoding.observe.Tracker` (only with ``generate(..., observer=...)``: the
:class:`~sss_ext.decoding.observe.RoundRecord` of every round) and, for a speculative run
under the adaptive draft-length policy, the
:class:`~sss_ext.decoding.draft_length.RoundCostMeter` (the wall time of the draft steps and
of the rest of each round). Without an observer and a cost meter a report costs a counter
update and nothing is timed.
"""

from __future__ import annotations

import torch

from .observe import Tracker
from .stats import StatsRecorder


class CallMonitor:
    """What one :func:`sss_ext.generate` call's runs report to: the stats and, optionally, the observer.

    Parameters
    ----------
    stats : StatsRecorder
    tracker : Tracker, optional
        The observer's record builder; None without an observer.
    """

    def __init__(self, stats: StatsRecorder, tracker: Tracker | None = None):
        self.stats = stats
        self.tracker = tracker

    @property
    def clock(self):
        """The observer's clock when it asked for timings, else None."""
        return self.tracker.clock if self.tracker is not None else None

    def run(self, sampler: str, book, cost_meter=None) -> "RunMonitor":
        """The monitor of a new sampler run over ``book``'s active rows."""
        return RunMonitor(self, sampler, book, cost_meter)

    def scoring_pass(self, role: str, rows: int, prompt_of_row: torch.Tensor, width: int, seconds: float | None,
                     **fields) -> None:
        """A batched forward outside any sampler run (soft best-of-n's scoring), as its own record.

        Shape
        -----
        prompt_of_row: (rows,) int64
        """
        self.stats.count_forward(role, prompt_of_row, width)
        if self.tracker is not None:
            self.tracker.add_forward(role, rows, width, seconds)
            self.tracker.emit("score", self.tracker.new_run(), role, -1, torch.arange(rows), prompt_of_row.clone(), **fields)


class RunMonitor:
    """One sampler run's reports, handed to the stats, the observer and the cost meter.

    Parameters
    ----------
    call : CallMonitor
    sampler : str
        ``"speculative"`` or the sampling model's role (the records' ``sampler``).
    book : RowBook
        The run's rows; its ``active`` / ``active_prompts`` are read at each report.
    cost_meter : RoundCostMeter, optional
        Listens to the round seams (the adaptive draft-length policy's measured costs).
    """

    def __init__(self, call: CallMonitor, sampler: str, book, cost_meter=None):
        self.stats = call.stats
        self.tracker = call.tracker
        self.clock = call.clock
        self.sampler = sampler
        self.book = book
        self.cost_meter = cost_meter
        self.run_index = self.tracker.new_run() if self.tracker is not None else 0
        self.index = 0  # of the next round / step
        self._rows = None  # the rows and their prompts when the round started (observed runs only)

    def model_call(self, role: str, width: int, seconds: float | None = None) -> None:
        """A batched forward of ``role`` over the active rows, ``width`` positions each."""
        prompts = self.book.active_prompts
        self.stats.count_forward(role, prompts, width)
        if self.tracker is not None:
            self.tracker.add_forward(role, int(prompts.numel()), width, seconds)

    def op(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` (a sampler op), timed for the observer when it has a clock."""
        if self.tracker is None:
            return function(*args, **kwargs)
        return self.tracker.timed_op(function, *args, **kwargs)

    def prefill(self, states) -> None:
        """The prompts were fed to ``states`` (before the first round)."""
        if self.tracker is not None:
            self.tracker.emit("prefill", self.run_index, self.sampler, -1, self.book.active.cpu(),
                              self.book.active_prompts.clone(), states=tuple(states))

    def round_started(self, **extra) -> None:
        """A round (or step) begins over the active rows; ``extra`` tensors are kept for its record."""
        if self.tracker is not None:
            self._rows = (self.book.active.cpu(), self.book.active_prompts.clone(),
                          {name: value.clone() for name, value in extra.items()})
        if self.cost_meter is not None:
            self.cost_meter.round_started()

    def drafted(self, steps: int) -> None:
        """The round's ``steps`` draft steps are done (the rest of the round follows)."""
        if self.cost_meter is not None:
            self.cost_meter.drafted(steps)

    def verified(self, proposed: torch.Tensor, accepted: torch.Tensor) -> None:
        """A speculative round's verification: ``proposed`` drafts per row, ``accepted`` of them.

        Shape
        -----
        proposed, accepted: (B,) int64
        """
        prompts = self.book.active_prompts
        self.stats.rows("rounds", prompts, 1)
        self.stats.rows("proposed_drafts", prompts, proposed)
        self.stats.rows("accepted_drafts", prompts, accepted)

    def round_finished(self, kind: str, width: int, states, **fields) -> None:
        """The round (``kind`` ``"round"`` or ``"step"``) that verified ``width`` positions is done."""
        if self.tracker is not None:
            rows, prompts, extra = self._rows
            self._rows = None
            self.tracker.emit(kind, self.run_index, self.sampler, self.index, rows, prompts, states=tuple(states),
                              **extra, **fields)
        self.index += 1
        if self.cost_meter is not None:
            self.cost_meter.round_finished(width)
