"""``SamplingConfig``: every knob of :func:`sss_ext.generate`, validated when it is built.

A bad value raises ``ValueError`` naming the field, so a wrong configuration fails before
any model runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..checks import check_sampling, check_shift, check_top_k_ties
from .draft_tree import check_tree_shape

REWARD_INPUTS = ("auto", "text", "ids")
DRAFT_LENGTH_POLICIES = ("fixed", "adaptive")
PROPOSERS = ("draft", "ngram")
VERIFICATIONS = ("token", "block")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite float in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How :func:`sss_ext.generate` samples.

    Parameters
    ----------
    max_new_tokens : int
        Tokens generated per prompt at most (``>= 1``).
    num_draft_tokens : int
        ``K``, draft tokens proposed per speculative round (``>= 1``); the most per row
        under the adaptive draft-length policy.
    draft_length_policy : {"fixed", "adaptive"}
        ``"fixed"`` proposes ``K`` drafts every round; ``"adaptive"`` picks each round's count
        in ``[1, K]`` from the rows' running acceptance rates and the round's measured costs
        (:mod:`sss_ext.decoding.draft_length`). The output law is the same either way.
    draft_cost_ratio : float or None
        Cost of one draft step over the cost of the rest of a round, ``>= 0``, for the
        adaptive policy; None measures the costs from the run's wall-clock times (then the
        tokens of a seeded run depend on timings; a number makes runs reproducible).
    proposer : {"draft", "ngram"}
        Who proposes the drafts of a speculative round (sd, sss): ``"draft"`` samples them
        from the aligned draft ``r``; ``"ngram"`` copies them from earlier in the row's own
        prompt and output (prompt lookup, :mod:`sss_ext.decoding.ngram`) and they are
        verified as one-hot drafts. With ``"ngram"``, sd runs the target alone and sss runs
        ``r`` and ``d`` once per round over the proposed block (the tilt's logits). Only the
        fixed draft-length policy.
    ngram_sizes : (int, int)
        ``(largest n, smallest n)`` of the n-grams the ``"ngram"`` proposer looks up, longest
        first; ``largest >= smallest >= 1``.
    draft_tree : tuple of int or None
        sss and sd draft a token tree instead of a chain: ``(b_1, .., b_D)`` children per node
        at each depth (e.g. ``(4, 2, 1)``: 4 + 8 + 8 drafted tokens), verified by recursive
        rejection sampling in one target forward (:mod:`sss_ext.decoding.tree_run`);
        ``num_draft_tokens`` is then unused. None: a chain of ``num_draft_tokens``. Only with
        the draft proposer and the fixed draft-length policy.
    tree_replacement : bool
        Siblings of a draft tree are drawn i.i.d. from ``warp(r)`` (True) or without
        replacement (False, default: a rejected token is not proposed again, which accepts more).
    verification : {"token", "block"}
        How sss and sd verify a chain of drafts: token by token, or jointly over the block
        (block verification, ``sss_ext.verify(verification="block")``; never fewer accepted
        drafts in expectation, the same law). Not with ``draft_tree`` (a tree has its own rule)
        nor with sss-paper.
    temperature : float
        ``> 0`` tempers every model; ``0`` is greedy.
    top_k, top_p : int, float
        Truncation shared by the proposal and the (tilted) target; ``0`` / ``1.0`` disable.
    top_k_ties : {"keep", "exact-k"}
        Top-k tie rule: ``"keep"`` also keeps the tokens tied with the ``top_k``-th largest
        score (HF / vLLM); ``"exact-k"`` keeps exactly ``top_k`` (docs/algorithm.md §2).
    shift : float
        ``lambda >= 0``, strength of the reward shift ``(r/d)**lambda`` (sss, sss-paper).
    seed : int
        Seeds the one ``torch.Generator`` all randomness is drawn from.
    num_samples : int
        ``N`` of best-of-N and speculative rejection, ``n`` of soft best-of-n.
    num_candidates : int
        ``N`` of sss-sir: SSS candidates per prompt, one resampled with weight ``prod_t Z_t``.
    rejection_interval : int
        ``m``: speculative rejection scores the partial responses every ``m`` tokens.
    rejection_rate : float
        ``alpha`` in ``[0, 1)``: fraction of the unfinished responses of a prompt that
        speculative rejection drops at each decision (``floor(alpha * n)``); ``0`` is best-of-N.
    beta : float
        Soft best-of-n weight of the reward in ``beta * reward + log q - log r``.
    soft_bon_threshold : float or None
        Soft best-of-n falls back to soft best-of-n on the target when the chosen score is
        below this; ``None`` never falls back.
    eos_token_id : int, tuple of int, or None
        Tokens that end a response; ``None`` takes the tokenizer's or the target's.
    ignore_eos : bool
        Generate ``max_new_tokens`` regardless of end-of-sequence tokens.
    pad_token_id : int or None
        Id fed in padded slots (never attended to); ``None`` takes the tokenizer's, else 0.
    reward_input : {"auto", "text", "ids"}
        What a reward callable receives: decoded texts or token-id tensors of
        prompt + response; ``"auto"`` is text when a tokenizer is given.
    """

    max_new_tokens: int = 128
    num_draft_tokens: int = 4
    draft_length_policy: str = "fixed"
    draft_cost_ratio: float | None = None
    proposer: str = "draft"
    ngram_sizes: tuple[int, int] = (3, 1)
    draft_tree: tuple[int, ...] | None = None
    tree_replacement: bool = False
    verification: str = "token"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    top_k_ties: str = "keep"
    shift: float = 1.0
    seed: int = 0
    num_samples: int = 4
    num_candidates: int = 4
    rejection_interval: int = 16
    rejection_rate: float = 0.5
    beta: float = 1.0
    soft_bon_threshold: float | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    ignore_eos: bool = False
    pad_token_id: int | None = None
    reward_input: str = "auto"

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("num_draft_tokens", self.num_draft_tokens, 1)
        if self.draft_length_policy not in DRAFT_LENGTH_POLICIES:
            raise ValueError(f"draft_length_policy must be one of {DRAFT_LENGTH_POLICIES}, got {self.draft_length_policy!r}")
        if self.draft_cost_ratio is not None:
            _check_float("draft_cost_ratio", self.draft_cost_ratio, 0.0, math.inf, high_open=True)
        if self.proposer not in PROPOSERS:
            raise ValueError(f"proposer must be one of {PROPOSERS}, got {self.proposer!r}")
        sizes = self.ngram_sizes
        if (not isinstance(sizes, (tuple, list)) or len(sizes) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes) or not 1 <= sizes[1] <= sizes[0]):
            raise ValueError(f"ngram_sizes must be two ints (largest, smallest) with largest >= smallest >= 1, got {sizes!r}")
        object.__setattr__(self, "ngram_sizes", (int(sizes[0]), int(sizes[1])))
        if self.proposer == "ngram" and self.draft_length_policy != "fixed":
            raise ValueError("proposer='ngram' needs draft_length_policy='fixed' (the adaptive policy weighs "
                             f"draft-model steps), got {self.draft_length_policy!r}")
        if self.draft_tree is not None:
            object.__setattr__(self, "draft_tree", check_tree_shape(self.draft_tree))
            if self.proposer != "draft" or self.draft_length_policy != "fixed":
                raise ValueError("draft_tree needs proposer='draft' and draft_length_policy='fixed', got "
                                 f"proposer={self.proposer!r}, draft_length_policy={self.draft_length_policy!r}")
        if not isinstance(self.tree_replacement, bool):
            raise ValueError(f"tree_replacement must be a bool, got {self.tree_replacement!r}")
        if self.verification not in VERIFICATIONS:
            raise ValueError(f"verification must be one of {VERIFICATIONS}, got {self.verification!r}")
        if self.verification == "block" and self.draft_tree is not None:
            raise ValueError("verification='block' verifies a chain of drafts; draft_tree has its own rule (tree verification)")
        try:
            check_sampling(self.temperature, self.top_k, self.top_p)
            check_top_k_ties(self.top_k_ties)
            check_shift(self.shift)
        except ValueError as error:
            raise ValueError(f"SamplingConfig: {error}") from None
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        _check_int("num_samples", self.num_samples, 1)
        _check_int("num_candidates", self.num_candidates, 1)
        _check_int("rejection_interval", self.rejection_interval, 1)
        _check_float("rejection_rate", self.rejection_rate, 0.0, 1.0, high_open=True)
        _check_float("beta", self.beta, 0.0, math.inf, high_open=True)
        if self.soft_bon_threshold is not None and (
            isinstance(self.soft_bon_threshold, bool) or not isinstance(self.soft_bon_threshold, (int, float))
            or math.isnan(self.soft_bon_threshold)
        ):
            raise ValueError(f"soft_bon_threshold must be a float or None, got {self.soft_bon_threshold!r}")
        eos = self.eos_token_id
        if eos is not None:
            if isinstance(eos, int) and not isinstance(eos, bool):
                eos = (eos,)
            if not isinstance(eos, (tuple, list)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
                raise ValueError(f"eos_token_id must be an int >= 0, a tuple of them, or None, got {self.eos_token_id!r}")
            object.__setattr__(self, "eos_token_id", tuple(int(t) for t in eos))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.pad_token_id is not None:
            _check_int("pad_token_id", self.pad_token_id, 0)
        if self.reward_input not in REWARD_INPUTS:
            raise ValueError(f"reward_input must be one of {REWARD_INPUTS}, got {self.reward_input!r}")

    def replace(self, **changes) -> "SamplingConfig":
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {field.name for field in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown SamplingConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the fields."""
        out = dataclasses.asdict(self)
        out["ngram_sizes"] = list(out["ngram_sizes"])
        if out["draft_tree"] is not None:
            out["draft_tree"] = list(out["draft_tree"])
        if out["eos_token_id"] is not None:
            out["eos_token_id"] = list(out["eos_token_id"])
        return out
