"""The tied-embedding trap in vLLM itself, on a tiny tied Llama (head_dim 32, vocabulary 16).

A checkpoint holding the tied tensor only as ``lm_head.weight`` loads in vLLM without an
error, but with embeddings that were never written (zeros or whatever the allocator held), so
its logprobs are not the model's; the same model written by
``sss_ext.vllm.export.export_model`` (both tensors) loads with the model's logprobs. The check
that passes on the export must fail on the tied-only checkpoint.
"""

import pytest

pytest.importorskip("vllm.v1.sample.logits_processor", reason="vLLM is not installed here (scripts/vllm_check.sh builds .venv-vllm)")

import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402

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


def _model_logprobs(model_dir, model) -> None:
    """AssertionError unless vLLM's logprobs on ``model_dir`` are ``model``'s own (transformers)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = [1, 5, 7]
    llm = H.start_engine(model_dir, skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=8)
    try:
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                           SamplingParams(max_tokens=3, logprobs=H.TINY_VOCAB, detokenize=False), use_tqdm=False)[0]
    finally:
        H.shutdown(llm)
    completion = out.outputs[0]
    sequence = prompt + list(completion.token_ids)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([sequence[:-1]])).logits[0, len(prompt) - 1:].double()
    expected = torch.log_softmax(logits, dim=-1)
    for position, entry in enumerate(completion.logprobs):
        got = torch.tensor([entry[token].logprob for token in range(H.TINY_VOCAB)], dtype=torch.float64)
        gap = (got - expected[position]).abs().max().item()
        assert math.isfinite(gap) and gap < 1e-3, (
            f"logprobs at generated position {position} differ from the model's by {gap:.3g} "
            f"(vLLM {got[:3].tolist()}, transformers {expected[position, :3].tolist()})")


def test_trap_caught_in_vllm(tmp_path):
    model = _tied_model()
    tied_only = _tied_only(model, tmp_path / "tied_only")
    exported = export_model(model, None, tmp_path / "exported")
    check_checkpoint(exported)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        check_checkpoint(tied_only)
    _model_logprobs(exported, model)
    with pytest.raises(AssertionError, match="differ from the model's"):  # negative control: the trap is real
        _model_logprobs(tied_only, model)
