"""FlashInfer's ``chain_speculative_sampling`` on :func:`sss_ext.verify`, on CPU and CUDA.

Replace ``from flashinfer.sampling import chain_speculative_sampling`` by
``from sss_ext.compat.flashinfer import chain_speculative_sampling``: the signature, the
shapes, the output layout (int32 ids padded with ``-1``) and the two counters (added to in
place) are FlashInfer 0.7's; the emitted tokens follow the same law. Keyword-only
``ref_probs`` and ``shift`` verify against the tilted target ``p* ∝ target·(draft/ref)^shift``
instead. What differs (the random bits, a draft token of draft probability 0, rows that do
not sum to 1): docs/compat.md.
"""

from __future__ import annotations

import torch

from ..checks import check_same_device, check_shape, check_shift
from ..decoding.randomness import absorb, counter_uniforms, seed_key
from ..ops import verify
from ..probabilities import (
    check_probabilities_meta,
    check_tolerance,
    logits_from_probs,
    probability_flags,
    raise_for_probabilities,
    sum_tolerance,
)
from ..uniforms import draw_uniforms

_WORD_RANGE = 1 << 64


def _seed_word(name: str, value, device) -> torch.Tensor:
    """``seed`` or ``offset`` as one int64 word on ``device``: an int in ``[0, 2**64)`` or a
    one-element int64 tensor (its bits, read on the device; no host synchronisation).

    Shape
    -----
    -> (1,) int64
    """
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise ValueError(f"{name} must be an int or a one-element int64 tensor, got a tensor of dtype "
                             f"{str(value.dtype).replace('torch.', '')}")
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be an int or a one-element int64 tensor, got shape {tuple(value.shape)}: per-row "
                f"{name}s are not supported (one {name} per call; every row draws from its own stream of it)"
            )
        return value.reshape(1).to(device)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in [0, 2**64) or a one-element int64 tensor, got {type(value).__name__}")
    if not 0 <= value < _WORD_RANGE:
        raise ValueError(f"{name} must be an int in [0, 2**64) (FlashInfer's uint64), got {value}")
    signed = value - _WORD_RANGE if value >= 1 << 63 else value
    return torch.full((1,), signed, dtype=torch.int64, device=device)


def seeded_uniforms(seed, offset, batch: int, count: int, device) -> torch.Tensor:
    """The uniforms of a call with ``seed`` and ``offset``: a counter-based hash, as int64 ops on ``device``.

    Row ``b`` takes key ``k_b = mix(mix(seed + g) ^ b + g)`` and draw ``j = 0 .. count-1`` is
    ``u[b, j] = bits_to_uniform(mix(k_b + (offset + j + 1) g))`` with SplitMix64's finaliser
    ``mix`` and increment ``g``, modulo ``2**64`` (the grid and the top-53-bit rule of
    docs/algorithm.md §5). So a row's draws depend on ``(seed, offset, b)`` alone, like
    FlashInfer's Philox streams (seed, subsequence ``b``, offset), and calls whose offsets
    differ by at least ``count`` use disjoint counters. The bits differ from FlashInfer's.

    Shape
    -----
    -> (batch, count) float64 in (0, 1)
    """
    seed_word = _seed_word("seed", seed, device)
    offset_word = _seed_word("offset", offset, device)
    rows = torch.arange(batch, dtype=torch.int64, device=device)
    keys = absorb(seed_key(seed_word), rows)  # (B,)
    counters = offset_word + torch.arange(1, count + 1, dtype=torch.int64, device=device)  # (count,)
    return counter_uniforms(keys, counters)


def _check_counter(name: str, counter, batch: int, device) -> torch.Tensor:
    if not isinstance(counter, torch.Tensor):
        raise ValueError(f"{name} must be None or an int32 tensor of shape (B,), got {type(counter).__name__}")
    if counter.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype int32 (FlashInfer's counters), got {str(counter.dtype).replace('torch.', '')}")
    check_shape(name, counter, (batch,), "(B,)")
    if counter.device != device:
        raise ValueError(f"{name} must be on {device} like draft_probs, got {counter.device}")
    return counter


def _check_arguments(draft_probs, draft_token_ids, target_probs, ref_probs, deterministic, shift):
    """Metadata of a call; returns (batch, num_draft_tokens, vocab_size). No value is read."""
    for name, probs in (("draft_probs", draft_probs), ("target_probs", target_probs), ("ref_probs", ref_probs)):
        if probs is not None or name != "ref_probs":
            check_probabilities_meta(name, probs)
            if probs.dim() != 3:
                raise ValueError(f"{name} must be 3-D (B, {'K' if name == 'draft_probs' else 'K+1'}, V), got shape {tuple(probs.shape)}")
    if not isinstance(draft_token_ids, torch.Tensor):
        raise ValueError(f"draft_token_ids must be a torch.Tensor, got {type(draft_token_ids).__name__}")
    if draft_token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"draft_token_ids must have dtype int32 or int64, got {str(draft_token_ids.dtype).replace('torch.', '')}")
    if draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be 2-D (B, K), got shape {tuple(draft_token_ids.shape)}")
    batch, num_draft_tokens = draft_token_ids.shape
    vocab_size = target_probs.shape[-1]
    check_shape("target_probs", target_probs, (batch, num_draft_tokens + 1, vocab_size), "(B, K+1, V)")
    if ref_probs is None:
        check_shape("draft_probs", draft_probs, (batch, num_draft_tokens, vocab_size), "(B, K, V)")
    else:
        check_shape("draft_probs", draft_probs, (batch, num_draft_tokens + 1, vocab_size),
                    "(B, K+1, V) when ref_probs is given (the aligned draft after every draft token, the bonus position included)")
        check_shape("ref_probs", ref_probs, (batch, num_draft_tokens + 1, vocab_size), "(B, K+1, V)")
    check_same_device(draft_probs=draft_probs, draft_token_ids=draft_token_ids, target_probs=target_probs, ref_probs=ref_probs)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    check_shift(shift)
    return batch, num_draft_tokens, vocab_size


def _row_sums(named: dict, tolerance, validate: bool) -> dict:
    """float64 row sums of every probability tensor. With ``validate``, one host read for all
    of them, and the named error when a row is flagged.

    Shape
    -----
    named: name -> (B, P, V) -> name -> (B, P) float64
    """
    if not validate:
        return {name: probs.sum(dim=-1, dtype=torch.float64) for name, probs in named.items()}
    flags = {}
    for name, probs in named.items():
        limit = sum_tolerance(probs.dtype, probs.shape[-1]) if tolerance is None else tolerance
        flags[name] = (limit,) + probability_flags(probs, limit)
    row_sums = {name: sums for name, (_, sums, _) in flags.items()}
    if not any(probs.numel() for probs in named.values()):
        return row_sums
    if not bool(torch.stack([bad.any() for _, _, bad in flags.values()]).any()):
        return row_sums
    for name, (limit, sums, bad_rows) in flags.items():
        if bool(bad_rows.any()):
            raise_for_probabilities(name, named[name], limit, sums, bad_rows)
    return row_sums


def _independent_acceptances(named: dict, row_sums: dict, draft_ids, uniforms, log_z, shift) -> torch.Tensor:
    """Whether each draft token's own coin accepts it, as the op decides (docs/algorithm.md §3):
    ``p*(x) > 0``, ``r~(x) > 0`` and ``log u < log p*(x) - log r~(x)``, rows renormalised.

    Shape
    -----
    named: target_probs (B, K+1, V), draft_probs (B, K, V) or (B, K+1, V), ref_probs (B, K+1, V) if given;
    row_sums: their (B, K+1) / (B, K) sums; draft_ids: (B, K) int64; uniforms: (B, K+1); log_z: (B, K+1)
    -> (B, K) bool
    """
    num_draft_tokens = draft_ids.shape[1]

    def log_normalised_at_drafts(name):
        picked = named[name][:, :num_draft_tokens].gather(-1, draft_ids[..., None]).squeeze(-1).to(torch.float64)
        return torch.log(picked) - torch.log(row_sums[name][:, :num_draft_tokens])

    log_q = log_normalised_at_drafts("target_probs")
    log_r = log_normalised_at_drafts("draft_probs")
    log_p_star = log_q
    if "ref_probs" in named and shift != 0.0:
        log_d = log_normalised_at_drafts("ref_probs")
        tilted = log_q + shift * (log_r - log_d) - log_z[:, :num_draft_tokens].to(torch.float64)
        masked = torch.isneginf(log_q) | torch.isneginf(log_r) | torch.isneginf(log_d)
        log_p_star = tilted.masked_fill(masked, float("-inf"))
    return (torch.isfinite(log_p_star) & torch.isfinite(log_r)
            & (torch.log(uniforms[:, :num_draft_tokens]) < log_p_star - log_r))


def chain_speculative_sampling(
    draft_probs,
    draft_token_ids,
    target_probs,
    maybe_output_accepted_token_num=None,
    maybe_output_emitted_draft_token_num=None,
    deterministic=True,
    generator=None,
    seed=None,
    offset=None,
    *,
    ref_probs=None,
    shift=1.0,
    tolerance=None,
    validate=True,
):
    """Speculative sampling of a chain of draft tokens, FlashInfer's signature on :func:`sss_ext.verify`.

    Verifies ``K`` draft tokens per row against the target probabilities: draft ``x_i`` is
    accepted with probability ``min(1, target_i(x_i) / draft_i(x_i))``; at the first rejection
    a token is drawn from ``relu(target - draft)`` renormalised, after ``K`` acceptances a
    bonus token from ``target_K``. With ``ref_probs`` the target is the tilted
    ``p* ∝ target · (draft / ref)^shift`` (docs/algorithm.md §1), verified with the proposal
    ``draft``: the draft distributions are the aligned draft ``r``, ``ref_probs`` the reference
    draft ``d`` it was aligned from. The emitted tokens follow the target (``p*``) exactly.

    Parameters
    ----------
    draft_probs : torch.Tensor
        Probabilities the draft tokens were drawn from (float32; float64, bfloat16 and
        float16 are taken too). Rows must sum to 1 (see ``tolerance``).
    draft_token_ids : torch.Tensor
        int32 (FlashInfer's dtype) or int64 draft tokens in ``[0, V)``.
    target_probs : torch.Tensor
        The target's probabilities after the prefix and after each draft token.
    maybe_output_accepted_token_num : torch.Tensor, optional
        int32 counter; the number of draft tokens whose own coin accepts them (the accepted
        prefix, plus each later position ``i`` whose test ``log u_i < log p*(x_i) - log r~(x_i)``
        passes with its own uniform) is **added to it in place**, and it is returned. None:
        a fresh zero counter. A statistic for acceptance-rate estimates (FlashInfer's
        definition); it does not change what is emitted.
    maybe_output_emitted_draft_token_num : torch.Tensor, optional
        int32 counter; the number of accepted draft tokens (the emitted drafts; the
        correction/bonus token excluded) is **added to it in place**, and it is returned.
        None: a fresh zero counter.
    deterministic : bool
        Accepted for compatibility; it has no effect: the kernels here give the same tokens
        for the same uniforms on every run (FlashInfer's ``False`` picks a faster scan whose
        float rounding may vary).
    generator : torch.Generator, optional
        Source of the uniforms when ``seed`` and ``offset`` are None, on the probabilities'
        device (None: torch's default generator of that device). It advances by the draws.
    seed, offset : int or torch.Tensor, optional
        Given together, they fix the uniforms: ints in ``[0, 2**64)`` or one-element int64
        tensors (read on the device, no host synchronisation; a tensor on another device is
        copied to the probabilities' device first, which waits for a GPU tensor when the
        probabilities are on the CPU); row ``b`` draws from a
        counter-based hash of ``(seed, b, offset + 1 ... offset + K + 1)`` (see
        :func:`seeded_uniforms`). Same role as FlashInfer's Philox seed and offset, different
        bits. One without the other raises (FlashInfer would ignore both).
    ref_probs : torch.Tensor, optional
        Keyword-only. The reference draft ``d`` after the prefix and after each draft token;
        ``draft_probs`` then holds the aligned draft ``r`` at every one of those ``K+1``
        positions (the last one sets ``p*`` of the bonus token). None: standard speculative
        sampling, ``p* = target``.
    shift : float
        Keyword-only. ``lambda >= 0`` of ``p* ∝ target · (draft / ref)^lambda``; 0 (or no
        ``ref_probs``) is standard speculative sampling.
    tolerance : float, optional
        Keyword-only. The largest accepted ``|row sum - 1|`` of every probability tensor;
        None: :func:`sss_ext.probabilities.sum_tolerance` of its dtype and ``V``.
    validate : bool
        Keyword-only. Check every value (probabilities as in :func:`sss_ext.logits_from_probs`,
        draft ids in ``[0, V)``) and raise a named ``ValueError``; on CUDA this costs two small
        device-to-host reads (one for the probabilities, one in :func:`sss_ext.verify`).
        ``False``: no host synchronisation; on CUDA an invalid row comes back with ``-1``
        tokens and adds nothing to the counters.

    Returns
    -------
    output_token_ids : torch.Tensor
        int32: the accepted drafts, the correction or bonus token, then ``-1``.
    output_accepted_token_num : torch.Tensor
        int32, the counter passed in (or a fresh one), added to.
    output_emitted_draft_token_num : torch.Tensor
        int32, the counter passed in (or a fresh one), added to;
        ``emitted + 1 == (output_token_ids != -1).sum(1)`` for a fresh counter.

    Raises
    ------
    ValueError
        Naming the argument: wrong shapes (B, K, V disagreeing), dtypes or devices, counters
        that are not int32 ``(B,)`` tensors, a bad ``seed``/``offset``, ``shift < 0``, and with
        ``validate`` NaN/inf/negative probabilities, all-zero rows, rows that do not sum to 1,
        draft ids outside ``[0, V)``.

    Notes
    -----
    Where the rule differs from FlashInfer's (docs/compat.md): FlashInfer accepts iff
    ``u * draft(x) < target(x)`` on the raw float32 values; here the rows are renormalised
    and ``x`` is accepted iff ``target(x) > 0``, ``draft(x) > 0`` and
    ``log u < log target(x) - log draft(x)``. The acceptance probability is the same
    ``min(1, target(x) / draft(x))`` whenever ``draft(x) > 0``; a draft token of draft
    probability 0 (which the draft cannot have proposed) is always rejected here, where
    FlashInfer accepts it iff ``target(x) > 0``. A rejection whose residual is zero draws
    from ``target`` (FlashInfer reads an unset index). The accepted counter counts a position
    after the first rejection by its own uniform; FlashInfer re-tests the rejected position
    itself with a fresh uniform, which can count it too.

    Shape
    -----
    draft_probs: (B, K, V), or (B, K+1, V) with ref_probs; draft_token_ids: (B, K);
    target_probs: (B, K+1, V); ref_probs: (B, K+1, V); counters: (B,)
    -> output_token_ids (B, K+1) int32, output_accepted_token_num (B,) int32,
    output_emitted_draft_token_num (B,) int32
    """
    batch, num_draft_tokens, _ = _check_arguments(draft_probs, draft_token_ids, target_probs, ref_probs, deterministic, shift)
    device = target_probs.device
    accepted_counter = (torch.zeros(batch, dtype=torch.int32, device=device) if maybe_output_accepted_token_num is None
                        else _check_counter("maybe_output_accepted_token_num", maybe_output_accepted_token_num, batch, device))
    emitted_counter = (torch.zeros(batch, dtype=torch.int32, device=device) if maybe_output_emitted_draft_token_num is None
                       else _check_counter("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num, batch, device))
    if (seed is None) != (offset is None):
        missing = "offset" if offset is None else "seed"
        raise ValueError(f"seed and offset must be given together (FlashInfer ignores one without the other); {missing} is None")
    if seed is None:
        uniforms = draw_uniforms((batch, num_draft_tokens + 1), device, generator)
    else:
        uniforms = seeded_uniforms(seed, offset, batch, num_draft_tokens + 1, device)

    named = {"target_probs": target_probs, "draft_probs": draft_probs}
    if ref_probs is not None:
        named["ref_probs"] = ref_probs
    check_tolerance(tolerance)
    row_sums = _row_sums(named, None if tolerance is None else float(tolerance), validate)
    logits = {name: logits_from_probs(probs, name=name, validate=False) for name, probs in named.items()}
    draft_ids = draft_token_ids.to(torch.int64)
    result = verify(logits["target_probs"], logits["draft_probs"], draft_ids, logits.get("ref_probs"), shift=shift,
                    uniforms=uniforms, validate=validate)

    num_accepted = result.num_accepted  # (B,); -1 marks an invalid row (CUDA, validate=False)
    valid = num_accepted >= 0
    coins = _independent_acceptances(named, row_sums, draft_ids.clamp(0, target_probs.shape[-1] - 1), uniforms, result.log_z,
                                     float(shift))
    position = torch.arange(num_draft_tokens, device=device)
    after_rejection = position[None, :] > num_accepted[:, None]
    accepted = num_accepted + (coins & after_rejection).sum(dim=-1)
    accepted_counter.add_(torch.where(valid, accepted, 0).to(torch.int32))
    emitted_counter.add_(torch.where(valid, num_accepted, 0).to(torch.int32))
    return result.tokens.to(torch.int32), accepted_counter, emitted_counter
