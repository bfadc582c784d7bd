"""Shared pieces of the vLLM tests: tiny random checkpoints, engines, the reference log p*.

Imported only after ``pytest.importorskip`` found vLLM (``python_tests/vllm/test_*.py``).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

import sss_ext
from sss_ext.vllm import engine_kwargs
from sss_ext.vllm.export import export_model

# vLLM's CPU runner: a small KV-cache pool, engine in this process (faster start, no spawn).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 16


def tiny_llama(seed: int, vocab: int = TINY_VOCAB, layers: int = 2, head_scale: float = 1.0):
    """A random Llama with head_dim 32 (the CPU attention backend's smallest) and peaked logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=vocab + 100, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
        model.lm_head.weight.mul_(head_scale)
    return model


def make_tiny_models(root: Path, vocab: int = TINY_VOCAB) -> dict:
    """target/draft/ref_draft tiny checkpoints (no tokenizer: engines use skip_tokenizer_init)."""
    root = Path(root)
    paths = {}
    for role, seed, scale in (("target", 1, 1.0), ("draft", 2, 1.5), ("ref_draft", 3, 1.5)):
        paths[role] = root / role
        if not (paths[role] / "model.safetensors").is_file():
            export_model(tiny_llama(seed, vocab, head_scale=scale), None, paths[role])
    return paths


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def start_engine(model_dir, *, sss=None, register=True, max_model_len=256, **kwargs):
    """``vllm.LLM`` on the CPU in float32, eager, logprobs after processing (log p* of the tilted rows)."""
    from vllm import LLM

    extra = {}
    if sss is not None:
        extra = engine_kwargs(sss["draft"], sss["ref_draft"], register=register, **sss.get("options", {}))
    args = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=max_model_len,
                logprobs_mode="processed_logprobs", seed=0, max_num_seqs=64, enable_prefix_caching=False)
    args.update(extra)
    args.update(kwargs)
    return LLM(**args)


def shutdown(llm) -> None:
    try:
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    finally:
        del llm
        gc.collect()


@torch.inference_mode()
def reference_logp(models, sequence, prompt_len, shift: float, temperature: float = 1.0) -> torch.Tensor:
    """log p* (float64) at every generated position of ``sequence`` from uncached forwards.

    ``models`` = (target, draft, ref_draft) transformers models. Row ``t`` is the law of token
    ``prompt_len + t`` given the tokens before it.

    Shape
    -----
    -> (len(sequence) - prompt_len, V)
    """
    ids = torch.tensor([sequence[:-1]], dtype=torch.int64)
    zq, zr, zd = (m(input_ids=ids).logits[0, prompt_len - 1:].double() for m in models)
    s = sss_ext.reference.tilted_scores(zq, zr, zd, 1.0 / temperature, float(shift))
    return torch.log_softmax(s, dim=-1)


def sampled_logprobs(completion):
    """(token ids, their returned logprobs) of one vLLM completion."""
    tokens = list(completion.token_ids)
    values = [entry[tok].logprob for tok, entry in zip(tokens, completion.logprobs)]
    return tokens, values
