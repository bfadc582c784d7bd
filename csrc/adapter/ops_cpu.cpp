// CPU adapter: checks the arguments (bridge.h) and runs the framework-free CPU kernels
// (csrc/kernels/cpu/verify.h) on torch's intra-op thread pool (torch::stable::parallel_for).
#include "../kernels/cpu/verify.h"
#include "bridge.h"
#include "tree_bridge.h"

namespace sss_ext {
namespace {

using adapter::Tensor;

struct StableParallelFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    torch::stable::parallel_for(begin, end, grain, fn);
  }
};

// Returns tokens (B, K+1) int64, num_accepted (B,) int64, log_z (B, K+1) float32.
std::tuple<Tensor, Tensor, Tensor> verify_cpu(const Tensor& target_logits, const std::optional<Tensor>& draft_logits, const Tensor& draft_tokens,
                                              const std::optional<Tensor>& ref_logits, const Tensor& uniforms, double temperature,
                                              int64_t top_k, double top_p, double shift, const std::string& mode,
                                              const std::optional<Tensor>& num_draft_tokens, const std::string& top_k_ties,
                                              const std::optional<Tensor>& aligned_logits, const std::string& verification) {
  const adapter::VerifyInputs in = adapter::check_verify_args(target_logits, draft_logits, draft_tokens, ref_logits, uniforms,
                                                              temperature, top_k, top_p, shift, mode, num_draft_tokens, top_k_ties,
                                                              aligned_logits, verification);
  const adapter::VerifyOutputs out = adapter::empty_verify_outputs(in);
  adapter::dispatch_logits(in.dtype, [&](auto tag) {
    using T = decltype(tag);
    adapter::raise_if_error(cpu::verify(adapter::verify_params<T>(in, out), StableParallelFor{}), in.vocab, in.num_draft,
                            in.one_hot_proposal);
  });
  return {out.tokens, out.num_accepted, out.log_z};
}

// Returns tokens (B,) int64.
Tensor sample_cpu(const Tensor& logits, const Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                  const std::string& top_k_ties) {
  const adapter::SampleInputs in = adapter::check_sample_args(logits, uniforms, temperature, top_k, top_p, top_k_ties);
  const Tensor tokens = adapter::empty_sample_tokens(in);
  adapter::dispatch_logits(in.dtype, [&](auto tag) {
    using T = decltype(tag);
    adapter::raise_if_error(cpu::sample(adapter::sample_params<T>(in, tokens), StableParallelFor{}), in.vocab);
  });
  return tokens;
}

// Returns path (B, N) int64, tokens (B, N) int64, num_accepted (B,) int64, log_z (B, N) float32.
std::tuple<Tensor, Tensor, Tensor, Tensor> verify_tree_cpu(const Tensor& target_logits, const Tensor& draft_logits, const Tensor& draft_tokens,
                                                           const Tensor& parents, const std::optional<Tensor>& ref_logits,
                                                           const Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                                                           double shift, const std::string& mode, bool replacement,
                                                           const std::optional<Tensor>& num_nodes, const std::string& top_k_ties) {
  const adapter::TreeInputs in = adapter::check_tree_args(target_logits, draft_logits, draft_tokens, parents, ref_logits, uniforms,
                                                          temperature, top_k, top_p, shift, mode, replacement, num_nodes, top_k_ties);
  const adapter::TreeOutputs out = adapter::empty_tree_outputs(in);
  adapter::dispatch_logits(in.dtype, [&](auto tag) {
    using T = decltype(tag);
    adapter::raise_if_tree_error(cpu::verify_tree(adapter::tree_params<T>(in, out), StableParallelFor{}), in.max_nodes, in.vocab);
  });
  return {out.path, out.tokens, out.num_accepted, out.log_z};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sss_ext, CPU, m) {
  m.impl("verify", TORCH_BOX(&verify_cpu));
  m.impl("sample", TORCH_BOX(&sample_cpu));
  m.impl("verify_tree", TORCH_BOX(&verify_tree_cpu));
}

}  // namespace sss_ext
