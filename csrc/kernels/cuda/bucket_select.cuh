// Stage 2 of a truncating verify call: top-k / top-p kept sets in a constant number of passes
// over the logits (histogram, plan, refine, collect, resolve), falling back to the radix
// descent of radix_select.cuh (verify.cuh has the overview).
#pragma once

#include "radix_select.cuh"

namespace sss_ext::cuda {

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
  return i <= pr.last_position(b) && !(rs % 2 == 1 && !pr.has_proposal(b, i));
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

}  // namespace sss_ext::cuda
