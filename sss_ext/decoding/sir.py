"""sss-sir: sampling-importance-resampling over SSS candidates toward the sequence-level tilt.

SSS emits the locally normalised product ``prod_t p*_t``; the sequence-level tilt is
``pi*(y) ∝ q(y) (r(y)/d(y))^lambda ∝ prod_t p*_t(y_t) * prod_t Z_t(y_<t)``
(docs/algorithm.md §6, §10). Per prompt, ``N = num_candidates`` SSS candidates run as rows
of one speculative batch; candidate ``i`` carries the log-weight
``log w_i = sum_t log Z_t`` over exactly its emitted tokens (EOS included, nothing after
it, cut at ``max_new_tokens``), and one candidate is drawn with probability
``softmax(log w)_i``. The law of the answer converges to ``pi*`` as ``N`` grows.

The weights are the normalisers of the untruncated tilted target, so the method needs
``top_k = 0`` (or ``>= vocab_size``) and ``top_p = 1`` (``ValueError`` otherwise); it runs
the exact rule only (the paper rule has no ``Z``). At ``temperature = 0`` every ``log Z`` is
reported as 0 and all candidates are the same greedy sequence.
"""

from __future__ import annotations

import torch

from .context import MethodResult, RunContext
from .randomness import CHOICE
from .rows import repeat_prompts
from .speculative import SpeculativeRun


def check_untruncated(config, vocab_size: int) -> None:
    """``ValueError`` unless ``config`` samples without top-k / top-p (the weights need the untruncated ``Z``).

    ``top_k = 0`` or ``top_k >= vocab_size`` keeps every token (docs/algorithm.md §2).
    """
    if 0 < config.top_k < vocab_size or config.top_p != 1.0:
        raise ValueError(f"method 'sss-sir' needs top_k=0 and top_p=1.0 (its weights prod_t Z_t are exact only "
                         f"without truncation, docs/algorithm.md §10), got top_k={config.top_k}, top_p={config.top_p}")


def _relative_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """``w / max w`` per prompt; ``+inf`` log-weights share all the mass, all ``-inf`` count alike.

    Shape
    -----
    log_weights: (P, N) float64 -> (P, N), the largest entry of every row is 1
    """
    if bool(torch.isnan(log_weights).any()):
        raise ValueError("log_weights must not contain NaN")
    top = log_weights.max(dim=1, keepdim=True).values  # (P, 1)
    finite_top = torch.isfinite(top)
    shifted = torch.where(finite_top, log_weights - torch.where(finite_top, top, 0.0),
                          torch.where(log_weights == top, 0.0, -torch.inf))
    return torch.exp(shifted)


def resample(log_weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of one candidate per prompt, drawn with probability ``softmax(log_weights)`` by inverse CDF.

    Candidates whose log-weight is ``+inf`` share all the mass; when every log-weight is
    ``-inf`` the draw is uniform. NaN log-weights raise ``ValueError``.

    Parameters
    ----------
    log_weights : torch.Tensor
        float64 log importance weights of the candidates of every prompt.
    uniforms : torch.Tensor
        float64 uniforms in (0, 1), one per prompt.

    Returns
    -------
    torch.Tensor
        int64 chosen candidate of every prompt.

    Shape
    -----
    log_weights: (P, N); uniforms: (P,) -> (P,)
    """
    mass = _relative_weights(log_weights)
    cumulative = torch.cumsum(mass, dim=1)
    above = cumulative > uniforms[:, None] * cumulative[:, -1:]
    last_positive = mass.shape[1] - 1 - torch.argmax(torch.flip(mass > 0, dims=[1]).to(torch.int8), dim=1)
    return torch.where(above.any(dim=1), torch.argmax(above.to(torch.int8), dim=1), last_positive)


def weight_summaries(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective sample size ``(sum w)^2 / sum w^2`` and the standard deviation of ``log w`` per prompt.

    Shape
    -----
    log_weights: (P, N) float64 -> (P,), (P,)
    """
    mass = _relative_weights(log_weights)
    effective_sample_size = mass.sum(dim=1) ** 2 / (mass**2).sum(dim=1)
    return effective_sample_size, log_weights.std(dim=1, correction=0)


def sss_sir(ctx: RunContext) -> MethodResult:
    """sss-sir: ``num_candidates`` exact SSS candidates per prompt, one resampled with weight ``prod_t Z_t``."""
    prompts, config = ctx.prompts, ctx.config
    check_untruncated(config, ctx.models.vocab_size)
    n = config.num_candidates
    rows, prompt_of_row, sample_of_row = repeat_prompts(prompts, n)
    run = SpeculativeRun(ctx, use_ref=True, mode="exact", prompts=rows, prompt_of_row=prompt_of_row,
                         sample_of_row=sample_of_row)
    run.run()
    candidates = run.book.sequences()
    log_weights = run.book.log_z.cpu().view(len(prompts), n)  # (P, N)
    uniforms = ctx.randomness.one_each(torch.arange(len(prompts)), CHOICE).cpu()
    chosen = resample(log_weights, uniforms)
    effective_sample_size, spread = weight_summaries(log_weights)
    ctx.stats.importance_weights(effective_sample_size, spread)
    chosen_list, weight_rows = chosen.tolist(), log_weights.tolist()
    result = MethodResult(sequences=[], log_z=[])
    for prompt, pick in enumerate(chosen_list):
        result.sequences.append(candidates[prompt * n + pick])
        result.log_z.append(weight_rows[prompt][pick])
        result.extras.append({"candidates": candidates[prompt * n: (prompt + 1) * n], "log_weights": weight_rows[prompt],
                              "chosen": pick, "effective_sample_size": float(effective_sample_size[prompt]),
                              "log_weight_spread": float(spread[prompt])})
    return result
