"""KV caches of a batch whose rows advance by different amounts: the one place touching cache internals.

Layout
------
Every model keeps one transformers ``DynamicCache`` for the whole batch, plus a boolean
``slot_mask`` saying which cache slots hold a real token of the row; the other slots
(left padding of shorter prompts, rejected draft slots) are never attended to. A forward
appends ``W`` slots to every row; its 2-D attention mask is ``slot_mask`` followed by the
new tokens' mask, and its ``position_ids`` count the valid tokens before each new token
of that row (``lengths[b] + cumsum(token_mask) - 1``), so padding and holes never shift
positions (rotary embeddings see exactly the positions of an unpadded run).

Per-row rollback
----------------
After a speculative round each row keeps only its first ``num_accepted + 1`` of the
appended slots: :meth:`KVState.rollback` clears the mask of the rejected slots, so the
accepted prefix is never recomputed. :meth:`KVState.compact` then crops the columns that
are padding in every row (a slice: e.g. the tail rejected by all rows); when every row
kept the same number of slots that is the whole rollback. Slots rejected by only some
rows stay as masked holes; once holes exceed ``max(min_holes, hole_fraction * width)``
one gather per cache tensor re-aligns every row (a stable sort of the row's mask gives
the index that moves its valid slots, in order, to the right end), so the cache never
grows beyond ~1.33x the longest row. Finished rows are removed from the batch
(:meth:`KVState.select_rows`), so they cost nothing afterwards.

transformers versions
---------------------
Written against transformers 5.23 (the project's pin), where a ``DynamicCache`` holds
``layers`` of ``DynamicLayer`` with ``keys`` / ``values`` of shape (B, heads, L, head_dim).
transformers 4.5x before the layered cache kept ``key_cache`` / ``value_cache`` lists of the
same tensors; :func:`_layer_slots` handles both. Caches with sliding-window, linear-attention,
quantised or static layers are refused with a ``ValueError``: their slots cannot be
re-aligned row by row.
"""

from __future__ import annotations

from typing import Callable

import torch


def _cache_classes():
    """(DynamicCache, DynamicLayer or None); imported lazily so ``import sss_ext`` stays light."""
    from transformers import cache_utils

    return cache_utils.DynamicCache, getattr(cache_utils, "DynamicLayer", None)  # no DynamicLayer before 4.54


def new_cache(model, name: str):
    """An empty ``DynamicCache`` for ``model``; ``ValueError`` naming ``name`` if its layers cannot be re-aligned."""
    DynamicCache, DynamicLayer = _cache_classes()
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - old signature without config
        cache = DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers is not None and DynamicLayer is not None:
        bad = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
        if bad:
            raise ValueError(
                f"{name} uses cache layers {bad}; sss_ext.generate supports full-attention models whose "
                "DynamicCache layers are plain DynamicLayer (per-row rollback re-aligns every slot)"
            )
    return cache


def _layer_slots(cache):
    """(getter, setter) pairs over every initialised key/value tensor of ``cache``.

    Shape
    -----
    each tensor: (B, heads, L, head_dim)
    """
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
                continue  # not initialised yet (or KV-shared)
            yield layer, "keys"
            yield layer, "values"
    else:  # pragma: no cover - transformers < 4.54
        for tensors in (cache.key_cache, cache.value_cache):
            for index in range(len(tensors)):
                if tensors[index].dim() == 4:
                    yield tensors, index


def _get(holder, key):
    return getattr(holder, key) if isinstance(key, str) else holder[key]


def _set(holder, key, value):
    if isinstance(key, str):
        setattr(holder, key, value)
    else:  # pragma: no cover
        holder[key] = value


def map_cache(cache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every key/value tensor ``t`` by ``fn(t)``."""
    for holder, key in _layer_slots(cache):
        _set(holder, key, fn(_get(holder, key)))


class KVState:
    """One model's cache over the active rows of a batch.

    Parameters
    ----------
    model : transformers causal LM
    role : {"target", "draft", "ref"}
        Name under which forward calls are counted.
    record : callable(role, width, seconds) -> None
        Called once per forward with its width (the recorder knows the active rows) and the
        forward's time on ``clock`` (None when ``clock`` is None).
    name : str
        Argument name for error messages.
    clock : callable or None
        Zero-argument clock read around the model call when an observer asked for timings.

    Attributes
    ----------
    slot_mask : torch.Tensor
        bool, True where a cache slot holds a real token.
    lengths : torch.Tensor
        int64, valid tokens per row (the position of the next token).

    Shape
    -----
    slot_mask: (B, C); lengths: (B,)
    """

    #: rolled-back slots stay as masked holes until there are more than
    #: max(min_holes, hole_fraction * width) of them; then :meth:`compact` re-aligns the rows
    min_holes = 16
    hole_fraction = 0.25

    def __init__(self, model, role: str, record, name: str, batch_size: int, device, clock=None):
        self.model = model
        self.role = role
        self.record = record
        self.clock = clock
        self.cache = new_cache(model, name)
        self.slot_mask = torch.zeros((batch_size, 0), dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.round_start = 0

    @property
    def width(self) -> int:
        return self.slot_mask.shape[1]

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None, logits_to_keep: int = 1) -> torch.Tensor:
        """Feed ``tokens`` after each row's cached tokens; returns the last ``logits_to_keep`` logits.

        ``token_mask`` marks real tokens; padded slots (False) are appended to the cache but
        never attended to, and do not advance positions.

        Shape
        -----
        tokens, token_mask: (B, W) -> logits (B, logits_to_keep, V)
        """
        batch, width = tokens.shape
        if token_mask is None:
            token_mask = torch.ones_like(tokens, dtype=torch.bool)
            position_ids = self.lengths[:, None] + torch.arange(width, device=tokens.device)
            new_lengths = self.lengths + width
        else:
            position_ids = (self.lengths[:, None] + torch.cumsum(token_mask, dim=1) - 1).clamp_min(0)
            new_lengths = self.lengths + token_mask.sum(dim=1)
        attention_mask = torch.cat([self.slot_mask, token_mask], dim=1)
        logits = self._model_call(tokens, attention_mask, position_ids, logits_to_keep)
        self.slot_mask = attention_mask
        self.lengths = new_lengths
        return logits

    def forward_tree(self, tokens: torch.Tensor, first_node: int, ancestors: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Feed nodes ``first_node ..`` of this round's token tree after the round's earlier nodes.

        The round's slots hold nodes ``0 .. first_node - 1`` in order (every row the same tree,
        fed level by level). A node attends to the row's slots from before the round and to its
        own ancestors (itself included), through a 4-D mask; its position is the row's length
        at the start of the round plus its depth, so each root-to-node path reads exactly as
        the sequence it spells.

        Shape
        -----
        tokens: (B, W) the nodes first_node .. first_node + W - 1; ancestors: (N, N) bool,
        ancestors[c, a] iff a is on the path of c; depth: (N,) int64 -> logits (B, W, V)
        """
        batch, width = tokens.shape
        end = first_node + width
        if self.width - self.round_start != first_node:
            raise RuntimeError(f"forward_tree: the round holds {self.width - self.round_start} nodes, got nodes from {first_node}")
        before = self.slot_mask[:, :self.round_start]  # (B, C0)
        allowed = torch.cat([before[:, None, :].expand(batch, width, before.shape[1]),
                             ancestors[first_node:end, :end].to(before.device)[None].expand(batch, width, end)], dim=2)
        dtype = next(self.model.parameters()).dtype
        attention_mask = torch.zeros(allowed.shape, dtype=dtype, device=tokens.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, W, C0 + end)
        round_lengths = self.lengths - first_node
        position_ids = round_lengths[:, None] + depth[first_node:end].to(tokens.device)[None]
        logits = self._model_call(tokens, attention_mask, position_ids, width)
        self.slot_mask = torch.cat([self.slot_mask, torch.ones_like(tokens, dtype=torch.bool)], dim=1)
        self.lengths = self.lengths + width
        return logits

    def _model_call(self, tokens, attention_mask, position_ids, logits_to_keep: int) -> torch.Tensor:
        """One cached forward of the model, reported (with its time when there is a clock). Shape: tokens (B, W) -> (B, logits_to_keep, V)"""
        start = self.clock() if self.clock is not None else None
        output = self.model(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=logits_to_keep)
        self.record(self.role, tokens.shape[1], self.clock() - start if start is not None else None)
        return output.logits

    def keep_nodes(self, keep: torch.Tensor) -> None:
        """Keep the tree nodes marked in ``keep`` (a root-to-node path per row) of this round's slots, drop the rest, re-align.

        Shape
        -----
        keep: (B, N) bool over the round's nodes, in the order they were fed
        """
        new = self.slot_mask[:, self.round_start:]
        if new.shape[1] != keep.shape[1]:
            raise RuntimeError(f"keep_nodes: the round holds {new.shape[1]} nodes, keep covers {keep.shape[1]}")
        kept = new & keep
        self.lengths = self.lengths - new.sum(dim=1) + kept.sum(dim=1)
        self.slot_mask = torch.cat([self.slot_mask[:, :self.round_start], kept], dim=1)
        self.compact()

    def begin_round(self) -> None:
        """Mark where the slots of this round start (rollback acts on slots after it)."""
        self.round_start = self.width

    def rollback(self, keep: torch.Tensor) -> None:
        """Keep the first ``keep[b]`` valid slots appended since :meth:`begin_round`, drop the rest, re-align.

        Shape
        -----
        keep: (B,) int64
        """
        new = self.slot_mask[:, self.round_start:]
        rank = torch.cumsum(new, dim=1)
        kept = new & (rank <= keep[:, None])
        self.lengths = self.lengths - new.sum(dim=1) + kept.sum(dim=1)
        self.slot_mask = torch.cat([self.slot_mask[:, :self.round_start], kept], dim=1)
        self.compact()

    def compact(self, force: bool = False) -> None:
        """Drop columns that are padding in every row; re-align rows when holes pile up.

        Cropping the all-padding columns at both ends is a slice (no copy). Holes left
        inside rows by rollbacks are masked and harmless; once there are more than
        ``max(min_holes, hole_fraction * width)`` of them (or ``force``), one gather per
        cache tensor moves every row's valid slots, in order, to the right end.
        """
        mask = self.slot_mask
        total = mask.shape[1]
        if total == 0:
            return
        used = torch.nonzero(mask.any(dim=0)).squeeze(1)
        first, last = (int(used[0]), int(used[-1]) + 1) if used.numel() else (total, total)
        if first > 0 or last < total:
            map_cache(self.cache, lambda t: t[:, :, first:last])
            mask = self.slot_mask = mask[:, first:last]
        width = last - first
        new_width = int(self.lengths.max()) if self.lengths.numel() else 0
        holes = width - new_width
        if holes == 0 or (not force and holes <= max(self.min_holes, self.hole_fraction * width)):
            return
        # gather valid slots to the right end of every row, order kept
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, width - new_width:]
        self.slot_mask = torch.gather(mask, 1, order)

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            index = order.to(tensor.device)[:, None, :, None].expand(tensor.shape[0], tensor.shape[1], new_width, tensor.shape[3])
            return torch.gather(tensor, 2, index)

        map_cache(self.cache, gather)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (finished rows leave), then drop all-padding columns.

        Shape
        -----
        rows: (B',) int64 indices into the current batch
        """
        map_cache(self.cache, lambda t: t.index_select(0, rows.to(t.device)))
        self.slot_mask = self.slot_mask.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.compact()
