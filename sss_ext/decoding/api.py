"""``sss_ext.generate``: one entry point for SSS, speculative sampling and the baselines."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SamplingConfig
from .context import RunContext
from .hooks import GenerationHooks
from .methods import get_method
from .monitor import CallMonitor
from .observe import Tracker, as_observer
from .randomness import Randomness, check_prompt_indices
from .scoring import RewardScorer, check_reward
from .stats import StatsRecorder, StatsReport
from .validate import check_prompts, encode_prompts, resolve_models


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
        sss / sss-paper / sss-sir (of the chosen candidate): ``sum_t log Z_t`` over the emitted
        tokens, the log importance weight of docs/algorithm.md §6 and §10.
    extras : list of dict
        Method details: candidates, rewards, decisions, fallback for the reward baselines;
        candidates, log_weights, chosen, effective_sample_size, log_weight_spread for sss-sir.
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
             config: SamplingConfig | None = None, reward_fn=None, *, attention_mask=None, observer=None,
             logits_processor=None, stopping_criteria=None, streamer=None, context_ids=None,
             prompt_indices=None, **config_overrides) -> GenerateOutput:
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
        A name of :data:`sss_ext.decoding.methods.METHODS`: ``"sss"`` (exact), ``"sss-paper"``,
        ``"sss-sir"``, ``"sd"``, ``"vanilla"``, ``"draft"``, ``"bon"``, ``"spec-rejection"`` or ``"soft-bon"``.
    config : SamplingConfig, optional
        Sampling settings; keyword ``config_overrides`` replace single fields.
    reward_fn : callable or transformers reward model, optional
        Needed by bon, spec-rejection and soft-bon (see :mod:`sss_ext.decoding.scoring`).
    observer : callable or Observer, optional
        Receives a :class:`~sss_ext.decoding.observe.RoundRecord` after every round (see
        :mod:`sss_ext.decoding.observe`); with a ``clock`` attribute it also gets forward and
        sampler-op timings. None: nothing is recorded.
    logits_processor : callable, optional
        ``(input_ids, scores) -> scores`` (e.g. a ``transformers.LogitsProcessorList``) that
        depends on the prefix ``input_ids`` alone; applied to every model's logits at every
        position with that position's own prefix (:mod:`sss_ext.decoding.hooks`), so sss samples
        the tilt of the processed models (docs/algorithm.md §1, "Logits processors"). Not
        with ``soft-bon``, whose scores use unprocessed log-densities.
    stopping_criteria : callable, optional
        ``(input_ids, scores) -> (N,) bool`` (e.g. a ``transformers.StoppingCriteriaList``): a
        row stops at the first new token after which it fires; later tokens are cut.
    streamer : object, optional
        ``put(tokens)`` receives each kept block, shape (1, n), ``end()`` is called at the end;
        needs one prompt and a method that samples one sequence per prompt.
    context_ids : list of torch.Tensor, optional
        Per prompt, the ids the processor and criteria see before the generated tokens (each
        ending with its prompt); default the prompts.
    prompt_indices : sequence of int or torch.Tensor, optional
        Distinct global index of every prompt, in ``[0, 2**63)``; default ``0 .. P-1``. A
        prompt's random draws derive from ``(config.seed, its index)`` only (docs/algorithm.md
        §5), so a prompt generated in any batch, shard or process gives the same tokens
        when it keeps its index (and its logits, see the same section).

    Every model given must be in eval mode (``ValueError`` naming it otherwise): dropout
    would make the same seed give different outputs.

    Returns
    -------
    GenerateOutput

    Shape
    -----
    P prompts -> P sequences of length <= max_new_tokens
    """
    spec = get_method(method)
    config = _resolve_config(config, config_overrides)
    if observer is not None:
        as_observer(observer)  # ValueError naming observer before any model runs
    models = resolve_models(target, draft, ref_model, tokenizer, spec, config)
    if spec.needs_reward:
        check_reward(reward_fn, method, tokenizer, config.reward_input)
    prompts = encode_prompts(prompts_or_input_ids, tokenizer, attention_mask)
    check_prompts(prompts, models, config)
    hooks = None
    if logits_processor is not None or stopping_criteria is not None or streamer is not None:
        if logits_processor is not None and method == "soft-bon":
            raise ValueError("logits_processor is not supported by method 'soft-bon' (its scores use unprocessed log q - log r)")
        hooks = GenerationHooks(prompts, models.vocab_size, models.device, logits_processor, stopping_criteria, streamer,
                                context_ids)
    elif context_ids is not None:
        raise ValueError("context_ids is only used with a logits_processor, stopping_criteria or streamer")
    randomness = Randomness(config.seed, check_prompt_indices(prompt_indices, len(prompts)), models.device)

    stats = StatsRecorder(len(prompts))
    scorer = RewardScorer(reward_fn, models.tokenizer, config.reward_input, stats) if spec.needs_reward else None
    monitor = CallMonitor(stats, Tracker(observer, method) if observer is not None else None)
    ctx = RunContext(method=method, models=models, prompts=prompts, config=config, randomness=randomness, stats=stats,
                     monitor=monitor, scorer=scorer, hooks=hooks)
    result = spec.run(ctx)
    if hooks is not None:
        hooks.end()
    stats.set_new_tokens([int(s.numel()) for s in result.sequences])
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(s.tolist(), skip_special_tokens=True) for s in result.sequences]
    return GenerateOutput(sequences=result.sequences, texts=texts, prompt_ids=prompts, stats=stats.report(), method=method,
                          config=config, log_z=result.log_z, extras=result.extras)
