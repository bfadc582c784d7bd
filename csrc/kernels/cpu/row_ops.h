// Row-level primitives of the CPU kernels: exp, log-normalisers, top-k/top-p truncation
// and the inverse-CDF draw. All arithmetic is float64 in the order sss_ext/warp.py and
// sss_ext/reference.py use, so tokens match the reference bit for bit in practice.
// A "score" is a callable v -> double over one row of the vocabulary.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common.h"

// Hot row loops are compiled twice, for AVX2 and for the baseline ISA, and picked at run
// time (GCC/Clang function multi-versioning); helpers they call are forced inline so they
// are vectorised inside each clone. SSS_CPU_NO_MULTIVERSION turns the clones off (one
// baseline build; ThreadSanitizer cannot run target_clones resolvers).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && !defined(SSS_CPU_NO_MULTIVERSION)
#define SSS_CPU_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define SSS_CPU_MULTIVERSION
#endif
#if defined(__GNUC__)
#define SSS_FORCE_INLINE inline __attribute__((always_inline))
#else
#define SSS_FORCE_INLINE inline
#endif

namespace sss_ext::cpu {

constexpr double kInf = std::numeric_limits<double>::infinity();

// exp(x) for x <= 0 (and -inf), within 2 ulp; branch-free so loops vectorise.
// Results below 2^-1022 flush to zero (they cannot move a float64 sum of mass >= 1/V).
SSS_FORCE_INLINE double exp_nonpositive(double x) {
  const double kLog2e = 1.4426950408889634;
  const double kShifter = 6755399441055744.0;  // 1.5 * 2^52: rounds to an integer in the low bits
  const double kLn2Hi = 6.93147180369123816490e-01;
  const double kLn2Lo = 1.90821492927058770002e-10;
  const double clamped = x < -708.0 ? -708.0 : x;
  const double shifted = clamped * kLog2e + kShifter;
  const double k = shifted - kShifter;
  const double r = (clamped - k * kLn2Hi) - k * kLn2Lo;  // |r| <= ln2 / 2
  // Taylor polynomial to r^13 (error < 1e-17) in Estrin form: short dependency chains.
  const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
  const double t01 = 1.0 + r, t23 = 0.5 + r * (1.0 / 6.0), t45 = 1.0 / 24.0 + r * (1.0 / 120.0);
  const double t67 = 1.0 / 720.0 + r * (1.0 / 5040.0), t89 = 1.0 / 40320.0 + r * (1.0 / 362880.0);
  const double t1011 = 1.0 / 3628800.0 + r * (1.0 / 39916800.0), t1213 = 1.0 / 479001600.0 + r * (1.0 / 6227020800.0);
  const double low = (t01 + r2 * t23) + r4 * (t45 + r2 * t67);
  const double high = (t89 + r2 * t1011) + r4 * t1213;
  const double p = low + r8 * high;
  const int64_t exponent = bit_cast<int64_t>(shifted) - bit_cast<int64_t>(kShifter);  // k
  const double scale = bit_cast<double>((exponent + 1023) << 52);                       // 2^k
  const double underflow = x < -708.0 ? 0.0 : 1.0;  // also -inf -> 0
  return p * scale * underflow;
}

template <typename T>
SSS_FORCE_INLINE double load(const T* row, int64_t v) {
  return static_cast<double>(to_float(row[v]));
}

// Tokens kept by top-k/top-p: score > threshold, or score == threshold and index <= last_index.
// Ranking is by score descending, ties to the lower index, so this is a prefix of the ranking
// (under either top-k tie rule, TopKTies).
struct Kept {
  double threshold = -kInf;
  int64_t last_index = std::numeric_limits<int64_t>::max();
  SSS_FORCE_INLINE bool contains(double score, int64_t v) const { return (score > threshold) | ((score == threshold) & (v <= last_index)); }
};

// log sum_{v kept} exp(score(v)) = max + log_sum, log_sum = log(sum(exp(score - max))) >= 0.
// The two parts stay apart: log_prob = (score - max) - log_sum keeps log_sum even when
// |max| is so large that max + log_sum would round to max.
struct LogNormalizer {
  double max = -kInf;
  double log_sum = kInf;
  Kept kept;
  SSS_FORCE_INLINE double log_prob(double score, int64_t v) const {
    return kept.contains(score, v) ? (score - max) - log_sum : -kInf;
  }
  SSS_FORCE_INLINE double prob(double score, int64_t v) const {
    return kept.contains(score, v) ? exp_nonpositive((score - max) - log_sum) : 0.0;
  }
};

template <class Score>
SSS_FORCE_INLINE double row_max(const Score& score, int64_t vocab) {
  double best = -kInf;
#pragma omp simd reduction(max : best)
  for (int64_t v = 0; v < vocab; ++v) best = std::max(best, score(v));
  return best;
}

// log(sum(exp(score - max))) over the row, given its maximum.
template <class Score>
SSS_FORCE_INLINE double log_sum_exp_shifted(const Score& score, int64_t vocab, double max) {
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t v = 0; v < vocab; ++v) total += exp_nonpositive(score(v) - max);
  return std::log(total);
}

// First index of the maximum (docs/algorithm.md §2: greedy ties break to the lowest index).
template <class Score>
SSS_FORCE_INLINE int64_t row_argmax(const Score& score, int64_t vocab) {
  double best = -kInf;
  int64_t index = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double s = score(v);
    if (s > best) {
      best = s;
      index = v;
    }
  }
  return index;
}

// Reusable per-thread buffers for truncation and the categorical draw.
struct Scratch {
  std::vector<double> values;
  std::vector<int64_t> order;
};

// Normaliser of warp(softmax(score)) given the row maximum (finite, |max| <= kMaxScaledScore).
template <class Score>
LogNormalizer normalize(const Score& score, int64_t vocab, double max, const Sampling& sampling, Scratch& scratch) {
  LogNormalizer out;
  out.max = max;
  if (!sampling.truncates(vocab)) {
    out.log_sum = log_sum_exp_shifted(score, vocab, max);
    return out;
  }
  std::vector<double>& values = scratch.values;
  std::vector<int64_t>& order = scratch.order;
  values.resize(vocab);
  order.resize(vocab);
  for (int64_t v = 0; v < vocab; ++v) {
    values[v] = score(v);
    order[v] = v;
  }
  const auto ranks_before = [&](int64_t a, int64_t b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  };
  int64_t candidates = vocab;  // the top-k set: order[0, candidates)
  if (sampling.top_k > 0 && sampling.top_k < vocab) {
    candidates = sampling.top_k;
    std::nth_element(order.begin(), order.begin() + (candidates - 1), order.end(), ranks_before);
    if (sampling.keeps_ties()) {  // the tokens tied with the k-th largest score join it
      const double kth = values[order[candidates - 1]];
      candidates = std::partition(order.begin() + candidates, order.end(), [&](int64_t v) { return values[v] == kth; }) -
                   order.begin();
    }
  }
  int64_t num_kept = candidates;
  if (sampling.top_p < 1.0) {
    std::sort(order.begin(), order.begin() + candidates, ranks_before);
    double total = 0.0;
    for (int64_t j = 0; j < candidates; ++j) total += exp_nonpositive(values[order[j]] - max);
    const double target = sampling.top_p * total;
    double before = 0.0;
    num_kept = 0;
    while (num_kept < candidates && before < target) {
      before += exp_nonpositive(values[order[num_kept]] - max);
      ++num_kept;
    }
    num_kept = std::max<int64_t>(num_kept, 1);  // the top-ranked token (mass 1) is always kept
  }
  // The last kept token: nth_element (top-k only) or the sort (top-p) put it at num_kept - 1.
  out.kept.last_index = order[num_kept - 1];
  out.kept.threshold = values[out.kept.last_index];
  // Top-k alone under kKeep: every token with the k-th largest score (order[num_kept - 1] is
  // one of them, unsorted).
  if (!(sampling.top_p < 1.0) && sampling.keeps_ties()) out.kept.last_index = std::numeric_limits<int64_t>::max();
  double total = 0.0;
  const Kept kept = out.kept;
#pragma omp simd reduction(+ : total)
  for (int64_t v = 0; v < vocab; ++v) total += kept.contains(values[v], v) ? exp_nonpositive(values[v] - max) : 0.0;
  out.log_sum = std::log(total);
  return out;
}

// Inverse-CDF draw in vocabulary order: first v whose running mass exceeds u * total,
// else the last v with positive mass. Returns -1 when the total mass is zero.
template <class Weight>
SSS_FORCE_INLINE int64_t inverse_cdf(const Weight& weight, int64_t vocab, double u, Scratch& scratch) {
  scratch.values.resize(vocab);
  double* w = scratch.values.data();
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) w[v] = weight(v);
  double total = 0.0;  // in vocabulary order, like the reference's cumsum
  for (int64_t v = 0; v < vocab; ++v) total += w[v];
  if (!(total > 0.0)) return -1;
  const double threshold = u * total;
  double running = 0.0;
  int64_t last_positive = -1;
  for (int64_t v = 0; v < vocab; ++v) {
    running += w[v];
    if (running > threshold) return v;
    if (w[v] > 0.0) last_positive = v;
  }
  return last_positive;
}

}  // namespace sss_ext::cpu
