"""Bad input gets a ValueError naming the argument and what was expected, from the Python
wrappers, from the reference and from the registered op called directly (C++ checks)."""

import types

import pytest
import torch

import sss_ext
import sss_ext.ops

B, K, V = 2, 3, 7


def good(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return dict(
        target_logits=torch.randn(B, K + 1, V, generator=g).to(device),
        draft_logits=torch.randn(B, K + 1, V, generator=g).to(device),
        draft_tokens=torch.randint(0, V, (B, K), generator=g).to(device),
        ref_logits=torch.randn(B, K + 1, V, generator=g).to(device),
        uniforms=torch.full((B, K + 1), 0.5, dtype=torch.float64).to(device),
    )


def with_value(name, index, value):
    def mutate(kwargs):
        kwargs[name] = kwargs[name].clone()
        kwargs[name][index] = value
    return mutate


def replace(name, value):
    def mutate(kwargs):
        kwargs[name] = value(kwargs) if callable(value) else value
    return mutate


# (id, mutation of the keyword arguments, pattern the message must contain)
CASES = [
    ("target batch", replace("target_logits", lambda k: k["target_logits"][:1]), r"target_logits must have shape \(B, K\+1, V\)"),
    ("target positions", replace("target_logits", lambda k: k["target_logits"][:, :K]), r"target_logits must have shape \(B, K\+1, V\)"),
    ("draft vocab", replace("draft_logits", lambda k: k["draft_logits"][..., :V - 1]), r"draft_logits must have shape"),
    ("ref vocab", replace("ref_logits", lambda k: k["ref_logits"][..., :V - 1]), r"ref_logits must have shape"),
    ("draft K with ref", replace("draft_logits", lambda k: k["draft_logits"][:, :K]), r"draft_logits must have shape \(B, K\+1, V\)"),
    ("target 2-D", replace("target_logits", lambda k: k["target_logits"][0]), r"target_logits must be 3-D"),
    ("target int", replace("target_logits", lambda k: k["target_logits"].long()), r"target_logits must have dtype float32, bfloat16 or float16"),
    ("target float64", replace("target_logits", lambda k: k["target_logits"].double()), r"target_logits must have dtype"),
    ("mixed dtypes", replace("draft_logits", lambda k: k["draft_logits"].half()), r"draft_logits must have the dtype of target_logits"),
    ("tokens int32", replace("draft_tokens", lambda k: k["draft_tokens"].int()), r"draft_tokens must (have dtype int64|be a 2-D int64)"),
    ("token id V", with_value("draft_tokens", (1, 2), V), r"draft_tokens must hold token ids in \[0, 7\), found 7"),
    ("token id -1", with_value("draft_tokens", (0, 0), -1), r"draft_tokens must hold token ids in \[0, 7\), found -1"),
    ("NaN target", with_value("target_logits", (1, 1, 3), float("nan")), r"target_logits must be finite or -inf"),
    ("+inf draft", with_value("draft_logits", (0, 0, 0), float("inf")), r"draft_logits must be finite or -inf"),
    ("-inf row", with_value("ref_logits", (1, 2), float("-inf")), r"ref_logits has a row with every logit -inf"),
    ("uniform 0", with_value("uniforms", (0, 1), 0.0), r"uniforms must lie in the open interval \(0, 1\)"),
    ("uniform 1", with_value("uniforms", (1, K), 1.0), r"uniforms must lie in the open interval \(0, 1\)"),
    ("uniforms float32", replace("uniforms", lambda k: k["uniforms"].float()), r"uniforms must (have dtype float64|be a float64)"),
    ("uniforms shape", replace("uniforms", lambda k: k["uniforms"][:, :K]), r"uniforms must (have shape|be a float64 tensor of shape) \(B, K\+1\)"),
    ("devices", replace("draft_logits", lambda k: k["draft_logits"].to("meta")), r"all tensors must be on one device"),
    ("temperature", replace("temperature", -0.5), r"temperature must be a finite float >= 0"),
    ("top_p zero", replace("top_p", 0.0), r"top_p must be a float in \(0, 1\]"),
    ("top_p big", replace("top_p", 1.5), r"top_p must be a float in \(0, 1\]"),
    ("top_k negative", replace("top_k", -1), r"top_k must be an int >= 0"),
    ("shift negative", replace("shift", -1.0), r"shift \(lambda\) must be a finite float >= 0"),
    ("mode", replace("mode", "fast"), r"mode must be"),
    ("top_k_ties", replace("top_k_ties", "ties"), r"top_k_ties must be"),
    ("top_k_ties case", replace("top_k_ties", "Keep"), r"top_k_ties must be"),
    ("paper without ref", lambda k: (k.update(mode="paper"), k.update(ref_logits=None)), r"mode='paper' needs ref_logits"),
]
SCALAR_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, shift=1.0, mode="exact", top_k_ties="keep")
DATA_CASES = {"token id V", "token id -1", "NaN target", "+inf draft", "-inf row", "uniform 0", "uniform 1"}


def bad_kwargs(mutate):
    kwargs = {**good(), **SCALAR_DEFAULTS}
    mutate(kwargs)
    return kwargs


@pytest.mark.parametrize("case_id,mutate,pattern", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("entry", ["op", "reference"])
def test_verify_rejects_bad_input(entry, case_id, mutate, pattern):
    verify = sss_ext.verify if entry == "op" else sss_ext.reference.verify
    with pytest.raises(ValueError, match=pattern):
        verify(**bad_kwargs(mutate))


@pytest.mark.parametrize("case_id,mutate,pattern", [c for c in CASES if c[0] != "devices"], ids=[c[0] for c in CASES if c[0] != "devices"])
def test_registered_op_checks_in_cpp(case_id, mutate, pattern):
    """The C++ adapter validates too: calling torch.ops.sss_ext.verify directly cannot crash."""
    k = bad_kwargs(mutate)
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        torch.ops.sss_ext.verify(k["target_logits"], k["draft_logits"], k["draft_tokens"], k["ref_logits"], k["uniforms"],
                                 k["temperature"], k["top_k"], k["top_p"], k["shift"], k["mode"], top_k_ties=k["top_k_ties"])


def test_disjoint_masks_leave_no_tilted_support():
    k = good()
    k["target_logits"][0, 1, :4] = float("-inf")
    k["draft_logits"][0, 1, 4:] = float("-inf")
    for verify in (sss_ext.verify, sss_ext.reference.verify):
        with pytest.raises(ValueError, match=r"p\* has no token with positive probability"):
            verify(**k)


def test_non_tensor_arguments_are_named():
    k = good()
    with pytest.raises(ValueError, match="draft_tokens must be a torch.Tensor"):
        sss_ext.verify(k["target_logits"], k["draft_logits"], [[1, 2, 3], [1, 2, 3]])
    with pytest.raises(ValueError, match="temperature must be"):
        sss_ext.verify(**k, temperature="hot")


def test_cuda_tensors_without_cuda_build_are_refused(monkeypatch):
    monkeypatch.setitem(sss_ext.ops.BUILD_INFO, "cuda", False)
    fake_cuda_tensor = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="no CUDA kernels"):
        sss_ext.ops._check_device_built("target_logits", fake_cuda_tensor)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(logits=torch.randn(3)), r"logits must be 2-D"),
        (dict(logits=torch.randn(3, 4).long()), r"logits must have dtype"),
        (dict(logits=torch.randn(3, 4), uniforms=torch.full((2,), 0.5, dtype=torch.float64)), r"uniforms must (have shape|be a float64 tensor of shape) \(B,\)"),
        (dict(logits=torch.randn(3, 4), uniforms=torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)), r"uniforms must lie in the open interval"),
        (dict(logits=torch.tensor([[0.0, float("nan")]])), r"logits must be finite or -inf"),
        (dict(logits=torch.full((2, 3), float("-inf"))), r"logits has a row with every logit -inf"),
        (dict(logits=torch.randn(3, 4), temperature=-1.0), r"temperature must be"),
        (dict(logits=torch.randn(3, 4), top_p=2.0), r"top_p must be"),
        (dict(logits=torch.randn(3, 4), top_k_ties="exact"), r"top_k_ties must be"),
        (dict(logits=torch.randn(3, 4), top_k_ties=None), r"top_k_ties must be"),
    ],
)
@pytest.mark.parametrize("entry", ["op", "reference"])
def test_sample_rejects_bad_input(entry, kwargs, pattern):
    sample = sss_ext.sample if entry == "op" else sss_ext.reference.sample
    with pytest.raises(ValueError, match=pattern):
        sample(**kwargs)


def test_warp_probs_rejects_bad_input():
    with pytest.raises(ValueError, match="logits must be a floating-point"):
        sss_ext.warp_probs(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="top_k must be"):
        sss_ext.warp_probs(torch.randn(4), top_k=1.5)
    with pytest.raises(ValueError, match="top_k_ties must be one of"):
        sss_ext.warp_probs(torch.randn(4), top_k=1, top_k_ties="all")


def test_sample_op_checks_top_k_ties_in_cpp():
    """The C++ adapter names a bad top_k_ties of a direct torch.ops call."""
    logits, uniforms = torch.randn(2, 5), torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="top_k_ties must be 'keep' or 'exact-k', got 'none'"):
        torch.ops.sss_ext.sample(logits, uniforms, 1.0, 2, 1.0, "none")


@pytest.mark.parametrize("name", ["temperature", "top_k", "top_p", "shift"])
def test_verify_refuses_a_bool_for_a_number(name):
    """The raw op would take True as 1: the wrapper names the argument instead."""
    from sss_ext.testing import make_verify_inputs

    kwargs = make_verify_inputs(2, 2, 7, torch.float32, True, 1.0)
    kwargs[name] = True
    with pytest.raises(ValueError, match=name):
        sss_ext.verify(**kwargs)
