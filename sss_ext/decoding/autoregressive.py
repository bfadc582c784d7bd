"""Plain batched sampling from one model with a KV cache (vanilla, draft-only, and the baselines' sampler).

Each step is one forward of the active rows over their pending token and one fused
``sss_ext.sample`` call; rows that emit EOS or reach ``max_new_tokens`` leave the batch.
"""

from __future__ import annotations

import torch

from .. import ops
from ..warp import warp_probs
from .cache import KVState
from .config import SamplingConfig
from .rows import RowBook, left_pad
from .stats import StatsRecorder


class AutoregressiveRun:
    """Sample continuations of ``prompts`` (one row each) from ``model``.

    Parameters
    ----------
    model : transformers causal LM
    role : {"target", "draft"}
        Under which name forward calls are counted.
    prompts : list of torch.Tensor
        One 1-D int64 prompt per row.
    prompt_of_row : torch.Tensor
        int64 prompt index of every row (for per-prompt stats).
    track_log_prob : bool
        Accumulate ``log warp(p)(token)`` of every sampled token in ``log_prob``.

    Shape
    -----
    prompts: R tensors (L_r,); prompt_of_row: (R,); log_prob: (R,) float64
    """

    def __init__(self, model, role: str, name: str, prompts, prompt_of_row, config: SamplingConfig, generator,
                 stats: StatsRecorder, eos_token_ids, pad_token_id: int, device, track_log_prob: bool = False):
        self.config = config
        self.generator = generator
        self.stats = stats
        self.book = RowBook(prompt_of_row, config.max_new_tokens, 1, eos_token_ids, device, stats)
        record = lambda role_, width: stats.forward(role_, self.book.active_prompts, width)  # noqa: E731
        self.state = KVState(model, role, record, name, len(prompts), device)
        self.track_log_prob = track_log_prob
        self.log_prob = torch.zeros(len(prompts), dtype=torch.float64, device=device)
        ids, mask = left_pad(prompts, pad_token_id, device)
        if ids.shape[1] > 1:
            self.state.forward(ids[:, :-1], mask[:, :-1])
        self.pending = ids[:, -1]

    def step(self) -> None:
        """One token for every active row."""
        config = self.config
        logits = self.state.forward(self.pending[:, None])[:, -1]
        token = ops.sample(logits, config.temperature, config.top_k, config.top_p, generator=self.generator)
        if self.track_log_prob:
            probs = warp_probs(logits, config.temperature, config.top_k, config.top_p)
            self.log_prob[self.book.active] += torch.log(probs.gather(1, token[:, None]).squeeze(1))
        _, done = self.book.append(token[:, None])
        self.pending = token
        self._remove(done)

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
