"""Batched speculative rounds: SSS (exact or paper rule) and standard speculative sampling.

One round for the active rows (``K' = min(K, max remaining budget - 1)`` so no round runs
past ``max_new_tokens``; row ``b`` uses its own ``K'_b = min(K, its remaining budget - 1)``
drafts, so its tokens do not depend on the other rows of the batch):

1. the draft ``r`` proposes ``K'`` tokens one at a time, each drawn with the fused
   ``sss_ext.sample`` from ``warp(r)`` (SSS runs one more draft step to get ``zr[K']``);
2. **one** target forward over ``[last, x_0 .. x_{K'-1}]`` gives ``zq[0..K']`` for the whole
   batch, and (SSS) one reference forward over the same block gives ``zd[0..K']``;
3. ``sss_ext.verify`` accepts a per-row prefix of ``a_b`` drafts and emits one
   correction/bonus token;
4. each cache keeps its first ``a_b + 1`` appended slots per row (rejected slots are masked,
   then cropped or re-aligned, see :mod:`sss_ext.decoding.cache`); rows that emitted EOS or
   spent their budget leave the batch.

Under the adaptive draft-length policy (:mod:`sss_ext.decoding.draft_length`) the round's
``K'`` comes from the rows' acceptance and the measured costs, and row ``b`` verifies only
its first ``k_b = min(K', remaining_b - 1)`` drafts (``num_draft_tokens`` of the op): the
draft still proposes ``K'`` tokens for every row (one batched forward per step) and the op
ignores the rest, so every cache keeps at most ``k_b + 1`` slots.

Cache invariant between rounds: the target and reference caches hold every token of the
row except the last one (``pending``). So does the draft's under SSS. Under standard
speculative sampling the draft runs only ``K'`` steps, so after a round where all drafts
were accepted it lacks ``x_{K'-1}``; that token is *carried* and fed together with the
pending token at the next round's first draft step (a width-2 step, padded for rows
without a carry) instead of costing an extra draft forward.
"""

from __future__ import annotations

import torch

from .. import ops
from .cache import KVState
from .context import MethodResult, RunContext
from .draft_length import DraftLengths
from .rows import RowBook, left_pad


class SpeculativeRun:
    """Speculative decoding of ``ctx.prompts`` (one row each).

    Parameters
    ----------
    ctx : RunContext
        Models (``target``, ``draft`` and, for SSS, ``ref``), prompts, config, random streams, stats.
    use_ref : bool
        Shift by the reference draft ``d`` (SSS); False gives standard speculative sampling.
    mode : {"exact", "paper"}
        Verification rule (``"paper"`` needs ``use_ref``).
    prompts : list of torch.Tensor, optional
        One 1-D int64 prompt per row; default ``ctx.prompts``.
    prompt_of_row : torch.Tensor, optional
        int64 prompt index of every row (for per-prompt stats); default one row per prompt.
    sample_of_row : torch.Tensor, optional
        int64 index of every row among its prompt's samples (keys its random stream); default 0.

    Shape
    -----
    prompts: B tensors (L_b,); prompt_of_row, sample_of_row: (B,); book.log_z: (B,) sum of log Z over the emitted tokens
    """

    def __init__(self, ctx: RunContext, use_ref: bool, mode: str = "exact", prompts=None, prompt_of_row=None,
                 sample_of_row=None):
        config, models, device = ctx.config, ctx.models, ctx.device
        self.ctx = ctx
        self.config = config
        self.mode = mode
        self.stats = ctx.stats
        self.tracker = ctx.tracker
        self.logits_hooks = ctx.hooks if ctx.hooks is not None and ctx.hooks.logits_processor is not None else None
        self.run_index = self.tracker.new_run() if self.tracker is not None else 0
        self.round_index = 0
        prompts = ctx.prompts if prompts is None else prompts
        if prompt_of_row is None:
            prompt_of_row = torch.arange(len(prompts))
        self.book = RowBook(prompt_of_row, config.max_new_tokens, config.num_draft_tokens + 1, models.eos_token_ids,
                            device, ctx.stats, ctx.hooks)
        self.streams = ctx.randomness.streams(prompt_of_row, sample_of_row)
        record = self._record
        batch = len(prompts)
        self.target = KVState(models.target, "target", record, "target", batch, device, ctx.clock)
        self.draft = KVState(models.draft, "draft", record, "draft", batch, device, ctx.clock)
        self.ref = KVState(models.ref, "ref", record, "ref_model", batch, device, ctx.clock) if use_ref else None
        ids, mask = left_pad(prompts, models.pad_token_id, device)
        for state in self.states:
            if ids.shape[1] > 1:
                state.forward(ids[:, :-1], mask[:, :-1])
        self.pending = ids[:, -1]
        # standard SD only: the draft has not seen carry_token yet (all drafts accepted last round)
        self.carry = torch.zeros(batch, dtype=torch.bool, device=device)
        self.carry_token = torch.zeros(batch, dtype=torch.int64, device=device)
        self.lengths = DraftLengths(config, batch, 1 if use_ref else 0, device)
        if self.tracker is not None:
            self.tracker.emit("prefill", self.run_index, "speculative", -1, self.book.active.cpu(),
                              self.book.active_prompts.clone(), states=self.states)

    def _record(self, role: str, width: int, seconds: float | None = None) -> None:
        prompts = self.book.active_prompts
        self.stats.forward(role, prompts, width)
        if self.tracker is not None:
            self.tracker.forward(role, int(prompts.numel()), width, seconds)

    @property
    def states(self) -> list[KVState]:
        return [s for s in (self.target, self.draft, self.ref) if s is not None]

    def _draft_step(self, first: bool, previous: torch.Tensor | None) -> torch.Tensor:
        """Draft logits for the next position. Shape: -> (B, V)"""
        if first and bool(self.carry.any()):
            tokens = torch.stack([self.carry_token, self.pending], dim=1)
            mask = torch.stack([self.carry, torch.ones_like(self.carry)], dim=1)
            return self.draft.forward(tokens, mask)[:, -1]
        token = self.pending if first else previous
        return self.draft.forward(token[:, None])[:, -1]

    def round(self) -> None:
        """One verification round of every active row."""
        config = self.config
        tracker = self.tracker
        temperature, top_k, top_p = config.temperature, config.top_k, config.top_p
        remaining = self.book.remaining()
        row_draft = self.lengths.choose(remaining)  # (B,) K'_b of every row: its own budget, the policy's K
        num_draft, shortest = torch.stack([row_draft.max(), row_draft.min()]).tolist()
        sss = self.ref is not None
        if tracker is not None:
            rows, row_prompts, carried = self.book.active.cpu(), self.book.active_prompts.clone(), self.carry.clone()
        for state in self.states:
            state.begin_round()

        # 1. draft proposals x_0..x_{K'-1}, drawn from warp(r); SSS also needs zr[K']
        self.lengths.start()
        draft_logits, drafts = [], []
        for step in range(num_draft + 1 if sss else num_draft):
            logits = self._draft_step(step == 0, drafts[-1] if drafts else None)
            if self.logits_hooks is not None:  # the prefix of this position ends with every draft so far
                logits = self.logits_hooks.process(self.book, drafts, logits[:, None])[:, 0]
            draft_logits.append(logits)
            if step < num_draft:
                uniforms = self.streams.draw(self.book.active, 1, where=step < row_draft)[:, 0]
                if tracker is None:
                    drafts.append(ops.sample(logits, temperature, top_k, top_p, uniforms=uniforms, top_k_ties=config.top_k_ties))
                else:
                    drafts.append(tracker.timed_op(ops.sample, logits, temperature, top_k, top_p, uniforms=uniforms,
                                                   top_k_ties=config.top_k_ties))
        batch = self.pending.shape[0]
        draft_tokens = torch.stack(drafts, dim=1) if drafts else self.pending.new_zeros((batch, 0))
        block = torch.cat([self.pending[:, None], draft_tokens], dim=1)  # (B, K'+1)
        self.lengths.drafted(len(draft_logits))

        # 2. one target forward (and one reference forward) over the block
        target_logits = self.target.forward(block, logits_to_keep=num_draft + 1)
        ref_logits = self.ref.forward(block, logits_to_keep=num_draft + 1) if sss else None
        if self.logits_hooks is not None:  # position i: prefix ends with x_0 .. x_{i-1}
            target_logits = self.logits_hooks.process(self.book, drafts, target_logits)
            ref_logits = self.logits_hooks.process(self.book, drafts, ref_logits) if sss else None
        if draft_logits:
            draft_stack = torch.stack(draft_logits, dim=1)
        else:
            draft_stack = target_logits.new_zeros((batch, 0, target_logits.shape[-1]))
        target_logits, draft_stack, ref_logits = _common_dtype(target_logits, draft_stack, ref_logits)

        # 3. verification
        out = self._verify(target_logits, draft_stack, draft_tokens, ref_logits, row_draft if shortest < num_draft else None)
        accepted = out.num_accepted
        keep = accepted + 1
        self.lengths.update(row_draft, accepted)

        # 4. per-row rollback of every cache
        self.target.rollback(keep)
        if sss:
            self.ref.rollback(keep)
            self.draft.rollback(keep)
        else:
            # the draft appended [carry?] + [last, x_0 .. x_{K'-2}]: keep the carry and up to K' of the rest
            self.draft.rollback(self.carry.to(torch.int64) + torch.clamp(keep, max=num_draft))
            if num_draft > 0:
                self.carry = accepted == num_draft
                self.carry_token = draft_tokens[:, -1]
        prompts = self.book.active_prompts
        self.stats.rows("rounds", prompts, 1)
        self.stats.rows("proposed_drafts", prompts, row_draft)
        self.stats.rows("accepted_drafts", prompts, accepted)

        kept, done = self.book.append(out.tokens, keep, out.log_z if sss else None)
        self.pending = out.tokens.gather(1, accepted[:, None]).squeeze(1)
        stay = self.book.remove(done)
        if stay is not None:
            for state in self.states:
                state.select_rows(stay)
            self.pending = self.pending[stay]
            self.carry = self.carry[stay]
            self.carry_token = self.carry_token[stay]
            self.lengths.select_rows(stay)
        if tracker is not None:
            logits = {"target": target_logits, "draft": draft_stack}
            if sss:
                logits["ref"] = ref_logits
            tracker.emit("round", self.run_index, "speculative", self.round_index, rows, row_prompts, states=self.states,
                         draft_tokens=draft_tokens, num_draft_tokens=row_draft, logits=logits, verify=out, tokens=out.tokens,
                         num_emitted=kept, finished=done, carried=None if sss else carried)
        self.round_index += 1
        self.lengths.finished(num_draft + 1)

    def _verify(self, target_logits, draft_logits, draft_tokens, ref_logits, row_draft):
        """``sss_ext.verify`` of the active rows with their next uniforms; row ``b`` verifies its first
        ``row_draft[b]`` drafts (every draft when ``row_draft`` is None) and consumes that many plus one.

        Shape
        -----
        target_logits: (B, K'+1, V); draft_tokens: (B, K'); row_draft: (B,) in [0, K'] or None
        -> VerifyOutput with (B, K'+1) tokens
        """
        config = self.config
        width = draft_tokens.shape[1] + 1
        uniforms = self.streams.draw(self.book.active, width, used=None if row_draft is None else row_draft + 1)
        kwargs = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, top_k_ties=config.top_k_ties,
                      shift=config.shift, mode=self.mode if self.ref is not None else "exact", num_draft_tokens=row_draft,
                      uniforms=uniforms)
        if self.tracker is None:
            return ops.verify(target_logits, draft_logits, draft_tokens, ref_logits, **kwargs)
        return self.tracker.timed_op(ops.verify, target_logits, draft_logits, draft_tokens, ref_logits, **kwargs)

    def run(self) -> None:
        while self.book.num_active:
            self.round()


def _common_dtype(*logits):
    dtypes = {t.dtype for t in logits if t is not None}
    if len(dtypes) <= 1:
        return logits
    return tuple(t.float() if t is not None else None for t in logits)


def run_speculative(ctx: RunContext, use_ref: bool, mode: str = "exact") -> MethodResult:
    """sss / sss-paper (``use_ref``) and sd: one speculative run over every prompt."""
    run = SpeculativeRun(ctx, use_ref, mode)
    run.run()
    log_z = run.book.log_z.cpu().tolist() if use_ref else None
    return MethodResult(sequences=run.book.sequences(), log_z=log_z, extras=[{} for _ in ctx.prompts])
