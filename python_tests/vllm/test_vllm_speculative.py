"""Speculative SSS inside vLLM: the composite model (q, r, d in one; logits zq + λ(zr − zd)) as the
target, r as vLLM's speculative draft (``method="draft_model"``), the CPU expand fix applied.

Tiny random models (head_dim 32, vocabulary 16), one engine per λ ∈ {0, 1, 2}: vLLM's returned
logprobs against the reference log p* within 1e-4, speculation active (drafts proposed and
accepted), and for λ = 2 a chi-square test of the sample law against p* by enumeration with the
untilted law as the negative control.
"""

import pytest

pytest.importorskip("vllm.v1.sample.logits_processor", reason="vLLM is not installed here (scripts/vllm_check.sh builds .venv-vllm)")

import torch  # noqa: E402

import vllm_helpers as H  # noqa: E402
from sss_ext.vllm.composite import expand_batch_to_tokens, export_composite, register  # noqa: E402
from test_vllm_tiny import PROMPTS, _check_law, _chi_square_p, _prompt, _sequence_law  # noqa: E402

K = 2  # speculative tokens per step


def test_cpu_expand_fix_semantics():
    x = torch.tensor([0.5, 0.0, 2.0])
    cu = torch.tensor([2, 5, 6])
    assert expand_batch_to_tokens(x, cu, 6, replace_from=0.0, replace_to=1.0).tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]
    ids = torch.tensor([3, 7], dtype=torch.int64)
    assert expand_batch_to_tokens(ids, torch.tensor([1, 3]), 3).tolist() == [3, 7, 7]


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = H.make_tiny_models(root)
    models = tuple(H.load_hf(paths[role]) for role in ("target", "draft", "ref_draft"))
    return root, paths, models


@pytest.fixture(scope="module", params=[0.0, 1.0, 2.0], ids=lambda s: f"shift{s:g}")
def spec_engine(request, tiny_paths):
    root, paths, models = tiny_paths
    shift = request.param
    register()  # what the vllm.general_plugins entry point does in every vLLM process
    composite = export_composite(paths["target"], paths["draft"], paths["ref_draft"], root / f"composite{shift:g}", shift)
    llm = H.start_engine(composite, skip_tokenizer_init=True, max_model_len=64, block_size=32,
                         num_gpu_blocks_override=256, max_num_seqs=256, disable_log_stats=False,
                         speculative_config={"method": "draft_model", "model": str(paths["draft"]),
                                             "num_speculative_tokens": K, "draft_sample_method": "probabilistic"})
    yield shift, models, llm
    H.shutdown(llm)


def _counter(llm, name):
    return sum(m.value for m in llm.get_metrics() if m.name == name and hasattr(m, "value"))


def test_speculative_logprobs_equal_reference(spec_engine):
    from vllm import SamplingParams

    shift, models, llm = spec_engine
    before = _counter(llm, "vllm:spec_decode_num_draft_tokens")
    params = SamplingParams(max_tokens=10, logprobs=0, seed=9, detokenize=False, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate([_prompt(p) for p in PROMPTS], params, use_tqdm=False)):
        _check_law(models, prompt, out.outputs[0], shift)
    drafted = _counter(llm, "vllm:spec_decode_num_draft_tokens") - before
    assert drafted > 0, "speculative decoding did not propose any draft token"


def test_speculative_chi_square(spec_engine):
    from vllm import SamplingParams

    shift, models, llm = spec_engine
    if shift != 2.0:
        pytest.skip("the chi-square test runs on the λ = 2 engine")
    prompt, total = [4, 9, 1], 4000
    accepted0 = _counter(llm, "vllm:spec_decode_num_accepted_tokens")
    outs = llm.generate([_prompt(prompt)], SamplingParams(max_tokens=2, n=total, seed=7, detokenize=False, ignore_eos=True),
                        use_tqdm=False)[0]
    counts = {}
    for completion in outs.outputs:
        key = tuple(completion.token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert _counter(llm, "vllm:spec_decode_num_accepted_tokens") > accepted0
    assert _chi_square_p(counts, _sequence_law(models, prompt, shift), total) > 1e-3
    assert _chi_square_p(counts, _sequence_law(models, prompt, 0.0), total) < 1e-6  # negative control


@pytest.fixture(scope="module")
def default_spec_engine():
    pytest.importorskip("gguf")
    pytest.importorskip("peft")
    from sss_ext.models import cache_dir, load_default
    from sss_ext.vllm.export import export_default

    paths = export_default(cache_dir() / "vllm-export")
    register()
    composite = export_composite(paths["target"], paths["draft"], paths["ref_draft"], cache_dir() / "vllm-composite-1", 1.0)
    m = load_default(rewards=False)
    llm = H.start_engine(composite, max_model_len=512, disable_log_stats=False,
                         speculative_config={"method": "draft_model", "model": str(paths["draft"]),
                                             "num_speculative_tokens": K, "draft_sample_method": "probabilistic"})
    yield m, llm
    H.shutdown(llm)


@pytest.mark.slow
def test_default_models_speculative(default_spec_engine, capsys):
    """λ = 1 on the default models with speculation: law, acceptance and tokens/s (recorded).
    The law on speculative engines is tested on the tiny model above; this one runs with
    ``--run-slow`` (``bash scripts/vllm_check.sh --run-slow``)."""
    import time

    from vllm import SamplingParams
    from test_vllm_default import PROMPTS as TEXTS, _check_law as check_default

    m, llm = default_spec_engine
    params = SamplingParams(max_tokens=10, logprobs=0, seed=1)
    for text, out in zip(TEXTS, llm.generate(TEXTS, params, use_tqdm=False)):
        check_default(m, text, out.outputs[0], 1.0)
    lines = []
    for batch in (1, 8):
        drafted0 = _counter(llm, "vllm:spec_decode_num_draft_tokens")
        accepted0 = _counter(llm, "vllm:spec_decode_num_accepted_tokens")
        prompts = [f"Review {i}: the product" for i in range(batch)]
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, seed=0), use_tqdm=False)
        rate = batch * 16 / (time.perf_counter() - start)
        drafted = _counter(llm, "vllm:spec_decode_num_draft_tokens") - drafted0
        accepted = _counter(llm, "vllm:spec_decode_num_accepted_tokens") - accepted0
        lines.append(f"[vllm speculative] batch {batch}: {rate:.1f} tok/s, acceptance {accepted / max(drafted, 1):.2f} "
                     f"({accepted}/{drafted} drafts, K={K}, λ=1)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
