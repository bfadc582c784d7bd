"""Argument validation of tree verification (:func:`sss_ext.verify_tree` and its reference).

Like :mod:`sss_ext.checks`, every check raises ``ValueError`` naming the argument and what
was expected. Row ``b`` has ``n = num_nodes[b]`` nodes; nothing at a node ``>= n`` (and no
uniform in a column ``>= n``) is read or checked.
"""

from __future__ import annotations

import torch

from .checks import (
    LOGIT_DTYPES,
    check_same_device,
    check_sampling,
    check_shape,
    check_shift,
    check_tensor,
    check_top_k_ties,
    check_uniforms_meta,
)


def check_tree_mode(mode) -> str:
    if mode != "exact":
        raise ValueError(f"mode must be 'exact' for tree verification (the paper's rule has no tree form), got {mode!r}")
    return mode


def check_tree_args(target_logits, draft_logits, draft_tokens, parents, ref_logits, temperature, top_k, top_p, shift,
                    mode, top_k_ties, replacement):
    """Validate the metadata of a tree verification call; returns (batch, N, V) and the scalars.

    Shape
    -----
    target_logits, draft_logits, ref_logits: (B, N, V); draft_tokens, parents: (B, N)
    """
    check_tensor("target_logits", target_logits, ndim=3, dtypes=LOGIT_DTYPES)
    batch, num_nodes_max, vocab_size = target_logits.shape
    if num_nodes_max < 1:
        raise ValueError(f"target_logits must have shape (B, N, V) with N >= 1 (node 0 is the root), got {tuple(target_logits.shape)}")
    if vocab_size < 1:
        raise ValueError("target_logits must have a vocabulary dimension of size >= 1")
    given = [("draft_logits", draft_logits)] + ([("ref_logits", ref_logits)] if ref_logits is not None else [])
    for name, logits in given:
        check_tensor(name, logits, ndim=3, dtypes=LOGIT_DTYPES)
        check_shape(name, logits, (batch, num_nodes_max, vocab_size), "(B, N, V)")
        if logits.dtype != target_logits.dtype:
            raise ValueError(f"{name} must have the dtype of target_logits ({target_logits.dtype}), got {logits.dtype}")
    for name, ids in (("draft_tokens", draft_tokens), ("parents", parents)):
        check_tensor(name, ids, ndim=2, dtypes=(torch.int64,))
        check_shape(name, ids, (batch, num_nodes_max), "(B, N)")
    check_same_device(target_logits=target_logits, draft_logits=draft_logits, draft_tokens=draft_tokens, parents=parents,
                      ref_logits=ref_logits)
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    shift = check_shift(shift)
    check_tree_mode(mode)
    check_top_k_ties(top_k_ties)
    if not isinstance(replacement, bool):
        raise ValueError(f"replacement must be a bool (siblings drawn i.i.d.: True; without replacement: False), got {replacement!r}")
    return (batch, num_nodes_max, vocab_size), (temperature, top_k, top_p, shift)


def check_num_nodes_meta(num_nodes, batch: int, device) -> torch.Tensor:
    """Per-row node counts must be an int64 ``(B,)`` tensor on ``device``; no value is read."""
    check_tensor("num_nodes", num_nodes, ndim=1, dtypes=(torch.int64,))
    check_shape("num_nodes", num_nodes, (batch,), "(B,)")
    if num_nodes.device != torch.device(device):
        raise ValueError(f"num_nodes must be on {device} like the logits, got {num_nodes.device}")
    return num_nodes


def check_tree_values(num_nodes, parents, draft_tokens, uniforms, num_nodes_max: int, vocab_size: int) -> torch.Tensor:
    """Values of the small tensors, each up to its row's node count; returns the counts ``(B,)``.

    ``num_nodes`` in ``[1, N]``; ``parents[b, 0] = -1`` and ``0 <= parents[b, c] < c``;
    ``draft_tokens[b, c]`` in ``[0, V)`` for ``c >= 1``; ``uniforms[b, c]`` in (0, 1).
    Syncs on CUDA.
    """
    batch = parents.shape[0]
    if num_nodes is None:
        num_nodes = torch.full((batch,), num_nodes_max, dtype=torch.int64, device=parents.device)
    outside = (num_nodes < 1) | (num_nodes > num_nodes_max)
    if bool(outside.any()):
        row = int(outside.nonzero()[0])
        raise ValueError(f"num_nodes must hold values in [1, N] = [1, {num_nodes_max}], found {int(num_nodes[row])} at row {row}")
    node = torch.arange(num_nodes_max, device=parents.device).expand(batch, -1)
    used = node < num_nodes[:, None]
    bad_root = parents[:, 0] != -1
    if bool(bad_root.any()):
        row = int(bad_root.nonzero()[0])
        raise ValueError(f"parents[b, 0] must be -1 (node 0 is the root), found {int(parents[row, 0])} at row {row}")
    bad_parent = used & (node >= 1) & ((parents < 0) | (parents >= node))
    if bool(bad_parent.any()):
        row, c = (int(i) for i in bad_parent.nonzero()[0])
        raise ValueError(f"parents must satisfy 0 <= parents[b, c] < c for nodes c >= 1, found {int(parents[row, c])} at "
                         f"(row, node) ({row}, {c})")
    bad_token = used & (node >= 1) & ((draft_tokens < 0) | (draft_tokens >= vocab_size))
    if bool(bad_token.any()):
        row, c = (int(i) for i in bad_token.nonzero()[0])
        raise ValueError(f"draft_tokens must hold token ids in [0, {vocab_size}) at nodes c >= 1, found "
                         f"{int(draft_tokens[row, c])} at (row, node) ({row}, {c})")
    bad_uniform = used & ~((uniforms > 0) & (uniforms < 1))
    if bool(bad_uniform.any()):
        row, c = (int(i) for i in bad_uniform.nonzero()[0])
        raise ValueError(f"uniforms must lie in the open interval (0, 1); 0, 1 and NaN are not allowed, found at (row, column) "
                         f"({row}, {c})")
    return num_nodes


def check_tree_uniforms_meta(uniforms, batch: int, num_nodes_max: int, device) -> torch.Tensor:
    """Uniforms must be a float64 ``(B, N)`` tensor on ``device``; no value is read."""
    return check_uniforms_meta(uniforms, (batch, num_nodes_max), "(B, N)", device)
