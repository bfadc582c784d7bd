"""Argument validation shared by the op wrappers and the reference.

Every check raises ``ValueError`` naming the argument and what was expected, so a bad
call fails before any kernel runs. Checks here look only at metadata (shapes, dtypes,
devices, Python scalars) and at the small integer/uniform tensors; the kernels check
the logits' values (NaN, +inf, rows without support) themselves.
"""

from __future__ import annotations

import math

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("exact", "paper")
# Top-k tie rules (docs/algorithm.md §2): "keep" keeps every token tied with the k-th largest
# score, "exact-k" keeps exactly k, ties to the lower index.
TOP_K_TIES = ("keep", "exact-k")
# Verification rules (docs/algorithm.md §3, §12): "token" accepts each draft on its own coin,
# "block" decides the accepted prefix jointly (block verification).
VERIFICATIONS = ("token", "block")
MAX_TOP_K = 2**63 - 1
# Largest magnitude of a finite scaled logit z / temperature and of the row maximum of the
# tilted score (kMaxScaledScore in csrc/kernels/common.h; docs/algorithm.md §7).
MAX_SCALED_SCORE = 1e300


def check_tensor(name: str, value, *, ndim: int, dtypes) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        expected = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{name} must have dtype {expected}, got {str(value.dtype).replace('torch.', '')}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_sampling(temperature, top_k, top_p) -> tuple[float, int, float]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0 (0 means greedy), got {temperature!r}")
    if temperature > 0 and not math.isfinite(1.0 / temperature):
        raise ValueError(f"temperature must be 0 (greedy) or have a finite inverse (>= 5.6e-309), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it) and <= 2**63 - 1, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a float in (0, 1] (1 disables it), got {top_p!r}")
    return float(temperature), int(top_k), float(top_p)


def check_top_k_ties(top_k_ties) -> str:
    if not isinstance(top_k_ties, str) or top_k_ties not in TOP_K_TIES:
        raise ValueError(f"top_k_ties must be one of {TOP_K_TIES}, got {top_k_ties!r}")
    return top_k_ties


def check_verification(verification, mode="exact") -> str:
    if not isinstance(verification, str) or verification not in VERIFICATIONS:
        raise ValueError(f"verification must be one of {VERIFICATIONS}, got {verification!r}")
    if verification == "block" and mode == "paper":
        raise ValueError("verification='block' needs mode='exact': block verification is exact for a target and a "
                         "proposal, which the paper rule (mode='paper') does not verify against")
    return verification


def check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift < 0:
        raise ValueError(f"shift (lambda) must be a finite float >= 0, got {shift!r}")
    return float(shift)


def check_mode(mode, ref_logits) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "paper" and ref_logits is None:
        raise ValueError("mode='paper' needs ref_logits: the paper's rule divides by the reference draft d")
    return mode


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Values of an int64 id tensor must lie in [0, vocab_size). Syncs on CUDA."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), found {bad}")


def check_uniforms_meta(uniforms, shape: tuple, meaning: str, device) -> torch.Tensor:
    """Uniforms must be a float64 tensor of ``shape`` on ``device``; no value is read."""
    check_tensor("uniforms", uniforms, ndim=len(shape), dtypes=(torch.float64,))
    check_shape("uniforms", uniforms, shape, meaning)
    if uniforms.device != torch.device(device):
        raise ValueError(f"uniforms must be on {device} like the logits, got {uniforms.device}")
    return uniforms


def check_uniforms(uniforms, shape: tuple, meaning: str, device) -> torch.Tensor:
    """Uniforms must be float64 in the open interval (0, 1). Syncs on CUDA."""
    check_uniforms_meta(uniforms, shape, meaning, device)
    if uniforms.numel() and not bool(((uniforms > 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must lie in the open interval (0, 1); 0, 1 and NaN are not allowed")
    return uniforms


def check_num_draft_tokens_meta(num_draft_tokens, batch: int, device) -> torch.Tensor:
    """Per-row draft counts must be an int64 ``(B,)`` tensor on ``device``; no value is read."""
    check_tensor("num_draft_tokens", num_draft_tokens, ndim=1, dtypes=(torch.int64,))
    check_shape("num_draft_tokens", num_draft_tokens, (batch,), "(B,)")
    if num_draft_tokens.device != torch.device(device):
        raise ValueError(f"num_draft_tokens must be on {device} like the logits, got {num_draft_tokens.device}")
    return num_draft_tokens


def check_num_draft_tokens(num_draft_tokens, batch: int, num_draft_tokens_max: int, device) -> torch.Tensor:
    """Per-row draft counts must hold values in ``[0, K]``. Syncs on CUDA.

    Shape
    -----
    num_draft_tokens: (B,)
    """
    check_num_draft_tokens_meta(num_draft_tokens, batch, device)
    outside = (num_draft_tokens < 0) | (num_draft_tokens > num_draft_tokens_max)
    if bool(outside.any()):
        row = int(outside.nonzero()[0])
        raise ValueError(
            f"num_draft_tokens must hold values in [0, K] = [0, {num_draft_tokens_max}], "
            f"found {int(num_draft_tokens[row])} at row {row}"
        )
    return num_draft_tokens


def tilt_logits(draft_logits, aligned_logits, ref_logits, shift, mode):
    """The logits of the aligned draft ``r`` a verify call reads, or None when none is read.

    ``draft_logits`` (the proposal, also in the tilt) when given; for one-hot drafts
    (``draft_logits`` None, docs/algorithm.md §11) ``aligned_logits``, which only the tilt
    reads: needed with ``ref_logits`` and ``shift > 0``, refused without ``ref_logits``.
    Checks the combination only; shapes and dtypes are checked by :func:`check_verify_args`.
    """
    if aligned_logits is not None and ref_logits is None:
        raise ValueError("aligned_logits without ref_logits has no use: it enters only the tilt q (r/d)^shift")
    if draft_logits is not None:
        if aligned_logits is not None:
            raise ValueError("aligned_logits is only for one-hot drafts (draft_logits=None); with draft_logits given, "
                             "the tilt reads draft_logits")
        return draft_logits
    if mode == "paper":
        raise ValueError("mode='paper' needs draft_logits: the paper's rule divides by the draft's probabilities, "
                         "which one-hot drafts (draft_logits=None) do not have")
    if ref_logits is None or (isinstance(shift, (int, float)) and shift == 0):
        return None
    if aligned_logits is None:
        raise ValueError("one-hot drafts (draft_logits=None) with ref_logits and shift > 0 need aligned_logits (B, K+1, V): "
                         "the tilt q (r/d)^shift reads the aligned draft r")
    return aligned_logits


def check_verify_args(target_logits, draft_logits, draft_tokens, ref_logits, temperature, top_k, top_p, shift, mode,
                      aligned_logits=None):
    """Validate metadata of a verify call; returns (batch, num_draft_tokens, vocab_size) and scalars.

    ``draft_logits`` None is a one-hot proposal; then ``aligned_logits`` stands for ``r`` in
    the tilt (see :func:`tilt_logits`).
    """
    check_tensor("target_logits", target_logits, ndim=3, dtypes=LOGIT_DTYPES)
    check_tensor("draft_tokens", draft_tokens, ndim=2, dtypes=(torch.int64,))
    batch, num_draft_tokens = draft_tokens.shape
    vocab_size = target_logits.shape[-1]
    if vocab_size < 1:
        raise ValueError("target_logits must have a vocabulary dimension of size >= 1")
    check_shape("target_logits", target_logits, (batch, num_draft_tokens + 1, vocab_size), "(B, K+1, V)")
    r_logits = tilt_logits(draft_logits, aligned_logits, ref_logits, shift, mode)
    r_name = "draft_logits" if draft_logits is not None else "aligned_logits"
    if r_logits is not None:
        check_tensor(r_name, r_logits, ndim=3, dtypes=LOGIT_DTYPES)
    if ref_logits is None:
        if r_logits is not None and tuple(r_logits.shape) not in ((batch, num_draft_tokens, vocab_size),
                                                                  (batch, num_draft_tokens + 1, vocab_size)):
            raise ValueError(
                f"{r_name} must have shape (B, K, V) = {(batch, num_draft_tokens, vocab_size)} or (B, K+1, V), "
                f"got {tuple(r_logits.shape)}"
            )
    else:
        if r_logits is not None:
            check_shape(r_name, r_logits, (batch, num_draft_tokens + 1, vocab_size), "(B, K+1, V) when ref_logits is given")
        check_tensor("ref_logits", ref_logits, ndim=3, dtypes=LOGIT_DTYPES)
        check_shape("ref_logits", ref_logits, (batch, num_draft_tokens + 1, vocab_size), "(B, K+1, V)")
    for name, tensor in ((r_name, r_logits), ("ref_logits", ref_logits)):
        if tensor is not None and tensor.dtype != target_logits.dtype:
            raise ValueError(f"{name} must have the dtype of target_logits ({target_logits.dtype}), got {tensor.dtype}")
    check_same_device(target_logits=target_logits, **{r_name: r_logits}, draft_tokens=draft_tokens, ref_logits=ref_logits)
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    shift = check_shift(shift)
    mode = check_mode(mode, ref_logits)
    return (batch, num_draft_tokens, vocab_size), (temperature, top_k, top_p, shift, mode)


def check_sample_args(logits, temperature, top_k, top_p):
    """Validate metadata of a sample call; returns (batch, vocab_size) and the scalars."""
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    batch, vocab_size = logits.shape
    if vocab_size < 1:
        raise ValueError("logits must have a vocabulary dimension of size >= 1")
    return (batch, vocab_size), check_sampling(temperature, top_k, top_p)


def check_scaled_range(name: str, logits: torch.Tensor, inverse_temperature: float) -> None:
    """Finite ``logits * inverse_temperature`` must lie in [-MAX_SCALED_SCORE, MAX_SCALED_SCORE]."""
    finite = logits.to(torch.float64).masked_fill(torch.isneginf(logits), 0.0)
    if finite.numel() and not float(finite.abs().amax()) * inverse_temperature <= MAX_SCALED_SCORE:
        raise ValueError(
            f"{name} / temperature leaves the supported range [-1e300, 1e300]: "
            "use a larger temperature (or 0 for greedy) or smaller logits"
        )


def check_logit_values(name: str, logits: torch.Tensor) -> None:
    """No NaN or +inf anywhere, and at least one finite logit in every row. Syncs on CUDA."""
    bad = torch.isnan(logits) | (logits == float("inf"))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite or -inf; found NaN or +inf at index {where}")
    empty = (logits == float("-inf")).all(dim=-1)
    if bool(empty.any()):
        where = tuple(int(i) for i in empty.nonzero()[0])
        raise ValueError(f"{name} has a row with every logit -inf (no token can be drawn) at index {where}")
