// CUDA kernels of the sss_ext op family (docs/algorithm.md §3-§5), framework-free.
// Semantics mirror csrc/kernels/cpu/verify.h token for token; only the precision of the
// log-normalisers differs (see stats below), so tokens can differ from the float64
// reference only where rounding moves a decision or a running sum across u * total
// (the exactness rule in launch.h).
//
// One call is a fixed sequence of launches on one stream, no host sync, fixed shapes:
//   1. stats        grid (batch, num_draft + 1, splits), splits = vocabulary chunks of a
//                   fixed size (the same on every GPU): one pass over the logits with
//                   128-bit loads; per block and score stream (p*, r~, and q, d for log Z)
//                   the max and sum of exp(score - max); value flags; the greedy argmax
//                   (float64 scores, lowest index on ties).
//   2. truncation   only with top-k / top-p: the kept set and its normaliser over exact
//                   float64 scores by bucketed selection (section 2b): grids (batch,
//                   num_draft + 1, {p*, r~}, vocabulary chunks of a fixed size), 16-byte
//                   loads, 2 passes over the logits (histogram, collect), 3 when a boundary
//                   bucket must be split (level-2 histogram) or is one score (one chunk read);
//                   rows it cannot settle fall back to the radix descent (section 2).
//   3. draw         grid (batch, draw_splits): every block re-derives its row's decisions
//                   from the partials (a warp per position; cheap and deterministic) and
//                   block 0 writes tokens, num_accepted, log_z; then each block sums the
//                   float64 weights of the correction (residual) / bonus distribution of
//                   position j over its vocabulary chunk; the row's last block to finish
//                   picks the chunk where the running mass first exceeds u * total and
//                   rescans that chunk alone (float64 block scan) for the token.
// Greedy calls stop after the decisions (the token is the argmax). Every reduction has a
// fixed order, so a call is deterministic run to run.
//
// A ragged row (num_draft_tokens[b] = n < num_draft) skips every block of positions past n.
// Invalid inputs never cause an out-of-bounds read: a row with a count outside [0, num_draft],
// a draft id outside [0, V), a
// uniform outside (0, 1), a NaN/+inf logit, an all -inf logits row, a scaled logit or tilted
// row maximum outside [-kMaxScaledScore, kMaxScaledScore], or no tilted support gets
// num_accepted = -1, tokens all -1 and log_z NaN (the CPU kernels raise instead).
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
  kRangeTarget = 1u << 6,  // a finite logit with |logit / tau| > kMaxScaledScore
  kRangeDraft = 1u << 7,
  kRangeRef = 1u << 8,
  kRangeTilted = 1u << 9,  // a tilted score > kMaxScaledScore (also +inf)
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
  double max;      // row maximum of the score (always kept)
  double log_sum;  // log of the sum over kept tokens of exp(score - max)
};

struct ChunkTotals {  // one (row, vocabulary chunk); [0]: residual, [1]: p*
  double total[2];           // sum of the weights in the chunk
  double peak[2];            // largest running sum at a token of positive weight (-inf: none)
  int64_t last_positive[2];  // last token of positive weight (-1: none)
};

constexpr int kStatsThreads = 256;
constexpr int kStatsUnroll = 2;  // 16-byte loads per stream in flight per thread
constexpr int kStatsMinBlocks = 2;  // resident stats blocks per SM the register budget allows
constexpr int64_t kSplitVectors = 1024;  // 16-byte vectors per stats block: a fixed vocabulary chunk
constexpr int kTruncationThreads = 256;
// Bucketed top-k / top-p selection (section 2 below). Fixed sizes, the same on every GPU.
constexpr int kTruncBuckets = 2048;           // histogram buckets per (row, position, stream)
constexpr double kBucketScale = 32.0;         // linear buckets per unit of (row max - score)
constexpr int kTruncCandidates = 2048;        // candidates resolved in shared memory (a power of 2)
constexpr double kMassScale = 4294967296.0;   // 2^32: histogram masses floor(min(m, 1) * 2^32)
constexpr double kPlanSlack = 1e-9;           // relative slack of the top-p target bounds in the plan
constexpr int64_t kTruncChunkVectors = 2048;  // 16-byte vectors per histogram / collect block
constexpr int kDrawThreads = 256;
constexpr int kMaxDrawSplits = 64;
constexpr int64_t kExactVocab = 4096;  // below: float64 exp in the normaliser pass (see stats)

// Bucketed selection workspace (section 2).
struct TruncHist {  // one (row, position, stream): integer counts and masses, zeroed each call
  unsigned int count[kTruncBuckets];
  unsigned long long mass[kTruncBuckets];  // sum of floor(min(exp(score - max), 1) * kMassScale)
};

enum TruncMode : int {
  kCollect = 0,      // <= kTruncCandidates candidates: collected and sorted
  kTies = 1,         // one bucket with more candidates: settled by index if they share one score
  kRadix = 2,        // the radix descent (radix_truncation)
  kRefine = 3,       // level 1, one linear bucket with more candidates: level-2 histogram of it
  kTiesCounted = 4,  // kTies whose chunk sums and counts the level-2 histogram pass produced
};

struct TruncPlan {  // one (row, position, stream), written by the plan kernels
  int mode;
  int level;       // 1: buckets are score_bucket; 2: sub-buckets of level-1 bucket `refined`
  int refined;
  int p_lo, p_hi;  // buckets that may hold the top-p boundary (kb, kb without top-p)
  int kb;          // bucket of the top-k boundary (>= kTruncBuckets: none in this histogram)
  unsigned long long count_above;  // tokens in buckets before kb
  unsigned long long members;      // tokens in [p_lo, p_hi] and kb
  unsigned long long members_k;    // of which in kb when kb > p_hi (a separate candidate group)
  unsigned long long below;        // tokens in buckets after p_hi
  unsigned int filled, filled_k;   // candidates written so far (collect): [p_lo, p_hi], kb > p_hi
};

struct TruncChunk {  // one (row, position, stream, chunk), written by truncation_collect_kernel
  double above;      // sum of exp(score - max) over buckets before p_lo
  double mid;        // ... over buckets after p_hi and before kb
  unsigned long long key_min, key_max, members;  // order keys and count of the planned buckets' tokens
};

struct Candidate {
  unsigned long long key;  // order_key(score)
  unsigned int index;
  unsigned int unused;
};

template <typename T>
struct Problem {
  VerifyParams<T> p;
  ScoreParams score;       // float64 scores (temperature 1 when greedy)
  bool greedy = false;
  bool tilt = false;       // has ref and shift != 0
  bool truncated = false;  // top-k or top-p changes the distribution
  int splits = 1;          // stats blocks per (row, position)
  int draw_splits = 1;     // draw blocks per row
  Partial* partials = nullptr;        // (batch, num_draft + 1, splits)
  Truncation* truncations = nullptr;  // (batch, num_draft + 1, 2)
  ChunkTotals* chunks = nullptr;      // (batch, draw_splits)
  unsigned int* done = nullptr;       // (batch,): chunks finished; zeroed by the stats kernel
  int trunc_chunks = 1;               // histogram / collect blocks per (row, position, stream)
  TruncHist* hist = nullptr;          // (2, batch, num_draft + 1, 2): levels 1 and 2, zeroed by truncation_zero_kernel
  TruncPlan* plans = nullptr;         // (batch, num_draft + 1, 2)
  TruncChunk* trunc_parts = nullptr;  // (batch, num_draft + 1, 2, trunc_chunks)
  Candidate* candidates = nullptr;    // (batch, num_draft + 1, 2, 2 groups, kTruncCandidates)

  __device__ __forceinline__ int64_t positions() const { return p.num_draft + 1; }
  // Row b's draft count n: positions 0..n are its only ones (n is the bonus position), nothing
  // past it is read. An out-of-range count reads as 0 and decide_row marks the row invalid.
  __device__ __forceinline__ int64_t num_draft(int64_t b) const {
    const int64_t n = p.row_draft(b);
    return p.valid_row_draft(n) ? n : 0;
  }
  __device__ __forceinline__ const T* target_row(int64_t b, int64_t i) const { return p.target.row(b, i); }
  // The draft row exists at the row's draft positions, and at its bonus position when a ref is given.
  __device__ __forceinline__ const T* draft_row(int64_t b, int64_t i) const {
    return (i < num_draft(b) || p.has_ref()) ? p.draft.row(b, i) : nullptr;
  }
  // The ref row, whenever the launch keeps it: at shift 0 the launcher drops the ref (p* = warp(q),
  // Z = 1), so it is neither read nor checked.
  __device__ __forceinline__ const T* ref_row(int64_t b, int64_t i) const { return p.has_ref() ? p.ref.row(b, i) : nullptr; }
  __device__ __forceinline__ double uniform(int64_t b, int64_t i) const {
    return p.uniforms[b * p.uniforms_stride_batch + i * p.uniforms_stride_position];
  }
  __device__ __forceinline__ int64_t draft_token(int64_t b, int64_t i) const {
    return p.draft_tokens[b * p.draft_tokens_stride_batch + i * p.draft_tokens_stride_position];
  }
};

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
  const int64_t num_draft = pr.num_draft(b);
  if (i > num_draft) return;  // past the row's bonus position: never read
  const int64_t vocab = pr.p.vocab;
  const T* q = pr.target_row(b, i);  // (vocab,) each
  const T* r = pr.draft_row(b, i);
  const T* d = pr.ref_row(b, i);
  const int skew_q = row_skew(q), skew_r = row_skew(r), skew_d = row_skew(d);
  const bool proposal_stream = r != nullptr && (i < num_draft || kTilt);
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

// ---------------------------------------------------------------------------------------
// 2. truncation: kept sets of top-k / top-p over exact float64 scores. The radix descent below
// (radix_truncation) is the fallback of the bucketed selection of section 2b; both give the
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

// ---------------------------------------------------------------------------------------
// 2b. Bucketed selection: the kept set in a constant number of passes over the logits.
//
// The vocabulary is split into fixed chunks of kTruncChunkVectors 16-byte vectors (per-stream
// misalignment handled by load_vector). Launches, grid (row, position, stream[, chunk]):
//   zero       zeroes the integer histograms (the workspace needs no initialisation);
//   histogram  read 1: per token, bucket = score_bucket(score, row max), a non-increasing
//              function of the score (equal scores share a bucket); integer atomics add the
//              count and the integer mass floor(min(exp(score - max), 1) * 2^32), so the
//              histogram is the same whatever the order of the atomics;
//   plan       one thread scans the buckets in descending score order: kb, the bucket of the
//              top-k boundary (exact counts), and [p_lo, p_hi], every bucket that can hold the
//              top-p boundary given the bounds q <= 2^32 m < q + 1 of the integer masses (the
//              target top_p * W uses the top-k mass W, itself bounded);
//   refine     read 2, only when [p_lo, p_hi] is one linear or tail bucket B with more than
//              kTruncCandidates tokens (and kb is B or absent): a level-2 histogram of B by
//              the next 11 bits of max - score, with B's per-chunk sums and counts; plan2
//              plans again in level-2 buckets (plan_key) -- or, when B holds one score, goes
//              to the tie path with those counts;
//   collect    read 2 (3 after refine): exact float64 sums of exp(score - max) over the buckets
//              before p_lo (`above`) and between p_hi and kb (`mid`), per chunk (block
//              reductions in a fixed order); the tokens of [p_lo, p_hi], and of kb when it
//              lies after p_hi, go to two candidate lists of kTruncCandidates each (slot order
//              varies, the resolve sorts them; a kb of -inf scores has mass 0 and is counted,
//              not collected);
//   resolve    per (row, position, stream): sorts each list by (score desc, index asc) and
//              applies the rule of docs/algorithm.md section 2: top-k keeps rank
//              k - 1 - (tokens before kb) of kb (kKeep: and the candidates tied with it, all in
//              kb and next in the sorted list); top-p keeps a candidate iff above + the mass
//              of the candidates ranked before it is < top_p * W, W = above + [p_lo, p_hi]'s
//              top-k candidates + mid + kb's top-k candidates; it checks that the boundary
//              lies among the candidates (else the radix descent decides). The normaliser is
//              above + the kept candidates' masses: no further pass.
// Tie path: a planned bucket of more than kTruncCandidates tokens of one score (constant or
// low-precision rows) is settled by counting: the kept rank r follows from the common mass m
// (above + j m < target, a binary search; kKeep: the top-k rank is the bucket's last), the
// per-chunk counts locate r's chunk, and the resolve block reads that one chunk for the r-th
// index (no read when r is the bucket's last token: the whole score is kept). Anything else
// beyond the capacity (several scores in one level-2 bucket; two overflowing buckets; the last
// finite bucket, d >= ~2^64) falls back to radix_truncation.
//
// Passes over a logits row: 2 (histogram, collect); 3 with the refinement, or on the tie path
// (histogram, refine, one chunk); 3 plus one chunk for a tie found at level 2; the radix
// fallback adds its own (key range, digits, normaliser). Masses are summed in a fixed order
// (chunks in order, block reductions, candidates in rank order) rather than the reference's
// rank order over the whole row, so a kept set can differ from sss_ext.warp.kept_mask only
// where float64 rounding of those sums moves top_p * W across a partial sum -- a boundary
// within float rounding, covered by the exactness rule in launch.h.

// Non-increasing in the score; equal scores give equal buckets. d = max - score (float64):
// kLinearBuckets linear buckets of width 1 / kBucketScale (exact scaling by a power of two),
// then kTailBucketsPerOctave buckets per octave of d (its exponent and leading mantissa bits),
// the last finite bucket kTruncBuckets - 2 catching the rest, and kTruncBuckets - 1 for -inf
// (and NaN, on invalid rows).
constexpr int kLinearBuckets = 1536;  // d < kLinearBuckets / kBucketScale = 48
constexpr int kTailShift = 49;        // bits(d) >> 49: exponent and 3 mantissa bits, 8 buckets per octave

__device__ __forceinline__ int score_bucket(double score, double max_score) {
  const double d = __dsub_rn(max_score, score);
  if (!(d < kInfD)) return kTruncBuckets - 1;
  const double scaled = __dmul_rn(d, kBucketScale);
  if (scaled < static_cast<double>(kLinearBuckets)) return scaled > 0.0 ? static_cast<int>(scaled) : 0;
  const uint64_t tail = (static_cast<uint64_t>(__double_as_longlong(d)) >> kTailShift) -
                        (static_cast<uint64_t>(__double_as_longlong(kLinearBuckets / kBucketScale)) >> kTailShift);
  return kLinearBuckets + static_cast<int>(min(tail, static_cast<uint64_t>(kTruncBuckets - 2 - kLinearBuckets)));
}

__device__ __forceinline__ unsigned long long fixed_mass(double mass) {
  return __double2ull_rz(__dmul_rn(fmin(mass, 1.0), kMassScale));
}

// Level 2: level-1 bucket `bucket` (< kTruncBuckets - 2) split by the next 11 bits of d: of
// d * kBucketScale in a linear bucket (the fraction, exact, scaled by a power of two), of the
// mantissa of d in a tail bucket. Non-increasing in the score within the bucket.
__device__ __forceinline__ int sub_bucket(double score, double max_score, int bucket) {
  const double d = __dsub_rn(max_score, score);
  if (bucket >= kLinearBuckets) return static_cast<int>((static_cast<uint64_t>(__double_as_longlong(d)) >> (kTailShift - 11)) & 2047u);
  const double frac = __dmul_rn(__dsub_rn(__dmul_rn(d, kBucketScale), static_cast<double>(bucket)), static_cast<double>(kTruncBuckets));
  return frac > 0.0 ? static_cast<int>(fmin(frac, static_cast<double>(kTruncBuckets - 1))) : 0;
}

// A token's bucket in the plan's histogram: level 1, score_bucket; level 2, the sub-bucket in
// the refined bucket, -1 before it and kTruncBuckets after it. Non-increasing in the score.
__device__ __forceinline__ int plan_key(double score, double max_score, const TruncPlan& plan) {
  const int bucket = score_bucket(score, max_score);
  if (plan.level == 1) return bucket;
  if (bucket != plan.refined) return bucket < plan.refined ? -1 : kTruncBuckets;
  return sub_bucket(score, max_score, bucket);
}

// The stream's row maximum from the stats partials (max is exact: any order gives the same).
template <typename T>
__device__ __forceinline__ double stream_max(const Problem<T>& pr, int64_t row_position, int stream, double* scratch) {
  const Partial* parts = pr.partials + row_position * pr.splits;
  const int s = stream == 0 ? kTilted : kProposal;
  double m = -kInfD;
  for (int k = threadIdx.x; k < pr.splits; k += kTruncationThreads) m = fmax(m, parts[k].max[s]);
  return block_reduce<kTruncationThreads>(m, [](double a, double c) { return fmax(a, c); }, scratch);
}

template <typename T>
__device__ __forceinline__ RowScore<T> row_score(const Problem<T>& pr, int64_t row_position, int stream) {
  const int64_t b = row_position / pr.positions(), i = row_position % pr.positions();
  return RowScore<T>(pr.target_row(b, i), stream == 1 || pr.tilt ? pr.draft_row(b, i) : nullptr,
                     stream == 0 && pr.tilt ? pr.ref_row(b, i) : nullptr, pr.score, stream, pr.p.vocab);
}

// (row, position, stream) of a block of a grid (row, position, stream[, chunk]); false when the
// stream does not exist (no proposal at the bonus position, nothing past it).
template <typename T>
__device__ __forceinline__ bool truncation_block(const Problem<T>& pr, int per_stream, int64_t& rs, int& chunk) {
  chunk = static_cast<int>(blockIdx.x % per_stream);
  rs = blockIdx.x / per_stream;
  const int64_t b = (rs / 2) / pr.positions(), i = (rs / 2) % pr.positions();
  const int64_t num_draft = pr.num_draft(b);
  return i <= num_draft && !(rs % 2 == 1 && i == num_draft);
}

// Block-local histograms live in shared memory as a TruncHist: cleared, filled with integer
// atomics (order-independent), then added into the row's global histogram or loaded from it.
__device__ __forceinline__ void clear_hist(TruncHist& local) {
  for (int j = threadIdx.x; j < kTruncBuckets; j += kTruncationThreads) {
    local.count[j] = 0;
    local.mass[j] = 0;
  }
}

__device__ __forceinline__ void add_to_hist(TruncHist& local, int bucket, double mass) {
  atomicAdd(&local.count[bucket], 1u);
  const unsigned long long q = fixed_mass(mass);
  if (q != 0) atomicAdd(&local.mass[bucket], q);
}

// After a barrier: every thread adds its share of the buckets.
__device__ __forceinline__ void add_hist_to(const TruncHist& local, TruncHist& global) {
  for (int j = threadIdx.x; j < kTruncBuckets; j += kTruncationThreads) {
    if (local.count[j] == 0) continue;
    atomicAdd(&global.count[j], local.count[j]);
    if (local.mass[j] != 0) atomicAdd(&global.mass[j], local.mass[j]);
  }
}

// Ends with a barrier: the whole block sees the loaded histogram.
__device__ __forceinline__ void load_hist(const TruncHist& global, TruncHist& local) {
  for (int j = threadIdx.x; j < kTruncBuckets; j += kTruncationThreads) {
    local.count[j] = global.count[j];
    local.mass[j] = global.mass[j];
  }
  __syncthreads();
}

// Grid: 2 x (row, position, stream), the level-1 then the level-2 histograms.
template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_zero_kernel(const Problem<T> pr) {
  static_assert(sizeof(TruncHist) % sizeof(unsigned long long) == 0, "TruncHist is zeroed in 8-byte words");
  unsigned long long* words = reinterpret_cast<unsigned long long*>(pr.hist + blockIdx.x);
  for (int w = threadIdx.x; w < static_cast<int>(sizeof(TruncHist) / sizeof(unsigned long long)); w += kTruncationThreads) words[w] = 0;
}

template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_histogram_kernel(const Problem<T> pr) {
  constexpr int kVec = Storage<T>::kVec;
  __shared__ ExpTable table;
  __shared__ TruncHist local;
  __shared__ double scratch[kTruncationThreads / kWarp];
  int64_t rs;
  int chunk;
  if (!truncation_block(pr, pr.trunc_chunks, rs, chunk)) return;
  init_exp_table(table);
  clear_hist(local);
  const double max_score = stream_max(pr, rs / 2, static_cast<int>(rs % 2), scratch);  // barriers: table, zeros
  const RowScore<T> score = row_score(pr, rs / 2, static_cast<int>(rs % 2));
  const int64_t vocab = pr.p.vocab;
  const int64_t begin = chunk * kTruncChunkVectors, end = min(num_vectors<T>(vocab), begin + kTruncChunkVectors);
  for (int64_t k = begin + threadIdx.x; k < end; k += kTruncationThreads) {
    double s[kVec];
    score.vector(k, s);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (k * kVec + e >= vocab) break;
      add_to_hist(local, score_bucket(s[e], max_score), fast_exp(__dsub_rn(s[e], max_score), table));
    }
  }
  __syncthreads();
  add_hist_to(local, pr.hist[rs]);
}

// What lies outside the histogram a plan scans: nothing at level 1; at level 2 (refining
// level-1 bucket B) the tokens of the buckets before B and, when no top-k boundary lies in B,
// the buckets after it (all in the top-k set).
struct PlanBase {
  unsigned long long count0 = 0, mass0_lo = 0, mass0_hi = 0;  // before: tokens, integer mass bounds
  unsigned long long tail_count = 0, tail_lo = 0, tail_hi = 0;  // after (kb none)
  bool top_k = false;  // the top-k boundary lies in this histogram
  int kb_none = kTruncBuckets;  // kb when it does not
};

// One thread: kb, the bucket of the top-k boundary (exact counts), and [p_lo, p_hi], every
// bucket that can hold the top-p boundary given q <= 2^32 m < q + 1 for the integer masses.
__device__ inline void make_plan(const unsigned int* count, const unsigned long long* mass, const Sampling& sampling, const PlanBase& base,
                                 TruncPlan& plan) {
  int kb = base.kb_none;
  unsigned long long count_above = 0;
  if (base.top_k) {
    const unsigned long long rank = static_cast<unsigned long long>(sampling.top_k - 1);
    unsigned long long running = base.count0;
    for (int b = 0; b < kTruncBuckets; ++b) {
      if (running + count[b] > rank) {
        kb = b;
        count_above = running;
        break;
      }
      running += count[b];
    }
  }
  const bool found = kb < kTruncBuckets;
  const int last = found ? kb : kTruncBuckets - 1;
  int p_lo = kb, p_hi = kb;
  if (sampling.top_p < 1.0) {
    unsigned long long w_lo = base.mass0_lo, w_hi = base.mass0_hi;  // bounds of 2^32 W (W: the top-k mass)
    for (int b = 0; b < (found ? kb : kTruncBuckets); ++b) w_lo += mass[b];
    for (int b = 0; b <= last; ++b) w_hi += mass[b] + count[b];
    if (!found) {
      w_lo += base.tail_lo;
      w_hi += base.tail_hi;
    }
    const double t_lo = __dsub_rn(__dmul_rn(__dmul_rn(sampling.top_p, __ull2double_rn(w_lo)), 1.0 - kPlanSlack), 2.0);
    const double t_hi = __dadd_rn(__dmul_rn(__dmul_rn(sampling.top_p, __ull2double_rn(w_hi)), 1.0 + kPlanSlack), 2.0);
    p_lo = p_hi = -1;
    unsigned long long below_lo = base.mass0_lo, below_hi = base.mass0_hi;  // bounds of the mass before bucket b
    for (int b = 0; b <= last; ++b) {
      const unsigned long long through_hi = below_hi + mass[b] + count[b];
      if (count[b] != 0) {
        if (p_lo < 0 && __ull2double_rn(through_hi) >= t_lo) p_lo = b;  // first bucket that can reach the target
        if (__ull2double_rn(below_lo) < t_hi) p_hi = b;                  // last bucket that can start below it
      }
      below_lo += mass[b];
      below_hi = through_hi;
    }
    if (p_lo < 0) p_lo = p_hi;
    p_hi = max(p_hi, p_lo);
  }
  plan.kb = kb;
  plan.count_above = count_above;
  plan.p_lo = p_lo;
  plan.p_hi = p_hi;
  plan.members = 0;
  plan.below = base.tail_count;
  for (int b = max(p_lo, 0); b <= p_hi && b < kTruncBuckets; ++b) plan.members += count[b];
  plan.members_k = found && kb > p_hi ? count[kb] : 0;
  plan.members += plan.members_k;
  for (int b = max(p_hi + 1, 0); b < kTruncBuckets; ++b) plan.below += count[b];
  const bool one_bucket = p_lo == p_hi && (kb == p_hi || !found);
  const bool minus_inf_k = base.kb_none == kTruncBuckets && kb == kTruncBuckets - 1;  // level 1: the -inf bucket
  if (p_lo < 0 || plan.members == 0) {
    plan.mode = kRadix;
  } else if (plan.members - plan.members_k <= kTruncCandidates && (plan.members_k <= kTruncCandidates || minus_inf_k)) {
    plan.mode = kCollect;  // each group fits (a -inf kb group is not collected: its mass is 0)
  } else if (one_bucket && base.kb_none == kTruncBuckets && p_lo < kTruncBuckets - 2) {
    plan.mode = kRefine;  // level 1, a linear bucket: split it by the next bits of max - score
  } else {
    plan.mode = one_bucket ? kTies : kRadix;
  }
  plan.filled = 0;
  plan.filled_k = 0;
}

template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_plan_kernel(const Problem<T> pr) {
  __shared__ TruncHist local;
  int64_t rs;
  int unused_chunk;
  if (!truncation_block(pr, 1, rs, unused_chunk)) return;
  load_hist(pr.hist[rs], local);
  if (threadIdx.x != 0) return;
  PlanBase base;
  base.top_k = pr.p.sampling.top_k > 0 && pr.p.sampling.top_k < pr.p.vocab;
  TruncPlan plan;
  make_plan(local.count, local.mass, pr.p.sampling, base, plan);
  plan.level = 1;
  plan.refined = -1;
  pr.plans[rs] = plan;
}

// Level-2 histogram of the refined bucket B = plan.p_lo (mode kRefine), and the per-chunk sums
// and counts of a level-1 plan with candidates B: when B holds one score, the tie path needs
// no collect pass.
template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_refine_kernel(const Problem<T> pr) {
  constexpr int kVec = Storage<T>::kVec;
  __shared__ ExpTable table;
  __shared__ TruncHist local;
  __shared__ double scratch[kTruncationThreads / kWarp];
  int64_t rs;
  int chunk;
  if (!truncation_block(pr, pr.trunc_chunks, rs, chunk)) return;
  const TruncPlan plan = pr.plans[rs];
  if (plan.mode != kRefine) return;
  init_exp_table(table);
  clear_hist(local);
  const double max_score = stream_max(pr, rs / 2, static_cast<int>(rs % 2), scratch);  // barriers: table, zeros
  const RowScore<T> score = row_score(pr, rs / 2, static_cast<int>(rs % 2));
  const int64_t vocab = pr.p.vocab;
  const int64_t begin = chunk * kTruncChunkVectors, end = min(num_vectors<T>(vocab), begin + kTruncChunkVectors);
  const int refined = plan.p_lo;
  const bool tail = plan.kb >= kTruncBuckets;  // no top-k boundary: the buckets after B are in the top-k set
  double above = 0.0, mid = 0.0;
  unsigned long long members = 0, key_min = ~0ull, key_max = 0;
  for (int64_t k = begin + threadIdx.x; k < end; k += kTruncationThreads) {
    double s[kVec];
    score.vector(k, s);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (k * kVec + e >= vocab) break;
      const int bucket = score_bucket(s[e], max_score);
      const double m = fast_exp(__dsub_rn(s[e], max_score), table);
      if (bucket < refined) {
        above = __dadd_rn(above, m);
      } else if (bucket > refined) {
        if (tail) mid = __dadd_rn(mid, m);
      } else {
        add_to_hist(local, sub_bucket(s[e], max_score, bucket), m);
        const unsigned long long key = order_key(s[e]);
        ++members;
        key_min = min(key_min, key);
        key_max = max(key_max, key);
      }
    }
  }
  __syncthreads();
  add_hist_to(local, pr.hist[pr.p.batch * pr.positions() * 2 + rs]);  // level-2 histograms follow level 1
  TruncChunk out;
  out.above = block_reduce<kTruncationThreads>(above, [](double a, double c) { return __dadd_rn(a, c); }, scratch);
  out.mid = block_reduce<kTruncationThreads>(mid, [](double a, double c) { return __dadd_rn(a, c); }, scratch);
  auto* words = reinterpret_cast<unsigned long long*>(scratch);
  out.members = block_reduce<kTruncationThreads>(members, [](unsigned long long a, unsigned long long c) { return a + c; }, words);
  out.key_min = block_reduce<kTruncationThreads>(key_min, [](unsigned long long a, unsigned long long c) { return min(a, c); }, words);
  out.key_max = block_reduce<kTruncationThreads>(key_max, [](unsigned long long a, unsigned long long c) { return max(a, c); }, words);
  if (threadIdx.x == 0) pr.trunc_parts[rs * pr.trunc_chunks + chunk] = out;
}

// The level-2 plan of a kRefine row (or the tie path when the refined bucket holds one score).
template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_plan2_kernel(const Problem<T> pr) {
  __shared__ TruncHist local;
  int64_t rs;
  int unused_chunk;
  if (!truncation_block(pr, 1, rs, unused_chunk)) return;
  const TruncPlan plan1 = pr.plans[rs];
  if (plan1.mode != kRefine) return;
  const TruncHist& level1 = pr.hist[rs];
  const TruncHist& level2 = pr.hist[pr.p.batch * pr.positions() * 2 + rs];
  load_hist(level2, local);
  if (threadIdx.x != 0) return;
  const TruncChunk* parts = pr.trunc_parts + rs * pr.trunc_chunks;
  unsigned long long key_min = ~0ull, key_max = 0, members = 0;
  for (int k = 0; k < pr.trunc_chunks; ++k) {
    key_min = min(key_min, parts[k].key_min);
    key_max = max(key_max, parts[k].key_max);
    members += parts[k].members;
  }
  if (key_min == key_max && members == plan1.members) {
    TruncPlan plan = plan1;
    plan.mode = kTiesCounted;
    pr.plans[rs] = plan;
    return;
  }
  const int refined = plan1.p_lo;
  PlanBase base;
  for (int b = 0; b < kTruncBuckets; ++b) {
    const unsigned long long n = level1.count[b], q = level1.mass[b];
    if (b < refined) {
      base.count0 += n;
      base.mass0_lo += q;
      base.mass0_hi += q + n;
    } else if (b > refined) {
      base.tail_count += n;
      base.tail_lo += q;
      base.tail_hi += q + n;
    }
  }
  base.top_k = plan1.kb == refined;
  base.kb_none = kTruncBuckets + 1;
  TruncPlan plan;
  make_plan(local.count, local.mass, pr.p.sampling, base, plan);
  plan.level = 2;
  plan.refined = refined;
  pr.plans[rs] = plan;
}

// The fields of a plan that say which bucket a token falls in, without `filled` / `filled_k`,
// which other collect blocks of the stream increment concurrently.
__device__ __forceinline__ TruncPlan bucket_plan(const TruncPlan& plan) {
  TruncPlan out{};
  out.mode = plan.mode;
  out.level = plan.level;
  out.refined = plan.refined;
  out.p_lo = plan.p_lo;
  out.p_hi = plan.p_hi;
  out.kb = plan.kb;
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_collect_kernel(const Problem<T> pr) {
  constexpr int kVec = Storage<T>::kVec;
  __shared__ ExpTable table;
  __shared__ double scratch[kTruncationThreads / kWarp];
  int64_t rs;
  int chunk;
  if (!truncation_block(pr, pr.trunc_chunks, rs, chunk)) return;
  const TruncPlan plan = bucket_plan(pr.plans[rs]);
  if (plan.mode != kCollect && plan.mode != kTies) return;
  init_exp_table(table);
  const double max_score = stream_max(pr, rs / 2, static_cast<int>(rs % 2), scratch);
  const RowScore<T> score = row_score(pr, rs / 2, static_cast<int>(rs % 2));
  const int64_t vocab = pr.p.vocab;
  const int64_t begin = chunk * kTruncChunkVectors, end = min(num_vectors<T>(vocab), begin + kTruncChunkVectors);
  double above = 0.0, mid = 0.0;
  unsigned long long members = 0, key_min = ~0ull, key_max = 0;
  Candidate* candidates = pr.candidates + rs * 2 * kTruncCandidates;  // [p_lo, p_hi], then kb > p_hi
  for (int64_t k = begin + threadIdx.x; k < end; k += kTruncationThreads) {
    double s[kVec];
    score.vector(k, s);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = k * kVec + e;
      if (v >= vocab) break;
      const int bucket = plan_key(s[e], max_score, plan);
      if (bucket < plan.p_lo) above = __dadd_rn(above, fast_exp(__dsub_rn(s[e], max_score), table));
      if (bucket > plan.p_hi && bucket < plan.kb) mid = __dadd_rn(mid, fast_exp(__dsub_rn(s[e], max_score), table));
      if ((bucket >= plan.p_lo && bucket <= plan.p_hi) || bucket == plan.kb) {
        const unsigned long long key = order_key(s[e]);
        ++members;
        key_min = min(key_min, key);
        key_max = max(key_max, key);
        const bool in_p = bucket >= plan.p_lo && bucket <= plan.p_hi;
        if (plan.mode == kCollect && (in_p || plan.level != 1 || plan.kb != kTruncBuckets - 1)) {
          const unsigned int slot = atomicAdd(in_p ? &pr.plans[rs].filled : &pr.plans[rs].filled_k, 1u);
          if (slot < kTruncCandidates) candidates[(in_p ? 0 : kTruncCandidates) + slot] = Candidate{key, static_cast<unsigned int>(v), 0u};
        }
      }
    }
  }
  TruncChunk out;
  out.above = block_reduce<kTruncationThreads>(above, [](double a, double c) { return __dadd_rn(a, c); }, scratch);
  out.mid = block_reduce<kTruncationThreads>(mid, [](double a, double c) { return __dadd_rn(a, c); }, scratch);
  auto* words = reinterpret_cast<unsigned long long*>(scratch);
  out.members = block_reduce<kTruncationThreads>(members, [](unsigned long long a, unsigned long long c) { return a + c; }, words);
  out.key_min = block_reduce<kTruncationThreads>(key_min, [](unsigned long long a, unsigned long long c) { return min(a, c); }, words);
  out.key_max = block_reduce<kTruncationThreads>(key_max, [](unsigned long long a, unsigned long long c) { return max(a, c); }, words);
  if (threadIdx.x == 0) pr.trunc_parts[rs * pr.trunc_chunks + chunk] = out;
}

struct CandidateShared {
  unsigned long long key[kTruncCandidates];
  unsigned int index[kTruncCandidates];
  double mass[kTruncCandidates];
  unsigned char flags[kTruncCandidates];  // kInP: bucket in [p_lo, p_hi]; kInK: bucket == kb
};

constexpr unsigned char kInP = 1, kInK = 2;

union ResolveShared {
  TruncationShared radix;
  CandidateShared cand;
};

// Candidate a ranks before candidate c: score descending, ties to the lower index.
__device__ __forceinline__ bool ranks_before(const CandidateShared& sh, int a, int c) {
  return sh.key[a] > sh.key[c] || (sh.key[a] == sh.key[c] && sh.index[a] < sh.index[c]);
}

// Kept set among the sorted candidates (thread 0). False: the boundary is not among them.
// `k_sum`: with a separate kb group (plan.members_k > 0), the mass of its kept tokens (the top-k
// set's last ones), summed in rank order; the candidates are then the [p_lo, p_hi] group alone.
template <typename T>
__device__ bool resolve_candidates(const Problem<T>& pr, const TruncPlan& plan, int n, double above, double mid, double k_sum,
                                   double max_score, const CandidateShared& sh, Truncation& out) {
  const Sampling& sampling = pr.p.sampling;
  const int kb = plan.kb, p_hi = plan.p_hi;
  const auto in_k = [&](int j) { return (sh.flags[j] & kInK) != 0; };
  const auto in_p = [&](int j) { return (sh.flags[j] & kInP) != 0; };
  const bool split = plan.members_k > 0;
  int last_k = n - 1;
  if (kb < kTruncBuckets && !split) {
    const unsigned long long r = static_cast<unsigned long long>(sampling.top_k - 1) - plan.count_above;
    unsigned long long seen = 0;
    last_k = -1;
    for (int j = 0; j < n; ++j) {
      if (!in_k(j)) continue;
      if (seen == r) {
        last_k = j;
        break;
      }
      ++seen;
    }
    if (last_k < 0) return false;
    // Tokens tied with the k-th largest score share its bucket and follow it in the sorted list.
    while (sampling.keeps_ties() && last_k + 1 < n && sh.key[last_k + 1] == sh.key[last_k]) ++last_k;
  }
  int last = -1;
  double total = above;
  if (!(sampling.top_p < 1.0)) {
    last = last_k;
    for (int j = 0; j <= last; ++j) total = __dadd_rn(total, sh.mass[j]);
  } else {
    double w = above;
    bool any_p = false;
    for (int j = 0; j <= last_k; ++j)
      if (in_p(j)) w = __dadd_rn(w, sh.mass[j]);
    w = __dadd_rn(w, mid);
    if (split) {
      w = __dadd_rn(w, k_sum);
    } else {
      for (int j = 0; j <= last_k && kb > p_hi; ++j)
        if (in_k(j)) w = __dadd_rn(w, sh.mass[j]);
    }
    const double target = __dmul_rn(sampling.top_p, w);
    double running = above;
    bool stopped = false;
    for (int j = 0; j < n; ++j) {
      if (!in_p(j)) continue;
      if (!any_p && !(running < target)) return false;  // the boundary lies before the candidates
      any_p = true;
      if (j > last_k || !(running < target)) {
        stopped = true;
        break;
      }
      last = j;
      running = __dadd_rn(running, sh.mass[j]);
    }
    if (!any_p || last < 0) return false;
    const bool more = (kb < kTruncBuckets && kb > p_hi) || (kb >= kTruncBuckets && plan.below > 0);
    if (!stopped && more && running < target) return false;  // the boundary lies after them
    for (int j = 0; j <= last; ++j)
      if (in_p(j)) total = __dadd_rn(total, sh.mass[j]);
  }
  out.kept = KeptSet{score_of_key(sh.key[last]), static_cast<int64_t>(sh.index[last])};
  out.max = max_score;
  out.log_sum = log(total);
  return true;
}

// Tie path (thread 0): every planned token has one score (and every token of that score is
// planned); returns the 0-based index rank of the last kept token among them, or -1 when the
// boundary is not in the bucket. When all of them are kept, out.kept needs no index.
template <typename T>
__device__ long long resolve_ties(const Problem<T>& pr, const TruncPlan& plan, double above, double mid, double max_score,
                                  unsigned long long key, const ExpTable& table, Truncation& out) {
  const Sampling& sampling = pr.p.sampling;
  const double score = score_of_key(key);
  const double m = fast_exp(__dsub_rn(score, max_score), table);
  const long long n = static_cast<long long>(plan.members);
  long long r = plan.kb == plan.p_lo ? sampling.top_k - 1 - static_cast<long long>(plan.count_above) : n - 1;
  if (r < 0 || r >= n) return -1;
  if (sampling.keeps_ties()) r = n - 1;  // every token tied with the k-th largest score
  long long last = r;
  if (sampling.top_p < 1.0) {
    const double w = __dadd_rn(__dadd_rn(above, __dmul_rn(static_cast<double>(r + 1), m)), mid);
    const double target = __dmul_rn(sampling.top_p, w);
    const auto before = [&](long long j) { return __dadd_rn(above, __dmul_rn(static_cast<double>(j), m)); };
    if (!(before(0) < target)) return -1;
    long long lo = 0, hi = r;  // before(lo) < target; find the largest such j <= r
    while (lo < hi) {
      const long long mid_j = lo + (hi - lo + 1) / 2;
      if (before(mid_j) < target) {
        lo = mid_j;
      } else {
        hi = mid_j - 1;
      }
    }
    last = lo;
    const bool more = plan.kb >= kTruncBuckets && plan.below > 0;
    if (last == r && more && before(r + 1) < target) return -1;
  }
  out.kept = KeptSet{score, last == n - 1 ? INT64_MAX : -1};  // -1: the index of rank `last`, found by the caller
  out.max = max_score;
  out.log_sum = log(__dadd_rn(above, __dmul_rn(static_cast<double>(last + 1), m)));
  return last;
}

// Block: loads n <= kTruncCandidates candidates, sorts them into rank order (bitonic, padded with
// keys that rank last) and computes their masses exp(score - max).
__device__ inline void sort_candidates(const Candidate* candidates, int n, double max_score, const TruncPlan& plan, CandidateShared& c,
                                       const ExpTable& table) {
  for (int j = threadIdx.x; j < kTruncCandidates; j += kTruncationThreads) {
    c.key[j] = j < n ? candidates[j].key : 0ull;
    c.index[j] = j < n ? candidates[j].index : 0xffffffffu;
  }
  __syncthreads();
  for (int size = 2; size <= kTruncCandidates; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int t = threadIdx.x; t < kTruncCandidates / 2; t += kTruncationThreads) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
        const bool forward = (lo & size) == 0;
        if (forward ? ranks_before(c, hi, lo) : ranks_before(c, lo, hi)) {
          const unsigned long long key = c.key[lo];
          const unsigned int index = c.index[lo];
          c.key[lo] = c.key[hi];
          c.index[lo] = c.index[hi];
          c.key[hi] = key;
          c.index[hi] = index;
        }
      }
      __syncthreads();
    }
  }
  for (int j = threadIdx.x; j < n; j += kTruncationThreads) {
    const double score = score_of_key(c.key[j]);
    const int bucket = plan_key(score, max_score, plan);
    c.mass[j] = fast_exp(__dsub_rn(score, max_score), table);
    c.flags[j] = static_cast<unsigned char>((bucket >= plan.p_lo && bucket <= plan.p_hi ? kInP : 0) | (bucket == plan.kb ? kInK : 0));
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kTruncationThreads) truncation_resolve_kernel(const Problem<T> pr) {
  constexpr int kVec = Storage<T>::kVec;
  __shared__ ResolveShared sh;
  __shared__ ExpTable table;
  __shared__ double scratch[kTruncationThreads / kWarp];
  __shared__ Truncation result;
  __shared__ int use_radix;
  __shared__ int tie_chunk;
  __shared__ long long tie_rank;
  __shared__ long long tie_index;
  __shared__ double k_sum;
  int64_t rs;
  int unused_chunk;
  if (!truncation_block(pr, 1, rs, unused_chunk)) return;
  const int64_t row_position = rs / 2;
  const int stream = static_cast<int>(rs % 2);
  const TruncPlan plan = pr.plans[rs];
  init_exp_table(table);
  // Branches that contain barriers test the plan (the same in every thread), never use_radix:
  // thread 0 sets use_radix inside them, and a thread that read it afterwards would skip the
  // branch and wait at another barrier. use_radix is read only after a barrier.
  const bool ties = plan.mode == kTies || plan.mode == kTiesCounted;
  if (threadIdx.x == 0) {
    use_radix = plan.mode != kCollect && !ties;
    tie_chunk = -1;
    tie_index = -1;
  }
  const double max_score = stream_max(pr, row_position, stream, scratch);  // barriers
  const TruncChunk* parts = pr.trunc_parts + rs * pr.trunc_chunks;
  if (plan.mode == kCollect) {
    CandidateShared& c = sh.cand;
    const Candidate* candidates = pr.candidates + rs * 2 * kTruncCandidates;
    const int n_k = static_cast<int>(min(plan.members_k, static_cast<unsigned long long>(kTruncCandidates)));
    const int n = static_cast<int>(min(plan.members - plan.members_k, static_cast<unsigned long long>(kTruncCandidates)));
    if (threadIdx.x == 0) k_sum = 0.0;
    if (plan.members_k > 0 && plan.level == 1 && plan.kb == kTruncBuckets - 1) {  // a -inf kb group: mass 0
      if (threadIdx.x == 0 && static_cast<unsigned long long>(pr.p.sampling.top_k - 1) - plan.count_above >= plan.members_k) use_radix = 1;
      __syncthreads();
    } else if (plan.members_k > 0) {  // the separate kb group first: the top-k set's mass in kb
      sort_candidates(candidates + kTruncCandidates, n_k, max_score, plan, c, table);
      if (threadIdx.x == 0) {
        const unsigned long long r = static_cast<unsigned long long>(pr.p.sampling.top_k - 1) - plan.count_above;
        if (plan.filled_k != plan.members_k || r >= static_cast<unsigned long long>(n_k)) {
          use_radix = 1;
        } else {
          int last_k = static_cast<int>(r);
          while (pr.p.sampling.keeps_ties() && last_k + 1 < n_k && c.key[last_k + 1] == c.key[last_k]) ++last_k;
          double sum = 0.0;
          for (int j = 0; j <= last_k; ++j) sum = __dadd_rn(sum, c.mass[j]);
          k_sum = sum;
        }
      }
      __syncthreads();
    }
    if (!use_radix) {
      sort_candidates(candidates, n, max_score, plan, c, table);
      if (threadIdx.x == 0) {
        double above = 0.0, mid = 0.0;
        for (int k = 0; k < pr.trunc_chunks; ++k) {  // chunk order
          above = __dadd_rn(above, parts[k].above);
          mid = __dadd_rn(mid, parts[k].mid);
        }
        Truncation t;
        if (plan.filled == plan.members - plan.members_k && resolve_candidates(pr, plan, n, above, mid, k_sum, max_score, c, t)) {
          result = t;
        } else {
          use_radix = 1;
        }
      }
    }
  } else if (ties) {
    if (threadIdx.x == 0) {
      double above = 0.0, mid = 0.0;
      unsigned long long key_min = ~0ull, key_max = 0, members = 0;
      for (int k = 0; k < pr.trunc_chunks; ++k) {
        above = __dadd_rn(above, parts[k].above);
        mid = __dadd_rn(mid, parts[k].mid);
        key_min = min(key_min, parts[k].key_min);
        key_max = max(key_max, parts[k].key_max);
        members += parts[k].members;
      }
      Truncation t;
      const long long rank =
          key_min == key_max && members == plan.members ? resolve_ties(pr, plan, above, mid, max_score, key_min, table, t) : -1;
      if (rank < 0) {
        use_radix = 1;
      } else {
        result = t;
        const bool find_index = t.kept.last_index < 0;  // not every token of the score is kept
        unsigned long long seen = 0;
        for (int k = 0; find_index && k < pr.trunc_chunks; ++k) {
          if (static_cast<unsigned long long>(rank) < seen + parts[k].members) {
            tie_chunk = k;
            tie_rank = rank - static_cast<long long>(seen);
            break;
          }
          seen += parts[k].members;
        }
        if (find_index && tie_chunk < 0) use_radix = 1;
      }
    }
    __syncthreads();
    // The tie_rank-th token of the bucket's score in chunk tie_chunk: one chunk read.
    if (!use_radix && result.kept.last_index < 0) {
      const RowScore<T> score = row_score(pr, row_position, stream);
      const int64_t vocab = pr.p.vocab;
      const int64_t begin = tie_chunk * kTruncChunkVectors, end = min(num_vectors<T>(vocab), begin + kTruncChunkVectors);
      const double wanted = result.kept.threshold;
      unsigned int* counts = sh.cand.index;  // kTruncationThreads running counts
      long long carry = 0;
      for (int64_t tile = begin; tile < end; tile += kTruncationThreads) {
        const int64_t k = tile + threadIdx.x;
        double s[kVec] = {};
        unsigned int own = 0;
        if (k < end) {
          score.vector(k, s);
#pragma unroll
          for (int e = 0; e < kVec; ++e) own += (k * kVec + e < vocab && s[e] == wanted) ? 1u : 0u;
        }
        counts[threadIdx.x] = own;
        __syncthreads();
        if (threadIdx.x == 0) {
          unsigned int running = 0;
          for (int t = 0; t < kTruncationThreads; ++t) {
            const unsigned int c = counts[t];
            counts[t] = running;
            running += c;
          }
          counts[kTruncationThreads] = running;
        }
        __syncthreads();
        const long long first = carry + counts[threadIdx.x];
        if (own != 0 && first <= tie_rank && tie_rank < first + own) {
          long long seen = first;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (k * kVec + e < vocab && s[e] == wanted) {
              if (seen == tie_rank) tie_index = k * kVec + e;
              ++seen;
            }
          }
        }
        carry += counts[kTruncationThreads];
        __syncthreads();
        if (tie_index >= 0 || carry > tie_rank) break;
      }
      if (threadIdx.x == 0) {
        if (tie_index >= 0) {
          result.kept.last_index = tie_index;
        } else {
          use_radix = 1;
        }
      }
    }
  }
  __syncthreads();
  if (use_radix) {
    init_exp_table(sh.radix.exp_table);
    __syncthreads();
    radix_truncation(pr, row_position, stream, sh.radix);
  } else if (threadIdx.x == 0) {
    pr.truncations[row_position * 2 + stream] = result;
  }
}

// ---------------------------------------------------------------------------------------
// 3-4. decisions and the correction/bonus draw
//
// Probabilities keep the row maximum and the log of the sum apart, never adding them:
// log p*(v) = (s_v - s_max) - log sum_kept exp(s - s_max), likewise log r~, so a huge scaled
// logit cannot absorb log(total). log Z = [s_max - q_max - lambda (r_max - d_max)]
// + [ls_s - ls_q - lambda (ls_r - ls_d)] over the untruncated rows (ls_x: log of the sum).

// What one (row, position) contributes to the row's decisions.
struct PositionInfo {
  bool valid;
  bool accept;
  double log_z;
  double max_s, log_sum_s;  // p*: row maximum, log sum of kept exp(s - max) (truncated when truncating)
  double max_r, log_sum_r;  // r~ likewise
  KeptSet kept_s, kept_r;
  int64_t greedy_token;
};

// The splits' partials of one (row, position) combined; called by a whole warp, the result
// is the same in every lane.
struct Combined {
  double max[kNumStreams];      // row maximum of each stream, untruncated
  double log_sum[kNumStreams];  // log sum exp(score - max)
  uint32_t flags;
  double best;
  int64_t best_index;
};

template <typename T>
__device__ Combined combine_partials(const Problem<T>& pr, int64_t row_position, const ExpTable& table) {
  const Partial* parts = pr.partials + row_position * pr.splits;
  Combined out;
  double sum[kNumStreams];
  for (int s = 0; s < kNumStreams; ++s) {
    out.max[s] = -kInfD;
    sum[s] = 0.0;
  }
  out.flags = 0;
  out.best = -kInfD;
  out.best_index = INT64_MAX;
  const auto merge = [&table](double& max, double& sum, double other_max, double other_sum) {
    const double m = fmax(max, other_max);
    if (m == -kInfD) return;
    const double own = max == -kInfD ? 0.0 : __dmul_rn(sum, fast_exp(__dsub_rn(max, m), table));
    const double other = other_max == -kInfD ? 0.0 : __dmul_rn(other_sum, fast_exp(__dsub_rn(other_max, m), table));
    sum = __dadd_rn(own, other);
    max = m;
  };
  for (int k = threadIdx.x % kWarp; k < pr.splits; k += kWarp) {  // fixed order: lane, then split
    const Partial& part = parts[k];
    out.flags |= part.flags;
    if (part.best > out.best || (part.best == out.best && part.best_index < out.best_index)) {
      out.best = part.best;
      out.best_index = part.best_index;
    }
    for (int s = 0; s < kNumStreams; ++s) merge(out.max[s], sum[s], part.max[s], part.sum[s]);
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
      const double other_max = __shfl_xor_sync(0xffffffffu, out.max[s], offset);
      const double other_sum = __shfl_xor_sync(0xffffffffu, sum[s], offset);
      merge(out.max[s], sum[s], other_max, other_sum);  // commutative: every lane gets the same bits
    }
  }
  for (int s = 0; s < kNumStreams; ++s) out.log_sum[s] = out.max[s] == -kInfD ? -kInfD : log(sum[s]);
  return out;
}

template <typename T>
__device__ PositionInfo position_info(const Problem<T>& pr, int64_t b, int64_t i, const Combined& c) {
  const VerifyParams<T>& p = pr.p;
  PositionInfo out{true, false, 0.0, 0.0, 0.0, 0.0, 0.0, KeptSet::all(), KeptSet::all(), -1};
  const int64_t row_position = b * pr.positions() + i;
  const bool has_proposal = i < pr.num_draft(b);
  const T* q = pr.target_row(b, i);
  const T* r = pr.draft_row(b, i);
  const T* d = pr.ref_row(b, i);
  const uint32_t flags = c.flags;

  // Value checks (csrc/kernels/cpu/verify.h: checked_row_max, kScoreRange, kNoSupport,
  // check_tokens_and_uniforms).
  out.valid = !(flags & (kBadTarget | kRangeTarget)) && (flags & kSeenTarget);
  if (r != nullptr) out.valid &= !(flags & (kBadDraft | kRangeDraft)) && (flags & kSeenDraft);
  if (d != nullptr) out.valid &= !(flags & (kBadRef | kRangeRef)) && (flags & kSeenRef);
  const double tilted_max = pr.greedy ? c.best : c.max[kTilted];
  out.valid &= !(flags & kRangeTilted) && tilted_max > -kInfD && tilted_max >= -kMaxScaledScore;
  const double u = pr.uniform(b, i);
  out.valid &= u > 0.0 && u < 1.0;
  int64_t x = -1;
  if (has_proposal) {
    x = pr.draft_token(b, i);
    out.valid &= x >= 0 && x < p.vocab;
  }
  if (!out.valid) return out;

  if (pr.greedy) {
    out.greedy_token = c.best_index;
    out.accept = has_proposal && x == c.best_index;
    return out;
  }
  if (pr.tilt) {
    const double lambda = p.shift;
    const double maxima = c.max[kTilted] - c.max[kTargetStream] - lambda * (c.max[kProposal] - c.max[kRefStream]);
    const double sums = c.log_sum[kTilted] - c.log_sum[kTargetStream] - lambda * (c.log_sum[kProposal] - c.log_sum[kRefStream]);
    out.log_z = maxima + sums;
  }
  if (pr.truncated) {
    const Truncation* t = pr.truncations + row_position * 2;
    out.kept_s = t[0].kept;
    out.max_s = t[0].max;
    out.log_sum_s = t[0].log_sum;
    if (has_proposal) {
      out.kept_r = t[1].kept;
      out.max_r = t[1].max;
      out.log_sum_r = t[1].log_sum;
    }
  } else {
    out.max_s = c.max[kTilted];
    out.log_sum_s = c.log_sum[kTilted];
    out.max_r = c.max[kProposal];
    out.log_sum_r = c.log_sum[kProposal];
  }
  if (has_proposal) {
    const double zr = load_double(r, x);
    const double sx = tilted_score(load_double(q, x), zr, d != nullptr ? load_double(d, x) : -kInfD, pr.score);
    const double rx = temper(zr, pr.score);
    const double log_p = out.kept_s.contains(sx, x) ? (sx - out.max_s) - out.log_sum_s : -kInfD;
    const double log_r = out.kept_r.contains(rx, x) ? (rx - out.max_r) - out.log_sum_r : -kInfD;
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

// Derives the row's decisions (one warp per position up to the row's bonus position n); when
// `write` is set, also writes num_accepted, log_z (0 past n) and the tokens except the one
// drawn at j (accepted drafts, the greedy token, -1 after; all -1 for an invalid row).
template <typename T, int kThreads>
__device__ void decide_row(const Problem<T>& pr, int64_t b, bool write, RowDecision& out, const ExpTable& table) {
  constexpr int kWarps = kThreads / kWarp;
  const VerifyParams<T>& p = pr.p;
  const int64_t positions = pr.positions();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t num_draft = pr.num_draft(b);
  if (threadIdx.x == 0) {
    out.first_rejection = static_cast<int>(num_draft);
    out.invalid = !p.valid_row_draft(p.row_draft(b));
  }
  __syncthreads();
  for (int64_t i = warp; i < positions; i += kWarps) {
    if (i > num_draft) {  // warp-uniform: never read
      if (write && lane == 0) p.log_z[b * positions + i] = 0.0f;
      continue;
    }
    const Combined combined = combine_partials(pr, b * positions + i, table);
    if (lane != 0) continue;
    const PositionInfo info = position_info(pr, b, i, combined);
    if (!info.valid) atomicOr(&out.invalid, 1);
    if (i < num_draft && !info.accept) atomicMin(&out.first_rejection, static_cast<int>(i));
    if (write) p.log_z[b * positions + i] = static_cast<float>(info.log_z);
  }
  __syncthreads();
  const int64_t j = out.first_rejection;
  if (warp == 0 && !out.invalid) {
    const Combined combined = combine_partials(pr, b * positions + j, table);
    if (lane == 0) out.at_j = position_info(pr, b, j, combined);
  }
  __syncthreads();
  if (!write) return;
  for (int64_t i = threadIdx.x; i < positions; i += kThreads) {
    if (!out.invalid && i == j && !pr.greedy) continue;  // the drawn token: written by draw_token alone
    int64_t token = -1;
    if (!out.invalid && i < j) token = pr.draft_token(b, i);
    if (!out.invalid && i == j) token = out.at_j.greedy_token;
    p.tokens[b * positions + i] = token;
  }
  // log_z of position i was written by lane 0 of warp i % kWarps: overwrite from that thread.
  for (int64_t i = warp; out.invalid && i < positions; i += kWarps)
    if (lane == 0) p.log_z[b * positions + i] = __int_as_float(0x7fc00000);  // NaN
  if (threadIdx.x == 0) p.num_accepted[b] = out.invalid ? -1 : j;
}

// Weights of the correction/bonus distribution at (row b, position j), float64:
// p*(v) = exp((s_v - s_max) - log_sum_s) on kept tokens; at a rejection the residual
// (p* - r~)+ (exact mode) or (p* - exp(log r~ - log Z))+ (paper mode: proportional to
// (Z p* - r~)+ without overflowing).
template <typename T>
struct DrawRow {
  const T* q;
  const T* r;
  const T* d;
  int skew_q, skew_r, skew_d;
  int64_t vocab;
  ScoreParams sp;
  bool residual;  // j < the row's draft count
  double log_z;   // paper mode: log Z; exact mode: 0
  PositionInfo info;

  __device__ __forceinline__ DrawRow(const Problem<T>& pr, int64_t b, int64_t j, const PositionInfo& at_j) {
    residual = j < pr.num_draft(b);
    q = pr.target_row(b, j);
    r = (pr.tilt || residual) ? pr.draft_row(b, j) : nullptr;
    d = pr.tilt ? pr.ref_row(b, j) : nullptr;
    skew_q = row_skew(q);
    skew_r = row_skew(r);
    skew_d = row_skew(d);
    vocab = pr.p.vocab;
    sp = pr.score;
    log_z = pr.p.paper_mode ? at_j.log_z : 0.0;
    info = at_j;
  }

  template <int kVec>
  __device__ __forceinline__ void weights(int64_t k, double (&w_p)[kVec], double (&w_res)[kVec], const ExpTable& table) const {
    const int64_t v0 = k * kVec;
    const uint4 raw_q = load_vector(q, skew_q, v0, vocab);
    const uint4 raw_r = r != nullptr ? load_vector(r, skew_r, v0, vocab) : uint4{};
    const uint4 raw_d = d != nullptr ? load_vector(d, skew_d, v0, vocab) : uint4{};
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = v0 + e;
      const double zq = unpack<T>(raw_q, e);
      const double zr = r != nullptr ? static_cast<double>(unpack<T>(raw_r, e)) : -kInfD;
      const double zd = d != nullptr ? static_cast<double>(unpack<T>(raw_d, e)) : -kInfD;
      const double s = tilted_score(zq, zr, zd, sp);
      w_p[e] = info.kept_s.contains(s, v) ? fast_exp(__dsub_rn(__dsub_rn(s, info.max_s), info.log_sum_s), table) : 0.0;
      w_res[e] = 0.0;
      if (residual) {
        const double rs = temper(zr, sp);
        // exp(log r~(v) - log Z); an argument >= 0 gives a weight >= 1 >= p*(v): residual 0.
        const double log_r = __dsub_rn(__dsub_rn(__dsub_rn(rs, info.max_r), info.log_sum_r), log_z);
        const double w_r = info.kept_r.contains(rs, v) ? fast_exp(fmin(log_r, 0.0), table) : 0.0;
        w_res[e] = residual_weight(w_p[e], w_r, kResidualToleranceFloat32);
      }
    }
  }
};

// Vectors [begin, end) of the row form draw chunk `chunk`.
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
      const int64_t v0 = k * kVec;
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

// Inverse CDF (docs/algorithm.md §5) over the chunk totals of row b, by the block that
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
    const double u = pr.uniform(b, pr.num_draft(b));
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
    chunk_range(num_vectors<T>(row.vocab), pr.draw_splits, sh.chunk, begin, end);
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
  decide_row<T, kDrawThreads>(pr, b, chunk == 0, sh.decision, sh.exp_table);
  if (sh.decision.invalid || pr.greedy) return;
  const int64_t j = sh.decision.first_rejection;
  const DrawRow<T> row(pr, b, j, sh.decision.at_j);
  int64_t begin, end;
  chunk_range(num_vectors<T>(row.vocab), pr.draw_splits, chunk, begin, end);
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
