"""The built ``sss_ext._C`` is a stable-ABI build: a CPython limited-API (abi3) module compiled
with ``TORCH_TARGET_VERSION`` that takes libtorch's C shim only, no C++ symbol of c10, ATen or
torch (docs/build.md, "ABI"). Each check fails on a build against the full libtorch C++ API (a
pybind11 module named ``_C.cpython-3XY-<platform>.so`` calling into ``c10``/``at``)."""

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sss_ext
from sss_ext import _C

# setup.py's STABLE_ABI_TARGET, and the CPython torch's BuildExtension sets Py_LIMITED_API to.
TARGET_TORCH = "2.10"
LIMITED_PYTHON = "3.10"


# A mangled name in libtorch's C++ namespaces (c10::, at::, torch::), whose ABI changes between releases.
LIBTORCH_CPP_SYMBOL = re.compile(r"^_ZN[KVRO]*(3c10|2at|5torch)")


def imported_symbols(path: Path) -> list[str]:
    """Undefined dynamic symbols of a little-endian ELF64 shared object (what it takes from other libraries)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        pytest.skip(f"{path.name} is not a little-endian ELF64 file")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    section_size, section_count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * section_size) for i in range(section_count)]
    dynsym = next(s for s in sections if s[1] == 11)  # SHT_DYNSYM; sh_link: its string table
    strings_offset = sections[dynsym[6]][4]
    names = []
    for entry in range(dynsym[4], dynsym[4] + dynsym[5], 24):
        name, _info, _other, section_index = struct.unpack_from("<IBBH", data, entry)
        if section_index == 0 and name:  # SHN_UNDEF
            start = strings_offset + name
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


def test_module_is_abi3():
    assert Path(_C.__file__).name.endswith(".abi3.so"), _C.__file__


def test_build_info_reports_the_stable_abi_targets():
    assert sss_ext.ops.BUILD_INFO["torch_target_version"] == TARGET_TORCH
    assert sss_ext.ops.BUILD_INFO["python_limited_api"] == LIMITED_PYTHON
    running = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    assert running >= tuple(int(part) for part in TARGET_TORCH.split("."))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ELF symbol table")
def test_imports_only_the_c_shim_of_libtorch():
    imported = imported_symbols(Path(_C.__file__))
    assert "aoti_torch_get_sizes" in imported, imported  # the stable C shim; also shows the parser found the table
    assert [name for name in imported if LIBTORCH_CPP_SYMBOL.match(name)] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ELF symbol table")
def test_symbol_check_detects_a_libtorch_cpp_user():
    """Negative control: libtorch_python, built against libtorch's C++ API, fails the check above."""
    library = next(Path(torch.__file__).parent.joinpath("lib").glob("libtorch_python.so*"))
    assert any(LIBTORCH_CPP_SYMBOL.match(name) for name in imported_symbols(library))


def test_info_names_the_abi():
    output = subprocess.run([sys.executable, "-m", "sss_ext.info"], capture_output=True, text=True, check=True).stdout
    assert f"LibTorch stable ABI, serves torch >= {TARGET_TORCH}" in output, output
    assert f"CPython limited API (abi3), Python >= {LIMITED_PYTHON}" in output, output
    assert f"running torch {torch.__version__}" in output, output


def _verify_op(target=None, draft=None, tokens=None, uniforms=None, **overrides):
    batch, num_draft, vocab = 2, 2, 4
    target = torch.zeros(batch, num_draft + 1, vocab) if target is None else target
    args = dict(target_logits=target, draft_logits=target if draft is None else draft,
                draft_tokens=torch.zeros(batch, num_draft, dtype=torch.long) if tokens is None else tokens, ref_logits=None,
                uniforms=torch.full((batch, num_draft + 1), 0.5, dtype=torch.float64) if uniforms is None else uniforms,
                temperature=1.0, top_k=0, top_p=1.0, shift=1.0, mode="exact")
    args.update(overrides)
    return torch.ops.sss_ext.verify.default(**args)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: _verify_op(target=torch.zeros(3, 4)), "target_logits must be 3-D (B, K+1, V), got shape [3, 4]"),
        (lambda: _verify_op(target=torch.zeros(2, 3, 4, dtype=torch.float64)),
         "target_logits must have dtype float32, bfloat16 or float16, got Double"),
        (lambda: _verify_op(draft=torch.zeros(2, 3, 4, dtype=torch.bfloat16)),
         "draft_logits must have the dtype of target_logits (Float), got BFloat16"),
        (lambda: _verify_op(tokens=torch.zeros(2, 2, dtype=torch.int32)), "draft_tokens must be a 2-D int64 tensor (B, K), got Int of shape [2, 2]"),
        (lambda: _verify_op(ref_logits=torch.zeros(2, 2, 4)), "ref_logits must have shape (B, K+1, V) = [2, 3, 4], got [2, 2, 4]"),
        (lambda: _verify_op(uniforms=torch.full((2, 3), 0.5, dtype=torch.float16)),
         "uniforms must be a float64 tensor of shape (B, K+1) = (2, 3), got Half of shape [2, 3]"),
        (lambda: _verify_op(top_k_ties="most"), "top_k_ties must be 'keep' or 'exact-k', got 'most'"),
        (lambda: _verify_op(temperature=float("nan")), "temperature must be a finite float >= 0, got nan"),
        (lambda: _verify_op(tokens=torch.tensor([[0, 9], [0, 0]])), "draft_tokens must hold token ids in [0, 4), found 9 at (0, 1)"),
    ],
    ids=["rank", "dtype", "dtype-mismatch", "draft-tokens", "ref-shape", "uniforms", "ties", "temperature", "kernel-error"],
)
def test_errors_keep_their_text(call, message):
    """The stable-ABI adapter formats sizes, dtypes and numbers as the ATen adapter did (ValueError, exact text)."""
    with pytest.raises(ValueError) as raised:
        call()
    assert str(raised.value) == message
