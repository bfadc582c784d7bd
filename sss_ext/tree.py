"""Tree verification: the public wrapper of ``torch.ops.sss_ext.verify_tree`` and its fake kernel.

The op runs on the CPU and CUDA (csrc/kernels/cuda/tree.cuh); as for :func:`sss_ext.verify`,
CUDA tensors on a build without CUDA kernels are refused with a ``ValueError`` and the CUDA
kernel's invalid-row marks become the CPU kernel's named error when ``validate``.
"""

from __future__ import annotations

import torch

from .checks import check_same_device
from .checks_tree import check_num_nodes_meta, check_tree_args, check_tree_uniforms_meta
from .ops import _check_device_built, _validated_on_device
from .outputs import TreeVerifyOutput
from .uniforms import draw_uniforms

_VERIFY_TREE = torch.ops.sss_ext.verify_tree.default


def verify_tree(
    target_logits,
    draft_logits,
    draft_tokens,
    parents,
    ref_logits=None,
    *,
    num_nodes=None,
    uniforms=None,
    replacement=True,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    shift=1.0,
    mode="exact",
    top_k_ties="keep",
    generator=None,
    validate=True,
) -> TreeVerifyOutput:
    """One batched round of SSS tree verification (multi-draft recursive rejection sampling).

    Starting at the root with ``p = p*`` and ``q = r~`` of node 0, each child ``x`` of the
    current node, in increasing node index, is accepted with probability ``min(1, p(x)/q(x))``;
    acceptance moves to the child (fresh ``p*``, ``r~``); a rejection replaces ``p`` by
    ``normalize((p - q)+)`` and, for siblings drawn without replacement, removes ``x`` from
    ``q``. At the node where no child is left, one token is drawn from ``p``. Each emitted
    token follows the tilted target ``p* ∝ warp(q (r/d)^shift)`` given the ones before it
    (docs/algorithm.md §13). A chain (``parents = [-1, 0, 1, ..., K-1]``) is :func:`sss_ext.verify`
    with the same uniforms.

    Parameters
    ----------
    target_logits : torch.Tensor
        Logits of the target ``q`` at every node: the distribution of the token after the
        node's path (node 0, the root, is the current context).
    draft_logits : torch.Tensor
        Logits of the aligned draft ``r`` at every node; a node's children were drawn from
        ``sss_ext.warp_probs(draft_logits[:, c], temperature, top_k, top_p, top_k_ties=top_k_ties)``.
        At a leaf they enter only the tilt: without ``ref_logits`` (or with ``shift=0``) they
        are neither read nor checked there, as at :func:`sss_ext.verify`'s bonus position.
    draft_tokens : torch.Tensor
        int64 token of each node (column 0, the root, is not read).
    parents : torch.Tensor
        int64 parent of each node: ``-1`` at node 0, ``0 <= parents[b, c] < c`` otherwise.
    ref_logits : torch.Tensor, optional
        Logits of the reference draft ``d``. None gives standard speculative sampling.
    num_nodes : torch.Tensor, optional
        int64 per-row node counts in ``[1, N]``: nothing at a node ``>= num_nodes[b]`` (logits,
        parents, tokens, uniforms) is read or checked. None: ``N`` for every row.
    uniforms : torch.Tensor, optional
        float64 in (0, 1): column ``c - 1`` is the acceptance coin of node ``c``; column
        ``n - 1`` (``n`` the row's node count) drives the final draw. Drawn from ``generator``
        when None.
    replacement : bool
        Whether siblings were drawn i.i.d. from ``r~`` (True) or without replacement (False).
    temperature : float
        ``> 0`` divides all logits; ``0`` is greedy (accept the first child that is the tilted
        argmax at its parent; the last token is the tilted argmax at the last node).
    top_k, top_p : int, float
        Truncation of ``p*`` and ``r~`` as in :func:`sss_ext.verify`; ``0`` / ``1.0`` disable.
    shift : float
        ``lambda >= 0``, the strength of the reward shift ``(r/d)^lambda``.
    mode : {"exact"}
        Only the exact rule; ``"paper"`` is refused.
    top_k_ties : {"keep", "exact-k"}
        The top-k tie rule shared with :func:`sss_ext.verify`.
    generator : torch.Generator, optional
        Source of the uniforms when ``uniforms`` is None.
    validate : bool
        On CUDA, raise the named ``ValueError`` for invalid values (node counts, parents, token
        ids, uniforms, logits) at the cost of one small device-to-host read; ``False`` keeps
        the call free of host synchronisation and marks invalid rows with
        ``num_accepted = -1`` (path and tokens ``-1``, ``log_z`` NaN). The CPU kernel always
        raises.

    Returns
    -------
    TreeVerifyOutput
        ``path`` (accepted node indices from the root, then -1), ``tokens`` (accepted drafts,
        the correction/bonus token, then -1), ``num_accepted``, ``log_z``.

    Raises
    ------
    ValueError
        Naming the argument for a wrong shape, dtype, device or value (parents not before their
        node, node counts outside ``[1, N]``, token ids outside ``[0, V)``, uniforms outside
        (0, 1), NaN/+inf logits), for ``mode="paper"`` and for CUDA tensors on a build without
        CUDA kernels.

    Shape
    -----
    target_logits, draft_logits, ref_logits: (B, N, V); draft_tokens, parents, uniforms: (B, N);
    num_nodes: (B,) -> path (B, N), tokens (B, N), num_accepted (B,), log_z (B, N)
    """
    try:
        device = getattr(target_logits, "device", None)
        if isinstance(device, torch.device) and device.type != "cpu":
            _check_device_built("target_logits", target_logits)
        if isinstance(temperature, bool) or isinstance(top_k, bool) or isinstance(top_p, bool) or isinstance(shift, bool):
            raise TypeError("a bool where the op takes a number")
        if not isinstance(replacement, bool):
            raise TypeError("replacement must be a bool")
        if uniforms is None:
            uniforms = draw_uniforms(tuple(parents.shape), target_logits.device, generator)
        args = (target_logits, draft_logits, draft_tokens, parents, ref_logits, uniforms, temperature, top_k, top_p, shift, mode,
                replacement, num_nodes, top_k_ties)
        path, tokens, num_accepted, log_z = _VERIFY_TREE(*args)
    except (TypeError, RuntimeError, AttributeError, IndexError):
        (batch, num_nodes_max, _), _ = check_tree_args(target_logits, draft_logits, draft_tokens, parents, ref_logits, temperature,
                                                       top_k, top_p, shift, mode, top_k_ties, replacement)
        if num_nodes is not None:
            check_num_nodes_meta(num_nodes, batch, target_logits.device)
        if uniforms is not None:
            check_tree_uniforms_meta(uniforms, batch, num_nodes_max, target_logits.device)
        raise
    _validated_on_device(_VERIFY_TREE, args, num_accepted, validate)
    return TreeVerifyOutput(path, tokens, num_accepted, log_z)


@torch.library.register_fake("sss_ext::verify_tree")
def _verify_tree_fake(target_logits, draft_logits, draft_tokens, parents, ref_logits, uniforms, temperature, top_k, top_p, shift,
                      mode, replacement, num_nodes=None, top_k_ties="keep"):
    check_same_device(target_logits=target_logits, draft_logits=draft_logits, draft_tokens=draft_tokens, parents=parents,
                      ref_logits=ref_logits, uniforms=uniforms, num_nodes=num_nodes)
    batch, num_nodes_max = parents.shape
    path = parents.new_empty((batch, num_nodes_max))
    tokens = parents.new_empty((batch, num_nodes_max))
    num_accepted = parents.new_empty((batch,))
    log_z = target_logits.new_empty((batch, num_nodes_max), dtype=torch.float32)
    return path, tokens, num_accepted, log_z
