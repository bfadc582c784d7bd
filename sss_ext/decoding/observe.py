"""Observing the decoding loop: one :class:`RoundRecord` per round, handed to ``generate(..., observer=...)``.

An observer is a callable ``observer(record)`` or an object with ``on_round(record)``
(:class:`Observer`). It sees, for every round of every sampler run of the call,

* ``kind``: ``"prefill"`` (the prompts fed before the first round), ``"round"`` (one
  speculative round: draft steps, one target / reference forward, ``sss_ext.verify``),
  ``"step"`` (one token of plain autoregressive sampling) or ``"score"`` (soft best-of-n's
  batched target forward that scores the candidates);
* the forward passes of every model in it (:class:`ForwardCount`: batched calls, row-forwards
  = rows x calls, positions fed);
* the sampler op's inputs and outputs: draft tokens, the logits given to ``sss_ext.verify`` /
  ``sss_ext.sample``, the :class:`~sss_ext.outputs.VerifyOutput` (per-position ``log_z``,
  ``num_accepted``), the tokens offered and how many each row kept (cut at EOS / budget);
* the rows of the batch, which prompt each belongs to, which rows finished, and the state
  of every KV cache after the round.

Timing is opt-in: when the observer has a ``clock`` attribute (a zero-argument callable
returning seconds, e.g. ``time.perf_counter`` or ``time.thread_time``), the loop reads it
around every model forward and every sampler-op call (``sss_ext.sample`` / ``sss_ext.verify``:
argument checks, uniforms, kernel) and reports ``ForwardCount.seconds`` and
``RoundRecord.op_seconds``. Without an observer nothing is recorded and nothing is timed.

Records hold references to the round's tensors (logits included); an observer that keeps
records for long should drop what it does not need (:class:`RecordingObserver` drops the
logits unless ``keep_logits=True``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

KINDS = ("prefill", "round", "step", "score")


@dataclass
class ForwardCount:
    """Forward passes of one model within one record.

    ``calls``: batched forward invocations; ``row_calls``: rows x calls (what an unbatched
    implementation would run); ``tokens``: positions fed, rows x width, padding included;
    ``seconds``: time inside the forwards on the observer's clock (None when untimed).
    """

    calls: int = 0
    row_calls: int = 0
    tokens: int = 0
    seconds: float | None = None


@dataclass
class CacheInfo:
    """One model's KV cache after a round.

    ``slots``: columns of the slot mask (cache width); ``stored``: the cache's own sequence
    length (equals ``slots``); ``lengths``: valid tokens per row of the remaining batch, so
    ``slots - lengths.max()`` are holes or padding.

    Shape
    -----
    lengths: (B',) int64
    """

    slots: int
    stored: int
    lengths: torch.Tensor


@dataclass
class RoundRecord:
    """What one round of the decoding loop did.

    Attributes
    ----------
    method : str
        The :func:`sss_ext.generate` method.
    kind : {"prefill", "round", "step", "score"}
    run : int
        Which sampler run of the call (0, 1, ...): best-of-N's one target run, soft best-of-n's
        draft run then its target fallback run, ...
    sampler : str
        ``"speculative"`` or the role of the model sampling autoregressively (``"target"`` / ``"draft"``).
    index : int
        Round (speculative) or step (autoregressive) number within the run, from 0; -1 for
        ``prefill`` and ``score`` records.
    rows : torch.Tensor
        int64 ids of the rows of the batch (rows keep their id for the whole run; a method
        with N samples per prompt has N rows per prompt).
    prompts : torch.Tensor
        int64 prompt index of every row of the batch.
    forwards : dict of str to ForwardCount
        Per model role (``"target"``, ``"draft"``, ``"ref"``) that ran in this record.
    op_seconds : float or None
        Time inside ``sss_ext.sample`` / ``sss_ext.verify`` (observer clock), None when untimed.
    draft_tokens : torch.Tensor or None
        Speculative rounds: the proposed drafts.
    num_draft_tokens : torch.Tensor or None
        Speculative rounds: the drafts each row verified (``num_draft_tokens`` of
        ``sss_ext.verify``; fewer than ``K'`` under a short budget, the adaptive draft-length
        policy or the n-gram proposer); None: all ``K'``.
    logits : dict of str to torch.Tensor
        Inputs of the sampler op: a round's ``target`` / ``draft`` / ``ref`` logits exactly as
        given to ``sss_ext.verify`` (with the n-gram proposer ``draft`` is ``r``'s
        ``aligned_logits`` under sss and absent under sd); a step's logits of the sampling
        model (key: its role).
    verify : VerifyOutput or None
        Speculative rounds: the op's output (``tokens``, ``num_accepted``, per-position ``log_z``).
    tokens : torch.Tensor or None
        Tokens offered to each row: ``verify.tokens`` (-1 after the correction/bonus token) or
        the sampled token.
    num_emitted : torch.Tensor or None
        Tokens each row kept from ``tokens`` (cut after EOS and at ``max_new_tokens``).
    finished : torch.Tensor or None
        bool, rows that finished in this round (they leave the batch).
    carried : torch.Tensor or None
        Standard speculative sampling: rows whose first draft step fed the carried last draft
        of the previous round (a width-2 step).
    tree_parents : torch.Tensor or None
        Tree rounds (``SamplingConfig.draft_tree``): the parent of every node (-1 at the root);
        ``draft_tokens`` then holds every node's token (the root's is the pending token),
        ``verify`` is a ``TreeVerifyOutput`` and the logits are per node.
    caches : dict of str to CacheInfo
        Every KV cache of the run after the round (finished rows already removed).

    Shape
    -----
    rows, prompts, num_emitted, finished, carried: (B,); draft_tokens: (B, K') chain, (B, N) tree;
    tree_parents: (N,);
    logits (round): target / ref (B, K'+1, V), draft (B, K' or K'+1, V); logits (step): (B, V);
    tokens: (B, K'+1) round, (B, 1) step
    """

    method: str
    kind: str
    run: int
    sampler: str
    index: int
    rows: torch.Tensor
    prompts: torch.Tensor
    forwards: dict[str, ForwardCount] = field(default_factory=dict)
    op_seconds: float | None = None
    draft_tokens: torch.Tensor | None = None
    num_draft_tokens: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None
    verify: object | None = None
    tokens: torch.Tensor | None = None
    num_emitted: torch.Tensor | None = None
    finished: torch.Tensor | None = None
    carried: torch.Tensor | None = None
    tree_parents: torch.Tensor | None = None
    caches: dict[str, CacheInfo] = field(default_factory=dict)

    @property
    def emitted_log_z(self) -> torch.Tensor | None:
        """``log_z`` at the positions the op emitted (accepted drafts + correction/bonus), flattened.

        Shape: -> (sum_b num_accepted[b] + 1,) float32, or None without a verify output
        """
        if self.verify is None:
            return None
        log_z = self.verify.log_z
        position = torch.arange(log_z.shape[1], device=log_z.device)
        return log_z[position[None, :] <= self.verify.num_accepted[:, None]]


class Observer:
    """Base class of observers: override :meth:`on_round`; set ``clock`` to get timings."""

    #: zero-argument callable returning seconds (e.g. ``time.perf_counter``); None: no timing
    clock: Callable[[], float] | None = None

    def on_round(self, record: RoundRecord) -> None:  # pragma: no cover - meant to be overridden
        pass

    def __call__(self, record: RoundRecord) -> None:
        self.on_round(record)


class RecordingObserver(Observer):
    """Keeps every record (logits dropped unless ``keep_logits``) and sums what they count.

    Parameters
    ----------
    clock : callable or None
        Turns timing on (see the module docstring).
    keep_logits : bool
        Keep ``record.logits`` (memory: B x K x V floats per round).
    """

    def __init__(self, clock: Callable[[], float] | None = None, keep_logits: bool = False):
        self.clock = clock
        self.keep_logits = keep_logits
        self.records: list[RoundRecord] = []

    def on_round(self, record: RoundRecord) -> None:
        if not self.keep_logits:
            record = dataclasses.replace(record, logits=None)
        self.records.append(record)

    def reset(self) -> None:
        self.records.clear()

    def rounds(self) -> list[RoundRecord]:
        """The speculative rounds."""
        return [r for r in self.records if r.kind == "round"]

    def forward_total(self, role: str, field_name: str = "calls"):
        """Sum of ``ForwardCount.<field_name>`` of ``role`` over every record (seconds: 0.0 when untimed)."""
        values = [getattr(r.forwards[role], field_name) for r in self.records if role in r.forwards]
        if field_name == "seconds":
            return float(sum(v for v in values if v is not None))
        return sum(values)

    def op_seconds(self) -> float:
        return float(sum(r.op_seconds for r in self.records if r.op_seconds is not None))


def as_observer(observer) -> tuple[Callable[[RoundRecord], None], Callable[[], float] | None]:
    """(callback, clock) of an observer argument; ``ValueError`` naming ``observer`` otherwise."""
    on_round = getattr(observer, "on_round", None)
    if on_round is None:
        on_round = observer
    if not callable(on_round):
        raise ValueError(f"observer must be callable(record) or have on_round(record), got {type(observer).__name__}")
    clock = getattr(observer, "clock", None)
    if clock is not None and not callable(clock):
        raise ValueError(f"observer.clock must be a callable returning seconds or None, got {type(clock).__name__}")
    return on_round, clock


class Tracker:
    """Collects one round's forwards and op time and emits its :class:`RoundRecord` (only built with an observer)."""

    def __init__(self, observer, method: str):
        self.on_round, self.clock = as_observer(observer)
        self.method = method
        self.runs = 0
        self._forwards: dict[str, ForwardCount] = {}
        self._op_seconds = 0.0

    def new_run(self) -> int:
        """Number of a new sampler run of the call."""
        self.runs += 1
        return self.runs - 1

    def add_forward(self, role: str, rows: int, width: int, seconds: float | None) -> None:
        """A forward of ``role`` over ``rows`` rows of ``width`` positions, into the record in progress."""
        count = self._forwards.get(role)
        if count is None:
            count = self._forwards[role] = ForwardCount(seconds=None if self.clock is None else 0.0)
        count.calls += 1
        count.row_calls += rows
        count.tokens += rows * width
        if seconds is not None:
            count.seconds += seconds

    def timed_op(self, function, *args, **kwargs):
        """``function(*args, **kwargs)``, its time added to the round's op time when a clock is set."""
        if self.clock is None:
            return function(*args, **kwargs)
        start = self.clock()
        try:
            return function(*args, **kwargs)
        finally:
            self._op_seconds += self.clock() - start

    def emit(self, kind: str, run: int, sampler: str, index: int, rows: torch.Tensor, prompts: torch.Tensor,
             states=(), **fields) -> None:
        """Hand the record of what ran since the last one to the observer, then start a new one."""
        caches = {
            state.role: CacheInfo(slots=state.width, stored=int(state.cache.get_seq_length()), lengths=state.lengths.clone())
            for state in states
        }
        record = RoundRecord(method=self.method, kind=kind, run=run, sampler=sampler, index=index, rows=rows, prompts=prompts,
                             forwards=self._forwards, op_seconds=None if self.clock is None else self._op_seconds,
                             caches=caches, **fields)
        self._forwards = {}
        self._op_seconds = 0.0
        self.on_round(record)
