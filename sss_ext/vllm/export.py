"""Checkpoints that vLLM loads correctly: the default target ``q``, aligned draft ``r`` and reference draft ``d``.

vLLM's Llama loader ties ``lm_head`` to ``model.embed_tokens`` when the config says
``tie_word_embeddings`` and reads the embedding **only** from ``model.embed_tokens.weight``.
A checkpoint that stores the tied tensor once, as ``lm_head.weight`` (what
``safetensors.torch.save_model`` keeps of a tied pair, e.g. the converted default target in
``~/.cache/sss_ext``), loads with no error and embeddings that were never written: zeros
(every logit 0, uniform sampling) or whatever the allocator held. :func:`export_model` always writes both names, and
:func:`check_checkpoint` refuses a checkpoint that lacks ``model.embed_tokens.weight`` or
holds an all-zero one.

    python -m sss_ext.vllm.export DEST      # DEST/target, DEST/draft (r), DEST/ref_draft (d)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
WEIGHTS_FILE = "model.safetensors"
ROLES = ("target", "draft", "ref_draft")


def _state_dict(model) -> dict:
    """Every tensor of ``model`` under its own name, tied ones included (cloned, contiguous)."""
    tensors = {name: t.detach().to(torch.float32).contiguous().clone() for name, t in model.state_dict().items()}
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tensors[EMBED] = emb.detach().to(torch.float32).contiguous().clone()
    tensors[HEAD] = head.detach().to(torch.float32).contiguous().clone()
    return tensors


def export_model(model, tokenizer, dest, *, eos_token_id: int | None = None) -> Path:
    """Write ``model`` (a transformers causal LM) and ``tokenizer`` to ``dest`` for vLLM; atomic.

    Both ``model.embed_tokens.weight`` and ``lm_head.weight`` are saved, in float32.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if eos_token_id is not None:
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["eos_token_id"] = eos_token_id
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        check_checkpoint(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_checkpoint(path) -> None:
    """``ValueError`` unless ``path`` holds a non-zero ``model.embed_tokens.weight`` (vLLM's tied-embedding trap)."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors file (export the model with sss_ext.vllm.export)")
    for file in files:
        with safe_open(str(file), "pt") as f:
            if EMBED in f.keys():
                if not bool(f.get_tensor(EMBED).any()):
                    raise ValueError(f"{file}: {EMBED} is all zeros")
                return
    raise ValueError(
        f"{path} has no {EMBED} (only a tied {HEAD}?): vLLM would load unwritten embeddings (zeros or garbage) without an error; "
        "re-export it with sss_ext.vllm.export.export_model, which writes both tensors")


def export_default(dest, *, force: bool = False) -> dict:
    """Export the default target, aligned draft ``r`` and reference draft ``d`` to ``dest/{target,draft,ref_draft}``.

    Returns ``{role: path}``. Reuses an existing complete export unless ``force``.
    """
    dest = Path(dest)
    paths = {role: dest / role for role in ROLES}
    if not force and all((p / WEIGHTS_FILE).is_file() for p in paths.values()):
        return paths
    from ..models import load_default
    from ..models.target import EOS_TOKEN_ID

    m = load_default(rewards=False)
    for role, model in (("target", m.target), ("draft", m.draft), ("ref_draft", m.ref_draft)):
        export_model(model, m.tokenizer, paths[role], eos_token_id=EOS_TOKEN_ID)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sss_ext.vllm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="folder that receives target/, draft/ and ref_draft/")
    parser.add_argument("--force", action="store_true", help="overwrite an existing export")
    args = parser.parse_args(argv)
    for role, path in export_default(args.dest, force=args.force).items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
