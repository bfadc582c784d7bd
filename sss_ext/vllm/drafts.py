"""The draft pair ``r``, ``d`` run incrementally inside vLLM's engine, batched over the tracked requests.

One :class:`~sss_ext.decoding.cache.KVState` per draft holds a row per tracked request
(a request with ``sss_shift != 0``); a row's cache holds exactly the tokens
:attr:`Tracked.fed` of that request. At every step each request's current sequence
(prompt + the live list of output tokens vLLM hands the processor) is compared with what its
row holds: the missing tokens are fed (one forward per draft for all rows together, the new
tokens right-aligned in the block so that every row's last slot is its last real token; rows
with nothing new get masked slots that are never attended to), and a row whose cache is not a
prefix of the sequence any more is rebuilt. Requests leave by :meth:`DraftBatch.drop`, which
removes their rows (:meth:`KVState.select_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decoding.cache import KVState, map_cache


@dataclass(eq=False)
class Tracked:
    """One request's draft state (identity is the request; rows of vLLM's batch point at it)."""

    shift: float
    prompt: list
    output: list  # vLLM's live list of output token ids
    fed: list = field(default_factory=list)  # tokens in this request's draft caches
    tilt: torch.Tensor | None = None  # zr - zd after ``fed`` (float32, (V,))

    def sequence(self) -> list:
        return list(self.prompt) + list(self.output)


def _noop_record(role, width, seconds):
    return None


class DraftBatch:
    """Batched incremental forwards of ``r`` and ``d`` for the tracked requests."""

    def __init__(self, draft, ref_draft, device="cpu"):
        self.models = (draft, ref_draft)
        self.device = torch.device(device)
        self.members: list[Tracked] = []
        self._new_states()

    def _new_states(self):
        self.states = [KVState(m, role, _noop_record, name, 0, self.device)
                       for m, role, name in zip(self.models, ("draft", "ref"), ("draft", "ref_draft"))]

    # --- membership --------------------------------------------------------------------
    def _append_row(self, member: Tracked) -> None:
        for st in self.states:
            def grow(t):
                return torch.cat([t, t.new_zeros((1,) + tuple(t.shape[1:]))], dim=0)

            map_cache(st.cache, grow)
            st.slot_mask = torch.cat([st.slot_mask, st.slot_mask.new_zeros((1, st.slot_mask.shape[1]))], dim=0)
            st.lengths = torch.cat([st.lengths, st.lengths.new_zeros(1)])
        member.fed = []
        member.tilt = None
        self.members.append(member)

    def drop(self, doomed) -> None:
        """Remove the rows of ``doomed`` (an iterable of :class:`Tracked`)."""
        doomed = {id(m) for m in doomed}
        keep = [i for i, m in enumerate(self.members) if id(m) not in doomed]
        if len(keep) == len(self.members):
            return
        self.members = [self.members[i] for i in keep]
        if not self.members:
            self._new_states()  # releases the cache memory
            return
        rows = torch.tensor(keep, dtype=torch.int64, device=self.device)
        for st in self.states:
            st.select_rows(rows)

    # --- the step -----------------------------------------------------------------------
    @torch.inference_mode()
    def tilts(self, requests) -> torch.Tensor:
        """``zr - zd`` (float32) after each request's current sequence; feeds what the caches lack.

        Shape
        -----
        requests: list of R Tracked -> (R, V)
        """
        index = {id(m): i for i, m in enumerate(self.members)}
        for req in requests:
            if id(req) not in index:
                self._append_row(req)
                index[id(req)] = len(self.members) - 1
        # rows whose cache is no longer a prefix of the sequence (e.g. recomputed output) restart
        stale = []
        for member in self.members:
            seq = member.sequence()
            if len(member.fed) > len(seq) or seq[:len(member.fed)] != member.fed:
                stale.append(member)
        if stale:
            self.drop(stale)
            for member in stale:
                self._append_row(member)
        pending = []
        for member in self.members:
            seq = member.sequence()
            new = seq[len(member.fed):]
            if not new and member.tilt is None:  # nothing cached to answer with: recompute the last token
                raise RuntimeError("sss_ext.vllm: a request's draft state has no logits (internal error)")
            pending.append(new)
        width = max(len(new) for new in pending)
        if width:
            rows = len(self.members)
            tokens = torch.zeros((rows, width), dtype=torch.int64)
            mask = torch.zeros((rows, width), dtype=torch.bool)
            for i, new in enumerate(pending):
                if new:
                    tokens[i, width - len(new):] = torch.tensor(new, dtype=torch.int64)
                    mask[i, width - len(new):] = True
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            zr = self.states[0].forward(tokens, mask, logits_to_keep=1)[:, -1].float()
            zd = self.states[1].forward(tokens, mask, logits_to_keep=1)[:, -1].float()
            tilt = zr - zd
            for i, (member, new) in enumerate(zip(self.members, pending)):
                if new:
                    member.fed = member.fed + new
                    member.tilt = tilt[i]
            for st in self.states:
                st.compact()
        return torch.stack([req.tilt for req in requests])
