// Framework-free definitions shared by the CPU and CUDA kernels of sss_ext.
// No torch, no ATen: raw pointers, sizes and plain structs, usable from any engine.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SSS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SSS_HOST_DEVICE inline
#endif

namespace sss_ext {

// Storage of 16-bit floats, layout-compatible with at::BFloat16 / __nv_bfloat16 and
// at::Half / __half.
struct bfloat16_t {
  uint16_t bits;
};
struct float16_t {
  uint16_t bits;
};

SSS_HOST_DEVICE float to_float(float x) { return x; }

// Bit reinterpretation through a union (a GCC/Clang/NVCC extension): unlike memcpy and
// __builtin_bit_cast it keeps `omp simd` loops vectorisable.
template <typename To, typename From>
SSS_HOST_DEVICE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  union {
    From from;
    To to;
  } pun;
  pun.from = from;
  return pun.to;
}

SSS_HOST_DEVICE float bits_to_float(uint32_t bits) { return bit_cast<float>(bits); }

SSS_HOST_DEVICE float to_float(bfloat16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }

SSS_HOST_DEVICE float to_float(float16_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;  // subnormal: mantissa * 2^-24
  return sign ? -magnitude : magnitude;
}

// Why a call was refused; the adapter turns it into an error naming the argument.
enum class Status : int32_t {
  kOk = 0,
  kBadDraftToken,   // draft_tokens[b, i] outside [0, vocab)
  kBadUniform,      // uniforms[b, i] outside the open interval (0, 1)
  kNonFiniteLogit,  // NaN or +inf in a logits row (tensor named by `which`)
  kEmptyRow,        // every logit of a row is -inf (tensor named by `which`)
  kNoSupport,       // the tilted target has no token with positive probability
  kScoreRange,      // a scaled logit (logit / temperature) or the tilted score's row maximum
                    // lies outside [-kMaxScaledScore, kMaxScaledScore] (tensor named by `which`;
                    // kNone: the tilted score)
  kBadNumDraft,     // num_draft_tokens[b] outside [0, num_draft]
};

// Largest magnitude of a finite scaled logit z / temperature and of the row maximum of the
// tilted score s = zq/tau + lambda (zr/tau - zd/tau). Inside this range no intermediate of
// the float64 arithmetic overflows to NaN; outside it a call is refused (kScoreRange).
constexpr double kMaxScaledScore = 1e300;

// A residual entry p*(v) - r~(v) (paper mode: p*(v) - r~(v)/Z) counts as positive only above
// tolerance * p*(v): where the two are equal in exact arithmetic, rounding alone must not
// decide between the residual and the p* fallback. Moves the law by at most the tolerance in
// total variation (docs/algorithm.md §3). CPU kernel and reference: float64 probabilities,
// kResidualTolerance; CUDA kernels: float32 exponentials, kResidualToleranceFloat32.
constexpr double kResidualTolerance = 1e-9;
constexpr double kResidualToleranceFloat32 = 1e-6;

SSS_HOST_DEVICE double residual_weight(double p_star, double proposal, double tolerance = kResidualTolerance) {
  const double difference = p_star - proposal;
  return difference > tolerance * p_star ? difference : 0.0;
}

// Block verification's coin threshold h_i = R_i / (R_i + (1 - p_i)) at a draft position before
// the last (docs/algorithm.md §12): R_i = sum_v (p_i p*_i(v) - r~_i(v))+, p_i the block weight; 0
// when the denominator is 0.
SSS_HOST_DEVICE double block_threshold(double mass, double weight) {
  const double denominator = mass + (1.0 - weight);
  return denominator > 0.0 ? mass / denominator : 0.0;
}

enum class Which : int32_t { kNone = 0, kTarget, kDraft, kRef, kLogits };

struct Error {
  Status status = Status::kOk;
  Which which = Which::kNone;
  int64_t batch_index = -1;
  int64_t position = -1;
  int64_t value_index = -1;  // vocabulary index or offending token id
  SSS_HOST_DEVICE bool ok() const { return status == Status::kOk; }
};

// Top-k tie rule (docs/algorithm.md §2). Ties are equal float64 scores (the values ranked):
// kKeep keeps every token whose score is >= the k-th largest, so more than k may survive (HF's
// TopKLogitsWarper and vLLM); kExactK keeps exactly the first k ranked, ties to the lower index.
enum class TopKTies : int32_t { kKeep = 0, kExactK = 1 };

// Temperature, then top-k, then top-p (docs/algorithm.md §2; sss_ext/warp.py).
struct Sampling {
  double temperature = 1.0;  // 0: greedy (argmax, lowest index on ties)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  TopKTies top_k_ties = TopKTies::kKeep;
  SSS_HOST_DEVICE bool keeps_ties() const { return top_k_ties == TopKTies::kKeep; }
  SSS_HOST_DEVICE bool greedy() const { return temperature == 0.0; }
  SSS_HOST_DEVICE bool truncates(int64_t vocab) const { return (top_k > 0 && top_k < vocab) || top_p < 1.0; }
};

// A logits tensor with unit stride along the vocabulary.
template <typename T>
struct LogitsView {
  const T* data = nullptr;
  int64_t stride_batch = 0;
  int64_t stride_position = 0;
  SSS_HOST_DEVICE const T* row(int64_t b, int64_t i) const { return data + b * stride_batch + i * stride_position; }
};

template <typename T>
struct VerifyParams {
  LogitsView<T> target;  // (batch, num_draft + 1, vocab)
  // (batch, num_draft + 1, vocab), or (batch, num_draft, vocab) without ref: the aligned draft r,
  // which is the proposal and enters the tilt. With one_hot_proposal it enters only the tilt and
  // is read only with a reference (data == nullptr without one).
  LogitsView<T> draft;
  LogitsView<T> ref;     // (batch, num_draft + 1, vocab); data == nullptr: standard speculative sampling
  const int64_t* draft_tokens = nullptr;  // (batch, num_draft)
  int64_t draft_tokens_stride_batch = 0, draft_tokens_stride_position = 0;
  const double* uniforms = nullptr;  // (batch, num_draft + 1), in (0, 1)
  int64_t uniforms_stride_batch = 0, uniforms_stride_position = 0;
  // (batch,), values in [0, num_draft]: row b verifies draft positions < num_draft_tokens[b],
  // draws its bonus at position num_draft_tokens[b] with that position's uniform, and never
  // reads any input past it. nullptr: every row verifies num_draft drafts.
  const int64_t* num_draft_tokens = nullptr;
  int64_t num_draft_tokens_stride = 0;
  int64_t batch = 0, num_draft = 0, vocab = 0;
  Sampling sampling;
  double shift = 1.0;       // lambda
  bool paper_mode = false;  // accept/correct with m = Z * p* instead of p*
  // The drafts come from a deterministic proposer: the proposal is one-hot at the draft token,
  // so x is accepted with probability p*(x) and the correction is drawn from p* without x
  // (docs/algorithm.md §11). Never with paper_mode.
  bool one_hot_proposal = false;
  // Block verification (docs/algorithm.md §12): the accepted prefix is the longest i whose coin
  // u[i-1] falls below h_i, and the correction at tau is drawn from (p_tau p*_tau - r~_tau)+.
  // Sampled calls only (greedy is the token rule); never with paper_mode.
  bool block_verification = false;
  int64_t* tokens = nullptr;        // (batch, num_draft + 1), contiguous
  int64_t* num_accepted = nullptr;  // (batch,)
  float* log_z = nullptr;           // (batch, num_draft + 1), contiguous
  SSS_HOST_DEVICE bool has_ref() const { return ref.data != nullptr; }
  // Row b's draft count as given (may be out of range: check with valid_row_draft).
  SSS_HOST_DEVICE int64_t row_draft(int64_t b) const {
    return num_draft_tokens != nullptr ? num_draft_tokens[b * num_draft_tokens_stride] : num_draft;
  }
  SSS_HOST_DEVICE bool valid_row_draft(int64_t n) const { return n >= 0 && n <= num_draft; }
};

// Tree verification (docs/algorithm.md §13): multi-draft SSS by recursive rejection sampling.
template <typename T>
struct TreeParams {
  // (batch, max_nodes, vocab): at node c, the logits of the token after c's path. ref.data ==
  // nullptr: standard speculative sampling.
  LogitsView<T> target, draft, ref;
  const int64_t* draft_tokens = nullptr;  // (batch, max_nodes); entry 0 of a row is never read
  int64_t draft_tokens_stride_batch = 0, draft_tokens_stride_node = 0;
  const int64_t* parents = nullptr;  // (batch, max_nodes): -1 at node 0, then 0 <= parents[c] < c
  int64_t parents_stride_batch = 0, parents_stride_node = 0;
  const double* uniforms = nullptr;  // (batch, max_nodes), in (0, 1)
  int64_t uniforms_stride_batch = 0, uniforms_stride_node = 0;
  // (batch,), values in [1, max_nodes]: row b has nodes < num_nodes[b] and reads nothing past
  // them. nullptr: max_nodes in every row.
  const int64_t* num_nodes = nullptr;
  int64_t num_nodes_stride = 0;
  int64_t batch = 0, max_nodes = 0, vocab = 0;
  Sampling sampling;
  double shift = 1.0;        // lambda
  bool replacement = true;   // siblings drawn i.i.d. from r~ (true) or without replacement (false)
  int64_t* path = nullptr;          // (batch, max_nodes), contiguous
  int64_t* tokens = nullptr;        // (batch, max_nodes), contiguous
  int64_t* num_accepted = nullptr;  // (batch,)
  float* log_z = nullptr;           // (batch, max_nodes), contiguous
  SSS_HOST_DEVICE bool has_ref() const { return ref.data != nullptr; }
  // Row b's node count as given (may be out of range: check with valid_row_nodes).
  SSS_HOST_DEVICE int64_t row_nodes(int64_t b) const { return num_nodes != nullptr ? num_nodes[b * num_nodes_stride] : max_nodes; }
  SSS_HOST_DEVICE bool valid_row_nodes(int64_t n) const { return n >= 1 && n <= max_nodes; }
  SSS_HOST_DEVICE int64_t draft_token(int64_t b, int64_t c) const { return draft_tokens[b * draft_tokens_stride_batch + c * draft_tokens_stride_node]; }
  SSS_HOST_DEVICE int64_t parent(int64_t b, int64_t c) const { return parents[b * parents_stride_batch + c * parents_stride_node]; }
  SSS_HOST_DEVICE double uniform(int64_t b, int64_t c) const { return uniforms[b * uniforms_stride_batch + c * uniforms_stride_node]; }
};

template <typename T>
struct SampleParams {
  LogitsView<T> logits;  // (batch, vocab); stride_position unused
  const double* uniforms = nullptr;  // (batch,), in (0, 1)
  int64_t uniforms_stride = 0;
  int64_t batch = 0, vocab = 0;
  Sampling sampling;
  int64_t* tokens = nullptr;  // (batch,)
};

}  // namespace sss_ext
