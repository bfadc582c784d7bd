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

With the n-gram proposer (``SamplingConfig(proposer="ngram")``) step 1 copies each row's
drafts from its own history (:mod:`sss_ext.decoding.ngram`): row ``b`` gets ``k_b`` of them
(0 when no n-gram matches; then its round samples one token from the target law) and the
round verifies ``K' = max_b k_b`` positions. ``sss_ext.verify`` takes them as one-hot drafts
(``draft_logits=None``); under SSS the aligned draft ``r`` runs one forward over the same
block as the target and the reference, for the tilt (``aligned_logits``), so every cache,
``r``'s included, holds every token but ``pending`` and nothing is carried.
"""

from __future__ import annotations

import torch

from .. import ops
from .context import MethodResult, RunContext
from .draft_length import DraftLengths, RoundCostMeter
from .ngram import histories, propose_ngrams
from .sampler_run import SamplerRun


class SpeculativeRun(SamplerRun):
    """Speculative decoding of ``ctx.prompts`` (one row each).

    Parameters
    ----------
    ctx : RunContext
        Models (``target``, ``draft`` and, for SSS, ``ref``), prompts, config, random streams, monitor.
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
        config, device = ctx.config, ctx.device
        meter = RoundCostMeter(device) if DraftLengths.measures(config) else None
        super().__init__(ctx, "speculative", prompts, prompt_of_row, sample_of_row, spare=config.num_draft_tokens + 1,
                         cost_meter=meter)
        self.mode = mode
        self.ngram = config.proposer == "ngram"
        batch = len(self.prompts)
        self.target = self.kv_state("target")
        self.draft = self.kv_state("draft") if use_ref or not self.ngram else None  # r: proposer, or the tilt's logits
        self.ref = self.kv_state("ref") if use_ref else None
        if self.ngram:  # every row's prompt, left-aligned, the start of its n-gram history
            self.prompt_ids = torch.nn.utils.rnn.pad_sequence(list(self.prompts), batch_first=True).to(device)
            self.prompt_lengths = torch.tensor([int(p.numel()) for p in self.prompts], dtype=torch.int64, device=device)
        # standard SD only: the draft has not seen carry_token yet (all drafts accepted last round)
        self.carry = torch.zeros(batch, dtype=torch.bool, device=device)
        self.carry_token = torch.zeros(batch, dtype=torch.int64, device=device)
        self.lengths = DraftLengths(config, batch, 1 if use_ref else 0, device, meter)
        self.prefill()

    @property
    def states(self) -> list:
        return [s for s in (self.target, self.draft, self.ref) if s is not None]

    def round(self) -> None:
        """One verification round of every active row: draft, verify forward, verify op, emit, roll back."""
        sss = self.ref is not None
        row_draft = self.lengths.choose(self.book.remaining())  # (B,) K'_b of every row: its own budget, the policy's K
        self.monitor.round_started(**({} if sss else {"carried": self.carry}))
        for state in self.states:
            state.begin_round()

        if self.ngram:
            draft_tokens, row_draft = self._look_up(row_draft)
            draft_logits = None
        num_draft, shortest = torch.stack([row_draft.max(), row_draft.min()]).tolist()
        if not self.ngram:
            draft_tokens, draft_logits = self._propose(num_draft, row_draft)
        self.monitor.drafted(0 if draft_logits is None else draft_logits.shape[1])
        target_logits, draft_logits, ref_logits, aligned_logits = self._verify_forward(draft_tokens, draft_logits)
        out = self._verify(target_logits, draft_logits, draft_tokens, ref_logits, aligned_logits,
                           row_draft if shortest < num_draft else None)
        self.lengths.update(row_draft, out.num_accepted)
        self.monitor.verified(row_draft, out.num_accepted)
        kept, done = self._emit(out)
        self._roll_back(out.num_accepted, num_draft, draft_tokens)
        self.remove(done)

        logits = {"target": target_logits}
        if draft_logits is not None or aligned_logits is not None:
            logits["draft"] = draft_logits if draft_logits is not None else aligned_logits
        if sss:
            logits["ref"] = ref_logits
        self.monitor.round_finished("round", num_draft + 1, self.states, draft_tokens=draft_tokens, num_draft_tokens=row_draft,
                                    logits=logits, verify=out, tokens=out.tokens, num_emitted=kept, finished=done)

    def _look_up(self, row_draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """1. (n-gram proposer) Each row's drafts, copied from after the latest earlier match of its suffix.

        Shape
        -----
        row_draft: (B,) the most drafts per row -> draft_tokens (B, K'), row_draft (B,) in [0, K'], K' = its max
        """
        rows = self.book.active
        history, lengths = histories(self.prompt_ids[rows], self.prompt_lengths[rows], self.book.tokens[rows],
                                     self.book.num_generated[rows])
        return propose_ngrams(history, lengths, row_draft, self.config.ngram_sizes)

    def _propose(self, num_draft: int, row_draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """1. The draft ``r`` proposes ``x_0 .. x_{K'-1}``, each drawn from ``warp(r)``; SSS also needs ``zr[K']``.

        Shape
        -----
        row_draft: (B,) -> draft_tokens (B, K'), draft_logits (B, K'+1 (SSS) or K', V)
        """
        draft_logits, drafts = [], []
        for step in range(num_draft + 1 if self.ref is not None else num_draft):
            # the prefix of this position ends with every draft so far
            logits = self.processed(drafts, self._draft_step(step == 0, drafts[-1] if drafts else None)[:, None])[:, 0]
            draft_logits.append(logits)
            if step < num_draft:
                drafts.append(self.sample(logits, self.streams.draw(self.book.active, 1, where=step < row_draft)[:, 0]))
        batch = self.pending.shape[0]
        draft_tokens = torch.stack(drafts, dim=1) if drafts else self.pending.new_zeros((batch, 0))
        if draft_logits:
            return draft_tokens, torch.stack(draft_logits, dim=1)
        return draft_tokens, None

    def _draft_step(self, first: bool, previous: torch.Tensor | None) -> torch.Tensor:
        """Draft logits for the next position. Shape: -> (B, V)"""
        if first and bool(self.carry.any()):
            tokens = torch.stack([self.carry_token, self.pending], dim=1)
            mask = torch.stack([self.carry, torch.ones_like(self.carry)], dim=1)
            return self.draft.forward(tokens, mask)[:, -1]
        token = self.pending if first else previous
        return self.draft.forward(token[:, None])[:, -1]

    def _verify_forward(self, draft_tokens: torch.Tensor, draft_logits: torch.Tensor | None):
        """2. One target forward (and one reference forward) over ``[last, x_0 .. x_{K'-1}]``; with the
        n-gram proposer under SSS also one forward of the aligned draft ``r`` (the tilt's ``zr``).

        Shape
        -----
        draft_tokens: (B, K') -> target_logits (B, K'+1, V), draft_logits (draft proposer), ref_logits and
        aligned_logits (n-gram proposer, SSS) (B, K'+1, V) or None, in one dtype
        """
        sss = self.ref is not None
        width = draft_tokens.shape[1] + 1
        block = torch.cat([self.pending[:, None], draft_tokens], dim=1)  # (B, K'+1)
        target_logits = self.target.forward(block, logits_to_keep=width)
        ref_logits = self.ref.forward(block, logits_to_keep=width) if sss else None
        aligned_logits = self.draft.forward(block, logits_to_keep=width) if sss and self.ngram else None
        drafts = list(draft_tokens.unbind(1))
        target_logits = self.processed(drafts, target_logits)  # position i: prefix ends with x_0 .. x_{i-1}
        ref_logits = self.processed(drafts, ref_logits) if sss else None
        aligned_logits = self.processed(drafts, aligned_logits) if aligned_logits is not None else None
        if draft_logits is None and not self.ngram:
            draft_logits = target_logits.new_zeros((draft_tokens.shape[0], 0, target_logits.shape[-1]))
        return common_dtype(target_logits, draft_logits, ref_logits, aligned_logits)

    def _verify(self, target_logits, draft_logits, draft_tokens, ref_logits, aligned_logits, row_draft):
        """3. ``sss_ext.verify`` of the active rows with their next uniforms; row ``b`` verifies its first
        ``row_draft[b]`` drafts (every draft when ``row_draft`` is None) and consumes that many plus one.
        With the n-gram proposer the drafts are one-hot (``draft_logits`` None) and, under SSS, the
        tilt reads ``aligned_logits``.

        Shape
        -----
        target_logits: (B, K'+1, V); draft_tokens: (B, K'); row_draft: (B,) in [0, K'] or None
        -> VerifyOutput with (B, K'+1) tokens
        """
        config = self.config
        width = draft_tokens.shape[1] + 1
        uniforms = self.streams.draw(self.book.active, width, used=None if row_draft is None else row_draft + 1)
        one_hot = {"aligned_logits": aligned_logits} if self.ngram else {}  # r for the tilt; unread at shift 0
        return self.monitor.op(ops.verify, target_logits, draft_logits, draft_tokens, ref_logits, temperature=config.temperature,
                               top_k=config.top_k, top_p=config.top_p, top_k_ties=config.top_k_ties, shift=config.shift,
                               mode=self.mode if self.ref is not None else "exact", num_draft_tokens=row_draft,
                               uniforms=uniforms, verification=config.verification, **one_hot)

    def _emit(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """4. Each row keeps its accepted drafts and the correction/bonus token (cut at EOS and budget).

        Shape
        -----
        -> kept (B,) tokens each row kept, done (B,) bool rows that finished
        """
        accepted = out.num_accepted
        kept, done = self.book.append(out.tokens, accepted + 1, out.log_z if self.ref is not None else None)
        self.pending = out.tokens.gather(1, accepted[:, None]).squeeze(1)
        return kept, done

    def _roll_back(self, accepted: torch.Tensor, num_draft: int, draft_tokens: torch.Tensor) -> None:
        """5. Every cache keeps the first ``accepted + 1`` slots of the round per row.

        Shape
        -----
        accepted: (B,); draft_tokens: (B, K')
        """
        keep = accepted + 1
        self.target.rollback(keep)
        if self.ngram:
            for state in (self.ref, self.draft):
                if state is not None:
                    state.rollback(keep)
        elif self.ref is not None:
            self.ref.rollback(keep)
            self.draft.rollback(keep)
        else:
            # the draft appended [carry?] + [last, x_0 .. x_{K'-2}]: keep the carry and up to K' of the rest
            self.draft.rollback(self.carry.to(torch.int64) + torch.clamp(keep, max=num_draft))
            if num_draft > 0:
                self.carry = accepted == num_draft
                self.carry_token = draft_tokens[:, -1]

    def keep_rows(self, stay: torch.Tensor) -> None:
        self.carry = self.carry[stay]
        self.carry_token = self.carry_token[stay]
        self.lengths.select_rows(stay)


def common_dtype(*logits):
    """The logits in one dtype (float32 when they differ); None entries stay None."""
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
