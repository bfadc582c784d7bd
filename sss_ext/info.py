"""``python -m sss_ext.info``: what this installation of sss_ext was built with."""

from __future__ import annotations

import torch

from .ops import BUILD_INFO


def describe() -> str:
    lines = [
        f"sss_ext built against torch {BUILD_INFO['torch_version']} (running torch {torch.__version__})",
        f"ABI: LibTorch stable ABI, serves torch >= {BUILD_INFO['torch_target_version']}; CPython limited API (abi3), "
        f"Python >= {BUILD_INFO['python_limited_api']}",
        f"CPU kernels: {', '.join(BUILD_INFO['cpu_kernels'])}",
        "CUDA kernels: " + (
            f"{', '.join(BUILD_INFO['cuda_kernels'])} (CUDA {BUILD_INFO['cuda_version']}, architectures "
            f"{BUILD_INFO['cuda_archs']})" if BUILD_INFO["cuda"] else "not built"
        ),
        f"CUDA device visible now: {torch.cuda.is_available()}",
        f"intra-op threads: {torch.get_num_threads()}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
