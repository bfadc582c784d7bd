"""Result types shared by the op wrappers and the reference."""

from __future__ import annotations

from typing import NamedTuple

import torch


class VerifyOutput(NamedTuple):
    """Result of one batched verification round.

    Attributes
    ----------
    tokens : torch.Tensor
        int64, the accepted draft tokens, then the correction or bonus token, then ``-1``.
    num_accepted : torch.Tensor
        int64, accepted draft tokens per row; each row emits ``num_accepted + 1`` tokens.
    log_z : torch.Tensor
        float32, ``log Z`` with ``Z = sum_v q(v) (r(v) / d(v))**lambda`` (tempered, untruncated
        softmaxes) at every position; ``0`` without ``ref_logits`` or at temperature 0.

    Shape
    -----
    tokens: (B, K+1); num_accepted: (B,); log_z: (B, K+1)
    """

    tokens: torch.Tensor
    num_accepted: torch.Tensor
    log_z: torch.Tensor


class TreeVerifyOutput(NamedTuple):
    """Result of one batched tree verification round (:func:`sss_ext.verify_tree`).

    Attributes
    ----------
    path : torch.Tensor
        int64, the node indices of the accepted path, starting at the root ``0``, then ``-1``.
    tokens : torch.Tensor
        int64, the accepted nodes' draft tokens, then the correction or bonus token, then ``-1``.
    num_accepted : torch.Tensor
        int64, accepted draft tokens per row; each row emits ``num_accepted + 1`` tokens.
    log_z : torch.Tensor
        float32, ``log Z`` of the path's node at each emitted position (``path[b, i]`` for
        ``i <= num_accepted[b]``), ``0`` past it, without ``ref_logits`` or at temperature 0.

    Shape
    -----
    path, tokens, log_z: (B, N); num_accepted: (B,)
    """

    path: torch.Tensor
    tokens: torch.Tensor
    num_accepted: torch.Tensor
    log_z: torch.Tensor
