// Instantiates the CUDA launchers for float logits (ATen-free: nvcc -c -I csrc works alone).
#include "../launch_impl.cuh"

namespace sss_ext::cuda {
template size_t verify_workspace_bytes<float>(const VerifyParams<float>&);
template cudaError_t launch_verify<float>(const VerifyParams<float>&, void*, size_t, cudaStream_t);
template size_t sample_workspace_bytes<float>(const SampleParams<float>&);
template cudaError_t launch_sample<float>(const SampleParams<float>&, void*, size_t, cudaStream_t);
template size_t verify_tree_workspace_bytes<float>(const TreeParams<float>&);
template cudaError_t launch_verify_tree<float>(const TreeParams<float>&, void*, size_t, cudaStream_t);
}  // namespace sss_ext::cuda
