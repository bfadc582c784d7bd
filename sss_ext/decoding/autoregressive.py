"""Plain batched sampling from one model with a KV cache (vanilla, draft-only, and the baselines' sampler).

Each step is one forward of the active rows over their pending token and one fused
``sss_ext.sample`` call; rows that emit EOS or reach ``max_new_tokens`` leave the batch.
"""

from __future__ import annotations

import torch

from .. import ops
from ..warp import warp_probs
from .cache import KVState
from .context import MethodResult, RunContext
from .randomness import SAMPLING
from .roles import BY_NAME
from .rows import RowBook, left_pad


class AutoregressiveRun:
    """Sample continuations of ``prompts`` (one row each) from the model of ``role``.

    Parameters
    ----------
    ctx : RunContext
    role : {"target", "draft"}
        Which model of ``ctx.models`` samples (and under which name its forwards are counted).
    prompts : list of torch.Tensor, optional
        One 1-D int64 prompt per row; default ``ctx.prompts``.
    prompt_of_row : torch.Tensor, optional
        int64 prompt index of every row (for per-prompt stats); default one row per prompt.
    track_log_prob : bool
        Accumulate ``log warp(p)(token)`` of every sampled token in ``log_prob``.
    sample_of_row : torch.Tensor, optional
        int64 index of every row among its prompt's samples (keys its random stream); default 0.
    purpose : int
        Purpose of the rows' random streams (:mod:`sss_ext.decoding.randomness`).

    Shape
    -----
    prompts: R tensors (L_r,); prompt_of_row, sample_of_row: (R,); log_prob: (R,) float64
    """

    def __init__(self, ctx: RunContext, role: str, prompts=None, prompt_of_row=None, track_log_prob: bool = False,
                 sample_of_row=None, purpose: int = SAMPLING):
        config, models, device = ctx.config, ctx.models, ctx.device
        prompts = ctx.prompts if prompts is None else prompts
        if prompt_of_row is None:
            prompt_of_row = torch.arange(len(prompts))
        self.config = config
        self.streams = ctx.randomness.streams(prompt_of_row, sample_of_row, purpose)
        self.stats = ctx.stats
        self.role = role
        self.tracker = ctx.tracker
        self.run_index = self.tracker.new_run() if self.tracker is not None else 0
        self.step_index = 0
        self.book = RowBook(prompt_of_row, config.max_new_tokens, 1, models.eos_token_ids, device, ctx.stats, ctx.hooks)
        self.logits_hooks = ctx.hooks if ctx.hooks is not None and ctx.hooks.logits_processor is not None else None
        self.state = KVState(models.get(role), role, self._record, BY_NAME[role].argument, len(prompts), device, ctx.clock)
        self.track_log_prob = track_log_prob
        self.log_prob = torch.zeros(len(prompts), dtype=torch.float64, device=device)
        ids, mask = left_pad(prompts, models.pad_token_id, device)
        if ids.shape[1] > 1:
            self.state.forward(ids[:, :-1], mask[:, :-1])
        self.pending = ids[:, -1]
        if self.tracker is not None:
            self.tracker.emit("prefill", self.run_index, role, -1, self.book.active.cpu(), self.book.active_prompts.clone(),
                              states=(self.state,))

    def _record(self, role: str, width: int, seconds: float | None = None) -> None:
        prompts = self.book.active_prompts
        self.stats.forward(role, prompts, width)
        if self.tracker is not None:
            self.tracker.forward(role, int(prompts.numel()), width, seconds)

    def step(self) -> None:
        """One token for every active row."""
        config = self.config
        tracker = self.tracker
        if tracker is not None:
            rows, row_prompts = self.book.active.cpu(), self.book.active_prompts.clone()
        logits = self.state.forward(self.pending[:, None])[:, -1]
        if self.logits_hooks is not None:
            logits = self.logits_hooks.process(self.book, [], logits[:, None])[:, 0]
        uniforms = self.streams.draw(self.book.active, 1)[:, 0]
        if tracker is None:
            token = ops.sample(logits, config.temperature, config.top_k, config.top_p, uniforms=uniforms,
                               top_k_ties=config.top_k_ties)
        else:
            token = tracker.timed_op(ops.sample, logits, config.temperature, config.top_k, config.top_p, uniforms=uniforms,
                                     top_k_ties=config.top_k_ties)
        if self.track_log_prob:
            probs = warp_probs(logits, config.temperature, config.top_k, config.top_p, top_k_ties=config.top_k_ties)
            self.log_prob[self.book.active] += torch.log(probs.gather(1, token[:, None]).squeeze(1))
        kept, done = self.book.append(token[:, None])
        self.pending = token
        self._remove(done)
        if tracker is not None:
            tracker.emit("step", self.run_index, self.role, self.step_index, rows, row_prompts, states=(self.state,),
                         logits={self.role: logits}, tokens=token[:, None], num_emitted=kept, finished=done)
        self.step_index += 1

    def _remove(self, leaving: torch.Tensor) -> None:
        stay = self.book.remove(leaving)
        if stay is not None:
            self.state.select_rows(stay)
            self.pending = self.pending[stay]

    def drop(self, row_ids: torch.Tensor) -> None:
        """Stop the active rows ``row_ids`` (they keep what they generated, unfinished)."""
        self._remove(torch.isin(self.book.active, row_ids.to(self.book.active.device)))

    def run(self, max_steps: int | None = None) -> None:
        """Step until every row finished, or ``max_steps`` steps."""
        steps = 0
        while self.book.num_active and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1


def run_autoregressive(ctx: RunContext, role: str) -> MethodResult:
    """vanilla (``role="target"``) and draft-only (``role="draft"``) sampling."""
    run = AutoregressiveRun(ctx, role)
    run.run()
    return MethodResult(sequences=run.book.sequences(), extras=[{} for _ in ctx.prompts])
