// Top-k / top-p kept sets by a radix descent over exact float64 rank keys: the fallback of the
// bucketed selection (bucket_select.cuh) for rows it cannot settle (verify.cuh has the overview).
#pragma once

#include "stats.cuh"

namespace sss_ext::cuda {

// ---------------------------------------------------------------------------------------
// 2. truncation: kept sets of top-k / top-p over exact float64 scores. The radix descent below
// (radix_truncation) is the fallback of the bucketed selection (bucket_select.cuh); both give the
// kept set of the same rule.
//
// Ranking (sss_ext/warp.py): score descending, ties to the lower index. A token's rank key
// is the 96-bit (order_key(score), 0xffffffff - index), larger first, so the kept set
// {rank key >= key of the last kept token} is exactly KeptSet. The last kept token is found
// by a most-significant-digit radix descent (8-bit digits) with shared-memory histograms of
// counts (top-k: the token of rank k - 1) or masses exp(score - max) (top-p: the last token
// whose preceding mass is < top_p * total; under TopKTies::kKeep the top-k key drops its index
// part, so every token tied with rank k - 1 stays). Passes stop early once a digit isolates a token,
// and digits that every candidate of the chosen bucket shares are skipped (the bucket's AND
// and OR of the keys), so ties of low-precision logits cost one pass per differing byte.
// Bucket masses are summed in a fixed order (lanes in lane order, a warp's iterations in
// vocabulary order into its own histogram row, then the warps' rows in warp order), so the
// kept set does not depend on warp scheduling.

struct RankKey {
  uint64_t hi;  // order_key(score)
  uint32_t lo;  // 0xffffffff - index
};

__device__ __forceinline__ bool operator<(const RankKey& a, const RankKey& b) { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo); }

__device__ __forceinline__ uint64_t order_key(double score) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(score + 0.0));  // -0 -> +0
  return (bits >> 63) ? ~bits : bits | (uint64_t(1) << 63);
}

__device__ __forceinline__ double score_of_key(uint64_t key) {
  const uint64_t bits = (key >> 63) ? key & ~(uint64_t(1) << 63) : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

__device__ __forceinline__ RankKey rank_key(double score, int64_t v) {
  return RankKey{order_key(score), 0xffffffffu - static_cast<uint32_t>(v)};
}

// Digit `digit` (0 = most significant) of the 96-bit key, and whether the key's more
// significant digits equal those of `prefix`.
__device__ __forceinline__ uint32_t key_digit(const RankKey& k, int digit) {
  return digit < 8 ? static_cast<uint32_t>(k.hi >> (56 - 8 * digit)) & 0xffu : (k.lo >> (24 - 8 * (digit - 8))) & 0xffu;
}

__device__ __forceinline__ bool prefix_matches(const RankKey& k, const RankKey& prefix, int digit) {
  if (digit == 0) return true;
  if (digit <= 8) return (k.hi >> (64 - 8 * digit)) == (prefix.hi >> (64 - 8 * digit));
  return k.hi == prefix.hi && (digit == 12 || (k.lo >> (32 - 8 * (digit - 8))) == (prefix.lo >> (32 - 8 * (digit - 8))));
}

__device__ __forceinline__ void set_digit(RankKey& k, int digit, uint32_t value) {
  if (digit < 8) {
    const int shift = 56 - 8 * digit;
    k.hi = (k.hi & ~(uint64_t(0xff) << shift)) | (uint64_t(value) << shift);
  } else {
    const int shift = 24 - 8 * (digit - 8);
    k.lo = (k.lo & ~(0xffu << shift)) | (value << shift);
  }
}

struct TruncationShared {
  ExpTable exp_table;
  unsigned int count[256];
  double mass[256];                                 // bucket masses, summed over warps
  double warp_mass[kTruncationThreads / kWarp][256];  // one histogram row per warp
  unsigned int min_index[256];
  unsigned int and_bits[256][3];  // AND / OR of each bucket's candidate keys: hi >> 32, hi, lo
  unsigned int or_bits[256][3];
  double scratch[kTruncationThreads / kWarp];
  RankKey prefix;
  int digit;
  int done;
  unsigned long long count_above;
  double mass_above;
  double target;
};

// The float64 score of token v for p* (stream 0) or r~ (stream 1) at one (row, position).
template <typename T>
struct RowScore {
  const T* q;
  const T* r;
  const T* d;
  ScoreParams sp;
  int stream;
  int64_t vocab;
  int skew_q, skew_r, skew_d;
  __device__ __forceinline__ RowScore(const T* q_, const T* r_, const T* d_, const ScoreParams& sp_, int stream_, int64_t vocab_)
      : q(q_), r(r_), d(d_), sp(sp_), stream(stream_), vocab(vocab_), skew_q(row_skew(q_)), skew_r(row_skew(r_)), skew_d(row_skew(d_)) {}
  __device__ __forceinline__ double operator()(int64_t v) const {
    if (stream == 1) return temper(load_double(r, v), sp);
    return tilted_score(load_double(q, v), r != nullptr ? load_double(r, v) : -kInfD, d != nullptr ? load_double(d, v) : -kInfD, sp);
  }
  // Scores of the kVec tokens of 16-byte vector k (-inf past the vocabulary).
  template <int kVec>
  __device__ __forceinline__ void vector(int64_t k, double (&out)[kVec]) const {
    const int64_t v0 = k * kVec;
    if (stream == 1) {
      const uint4 raw_r = load_vector(r, skew_r, v0, vocab);
#pragma unroll
      for (int e = 0; e < kVec; ++e) out[e] = temper(unpack<T>(raw_r, e), sp);
      return;
    }
    const uint4 raw_q = load_vector(q, skew_q, v0, vocab);
    const uint4 raw_r = r != nullptr ? load_vector(r, skew_r, v0, vocab) : uint4{};
    const uint4 raw_d = d != nullptr ? load_vector(d, skew_d, v0, vocab) : uint4{};
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      out[e] = tilted_score(unpack<T>(raw_q, e), r != nullptr ? static_cast<double>(unpack<T>(raw_r, e)) : -kInfD,
                            d != nullptr ? static_cast<double>(unpack<T>(raw_d, e)) : -kInfD, sp);
    }
  }
};

// Radix descent among candidates (rank key >= floor). by_mass = false: the token of 0-based
// rank `rank`; by_mass = true: the last token whose preceding mass is < top_p * total.
template <typename T>
__device__ RankKey descend(const RowScore<T>& score, int64_t vocab, RankKey floor, RankKey prefix, int start_digit,
                           bool by_mass, uint64_t rank, double top_p, double max_score, TruncationShared& sh) {
  constexpr int kVec = Storage<T>::kVec;
  const int64_t vectors = num_vectors<T>(vocab);
  __syncthreads();  // sh.prefix of a previous descent has been read
  if (threadIdx.x == 0) {
    sh.prefix = prefix;
    sh.digit = start_digit;
    sh.done = start_digit >= 12;
    sh.count_above = 0;
    sh.mass_above = 0.0;
  }
  __syncthreads();
  while (!sh.done) {
    const int digit = sh.digit;
    const RankKey current = sh.prefix;
    for (int j = threadIdx.x; j < 256; j += blockDim.x) {
      sh.count[j] = 0;
      for (int w = 0; w < kTruncationThreads / kWarp; ++w) sh.warp_mass[w][j] = 0.0;
      sh.min_index[j] = 0xffffffffu;
      for (int w = 0; w < 3; ++w) {
        sh.and_bits[j][w] = 0xffffffffu;
        sh.or_bits[j][w] = 0u;
      }
    }
    __syncthreads();
    // Warp-aggregated histogram: the lanes of a warp that fall into one bucket add once
    // (scores cluster in few buckets, so plain shared atomics would serialise). Each lane
    // loads one 16-byte vector per stream; its kVec tokens are visited in order.
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    for (int64_t base = 0; base < vectors; base += blockDim.x) {
      const int64_t k = base + threadIdx.x;
      double scores[kVec];
      if (k < vectors) {
        score.vector(k, scores);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) scores[e] = -kInfD;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int64_t v = k * kVec + e;
        uint32_t bucket = 0xffffffffu;  // no bucket
        double mass = 0.0;
        uint32_t words[3] = {0u, 0u, 0u};
        if (v < vocab) {
          const double s = scores[e];
          const RankKey key = rank_key(s, v);
          if (!(key < floor) && prefix_matches(key, current, digit)) {
            bucket = key_digit(key, digit);
            if (by_mass) mass = fast_exp(s - max_score, sh.exp_table);
            words[0] = static_cast<uint32_t>(key.hi >> 32);
            words[1] = static_cast<uint32_t>(key.hi);
            words[2] = key.lo;
          }
        }
        const unsigned int peers = __match_any_sync(0xffffffffu, bucket);
        uint32_t and_words[3], or_words[3];  // over the lanes of this lane's bucket
#pragma unroll
        for (int w = 0; w < 3; ++w) {
          and_words[w] = __reduce_and_sync(peers, words[w]);
          or_words[w] = __reduce_or_sync(peers, words[w]);
        }
        if (by_mass) {  // each lane: the mass of its bucket's lanes, in lane order
          double group = 0.0;
          for (int src = 0; src < kWarp; ++src) {
            const double other = __shfl_sync(0xffffffffu, mass, src);
            if ((peers >> src) & 1u) group += other;
          }
          mass = group;
        }
        if (bucket != 0xffffffffu && lane == __ffs(peers) - 1) {  // the lowest lane holds the lowest index
          atomicAdd(&sh.count[bucket], static_cast<unsigned int>(__popc(peers)));
          atomicMin(&sh.min_index[bucket], static_cast<unsigned int>(v));
#pragma unroll
          for (int w = 0; w < 3; ++w) {
            atomicAnd(&sh.and_bits[bucket][w], and_words[w]);
            atomicOr(&sh.or_bits[bucket][w], or_words[w]);
          }
          if (by_mass) sh.warp_mass[warp][bucket] = __dadd_rn(sh.warp_mass[warp][bucket], mass);  // this warp's row only
        }
        __syncwarp();  // the next iteration's leader of a bucket sees this one's sum
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; by_mass && j < 256; j += blockDim.x) {
      double mass = 0.0;
      for (int w = 0; w < kTruncationThreads / kWarp; ++w) mass = __dadd_rn(mass, sh.warp_mass[w][j]);
      sh.mass[j] = mass;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      if (by_mass && digit == start_digit) {  // the first pass sees every candidate
        double total = 0.0;
        for (int j = 255; j >= 0; --j) total += sh.mass[j];
        sh.target = top_p * total;
      }
      int chosen = -1;
      if (by_mass) {
        double running = sh.mass_above, above = running;
        for (int j = 255; j >= 0; --j) {
          if (sh.count[j] == 0) continue;
          if (!(running < sh.target)) break;
          chosen = j;
          above = running;
          running += sh.mass[j];
        }
        if (chosen < 0) {  // unreachable for valid rows (mass_above < target); stay in range
          for (chosen = 255; chosen > 0 && sh.count[chosen] == 0;) --chosen;
        }
        sh.mass_above = above;
      } else {
        unsigned long long running = sh.count_above;
        for (chosen = 255; chosen > 0; --chosen) {
          if (running + sh.count[chosen] > rank) break;
          running += sh.count[chosen];
        }
        sh.count_above = running;
      }
      RankKey next = current;
      set_digit(next, digit, static_cast<uint32_t>(chosen));
      int next_digit = digit + 1;
      const uint64_t and_hi = (uint64_t(sh.and_bits[chosen][0]) << 32) | sh.and_bits[chosen][1];
      const uint64_t or_hi = (uint64_t(sh.or_bits[chosen][0]) << 32) | sh.or_bits[chosen][1];
      const uint32_t and_lo = sh.and_bits[chosen][2], or_lo = sh.or_bits[chosen][2];
      if (sh.count[chosen] == 1) {  // one token left: its full key
        const unsigned int v = sh.min_index[chosen];
        next = rank_key(score(v), v);
        sh.done = 1;
      } else if (and_hi != or_hi) {  // skip the digits every candidate of the bucket shares
        next.hi = and_hi;
        next_digit = max(next_digit, __clzll(static_cast<long long>(and_hi ^ or_hi)) / 8);
      } else {  // one score: the rest of the rank is the index
        next.hi = and_hi;
        next.lo = and_lo;
        next_digit = max(next_digit, 8 + __clz(static_cast<int>(and_lo ^ or_lo)) / 8);  // indices differ: < 12
      }
      sh.prefix = next;
      sh.digit = next_digit;
      sh.done |= next_digit >= 12;
    }
    __syncthreads();
  }
  return sh.prefix;
}

// The radix descent of one (row, position, stream): the fallback of the bucketed selection
// below for rows whose boundary cannot be settled among the collected candidates (more than
// kTruncCandidates tokens in the planned buckets with several distinct scores). Reads the
// row once for the key range, once per radix digit and once for the normaliser.
template <typename T>
__device__ void radix_truncation(const Problem<T>& pr, int64_t row_position, int stream, TruncationShared& sh) {
  const int64_t b = row_position / pr.positions(), i = row_position % pr.positions();
  const int64_t vocab = pr.p.vocab;
  const bool tilt = pr.tilt;
  constexpr int kVec = Storage<T>::kVec;
  const int64_t vectors = num_vectors<T>(vocab);
  const RowScore<T> score(pr.target_row(b, i), stream == 1 || tilt ? pr.draft_row(b, i) : nullptr,
                          stream == 0 && tilt ? pr.ref_row(b, i) : nullptr, pr.score, stream, vocab);

  // Row maximum and the range of score keys (common leading digits are skipped).
  double max_score = -kInfD;
  uint64_t key_max = 0, key_min = ~uint64_t(0);
  for (int64_t k = threadIdx.x; k < vectors; k += blockDim.x) {
    double scores[kVec];
    score.vector(k, scores);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (k * kVec + e >= vocab) break;
      max_score = fmax(max_score, scores[e]);
      key_max = max(key_max, order_key(scores[e]));
      key_min = min(key_min, order_key(scores[e]));
    }
  }
  max_score = block_reduce<kTruncationThreads>(max_score, [](double a, double c) { return fmax(a, c); }, sh.scratch);
  key_max = block_reduce<kTruncationThreads>(key_max, [](uint64_t a, uint64_t c) { return max(a, c); },
                                             reinterpret_cast<uint64_t*>(sh.scratch));
  key_min = block_reduce<kTruncationThreads>(key_min, [](uint64_t a, uint64_t c) { return min(a, c); },
                                             reinterpret_cast<uint64_t*>(sh.scratch));

  // At least one of top-k / top-p truncates (launch_verify checks Sampling::truncates).
  const Sampling& sampling = pr.p.sampling;
  RankKey kept{0, 0};  // the smallest key: every token
  if (sampling.top_k > 0 && sampling.top_k < vocab) {
    const int common = key_max == key_min ? 64 : __clzll(static_cast<long long>(key_max ^ key_min));
    const int start = common / 8;
    RankKey prefix{start == 0 ? 0 : key_max & (~uint64_t(0) << (64 - 8 * start)), 0};
    kept = descend(score, vocab, RankKey{0, 0}, prefix, start, false, static_cast<uint64_t>(sampling.top_k - 1), 1.0, max_score, sh);
    if (sampling.keeps_ties()) kept.lo = 0;  // every token with the k-th largest score
  }
  if (sampling.top_p < 1.0) {
    const uint64_t low = kept.hi > key_min ? kept.hi : key_min;  // candidates: rank key >= kept
    const int common = key_max == low ? 64 : __clzll(static_cast<long long>(key_max ^ low));
    const int start = common / 8;
    RankKey prefix{start == 0 ? 0 : key_max & (~uint64_t(0) << (64 - 8 * start)), 0};
    kept = descend(score, vocab, kept, prefix, start, true, 0, sampling.top_p, max_score, sh);
  }

  // Normaliser over the kept tokens.
  const KeptSet set{score_of_key(kept.hi), int64_t(0xffffffffu - kept.lo)};
  double total = 0.0;
  for (int64_t k = threadIdx.x; k < vectors; k += blockDim.x) {
    double scores[kVec];
    score.vector(k, scores);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = k * kVec + e;
      if (v < vocab && set.contains(scores[e], v)) total = __dadd_rn(total, fast_exp(scores[e] - max_score, sh.exp_table));
    }
  }
  total = block_reduce<kTruncationThreads>(total, [](double a, double c) { return __dadd_rn(a, c); }, sh.scratch);
  if (threadIdx.x == 0) pr.truncations[row_position * 2 + stream] = Truncation{set, max_score, log(total)};
}

}  // namespace sss_ext::cuda
