// CUDA kernels of the sss_ext op family (ALGORITHM.md sections 2-3), framework-free.
// Semantics mirror csrc/kernels/cpu/verify.h token for token; only the precision of the
// log-normalisers differs (see stats below), so tokens can differ from the float64
// reference only where rounding moves a decision or a running sum across u * total.
//
// One call is a fixed sequence of launches on one stream, no host sync, fixed shapes:
//   1. stats        grid (batch, num_draft + 1, splits), splits chosen to fill whole waves:
//                   one pass over the logits with 128-bit loads; per block and score stream
//                   (p*, r~, and q, d for log Z) the max and sum of exp; value flags; the
//                   greedy argmax (float64 scores, lowest index on ties).
//   2. truncation   grid (batch, num_draft + 1, {p*, r~}), only with top-k / top-p: the kept
//                   set by radix selection over exact float64 scores (several row passes).
//   3. draw         grid (batch, draw_splits): every block re-derives its row's decisions
//                   from the partials (a warp per position; cheap and deterministic) and
//                   block 0 writes tokens, num_accepted, log_z; then each block sums the
//                   float64 weights of the correction (residual) / bonus distribution of
//                   position j over its vocabulary chunk; the row's last block to finish
//                   picks the chunk where the running mass first exceeds u * total and
//                   rescans that chunk alone (float64 block scan) for the token.
// Greedy calls stop after the decisions (the token is the argmax).
//
// Invalid inputs never cause an out-of-bounds read: a row with a draft id outside [0, V),
// a uniform outside (0, 1), a NaN/+inf logit, an all -inf logits row or no tilted support
// gets num_accepted = -1, tokens all -1 and log_z NaN (the CPU kernels raise instead).
#pragma once

#include "device_utils.cuh"

namespace sss_ext::cuda {

// Score streams of the normaliser pass.
enum Stream : int { kTilted = 0, kProposal = 1, kTargetStream = 2, kRefStream = 3, kNumStreams = 4 };

// Value flags of one (row, position) over the logits rows it reads.
enum Flag : uint32_t {
  kBadTarget = 1u << 0,  // NaN or +inf
  kBadDraft = 1u << 1,
  kBadRef = 1u << 2,
  kSeenTarget = 1u << 3,  // some logit > -inf
  kSeenDraft = 1u << 4,
  kSeenRef = 1u << 5,
};

struct Partial {  // one (row, position, vocabulary split)
  double max[kNumStreams];  // largest score of each stream (natural-log units)
  double sum[kNumStreams];  // sum of exp(score - max)
  double best;              // greedy: largest tilted score
  int64_t best_index;       // its lowest vocabulary index
  uint32_t flags;
  uint32_t unused;
};

// Kept tokens of a truncated distribution (Kept in cpu/row_ops.h): score > threshold, or
// score == threshold and index <= last_index. The default keeps every token.
struct KeptSet {
  double threshold;
  int64_t last_index;
  static __device__ __forceinline__ KeptSet all() { return KeptSet{-kInfD, INT64_MAX}; }
  __device__ __forceinline__ bool contains(double score, int64_t v) const {
    return score > threshold || (score == threshold && v <= last_index);
  }
};

struct Truncation {  // one (row, position, {p*, r~})
  KeptSet kept;
  double log_total;  // log of the sum over kept tokens of exp(score)
};

struct ChunkTotals {  // one (row, vocabulary chunk); [0]: residual (m - r~)+, [1]: p*
  double total[2];           // sum of the weights in the chunk
  double peak[2];            // largest running sum at a token of positive weight (-inf: none)
  int64_t last_positive[2];  // last token of positive weight (-1: none)
};

constexpr int kStatsThreads = 256;
constexpr int kStatsUnroll = 4;
constexpr int kTruncationThreads = 256;
constexpr int kDrawThreads = 256;
constexpr int kMaxSplits = 64;
constexpr int64_t kExactVocab = 4096;  // below: float64 normaliser pass (see stats)

template <typename T>
struct Problem {
  VerifyParams<T> p;
  ScoreParams score;          // float64 scores (temperature 1 when greedy)
  float scale_hi = 0, scale_lo = 0;  // log2(e) / tau = hi + lo, for the fast normaliser pass
  float shift = 1;
  bool greedy = false;
  bool tilt = false;          // has ref and shift != 0
  bool truncated = false;     // top-k or top-p changes the distribution
  bool check_greedy_uniforms = true;  // sample() ignores uniforms when greedy, verify() checks them
  int splits = 1;             // stats blocks per (row, position)
  int draw_splits = 1;        // draw blocks per row
  Partial* partials = nullptr;        // (batch, num_draft + 1, splits)
  Truncation* truncations = nullptr;  // (batch, num_draft + 1, 2)
  ChunkTotals* chunks = nullptr;      // (batch, draw_splits)
  unsigned int* done = nullptr;       // (batch,): chunks finished; zeroed by the stats kernel

  __device__ __forceinline__ int64_t positions() const { return p.num_draft + 1; }
  __device__ __forceinline__ const T* target_row(int64_t b, int64_t i) const { return p.target.row(b, i); }
  // The draft row exists at positions < num_draft, and at num_draft when a ref is given.
  __device__ __forceinline__ const T* draft_row(int64_t b, int64_t i) const {
    return (i < p.num_draft || p.has_ref()) ? p.draft.row(b, i) : nullptr;
  }
  __device__ __forceinline__ const T* ref_row(int64_t b, int64_t i) const { return p.has_ref() ? p.ref.row(b, i) : nullptr; }
};

// ---------------------------------------------------------------------------------------
// 1. stats
//
// Two precisions for the log-normalisers (chosen by vocabulary size at launch):
// - exact (V < kExactVocab): float64 scores as everywhere else, float64 exp and sums;
// - fast: float32 scores; exp2 of fma(x, c_hi, -m) + x * c_lo with c_hi + c_lo = log2(e) / tau
//   (no systematic error from rounding c, argument error ~ ulp of the argument), ex2.approx,
//   float32 sums per 16-byte vector added to float64 accumulators. Random per-token errors
//   average out over large vocabularies.

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: ~2 ulp, exp2(-inf) = 0
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);  // host emulation of the kernels (tests without a GPU)
#endif
}

__device__ __forceinline__ float max_nan(float a, float b) {  // NaN if either is NaN
#if defined(__CUDA_ARCH__)
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
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

// Running (max, sum of exp(score - max)) of one score stream in one thread.
template <bool kExact>
struct Accumulator {
  using Max = std::conditional_t<kExact, double, float>;  // exact: natural units; fast: base 2
  Max max;
  double sum;
};

struct FastScale {  // log2(e) / tau = hi + lo
  float hi, lo;
};

template <int kVec>
__device__ __forceinline__ void accumulate(Accumulator<false>& acc, const float (&x)[kVec], const FastScale& c) {
  float top = x[0];
#pragma unroll
  for (int e = 1; e < kVec; ++e) top = fmaxf(top, x[e]);
  if (!(top > -kInfF)) return;
  const float m = top * c.hi;
  if (m > acc.max) {  // rescale once per vector
    acc.sum = acc.max == -kInfF ? 0.0 : acc.sum * exp2(static_cast<double>(acc.max) - m);
    acc.max = m;
  }
  float sum = 0.0f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float finite = fmaxf(x[e], -3.40282347e38f);  // -inf * c.lo could meet +inf (c.lo < 0)
    sum += fast_exp2(fmaf(finite, c.lo, fmaf(finite, c.hi, -acc.max)));
  }
  acc.sum += sum;
}

template <int kVec>
__device__ __forceinline__ void accumulate(Accumulator<true>& acc, const double (&x)[kVec], const ExpTable& table) {
  double top = x[0];
#pragma unroll
  for (int e = 1; e < kVec; ++e) top = fmax(top, x[e]);
  if (!(top > -kInfD)) return;
  if (top > acc.max) {
    acc.sum = __dmul_rn(acc.sum, fast_exp(acc.max - top, table));  // exp(-inf) = 0
    acc.max = top;
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc.sum = __dadd_rn(acc.sum, fast_exp(x[e] - acc.max, table));
}

// Block-wide (max, sum) of one stream in natural units (every thread gets it).
template <bool kExact>
__device__ __forceinline__ void block_max_sum(Accumulator<kExact> acc, double& max, double& sum, const ExpTable& table, double* scratch) {
  const double kLn2 = 0.69314718055994530942;
  const double own_max = kExact ? static_cast<double>(acc.max) : static_cast<double>(acc.max) * kLn2;
  max = block_reduce<kStatsThreads>(own_max, [](double a, double b) { return fmax(a, b); }, scratch);
  const double own = max == -kInfD || own_max == -kInfD ? 0.0 : acc.sum * fast_exp(own_max - max, table);
  sum = block_reduce<kStatsThreads>(own, [](double a, double b) { return a + b; }, scratch);
}

template <typename T, bool kGreedy, bool kTilt, bool kExact>
__global__ void __launch_bounds__(kStatsThreads) stats_kernel(const Problem<T> pr) {
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
  const int64_t vocab = pr.p.vocab;
  const T* q = pr.target_row(b, i);  // (vocab,) each
  const T* r = pr.draft_row(b, i);
  const T* d = pr.ref_row(b, i);
  const bool proposal_stream = r != nullptr && (i < pr.p.num_draft || kTilt);
  const RowTiling tiling = row_tiling(q, r, d, vocab);
  const int64_t per_split = (tiling.num_vectors + pr.splits - 1) / pr.splits;
  const int64_t begin = split * per_split, end = min(tiling.num_vectors, begin + per_split);
  const FastScale c{pr.scale_hi, pr.scale_lo};
  const float shift = pr.shift;

  Accumulator<kExact> acc[kNumStreams];
#pragma unroll
  for (int s = 0; s < kNumStreams; ++s) acc[s] = Accumulator<kExact>{static_cast<typename Accumulator<kExact>::Max>(-kInfD), 0.0};
  uint32_t flags = 0;
  double best = -kInfD;
  int64_t best_index = INT64_MAX;

  for (int64_t k0 = begin + threadIdx.x; k0 < end; k0 += int64_t(kStatsThreads) * kStatsUnroll) {
    uint4 raw_q[kStatsUnroll], raw_r[kStatsUnroll], raw_d[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {  // issue every load first
      const int64_t k = k0 + int64_t(u) * kStatsThreads;
      if (k >= end) continue;
      const int64_t v0 = tiling.origin + k * kVec;
      raw_q[u] = load_vector(q, v0, vocab, tiling.aligned);
      if (r != nullptr) raw_r[u] = load_vector(r, v0, vocab, tiling.aligned);
      if (d != nullptr) raw_d[u] = load_vector(d, v0, vocab, tiling.aligned);
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      const int64_t k = k0 + int64_t(u) * kStatsThreads;
      if (k >= end) continue;
      const int64_t v0 = tiling.origin + k * kVec;
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
      if constexpr (kGreedy) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const double s = tilted_score(xq[e], xr[e], xd[e], pr.score);
          if (s > best) {
            best = s;
            best_index = v0 + e;
          }
        }
      } else if constexpr (kExact) {
        double x[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[e] = tilted_score(xq[e], xr[e], xd[e], pr.score);
        accumulate(acc[kTilted], x, table);
        if (proposal_stream) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) x[e] = temper(xr[e], pr.score);
          accumulate(acc[kProposal], x, table);
        }
        if constexpr (kTilt) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) x[e] = temper(xq[e], pr.score);
          accumulate(acc[kTargetStream], x, table);
#pragma unroll
          for (int e = 0; e < kVec; ++e) x[e] = temper(xd[e], pr.score);
          accumulate(acc[kRefStream], x, table);
        }
      } else {
        if constexpr (kTilt) {
          float s[kVec];  // untempered tilted logit q + shift * (r - d), -inf where an input is -inf
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float value = xq[e] + shift * (xr[e] - xd[e]);
            s[e] = (xd[e] == -kInfF || value != value) ? -kInfF : value;
          }
          accumulate(acc[kTilted], s, c);
          accumulate(acc[kTargetStream], xq, c);
          accumulate(acc[kRefStream], xd, c);
        } else {
          accumulate(acc[kTilted], xq, c);
        }
        if (proposal_stream) accumulate(acc[kProposal], xr, c);
      }
    }
  }

  const bool writer = threadIdx.x == 0;
  Partial out;
  for (int s = 0; s < kNumStreams; ++s) {
    if constexpr (kGreedy) {
      out.max[s] = -kInfD;
      out.sum[s] = 0.0;
    } else {
      block_max_sum<kExact>(acc[s], out.max[s], out.sum[s], table, scratch);
    }
  }
  out.flags = block_reduce<kStatsThreads>(flags, [](uint32_t a, uint32_t c) { return a | c; }, reinterpret_cast<uint32_t*>(scratch));
  out.best = block_reduce<kStatsThreads>(best, [](double a, double c) { return fmax(a, c); }, scratch);
  out.best_index = block_reduce<kStatsThreads>(best == out.best ? best_index : INT64_MAX, [](int64_t a, int64_t c) { return min(a, c); },
                                               index_scratch);
  out.unused = 0;
  if (writer) pr.partials[row_position * pr.splits + split] = out;
}

// ---------------------------------------------------------------------------------------
// 2. truncation: kept sets of top-k / top-p over exact float64 scores.
//
// Ranking (sss_ext/warp.py): score descending, ties to the lower index. A token's rank key
// is the 96-bit (order_key(score), 0xffffffff - index), larger first, so the kept set
// {rank key >= key of the last kept token} is exactly KeptSet. The last kept token is found
// by a most-significant-digit radix descent (8-bit digits) with shared-memory histograms of
// counts (top-k: the token of rank k - 1) or masses exp(score - max) (top-p: the last token
// whose preceding mass is < top_p * total). Passes stop early once a digit isolates a token.

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
  double mass[256];
  unsigned int min_index[256];
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
  __device__ __forceinline__ double operator()(int64_t v) const {
    if (stream == 1) return temper(load_double(r, v), sp);
    return tilted_score(load_double(q, v), r != nullptr ? load_double(r, v) : -kInfD, d != nullptr ? load_double(d, v) : -kInfD, sp);
  }
};

// Radix descent among candidates (rank key >= floor). by_mass = false: the token of 0-based
// rank `rank`; by_mass = true: the last token whose preceding mass is < top_p * total.
template <typename T>
__device__ RankKey descend(const RowScore<T>& score, int64_t vocab, RankKey floor, RankKey prefix, int start_digit,
                           bool by_mass, uint64_t rank, double top_p, double max_score, TruncationShared& sh) {
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
      sh.mass[j] = 0.0;
      sh.min_index[j] = 0xffffffffu;
    }
    __syncthreads();
    // Warp-aggregated histogram: the lanes of a warp that fall into one bucket add once
    // (scores cluster in few buckets, so plain shared atomics would serialise).
    const int lane = threadIdx.x % kWarp;
    for (int64_t base = 0; base < vocab; base += blockDim.x) {
      const int64_t v = base + threadIdx.x;
      uint32_t bucket = 0xffffffffu;  // no bucket
      double mass = 0.0;
      if (v < vocab) {
        const double s = score(v);
        const RankKey key = rank_key(s, v);
        if (!(key < floor) && prefix_matches(key, current, digit)) {
          bucket = key_digit(key, digit);
          if (by_mass) mass = fast_exp(s - max_score, sh.exp_table);
        }
      }
      const unsigned int peers = __match_any_sync(0xffffffffu, bucket);
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
        if (by_mass) atomicAdd(&sh.mass[bucket], mass);
      }
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
      if (sh.count[chosen] == 1) {  // one token left: its full key
        const unsigned int v = sh.min_index[chosen];
        next = rank_key(score(v), v);
        sh.done = 1;
      }
      sh.prefix = next;
      sh.digit = digit + 1;
      sh.done |= digit + 1 >= 12;
    }
    __syncthreads();
  }
  return sh.prefix;
}

template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_kernel(const Problem<T> pr) {
  const int stream = static_cast<int>(blockIdx.x % 2);
  const int64_t row_position = blockIdx.x / 2;
  const int64_t b = row_position / pr.positions(), i = row_position % pr.positions();
  if (stream == 1 && i >= pr.p.num_draft) return;  // no proposal at the bonus position
  __shared__ TruncationShared sh;
  init_exp_table(sh.exp_table);
  __syncthreads();
  const int64_t vocab = pr.p.vocab;
  const bool tilt = pr.tilt;
  const RowScore<T> score{pr.target_row(b, i), stream == 1 || tilt ? pr.draft_row(b, i) : nullptr,
                          stream == 0 && tilt ? pr.ref_row(b, i) : nullptr, pr.score, stream};

  // Row maximum and the range of score keys (common leading digits are skipped).
  double max_score = -kInfD;
  uint64_t key_max = 0, key_min = ~uint64_t(0);
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const double s = score(v);
    max_score = fmax(max_score, s);
    key_max = max(key_max, order_key(s));
    key_min = min(key_min, order_key(s));
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
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const double s = score(v);
    if (set.contains(s, v)) total += fast_exp(s - max_score, sh.exp_table);
  }
  total = block_reduce<kTruncationThreads>(total, [](double a, double c) { return a + c; }, sh.scratch);
  if (threadIdx.x == 0) pr.truncations[row_position * 2 + stream] = Truncation{set, max_score + log(total)};
}

// ---------------------------------------------------------------------------------------
// 3-4. decisions and the correction/bonus draw

// What one (row, position) contributes to the row's decisions.
struct PositionInfo {
  bool valid;
  bool accept;
  double log_z;
  double log_total_s, log_total_r;  // of p* and r~ (truncated when truncating)
  KeptSet kept_s, kept_r;
  int64_t greedy_token;
};

// The splits' partials of one (row, position) combined; called by a whole warp, the result
// is the same in every lane.
struct Combined {
  double log_total[kNumStreams];  // natural log, untruncated
  uint32_t flags;
  double best;
  int64_t best_index;
};

template <typename T>
__device__ Combined combine_partials(const Problem<T>& pr, int64_t row_position) {
  const Partial* parts = pr.partials + row_position * pr.splits;
  Combined out;
  double max[kNumStreams], sum[kNumStreams];
  for (int s = 0; s < kNumStreams; ++s) {
    max[s] = -kInfD;
    sum[s] = 0.0;
  }
  out.flags = 0;
  out.best = -kInfD;
  out.best_index = INT64_MAX;
  const auto merge = [](double& max, double& sum, double other_max, double other_sum) {
    const double m = fmax(max, other_max);
    if (m == -kInfD) return;
    sum = (max == -kInfD ? 0.0 : sum * exp(max - m)) + (other_max == -kInfD ? 0.0 : other_sum * exp(other_max - m));
    max = m;
  };
  for (int k = threadIdx.x % kWarp; k < pr.splits; k += kWarp) {
    const Partial& part = parts[k];
    out.flags |= part.flags;
    if (part.best > out.best || (part.best == out.best && part.best_index < out.best_index)) {
      out.best = part.best;
      out.best_index = part.best_index;
    }
    for (int s = 0; s < kNumStreams; ++s) merge(max[s], sum[s], part.max[s], part.sum[s]);
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    out.flags |= __shfl_xor_sync(0xffffffffu, out.flags, offset);
    const double other_best = __shfl_xor_sync(0xffffffffu, out.best, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, out.best_index, offset);
    if (other_best > out.best || (other_best == out.best && other_index < out.best_index)) {
      out.best = other_best;
      out.best_index = other_index;
    }
#pragma unroll
    for (int s = 0; s < kNumStreams; ++s) {
      const double other_max = __shfl_xor_sync(0xffffffffu, max[s], offset);
      const double other_sum = __shfl_xor_sync(0xffffffffu, sum[s], offset);
      merge(max[s], sum[s], other_max, other_sum);
    }
  }
  for (int s = 0; s < kNumStreams; ++s) out.log_total[s] = max[s] == -kInfD ? -kInfD : max[s] + log(sum[s]);
  return out;
}

template <typename T>
__device__ PositionInfo position_info(const Problem<T>& pr, int64_t b, int64_t i, const Combined& c) {
  const VerifyParams<T>& p = pr.p;
  PositionInfo out{true, false, 0.0, 0.0, 0.0, KeptSet::all(), KeptSet::all(), -1};
  const int64_t row_position = b * pr.positions() + i;
  const bool has_proposal = i < p.num_draft;
  const T* q = pr.target_row(b, i);
  const T* r = pr.draft_row(b, i);
  const T* d = pr.ref_row(b, i);
  const uint32_t flags = c.flags;
  const double best = c.best;
  const int64_t best_index = c.best_index;
  const double* log_total = c.log_total;

  // Value checks (csrc/kernels/cpu/verify.h: checked_row_max, kNoSupport, check_tokens_and_uniforms).
  out.valid = !(flags & kBadTarget) && (flags & kSeenTarget);
  if (r != nullptr) out.valid &= !(flags & kBadDraft) && (flags & kSeenDraft);
  if (d != nullptr) out.valid &= !(flags & kBadRef) && (flags & kSeenRef);
  out.valid &= pr.greedy ? best > -kInfD && best_index < p.vocab : log_total[kTilted] > -kInfD;
  if (!pr.greedy || pr.check_greedy_uniforms) {
    const double u = p.uniforms[b * p.uniforms_stride_batch + i * p.uniforms_stride_position];
    out.valid &= u > 0.0 && u < 1.0;
  }
  int64_t x = -1;
  if (has_proposal) {
    x = p.draft_tokens[b * p.draft_tokens_stride_batch + i * p.draft_tokens_stride_position];
    out.valid &= x >= 0 && x < p.vocab;
  }
  if (!out.valid) return out;

  if (pr.greedy) {
    out.greedy_token = best_index;
    out.accept = has_proposal && x == best_index;
    return out;
  }
  if (pr.tilt)
    out.log_z = log_total[kTilted] - log_total[kTargetStream] - p.shift * (log_total[kProposal] - log_total[kRefStream]);
  if (pr.truncated) {
    const Truncation* t = pr.truncations + row_position * 2;
    out.kept_s = t[0].kept;
    out.log_total_s = t[0].log_total;
    if (has_proposal) {
      out.kept_r = t[1].kept;
      out.log_total_r = t[1].log_total;
    }
  } else {
    out.log_total_s = log_total[kTilted];
    out.log_total_r = log_total[kProposal];
  }
  if (has_proposal) {
    const double u = p.uniforms[b * p.uniforms_stride_batch + i * p.uniforms_stride_position];
    const double zr = load_double(r, x);
    const double sx = tilted_score(load_double(q, x), zr, d != nullptr ? load_double(d, x) : -kInfD, pr.score);
    const double rx = temper(zr, pr.score);
    const double log_p = out.kept_s.contains(sx, x) ? sx - out.log_total_s : -kInfD;
    const double log_r = out.kept_r.contains(rx, x) ? rx - out.log_total_r : -kInfD;
    const double log_m = p.paper_mode ? log_p + out.log_z : log_p;
    out.accept = log_p > -kInfD && log_r > -kInfD && log(u) < log_m - log_r;
  }
  return out;
}

// The row's outcome, identical in every block that derives it.
struct RowDecision {
  int first_rejection;  // position j of the correction/bonus token
  int invalid;
  PositionInfo at_j;
};

// Derives the row's decisions (one warp per position); when `write` is set, also writes
// num_accepted, log_z and the tokens except the one drawn at j (accepted drafts, the greedy
// token, -1 after; all -1 for an invalid row).
template <typename T, int kThreads>
__device__ void decide_row(const Problem<T>& pr, int64_t b, bool write, RowDecision& out) {
  constexpr int kWarps = kThreads / kWarp;
  const VerifyParams<T>& p = pr.p;
  const int64_t positions = pr.positions();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (threadIdx.x == 0) {
    out.first_rejection = static_cast<int>(p.num_draft);
    out.invalid = 0;
  }
  __syncthreads();
  for (int64_t i = warp; i < positions; i += kWarps) {
    const Combined combined = combine_partials(pr, b * positions + i);
    if (lane != 0) continue;
    const PositionInfo info = position_info(pr, b, i, combined);
    if (!info.valid) atomicOr(&out.invalid, 1);
    if (i < p.num_draft && !info.accept) atomicMin(&out.first_rejection, static_cast<int>(i));
    if (write) p.log_z[b * positions + i] = static_cast<float>(info.log_z);
  }
  __syncthreads();
  const int64_t j = out.first_rejection;
  if (warp == 0 && !out.invalid) {
    const Combined combined = combine_partials(pr, b * positions + j);
    if (lane == 0) out.at_j = position_info(pr, b, j, combined);
  }
  __syncthreads();
  if (!write) return;
  for (int64_t i = threadIdx.x; i < positions; i += kThreads) {
    if (!out.invalid && i == j && !pr.greedy) continue;  // the drawn token: written by draw_token alone
    int64_t token = -1;
    if (!out.invalid && i < j) token = p.draft_tokens[b * p.draft_tokens_stride_batch + i * p.draft_tokens_stride_position];
    if (!out.invalid && i == j) token = out.at_j.greedy_token;
    p.tokens[b * positions + i] = token;
  }
  // log_z of position i was written by lane 0 of warp i % kWarps: overwrite from that thread.
  for (int64_t i = warp; out.invalid && i < positions; i += kWarps)
    if (lane == 0) p.log_z[b * positions + i] = __int_as_float(0x7fc00000);  // NaN
  if (threadIdx.x == 0) p.num_accepted[b] = out.invalid ? -1 : j;
}

// Weights of the correction/bonus distribution at (row b, position j), float64:
// p*(v) = exp(s - log_total_s) on kept tokens; residual (scale * p* - r~)+ at a rejection.
template <typename T>
struct DrawRow {
  const T* q;
  const T* r;
  const T* d;
  RowTiling tiling;
  int64_t vocab;
  ScoreParams sp;
  bool residual;  // j < num_draft
  double scale;   // Z in paper mode, else 1
  PositionInfo info;

  __device__ __forceinline__ DrawRow(const Problem<T>& pr, int64_t b, int64_t j, const PositionInfo& at_j) {
    residual = j < pr.p.num_draft;
    q = pr.target_row(b, j);
    r = (pr.tilt || residual) ? pr.draft_row(b, j) : nullptr;
    d = pr.tilt ? pr.ref_row(b, j) : nullptr;
    tiling = row_tiling(q, r, d, pr.p.vocab);
    vocab = pr.p.vocab;
    sp = pr.score;
    scale = pr.p.paper_mode ? exp(at_j.log_z) : 1.0;
    info = at_j;
  }

  template <int kVec>
  __device__ __forceinline__ void weights(int64_t k, double (&w_p)[kVec], double (&w_res)[kVec], const ExpTable& table) const {
    const int64_t v0 = tiling.origin + k * kVec;
    const uint4 raw_q = load_vector(q, v0, vocab, tiling.aligned);
    const uint4 raw_r = r != nullptr ? load_vector(r, v0, vocab, tiling.aligned) : uint4{};
    const uint4 raw_d = d != nullptr ? load_vector(d, v0, vocab, tiling.aligned) : uint4{};
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = v0 + e;
      const double zq = unpack<T>(raw_q, e);
      const double zr = r != nullptr ? static_cast<double>(unpack<T>(raw_r, e)) : -kInfD;
      const double zd = d != nullptr ? static_cast<double>(unpack<T>(raw_d, e)) : -kInfD;
      const double s = tilted_score(zq, zr, zd, sp);
      w_p[e] = info.kept_s.contains(s, v) ? fast_exp(__dsub_rn(s, info.log_total_s), table) : 0.0;
      w_res[e] = 0.0;
      if (residual) {
        const double rs = temper(zr, sp);
        const double w_r = info.kept_r.contains(rs, v) ? fast_exp(__dsub_rn(rs, info.log_total_r), table) : 0.0;
        w_res[e] = fmax(0.0, __dsub_rn(__dmul_rn(w_p[e], scale), w_r));
      }
    }
  }
};

// Vectors [begin, end) of the row tiling form draw chunk `chunk`.
__device__ __forceinline__ void chunk_range(int64_t num_vectors, int draw_splits, int chunk, int64_t& begin, int64_t& end) {
  const int64_t per_chunk = (num_vectors + draw_splits - 1) / draw_splits;
  begin = min(num_vectors, chunk * per_chunk);
  end = min(num_vectors, begin + per_chunk);
}

struct DrawShared {
  ExpTable exp_table;
  RowDecision decision;
  double scratch[kDrawThreads / kWarp];
  int64_t index_scratch[kDrawThreads / kWarp];
  int chunk;
  int kind;
  int last;
  double prefix;
  double threshold;
  int64_t token;
};

// Running sums over one chunk in a fixed order (tiles of kDrawThreads vectors; inside a tile,
// thread order; inside a thread, vocabulary order), shared by the chunk totals and the final
// rescan so that both compute identical bits. Calls visit(kind, v, running) for every token
// of positive weight; visit returns true to stop after the current tile.
template <typename T, int kVec, class Visit>
__device__ __forceinline__ void scan_chunk(const DrawRow<T>& row, int64_t begin, int64_t end, int kinds, DrawShared& sh,
                                           double (&carry)[2], Visit&& visit) {
  carry[0] = carry[1] = 0.0;
  for (int64_t tile = begin; tile < end; tile += kDrawThreads) {
    const int64_t k = tile + threadIdx.x;
    double w[2][kVec];
    if (k < end) {
      row.weights(k, w[1], w[0], sh.exp_table);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) w[0][e] = w[1][e] = 0.0;
    }
    bool stop = false;
    for (int kind = 0; kind < 2; ++kind) {
      if (!(kinds & (1 << kind))) continue;
      double own = 0.0;
#pragma unroll
      for (int e = 0; e < kVec; ++e) own = __dadd_rn(own, w[kind][e]);
      double tile_total;
      const double exclusive = block_exclusive_sum<kDrawThreads>(own, tile_total, sh.scratch);
      double running = __dadd_rn(carry[kind], exclusive);
      const int64_t v0 = row.tiling.origin + k * kVec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        running = __dadd_rn(running, w[kind][e]);
        if (w[kind][e] > 0.0) stop |= visit(kind, v0 + e, running);
      }
      carry[kind] = __dadd_rn(carry[kind], tile_total);
    }
    if (__syncthreads_or(stop)) break;
  }
}

// Inverse CDF (ALGORITHM.md section 3) over the chunk totals of row b, by the block that
// finished the row last: the first token whose running mass exceeds u * total, else the
// last token of positive mass; the residual unless its mass is 0, then p*.
template <typename T>
__device__ void draw_token(const Problem<T>& pr, int64_t b, const DrawRow<T>& row, DrawShared& sh) {
  constexpr int kVec = Storage<T>::kVec;
  const VerifyParams<T>& p = pr.p;
  const int64_t j = sh.decision.first_rejection;
  if (threadIdx.x == 0) {
    const ChunkTotals* chunks = pr.chunks + b * pr.draw_splits;  // written by other blocks: read through L2
    double residual_total = 0.0;
    for (int c = 0; c < pr.draw_splits && row.residual; ++c) residual_total += __ldcg(&chunks[c].total[0]);
    const int kind = residual_total > 0.0 ? 0 : 1;
    double total = 0.0;
    for (int c = 0; c < pr.draw_splits; ++c) total += __ldcg(&chunks[c].total[kind]);
    const double u = p.uniforms[b * p.uniforms_stride_batch + p.num_draft * p.uniforms_stride_position];
    const double threshold = __dmul_rn(u, total);
    double prefix = 0.0;
    int selected = -1;
    for (int c = 0; c < pr.draw_splits; ++c) {
      if (__dadd_rn(prefix, __ldcg(&chunks[c].peak[kind])) > threshold) {
        selected = c;
        break;
      }
      prefix = __dadd_rn(prefix, __ldcg(&chunks[c].total[kind]));
    }
    int64_t last_positive = -1;
    for (int c = 0; c < pr.draw_splits; ++c) last_positive = max(last_positive, __ldcg(&chunks[c].last_positive[kind]));
    sh.chunk = selected;
    sh.kind = kind;
    sh.prefix = prefix;
    sh.threshold = threshold;
    sh.token = last_positive;
  }
  __syncthreads();
  if (sh.chunk >= 0) {  // rescan the selected chunk: identical running sums, first crossing
    int64_t begin, end;
    chunk_range(row.tiling.num_vectors, pr.draw_splits, sh.chunk, begin, end);
    const double prefix = sh.prefix, threshold = sh.threshold;
    int64_t first = INT64_MAX;
    double carry[2];
    scan_chunk<T, kVec>(row, begin, end, 1 << sh.kind, sh, carry, [&](int, int64_t v, double running) {
      if (first == INT64_MAX && __dadd_rn(prefix, running) > threshold) first = v;
      return first != INT64_MAX;
    });
    first = block_reduce<kDrawThreads>(first, [](int64_t a, int64_t c) { return min(a, c); }, sh.index_scratch);
    if (threadIdx.x == 0 && first != INT64_MAX) sh.token = first;
  }
  if (threadIdx.x == 0) p.tokens[b * pr.positions() + j] = sh.token;
}

// Grid (batch, draw_splits). Decisions and outputs (block 0 of each row), the chunk totals of
// the correction/bonus weights, and the token by whichever block of the row finishes last.
template <typename T>
__global__ void __launch_bounds__(kDrawThreads) draw_kernel(const Problem<T> pr) {
  constexpr int kVec = Storage<T>::kVec;
  __shared__ DrawShared sh;
  const int chunk = static_cast<int>(blockIdx.x % pr.draw_splits);
  const int64_t b = blockIdx.x / pr.draw_splits;
  init_exp_table(sh.exp_table);
  __syncthreads();
  decide_row<T, kDrawThreads>(pr, b, chunk == 0, sh.decision);
  if (sh.decision.invalid || pr.greedy) return;
  const int64_t j = sh.decision.first_rejection;
  const DrawRow<T> row(pr, b, j, sh.decision.at_j);
  int64_t begin, end;
  chunk_range(row.tiling.num_vectors, pr.draw_splits, chunk, begin, end);
  const int kinds = row.residual ? 3 : 2;
  double peak[2] = {-kInfD, -kInfD};
  int64_t last_positive[2] = {-1, -1};
  double carry[2];
  scan_chunk<T, kVec>(row, begin, end, kinds, sh, carry, [&](int kind, int64_t v, double running) {
    peak[kind] = fmax(peak[kind], running);
    last_positive[kind] = max(last_positive[kind], v);
    return false;
  });
  ChunkTotals out;
  for (int kind = 0; kind < 2; ++kind) {
    out.total[kind] = carry[kind];
    out.peak[kind] = block_reduce<kDrawThreads>(peak[kind], [](double a, double c) { return fmax(a, c); }, sh.scratch);
    out.last_positive[kind] =
        block_reduce<kDrawThreads>(last_positive[kind], [](int64_t a, int64_t c) { return max(a, c); }, sh.index_scratch);
  }
  if (threadIdx.x == 0) {
    pr.chunks[b * pr.draw_splits + chunk] = out;
    __threadfence();  // publish the totals before counting this chunk as done
    sh.last = atomicAdd(&pr.done[b], 1u) == static_cast<unsigned int>(pr.draw_splits - 1);
  }
  __syncthreads();
  if (!sh.last) return;
  __threadfence();
  draw_token(pr, b, row, sh);
}

}  // namespace sss_ext::cuda
