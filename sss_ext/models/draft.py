"""Few-layer drafts that share the target's (frozen) embeddings and output head.

A draft is a ``LlamaForCausalLM`` with ``num_hidden_layers = len(layer_ids)``, initialised
from those layers of the target (+ the target's final norm), whose ``embed_tokens`` and
``lm_head`` *are* the target's modules (no copy: the tokenizer and vocabulary are shared by
construction). Only the decoder layers and the final norm are trained and shipped.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from .paths import WEIGHTS_DIR

DRAFT_FILE = "draft_layers.safetensors"
ADAPTER_DIR = "dpo_adapter"
DEFAULT_LAYER_IDS = (0, 1, 2, 3)


def build_draft(target, layer_ids=DEFAULT_LAYER_IDS):
    """A draft made of ``target.model.layers[layer_ids]`` (copied) + shared embeddings/head."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = len(layer_ids)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layer_ids]
    with torch.device("meta"):
        draft = LlamaForCausalLM(cfg)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.lm_head = target.lm_head
    draft.model.rotary_emb = copy.deepcopy(target.model.rotary_emb)
    draft.model.norm = copy.deepcopy(target.model.norm)
    layers = []
    for new_idx, old_idx in enumerate(layer_ids):
        layer = copy.deepcopy(target.model.layers[old_idx])
        layer.self_attn.layer_idx = new_idx
        layers.append(layer)
    draft.model.layers = torch.nn.ModuleList(layers)
    draft.generation_config = copy.deepcopy(target.generation_config)
    for name, p in draft.named_parameters():
        p.requires_grad_(name.startswith("model.layers.") or name.startswith("model.norm."))
    draft.eval()
    return draft


def trainable_state_dict(draft) -> dict:
    """The draft's own tensors (layers + final norm): what is shipped."""
    return {k: v for k, v in draft.state_dict().items() if k.startswith("model.layers.") or k.startswith("model.norm.")}


def save_draft(draft, path: Path, dtype=torch.bfloat16, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(dtype).contiguous() for k, v in trainable_state_dict(draft).items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    save_file(tensors, str(path), metadata=meta)


def load_draft(target, path: Path | None = None, dtype=torch.float32):
    """The shipped reference draft ``d``: layers from ``path`` on the target's embeddings."""
    from safetensors import safe_open

    path = Path(path or WEIGHTS_DIR / DRAFT_FILE)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layer_ids = tuple(int(x) for x in meta.get("layer_ids", ",".join(map(str, DEFAULT_LAYER_IDS))).split(","))
    draft = build_draft(target, layer_ids)
    missing = set(trainable_state_dict(draft)) - set(tensors)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)[:4]}...")
    with torch.no_grad():
        own = dict(draft.named_parameters())
        for k, v in tensors.items():
            own[k].copy_(v.to(dtype))
    for p in draft.parameters():
        p.requires_grad_(False)
    return draft.eval()


def apply_adapter(draft, adapter_dir: Path | None = None):
    """The aligned draft ``r``: a *new* draft (own layer copies, shared embeddings) with the
    shipped DPO LoRA adapter merged into its layers. ``draft`` itself is left untouched."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir or WEIGHTS_DIR / ADAPTER_DIR)
    layer_ids = tuple(range(draft.config.num_hidden_layers))
    aligned = build_draft(_Shell(draft), layer_ids)
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias; nothing to act on here
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(aligned, str(adapter_dir), is_trainable=False)
    merged = peft_model.merge_and_unload()
    # merge_and_unload keeps the shared modules: re-point them explicitly to be sure
    merged.model.embed_tokens = draft.model.embed_tokens
    merged.lm_head = draft.lm_head
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


class _Shell:
    """Lets ``build_draft`` copy a draft's layers as if the draft were a target."""

    def __init__(self, model):
        self.config = model.config
        self.model = model.model
        self.lm_head = model.lm_head
        self.generation_config = model.generation_config
