// Stage 1 of a verify call: one pass over the logits for the row maxima, normalisers, value
// flags and the greedy argmax (verify.cuh has the overview).
#pragma once

#include "problem.cuh"

namespace sss_ext::cuda {

// ---------------------------------------------------------------------------------------
// 1. stats
//
// Scores are float64 everywhere (products with 1 / tau and the tilt), so their rounding does
// not grow with 1 / temperature. Sums of exp(score - max) come in two precisions, chosen by
// vocabulary size at launch:
// - exact (V < kExactVocab): float64 exp and sums;
// - fast: the float64 difference score - max rounded once to float32, ex2.approx, float32
//   sums per 16-byte vector added to float64 accumulators. Per-token errors are at float32
//   rounding level and average out over large vocabularies.

__device__ __forceinline__ float max_nan(float a, float b) {  // NaN if either is NaN
#if defined(__CUDA_ARCH__)
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (a != a || b != b) ? a + b : fmaxf(a, b);  // host compilation pass only
#endif
}

// Flags of one vector of logits: `bad` for NaN/+inf, `seen` for a value > -inf.
template <int kVec>
__device__ __forceinline__ uint32_t vector_flags(const float (&x)[kVec], uint32_t bad, uint32_t seen) {
  float m = x[0];
#pragma unroll
  for (int e = 1; e < kVec; ++e) m = max_nan(m, x[e]);
  return (m < kInfF ? 0u : bad) | (m > -kInfF ? seen : 0u);  // NaN fails both comparisons
}

// A scaled logit or score as accumulated: values above kMaxScaledScore (and NaN) count as
// -inf; they make the row invalid through the flags.
__device__ __forceinline__ double in_range(double x) { return x <= kMaxScaledScore ? x : -kInfD; }

// True for a finite logit z whose scaled value z / tau lies outside the allowed range.
__device__ __forceinline__ bool out_of_range(float z, double scaled) {
  return fabsf(z) < kInfF && !(fabs(scaled) <= kMaxScaledScore);
}

// Running (max, sum of exp(score - max)) of one score stream in one thread.
struct Accumulator {
  double max;
  double sum;
};

template <bool kExact, int kVec>
__device__ __forceinline__ void accumulate(Accumulator& acc, const double (&x)[kVec], const ExpTable& table) {
  double top = x[0];
#pragma unroll
  for (int e = 1; e < kVec; ++e) top = fmax(top, x[e]);
  if (!(top > -kInfD)) return;
  if (top > acc.max) {  // rescale once per vector
    acc.sum = acc.max == -kInfD ? 0.0 : __dmul_rn(acc.sum, fast_exp(__dsub_rn(acc.max, top), table));
    acc.max = top;
  }
  if constexpr (kExact) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc.sum = __dadd_rn(acc.sum, fast_exp(__dsub_rn(x[e], acc.max), table));
  } else {
    float sum = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum = __fadd_rn(sum, exp_f32(__dsub_rn(x[e], acc.max)));
    acc.sum = __dadd_rn(acc.sum, static_cast<double>(sum));
  }
}

// Block-wide (max, sum) of one stream (every thread gets it).
__device__ __forceinline__ void block_max_sum(const Accumulator& acc, double& max, double& sum, const ExpTable& table,
                                              double* scratch) {
  max = block_reduce<kStatsThreads>(acc.max, [](double a, double b) { return fmax(a, b); }, scratch);
  const double own = max == -kInfD || acc.max == -kInfD ? 0.0 : __dmul_rn(acc.sum, fast_exp(__dsub_rn(acc.max, max), table));
  sum = block_reduce<kStatsThreads>(own, [](double a, double b) { return __dadd_rn(a, b); }, scratch);
}

// One vector of logits z of a stream: flags a finite z with |z / tau| > kMaxScaledScore and,
// when `accumulated`, adds exp(z / tau - max) to the stream's accumulator.
template <bool kExact, int kVec>
__device__ __forceinline__ void scaled_stream(const float (&z)[kVec], const ScoreParams& sp, uint32_t range_flag, bool accumulated,
                                              Accumulator& acc, uint32_t& flags, const ExpTable& table) {
  double x[kVec];
  bool range = false;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const double scaled = temper(z[e], sp);
    range |= out_of_range(z[e], scaled);
    x[e] = in_range(scaled);
  }
  flags |= range ? range_flag : 0u;
  if (accumulated) accumulate<kExact>(acc, x, table);
}

template <typename T, bool kGreedy, bool kTilt, bool kExact>
__global__ void __launch_bounds__(kStatsThreads, kStatsMinBlocks) stats_kernel(const Problem<T> pr) {
  constexpr int kVec = Storage<T>::kVec;
  __shared__ ExpTable table;
  __shared__ double scratch[kStatsThreads / kWarp];
  __shared__ int64_t index_scratch[kStatsThreads / kWarp];
  init_exp_table(table);
  if (blockIdx.x == 0)
    for (int64_t row = threadIdx.x; row < pr.p.batch; row += kStatsThreads) pr.done[row] = 0;  // for draw_kernel
  __syncthreads();
  const int split = static_cast<int>(blockIdx.x % pr.splits);
  const int64_t row_position = blockIdx.x / pr.splits;
  const int64_t b = row_position / pr.positions(), i = row_position % pr.positions();
  if (i > pr.last_position(b)) return;  // past the row's last position: never read
  const int64_t vocab = pr.p.vocab;
  const T* q = pr.target_row(b, i);  // (vocab,) each
  const T* r = pr.draft_row(b, i);
  const T* d = pr.ref_row(b, i);
  const int skew_q = row_skew(q), skew_r = row_skew(r), skew_d = row_skew(d);
  const bool proposal_stream = r != nullptr && (pr.has_proposal(b, i) || kTilt);
  const int64_t begin = split * kSplitVectors, end = min(num_vectors<T>(vocab), begin + kSplitVectors);
  const ScoreParams sp = pr.score;

  Accumulator acc[kNumStreams];
#pragma unroll
  for (int s = 0; s < kNumStreams; ++s) acc[s] = Accumulator{-kInfD, 0.0};
  uint32_t flags = 0;
  double best = -kInfD;
  int64_t best_index = INT64_MAX;

  for (int64_t k0 = begin + threadIdx.x; k0 < end; k0 += int64_t(kStatsThreads) * kStatsUnroll) {
    uint4 raw_q[kStatsUnroll], raw_r[kStatsUnroll], raw_d[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {  // issue every load first
      const int64_t k = k0 + int64_t(u) * kStatsThreads;
      if (k >= end) continue;
      const int64_t v0 = k * kVec;
      raw_q[u] = load_vector(q, skew_q, v0, vocab);
      if (r != nullptr) raw_r[u] = load_vector(r, skew_r, v0, vocab);
      if (d != nullptr) raw_d[u] = load_vector(d, skew_d, v0, vocab);
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      const int64_t k = k0 + int64_t(u) * kStatsThreads;
      if (k >= end) continue;
      const int64_t v0 = k * kVec;
      float xq[kVec], xr[kVec], xd[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        xq[e] = unpack<T>(raw_q[u], e);
        xr[e] = r != nullptr ? unpack<T>(raw_r[u], e) : -kInfF;
        xd[e] = d != nullptr ? unpack<T>(raw_d[u], e) : -kInfF;
      }
      flags |= vector_flags(xq, kBadTarget, kSeenTarget);
      if (r != nullptr) flags |= vector_flags(xr, kBadDraft, kSeenDraft);
      if (d != nullptr) flags |= vector_flags(xd, kBadRef, kSeenRef);
      {  // tilted score (float64): greedy argmax or the p* stream
        double x[kVec];
        bool range = false;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const double tilted = kTilt ? tilted_score(xq[e], xr[e], xd[e], sp) : temper(xq[e], sp);
          range |= tilted > kMaxScaledScore;
          x[e] = in_range(tilted);
        }
        flags |= range ? kRangeTilted : 0u;
        if constexpr (kGreedy) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (x[e] > best) {
              best = x[e];
              best_index = v0 + e;
            }
          }
        } else {
          accumulate<kExact>(acc[kTilted], x, table);
        }
      }
      // Scaled logits of each stream read: the range rule, and the q, r, d streams.
      scaled_stream<kExact, kVec>(xq, sp, kRangeTarget, !kGreedy && kTilt, acc[kTargetStream], flags, table);
      if (r != nullptr) scaled_stream<kExact, kVec>(xr, sp, kRangeDraft, !kGreedy && proposal_stream, acc[kProposal], flags, table);
      if (d != nullptr) scaled_stream<kExact, kVec>(xd, sp, kRangeRef, !kGreedy && kTilt, acc[kRefStream], flags, table);
    }
  }

  Partial out;
  for (int s = 0; s < kNumStreams; ++s) {
    if constexpr (kGreedy) {
      out.max[s] = -kInfD;
      out.sum[s] = 0.0;
    } else {
      block_max_sum(acc[s], out.max[s], out.sum[s], table, scratch);
    }
  }
  out.flags = block_reduce<kStatsThreads>(flags, [](uint32_t a, uint32_t c) { return a | c; }, reinterpret_cast<uint32_t*>(scratch));
  out.best = block_reduce<kStatsThreads>(best, [](double a, double c) { return fmax(a, c); }, scratch);
  out.best_index = block_reduce<kStatsThreads>(best == out.best ? best_index : INT64_MAX, [](int64_t a, int64_t c) { return min(a, c); },
                                               index_scratch);
  out.unused = 0;
  if (threadIdx.x == 0) pr.partials[row_position * pr.splits + split] = out;
}

}  // namespace sss_ext::cuda
