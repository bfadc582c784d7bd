"""``sss_ext.generate``: one entry point for SSS, speculative sampling and the baselines."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .autoregressive import AutoregressiveRun
from .baselines import MethodResult, best_of_n, soft_best_of_n, speculative_rejection
from .config import REWARD_METHODS, SamplingConfig, check_method
from .models import ModelSet, check_prompts, encode_prompts, resolve_models
from .reward import RewardScorer, check_reward
from .speculative import SpeculativeRun
from .stats import StatsRecorder, StatsReport


@dataclass
class GenerateOutput:
    """Result of :func:`generate`, one entry per prompt.

    Attributes
    ----------
    sequences : list of torch.Tensor
        int64 generated token ids (the prompt excluded), EOS included when emitted.
    texts : list of str or None
        Decoded ``sequences`` (special tokens skipped) when a tokenizer was given.
    prompt_ids : list of torch.Tensor
        The encoded prompts.
    stats : StatsReport
        ``stats.total`` and ``stats.per_prompt`` (:class:`~sss_ext.decoding.stats.GenerationStats`);
        ``stats.<counter>`` reads the total.
    log_z : list of float or None
        sss / sss-paper: ``sum_t log Z_t`` over the emitted tokens, the log importance weight
        of ALGORITHM.md section 4 (sampling-importance-resampling toward ``pi*``).
    extras : list of dict
        Method details (candidates, rewards, decisions, fallback) for the reward baselines.
    """

    sequences: list[torch.Tensor]
    texts: list[str] | None
    prompt_ids: list[torch.Tensor]
    stats: StatsReport
    method: str
    config: SamplingConfig
    log_z: list[float] | None = None
    extras: list[dict] = field(default_factory=list)


def _resolve_config(config, overrides) -> SamplingConfig:
    if config is None:
        return SamplingConfig().replace(**overrides)
    if not isinstance(config, SamplingConfig):
        raise ValueError(f"config must be a SamplingConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


@torch.no_grad()
def generate(target, draft, prompts_or_input_ids, ref_model=None, tokenizer=None, method: str = "sss",
             config: SamplingConfig | None = None, reward_fn=None, *, attention_mask=None, **config_overrides) -> GenerateOutput:
    """Generate aligned continuations, batched over prompts.

    Parameters
    ----------
    target : transformers causal LM
        ``q``, the large unaligned model (unused by ``method="draft"``).
    draft : transformers causal LM or None
        ``r``, the small aligned draft (sss, sss-paper, sd, draft, soft-bon).
    prompts_or_input_ids : str, list of str, list of id lists, or tensor
        Prompts; strings need ``tokenizer``. A 2-D tensor may come with ``attention_mask``.
    ref_model : transformers causal LM, optional
        ``d``, the reference draft ``r`` was aligned from (sss, sss-paper).
    tokenizer : transformers tokenizer, optional
        Encodes string prompts and decodes ``texts``; must not exceed the models' vocabulary.
    method : str
        ``"sss"`` (exact), ``"sss-paper"``, ``"sd"``, ``"vanilla"``, ``"draft"``, ``"bon"``,
        ``"spec-rejection"`` or ``"soft-bon"``.
    config : SamplingConfig, optional
        Sampling settings; keyword ``config_overrides`` replace single fields.
    reward_fn : callable or transformers reward model, optional
        Needed by bon, spec-rejection and soft-bon (see :mod:`sss_ext.decoding.reward`).

    Returns
    -------
    GenerateOutput

    Shape
    -----
    P prompts -> P sequences of length <= max_new_tokens
    """
    method = check_method(method)
    config = _resolve_config(config, config_overrides)
    models = resolve_models(target, draft, ref_model, tokenizer, method, config)
    if method in REWARD_METHODS:
        check_reward(reward_fn, method, tokenizer, config.reward_input)
    prompts = encode_prompts(prompts_or_input_ids, tokenizer, attention_mask)
    check_prompts(prompts, models, config)

    stats = StatsRecorder(len(prompts))
    generator = torch.Generator(device=models.device).manual_seed(config.seed)
    result = _run(method, models, prompts, config, generator, stats, reward_fn)
    stats.set_new_tokens([int(s.numel()) for s in result.sequences])
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(s.tolist(), skip_special_tokens=True) for s in result.sequences]
    return GenerateOutput(sequences=result.sequences, texts=texts, prompt_ids=prompts, stats=stats.report(), method=method,
                          config=config, log_z=result.log_z, extras=result.extras)


def _run(method: str, models: ModelSet, prompts, config: SamplingConfig, generator, stats: StatsRecorder, reward_fn) -> MethodResult:
    prompt_of_row = torch.arange(len(prompts))
    common = (prompts, prompt_of_row, config, generator, stats, models.eos_token_ids, models.pad_token_id, models.device)
    if method in ("sss", "sss-paper", "sd"):
        ref = models.ref if method != "sd" else None
        run = SpeculativeRun(models.target, models.draft, ref, "paper" if method == "sss-paper" else "exact", *common)
        run.run()
        log_z = run.book.log_z.cpu().tolist() if ref is not None else None
        return MethodResult(sequences=run.book.sequences(), log_z=log_z, extras=[{} for _ in prompts])
    if method in ("vanilla", "draft"):
        model, role = (models.target, "target") if method == "vanilla" else (models.draft, "draft")
        run = AutoregressiveRun(model, role, role, *common)
        run.run()
        return MethodResult(sequences=run.book.sequences(), extras=[{} for _ in prompts])
    scorer = RewardScorer(reward_fn, models.tokenizer, config.reward_input, stats)
    baseline = {"bon": best_of_n, "spec-rejection": speculative_rejection, "soft-bon": soft_best_of_n}[method]
    return baseline(models, prompts, config, generator, stats, scorer)
