// One call's problem as the kernels see it: score streams, value flags, the workspace's
// per-(row, position) records, the fixed launch sizes and Problem (the parameters plus the
// workspace pointers). Framework-free; the stages follow in stats.cuh, radix_select.cuh,
// bucket_select.cuh and draw.cuh (overview: verify.cuh).
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
// Bucketed top-k / top-p selection (bucket_select.cuh). Fixed sizes, the same on every GPU.
constexpr int kTruncBuckets = 2048;           // histogram buckets per (row, position, stream)
constexpr double kBucketScale = 32.0;         // linear buckets per unit of (row max - score)
constexpr int kTruncCandidates = 2048;        // candidates resolved in shared memory (a power of 2)
constexpr double kMassScale = 4294967296.0;   // 2^32: histogram masses floor(min(m, 1) * 2^32)
constexpr double kPlanSlack = 1e-9;           // relative slack of the top-p target bounds in the plan
constexpr int64_t kTruncChunkVectors = 2048;  // 16-byte vectors per histogram / collect block
constexpr int kDrawThreads = 256;
constexpr int kMaxDrawSplits = 64;
constexpr int64_t kExactVocab = 4096;  // below: float64 exp in the normaliser pass (see stats)

// Bucketed selection workspace (bucket_select.cuh).
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
  bool block = false;      // block verification (sampled calls only)
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
  double* block_masses = nullptr;     // (batch, num_draft + 1): R_i at draft positions 1 <= i < n; block only
  // Tree verification (tree.cuh) reads positions as nodes, num_draft + 1 = max_nodes; both
  // written by tree_layout_kernel before the stats. nullptr: a chain.
  const int64_t* tree_last = nullptr;             // (batch,): the row's last node, -1: invalid layout
  const unsigned char* tree_children = nullptr;  // (batch, max_nodes): 1 at a node with children

  __device__ __forceinline__ bool tree() const { return tree_last != nullptr; }

  __device__ __forceinline__ int64_t positions() const { return p.num_draft + 1; }
  // Row b's draft count n: positions 0..n are its only ones (n is the bonus position), nothing
  // past it is read. An out-of-range count reads as 0 and decide_row marks the row invalid.
  // A tree has no chain drafts: 0.
  __device__ __forceinline__ int64_t num_draft(int64_t b) const {
    if (tree()) return 0;
    const int64_t n = p.row_draft(b);
    return p.valid_row_draft(n) ? n : 0;
  }
  // The last position row b reads: the bonus position of a chain, the last node of a tree
  // (node 0 for an invalid layout).
  __device__ __forceinline__ int64_t last_position(int64_t b) const { return tree() ? max(tree_last[b], int64_t(0)) : num_draft(b); }
  __device__ __forceinline__ const T* target_row(int64_t b, int64_t i) const { return p.target.row(b, i); }
  // A proposal r~ to normalise at (b, i): a draft position whose drafts are not one-hot; in a
  // tree, a node with children.
  __device__ __forceinline__ bool has_proposal(int64_t b, int64_t i) const {
    if (tree()) return i <= last_position(b) && tree_children[b * positions() + i];
    return i < num_draft(b) && !p.one_hot_proposal;
  }
  // The draft row is read where there is a proposal and wherever a ref is given (the tilt).
  __device__ __forceinline__ const T* draft_row(int64_t b, int64_t i) const {
    return (has_proposal(b, i) || p.has_ref()) ? p.draft.row(b, i) : nullptr;
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

}  // namespace sss_ext::cuda
