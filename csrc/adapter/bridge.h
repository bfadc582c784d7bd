// The one bridge between ATen and the framework-free kernels, shared by the CPU and CUDA
// adapters: named argument checks, the kernels' parameter structs built in one call from
// the checked inputs and the outputs, the dtype dispatch, and kernel errors turned into
// ValueErrors that name the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "../kernels/common.h"
#include "../kernels/status.h"

namespace sss_ext::adapter {

inline void check_logits(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                    name, " must have dtype float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "all tensors must be on one device, got ", a_name, " on ", a.device(),
                    " and ", b_name, " on ", b.device());
}

inline void check_sampling(double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0, "temperature must be a finite float >= 0, got ", temperature);
  TORCH_CHECK_VALUE(temperature == 0 || std::isfinite(1.0 / temperature),
                    "temperature must be 0 (greedy) or have a finite inverse (>= 5.6e-309), got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be an int >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p must be a float in (0, 1] (1 disables it), got ", top_p);
}

inline TopKTies parse_top_k_ties(c10::string_view top_k_ties) {
  TORCH_CHECK_VALUE(top_k_ties == "keep" || top_k_ties == "exact-k", "top_k_ties must be 'keep' or 'exact-k', got '",
                    std::string(top_k_ties), "'");
  return top_k_ties == "keep" ? TopKTies::kKeep : TopKTies::kExactK;
}

// Unit stride along the vocabulary; other strides are kept (no copy for sliced inputs).
inline at::Tensor vocab_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename T>
LogitsView<T> logits_view(const at::Tensor& t) {
  LogitsView<T> view;
  view.data = reinterpret_cast<const T*>(t.data_ptr());
  view.stride_batch = t.stride(0);
  view.stride_position = t.dim() == 3 ? t.stride(1) : 0;
  return view;
}

// Maps an ATen dtype to the kernels' storage type: fn(float{}), fn(bfloat16_t{}) or fn(float16_t{}).
template <class F>
void dispatch_logits(at::ScalarType dtype, const F& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(bfloat16_t{});
    case at::kHalf: return fn(float16_t{});
    default: TORCH_CHECK_VALUE(false, "logits must have dtype float32, bfloat16 or float16, got ", dtype);
  }
}

// A checked verify call: tensors with unit vocabulary stride, sizes and scalars.
struct VerifyInputs {
  at::Tensor target, draft, ref, draft_tokens, uniforms;  // ref undefined: standard SD
  at::Tensor num_draft_tokens;                             // (batch,) int64; undefined: K for every row
  int64_t batch, num_draft, vocab;
  Sampling sampling;
  double shift;
  bool paper_mode;
};

struct VerifyOutputs {
  at::Tensor tokens;        // (batch, num_draft + 1) int64
  at::Tensor num_accepted;  // (batch,) int64
  at::Tensor log_z;         // (batch, num_draft + 1) float32
};

inline VerifyOutputs empty_verify_outputs(const VerifyInputs& in) {
  const auto ids = in.draft_tokens.options();
  return VerifyOutputs{at::empty({in.batch, in.num_draft + 1}, ids), at::empty({in.batch}, ids),
                       at::empty({in.batch, in.num_draft + 1}, in.target.options().dtype(at::kFloat))};
}

inline VerifyInputs check_verify_args(const at::Tensor& target_logits, const at::Tensor& draft_logits,
                                      const at::Tensor& draft_tokens, const std::optional<at::Tensor>& ref_logits,
                                      const at::Tensor& uniforms, double temperature, int64_t top_k, double top_p,
                                      double shift, c10::string_view mode,
                                      const std::optional<at::Tensor>& num_draft_tokens, c10::string_view top_k_ties) {
  check_logits(target_logits, "target_logits", 3, "(B, K+1, V)");
  check_logits(draft_logits, "draft_logits", 3, "(B, K+1, V)");
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2 && draft_tokens.scalar_type() == at::kLong,
                    "draft_tokens must be a 2-D int64 tensor (B, K), got ", draft_tokens.scalar_type(), " of shape ",
                    draft_tokens.sizes());
  const int64_t batch = draft_tokens.size(0), num_draft = draft_tokens.size(1), vocab = target_logits.size(2);
  TORCH_CHECK_VALUE(vocab >= 1, "target_logits must have a vocabulary dimension of size >= 1");
  TORCH_CHECK_VALUE(target_logits.size(0) == batch && target_logits.size(1) == num_draft + 1,
                    "target_logits must have shape (B, K+1, V) = (", batch, ", ", num_draft + 1, ", ", vocab, "), got ",
                    target_logits.sizes());
  const bool has_ref = ref_logits.has_value() && ref_logits->defined();
  const bool draft_ok = draft_logits.size(0) == batch && draft_logits.size(2) == vocab &&
                        (draft_logits.size(1) == num_draft + 1 || (!has_ref && draft_logits.size(1) == num_draft));
  TORCH_CHECK_VALUE(draft_ok, "draft_logits must have shape (B, K+1, V) = (", batch, ", ", num_draft + 1, ", ", vocab,
                    has_ref ? ")" : ") or (B, K, V)", ", got ", draft_logits.sizes());
  TORCH_CHECK_VALUE(draft_logits.scalar_type() == target_logits.scalar_type(), "draft_logits must have the dtype of target_logits (",
                    target_logits.scalar_type(), "), got ", draft_logits.scalar_type());
  check_same_device(target_logits, "target_logits", draft_logits, "draft_logits");
  check_same_device(target_logits, "target_logits", draft_tokens, "draft_tokens");
  check_same_device(target_logits, "target_logits", uniforms, "uniforms");
  if (has_ref) {
    const at::Tensor& ref = *ref_logits;
    check_logits(ref, "ref_logits", 3, "(B, K+1, V)");
    TORCH_CHECK_VALUE(ref.sizes() == target_logits.sizes(), "ref_logits must have shape (B, K+1, V) = ", target_logits.sizes(),
                      ", got ", ref.sizes());
    TORCH_CHECK_VALUE(ref.scalar_type() == target_logits.scalar_type(), "ref_logits must have the dtype of target_logits (",
                      target_logits.scalar_type(), "), got ", ref.scalar_type());
    check_same_device(target_logits, "target_logits", ref, "ref_logits");
  }
  TORCH_CHECK_VALUE(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 2 && uniforms.size(0) == batch &&
                        uniforms.size(1) == num_draft + 1,
                    "uniforms must be a float64 tensor of shape (B, K+1) = (", batch, ", ", num_draft + 1, "), got ",
                    uniforms.scalar_type(), " of shape ", uniforms.sizes());
  check_sampling(temperature, top_k, top_p);
  TORCH_CHECK_VALUE(std::isfinite(shift) && shift >= 0, "shift (lambda) must be a finite float >= 0, got ", shift);
  TORCH_CHECK_VALUE(mode == "exact" || mode == "paper", "mode must be 'exact' or 'paper', got '", std::string(mode), "'");
  TORCH_CHECK_VALUE(mode == "exact" || has_ref, "mode='paper' needs ref_logits: the paper's rule divides by the reference draft d");
  const TopKTies ties = parse_top_k_ties(top_k_ties);
  const bool ragged = num_draft_tokens.has_value() && num_draft_tokens->defined();
  if (ragged) {  // values in [0, K] are checked by the kernels (kBadNumDraft)
    TORCH_CHECK_VALUE(num_draft_tokens->scalar_type() == at::kLong && num_draft_tokens->dim() == 1 &&
                          num_draft_tokens->size(0) == batch,
                      "num_draft_tokens must be an int64 tensor of shape (B,) = (", batch, "), got ",
                      num_draft_tokens->scalar_type(), " of shape ", num_draft_tokens->sizes());
    check_same_device(target_logits, "target_logits", *num_draft_tokens, "num_draft_tokens");
  }
  return VerifyInputs{vocab_contiguous(target_logits),
                      vocab_contiguous(draft_logits),
                      has_ref ? vocab_contiguous(*ref_logits) : at::Tensor(),
                      draft_tokens,
                      uniforms,
                      ragged ? *num_draft_tokens : at::Tensor(),
                      batch,
                      num_draft,
                      vocab,
                      Sampling{temperature, top_k, top_p, ties},
                      shift,
                      mode == "paper"};
}

template <typename T>
VerifyParams<T> verify_params(const VerifyInputs& in, const VerifyOutputs& out) {
  VerifyParams<T> p;
  p.target = logits_view<T>(in.target);
  p.draft = logits_view<T>(in.draft);
  if (in.ref.defined()) p.ref = logits_view<T>(in.ref);
  p.draft_tokens = in.draft_tokens.data_ptr<int64_t>();
  p.draft_tokens_stride_batch = in.draft_tokens.stride(0);
  p.draft_tokens_stride_position = in.draft_tokens.stride(1);
  p.uniforms = in.uniforms.data_ptr<double>();
  p.uniforms_stride_batch = in.uniforms.stride(0);
  p.uniforms_stride_position = in.uniforms.stride(1);
  if (in.num_draft_tokens.defined()) {
    p.num_draft_tokens = in.num_draft_tokens.data_ptr<int64_t>();
    p.num_draft_tokens_stride = in.num_draft_tokens.stride(0);
  }
  p.batch = in.batch;
  p.num_draft = in.num_draft;
  p.vocab = in.vocab;
  p.sampling = in.sampling;
  p.shift = in.shift;
  p.paper_mode = in.paper_mode;
  p.tokens = out.tokens.data_ptr<int64_t>();
  p.num_accepted = out.num_accepted.data_ptr<int64_t>();
  p.log_z = out.log_z.data_ptr<float>();
  return p;
}

// A checked sample call: logits with unit vocabulary stride, sizes and scalars.
struct SampleInputs {
  at::Tensor logits, uniforms;
  int64_t batch, vocab;
  Sampling sampling;
};

inline SampleInputs check_sample_args(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                                      double top_p, c10::string_view top_k_ties) {
  check_logits(logits, "logits", 2, "(B, V)");
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits must have a vocabulary dimension of size >= 1");
  TORCH_CHECK_VALUE(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 1 && uniforms.size(0) == logits.size(0),
                    "uniforms must be a float64 tensor of shape (B,) = (", logits.size(0), "), got ", uniforms.scalar_type(),
                    " of shape ", uniforms.sizes());
  check_same_device(logits, "logits", uniforms, "uniforms");
  check_sampling(temperature, top_k, top_p);
  const TopKTies ties = parse_top_k_ties(top_k_ties);
  return SampleInputs{vocab_contiguous(logits), uniforms, logits.size(0), logits.size(1), Sampling{temperature, top_k, top_p, ties}};
}

// (batch,) int64
inline at::Tensor empty_sample_tokens(const SampleInputs& in) { return at::empty({in.batch}, in.logits.options().dtype(at::kLong)); }

template <typename T>
SampleParams<T> sample_params(const SampleInputs& in, const at::Tensor& tokens) {
  SampleParams<T> p;
  p.logits = logits_view<T>(in.logits);
  p.uniforms = in.uniforms.data_ptr<double>();
  p.uniforms_stride = in.uniforms.stride(0);
  p.batch = in.batch;
  p.vocab = in.vocab;
  p.sampling = in.sampling;
  p.tokens = tokens.data_ptr<int64_t>();
  return p;
}

// Raises a ValueError for a kernel-reported error; returns normally when ok. num_draft: K of
// a verify call.
inline void raise_if_error(const Error& e, int64_t vocab, int64_t num_draft = 0) {
  switch (e.status) {
    case Status::kOk: return;
    case Status::kBadNumDraft:
      TORCH_CHECK_VALUE(false, "num_draft_tokens must hold values in [0, K] = [0, ", num_draft, "], found ", e.value_index,
                        " at row ", e.batch_index);
    case Status::kBadDraftToken:
      TORCH_CHECK_VALUE(false, "draft_tokens must hold token ids in [0, ", vocab, "), found ", e.value_index, " at (", e.batch_index,
                        ", ", e.position, ")");
    case Status::kBadUniform:
      TORCH_CHECK_VALUE(false, "uniforms must lie in the open interval (0, 1); found 0, 1, NaN or out-of-range at row ", e.batch_index,
                        e.position >= 0 ? ", position " + std::to_string(e.position) : std::string());
    case Status::kNonFiniteLogit:
      TORCH_CHECK_VALUE(false, tensor_name(e.which), " must be finite or -inf; found NaN or +inf at row ", e.batch_index,
                        e.position >= 0 ? ", position " + std::to_string(e.position) : std::string(), ", token ", e.value_index);
    case Status::kEmptyRow:
      TORCH_CHECK_VALUE(false, tensor_name(e.which), " has a row with every logit -inf (no token can be drawn) at row ",
                        e.batch_index, e.position >= 0 ? ", position " + std::to_string(e.position) : std::string());
    case Status::kScoreRange:
      if (e.which == Which::kNone)
        TORCH_CHECK_VALUE(false, "the tilted score zq/temperature + shift * (zr/temperature - zd/temperature) has a row maximum "
                          "outside [-1e300, 1e300] at row ", e.batch_index, ", position ", e.position,
                          ": use a smaller shift or a larger temperature");
      TORCH_CHECK_VALUE(false, tensor_name(e.which), " / temperature leaves the supported range [-1e300, 1e300] at row ",
                        e.batch_index, e.position >= 0 ? ", position " + std::to_string(e.position) : std::string(),
                        ": use a larger temperature (or 0 for greedy) or smaller logits");
    case Status::kNoSupport:
      TORCH_CHECK_VALUE(false, "the tilted target p* has no token with positive probability at row ", e.batch_index, ", position ",
                        e.position, ": target_logits, draft_logits and ref_logits mask disjoint vocabularies");
  }
}

}  // namespace sss_ext::adapter
