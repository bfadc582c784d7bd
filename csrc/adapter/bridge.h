// The one bridge between the LibTorch stable ABI (torch/csrc/stable) and the framework-free
// kernels, shared by the CPU and CUDA adapters: named argument checks, the kernels' parameter
// structs built in one call from the checked inputs and the outputs, the dtype dispatch, and
// kernel errors turned into ValueErrors that name the argument. Only stable-ABI headers:
// one build serves every torch from TORCH_TARGET_VERSION on (docs/build.md, "ABI").
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include "../kernels/common.h"
#include "../kernels/status.h"

namespace sss_ext::adapter {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Message parts print as ATen printed them: sizes "[2, 3, 4]", dtypes "Float", devices "cuda:0".
inline void append(std::ostream& out, torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  out << '[';
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ']';
}

inline void append(std::ostream& out, const torch::stable::Device& device) {
  using torch::headeronly::DeviceType;
  switch (device.type()) {
    case DeviceType::CPU: out << "cpu"; break;
    case DeviceType::CUDA: out << "cuda"; break;
    case DeviceType::Meta: out << "meta"; break;
    case DeviceType::MPS: out << "mps"; break;
    case DeviceType::XPU: out << "xpu"; break;
    case DeviceType::HIP: out << "hip"; break;
    default: out << "device type " << static_cast<int>(device.type());
  }
  if (device.has_index()) out << ':' << static_cast<int>(device.index());
}

inline void append(std::ostream& out, ScalarType dtype) { out << torch::headeronly::toString(dtype); }

// Message parts printed as Python prints them, where a message must equal the Python
// wrappers' (sss_ext/checks.py): a shape tuple "(3,)" / "(3, 1)", a dtype "int32".
struct PyShape {
  torch::headeronly::IntHeaderOnlyArrayRef sizes;
};

inline void append(std::ostream& out, const PyShape& shape) {
  out << '(';
  for (size_t i = 0; i < shape.sizes.size(); ++i) out << (i ? ", " : "") << shape.sizes[i];
  out << (shape.sizes.size() == 1 ? ",)" : ")");
}

struct PyDtype {
  ScalarType dtype;
};

inline void append(std::ostream& out, const PyDtype& dtype) {
  switch (dtype.dtype) {
    case ScalarType::Bool: out << "bool"; return;
    case ScalarType::Byte: out << "uint8"; return;
    case ScalarType::Char: out << "int8"; return;
    case ScalarType::Short: out << "int16"; return;
    case ScalarType::Int: out << "int32"; return;
    case ScalarType::Long: out << "int64"; return;
    case ScalarType::Half: out << "float16"; return;
    case ScalarType::BFloat16: out << "bfloat16"; return;
    case ScalarType::Float: out << "float32"; return;
    case ScalarType::Double: out << "float64"; return;
    default: out << torch::headeronly::toString(dtype.dtype);
  }
}

template <class T>
void append(std::ostream& out, const T& part) {
  out << part;
}

// Throws std::invalid_argument, which reaches Python as ValueError.
template <class... Parts>
[[noreturn]] void throw_value_error(const Parts&... parts) {
  std::ostringstream message;
  (append(message, parts), ...);
  throw std::invalid_argument(message.str());
}

}  // namespace sss_ext::adapter

// A named ValueError when cond is false; the message parts are evaluated only then.
#define SSS_CHECK_VALUE(cond, ...) \
  do {                             \
    if (!(cond)) ::sss_ext::adapter::throw_value_error(__VA_ARGS__); \
  } while (false)

namespace sss_ext::adapter {

inline bool is_logits_dtype(ScalarType dtype) {
  return dtype == ScalarType::Float || dtype == ScalarType::BFloat16 || dtype == ScalarType::Half;
}

inline void check_logits(const Tensor& t, const char* name, int64_t dim, const char* shape) {
  SSS_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
  SSS_CHECK_VALUE(is_logits_dtype(t.scalar_type()), name, " must have dtype float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  SSS_CHECK_VALUE(a.device() == b.device(), "all tensors must be on one device, got ", a_name, " on ", a.device(), " and ", b_name,
                  " on ", b.device());
}

inline void check_sampling(double temperature, int64_t top_k, double top_p) {
  SSS_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0, "temperature must be a finite float >= 0, got ", temperature);
  SSS_CHECK_VALUE(temperature == 0 || std::isfinite(1.0 / temperature),
                  "temperature must be 0 (greedy) or have a finite inverse (>= 5.6e-309), got ", temperature);
  SSS_CHECK_VALUE(top_k >= 0, "top_k must be an int >= 0 (0 disables it), got ", top_k);
  SSS_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p must be a float in (0, 1] (1 disables it), got ", top_p);
}

inline TopKTies parse_top_k_ties(std::string_view top_k_ties) {
  SSS_CHECK_VALUE(top_k_ties == "keep" || top_k_ties == "exact-k", "top_k_ties must be 'keep' or 'exact-k', got '", top_k_ties, "'");
  return top_k_ties == "keep" ? TopKTies::kKeep : TopKTies::kExactK;
}

// Unit stride along the vocabulary (the last dimension); other strides are kept (no copy for
// sliced inputs).
inline Tensor vocab_contiguous(const Tensor& t) {
  return t.stride(t.dim() - 1) == 1 ? t : torch::stable::contiguous(t);
}

// The data of a tensor whose dtype is checked to be T.
template <typename T>
const T* input_data(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

template <typename T>
T* output_data(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// A new uninitialised contiguous tensor of 1 or 2 dimensions on the device of `like`. Through
// the stable C shim's aoti_torch_empty_strided (at::empty_strided) rather than
// torch::stable::empty, which looks aten::empty up in the dispatcher and calls it boxed on
// every call (about 5000 more instructions per output, docs/build.md, "ABI").
// The adapter's output dtypes: int64 ids and counts, float32 log_z, uint8 workspace.
enum class OutputDtype { kInt64, kFloat32, kUInt8 };

inline int32_t shim_dtype(OutputDtype dtype) {
  switch (dtype) {
    case OutputDtype::kInt64: return aoti_torch_dtype_int64();
    case OutputDtype::kFloat32: return aoti_torch_dtype_float32();
    case OutputDtype::kUInt8: return aoti_torch_dtype_uint8();
  }
  return aoti_torch_dtype_uint8();
}

inline Tensor empty_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes, OutputDtype dtype) {
  STD_TORCH_CHECK(sizes.size() == 1 || sizes.size() == 2, "empty_on: 1 or 2 dimensions, got ", sizes.size());
  const int64_t strides[] = {sizes.size() == 2 ? sizes[1] : 1, 1};
  int32_t device_type = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides + 2 - sizes.size(),
      shim_dtype(dtype), device_type, like.get_device_index(), &handle));
  return Tensor(handle);
}

template <typename T>
LogitsView<T> logits_view(const Tensor& t) {
  LogitsView<T> view;
  view.data = input_data<T>(t);
  view.stride_batch = t.stride(0);
  view.stride_position = t.dim() == 3 ? t.stride(1) : 0;
  return view;
}

// Maps a logits dtype to the kernels' storage type: fn(float{}), fn(bfloat16_t{}) or fn(float16_t{}).
template <class F>
void dispatch_logits(ScalarType dtype, const F& fn) {
  switch (dtype) {
    case ScalarType::Float: return fn(float{});
    case ScalarType::BFloat16: return fn(bfloat16_t{});
    case ScalarType::Half: return fn(float16_t{});
    default: throw_value_error("logits must have dtype float32, bfloat16 or float16, got ", dtype);
  }
}

inline bool is_given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// A checked verify call: tensors with unit vocabulary stride, sizes and scalars.
struct VerifyInputs {
  Tensor target, draft_tokens, uniforms;
  std::optional<Tensor> draft;             // r (draft_logits, or aligned_logits for one-hot drafts); nullopt: not read
  std::optional<Tensor> ref;               // nullopt: standard SD
  std::optional<Tensor> num_draft_tokens;  // (batch,) int64; nullopt: K for every row
  int64_t batch, num_draft, vocab;
  ScalarType dtype;
  Sampling sampling;
  double shift;
  bool paper_mode;
  bool one_hot_proposal;
  bool block_verification;  // sampled calls only: greedy block verification is the token rule
};

struct VerifyOutputs {
  Tensor tokens;        // (batch, num_draft + 1) int64
  Tensor num_accepted;  // (batch,) int64
  Tensor log_z;         // (batch, num_draft + 1) float32
};

inline VerifyOutputs empty_verify_outputs(const VerifyInputs& in) {
  const int64_t rows_positions[] = {in.batch, in.num_draft + 1};
  const int64_t rows[] = {in.batch};
  return VerifyOutputs{empty_on(in.target, rows_positions, OutputDtype::kInt64),
                       empty_on(in.target, rows, OutputDtype::kInt64), empty_on(in.target, rows_positions, OutputDtype::kFloat32)};
}

// r's logits as the kernels read them: draft_logits (the proposal, also in the tilt), or for
// one-hot drafts (draft_logits None) aligned_logits, which only the tilt reads. Checks the
// combination; nullopt when nothing reads r.
inline std::optional<Tensor> checked_draft(const std::optional<Tensor>& draft_logits, const std::optional<Tensor>& aligned_logits,
                                           bool tilts, std::string_view mode) {
  if (is_given(draft_logits)) {
    SSS_CHECK_VALUE(!is_given(aligned_logits),
                    "aligned_logits is only for one-hot drafts (draft_logits=None); with draft_logits given, the tilt reads "
                    "draft_logits");
    check_logits(*draft_logits, "draft_logits", 3, "(B, K+1, V)");
    return draft_logits;
  }
  SSS_CHECK_VALUE(mode == "exact",
                  "mode='paper' needs draft_logits: the paper's rule divides by the draft's probabilities, which one-hot "
                  "drafts (draft_logits=None) do not have");
  if (!tilts) return std::nullopt;  // no reference or shift 0: p* = warp(q), r is never read
  SSS_CHECK_VALUE(is_given(aligned_logits),
                  "one-hot drafts (draft_logits=None) with ref_logits and shift > 0 need aligned_logits (B, K+1, V): the tilt "
                  "q (r/d)^shift reads the aligned draft r");
  check_logits(*aligned_logits, "aligned_logits", 3, "(B, K+1, V)");
  return aligned_logits;
}

inline VerifyInputs check_verify_args(const Tensor& target_logits, const std::optional<Tensor>& draft_logits, const Tensor& draft_tokens,
                                      const std::optional<Tensor>& ref_logits, const Tensor& uniforms, double temperature,
                                      int64_t top_k, double top_p, double shift, std::string_view mode,
                                      const std::optional<Tensor>& num_draft_tokens, std::string_view top_k_ties,
                                      const std::optional<Tensor>& aligned_logits, std::string_view verification) {
  check_logits(target_logits, "target_logits", 3, "(B, K+1, V)");
  const bool one_hot = !is_given(draft_logits);
  const bool has_ref_given = is_given(ref_logits);
  SSS_CHECK_VALUE(!is_given(aligned_logits) || has_ref_given,
                  "aligned_logits without ref_logits has no use: it enters only the tilt q (r/d)^shift");
  // One-hot drafts without a tilt never read r or d: the reference is dropped like the CPU kernel's shift-0 path.
  const std::optional<Tensor> draft = checked_draft(draft_logits, aligned_logits, has_ref_given && shift != 0.0, mode);
  const char* draft_name = one_hot ? "aligned_logits" : "draft_logits";
  const ScalarType dtype = target_logits.scalar_type();
  SSS_CHECK_VALUE(draft_tokens.dim() == 2 && draft_tokens.scalar_type() == ScalarType::Long,
                  "draft_tokens must be a 2-D int64 tensor (B, K), got ", draft_tokens.scalar_type(), " of shape ",
                  draft_tokens.sizes());
  const int64_t batch = draft_tokens.size(0), num_draft = draft_tokens.size(1), vocab = target_logits.size(2);
  SSS_CHECK_VALUE(vocab >= 1, "target_logits must have a vocabulary dimension of size >= 1");
  SSS_CHECK_VALUE(target_logits.size(0) == batch && target_logits.size(1) == num_draft + 1,
                  "target_logits must have shape (B, K+1, V) = (", batch, ", ", num_draft + 1, ", ", vocab, "), got ",
                  target_logits.sizes());
  const bool has_ref = has_ref_given && (!one_hot || draft.has_value());
  if (draft) {
    const Tensor& r = *draft;
    const bool draft_ok = r.size(0) == batch && r.size(2) == vocab &&
                          (r.size(1) == num_draft + 1 || (!has_ref && r.size(1) == num_draft));
    SSS_CHECK_VALUE(draft_ok, draft_name, " must have shape (B, K+1, V) = (", batch, ", ", num_draft + 1, ", ", vocab,
                    has_ref ? ")" : ") or (B, K, V)", ", got ", r.sizes());
    SSS_CHECK_VALUE(r.scalar_type() == dtype, draft_name, " must have the dtype of target_logits (", dtype, "), got ",
                    r.scalar_type());
    check_same_device(target_logits, "target_logits", r, draft_name);
  }
  check_same_device(target_logits, "target_logits", draft_tokens, "draft_tokens");
  check_same_device(target_logits, "target_logits", uniforms, "uniforms");
  if (has_ref_given) {
    const Tensor& ref = *ref_logits;
    check_logits(ref, "ref_logits", 3, "(B, K+1, V)");
    SSS_CHECK_VALUE(ref.sizes().equals(target_logits.sizes()), "ref_logits must have shape (B, K+1, V) = ", target_logits.sizes(),
                    ", got ", ref.sizes());
    SSS_CHECK_VALUE(ref.scalar_type() == dtype, "ref_logits must have the dtype of target_logits (", dtype, "), got ",
                    ref.scalar_type());
    check_same_device(target_logits, "target_logits", ref, "ref_logits");
  }
  SSS_CHECK_VALUE(uniforms.scalar_type() == ScalarType::Double && uniforms.dim() == 2 && uniforms.size(0) == batch &&
                      uniforms.size(1) == num_draft + 1,
                  "uniforms must be a float64 tensor of shape (B, K+1) = (", batch, ", ", num_draft + 1, "), got ",
                  uniforms.scalar_type(), " of shape ", uniforms.sizes());
  check_sampling(temperature, top_k, top_p);
  SSS_CHECK_VALUE(std::isfinite(shift) && shift >= 0, "shift (lambda) must be a finite float >= 0, got ", shift);
  SSS_CHECK_VALUE(mode == "exact" || mode == "paper", "mode must be 'exact' or 'paper', got '", mode, "'");
  SSS_CHECK_VALUE(mode == "exact" || has_ref_given, "mode='paper' needs ref_logits: the paper's rule divides by the reference draft d");
  const TopKTies ties = parse_top_k_ties(top_k_ties);
  SSS_CHECK_VALUE(verification == "token" || verification == "block", "verification must be one of ('token', 'block'), got '",
                  verification, "'");
  SSS_CHECK_VALUE(verification == "token" || mode == "exact",
                  "verification='block' needs mode='exact': block verification is exact for a target and a proposal, which "
                  "the paper rule (mode='paper') does not verify against");
  const bool ragged = is_given(num_draft_tokens);
  if (ragged) {  // values in [0, K] are checked by the kernels (kBadNumDraft)
    const Tensor& counts = *num_draft_tokens;
    SSS_CHECK_VALUE(counts.dim() == 1, "num_draft_tokens must be 1-D, got shape ", PyShape{counts.sizes()});
    SSS_CHECK_VALUE(counts.scalar_type() == ScalarType::Long, "num_draft_tokens must have dtype int64, got ",
                    PyDtype{counts.scalar_type()});
    SSS_CHECK_VALUE(counts.size(0) == batch,
                    "num_draft_tokens must be an int64 tensor of shape (B,) = (", batch, "), got ", counts.scalar_type(),
                    " of shape ", counts.sizes());
    check_same_device(target_logits, "target_logits", counts, "num_draft_tokens");
  }
  return VerifyInputs{vocab_contiguous(target_logits),
                      draft_tokens,
                      uniforms,
                      draft ? std::optional<Tensor>(vocab_contiguous(*draft)) : std::nullopt,
                      has_ref ? std::optional<Tensor>(vocab_contiguous(*ref_logits)) : std::nullopt,
                      ragged ? num_draft_tokens : std::nullopt,
                      batch,
                      num_draft,
                      vocab,
                      dtype,
                      Sampling{temperature, top_k, top_p, ties},
                      shift,
                      mode == "paper",
                      one_hot,
                      verification == "block" && temperature != 0.0};
}

template <typename T>
VerifyParams<T> verify_params(const VerifyInputs& in, const VerifyOutputs& out) {
  VerifyParams<T> p;
  p.target = logits_view<T>(in.target);
  if (in.draft) p.draft = logits_view<T>(*in.draft);
  if (in.ref) p.ref = logits_view<T>(*in.ref);
  p.draft_tokens = input_data<int64_t>(in.draft_tokens);
  p.draft_tokens_stride_batch = in.draft_tokens.stride(0);
  p.draft_tokens_stride_position = in.draft_tokens.stride(1);
  p.uniforms = input_data<double>(in.uniforms);
  p.uniforms_stride_batch = in.uniforms.stride(0);
  p.uniforms_stride_position = in.uniforms.stride(1);
  if (in.num_draft_tokens) {
    p.num_draft_tokens = input_data<int64_t>(*in.num_draft_tokens);
    p.num_draft_tokens_stride = in.num_draft_tokens->stride(0);
  }
  p.batch = in.batch;
  p.num_draft = in.num_draft;
  p.vocab = in.vocab;
  p.sampling = in.sampling;
  p.shift = in.shift;
  p.paper_mode = in.paper_mode;
  p.one_hot_proposal = in.one_hot_proposal;
  p.block_verification = in.block_verification;
  p.tokens = output_data<int64_t>(out.tokens);
  p.num_accepted = output_data<int64_t>(out.num_accepted);
  p.log_z = output_data<float>(out.log_z);
  return p;
}

// A checked sample call: logits with unit vocabulary stride, sizes and scalars.
struct SampleInputs {
  Tensor logits, uniforms;
  int64_t batch, vocab;
  ScalarType dtype;
  Sampling sampling;
};

inline SampleInputs check_sample_args(const Tensor& logits, const Tensor& uniforms, double temperature, int64_t top_k,
                                      double top_p, std::string_view top_k_ties) {
  check_logits(logits, "logits", 2, "(B, V)");
  SSS_CHECK_VALUE(logits.size(1) >= 1, "logits must have a vocabulary dimension of size >= 1");
  SSS_CHECK_VALUE(uniforms.scalar_type() == ScalarType::Double && uniforms.dim() == 1 && uniforms.size(0) == logits.size(0),
                  "uniforms must be a float64 tensor of shape (B,) = (", logits.size(0), "), got ", uniforms.scalar_type(),
                  " of shape ", uniforms.sizes());
  check_same_device(logits, "logits", uniforms, "uniforms");
  check_sampling(temperature, top_k, top_p);
  const TopKTies ties = parse_top_k_ties(top_k_ties);
  return SampleInputs{vocab_contiguous(logits), uniforms, logits.size(0), logits.size(1), logits.scalar_type(),
                      Sampling{temperature, top_k, top_p, ties}};
}

// (batch,) int64
inline Tensor empty_sample_tokens(const SampleInputs& in) {
  const int64_t rows[] = {in.batch};
  return empty_on(in.logits, rows, OutputDtype::kInt64);
}

template <typename T>
SampleParams<T> sample_params(const SampleInputs& in, const Tensor& tokens) {
  SampleParams<T> p;
  p.logits = logits_view<T>(in.logits);
  p.uniforms = input_data<double>(in.uniforms);
  p.uniforms_stride = in.uniforms.stride(0);
  p.batch = in.batch;
  p.vocab = in.vocab;
  p.sampling = in.sampling;
  p.tokens = output_data<int64_t>(tokens);
  return p;
}

// ", position i" for a position-specific error, nothing for a row-wide one.
inline std::string at_position(int64_t position) { return position >= 0 ? ", position " + std::to_string(position) : std::string(); }

// Raises a ValueError for a kernel-reported error; returns normally when ok. num_draft: K of
// a verify call; one_hot: its drafts are one-hot, so the kernels' draft tensor is aligned_logits.
inline void raise_if_error(const Error& e, int64_t vocab, int64_t num_draft = 0, bool one_hot = false) {
  const auto tensor_name = [one_hot](Which which) {
    return one_hot && which == Which::kDraft ? "aligned_logits" : sss_ext::tensor_name(which);
  };
  switch (e.status) {
    case Status::kOk: return;
    case Status::kBadNumDraft:
      throw_value_error("num_draft_tokens must hold values in [0, K] = [0, ", num_draft, "], found ", e.value_index, " at row ",
                        e.batch_index);
    case Status::kBadDraftToken:
      throw_value_error("draft_tokens must hold token ids in [0, ", vocab, "), found ", e.value_index, " at (", e.batch_index, ", ",
                        e.position, ")");
    case Status::kBadUniform:
      throw_value_error("uniforms must lie in the open interval (0, 1); found 0, 1, NaN or out-of-range at row ", e.batch_index,
                        at_position(e.position));
    case Status::kNonFiniteLogit:
      throw_value_error(tensor_name(e.which), " must be finite or -inf; found NaN or +inf at row ", e.batch_index,
                        at_position(e.position), ", token ", e.value_index);
    case Status::kEmptyRow:
      throw_value_error(tensor_name(e.which), " has a row with every logit -inf (no token can be drawn) at row ", e.batch_index,
                        at_position(e.position));
    case Status::kScoreRange:
      if (e.which == Which::kNone)
        throw_value_error("the tilted score zq/temperature + shift * (zr/temperature - zd/temperature) has a row maximum "
                          "outside [-1e300, 1e300] at row ",
                          e.batch_index, ", position ", e.position, ": use a smaller shift or a larger temperature");
      throw_value_error(tensor_name(e.which), " / temperature leaves the supported range [-1e300, 1e300] at row ", e.batch_index,
                        at_position(e.position), ": use a larger temperature (or 0 for greedy) or smaller logits");
    case Status::kNoSupport:
      throw_value_error("the tilted target p* has no token with positive probability at row ", e.batch_index, ", position ",
                        e.position, ": target_logits, draft_logits and ref_logits mask disjoint vocabularies");
  }
}

}  // namespace sss_ext::adapter
