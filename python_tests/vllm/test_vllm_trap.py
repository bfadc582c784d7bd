"""The tied-embedding trap in vLLM itself, on a tiny tied Llama (head_dim 32, vocabulary 16).

A checkpoint holding the tied tensor only as ``lm_head.weight`` loads in vLLM with zero
embeddings and uniform logprobs, without an error; the same model written by
``sss_ext.vllm.export.export_model`` (both tensors) loads with real logits. The check that
passes on the export must fail on the tied-only checkpoint.
"""

import pytest

pytest.importorskip("vllm.v1.sample.logits_processor", reason="vLLM is not installed here (scripts/vllm_check.sh builds .venv-vllm)")

import json  # noqa: E402
import math  # noqa: E402

import vllm_helpers as H  # noqa: E402
from sss_ext.vllm.export import check_checkpoint, export_model  # noqa: E402


def _tied_model():
    model = H.tiny_llama(4)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _tied_only(model, dest):
    """What the project's cache holds: config + one tensor per tied pair, named lm_head.weight."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True)
    model.config.save_pretrained(dest)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    tensors["lm_head.weight"] = model.model.embed_tokens.weight.detach().contiguous().clone()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((dest / "config.json").read_text())["tie_word_embeddings"] is True
    return dest


def _real_logits(model_dir) -> None:
    """AssertionError when vLLM's logprobs are uniform (zero embeddings)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = H.start_engine(model_dir, skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=8)
    try:
        out = llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 7])],
                           SamplingParams(max_tokens=3, logprobs=H.TINY_VOCAB, detokenize=False), use_tqdm=False)[0]
    finally:
        H.shutdown(llm)
    for entry in out.outputs[0].logprobs:
        values = [lp.logprob for lp in entry.values()]
        assert max(values) - min(values) > 1e-3, f"uniform logprobs {values[:3]} (-ln V = {-math.log(H.TINY_VOCAB):.4f})"


def test_trap_caught_in_vllm(tmp_path):
    model = _tied_model()
    tied_only = _tied_only(model, tmp_path / "tied_only")
    exported = export_model(model, None, tmp_path / "exported")
    check_checkpoint(exported)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        check_checkpoint(tied_only)
    _real_logits(exported)
    with pytest.raises(AssertionError, match="uniform logprobs"):  # negative control: the trap is real
        _real_logits(tied_only)
