// CPU adapter: checks the arguments (bridge.h) and runs the framework-free CPU kernels
// (csrc/kernels/cpu/verify.h) on ATen's intra-op thread pool.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/cpu/verify.h"
#include "bridge.h"

namespace sss_ext {
namespace {

struct AtenParallelFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_cpu(const at::Tensor& target_logits, const at::Tensor& draft_logits,
                                                          const at::Tensor& draft_tokens,
                                                          const std::optional<at::Tensor>& ref_logits,
                                                          const at::Tensor& uniforms, double temperature, int64_t top_k,
                                                          double top_p, double shift, c10::string_view mode,
                                                          const std::optional<at::Tensor>& num_draft_tokens,
                                                          c10::string_view top_k_ties) {
  const adapter::VerifyInputs in = adapter::check_verify_args(target_logits, draft_logits, draft_tokens, ref_logits, uniforms,
                                                              temperature, top_k, top_p, shift, mode, num_draft_tokens, top_k_ties);
  const adapter::VerifyOutputs out = adapter::empty_verify_outputs(in);
  adapter::dispatch_logits(target_logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    adapter::raise_if_error(cpu::verify(adapter::verify_params<T>(in, out), AtenParallelFor{}), in.vocab, in.num_draft);
  });
  return {out.tokens, out.num_accepted, out.log_z};
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                      c10::string_view top_k_ties) {
  const adapter::SampleInputs in = adapter::check_sample_args(logits, uniforms, temperature, top_k, top_p, top_k_ties);
  const at::Tensor tokens = adapter::empty_sample_tokens(in);
  adapter::dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    adapter::raise_if_error(cpu::sample(adapter::sample_params<T>(in, tokens), AtenParallelFor{}), in.vocab);
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(sss_ext, CPU, m) {
  m.impl("verify", &verify_cpu);
  m.impl("sample", &sample_cpu);
}

}  // namespace sss_ext
