"""Bookkeeping of the rows of one run: output buffer, budgets, EOS, which rows are still active.

A *row* is one sequence being generated (a prompt, or one of a prompt's N samples).
Rows keep their id for the whole run; the *batch* is the active rows, in ``active`` order,
and every :class:`~sss_ext.decoding.cache.KVState` holds exactly those rows in that order.
"""

from __future__ import annotations

import torch

from .stats import StatsRecorder


def left_pad(prompts: list[torch.Tensor], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts right-aligned.

    Shape
    -----
    prompts: R tensors (L_r,) -> ids (R, max L_r) int64, mask (R, max L_r) bool
    """
    lengths = torch.tensor([int(p.numel()) for p in prompts], dtype=torch.int64)
    width = int(lengths.max())
    if bool((lengths == width).all()):
        ids = torch.stack(list(prompts))
    else:
        ids = torch.nn.utils.rnn.pad_sequence(list(prompts), batch_first=True, padding_value=pad_token_id, padding_side="left")
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    return ids.to(device), mask.to(device)


def repeat_prompts(prompts: list[torch.Tensor], copies: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every prompt ``copies`` times, as the rows of a multi-sample run (best-of-n, SIR).

    Shape
    -----
    prompts: P tensors -> R = P * copies rows, prompt_of_row (R,), sample_of_row (R,)
    """
    rows = [prompt for prompt in prompts for _ in range(copies)]
    return rows, torch.arange(len(prompts)).repeat_interleave(copies), torch.arange(copies).repeat(len(prompts))


class RowBook:
    """Generated tokens and status of ``R`` rows.

    Parameters
    ----------
    prompt_of_row : torch.Tensor
        int64 prompt index of every row.
    max_new_tokens : int
        Budget per row.
    spare : int
        Extra buffer columns (the widest block appended at once).
    eos_token_ids : tuple of int
        A row finishes after emitting any of them.
    hooks : GenerationHooks, optional
        Stopping criteria (cut like EOS) and streamer of the call.

    Shape
    -----
    prompt_of_row: (R,); tokens: (R, max_new_tokens + spare); num_generated, finished, log_z: (R,)
    """

    def __init__(self, prompt_of_row: torch.Tensor, max_new_tokens: int, spare: int, eos_token_ids, device, stats: StatsRecorder,
                 hooks=None):
        rows = prompt_of_row.numel()
        if hooks is not None:
            hooks.check_rows(rows)
        self.hooks = hooks
        self.device = device
        self.prompt_of_row = prompt_of_row.to(device)
        self.max_new_tokens = max_new_tokens
        self.tokens = torch.full((rows, max_new_tokens + spare), -1, dtype=torch.int64, device=device)
        self.num_generated = torch.zeros(rows, dtype=torch.int64, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.log_z = torch.zeros(rows, dtype=torch.float64, device=device)
        self.active = torch.arange(rows, device=device)
        self.active_prompts = prompt_of_row.cpu().clone()  # host copy: stats never sync the device
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.int64, device=device) if eos_token_ids else None
        self.stats = stats

    @property
    def num_active(self) -> int:
        return int(self.active.numel())

    def remaining(self) -> torch.Tensor:
        """Tokens each active row may still emit. Shape: (B,)"""
        return self.max_new_tokens - self.num_generated[self.active]

    def append(self, new: torch.Tensor, count: torch.Tensor | None = None, log_z: torch.Tensor | None = None):
        """Append the first ``count[b]`` of ``new[b]`` to active row ``b``, cut at EOS, the budget and the stopping criteria.

        Returns the number of tokens actually kept and which rows are now finished.

        Shape
        -----
        new: (B, W); count: (B,) or None (all W); log_z: (B, W) or None -> kept (B,), done (B,) bool
        """
        rows = self.active
        batch, width = new.shape
        start = self.num_generated[rows]
        columns = torch.arange(width, device=new.device)
        if count is None:
            count = torch.full((batch,), width, dtype=torch.int64, device=new.device)
        count = torch.minimum(count, self.max_new_tokens - start)
        hit_eos = torch.zeros(batch, dtype=torch.bool, device=new.device)
        if self.eos is not None:
            is_eos = torch.isin(new, self.eos) & (columns[None] < count[:, None])
            hit_eos = is_eos.any(dim=1)
            first = torch.argmax(is_eos.to(torch.int8), dim=1)
            count = torch.where(hit_eos, first + 1, count)
        stopped = None
        if self.hooks is not None:
            count, stopped = self.hooks.stop(self, new, count)
            self.hooks.stream(new, count)
        self.tokens[rows[:, None], start[:, None] + columns[None]] = new
        self.num_generated[rows] = start + count
        if log_z is not None:
            kept_z = torch.where(columns[None] < count[:, None], log_z.to(torch.float64), 0.0)
            self.log_z[rows] += kept_z.sum(dim=1)
        done = hit_eos | (start + count >= self.max_new_tokens)
        if stopped is not None:
            done |= stopped
        self.finished[rows] |= done
        return count, done

    def remove(self, leaving: torch.Tensor) -> torch.Tensor | None:
        """Drop active rows where ``leaving`` is True; returns the batch indices that stay (None if none leave).

        Shape
        -----
        leaving: (B,) bool -> (B',) int64
        """
        if not bool(leaving.any()):
            return None
        stay = torch.nonzero(~leaving).squeeze(1)
        leaving_cpu = leaving.cpu()
        gone_prompts = torch.unique(self.active_prompts[leaving_cpu])
        self.active = self.active[stay]
        self.active_prompts = self.active_prompts[~leaving_cpu]
        done_prompts = gone_prompts[~torch.isin(gone_prompts, self.active_prompts)]
        self.stats.prompts_finished(done_prompts.tolist())
        return stay

    def sequence(self, row: int) -> torch.Tensor:
        """Generated tokens of ``row``. Shape: (n,) int64 on CPU"""
        return self.tokens[row, : int(self.num_generated[row])].cpu()

    def sequences(self) -> list[torch.Tensor]:
        counts = self.num_generated.cpu().tolist()
        tokens = self.tokens.cpu()
        return [tokens[row, :n] for row, n in enumerate(counts)]
