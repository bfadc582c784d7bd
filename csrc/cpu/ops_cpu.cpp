// CPU adapter: validates, dispatches on dtype and runs the framework-free CPU kernels
// with ATen's intra-op thread pool.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../adapter/checks.h"
#include "../kernels/cpu/verify.h"

namespace sss_ext {
namespace {

struct AtenParallelFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
};

// Maps an ATen dtype to the kernel's storage type.
template <class F>
void dispatch_logits(at::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(bfloat16_t{});
    case at::kHalf: return fn(float16_t{});
    default: TORCH_CHECK_VALUE(false, "logits must have dtype float32, bfloat16 or float16, got ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits, const at::Tensor& draft_logits,
                                                          const at::Tensor& draft_tokens,
                                                          const std::optional<at::Tensor>& ref_logits,
                                                          const at::Tensor& uniforms, double temperature, int64_t top_k,
                                                          double top_p, double shift, c10::string_view mode) {
  const adapter::VerifyInputs in = adapter::check_verify_args(target_logits, draft_logits, draft_tokens, ref_logits, uniforms,
                                                              temperature, top_k, top_p, shift, mode);
  auto tokens = at::empty({in.batch, in.num_draft + 1}, draft_tokens.options());
  auto num_accepted = at::empty({in.batch}, draft_tokens.options());
  auto log_z = at::empty({in.batch, in.num_draft + 1}, target_logits.options().dtype(at::kFloat));
  dispatch_logits(target_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::verify_params<T>(in, temperature, top_k, top_p, shift, tokens, num_accepted, log_z);
    adapter::raise_if_error(cpu::verify(params, AtenParallelFor{}), in.vocab);
  });
  return {tokens, num_accepted, log_z};
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p) {
  adapter::check_sample_args(logits, uniforms, temperature, top_k, top_p);
  const at::Tensor rows = adapter::vocab_contiguous(logits);
  auto tokens = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto params = adapter::sample_params<T>(rows, uniforms, temperature, top_k, top_p, tokens);
    adapter::raise_if_error(cpu::sample(params, AtenParallelFor{}), logits.size(1));
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(sss_ext, CPU, m) {
  m.impl("verify", &verify_cpu);
  m.impl("sample", &sample_cpu);
}

}  // namespace sss_ext
