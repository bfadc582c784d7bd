"""What a speculative and an autoregressive run share, written once (:class:`SamplerRun`).

The rows (:class:`~sss_ext.decoding.rows.RowBook`), their random streams, the logits
processors, the run's monitor (:mod:`sss_ext.decoding.monitor`), one KV cache per model
role, the prefill of the prompts, the fused ``sss_ext.sample`` draw and the removal of
finished rows. A subclass names its caches (``states``) and defines one ``round``.
"""

from __future__ import annotations

import torch

from .. import ops
from .cache import KVState
from .context import RunContext
from .randomness import SAMPLING
from .roles import BY_NAME
from .rows import RowBook, left_pad


class SamplerRun:
    """Rows of ``prompts`` sampled together; subclasses define ``states`` and ``round``.

    Parameters
    ----------
    ctx : RunContext
    sampler : str
        The name of the run in observer records (``"speculative"`` or the sampling role).
    prompts : list of torch.Tensor, optional
        One 1-D int64 prompt per row; default ``ctx.prompts``.
    prompt_of_row : torch.Tensor, optional
        int64 prompt index of every row (for per-prompt stats); default one row per prompt.
    sample_of_row : torch.Tensor, optional
        int64 index of every row among its prompt's samples (keys its random stream); default 0.
    spare : int
        Tokens a round may offer a row (the row book's spare room).
    purpose : int
        Purpose of the rows' random streams (:mod:`sss_ext.decoding.randomness`).
    cost_meter : RoundCostMeter, optional
        Also listens to the run's monitor.

    Shape
    -----
    prompts: B tensors (L_b,); prompt_of_row, sample_of_row: (B,); pending: (B,) the last token of every active row
    """

    def __init__(self, ctx: RunContext, sampler: str, prompts=None, prompt_of_row=None, sample_of_row=None, spare: int = 1,
                 purpose: int = SAMPLING, cost_meter=None):
        config, models, device = ctx.config, ctx.models, ctx.device
        self.ctx = ctx
        self.config = config
        self.prompts = ctx.prompts if prompts is None else prompts
        if prompt_of_row is None:
            prompt_of_row = torch.arange(len(self.prompts))
        self.book = RowBook(prompt_of_row, config.max_new_tokens, spare, models.eos_token_ids, device, ctx.stats, ctx.hooks)
        self.streams = ctx.randomness.streams(prompt_of_row, sample_of_row, purpose)
        self.logits_hooks = ctx.hooks if ctx.hooks is not None and ctx.hooks.logits_processor is not None else None
        self.monitor = ctx.monitor.run(sampler, self.book, cost_meter)
        self.pending = None
        self.rounds = 0  # rounds run so far, over every call of ``run``

    @property
    def states(self) -> list[KVState]:
        """The run's KV caches (subclasses)."""
        raise NotImplementedError

    def kv_state(self, role: str) -> KVState:
        """A KV cache of the model of ``role`` over the run's rows, reporting its forwards to the monitor."""
        return KVState(self.ctx.models.get(role), role, self.monitor.model_call, BY_NAME[role].argument, len(self.prompts),
                       self.ctx.device, self.monitor.clock)

    def prefill(self) -> None:
        """Feed every prompt but its last token to every cache; the last token is ``pending``."""
        ids, mask = left_pad(self.prompts, self.ctx.models.pad_token_id, self.ctx.device)
        for state in self.states:
            if ids.shape[1] > 1:
                state.forward(ids[:, :-1], mask[:, :-1])
        self.pending = ids[:, -1]
        self.monitor.prefill(self.states)

    def processed(self, prefix_tokens: list, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` after the logits processors (unchanged without any); position ``i`` of the
        block follows the prefix that ends with ``prefix_tokens[:i]``.

        Shape
        -----
        prefix_tokens: i tensors (B,); logits: (B, W, V) -> (B, W, V)
        """
        if self.logits_hooks is None:
            return logits
        return self.logits_hooks.process(self.book, prefix_tokens, logits)

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """One token per row from ``warp(logits)`` with the config's sampling settings.

        Shape
        -----
        logits: (B, V); uniforms: (B,) -> (B,) int64
        """
        config = self.config
        return self.monitor.op(ops.sample, logits, config.temperature, config.top_k, config.top_p, uniforms=uniforms,
                               top_k_ties=config.top_k_ties)

    def remove(self, leaving: torch.Tensor) -> None:
        """Rows marked in ``leaving`` leave the batch (the book, every cache, ``pending``, :meth:`keep_rows`)."""
        stay = self.book.remove(leaving)
        if stay is not None:
            for state in self.states:
                state.select_rows(stay)
            self.pending = self.pending[stay]
            self.keep_rows(stay)

    def keep_rows(self, stay: torch.Tensor) -> None:
        """Per-row state of a subclass follows the rows that stay. Shape: stay (B',) int64"""

    def round(self) -> None:
        raise NotImplementedError

    def run(self, max_rounds: int | None = None) -> None:
        """Rounds until every row finished, or ``max_rounds`` rounds.

        Every round emits at least one token per active row, so a run finishes within
        ``max_new_tokens`` rounds; a round that emitted nothing for a row raises instead of looping.
        """
        rounds = 0
        while self.book.num_active and (max_rounds is None or rounds < max_rounds):
            if self.rounds >= self.book.max_new_tokens:
                raise RuntimeError(
                    f"{type(self).__name__}: rows still active after {self.rounds} rounds with max_new_tokens = "
                    f"{self.book.max_new_tokens}: a round emitted no token for some row (each must emit at least one)"
                )
            self.round()
            rounds += 1
            self.rounds += 1
