"""Checks of the arguments of :func:`sss_ext.generate` (models, tokenizer, prompts) before anything runs.

(The decoding layer's checks; the default offline *models* live in :mod:`sss_ext.models`.)

Every failure is a ``ValueError`` naming the offending argument of :func:`sss_ext.generate`.
"""

from __future__ import annotations

import torch

from .config import SamplingConfig
from .context import ModelSet
from .roles import BY_ARGUMENT



def vocab_size_of(model, name: str) -> int:
    """Rows of the model's output layer (falls back to ``config.vocab_size``)."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(_text_config(model), "vocab_size", None)
    if not isinstance(size, int):
        raise ValueError(f"{name} has no output embedding and no config.vocab_size; cannot check its vocabulary")
    return size


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def context_length_of(model) -> int | None:
    config = _text_config(model)
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_of(model, name: str) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        raise ValueError(f"{name} has no parameters") from None


def _check_causal_lm(model, name: str) -> None:
    if model is None:
        return
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"{name} must be a transformers causal LM (a torch.nn.Module with a config), got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; sss_ext.generate drives decoder-only causal LMs")


def check_eval_mode(model, name: str) -> None:
    """``ValueError`` naming ``name`` when ``model`` (or any submodule) is in training mode."""
    if isinstance(model, torch.nn.Module) and any(module.training for module in model.modules()):
        raise ValueError(f"{name} is in training mode (dropout makes the same seed give different outputs); call {name}.eval()")


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    return tuple(int(v) for v in value)


def resolve_models(target, draft, ref_model, tokenizer, spec, config: SamplingConfig) -> ModelSet:
    """Check the models a method needs and what they must share.

    ``spec`` is the method's :class:`~sss_ext.decoding.methods.Method` (its ``models_for(config)``:
    the argument names it runs). Raises ``ValueError`` for a proposer the method does not take,
    a missing model, a model in training mode, different vocabularies, models on different
    devices, or a tokenizer with more tokens than the models' vocabulary.
    """
    method = spec.name
    spec.check_config(config)
    runs = spec.models_for(config)
    given = {"target": target, "draft": draft, "ref_model": ref_model}
    for name in runs:
        if given[name] is None:
            why = " (SSS divides by the reference draft d)" if name == "ref_model" and spec.needs_ref else ""
            raise ValueError(f"method={method!r} needs {name}{why}; got None")
    for name, model in given.items():
        _check_causal_lm(model, name)
    for name, model in given.items():
        if model is not None:
            check_eval_mode(model, name)
    used = {name: given[name] for name in runs}
    # every model passed must share the vocabulary, even one this method does not run
    present = {name: model for name, model in given.items() if model is not None}
    vocab = {name: vocab_size_of(model, name) for name, model in present.items()}
    first_name = next(iter(used))
    vocab_size = vocab[first_name]
    for name, size in vocab.items():
        if size != vocab_size:
            listing = ", ".join(f"{n}={s}" for n, s in vocab.items())
            raise ValueError(f"{name} has vocab_size {size} but {first_name} has {vocab_size}; the models must share one vocabulary ({listing})")
    devices = {name: _device_of(model, name) for name, model in used.items()}
    device = devices[first_name]
    for name, dev in devices.items():
        if dev != device:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {device}; put all models on one device")
    if tokenizer is not None:
        try:
            tokenizer_size = len(tokenizer)
        except TypeError:
            raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}") from None
        if tokenizer_size > vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer_size} tokens but the models' vocab_size is {vocab_size}; "
                "the tokenizer does not match the models"
            )
    contexts = [c for c in (context_length_of(model) for model in used.values()) if c is not None]
    context_length = min(contexts) if contexts else None
    eos = _resolve_eos(config, tokenizer, used)
    bad_eos = [t for t in eos if t >= vocab_size]
    if bad_eos:
        raise ValueError(f"eos_token_id {bad_eos[0]} is outside the vocabulary [0, {vocab_size})")
    pad = config.pad_token_id
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = pad if isinstance(pad, int) and 0 <= pad < vocab_size else 0
    if pad >= vocab_size:
        raise ValueError(f"pad_token_id {pad} is outside the vocabulary [0, {vocab_size})")
    return ModelSet(
        **{role.name: given[role.argument] if role.argument in used else None for role in BY_ARGUMENT.values()},
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        device=device,
        context_length=context_length,
        eos_token_ids=eos,
        pad_token_id=pad,
    )


def _resolve_eos(config: SamplingConfig, tokenizer, used: dict) -> tuple[int, ...]:
    if config.ignore_eos:
        return ()
    if config.eos_token_id is not None:
        return config.eos_token_id
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return _as_ids(tokenizer.eos_token_id)
    model = used.get("target") or next(iter(used.values()))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(generation_config, "eos_token_id", None) is not None:
        return _as_ids(generation_config.eos_token_id)
    return _as_ids(getattr(_text_config(model), "eos_token_id", None))


def encode_prompts(prompts_or_input_ids, tokenizer, attention_mask=None) -> list[torch.Tensor]:
    """Normalise prompts to a list of 1-D int64 CPU tensors (one per prompt, no padding).

    Accepts a string, a list of strings (needs ``tokenizer``), a 1-D or 2-D tensor of ids
    (with an optional 2-D ``attention_mask`` marking padding), or a list of id lists / tensors.
    """
    name = "prompts_or_input_ids"
    value = prompts_or_input_ids
    if isinstance(value, str):
        value = [value]
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int64, torch.int32) or value.dim() not in (1, 2):
            raise ValueError(f"{name} as a tensor must be 1-D or 2-D int64 token ids, got {value.dtype} of shape {tuple(value.shape)}")
        value = value.to(torch.int64).cpu()
        if value.dim() == 1:
            value = value[None]
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(value.shape):
                raise ValueError(f"attention_mask must be a tensor of shape {tuple(value.shape)} like {name}")
            keep = attention_mask.cpu().bool()
            value = [row[mask] for row, mask in zip(value, keep)]
        else:
            value = list(value)
    elif attention_mask is not None:
        raise ValueError(f"attention_mask is only meaningful when {name} is a 2-D tensor")
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty list of prompts (strings or token ids), got {type(value).__name__} {value!r:.60}")
    encoded = []
    for index, prompt in enumerate(value):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"{name}[{index}] is a string; pass tokenizer= to encode text prompts")
            ids = tokenizer(prompt)["input_ids"]
            ids = torch.tensor(ids, dtype=torch.int64)
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise ValueError(f"{name}[{index}] must be a 1-D tensor of token ids, got shape {tuple(prompt.shape)} {prompt.dtype}")
            ids = prompt.to(dtype=torch.int64, device="cpu")
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = torch.tensor(list(prompt), dtype=torch.int64)
        else:
            raise ValueError(f"{name}[{index}] must be a string, a list of ints or a 1-D tensor, got {type(prompt).__name__}")
        if ids.numel() == 0:
            raise ValueError(f"{name}[{index}] is empty: every prompt needs at least one token")
        encoded.append(ids)
    return encoded


def check_prompts(prompts: list[torch.Tensor], models: ModelSet, config: SamplingConfig) -> None:
    """Token ids in the vocabulary; prompt + ``max_new_tokens`` within the models' context."""
    name = "prompts_or_input_ids"
    every = torch.cat(prompts)
    if int(every.min()) < 0 or int(every.max()) >= models.vocab_size:
        for index, ids in enumerate(prompts):
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= models.vocab_size:
                raise ValueError(f"{name}[{index}] holds token id {low if low < 0 else high}, outside the vocabulary [0, {models.vocab_size})")
    if models.context_length is None:
        return
    lengths = torch.tensor([p.numel() for p in prompts])
    longest = int(torch.argmax(lengths))
    length = int(lengths[longest])
    if length >= models.context_length:
        raise ValueError(
            f"{name}[{longest}] has {length} tokens, but the models' context length is {models.context_length} "
            "(no room for a new token)"
        )
    if length + config.max_new_tokens > models.context_length:
        raise ValueError(
            f"max_new_tokens={config.max_new_tokens} plus the longest prompt ({name}[{longest}], {length} tokens) "
            f"exceeds the models' context length {models.context_length}"
        )
