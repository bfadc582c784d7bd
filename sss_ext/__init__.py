"""sss_ext: Reward-Shifted Speculative Sampling for test-time weak-to-strong alignment.

``verify``, ``sample`` and ``verify_tree`` (tree verification, CPU) run the registered
``torch.ops.sss_ext`` kernels;
``reference`` holds the pure-PyTorch oracle; ``warp_probs`` is the one warping function
shared by all of them; ``logits_from_probs`` turns probabilities into the logits they take.
``sss_ext.compat.flashinfer`` holds FlashInfer's sampling signature on top of them.
"""

from . import reference
from .ops import BUILD_INFO, sample, verify
from .probabilities import logits_from_probs
from .outputs import TreeVerifyOutput, VerifyOutput
from .tree import verify_tree
from .uniforms import draw_uniforms
from .warp import warp_probs
from .decoding import generate, SamplingConfig, GenerateOutput
from . import hf  # noqa: F401  (sss_ext.hf.decode for transformers' custom_generate)

__all__ = ["verify", "verify_tree", "sample", "logits_from_probs", "warp_probs", "draw_uniforms", "reference", "VerifyOutput", "TreeVerifyOutput", "BUILD_INFO", "generate", "SamplingConfig", "GenerateOutput"]
__version__ = "0.1.0"
