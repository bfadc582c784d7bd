"""Build of sss_ext.

CPU kernels are always built. CUDA kernels are built when the installed torch is a CUDA
build (``torch.version.cuda``) and a toolkit is found (``CUDA_HOME``), never based on the
visible GPU. Override with ``SSS_EXT_CUDA=0`` (never) or ``SSS_EXT_CUDA=1`` (required: fail
if impossible). The decision is printed and recorded in ``sss_ext._C.build_info()``.

``_C`` targets the LibTorch stable ABI (``torch/csrc/stable``, ``TORCH_TARGET_VERSION``
from ``STABLE_ABI_TARGET``) and the CPython limited API (abi3, ``Py_LIMITED_API`` as torch's
``BuildExtension`` sets it): one build serves every torch from the target on and every
CPython from the limited API's version on (docs/build.md, "ABI").

The C++ standard is the installed torch's own (``BuildExtension`` picks it: C++17 up to
torch 2.13, C++20 from 2.14). CUDA architectures come from ``TORCH_CUDA_ARCH_LIST``; when it
is unset, the visible GPUs decide (torch's rule) and with none visible the build targets
``DEFAULT_CUDA_ARCHS`` (Ampere, Ada, Hopper, plus PTX for later GPUs).
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_decision():
    override = os.environ.get("SSS_EXT_CUDA", "auto").strip().lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    why = f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
    if override in ("0", "false", "off", "no"):
        return False, f"disabled by SSS_EXT_CUDA={override} ({why})"
    if override in ("1", "true", "on", "yes"):
        if not possible:
            raise RuntimeError(f"SSS_EXT_CUDA={override} asks for CUDA kernels, but {why}: need a CUDA build of torch and a toolkit")
        return True, f"forced by SSS_EXT_CUDA={override} ({why})"
    if override != "auto":
        raise RuntimeError(f"SSS_EXT_CUDA must be 0, 1 or auto, got {override!r}")
    return possible, f"auto: {why}"


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def kernel_files(suffixes):
    """Files of csrc/kernels/sources.txt (the one list, also read by CMakeLists.txt) ending in ``suffixes``."""
    with open(os.path.join(ROOT, "csrc", "kernels", "sources.txt")) as listing:
        entries = [line.strip() for line in listing if line.strip() and not line.lstrip().startswith("#")]
    return [os.path.join("csrc", "kernels", entry) for entry in entries if entry.endswith(suffixes)]


DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"

# The oldest torch the stable-ABI build serves: TORCH_TARGET_VERSION as the headers encode it
# (major << 56 | minor << 48). Everything the adapter uses exists from 2.10 on.
STABLE_ABI_TARGET = (2, 10)
TORCH_TARGET_VERSION = hex(STABLE_ABI_TARGET[0] << 56 | STABLE_ABI_TARGET[1] << 48)
# The oldest CPython of the abi3 build: torch's BuildExtension defines Py_LIMITED_API as
# min_supported_cpython (0x030A0000: 3.10) for a py_limited_api extension; the wheel tag follows.
PY_LIMITED_API_TAG = f"cp3{int(cpp_extension.min_supported_cpython[4:6], 16)}"


def cuda_archs():
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPUs', else DEFAULT_CUDA_ARCHS; sets the variable."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "the visible GPUs' architectures (TORCH_CUDA_ARCH_LIST unset)"
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return f"no GPU visible: default TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}"


def sanitize_flags():
    """SSS_EXT_SANITIZE=1: AddressSanitizer + UBSan for the host code (see docs/build.md, "Build")."""
    if os.environ.get("SSS_EXT_SANITIZE", "0").strip().lower() in ("", "0", "false", "off", "no"):
        return [], []
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    return flags, ["-fsanitize=address,undefined"]


with_cuda, reason = cuda_decision()
print(f"sss_ext: building CPU kernels{' and CUDA kernels' if with_cuda else ' only'} ({reason}; torch {torch.__version__})")
if with_cuda:
    print(f"sss_ext: CUDA architectures: {cuda_archs()}")
    CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs")
print(f"sss_ext: ABI: LibTorch stable ABI, TORCH_TARGET_VERSION={TORCH_TARGET_VERSION} (torch >= "
      f"{STABLE_ABI_TARGET[0]}.{STABLE_ABI_TARGET[1]}), CPython limited API (abi3, {PY_LIMITED_API_TAG}+)")
sanitize_compile, sanitize_link = sanitize_flags()
if sanitize_compile:
    print(f"sss_ext: sanitizers on: {' '.join(sanitize_compile)}")

# -fvisibility=hidden: the stable headers hide their namespaces; _C exports PyInit__C only.
cxx_flags = sanitize_compile + ["-O3", "-fvisibility=hidden", "-fopenmp", "-fopenmp-simd", "-ffp-contract=off", "-fno-trapping-math"]
macros = [("SSS_EXT_TORCH_VERSION", f'"{torch.__version__}"'), ("TORCH_TARGET_VERSION", TORCH_TARGET_VERSION)]
ext_sources = sources("csrc/ops.cpp") + sources("csrc/adapter/ops_cpu.cpp")
if with_cuda:
    ext_sources += sources("csrc/adapter/ops_cuda.cpp") + kernel_files(".cu")
    # USE_CUDA: the stable C shim declares aoti_torch_get_current_cuda_stream under it.
    macros += [("USE_CUDA", None), ("SSS_EXT_WITH_CUDA", None), ("SSS_EXT_CUDA_VERSION", f'"{torch.version.cuda}"'),
               ("SSS_EXT_CUDA_ARCHS", f'"{CUDA_ARCHS}"')]
    extension = CUDAExtension(
        "sss_ext._C",
        ext_sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false", "-lineinfo"]},
        extra_link_args=["-fopenmp"] + sanitize_link,
        py_limited_api=True,
    )
else:
    extension = CppExtension("sss_ext._C", ext_sources, define_macros=macros, extra_compile_args=cxx_flags,
                             extra_link_args=["-fopenmp"] + sanitize_link, py_limited_api=True)

# Metadata, dependencies and package data: pyproject.toml.
setup(
    packages=find_packages(include=["sss_ext", "sss_ext.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API_TAG}},
)
