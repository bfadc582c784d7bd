// Instantiates the CUDA launchers for float16_t logits (ATen-free: nvcc -c -I csrc works alone).
#include "../launch_impl.cuh"

namespace sss_ext::cuda {
template size_t verify_workspace_bytes<float16_t>(const VerifyParams<float16_t>&);
template cudaError_t launch_verify<float16_t>(const VerifyParams<float16_t>&, void*, size_t, cudaStream_t);
template size_t sample_workspace_bytes<float16_t>(const SampleParams<float16_t>&);
template cudaError_t launch_sample<float16_t>(const SampleParams<float16_t>&, void*, size_t, cudaStream_t);
template size_t verify_tree_workspace_bytes<float16_t>(const TreeParams<float16_t>&);
template cudaError_t launch_verify_tree<float16_t>(const TreeParams<float16_t>&, void*, size_t, cudaStream_t);
}  // namespace sss_ext::cuda
