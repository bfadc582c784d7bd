"""Per-row random streams of the decoding loop (docs/algorithm.md §5, "Streams of the decoding loop").

Every row of a run (a prompt, or one of a prompt's samples) draws its uniforms from its own
stream, keyed by ``(seed, prompt index, sample index, purpose)``; draw ``j`` of a stream
(``j = 1, 2, ...``, the row's own counter) is a counter-based hash (SplitMix64) of the key
and ``j``. A row's draws therefore depend neither on the other rows of the batch nor on
the batch size, the batch position or the process that runs it: a prompt keeps its
uniforms however a job is split, as long as it keeps its (global) prompt index.

The hash runs as int64 torch ops on the logits' device (two's-complement wrap-around), so
drawing needs no host synchronisation and no ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: purposes: independent streams of one row within one call
SAMPLING = 0  # the tokens of the row (draft proposals, verification, autoregressive steps)
CHOICE = 1  # per-prompt choice among candidates (soft best-of-n)
FALLBACK = 2  # the fallback candidates of soft best-of-n
FALLBACK_CHOICE = 3  # the choice among the fallback candidates

_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """The signed int64 with the same low 64 bits as ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser on int64 bit patterns (a bijection of 64-bit words).

    Shape
    -----
    any int64 -> same shape, int64
    """
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def stream_keys(seed: int, prompt_indices: torch.Tensor, sample_indices: torch.Tensor, purpose: int) -> torch.Tensor:
    """Key of every row's stream: ``mix(mix(mix(mix(seed + g) ^ prompt + g) ^ sample + g) ^ purpose + g)``.

    ``g`` is the SplitMix64 increment; all arithmetic wraps modulo ``2**64``.

    Shape
    -----
    prompt_indices, sample_indices: (R,) int64 -> (R,) int64
    """
    key = seed_key(torch.full_like(prompt_indices, _int64(seed)))
    return absorb(absorb(absorb(key, prompt_indices), sample_indices), purpose)


def seed_key(seed_words: torch.Tensor) -> torch.Tensor:
    """``mix(seed + g)``, the key a stream starts from. Shape: any int64 -> same shape."""
    return mix64(seed_words + _GAMMA)


def absorb(keys: torch.Tensor, words) -> torch.Tensor:
    """``mix((key ^ word) + g)``: a key that also depends on ``words``. Shape: broadcast of both, int64."""
    return mix64((keys ^ words) + _GAMMA)


def counter_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Draw ``counter`` of each key's stream: ``bits_to_uniform(mix(key + counter g))``.

    Shape
    -----
    keys: (B,) int64; counters: (B, C) or (C,) int64 -> (B, C) float64 in (0, 1)
    """
    return uniforms_from_bits(mix64(keys[:, None] + counters * _GAMMA))


def uniforms_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float64 uniforms ``k / 2**53`` from the top 53 bits ``k`` of each word; ``k = 0`` reads as ``2**52``.

    So every value lies on the grid ``{1, ..., 2**53 - 1} / 2**53`` of
    :func:`sss_ext.uniforms.draw_uniforms` (never 0, never 1); ``1/2`` is twice as likely
    as another grid point, which moves ``P(u < a)`` by at most ``2**-53``.

    Shape
    -----
    any int64 -> same shape, float64
    """
    k = _shift_right(bits, 11)
    k = torch.where(k == 0, torch.full_like(k, 1 << 52), k)
    return k.to(torch.float64) * 2.0**-53


class RowStreams:
    """The streams of ``R`` rows with one counter each.

    Parameters
    ----------
    seed : int
        ``SamplingConfig.seed`` (taken modulo ``2**64``).
    prompt_indices : torch.Tensor
        int64 global prompt index of every row.
    sample_indices : torch.Tensor
        int64 index of every row among its prompt's samples (0 for one row per prompt).
    purpose : int
        One of the module's purposes (:data:`SAMPLING`, :data:`CHOICE`, ...).
    device : torch.device or str
        Where keys, counters and draws live (the logits' device).

    Shape
    -----
    prompt_indices, sample_indices: (R,); counters: (R,) int64, draws consumed per row
    """

    def __init__(self, seed: int, prompt_indices: torch.Tensor, sample_indices: torch.Tensor, purpose: int, device):
        prompt_indices = torch.as_tensor(prompt_indices, dtype=torch.int64).to(device)
        sample_indices = torch.as_tensor(sample_indices, dtype=torch.int64).to(device)
        if prompt_indices.dim() != 1 or sample_indices.shape != prompt_indices.shape:
            raise ValueError(f"prompt_indices and sample_indices must be two (R,) tensors, got shapes "
                             f"{tuple(prompt_indices.shape)} and {tuple(sample_indices.shape)}")
        self.keys = stream_keys(seed, prompt_indices, sample_indices, purpose)
        self.counters = torch.zeros_like(self.keys)

    def __len__(self) -> int:
        return int(self.keys.numel())

    def draw(self, rows: torch.Tensor, count: int, where: torch.Tensor | None = None,
             used: torch.Tensor | None = None) -> torch.Tensor:
        """The next ``count`` uniforms of each row of ``rows``; their counters advance by ``count``.

        Parameters
        ----------
        rows : torch.Tensor
            int64 distinct row ids (positions in ``0 .. R-1``), e.g. the active rows of a batch.
        count : int
            Uniforms per row, >= 0.
        where : torch.Tensor, optional
            bool, the rows that consume their draws; the others get the same values but their
            counters stay (their draws are placeholders the caller ignores). Default: all.
        used : torch.Tensor, optional
            int64 in ``[0, count]``, the draws each row consumes (its first ``used[b]``; the
            rest are placeholders the caller ignores). Exclusive with ``where``.

        Shape
        -----
        rows: (B,); where, used: (B,) -> (B, count) float64 in (0, 1)
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        rows = rows.to(self.keys.device)
        steps = torch.arange(1, count + 1, dtype=torch.int64, device=self.keys.device)
        position = self.counters[rows][:, None] + steps  # (B, count)
        if where is not None:
            used = count * where.to(torch.int64)
        self.counters[rows] += count if used is None else used
        return counter_uniforms(self.keys[rows], position)


def check_prompt_indices(prompt_indices, num_prompts: int) -> torch.Tensor:
    """``prompt_indices`` of :func:`sss_ext.generate` as an int64 CPU tensor; ``None``: ``0 .. num_prompts - 1``.

    Raises ``ValueError`` unless it holds ``num_prompts`` distinct ints in ``[0, 2**63)``.

    Shape
    -----
    -> (num_prompts,) int64
    """
    if prompt_indices is None:
        return torch.arange(num_prompts, dtype=torch.int64)
    if isinstance(prompt_indices, torch.Tensor):
        if prompt_indices.dim() != 1 or prompt_indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompt_indices must be a 1-D int64 tensor, got {prompt_indices.dim()}-D {prompt_indices.dtype}")
        values = prompt_indices.tolist()
    elif isinstance(prompt_indices, Sequence) and not isinstance(prompt_indices, (str, bytes)):
        values = list(prompt_indices)
    else:
        raise ValueError(f"prompt_indices must be a sequence of ints or None, got {type(prompt_indices).__name__}")
    if len(values) != num_prompts:
        raise ValueError(f"prompt_indices must hold one index per prompt ({num_prompts}), got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ValueError(f"prompt_indices must be ints in [0, 2**63), got {value!r}")
    if len(set(values)) != len(values):
        raise ValueError("prompt_indices must be distinct: two prompts with one index would draw the same uniforms")
    return torch.tensor(values, dtype=torch.int64)


class Randomness:
    """The random streams of one :func:`sss_ext.generate` call.

    Parameters
    ----------
    seed : int
        ``SamplingConfig.seed``.
    prompt_indices : torch.Tensor
        int64 global index of every prompt of the call (see :func:`check_prompt_indices`).
    device : torch.device or str

    Shape
    -----
    prompt_indices: (P,)
    """

    def __init__(self, seed: int, prompt_indices: torch.Tensor, device):
        self.seed = seed
        self.prompt_indices = prompt_indices.cpu()
        self.device = device

    def streams(self, prompt_of_row: torch.Tensor, sample_of_row: torch.Tensor | None = None,
                purpose: int = SAMPLING) -> RowStreams:
        """Streams of rows given by their prompt (position in the call) and sample index.

        Shape
        -----
        prompt_of_row: (R,) int64 in [0, P); sample_of_row: (R,) or None (all 0) -> R streams
        """
        prompt_of_row = torch.as_tensor(prompt_of_row, dtype=torch.int64).cpu()
        if sample_of_row is None:
            sample_of_row = torch.zeros_like(prompt_of_row)
        return RowStreams(self.seed, self.prompt_indices[prompt_of_row], sample_of_row, purpose, self.device)

    def one_each(self, prompt_of_row: torch.Tensor, purpose: int) -> torch.Tensor:
        """The first uniform of the ``purpose`` stream of each listed prompt (sample index 0).

        Shape
        -----
        prompt_of_row: (R,) int64 in [0, P) -> (R,) float64
        """
        streams = self.streams(prompt_of_row, purpose=purpose)
        return streams.draw(torch.arange(len(streams)), 1)[:, 0]
