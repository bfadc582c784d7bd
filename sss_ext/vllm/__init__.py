"""vLLM integration: sample the tilted target ``p* ∝ q·(r/d)^λ`` inside vLLM (docs/vllm.md).

* :class:`SSSLogitsProcessor` (``sss_ext.vllm:SSSLogitsProcessor``), a vLLM v1 logits
  processor; also registered as the entry point ``vllm.logits_processors: sss``;
* :mod:`sss_ext.vllm.export`: checkpoints of the default models that vLLM loads correctly
  (both ``model.embed_tokens.weight`` and ``lm_head.weight``).

Importing this package does not import vLLM unless the processor is used.
"""

from __future__ import annotations

__all__ = ["SSSLogitsProcessor", "engine_kwargs", "export_default", "check_checkpoint"]


def __getattr__(name):
    if name == "SSSLogitsProcessor":
        from .processor import SSSLogitsProcessor

        return SSSLogitsProcessor
    if name in ("export_default", "check_checkpoint", "export_model"):
        from . import export

        return getattr(export, name)
    raise AttributeError(name)


def engine_kwargs(draft, ref_draft, *, dtype: str | None = None, register: bool = True) -> dict:
    """Keyword arguments for ``vllm.LLM`` that load the processor with this draft pair.

    ``register=False`` leaves out ``logits_processors`` (when the entry point already loads it).
    """
    sss = {"draft": str(draft), "ref_draft": str(ref_draft)}
    if dtype is not None:
        sss["dtype"] = dtype
    kwargs = {"additional_config": {"sss": sss}}
    if register:
        kwargs["logits_processors"] = ["sss_ext.vllm:SSSLogitsProcessor"]
    return kwargs
