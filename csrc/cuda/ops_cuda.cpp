// CUDA adapter: validates metadata (csrc/adapter/checks.h), guards the device, allocates
// outputs and workspace with ATen and launches the framework-free kernels
// (csrc/kernels/cuda/launch.h) on the current stream. No value checks and no host sync here:
// invalid rows come back as -1 rows (see launch.h), which the Python wrapper turns into the
// CPU kernels' named error when validate=True. The stream comes from c10/cuda/CUDAStream.h
// (what at::cuda::getCurrentCUDAStream forwards to) so the adapter needs no cuBLAS/cuSPARSE
// headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../adapter/checks.h"
#include "../kernels/cuda/launch.h"

namespace sss_ext {
namespace {

template <class F>
void dispatch_logits(at::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(bfloat16_t{});
    case at::kHalf: return fn(float16_t{});
    default: TORCH_CHECK_VALUE(false, "logits must have dtype float32, bfloat16 or float16, got ", dtype);
  }
}

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
                                                           double top_p, double shift, c10::string_view mode) {
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const adapter::VerifyInputs in = adapter::check_verify_args(target_logits, draft_logits, draft_tokens, ref_logits, uniforms,
                                                              temperature, top_k, top_p, shift, mode);
  check_cuda_sizes(in.vocab);
  auto tokens = at::empty({in.batch, in.num_draft + 1}, draft_tokens.options());
  auto num_accepted = at::empty({in.batch}, draft_tokens.options());
  auto log_z = at::empty({in.batch, in.num_draft + 1}, target_logits.options().dtype(at::kFloat));
  if (in.batch == 0) return {tokens, num_accepted, log_z};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  dispatch_logits(target_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::verify_params<T>(in, temperature, top_k, top_p, shift, tokens, num_accepted, log_z);
    const size_t bytes = cuda::verify_workspace_bytes(params);
    const at::Tensor scratch = workspace(bytes, target_logits);
    C10_CUDA_CHECK(cuda::launch_verify(params, scratch.data_ptr(), bytes, stream));
  });
  return {tokens, num_accepted, log_z};
}

at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p) {
  const c10::cuda::CUDAGuard guard(logits.device());
  adapter::check_sample_args(logits, uniforms, temperature, top_k, top_p);
  check_cuda_sizes(logits.size(1));
  const at::Tensor rows = adapter::vocab_contiguous(logits);
  auto tokens = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.size(0) == 0) return tokens;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::sample_params<T>(rows, uniforms, temperature, top_k, top_p, tokens);
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
