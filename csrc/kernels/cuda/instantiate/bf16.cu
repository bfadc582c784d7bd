// Instantiates the CUDA launchers for bfloat16_t logits (ATen-free: nvcc -c -I csrc works alone).
#include "../launch_impl.cuh"

namespace sss_ext::cuda {
template size_t verify_workspace_bytes<bfloat16_t>(const VerifyParams<bfloat16_t>&);
template cudaError_t launch_verify<bfloat16_t>(const VerifyParams<bfloat16_t>&, void*, size_t, cudaStream_t);
template size_t sample_workspace_bytes<bfloat16_t>(const SampleParams<bfloat16_t>&);
template cudaError_t launch_sample<bfloat16_t>(const SampleParams<bfloat16_t>&, void*, size_t, cudaStream_t);
template size_t verify_tree_workspace_bytes<bfloat16_t>(const TreeParams<bfloat16_t>&);
template cudaError_t launch_verify_tree<bfloat16_t>(const TreeParams<bfloat16_t>&, void*, size_t, cudaStream_t);
}  // namespace sss_ext::cuda
