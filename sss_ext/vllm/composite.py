"""Speculative SSS inside vLLM (experimental): one composite model holding ``q``, ``r`` and ``d``.

vLLM refuses custom logits processors together with speculative decoding, so the tilt moves
into the model: :class:`SSSCompositeForCausalLM` runs the three Llama stacks on the same
tokens (vLLM manages all three KV caches, one attention layer per decoder layer of each) and
its ``compute_logits`` returns ``zq + λ·(zr − zd)`` with one ``λ`` per engine
(``config.sss_shift``). With ``r`` as vLLM's speculative draft (``method="draft_model"``),
vLLM's verification ``min(1, p/r̃)`` against this target is SSS's rule for ``p*``.

Also here while vLLM 0.32 needs it: the CPU ``expand_batch_to_tokens`` fix. On the CPU
platform ``vllm/utils/cpu_triton_utils.py:_expand_kernel_impl`` casts a float output
(per-request temperature / top-p) into a new int64 copy that is thrown away, so speculative
sampling at ``τ > 0`` reads uninitialised memory; :func:`fix_cpu_expand` replaces the function
with ``repeat_interleave``.

Both are installed by :func:`register`, the ``vllm.general_plugins`` entry point ``sss``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

ARCH = "SSSCompositeForCausalLM"


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
    """``[a, b, c]``, ``cu = [2, 5, 6]`` -> ``[a, a, b, b, b, c]`` (``replace_from`` -> ``replace_to``)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def fix_cpu_expand() -> bool:
    """Replace vLLM's CPU ``expand_batch_to_tokens`` (see the module docstring); True if patched."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.sample import rejection_sampler

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    return True


def register() -> None:
    """``vllm.general_plugins`` entry point: the composite architecture and the CPU expand fix."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "sss_ext.vllm.composite:SSSCompositeForCausalLM")
    fix_cpu_expand()


class SSSCompositeForCausalLM(nn.Module):
    """``q`` (``self.q``), ``r`` (``self.r``), ``d`` (``self.d``) on the same tokens; logits ``zq + λ(zr − zd)``.

    The forward returns the three stacks' last hidden states side by side, ``(T, 3H)``, and
    ``compute_logits`` splits them.
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models.llama import LlamaForCausalLM
        from vllm.model_executor.models.utils import maybe_prefix

        config = vllm_config.model_config.hf_config
        self.config = config
        self.shift = float(config.sss_shift)
        self.hidden = int(config.hidden_size)
        draft_config = copy.deepcopy(config)
        draft_config.num_hidden_layers = int(config.sss_draft_layers)
        if getattr(draft_config, "layer_types", None):
            draft_config.layer_types = list(draft_config.layer_types)[: draft_config.num_hidden_layers]
        draft_vllm_config = vllm_config.with_hf_config(draft_config, architectures=["LlamaForCausalLM"])
        q_vllm_config = vllm_config.with_hf_config(copy.deepcopy(config), architectures=["LlamaForCausalLM"])
        self.q = LlamaForCausalLM(vllm_config=q_vllm_config, prefix=maybe_prefix(prefix, "q"))
        self.r = LlamaForCausalLM(vllm_config=draft_vllm_config, prefix=maybe_prefix(prefix, "r"))
        self.d = LlamaForCausalLM(vllm_config=draft_vllm_config, prefix=maybe_prefix(prefix, "d"))
        self.make_empty_intermediate_tensors = self.q.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids):
        return self.q.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hq = self.q(input_ids, positions, intermediate_tensors, inputs_embeds)
        hr = self.r(input_ids, positions)
        hd = self.d(input_ids, positions)
        return torch.cat([hq, hr, hd], dim=-1)

    def compute_logits(self, hidden_states):
        h = self.hidden
        zq = self.q.compute_logits(hidden_states[..., :h].contiguous())
        if self.shift == 0.0:
            return zq
        zr = self.r.compute_logits(hidden_states[..., h:2 * h].contiguous())
        zd = self.d.compute_logits(hidden_states[..., 2 * h:].contiguous())
        return zq + self.shift * (zr - zd)

    def load_weights(self, weights):
        parts = {"q": [], "r": [], "d": []}
        for name, tensor in weights:
            head, _, rest = name.partition(".")
            if head not in parts:
                raise ValueError(f"{ARCH}: unexpected weight {name!r} (expected q.*, r.* or d.*)")
            parts[head].append((rest, tensor))
        loaded = set()
        for head, items in parts.items():
            for name in getattr(self, head).load_weights(iter(items)):
                loaded.add(f"{head}.{name}")
        return loaded


def export_composite(target_dir, draft_dir, ref_dir, dest, shift: float) -> Path:
    """A vLLM checkpoint of the composite from three exported folders (sss_ext.vllm.export)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .export import check_checkpoint

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for head, folder in (("q", target_dir), ("r", draft_dir), ("d", ref_dir)):
        check_checkpoint(folder)
        for file in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    tensors[f"{head}.{key}"] = f.get_tensor(key)
    cfg = json.loads((Path(target_dir) / "config.json").read_text())
    draft_cfg = json.loads((Path(draft_dir) / "config.json").read_text())
    cfg.update(architectures=[ARCH], sss_shift=float(shift), sss_draft_layers=int(draft_cfg["num_hidden_layers"]))
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for extra in Path(target_dir).iterdir():
        if extra.name not in ("config.json", "model.safetensors") and extra.is_file():
            (dest / extra.name).write_bytes(extra.read_bytes())
    return dest
