"""The op family is a proper torch.library citizen: schemas, fake kernels, opcheck,
torch.compile(fullgraph=True), and an honest build report."""

import subprocess
import sys

import pytest
import torch

import sss_ext
from sss_ext.testing import make_verify_inputs


def verify_args(device, with_ref=True, dtype=torch.float32, temperature=0.8, top_k=0, top_p=1.0, mode="exact", top_k_ties="keep",
                verification="token"):
    kw = make_verify_inputs(3, 4, 33, dtype, with_ref, temperature, top_k, top_p, device=device, top_k_ties=top_k_ties)
    return (kw["target_logits"], kw["draft_logits"], kw["draft_tokens"], kw["ref_logits"], kw["uniforms"],
            temperature, top_k, top_p, 1.0, mode, None, top_k_ties, None, verification)


def test_schemas_are_registered():
    assert "sss_ext::verify" in str(torch.ops.sss_ext.verify.default._schema)
    assert "Tensor? ref_logits" in str(torch.ops.sss_ext.verify.default._schema)
    assert "sss_ext::sample" in str(torch.ops.sss_ext.sample.default._schema)
    assert 'str top_k_ties="keep") ->' in str(torch.ops.sss_ext.sample.default._schema)  # the last argument
    verify_schema = str(torch.ops.sss_ext.verify.default._schema)
    assert "Tensor? draft_logits" in verify_schema  # None: one-hot drafts
    assert 'str top_k_ties="keep", Tensor? aligned_logits=None, str verification="token") ->' in verify_schema, verify_schema


@pytest.mark.parametrize(
    "options",
    [dict(), dict(with_ref=False), dict(dtype=torch.bfloat16, top_k=5), dict(dtype=torch.bfloat16, top_k=5, top_k_ties="exact-k"),
     dict(mode="paper", top_p=0.9), dict(temperature=0.0), dict(verification="block"),
     dict(verification="block", with_ref=False, dtype=torch.bfloat16, top_k=5), dict(verification="block", temperature=0.0)],
    ids=["exact", "sd", "bf16-topk", "bf16-topk-exact-k", "paper-topp", "greedy", "block", "block-sd-bf16-topk", "block-greedy"],
)
def test_opcheck_verify(device, options):
    torch.library.opcheck(torch.ops.sss_ext.verify.default, verify_args(device, **options))


@pytest.mark.parametrize("top_k_ties", ["keep", "exact-k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_sample(device, dtype, top_k_ties):
    logits = torch.randn(5, 21, device=device).to(dtype)
    uniforms = torch.rand(5, dtype=torch.float64, device=device).clamp(1e-6, 1 - 1e-6)
    torch.library.opcheck(torch.ops.sss_ext.sample.default, (logits, uniforms, 0.9, 4, 0.95, top_k_ties))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in verify_args("cpu")]
    with mode:
        tokens, num_accepted, log_z = torch.ops.sss_ext.verify.default(*args)
    assert tokens.shape == (3, 5) and tokens.dtype == torch.int64
    assert num_accepted.shape == (3,) and log_z.shape == (3, 5) and log_z.dtype == torch.float32


def test_torch_compile_fullgraph_matches_eager(device):
    kw = make_verify_inputs(4, 3, 50, torch.float32, True, 0.9, device=device)

    def round_and_next_draft(target_logits, draft_logits, draft_tokens, ref_logits, uniforms):
        result = sss_ext.verify(target_logits, draft_logits, draft_tokens, ref_logits, temperature=0.9, uniforms=uniforms)
        next_draft = sss_ext.sample(draft_logits[:, 0], 0.9, uniforms=uniforms[:, 0].contiguous())
        return result.tokens, result.num_accepted, next_draft

    args = (kw["target_logits"], kw["draft_logits"], kw["draft_tokens"], kw["ref_logits"], kw["uniforms"])
    compiled = torch.compile(round_and_next_draft, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(*args), round_and_next_draft(*args)):
        assert torch.equal(got, expected)


def test_info_reports_the_build():
    output = subprocess.run([sys.executable, "-m", "sss_ext.info"], capture_output=True, text=True, check=True).stdout
    assert f"built against torch {sss_ext.BUILD_INFO['torch_version']}" in output
    assert ("CUDA kernels: verify, sample, verify_tree (CUDA " in output) == sss_ext.BUILD_INFO["cuda"]
    assert ("CUDA kernels: not built" in output) != sss_ext.BUILD_INFO["cuda"]
    assert "CPU kernels: verify, sample" in output
