// CUDA adapter: checks the arguments (bridge.h), guards the device, allocates outputs and
// workspace with ATen and launches the framework-free kernels (csrc/kernels/cuda/launch.h)
// on the current stream. No value checks and no host sync here: invalid rows come back as
// -1 rows (see launch.h), which the Python wrapper turns into the CPU kernels' named error
// when validate=True. The stream comes from c10/cuda/CUDAStream.h (what
// at::cuda::getCurrentCUDAStream forwards to) so the adapter needs no cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../kernels/cuda/launch.h"
#include "bridge.h"

namespace sss_ext {
namespace {

void check_cuda_sizes(int64_t vocab) {
  TORCH_CHECK_VALUE(vocab < (int64_t(1) << 31), "the CUDA kernels need a vocabulary of fewer than 2^31 tokens, got ", vocab);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_cuda(const at::Tensor& target_logits, const at::Tensor& draft_logits,
                                                           const at::Tensor& draft_tokens,
                                                           const std::optional<at::Tensor>& ref_logits,
                                                           const at::Tensor& uniforms, double temperature, int64_t top_k,
                                                           double top_p, double shift, c10::string_view mode,
                                                           const std::optional<at::Tensor>& num_draft_tokens,
                                                           c10::string_view top_k_ties) {
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const adapter::VerifyInputs in = adapter::check_verify_args(target_logits, draft_logits, draft_tokens, ref_logits, uniforms,
                                                              temperature, top_k, top_p, shift, mode, num_draft_tokens, top_k_ties);
  check_cuda_sizes(in.vocab);
  const adapter::VerifyOutputs out = adapter::empty_verify_outputs(in);
  if (in.batch == 0) return {out.tokens, out.num_accepted, out.log_z};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  adapter::dispatch_logits(target_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::verify_params<T>(in, out);
    const size_t bytes = cuda::verify_workspace_bytes(params);
    const at::Tensor scratch = workspace(bytes, target_logits);
    C10_CUDA_CHECK(cuda::launch_verify(params, scratch.data_ptr(), bytes, stream));
  });
  return {out.tokens, out.num_accepted, out.log_z};
}

at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                       c10::string_view top_k_ties) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const adapter::SampleInputs in = adapter::check_sample_args(logits, uniforms, temperature, top_k, top_p, top_k_ties);
  check_cuda_sizes(in.vocab);
  const at::Tensor tokens = adapter::empty_sample_tokens(in);
  if (in.batch == 0) return tokens;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  adapter::dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::sample_params<T>(in, tokens);
    const size_t bytes = cuda::sample_workspace_bytes(params);
    const at::Tensor scratch = workspace(bytes, logits);
    C10_CUDA_CHECK(cuda::launch_sample(params, scratch.data_ptr(), bytes, stream));
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(sss_ext, CUDA, m) {
  m.impl("verify", &verify_cuda);
  m.impl("sample", &sample_cuda);
}

}  // namespace sss_ext
