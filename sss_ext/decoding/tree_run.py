"""Tree rounds: the draft proposes a token tree, the target verifies it in one forward.

One round for the active rows, with the tree of ``SamplingConfig.draft_tree``
(:class:`~sss_ext.decoding.draft_tree.DraftTree`, ``N`` nodes, depth ``D``):

1. the draft ``r`` runs one forward per level (``D + 1`` in all: the root, then each level of
   drafted nodes, the last for ``zr`` at the leaves), each node attending to its ancestors
   only (a 4-D tree mask, :meth:`~sss_ext.decoding.cache.KVState.forward_tree`); the children
   of every node are drawn from ``warp(r)`` at that node, i.i.d. or without replacement
   (``SamplingConfig.tree_replacement``);
2. **one** target forward over all ``N`` nodes (and, for SSS, one reference forward) with the
   same mask gives ``zq`` and ``zd`` at every node;
3. ``sss_ext.verify_tree`` walks the tree by recursive rejection sampling and emits the
   accepted path's tokens and one correction/bonus token;
4. every cache keeps the slots of the accepted path (the rest are masked, then cropped or
   re-aligned, see :mod:`sss_ext.decoding.cache`); rows that emitted EOS or spent their budget
   leave the batch (tokens past a row's budget are cut).

Cache invariant between rounds: every cache holds every token of the row but the last one
(``pending``, the next root). Every row consumes ``N - 1`` drafting and ``N`` verification
uniforms of its own stream per round, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

from ..tree import verify_tree
from .context import MethodResult, RunContext
from .draft_tree import DraftTree, draw_children
from .sampler_run import SamplerRun
from .speculative import common_dtype


class TreeRun(SamplerRun):
    """Tree speculative decoding of ``ctx.prompts`` (one row each): SSS (``use_ref``) or standard.

    Shape
    -----
    book.log_z: (B,) sum of log Z over the emitted tokens
    """

    def __init__(self, ctx: RunContext, use_ref: bool):
        config = ctx.config
        self.tree = DraftTree(config.draft_tree)
        super().__init__(ctx, "speculative", spare=self.tree.max_depth + 1)
        self.target = self.kv_state("target")
        self.draft = self.kv_state("draft")
        self.ref = self.kv_state("ref") if use_ref else None
        self.prefill()

    @property
    def states(self) -> list:
        return [s for s in (self.target, self.draft, self.ref) if s is not None]

    def round(self) -> None:
        """One tree round of every active row: draft the tree, verify forwards, verify op, emit, keep the path."""
        tree, config = self.tree, self.config
        self.monitor.round_started()
        for state in self.states:
            state.begin_round()
        tokens, draft_logits = self._draft()
        self.monitor.drafted(len(tree.levels))
        target_logits = self._forward_all(self.target, tokens)
        ref_logits = self._forward_all(self.ref, tokens) if self.ref is not None else None
        target_logits, draft_logits, ref_logits = common_dtype(target_logits, draft_logits, ref_logits)
        batch = tokens.shape[0]
        uniforms = self.streams.draw(self.book.active, tree.num_nodes)
        out = self.monitor.op(verify_tree, target_logits, draft_logits, tokens, tree.parents.expand(batch, -1), ref_logits,
                              uniforms=uniforms, replacement=config.tree_replacement, temperature=config.temperature,
                              top_k=config.top_k, top_p=config.top_p, top_k_ties=config.top_k_ties,
                              shift=config.shift if self.ref is not None else 0.0)
        self.monitor.verified(torch.full_like(out.num_accepted, tree.max_depth), out.num_accepted)
        emitted = tree.max_depth + 1  # the most a round emits: a whole path and its bonus token
        kept, done = self.book.append(out.tokens[:, :emitted], out.num_accepted + 1,
                                      out.log_z[:, :emitted] if self.ref is not None else None)
        self.pending = out.tokens.gather(1, out.num_accepted[:, None]).squeeze(1)
        nodes = torch.arange(tree.num_nodes, device=tokens.device)
        on_path = (out.path[:, :, None] == nodes).any(dim=1)  # (B, N); path is padded with -1
        for state in self.states:
            state.keep_nodes(on_path)
        self.remove(done)

        logits = {"target": target_logits, "draft": draft_logits}
        if ref_logits is not None:
            logits["ref"] = ref_logits
        self.monitor.round_finished("round", tree.num_nodes, self.states, draft_tokens=tokens, logits=logits, verify=out,
                                    tokens=out.tokens, num_emitted=kept, finished=done, tree_parents=tree.parents)

    def _draft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """1. The tree's tokens (root: ``pending``) and ``r``'s processed logits at every node.

        Shape
        -----
        -> tokens (B, N), draft_logits (B, N, V)
        """
        tree, config = self.tree, self.config
        batch = self.pending.shape[0]
        tokens = self.pending.new_zeros((batch, tree.num_nodes))
        tokens[:, 0] = self.pending
        coins = self.streams.draw(self.book.active, tree.num_drafted)  # (B, N-1): node c's draw is coin c-1
        logits_per_level = []
        for depth, (start, end) in enumerate(tree.levels):
            logits = self._processed_nodes(self.draft.forward_tree(tokens[:, start:end], start, tree.ancestors, tree.depth),
                                           start, tokens)
            logits_per_level.append(logits)
            if depth < len(tree.shape):
                branching = tree.shape[depth]
                child_start, child_end = tree.levels[depth + 1]
                level_coins = coins[:, child_start - 1:child_end - 1].reshape(batch, end - start, branching)
                children = draw_children(logits, branching, level_coins, config.tree_replacement, config)
                tokens[:, child_start:child_end] = children.reshape(batch, -1)
        return tokens, torch.cat(logits_per_level, dim=1)

    def _forward_all(self, state, tokens: torch.Tensor) -> torch.Tensor:
        """2. One forward of ``state``'s model over every node. Shape: tokens (B, N) -> (B, N, V)"""
        return self._processed_nodes(state.forward_tree(tokens, 0, self.tree.ancestors, self.tree.depth), 0, tokens)

    def _processed_nodes(self, logits: torch.Tensor, first_node: int, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of nodes ``first_node ..`` after the logits processors, each after its own path.

        Shape
        -----
        logits: (B, W, V); tokens: (B, N) -> (B, W, V)
        """
        if self.logits_hooks is None:
            return logits
        columns = []
        for offset in range(logits.shape[1]):
            path = self.tree.paths[first_node + offset]
            columns.append(self.processed([tokens[:, node] for node in path[1:]], logits[:, offset:offset + 1]))
        return torch.cat(columns, dim=1)


def run_tree(ctx: RunContext, use_ref: bool) -> MethodResult:
    """sss and sd with ``SamplingConfig.draft_tree``: one tree run over every prompt."""
    run = TreeRun(ctx, use_ref)
    run.run()
    log_z = run.book.log_z.cpu().tolist() if use_ref else None
    return MethodResult(sequences=run.book.sequences(), log_z=log_z, extras=[{} for _ in ctx.prompts])
