// CUDA adapter: checks the arguments (bridge.h), guards the device, allocates outputs and
// workspace (bridge.h's empty_on) and launches the framework-free kernels
// (csrc/kernels/cuda/launch.h) on the current stream, taken from the stable C shim
// (aoti_torch_get_current_cuda_stream, declared under USE_CUDA, which setup.py defines for
// the CUDA build). No value checks and no host sync here: invalid rows come back as -1 rows
// (see launch.h), which the Python wrapper turns into the CPU kernels' named error when
// validate=True. A failed launch raises RuntimeError.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>

#include "../kernels/cuda/launch.h"
#include "bridge.h"
#include "tree_bridge.h"

namespace sss_ext {
namespace {

using adapter::Tensor;

void check_cuda_sizes(int64_t vocab) {
  SSS_CHECK_VALUE(vocab < (int64_t(1) << 31), "the CUDA kernels need a vocabulary of fewer than 2^31 tokens, got ", vocab);
}

cudaStream_t current_stream(const Tensor& on) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(on.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "sss_ext: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

void check_launch(cudaError_t status, const char* op) {
  STD_TORCH_CHECK(status == cudaSuccess, "sss_ext.", op, ": CUDA launch failed: ", cudaGetErrorName(status), ": ",
                  cudaGetErrorString(status));
}

// (max(bytes, 1),) uint8 on the device of `like`
Tensor workspace(size_t bytes, const Tensor& like) {
  const int64_t size[] = {static_cast<int64_t>(std::max<size_t>(bytes, 1))};
  return adapter::empty_on(like, size, adapter::OutputDtype::kUInt8);
}

// Returns tokens (B, K+1) int64, num_accepted (B,) int64, log_z (B, K+1) float32.
std::tuple<Tensor, Tensor, Tensor> verify_cuda(const Tensor& target_logits, const std::optional<Tensor>& draft_logits, const Tensor& draft_tokens,
                                               const std::optional<Tensor>& ref_logits, const Tensor& uniforms, double temperature,
                                               int64_t top_k, double top_p, double shift, const std::string& mode,
                                               const std::optional<Tensor>& num_draft_tokens, const std::string& top_k_ties,
                                               const std::optional<Tensor>& aligned_logits, const std::string& verification) {
  const torch::stable::accelerator::DeviceGuard guard(target_logits.get_device_index());
  const adapter::VerifyInputs in = adapter::check_verify_args(target_logits, draft_logits, draft_tokens, ref_logits, uniforms,
                                                              temperature, top_k, top_p, shift, mode, num_draft_tokens, top_k_ties,
                                                              aligned_logits, verification);
  check_cuda_sizes(in.vocab);
  const adapter::VerifyOutputs out = adapter::empty_verify_outputs(in);
  if (in.batch == 0) return {out.tokens, out.num_accepted, out.log_z};
  const cudaStream_t stream = current_stream(in.target);
  adapter::dispatch_logits(in.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::verify_params<T>(in, out);
    const size_t bytes = cuda::verify_workspace_bytes(params);
    const Tensor scratch = workspace(bytes, in.target);
    check_launch(cuda::launch_verify(params, scratch.data_ptr(), bytes, stream), "verify");
  });
  return {out.tokens, out.num_accepted, out.log_z};
}

// Returns tokens (B,) int64.
Tensor sample_cuda(const Tensor& logits, const Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                   const std::string& top_k_ties) {
  const torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  const adapter::SampleInputs in = adapter::check_sample_args(logits, uniforms, temperature, top_k, top_p, top_k_ties);
  check_cuda_sizes(in.vocab);
  const Tensor tokens = adapter::empty_sample_tokens(in);
  if (in.batch == 0) return tokens;
  const cudaStream_t stream = current_stream(in.logits);
  adapter::dispatch_logits(in.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::sample_params<T>(in, tokens);
    const size_t bytes = cuda::sample_workspace_bytes(params);
    const Tensor scratch = workspace(bytes, in.logits);
    check_launch(cuda::launch_sample(params, scratch.data_ptr(), bytes, stream), "sample");
  });
  return tokens;
}

// Returns path (B, N) int64, tokens (B, N) int64, num_accepted (B,) int64, log_z (B, N) float32.
std::tuple<Tensor, Tensor, Tensor, Tensor> verify_tree_cuda(const Tensor& target_logits, const Tensor& draft_logits, const Tensor& draft_tokens,
                                                            const Tensor& parents, const std::optional<Tensor>& ref_logits,
                                                            const Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                                                            double shift, const std::string& mode, bool replacement,
                                                            const std::optional<Tensor>& num_nodes, const std::string& top_k_ties) {
  const torch::stable::accelerator::DeviceGuard guard(target_logits.get_device_index());
  const adapter::TreeInputs in = adapter::check_tree_args(target_logits, draft_logits, draft_tokens, parents, ref_logits, uniforms,
                                                          temperature, top_k, top_p, shift, mode, replacement, num_nodes, top_k_ties);
  check_cuda_sizes(in.vocab);
  const adapter::TreeOutputs out = adapter::empty_tree_outputs(in);
  if (in.batch == 0) return {out.path, out.tokens, out.num_accepted, out.log_z};
  const cudaStream_t stream = current_stream(in.target);
  adapter::dispatch_logits(in.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::tree_params<T>(in, out);
    const size_t bytes = cuda::verify_tree_workspace_bytes(params);
    const Tensor scratch = workspace(bytes, in.target);
    check_launch(cuda::launch_verify_tree(params, scratch.data_ptr(), bytes, stream), "verify_tree");
  });
  return {out.path, out.tokens, out.num_accepted, out.log_z};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sss_ext, CUDA, m) {
  m.impl("verify", TORCH_BOX(&verify_cuda));
  m.impl("sample", TORCH_BOX(&sample_cuda));
  m.impl("verify_tree", TORCH_BOX(&verify_tree_cuda));
}

}  // namespace sss_ext
