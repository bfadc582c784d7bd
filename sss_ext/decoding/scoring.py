"""Reward scoring for the reward-guided baselines (the reward *argument* of ``generate``), with every call counted.

Not to be confused with :mod:`sss_ext.models.rewards`, the default offline setting's gold and proxy rewards.

A reward is either

* a callable taking a list of full sequences (prompt + response) and returning one score
  per sequence: decoded texts (``reward_input="text"``, the default when a tokenizer is
  given) or 1-D int64 token-id tensors (``reward_input="ids"``); or
* a transformers sequence-classification model (``torch.nn.Module`` with a config) scoring
  token ids; the score is ``logits[:, 0]``. It is run on right-padded batches when its
  config has a ``pad_token_id`` (it finds the last real token through it), one sequence
  per forward otherwise.
"""

from __future__ import annotations

import math

import torch

from .stats import StatsRecorder
from .validate import check_eval_mode


def check_reward(reward_fn, method: str, tokenizer, reward_input: str) -> None:
    """``ValueError`` naming ``reward_fn`` / ``tokenizer`` before generation starts."""
    if reward_fn is None:
        raise ValueError(f"method={method!r} needs reward_fn (a callable or a transformers reward model); got None")
    if not (callable(reward_fn) or isinstance(reward_fn, torch.nn.Module)):
        raise ValueError(f"reward_fn must be callable or a transformers reward model, got {type(reward_fn).__name__}")
    if isinstance(reward_fn, torch.nn.Module) and hasattr(reward_fn, "config"):
        check_eval_mode(reward_fn, "reward_fn")
    if reward_input == "text" and tokenizer is None and not isinstance(reward_fn, torch.nn.Module):
        raise ValueError("reward_input='text' needs tokenizer= to decode the sequences for reward_fn")


class RewardScorer:
    """Scores sequences and records one reward call per invocation (per forward for a model).

    Shape
    -----
    __call__: R sequences (prompt + response ids), prompt_index (R,) -> scores (R,) float64
    """

    def __init__(self, reward_fn, tokenizer, reward_input: str, stats: StatsRecorder):
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.is_model = isinstance(reward_fn, torch.nn.Module) and hasattr(reward_fn, "config")
        if reward_input == "auto":
            reward_input = "text" if tokenizer is not None else "ids"
        self.reward_input = reward_input
        self.stats = stats

    def __call__(self, sequences: list[torch.Tensor], prompt_index: torch.Tensor) -> torch.Tensor:
        if not sequences:
            return torch.zeros(0, dtype=torch.float64)
        if self.is_model:
            return self._score_with_model(sequences, prompt_index)
        if self.reward_input == "text":
            inputs = [self.tokenizer.decode(seq.tolist(), skip_special_tokens=True) for seq in sequences]
        else:
            inputs = [seq.cpu() for seq in sequences]
        self.stats.reward(prompt_index)
        scores = self.reward_fn(inputs)
        return _as_scores(scores, len(sequences))

    @torch.no_grad()
    def _score_with_model(self, sequences, prompt_index) -> torch.Tensor:
        model = self.reward_fn
        device = next(model.parameters()).device
        pad = getattr(model.config, "pad_token_id", None)
        groups = [list(range(len(sequences)))] if pad is not None else [[i] for i in range(len(sequences))]
        scores = torch.empty(len(sequences), dtype=torch.float64)
        for group in groups:
            width = max(int(sequences[i].numel()) for i in group)
            ids = torch.full((len(group), width), pad if pad is not None else 0, dtype=torch.int64)
            mask = torch.zeros((len(group), width), dtype=torch.int64)
            for row, index in enumerate(group):
                n = int(sequences[index].numel())
                ids[row, :n] = sequences[index]
                mask[row, :n] = 1
            self.stats.reward(prompt_index[group])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores[group] = logits[:, 0].double().cpu()
        return scores


def _as_scores(scores, expected: int) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        values = scores.detach().double().cpu().flatten()
    else:
        try:
            values = torch.tensor([float(s) for s in scores], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"reward_fn must return one float per sequence, got {type(scores).__name__}") from None
    if values.numel() != expected:
        raise ValueError(f"reward_fn returned {values.numel()} scores for {expected} sequences")
    if any(math.isnan(v) for v in values.tolist()):
        raise ValueError("reward_fn returned NaN")
    return values
