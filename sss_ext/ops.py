"""Public entry points of the op family: uniforms, dispatch to ``torch.ops.sss_ext``, CUDA error replay.

The registered ops (schemas in ``csrc/ops.cpp``) run on the tensors' device and validate
their arguments in the C++ adapter (``csrc/adapter/bridge.h``), once per call. The
wrappers here add what the adapter cannot do: draw the uniforms, refuse CUDA tensors on a
build without CUDA kernels, turn the CUDA kernels' invalid-row marks into the CPU kernel's
named ``ValueError``, and name an argument the op's schema refuses (a list for a tensor, a
bool or a string for a number) with the checks of :mod:`sss_ext.checks`, which run only
then. The pure-PyTorch reference (:mod:`sss_ext.reference`) is never a silent fallback.
"""

from __future__ import annotations

import torch

from . import _C
from .checks import (
    check_same_device,
    check_sample_args,
    check_top_k_ties,
    check_num_draft_tokens_meta,
    check_uniforms_meta,
    check_verification,
    check_verify_args,
)
from .outputs import VerifyOutput
from .uniforms import draw_uniforms

BUILD_INFO = _C.build_info()
_VERIFY = torch.ops.sss_ext.verify.default
_SAMPLE = torch.ops.sss_ext.sample.default
_BOOL = bool


def _check_device_built(name: str, tensor: torch.Tensor) -> None:
    kind = tensor.device.type
    if kind == "cuda" and not BUILD_INFO["cuda"]:
        raise ValueError(
            f"{name} is on {tensor.device}, but this sss_ext build has no CUDA kernels "
            "(see `python -m sss_ext.info`); rebuild with a CUDA torch and CUDA_HOME set, or move the tensors to the CPU"
        )
    if kind not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name} is on {tensor.device}; sss_ext has kernels for cpu and cuda only")


def _validated_on_device(op, args: tuple, marks: torch.Tensor, validate: bool) -> None:
    """On CUDA with ``validate``, one small device-to-host read of the invalid-row flags.

    The CPU kernels raise a named ``ValueError`` themselves. The CUDA kernels mark an
    invalid row (``-1`` in ``marks``) instead of synchronising; when a row is marked, the
    call is replayed on CPU copies of the inputs so that the same named ``ValueError`` is
    raised. The flags are built only here, on CUDA with ``validate``.
    """
    if not validate or marks.device.type != "cuda":
        return
    invalid_rows = marks < 0
    if torch.cuda.is_current_stream_capturing():
        raise ValueError("validate=True reads a flag back to the host, which CUDA-graph capture forbids: "
                         "pass validate=False inside a capture (invalid rows then come back as -1)")
    if not bool(invalid_rows.any()):
        return
    op(*(arg.cpu() if isinstance(arg, torch.Tensor) else arg for arg in args))
    rows = invalid_rows.nonzero().flatten().tolist()
    raise ValueError(f"the CUDA kernel found invalid input in rows {rows[:8]} (the CPU kernel accepts the same input)")


def verify(
    target_logits,
    draft_logits,
    draft_tokens,
    ref_logits=None,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    shift=1.0,
    mode="exact",
    num_draft_tokens=None,
    uniforms=None,
    generator=None,
    validate=True,
    top_k_ties="keep",
    aligned_logits=None,
    verification="token",
) -> VerifyOutput:
    """One batched round of Reward-Shifted Speculative Sampling verification.

    Accepts draft token ``x[i]`` iff ``u[i] < p*(x[i]) / r~(x[i])`` with the tilted target
    ``p* ∝ warp(q (r/d)^shift)`` and the proposal ``r~ = warp(r)``; emits the accepted drafts
    followed by one correction (from ``(p* - r~)+``) or bonus (from ``p*[K]``) token.

    Probabilities instead of logits: pass ``sss_ext.logits_from_probs(probs)`` for each of
    ``target_logits``, ``draft_logits`` and ``ref_logits`` (float32 ``log p``, ``-inf`` where
    ``p = 0``, rows checked to sum to 1) and keep ``temperature=1.0``, ``top_k=0``, ``top_p=1.0``.

    Parameters
    ----------
    target_logits : torch.Tensor
        Logits of the target ``q`` after the prefix and after each draft token.
    draft_logits : torch.Tensor or None
        Logits of the aligned draft ``r`` (the proposer). Position ``K`` may be omitted
        when ``ref_logits`` is None. None: one-hot drafts from a deterministic proposer
        (n-gram / prompt lookup, greedy drafts): ``x[i]`` is accepted with probability
        ``p*(x[i])`` and the correction is drawn from ``p*`` without ``x[i]``
        (docs/algorithm.md §11); ``mode="paper"`` is refused.
    draft_tokens : torch.Tensor
        int64 draft tokens, drawn from
        ``sss_ext.warp_probs(draft_logits[:, :K], temperature, top_k, top_p, top_k_ties=top_k_ties)``
        (any tokens for one-hot drafts).
    ref_logits : torch.Tensor, optional
        Logits of the reference draft ``d``. None gives standard speculative sampling.
    temperature : float
        ``> 0`` divides all logits; ``0`` is greedy (accept iff the draft is the tilted argmax).
    top_k : int
        Truncate ``p*`` and ``r~`` to the ``top_k`` most likely tokens; ``0`` disables.
    top_p : float
        Truncate ``p*`` and ``r~`` to their nucleus of mass ``top_p``; ``1.0`` disables.
    shift : float
        ``lambda >= 0``, the strength of the reward shift ``(r/d)^lambda``.
    mode : {"exact", "paper"}
        ``"paper"`` reproduces the published rule, which omits the normaliser ``Z``.
    num_draft_tokens : torch.Tensor, optional
        int64 per-row draft counts ``n`` in ``[0, K]`` (the ragged layout): row ``b``
        verifies only ``draft_tokens[b, :n[b]]`` and draws its correction/bonus token with
        ``uniforms[b, n[b]]``, the bonus from ``p*`` at position ``n[b]``; ``n[b] = 0`` is
        plain sampling from ``p*[b, 0]``. Nothing past position ``n[b]`` is read or
        checked (logits, draft ids, uniforms may hold anything there); ``log_z[b, p]`` is
        ``0`` for ``p > n[b]``. None: ``K`` for every row.
    uniforms : torch.Tensor, optional
        float64 in (0, 1): columns ``0..K-1`` are acceptance coins, column ``K`` (``n[b]``
        for ragged rows) drives the correction/bonus draw by inverse CDF. Drawn from
        ``generator`` when None.
    generator : torch.Generator, optional
        Source of the uniforms when ``uniforms`` is None.
    validate : bool
        On CUDA, raise the named ``ValueError`` for invalid values (draft ids, uniforms,
        NaN/+inf or all ``-inf`` logits, out-of-range scaled logits, a ``p*`` without
        support) at the cost of one small device-to-host copy; ``False`` keeps the call
        free of host synchronisation and marks invalid rows with ``num_accepted = -1``
        and ``-1`` tokens. CPU kernels always raise.
    top_k_ties : {"keep", "exact-k"}
        ``"keep"`` (default): top-k also keeps every token whose scaled score equals the
        ``top_k``-th largest (HF's and vLLM's rule, for drafts proposed by their samplers);
        ``"exact-k"``: exactly ``top_k`` tokens, ties to the lower index. Applies to ``p*``
        (ranked by the tilted score) and ``r~`` alike (docs/algorithm.md §2).
    aligned_logits : torch.Tensor, optional
        One-hot drafts only: the aligned draft ``r``'s logits for the tilt
        ``q (r/d)^shift``; needed with ``ref_logits`` and ``shift > 0`` when
        ``draft_logits`` is None, refused otherwise.
    verification : {"token", "block"}
        ``"token"`` (default): each draft is accepted on its own coin, as above.
        ``"block"``: block verification (Sun et al. 2024), which decides the accepted prefix
        jointly and emits at least as many tokens in expectation, with the same law ``p*``;
        ``num_accepted`` is the accepted prefix length ``n`` and the correction is drawn
        from ``(p_n p*_n - r~_n)+`` with the block weight ``p_n`` (docs/algorithm.md §12).
        Costs one more pass over the vocabulary per draft position. Greedy calls use the
        token rule; ``mode="paper"`` is refused.

    Returns
    -------
    VerifyOutput
        ``tokens`` (accepted drafts, correction/bonus, then -1), ``num_accepted``, ``log_z``.

    Shape
    -----
    target_logits: (B, K+1, V); draft_logits: (B, K+1, V) or (B, K, V) or None; draft_tokens: (B, K);
    ref_logits, aligned_logits: (B, K+1, V); num_draft_tokens: (B,); uniforms: (B, K+1)
    -> tokens (B, K+1), num_accepted (B,), log_z (B, K+1)
    """
    try:
        if _BOOL in (type(temperature), type(top_k), type(top_p), type(shift)):
            raise TypeError("a bool where the op takes a number")
        if target_logits.device.type != "cpu":
            _check_device_built("target_logits", target_logits)
        if uniforms is None:
            uniforms = draw_uniforms((draft_tokens.shape[0], draft_tokens.shape[1] + 1), target_logits.device, generator)
        args = (target_logits, draft_logits, draft_tokens, ref_logits, uniforms, temperature, top_k, top_p, shift, mode,
                num_draft_tokens, top_k_ties, aligned_logits, verification)
        tokens, num_accepted, log_z = _VERIFY(*args)
    except (TypeError, RuntimeError, AttributeError, IndexError):
        _name_bad_verify_arguments(target_logits, draft_logits, draft_tokens, ref_logits, uniforms, temperature, top_k,
                                   top_p, shift, mode, num_draft_tokens, top_k_ties, aligned_logits, verification)
        raise
    _validated_on_device(_VERIFY, args, num_accepted, validate)
    return VerifyOutput(tokens, num_accepted, log_z)


def _name_bad_verify_arguments(target_logits, draft_logits, draft_tokens, ref_logits, uniforms, temperature, top_k, top_p,
                               shift, mode, num_draft_tokens, top_k_ties, aligned_logits, verification) -> None:
    """The Python checks of a verify call the op refused: raise the named ``ValueError`` if one applies."""
    (batch, num_draft_max, _), _scalars = check_verify_args(
        target_logits, draft_logits, draft_tokens, ref_logits, temperature, top_k, top_p, shift, mode, aligned_logits
    )
    check_top_k_ties(top_k_ties)
    check_verification(verification, mode)
    _check_device_built("target_logits", target_logits)
    if num_draft_tokens is not None:
        check_num_draft_tokens_meta(num_draft_tokens, batch, target_logits.device)
    if uniforms is not None:
        check_uniforms_meta(uniforms, (batch, num_draft_max + 1), "(B, K+1)", target_logits.device)


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, uniforms=None, generator=None, *, validate=True,
           top_k_ties="keep") -> torch.Tensor:
    """One token per row from ``warp_probs(logits, temperature, top_k, top_p, top_k_ties=top_k_ties)``.

    The draw is the inverse CDF in vocabulary order driven by ``uniforms``, so it matches
    :func:`sss_ext.reference.sample` token for token; ``temperature=0`` is the argmax.
    Probabilities instead of logits: ``sample(sss_ext.logits_from_probs(probs))`` draws from
    ``probs`` (keep ``temperature=1.0``, ``top_k=0``, ``top_p=1.0``).

    Parameters
    ----------
    logits : torch.Tensor
        float32 / bfloat16 / float16 logits; ``-inf`` masks a token.
    temperature, top_k, top_p : float, int, float
        The warping shared with :func:`sss_ext.verify`.
    uniforms : torch.Tensor, optional
        float64 in (0, 1), one per row; drawn from ``generator`` when None.
    generator : torch.Generator, optional
        Source of the uniforms when ``uniforms`` is None.
    validate : bool
        As in :func:`verify`: on CUDA, one small device-to-host copy buys the named
        ``ValueError``; ``False`` marks invalid rows with token ``-1``.
    top_k_ties : {"keep", "exact-k"}
        The top-k tie rule shared with :func:`verify`; ``"keep"`` by default.

    Returns
    -------
    torch.Tensor
        int64 token ids.

    Shape
    -----
    logits: (B, V); uniforms: (B,) -> (B,)
    """
    try:
        if _BOOL in (type(temperature), type(top_k), type(top_p)):
            raise TypeError("a bool where the op takes a number")
        if logits.device.type != "cpu":
            _check_device_built("logits", logits)
        if uniforms is None:
            uniforms = draw_uniforms((logits.shape[0],), logits.device, generator)
        args = (logits, uniforms, temperature, top_k, top_p, top_k_ties)
        tokens = _SAMPLE(*args)
    except (TypeError, RuntimeError, AttributeError, IndexError):
        (batch, _), _scalars = check_sample_args(logits, temperature, top_k, top_p)
        check_top_k_ties(top_k_ties)
        _check_device_built("logits", logits)
        if uniforms is not None:
            check_uniforms_meta(uniforms, (batch,), "(B,)", logits.device)
        raise
    _validated_on_device(_SAMPLE, args, tokens, validate)
    return tokens


@torch.library.register_fake("sss_ext::verify")
def _verify_fake(target_logits, draft_logits, draft_tokens, ref_logits, uniforms, temperature, top_k, top_p, shift, mode,
                 num_draft_tokens=None, top_k_ties="keep", aligned_logits=None, verification="token"):
    # Mixed devices would dispatch here (a meta tensor to the fake kernel): refuse them.
    check_same_device(target_logits=target_logits, draft_logits=draft_logits, draft_tokens=draft_tokens,
                      ref_logits=ref_logits, uniforms=uniforms, num_draft_tokens=num_draft_tokens,
                      aligned_logits=aligned_logits)
    check_verification(verification, mode)
    if num_draft_tokens is not None:
        check_num_draft_tokens_meta(num_draft_tokens, draft_tokens.shape[0], draft_tokens.device)
    batch, num_draft_tokens = draft_tokens.shape
    tokens = draft_tokens.new_empty((batch, num_draft_tokens + 1))
    num_accepted = draft_tokens.new_empty((batch,))
    log_z = target_logits.new_empty((batch, num_draft_tokens + 1), dtype=torch.float32)
    return tokens, num_accepted, log_z


@torch.library.register_fake("sss_ext::sample")
def _sample_fake(logits, uniforms, temperature, top_k, top_p, top_k_ties="keep"):
    check_same_device(logits=logits, uniforms=uniforms)
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)
