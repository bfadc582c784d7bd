import pytest
import torch

import sss_ext

# Devices with kernels in this build; CUDA tests reuse the CPU parametrisations.
DEVICES = ["cpu"] + (["cuda"] if sss_ext.BUILD_INFO["cuda"] and torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
