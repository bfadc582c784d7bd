"""Plain batched sampling from one model with a KV cache (vanilla, draft-only, and the baselines' sampler).

Each step is one forward of the active rows over their pending token and one fused
``sss_ext.sample`` call; rows that emit EOS or reach ``max_new_tokens`` leave the batch.
"""

from __future__ import annotations

import torch

from ..warp import warp_probs
from .context import MethodResult, RunContext
from .randomness import SAMPLING
from .sampler_run import SamplerRun


class AutoregressiveRun(SamplerRun):
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
        super().__init__(ctx, role, prompts, prompt_of_row, sample_of_row, spare=1, purpose=purpose)
        self.role = role
        self.state = self.kv_state(role)
        self.track_log_prob = track_log_prob
        self.log_prob = torch.zeros(len(self.prompts), dtype=torch.float64, device=ctx.device)
        self.prefill()

    @property
    def states(self):
        return [self.state]

    def round(self) -> None:
        """One token for every active row (a step)."""
        config = self.config
        self.monitor.round_started()
        logits = self.processed([], self.state.forward(self.pending[:, None])[:, -1:])[:, 0]
        token = self.sample(logits, self.streams.draw(self.book.active, 1)[:, 0])
        if self.track_log_prob:
            probs = warp_probs(logits, config.temperature, config.top_k, config.top_p, top_k_ties=config.top_k_ties)
            self.log_prob[self.book.active] += torch.log(probs.gather(1, token[:, None]).squeeze(1))
        kept, done = self.book.append(token[:, None])
        self.pending = token
        self.remove(done)
        self.monitor.round_finished("step", 1, self.states, logits={self.role: logits}, tokens=token[:, None], num_emitted=kept,
                                    finished=done)

    def drop(self, row_ids: torch.Tensor) -> None:
        """Stop the active rows ``row_ids`` (they keep what they generated, unfinished)."""
        self.remove(torch.isin(self.book.active, row_ids.to(self.book.active.device)))


def run_autoregressive(ctx: RunContext, role: str) -> MethodResult:
    """vanilla (``role="target"``) and draft-only (``role="draft"``) sampling."""
    run = AutoregressiveRun(ctx, role)
    run.run()
    return MethodResult(sequences=run.book.sequences(), extras=[{} for _ in ctx.prompts])
