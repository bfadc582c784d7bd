"""The token tree a tree round drafts: its shape, and how the children of a level are drawn.

A shape ``(b_1, .., b_D)`` gives every node at depth ``t - 1`` ``b_t`` children. Node 0 is
the root (the row's pending token, the last one emitted); nodes are numbered level by level
(breadth first), so every level is a contiguous range, parents come before their children and
a chain of ``K`` drafts is the shape ``(1,) * K``. The rule that verifies the tree is
``sss_ext.verify_tree`` (docs/algorithm.md, "Tree verification").
"""

from __future__ import annotations

import math

import torch

from ..reference import inverse_cdf
from ..warp import warp_probs

MAX_TREE_NODES = 256


def check_tree_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of ints >= 1 with at most :data:`MAX_TREE_NODES` nodes; ``ValueError`` naming ``draft_tree``."""
    if (not isinstance(shape, (tuple, list)) or not shape
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in shape)):
        raise ValueError(f"draft_tree must be a non-empty tuple of ints >= 1 (children per node at each depth), got {shape!r}")
    shape = tuple(int(b) for b in shape)
    nodes = 1 + sum(math.prod(shape[:t]) for t in range(1, len(shape) + 1))
    if nodes > MAX_TREE_NODES:
        raise ValueError(f"draft_tree {shape} has {nodes} nodes; at most {MAX_TREE_NODES} are supported")
    return shape


class DraftTree:
    """Topology of the tree of ``shape``.

    Attributes
    ----------
    parents : torch.Tensor
        int64 parent of every node, -1 at the root.
    depth : torch.Tensor
        int64 depth of every node (0 at the root).
    ancestors : torch.Tensor
        bool, ``ancestors[c, a]`` iff node ``a`` is on the root-to-``c`` path (``c`` included).
    levels : list of (int, int)
        ``[start, end)`` node range of each depth ``0 .. D``.
    paths : list of list of int
        The root-to-node path of every node.

    Shape
    -----
    parents, depth: (N,); ancestors: (N, N)
    """

    def __init__(self, shape):
        self.shape = check_tree_shape(shape)
        parents, levels = [-1], [(0, 1)]
        for branching in self.shape:
            start, end = levels[-1]
            for parent in range(start, end):
                parents.extend([parent] * branching)
            levels.append((end, len(parents)))
        self.levels = levels
        self.num_nodes = len(parents)
        self.parents = torch.tensor(parents, dtype=torch.int64)
        self.paths = []
        for node, parent in enumerate(parents):
            self.paths.append([node] if parent < 0 else self.paths[parent] + [node])
        self.depth = torch.tensor([len(path) - 1 for path in self.paths], dtype=torch.int64)
        self.ancestors = torch.zeros((self.num_nodes, self.num_nodes), dtype=torch.bool)
        for node, path in enumerate(self.paths):
            self.ancestors[node, path] = True

    @property
    def max_depth(self) -> int:
        """Drafts on the longest path (the most a round can accept)."""
        return len(self.shape)

    @property
    def num_drafted(self) -> int:
        """Drafted nodes (every node but the root)."""
        return self.num_nodes - 1


def draw_children(logits: torch.Tensor, count: int, uniforms: torch.Tensor, replacement: bool, config) -> torch.Tensor:
    """``count`` children of each node from ``r~ = warp(softmax(logits / tau))``: i.i.d.
    (``replacement``), or without replacement (each draw from ``r~`` without the earlier
    children, renormalised). Once ``r~`` has no mass left the remaining children repeat the
    first one (verification rejects them without reading a coin's outcome). At ``tau = 0``
    the children are the ``count`` largest logits (without replacement) or the argmax repeated.

    Shape
    -----
    logits: (B, n, V); uniforms: (B, n, count) -> (B, n, count) int64
    """
    batch, nodes, vocab_size = logits.shape
    flat = logits.reshape(batch * nodes, vocab_size).double()
    coins = uniforms.reshape(batch * nodes, count)
    if config.temperature == 0.0:
        ranked = torch.argsort(-flat, dim=-1, stable=True)[:, :min(count, vocab_size)]
        if replacement or ranked.shape[1] < count:
            ranked = torch.cat([ranked, ranked[:, :1].expand(-1, count - ranked.shape[1])], dim=1)
        children = ranked[:, :1].expand(-1, count) if replacement else ranked
        return children.reshape(batch, nodes, count)
    weights = warp_probs(flat, config.temperature, config.top_k, config.top_p, top_k_ties=config.top_k_ties)
    children = []
    for j in range(count):
        if replacement or j == 0:
            children.append(inverse_cdf(weights, coins[:, j]))
            continue
        weights = weights.scatter(1, children[-1][:, None], 0.0)
        exhausted = weights.sum(dim=1) <= 0
        drawn = inverse_cdf(torch.where(exhausted[:, None], 1.0, weights), coins[:, j])
        children.append(torch.where(exhausted, children[0], drawn))
    return torch.stack(children, dim=1).reshape(batch, nodes, count)
