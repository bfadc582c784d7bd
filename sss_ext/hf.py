"""transformers ``custom_generate`` entry point (transformers 5.23, the project's pin).

::

    out = target.generate(input_ids, attention_mask=mask, custom_generate=sss_ext.hf.decode,
                          draft_model=draft, ref_model=ref, max_new_tokens=64, do_sample=True, temperature=0.8)

``generate`` prepares the inputs, the generation config, its logits processors and stopping
criteria, then calls :func:`decode` with the target as ``model``. ``decode`` reads
``max_new_tokens`` (through ``max_length``), ``do_sample`` / ``temperature`` / ``top_k`` /
``top_p``, ``eos_token_id`` and ``pad_token_id`` from the generation config and runs
:func:`sss_ext.generate` with its own KV caches (the cache ``generate`` prepared is not used).

* **Logits processors** that depend only on the prefix (:data:`PREFIX_PROCESSORS`:
  ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_length``, ``min_new_tokens``,
  ``bad_words_ids``, ``sequence_bias``, ``suppress_tokens``, ``begin_suppress_tokens``,
  ``forced_bos_token_id``, ``forced_eos_token_id``) are applied to the target's, the draft's
  and the reference's logits at every position with that position's own prefix, the
  left-padded row ``generate`` itself would pass (docs/algorithm.md §1, "Logits processors").
  Temperature / top-k / top-p are the op's own warping. Any other processor (min-p, typical,
  epsilon/eta, watermarking, classifier-free guidance, ``prefix_allowed_tokens_fn``, custom
  classes), or a prefix processor placed after a warper, raises ``ValueError`` naming it.
* **Stopping criteria** (``max_time``, custom ``StoppingCriteria``, ``stop_strings``) are
  evaluated after every new token of a row; the row stops where one fires and the rest of its
  round is cut. ``max_length`` and EOS are the loop's own budget and EOS. transformers pops
  ``tokenizer=`` before calling a ``custom_generate`` callable (so it would refuse
  ``stop_strings``): :func:`decode` takes ``stop_strings`` itself, with the tokenizer as
  ``text_tokenizer=`` (also used for ``texts``).
* **Streamer**: transformers does not hand ``streamer`` to a ``custom_generate`` callable (it
  passes only arguments ``_sample`` lacks) but puts the prompt into it, so :func:`decode`
  takes the streamer of the ``generate`` call that invoked it (:func:`streamer_of_generate`,
  which raises if transformers stops keeping it there); ``put`` receives each round's kept
  tokens (1, n), ``end`` is called at the end. Batch size 1, as transformers' streamers.
* **Padding**: left padding is transformers' convention for decoder-only generation
  (``sss_ext.models.load_default()``'s tokenizer pads left). A right-padded batch decodes
  (the prompts are read through ``attention_mask``) unless a logits processor, a stopping
  criterion or a streamer needs the rows' full context, which is the left-padded row
  ``generate`` passes: then ``ValueError`` says to pad on the left.

Returns the prompts (with their original left padding) followed by the new tokens,
right-padded with ``pad_token_id`` like ``generate`` itself. With
``return_dict_in_generate=True``, a ``GenerateDecoderOnlyOutput`` whose ``sss_output`` holds
the full :class:`~sss_ext.decoding.GenerateOutput` (stats, texts, extras).
"""

from __future__ import annotations

import functools
import sys

import torch

from .decoding.api import generate
from .decoding.config import SamplingConfig

#: transformers logits processors that depend on the prefix alone (applied exactly at every position)
PREFIX_PROCESSORS = (
    "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
    "SequenceBiasLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor", "ForcedBOSTokenLogitsProcessor",
    "ForcedEOSTokenLogitsProcessor",
)
#: the warpers the op applies itself (from the generation config's temperature / top_k / top_p)
_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")


def _sampling_settings(generation_config) -> dict:
    """HF's sampling settings; its TopKLogitsWarper keeps the tokens tied with the k-th logit: "keep"."""
    if not getattr(generation_config, "do_sample", False):
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "top_k_ties": "keep"}
    temperature = generation_config.temperature if generation_config.temperature is not None else 1.0
    top_k = generation_config.top_k if generation_config.top_k is not None else 0
    top_p = generation_config.top_p if generation_config.top_p is not None else 1.0
    return {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p), "top_k_ties": "keep"}


def _warper_matches(processor, settings: dict) -> bool:
    """Whether a warper of the list is exactly the op's warping with ``settings``."""
    name = type(processor).__name__
    if name == "TemperatureLogitsWarper":
        return float(processor.temperature) == settings["temperature"]
    if getattr(processor, "filter_value", -float("inf")) != -float("inf") or getattr(processor, "min_tokens_to_keep", 1) > 1:
        return False
    if name == "TopKLogitsWarper":
        return int(processor.top_k) == settings["top_k"]
    return float(processor.top_p) == settings["top_p"]


def prefix_processors(logits_processor, settings: dict) -> list:
    """The prefix-only processors of ``generate``'s list, in order; ``ValueError`` naming any other.

    Warpers must be the op's own temperature / top-k / top-p (``settings``) and come after
    every prefix processor: the op warps the processed logits.
    """
    kept, unsupported, late, warped = [], [], [], False
    greedy = settings["temperature"] == 0.0
    for processor in logits_processor or []:
        name = type(processor).__name__
        if name in _WARPERS and (greedy or _warper_matches(processor, settings)):
            warped = True  # greedy: temperature / top-k / top-p never move the argmax
        elif name in PREFIX_PROCESSORS:
            (late if warped else kept).append(processor)
        else:
            unsupported.append(name)
    if unsupported:
        raise ValueError(
            f"sss_ext.hf.decode cannot apply logits processor(s) {unsupported} exactly: supported are the prefix-only "
            f"processors {list(PREFIX_PROCESSORS)} and temperature / top_k / top_p from the generation config")
    if late:
        raise ValueError(
            f"logits processor(s) {[type(p).__name__ for p in late]} come after a temperature / top-k / top-p warper; "
            "sss_ext.hf.decode applies processors before warping (as generate's own list does): set them through "
            "the generation config instead of logits_processor=")
    return kept


class PromptProcessors:
    """``generate``'s prefix processors as one hook of :mod:`sss_ext.decoding.hooks`, called per prompt index.

    ``generate`` builds ``RepetitionPenaltyLogitsProcessor`` with per-row padding lengths
    (``prompt_ignore_length``, shape (B,)) so left padding is not penalised; each call takes the
    lengths of the prompts its prefixes belong to.
    """

    takes_prompt_index = True

    def __init__(self, processors: list):
        self.processors = processors

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """Shape: input_ids (N, L), scores (N, V), prompt_index (N,) -> (N, V)"""
        for processor in self.processors:
            ignore = getattr(processor, "prompt_ignore_length", None)
            if isinstance(ignore, torch.Tensor):
                processor = type(processor)(processor.penalty, prompt_ignore_length=ignore.to(prompt_index.device)[prompt_index])
            scores = processor(input_ids, scores)
        return scores


def loop_stopping_criteria(stopping_criteria, max_length: int, eos_token_ids: tuple) -> list:
    """The criteria the loop does not already enforce (its budget ``max_length`` and its EOS ids)."""
    kept = []
    for criterion in stopping_criteria or []:
        name = type(criterion).__name__
        if name == "MaxLengthCriteria" and criterion.max_length >= max_length:
            continue
        if name == "EosTokenCriteria" and set(torch.as_tensor(criterion.eos_token_id).flatten().tolist()) <= set(eos_token_ids):
            continue
        kept.append(criterion)
    return kept


#: how many frames above decode() the calling ``generate`` may sit (decorators add a few)
_GENERATE_FRAME_DEPTH = 8


def streamer_of_generate(model):
    """The ``streamer`` argument of the ``model.generate`` call that runs :func:`decode`, or None.

    transformers does not hand ``streamer`` to a ``custom_generate`` callable, so it is read
    from the calling ``generate``'s frame: the nearest frame named ``generate`` whose ``self`` is
    ``model``, within a few frames of the caller. None when there is no such frame
    (:func:`decode` called directly). ``RuntimeError`` when that frame has no ``streamer``
    variable: transformers changed, and the streamer would be silently lost.
    """
    frame = sys._getframe(1)
    for _ in range(_GENERATE_FRAME_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == "generate" and frame.f_locals.get("self") is model:
            if "streamer" not in frame.f_code.co_varnames:
                raise RuntimeError(
                    "sss_ext.hf.decode could not find the streamer of the calling generate(): this transformers "
                    "version keeps it elsewhere; pass streamer= through generate's kwargs to decode, or use the "
                    "pinned transformers (constraints.txt)")
            return frame.f_locals.get("streamer")
        frame = frame.f_back
    return None


@functools.lru_cache(maxsize=None)
def _output_class():
    """``GenerateDecoderOnlyOutput`` with ``sss_output``: the full :class:`~sss_ext.decoding.GenerateOutput`."""
    from dataclasses import dataclass

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    @dataclass
    class DecodeOutput(GenerateDecoderOnlyOutput):
        sss_output: object = None

    return DecodeOutput


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """``ValueError`` unless every row's padding (mask 0) comes before its tokens (mask 1).

    Shape
    -----
    attention_mask: (B, L)
    """
    if attention_mask.dim() != 2 or attention_mask.shape[1] < 2:
        return
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "the prompts are right-padded (attention_mask has 0s after 1s); logits processors, stopping criteria and "
            "streamers of sss_ext.hf.decode need left padding, transformers' convention for decoder-only generation: "
            "set tokenizer.padding_side = 'left' before tokenizing (sss_ext.models.load_default()'s tokenizer pads left)")


def decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    draft_model=None,
    ref_model=None,
    method: str = "sss",
    sampling_config: SamplingConfig | None = None,
    shift: float | None = None,
    num_draft_tokens: int | None = None,
    num_candidates: int | None = None,
    seed: int | None = None,
    reward_fn=None,
    tokenizer=None,
    observer=None,
    stop_strings=None,
    text_tokenizer=None,
    **model_kwargs,
):
    """Decode with SSS (or another :func:`sss_ext.generate` method) from inside ``model.generate``.

    Parameters
    ----------
    model : transformers causal LM
        The target ``q`` (``generate`` passes itself).
    input_ids : torch.LongTensor
        Left-padded prompts; padding is read from ``attention_mask`` in ``model_kwargs``.
    draft_model, ref_model : transformers causal LMs
        ``r`` and ``d``.
    method : str
        Any method of :func:`sss_ext.generate`.
    sampling_config : SamplingConfig, optional
        Base settings; the generation config's length, sampling and special-token settings
        override it, then ``shift`` / ``num_draft_tokens`` / ``num_candidates`` (sss-sir) / ``seed`` when given.
    observer : callable or Observer, optional
        Per-round records, as ``sss_ext.generate(..., observer=...)``.
    logits_processor, stopping_criteria : transformers lists
        Prepared by ``generate``; see the module docstring for what is applied and what raises.
    streamer : transformers streamer, optional
        Taken from the calling ``generate`` when not given here.
    stop_strings : str or list of str, optional
        A row stops once its text ends with one of them (transformers' ``StopStringCriteria``).
    tokenizer, text_tokenizer : transformers tokenizer, optional
        Needed by ``stop_strings``; ``generate`` keeps ``tokenizer=`` to itself, so pass
        ``text_tokenizer=`` through it (``tokenizer=`` works when calling :func:`decode` directly).

    Returns
    -------
    torch.LongTensor or GenerateDecoderOnlyOutput
        The output with ``sss_output`` (the :class:`~sss_ext.decoding.GenerateOutput`) when
        ``return_dict_in_generate=True``.

    Shape
    -----
    input_ids: (B, L) -> (B, L + max_new_tokens)
    """
    if streamer is None:
        streamer = streamer_of_generate(model)
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    max_new_tokens = int(generation_config.max_length) - input_ids.shape[1]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (max_length {generation_config.max_length} <= prompt length {input_ids.shape[1]})")
    settings = _sampling_settings(generation_config)
    processors = prefix_processors(logits_processor, settings)
    overrides = {"max_new_tokens": max_new_tokens, **settings}
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        overrides["eos_token_id"] = tuple(int(t) for t in torch.as_tensor(eos).flatten().tolist())
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is not None:
        overrides["pad_token_id"] = int(torch.as_tensor(pad).flatten()[0])
    for name, value in (("shift", shift), ("num_draft_tokens", num_draft_tokens), ("num_candidates", num_candidates), ("seed", seed)):
        if value is not None:
            overrides[name] = value
    config = (sampling_config or SamplingConfig()).replace(**overrides)
    criteria = loop_stopping_criteria(stopping_criteria, int(generation_config.max_length), config.eos_token_id or ())
    tokenizer = tokenizer if tokenizer is not None else text_tokenizer
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass text_tokenizer= to generate (transformers does not "
                             "hand tokenizer= to a custom_generate callable)")
        from transformers import StopStringCriteria

        criteria.append(StopStringCriteria(tokenizer, stop_strings))
    hooks = {}
    if processors or criteria or streamer is not None:
        check_left_padded(attention_mask)
        from transformers import StoppingCriteriaList

        hooks = {"logits_processor": PromptProcessors(processors) if processors else None,
                 "stopping_criteria": StoppingCriteriaList(criteria) if criteria else None,
                 "streamer": streamer, "context_ids": list(input_ids.cpu())}
    output = generate(model, draft_model, input_ids, ref_model=ref_model, tokenizer=tokenizer, method=method,
                      config=config, reward_fn=reward_fn, attention_mask=attention_mask, observer=observer, **hooks)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or (0,))[0]
    new = torch.full((input_ids.shape[0], max_new_tokens), pad_id, dtype=torch.int64)
    for row, sequence in enumerate(output.sequences):
        new[row, : sequence.numel()] = sequence
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if getattr(generation_config, "return_dict_in_generate", False):
        return _output_class()(sequences=sequences, sss_output=output)
    return sequences
