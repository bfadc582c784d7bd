// Stages 3-4 of a verify call: each row's accept/reject decisions from the stats partials and
// the correction / bonus token by a chunked inverse-CDF draw (verify.cuh has the overview).
#pragma once

#include "bucket_select.cuh"

namespace sss_ext::cuda {

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
  double log_ratio;  // log p*(x) - log r~(x) at the draft x; -inf where either is 0 (and off drafts)
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

// log p*(x) and log r~(x) of a token x at (b, i) from the position's normalisers in `info`
// (one-hot drafts: r~(x) = 1).
template <typename T>
__device__ void token_log_laws(const Problem<T>& pr, int64_t b, int64_t i, const PositionInfo& info, int64_t x, double& log_p,
                               double& log_r) {
  const T* r = pr.draft_row(b, i);
  const T* d = pr.ref_row(b, i);
  const double zr = r != nullptr ? load_double(r, x) : -kInfD;
  const double sx = tilted_score(load_double(pr.target_row(b, i), x), zr, d != nullptr ? load_double(d, x) : -kInfD, pr.score);
  const double rx = temper(zr, pr.score);
  log_p = info.kept_s.contains(sx, x) ? (sx - info.max_s) - info.log_sum_s : -kInfD;
  log_r = !pr.has_proposal(b, i) ? 0.0 : info.kept_r.contains(rx, x) ? (rx - info.max_r) - info.log_sum_r : -kInfD;
}

template <typename T>
__device__ PositionInfo position_info(const Problem<T>& pr, int64_t b, int64_t i, const Combined& c) {
  const VerifyParams<T>& p = pr.p;
  PositionInfo out{true, false, 0.0, 0.0, 0.0, 0.0, 0.0, KeptSet::all(), KeptSet::all(), -1, -kInfD};
  const int64_t row_position = b * pr.positions() + i;
  const bool has_draft = i < pr.num_draft(b);         // a draft token to accept or reject
  const bool has_proposal = pr.has_proposal(b, i);    // ... drawn from r~, not one-hot
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
  if (has_draft) {
    x = pr.draft_token(b, i);
    out.valid &= x >= 0 && x < p.vocab;
  }
  if (!out.valid) return out;

  if (pr.greedy) {
    out.greedy_token = c.best_index;
    out.accept = has_draft && x == c.best_index;
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
  if (has_draft) {
    double log_p, log_r;
    token_log_laws(pr, b, i, out, x, log_p, log_r);
    const double log_m = p.paper_mode ? log_p + out.log_z : log_p;
    out.accept = log_p > -kInfD && log_r > -kInfD && log(u) < log_m - log_r;
    if (log_p > -kInfD && log_r > -kInfD) out.log_ratio = log_p - log_r;
  }
  return out;
}

// Block verification (docs/algorithm.md §12; csrc/kernels/cpu/verify.h: block_log_weight,
// block_prefix). Called by a whole warp, the result is the same in every lane.
// log p_{k+1} of row b from log p_k: p_0 = 1, p_{k+1} = min(1, p_k p*_k(x_k) / r~_k(x_k)).
template <typename T>
__device__ double block_log_weight_step(const Problem<T>& pr, int64_t b, int64_t k, double log_weight, const ExpTable& table) {
  const Combined combined = combine_partials(pr, b * pr.positions() + k, table);
  return fmin(0.0, log_weight + position_info(pr, b, k, combined).log_ratio);
}

// log p_i of row b.
template <typename T>
__device__ double block_log_weight(const Problem<T>& pr, int64_t b, int64_t i, const ExpTable& table) {
  double log_weight = 0.0;
  for (int64_t k = 0; k < i; ++k) log_weight = block_log_weight_step(pr, b, k, log_weight, table);
  return log_weight;
}

// tau of row b, which verifies n drafts: the largest i in 1..n with u[i-1] < h_i (h_n = p_n),
// else 0; weight = p_tau. Reads the residual masses R_i of block_mass_kernel.
template <typename T>
__device__ int64_t block_prefix(const Problem<T>& pr, int64_t b, const ExpTable& table, double& weight) {
  const int64_t num_draft = pr.num_draft(b);
  int64_t tau = 0;
  weight = 1.0;
  double log_weight = 0.0;
  for (int64_t i = 1; i <= num_draft; ++i) {
    log_weight = block_log_weight_step(pr, b, i - 1, log_weight, table);
    const double weight_i = exp(log_weight);
    const double h = i < num_draft ? block_threshold(pr.block_masses[b * pr.positions() + i], weight_i) : weight_i;
    if (pr.uniform(b, i - 1) < h) {
      tau = i;
      weight = weight_i;
    }
  }
  return tau;
}

// The row's outcome, identical in every block that derives it.
struct RowDecision {
  int first_rejection;  // position j of the correction/bonus token (block verification: tau)
  int invalid;
  double weight;        // the residual's weight on p* at j: block verification p_tau, else 1
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
    out.weight = 1.0;
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
    if (!pr.block && i < num_draft && !info.accept) atomicMin(&out.first_rejection, static_cast<int>(i));
    if (write) p.log_z[b * positions + i] = static_cast<float>(info.log_z);
  }
  __syncthreads();
  if (warp == 0 && !out.invalid) {
    int64_t at = out.first_rejection;
    if (pr.block) {
      double weight;
      at = block_prefix(pr, b, table, weight);
      if (lane == 0) {
        out.first_rejection = static_cast<int>(at);
        out.weight = weight;
      }
    }
    const Combined combined = combine_partials(pr, b * positions + at, table);
    if (lane == 0) out.at_j = position_info(pr, b, at, combined);
  }
  __syncthreads();
  const int64_t j = out.first_rejection;
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
// (Z p* - r~)+ without overflowing); block verification weighs p* by p_j: (p_j p* - r~)+.
template <typename T>
struct DrawRow {
  const T* q;
  const T* r;
  const T* d;
  int skew_q, skew_r, skew_d;
  int64_t vocab;
  ScoreParams sp;
  bool residual;           // j < the row's draft count
  bool one_hot;            // ... and the drafts are one-hot: the residual is p* without the rejected draft
  int64_t one_hot_token;   // that draft
  double log_z;            // paper mode: log Z; exact mode: 0
  double scale;            // the residual's weight on p*: block verification p_j, else 1
  PositionInfo info;

  // A tree reads r~ at a node with children: the walk's proposal there (tree.cuh).
  __device__ __forceinline__ DrawRow(const Problem<T>& pr, int64_t b, int64_t j, const PositionInfo& at_j, double weight) {
    residual = pr.tree() ? pr.has_proposal(b, j) : j < pr.num_draft(b);
    one_hot = residual && pr.p.one_hot_proposal;
    one_hot_token = one_hot ? pr.draft_token(b, j) : -1;
    q = pr.target_row(b, j);
    r = (pr.tilt || residual) ? pr.draft_row(b, j) : nullptr;
    d = pr.tilt ? pr.ref_row(b, j) : nullptr;
    skew_q = row_skew(q);
    skew_r = row_skew(r);
    skew_d = row_skew(d);
    vocab = pr.p.vocab;
    sp = pr.score;
    log_z = pr.p.paper_mode ? at_j.log_z : 0.0;
    scale = weight;
    info = at_j;
  }

  // p*(v) and r~(v) (paper mode: min(r~(v) / Z, 1); 0 where r~ is not read) over the vector k.
  template <int kVec>
  __device__ __forceinline__ void laws(int64_t k, double (&w_p)[kVec], double (&w_r)[kVec], const ExpTable& table) const {
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
      w_r[e] = 0.0;
      if (residual && !one_hot) {
        const double rs = temper(zr, sp);
        // exp(log r~(v) - log Z); an argument >= 0 gives a weight >= 1 >= p*(v): residual 0.
        const double log_r = __dsub_rn(__dsub_rn(__dsub_rn(rs, info.max_r), info.log_sum_r), log_z);
        w_r[e] = info.kept_r.contains(rs, v) ? fast_exp(fmin(log_r, 0.0), table) : 0.0;
      }
    }
  }

  // p*(v) and the correction weight over the vector k.
  template <int kVec>
  __device__ __forceinline__ void weights(int64_t k, double (&w_p)[kVec], double (&w_res)[kVec], const ExpTable& table) const {
    double w_r[kVec];
    laws(k, w_p, w_r, table);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = k * kVec + e;
      const double scaled_p = __dmul_rn(scale, w_p[e]);
      w_res[e] = one_hot ? (v == one_hot_token ? 0.0 : scaled_p) : residual ? residual_weight(scaled_p, w_r[e], kResidualToleranceFloat32) : 0.0;
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
// rescan so that both compute identical bits. Row: anything with weights(k, w[1], w[0], table)
// (DrawRow; tree.cuh's weights of the walk). Calls visit(kind, v, running) for every token of
// positive weight; visit returns true to stop after the current tile.
template <int kVec, class Row, class Visit>
__device__ __forceinline__ void scan_chunk(const Row& row, int64_t begin, int64_t end, int kinds, const ExpTable& table, double* scratch,
                                           double (&carry)[2], Visit&& visit) {
  carry[0] = carry[1] = 0.0;
  for (int64_t tile = begin; tile < end; tile += kDrawThreads) {
    const int64_t k = tile + threadIdx.x;
    double w[2][kVec];
    if (k < end) {
      row.weights(k, w[1], w[0], table);
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
      const double exclusive = block_exclusive_sum<kDrawThreads>(own, tile_total, scratch);
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
    scan_chunk<kVec>(row, begin, end, 1 << sh.kind, sh.exp_table, sh.scratch, carry, [&](int, int64_t v, double running) {
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
  const DrawRow<T> row(pr, b, j, sh.decision.at_j, sh.decision.weight);
  int64_t begin, end;
  chunk_range(num_vectors<T>(row.vocab), pr.draw_splits, chunk, begin, end);
  const int kinds = row.residual ? 3 : 2;
  double peak[2] = {-kInfD, -kInfD};
  int64_t last_positive[2] = {-1, -1};
  double carry[2];
  scan_chunk<kVec>(row, begin, end, kinds, sh.exp_table, sh.scratch, carry, [&](int kind, int64_t v, double running) {
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

// Grid (batch, num_draft + 1), block verification only: R_i = sum_v (p_i p*_i(v) - r~_i(v))+ of
// row b at draft position i, 1 <= i < n (one-hot drafts: p_i (1 - p*_i(x)) from x alone), in
// the draw's float64 weights, summed in a fixed order. Read by decide_row's block_prefix.
template <typename T>
__global__ void __launch_bounds__(kDrawThreads) block_mass_kernel(const Problem<T> pr) {
  constexpr int kVec = Storage<T>::kVec;
  __shared__ ExpTable table;
  __shared__ double scratch[kDrawThreads / kWarp];
  __shared__ PositionInfo info;
  __shared__ double weight;
  const int64_t b = blockIdx.x / pr.positions(), i = blockIdx.x % pr.positions();
  if (i == 0 || i >= pr.num_draft(b)) return;  // block-uniform
  init_exp_table(table);
  __syncthreads();
  if (threadIdx.x < kWarp) {
    const double log_weight = block_log_weight(pr, b, i, table);
    const Combined combined = combine_partials(pr, b * pr.positions() + i, table);
    if (threadIdx.x == 0) {
      info = position_info(pr, b, i, combined);
      weight = exp(log_weight);
    }
  }
  __syncthreads();
  double* out = pr.block_masses + b * pr.positions() + i;
  if (!info.valid) {  // decide_row marks the row invalid; the mass is never read
    if (threadIdx.x == 0) *out = 0.0;
    return;
  }
  const DrawRow<T> row(pr, b, i, info, weight);
  if (row.one_hot) {
    if (threadIdx.x == 0) {
      const int64_t x = row.one_hot_token;
      const double zr = row.r != nullptr ? load_double(row.r, x) : -kInfD;
      const double s = tilted_score(load_double(row.q, x), zr, row.d != nullptr ? load_double(row.d, x) : -kInfD, row.sp);
      const double p_x = info.kept_s.contains(s, x) ? fast_exp(__dsub_rn(__dsub_rn(s, info.max_s), info.log_sum_s), table) : 0.0;
      *out = __dmul_rn(weight, __dsub_rn(1.0, p_x));
    }
    return;
  }
  double own = 0.0;
  for (int64_t k = threadIdx.x; k < num_vectors<T>(row.vocab); k += kDrawThreads) {
    double w_p[kVec], w_res[kVec];
    row.weights(k, w_p, w_res, table);
#pragma unroll
    for (int e = 0; e < kVec; ++e) own = __dadd_rn(own, w_res[e]);
  }
  const double mass = block_reduce<kDrawThreads>(own, [](double a, double c) { return __dadd_rn(a, c); }, scratch);
  if (threadIdx.x == 0) *out = mass;
}

}  // namespace sss_ext::cuda
