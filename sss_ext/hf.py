"""transformers ``custom_generate`` entry point (transformers 5.23, the project's pin).

::

    out = target.generate(input_ids, attention_mask=mask, custom_generate=sss_ext.hf.decode,
                          draft_model=draft, ref_model=ref, max_new_tokens=64, do_sample=True, temperature=0.8)

``generate`` prepares the inputs and the generation config, then calls :func:`decode` with
the target as ``model``. ``decode`` reads ``max_new_tokens`` (through ``max_length``),
``do_sample`` / ``temperature`` / ``top_k`` / ``top_p``, ``eos_token_id`` and
``pad_token_id`` from the generation config and runs :func:`sss_ext.generate` with its own
KV caches (the cache ``generate`` prepared is not used). Other logits processors cannot be
applied without breaking exactness and are ignored with a warning. Returns the prompts
(with their original left padding) followed by the new tokens, right-padded with
``pad_token_id`` like ``generate`` itself; a ``GenerateDecoderOnlyOutput`` when
``return_dict_in_generate=True``. The full :class:`~sss_ext.decoding.GenerateOutput`
(stats included) of the last call is kept in ``decode.last_output``.
"""

from __future__ import annotations

import warnings

import torch

from .decoding.api import generate
from .decoding.config import SamplingConfig

_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")


def _sampling_settings(generation_config) -> dict:
    if not getattr(generation_config, "do_sample", False):
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    temperature = generation_config.temperature if generation_config.temperature is not None else 1.0
    top_k = generation_config.top_k if generation_config.top_k is not None else 0
    top_p = generation_config.top_p if generation_config.top_p is not None else 1.0
    return {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}


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

    Returns
    -------
    torch.LongTensor or GenerateDecoderOnlyOutput

    Shape
    -----
    input_ids: (B, L) -> (B, L + max_new_tokens)
    """
    if streamer is not None:
        raise ValueError("streamer is not supported by sss_ext.hf.decode")
    ignored = [type(p).__name__ for p in (logits_processor or []) if type(p).__name__ not in _WARPERS]
    if ignored:
        warnings.warn(f"sss_ext.hf.decode ignores logits processors {ignored}: they would break exact sampling", stacklevel=2)
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    max_new_tokens = int(generation_config.max_length) - input_ids.shape[1]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (max_length {generation_config.max_length} <= prompt length {input_ids.shape[1]})")
    overrides = {"max_new_tokens": max_new_tokens, **_sampling_settings(generation_config)}
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
    output = generate(model, draft_model, input_ids, ref_model=ref_model, tokenizer=tokenizer, method=method,
                      config=config, reward_fn=reward_fn, attention_mask=attention_mask, observer=observer)
    decode.last_output = output
    pad_id = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or (0,))[0]
    new = torch.full((input_ids.shape[0], max_new_tokens), pad_id, dtype=torch.int64)
    for row, sequence in enumerate(output.sequences):
        new[row, : sequence.numel()] = sequence
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if getattr(generation_config, "return_dict_in_generate", False):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


decode.last_output = None
