"""Probabilities in: log-probabilities that :func:`sss_ext.verify` and :func:`sss_ext.sample` take as logits.

Stacks that hand over probabilities (FlashInfer's samplers, vLLM's rejection sampler) call
the ops through one line::

    tokens = sss_ext.sample(sss_ext.logits_from_probs(probs), uniforms=u)

The ops apply a softmax to the logits they get, and ``softmax(log p) = p / sum(p)``, so
probabilities whose rows sum to 1 are sampled exactly (up to the float32 rounding of the
logarithm, see :func:`logits_from_probs`). A probability of 0 becomes a ``-inf`` logit, which
the ops treat as a masked token (docs/algorithm.md §1).
"""

from __future__ import annotations

import math

import torch

PROBABILITY_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Margin over the random-walk size of the normaliser's rounding error, sqrt(V) * eps (see
# sum_tolerance).
NORMALISER_MARGIN = 16.0


def sum_tolerance(dtype: torch.dtype, vocab_size: int) -> float:
    """How far a row of ``vocab_size`` probabilities of ``dtype`` may sum from 1.

    ``eps(dtype) + 16 * sqrt(V) * eps(accumulate) + V * subnormal_spacing(dtype) / 2``:

    * ``eps(dtype)``: storing each probability in ``dtype`` rounds it by at most
      ``eps / 2`` relative, which moves the sum by at most ``eps / 2`` (twice that allowed);
    * ``16 * sqrt(V) * eps(accumulate)``: the producer divided by a normaliser summed over
      ``V`` terms in float32 (float64 for float64 probabilities; torch computes the softmax of
      half-precision inputs in float32). Rounding errors of such a sum grow like
      ``sqrt(V) * eps`` (pairwise or tree sums stay below ``log2(V) * eps``; the worst case of
      a sequential sum, ``V * eps``, needs every rounding to go the same way);
    * ``V * subnormal_spacing / 2``: entries below the smallest normal number are rounded to
      an absolute grid (float16: ``2**-24``); negligible for the other dtypes.

    Examples: float64: 4e-15 (V = 1) to 1.3e-12 (V = 128256); float32: V = 111: 2.0e-5, V = 32000: 3.4e-4,
    V = 128256: 6.8e-4; bfloat16, V = 128256: 8.5e-3; float16, V = 128256: 5.5e-3.
    Logits passed by mistake, unnormalised weights and truncated rows that were not
    renormalised (top-k, top-p) miss it by far.

    Parameters
    ----------
    dtype : torch.dtype
        float64, float32, bfloat16 or float16.
    vocab_size : int
        Entries per row, ``V >= 1``.

    Returns
    -------
    float
        The largest accepted ``|sum - 1|``.
    """
    info = torch.finfo(dtype)
    accumulate = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32)
    subnormal_spacing = info.smallest_normal * info.eps
    return info.eps + NORMALISER_MARGIN * math.sqrt(vocab_size) * accumulate.eps + vocab_size * subnormal_spacing / 2


def _first_index(mask: torch.Tensor) -> tuple:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_probability_values(name: str, probs: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Refuse NaN, inf, negative entries, all-zero rows and rows that do not sum to 1.

    One device-to-host read on CUDA (a single flag); the named error is built only after it.

    Returns
    -------
    torch.Tensor
        float64 row sums.

    Shape
    -----
    probs: (..., V) -> (...)
    """
    row_sums, bad_rows = probability_flags(probs, tolerance)
    if probs.numel() == 0 or not bool(bad_rows.any()):
        return row_sums
    raise_for_probabilities(name, probs, tolerance, row_sums, bad_rows)


def probability_flags(probs: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 row sums and the rows that fail a check, computed on the device without a host read.

    One flag covers every check: NaN/inf make the sum non-finite, a negative entry shows in
    the row minimum, an all-zero row and a wrong normaliser in the sum.

    Shape
    -----
    probs: (..., V) -> (...) float64, (...) bool
    """
    row_sums = probs.sum(dim=-1, dtype=torch.float64)
    bad_rows = ~((row_sums - 1.0).abs() <= tolerance) | (probs.amin(dim=-1) < 0)
    return row_sums, bad_rows


def raise_for_probabilities(name: str, probs: torch.Tensor, tolerance: float, row_sums: torch.Tensor,
                            bad_rows: torch.Tensor) -> None:
    """The named ``ValueError`` for probabilities with a flagged row (:func:`probability_flags`)."""
    not_finite = ~torch.isfinite(probs)
    if bool(not_finite.any()):
        raise ValueError(f"{name} must hold finite probabilities; found NaN or inf at index {_first_index(not_finite)}")
    negative = probs < 0
    if bool(negative.any()):
        where = _first_index(negative)
        raise ValueError(f"{name} must hold probabilities >= 0; found {float(probs[where]):.6g} at index {where}")
    empty = row_sums == 0
    if bool(empty.any()):
        raise ValueError(f"{name} has a row with no positive probability (all zeros) at index {_first_index(empty)}: "
                         "no token can be drawn from it")
    where = _first_index(bad_rows)
    raise ValueError(
        f"{name} rows must sum to 1 within {tolerance:.3g} ({str(probs.dtype).replace('torch.', '')}, V = {probs.shape[-1]}; "
        f"see sss_ext.probabilities.sum_tolerance); the row at index {where} sums to {float(row_sums[where]):.10g}. "
        "Pass probabilities (softmax outputs), renormalise truncated rows, or give tolerance="
    )


def check_probabilities_meta(name: str, probs) -> int:
    """A floating tensor with a vocabulary dimension; returns ``V``. No value is read."""
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of probabilities, got {type(probs).__name__}")
    if probs.dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"{name} must have dtype float32, float64, bfloat16 or float16 (probabilities), "
                         f"got {str(probs.dtype).replace('torch.', '')}")
    if probs.dim() < 1 or probs.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension of size >= 1 as its last dimension, got shape {tuple(probs.shape)}")
    return probs.shape[-1]


def check_tolerance(tolerance) -> None:
    if tolerance is None:
        return
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be None (the dtype's default) or a finite float >= 0, got {tolerance!r}")


def logits_from_probs(probs, *, name: str = "probs", tolerance=None, validate: bool = True) -> torch.Tensor:
    """float32 log-probabilities that the ops take as logits; ``0`` becomes ``-inf``.

    ``sss_ext.verify(logits_from_probs(target_probs, name="target_probs"), logits_from_probs(draft_probs,
    name="draft_probs"), draft_tokens, ...)`` and ``sss_ext.sample(logits_from_probs(probs))`` sample
    from the probabilities given: the ops' softmax of ``log p`` is ``p / sum(p)``. Use them with
    ``temperature=1.0`` and no top-k/top-p to sample ``p`` itself (other settings warp ``p`` as they
    warp logits).

    The logarithm is taken in float32 (float64 for float64 input) and stored as float32, the
    ops' widest logit dtype, whatever the input dtype: a bfloat16 or float16 logarithm would
    move probabilities by up to 3% (bfloat16 keeps 8 significant bits of ``log p``). The
    float32 rounding moves each probability by about ``|log p| * 2**-24`` relative (7e-7 at
    ``p = 1e-5``). Probabilities below float32's range (float64 input) keep their logarithm.

    Parameters
    ----------
    probs : torch.Tensor
        float32, float64, bfloat16 or float16 probabilities over the last dimension, on any
        device; each row must sum to 1 (see ``tolerance``). Zeros are masked tokens.
    name : str
        The argument name the errors use (e.g. ``"target_probs"``).
    tolerance : float, optional
        The largest accepted ``|row sum - 1|``. None: :func:`sss_ext.probabilities.sum_tolerance`
        of the dtype and ``V`` (float32, V = 32000: 3.4e-4; float64: at most 1.3e-12 up to
        V = 128256; bfloat16: 7.8e-3 to 8.5e-3; float16: 1e-3 to 5.5e-3), which covers the rounding of a softmax computed in that
        dtype's accumulation precision and refuses logits, unnormalised weights and truncated
        rows that were not renormalised.
    validate : bool
        Check the values: NaN, inf, negative entries, an all-zero row and rows that do not sum
        to 1 raise a ``ValueError`` naming ``name`` and the index. On CUDA this costs one small
        device-to-host read; ``False`` skips it (no synchronisation; a negative entry then gives
        a NaN logit, which the ops refuse or mark as an invalid row).

    Returns
    -------
    torch.Tensor
        float32 ``log(probs)``, ``-inf`` where ``probs`` is 0.

    Raises
    ------
    ValueError
        Naming ``name``: not a floating tensor, no vocabulary dimension, NaN/inf, a negative
        entry, an all-zero row, a row sum outside ``1 ± tolerance``; naming ``tolerance``: a
        tolerance that is not a finite float >= 0.

    Shape
    -----
    probs: (..., V) -> (..., V) float32
    """
    vocab_size = check_probabilities_meta(name, probs)
    check_tolerance(tolerance)
    if validate:
        check_probability_values(name, probs, sum_tolerance(probs.dtype, vocab_size) if tolerance is None else float(tolerance))
    if probs.dtype == torch.float64:
        return torch.log(probs).to(torch.float32)
    return torch.log(probs.to(torch.float32))
