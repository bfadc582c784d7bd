"""Continuous batching with preemption: tiny models, a KV cache of 6 blocks of 32 tokens.

8 requests with different λ, prompts, lengths and seeds are added at staggered steps; the
cache cannot hold them all, so vLLM preempts (frees the blocks, later recomputes) some of them.
The processor is passed as ``logits_processors=[...]`` (also loaded by the entry point: one
instance adds the tilt).
"""

import pytest

pytest.importorskip("vllm.v1.sample.logits_processor", reason="vLLM is not installed here (scripts/vllm_check.sh builds .venv-vllm)")

import numpy as np  # noqa: E402

import vllm_helpers as H  # noqa: E402
from test_vllm_tiny import SHIFT, _check_law, _params, _prompt  # noqa: E402


@pytest.fixture(scope="module")
def tiny_small_cache(tmp_path_factory):
    paths = H.make_tiny_models(tmp_path_factory.mktemp("tiny"))
    models = tuple(H.load_hf(paths[role]) for role in ("target", "draft", "ref_draft"))
    llm = H.start_engine(paths["target"], sss=paths, register=True, skip_tokenizer_init=True,
                         max_model_len=64, block_size=32, num_gpu_blocks_override=6)
    yield paths, models, llm
    H.shutdown(llm)


def test_staggered_batch_with_preemption_equals_alone(tiny_small_cache):
    """8 requests (different λ, prompts, lengths, seeds) added at different steps to an engine whose
    KV cache (6 blocks of 32 tokens) cannot hold them all: each equals the request run alone."""
    paths, models, llm = tiny_small_cache
    rng = np.random.default_rng(0)
    specs = []
    for i in range(8):
        prompt = rng.integers(0, H.TINY_VOCAB, size=int(rng.integers(2, 20))).tolist()
        specs.append((prompt, _params(shift=[0.0, 0.5, 1.0, 2.0][i % 4], max_tokens=int(rng.integers(10, 40)),
                                      seed=100 + i, ignore_eos=True)))
    alone = [llm.generate([_prompt(p)], sp, use_tqdm=False)[0].outputs[0] for p, sp in specs]
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler  # in-process engine (vllm_helpers)
    preempted = []
    original = scheduler._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = counting
    done, pending, step = {}, list(enumerate(specs)), 0
    while pending or engine.has_unfinished_requests():
        while pending and (step >= 3 * pending[0][0] // 2):  # add requests at staggered steps
            i, (prompt, sp) = pending.pop(0)
            engine.add_request(f"stagger-{i}", _prompt(prompt), sp)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id.split("-")[1])] = out.outputs[0]
        step += 1
    del scheduler._preempt_request
    assert sorted(done) == list(range(8))
    assert preempted, "the KV cache was meant to be too small for the 8 requests"
    for i, (prompt, sp) in enumerate(specs):
        assert list(done[i].token_ids) == list(alone[i].token_ids), i
        _, together = H.sampled_logprobs(done[i])
        _, single = H.sampled_logprobs(alone[i])
        assert np.allclose(together, single, atol=1e-4), i
        _check_law(models, prompt, done[i], sp.extra_args[SHIFT])
