// Tree verification (docs/algorithm.md §13): csrc/kernels/cpu/tree.h token for token, on the
// per-position stages of verify.cuh with positions read as nodes (Problem::tree()).
//
// One call is a fixed sequence of launches on one stream, no host sync, fixed shapes:
//   0. tree layout  grid (batch): the row's node count, parents and draft ids checked; the
//                   nodes with children marked (there r~ is normalised and truncated).
//   1-2. stats and truncation of verify.cuh at every node of every row (num_draft + 1 =
//                   max_nodes positions; a row reads nodes < num_nodes[b] only).
//   3. tree walk    grid (batch): one block per row checks every node's values (the rows the
//                   CPU kernel refuses come back invalid: num_accepted -1, path and tokens -1,
//                   log_z NaN), then walks from the root: each child of the current node, in
//                   increasing node index, is tested against the current p and q in log space
//                   with its uniform; a rejection replaces p by normalize((p - q)+) (kept when
//                   that has no mass) and, without replacement, removes the child's token from
//                   q. p and q are the node's p*, r~ until the first rejection there, then
//                   float64 vectors in the workspace. At the node where no child is accepted one
//                   token is drawn from p by inverse CDF (draw.cuh's block scan).
// The residual keeps draw.cuh's float32-exponential tolerance (kResidualToleranceFloat32).
#pragma once

#include "draw.cuh"

namespace sss_ext::cuda {

template <typename T>
struct TreeProblem {
  Problem<T> pr;  // per-node statistics: positions are nodes
  TreeParams<T> t;
  int64_t* last = nullptr;            // (batch,): pr.tree_last
  unsigned char* children = nullptr;  // (batch, max_nodes): pr.tree_children
  // (batch, slots, vocab), sampled calls only: the walk's p and its next residual in slots 0
  // and 1, alternating; without replacement q in slot 2.
  double* laws = nullptr;
  int slots = 0;
};

// Grid (batch). Thread 0 checks the row's layout (num_nodes, parents, draft ids: the checks of
// cpu/tree.h's check_tree_inputs except the uniforms, which position_info checks per node) and
// marks the nodes with children; an invalid layout reads node 0 alone, with no proposal.
template <typename T>
__global__ void tree_layout_kernel(const TreeProblem<T> tp) {
  const TreeParams<T>& t = tp.t;
  const int64_t b = blockIdx.x;
  unsigned char* children = tp.children + b * t.max_nodes;
  if (threadIdx.x != 0) return;
  for (int64_t c = 0; c < t.max_nodes; ++c) children[c] = 0;
  const int64_t n = t.row_nodes(b);
  bool valid = t.valid_row_nodes(n) && t.parent(b, 0) == -1;
  for (int64_t c = 1; valid && c < n; ++c) {
    const int64_t parent = t.parent(b, c), x = t.draft_token(b, c);
    valid = parent >= 0 && parent < c && x >= 0 && x < t.vocab;
    if (valid) children[parent] = 1;
  }
  for (int64_t c = 0; !valid && c < t.max_nodes; ++c) children[c] = 0;
  tp.last[b] = valid ? n - 1 : -1;
}

// The walk's p at the current node as scan_chunk weights (kind 1): the node's p* (no slot) or
// the residual in a workspace slot.
template <typename T>
struct WalkLaw {
  const DrawRow<T>& row;
  const double* slot;  // (vocab,); nullptr: p*
  int64_t vocab;

  template <int kVec>
  __device__ __forceinline__ void weights(int64_t k, double (&w_p)[kVec], double (&w_res)[kVec], const ExpTable& table) const {
    if (slot == nullptr) {
      row.laws(k, w_p, w_res, table);  // r~ in w_res, cleared below
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) w_p[e] = k * kVec + e < vocab ? slot[k * kVec + e] : 0.0;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) w_res[e] = 0.0;
  }
};

struct TreeShared {
  ExpTable exp_table;
  double scratch[kDrawThreads / kWarp];
  int64_t index_scratch[kDrawThreads / kWarp];
  PositionInfo info;  // the current node's
  int invalid;
  int accept;
  int p_slot, q_slot;  // the slots of the current p and q; -1: the node's p*, r~
  double p_total, q_total;
};

// One token by inverse CDF from the weights of `law` (cpu/row_ops.h's inverse_cdf): the first
// token whose running mass exceeds u * total, else the last token of positive mass.
template <typename T>
__device__ int64_t draw_from(const WalkLaw<T>& law, double u, TreeShared& sh) {
  constexpr int kVec = Storage<T>::kVec;
  const int64_t vectors = num_vectors<T>(law.vocab);
  double carry[2];
  int64_t last_positive = -1;
  scan_chunk<kVec>(law, 0, vectors, 2, sh.exp_table, sh.scratch, carry, [&](int, int64_t v, double) {
    last_positive = max(last_positive, v);
    return false;
  });
  last_positive = block_reduce<kDrawThreads>(last_positive, [](int64_t a, int64_t c) { return max(a, c); }, sh.index_scratch);
  const double threshold = __dmul_rn(u, carry[1]);
  int64_t first = INT64_MAX;
  scan_chunk<kVec>(law, 0, vectors, 2, sh.exp_table, sh.scratch, carry, [&](int, int64_t v, double running) {
    if (first == INT64_MAX && running > threshold) first = v;
    return first != INT64_MAX;
  });
  first = block_reduce<kDrawThreads>(first, [](int64_t a, int64_t c) { return min(a, c); }, sh.index_scratch);
  return first != INT64_MAX ? first : last_positive;
}

// The rejection of token x at the current node: p <- normalize((p - q)+) unless that has no
// mass, and without replacement q <- normalize(q without x); both read the old p and q.
template <typename T>
__device__ void reject(const TreeProblem<T>& tp, const DrawRow<T>& row, double* laws, int64_t x, TreeShared& sh) {
  constexpr int kVec = Storage<T>::kVec;
  const int64_t vocab = tp.t.vocab;
  const int p_slot = sh.p_slot, q_slot = sh.q_slot;
  const double p_total = sh.p_total, q_total = sh.q_total;
  const double* p_old = p_slot >= 0 ? laws + p_slot * vocab : nullptr;
  const double* q_old = q_slot >= 0 ? laws + q_slot * vocab : nullptr;
  const int residual_slot = p_slot == 0 ? 1 : 0;
  double* residual = laws + residual_slot * vocab;
  double* remaining = laws + 2 * vocab;  // in place over q_old when q has a slot
  double residual_mass = 0.0, remaining_mass = 0.0;
  for (int64_t k = threadIdx.x; k < num_vectors<T>(vocab); k += kDrawThreads) {
    double w_p[kVec], w_r[kVec];
    if (p_old == nullptr || q_old == nullptr) row.laws(k, w_p, w_r, sh.exp_table);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t v = k * kVec + e;
      if (v >= vocab) break;
      const double p = p_old != nullptr ? p_old[v] / p_total : w_p[e];
      const double q = q_old != nullptr ? q_old[v] / q_total : w_r[e];
      residual[v] = residual_weight(p, q, kResidualToleranceFloat32);
      residual_mass = __dadd_rn(residual_mass, residual[v]);
      if (!tp.t.replacement) {
        remaining[v] = v == x ? 0.0 : q;
        remaining_mass = __dadd_rn(remaining_mass, remaining[v]);
      }
    }
  }
  const auto add = [](double a, double c) { return __dadd_rn(a, c); };
  residual_mass = block_reduce<kDrawThreads>(residual_mass, add, sh.scratch);
  if (!tp.t.replacement) remaining_mass = block_reduce<kDrawThreads>(remaining_mass, add, sh.scratch);
  if (threadIdx.x == 0) {
    if (!tp.t.replacement) {
      sh.q_slot = 2;
      sh.q_total = remaining_mass;
    }
    if (residual_mass > 0.0) {
      sh.p_slot = residual_slot;
      sh.p_total = residual_mass;
    }
  }
  __syncthreads();
}

// Grid (batch). One block walks one row (see the overview above).
template <typename T>
__global__ void __launch_bounds__(kDrawThreads) tree_walk_kernel(const TreeProblem<T> tp) {
  constexpr int kWarps = kDrawThreads / kWarp;
  __shared__ TreeShared sh;
  const Problem<T>& pr = tp.pr;
  const TreeParams<T>& t = tp.t;
  const int64_t b = blockIdx.x, max_nodes = t.max_nodes;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  init_exp_table(sh.exp_table);
  if (threadIdx.x == 0) sh.invalid = tp.last[b] < 0;
  __syncthreads();
  const int64_t n = tp.last[b] + 1;  // 0 for an invalid layout
  for (int64_t c = warp; c < n; c += kWarps) {  // warp-uniform: every node's values
    const Combined combined = combine_partials(pr, b * max_nodes + c, sh.exp_table);
    if (lane == 0 && !position_info(pr, b, c, combined).valid) atomicOr(&sh.invalid, 1);
  }
  __syncthreads();
  int64_t* path = t.path + b * max_nodes;
  int64_t* tokens = t.tokens + b * max_nodes;
  float* log_z = t.log_z + b * max_nodes;
  const bool invalid = sh.invalid;
  for (int64_t c = threadIdx.x; c < max_nodes; c += kDrawThreads) {
    path[c] = tokens[c] = -1;
    log_z[c] = invalid ? __int_as_float(0x7fc00000) : 0.0f;  // NaN
  }
  if (invalid) {
    if (threadIdx.x == 0) t.num_accepted[b] = -1;
    return;
  }
  double* laws = tp.laws != nullptr ? tp.laws + b * tp.slots * t.vocab : nullptr;  // nullptr: greedy
  int64_t node = 0, accepted = 0;
  while (true) {
    if (warp == 0) {
      const Combined combined = combine_partials(pr, b * max_nodes + node, sh.exp_table);
      if (lane == 0) {
        sh.info = position_info(pr, b, node, combined);
        sh.p_slot = sh.q_slot = -1;
        sh.p_total = sh.q_total = 1.0;
      }
    }
    __syncthreads();  // also orders the writes above before thread 0's
    if (threadIdx.x == 0) {
      path[accepted] = node;
      log_z[accepted] = static_cast<float>(sh.info.log_z);
    }
    const DrawRow<T> row(pr, b, node, sh.info, 1.0);
    int64_t next = -1;
    for (int64_t child = node + 1; child < n && next < 0; ++child) {  // children in increasing node index
      if (t.parent(b, child) != node) continue;
      const int64_t x = t.draft_token(b, child);
      if (pr.greedy) {
        if (x == sh.info.greedy_token) next = child;
        continue;
      }
      if (!(sh.q_total > 0.0)) continue;  // q without mass (every token removed): rejected, nothing changes
      if (threadIdx.x == 0) {
        double log_p, log_q;
        token_log_laws(pr, b, node, sh.info, x, log_p, log_q);
        const int64_t vocab = t.vocab;
        if (sh.p_slot >= 0) log_p = log(laws[sh.p_slot * vocab + x]) - log(sh.p_total);
        if (sh.q_slot >= 0) log_q = log(laws[sh.q_slot * vocab + x]) - log(sh.q_total);
        sh.accept = log_p > -kInfD && log_q > -kInfD && log(t.uniform(b, child - 1)) < log_p - log_q;
      }
      __syncthreads();
      if (sh.accept) {
        next = child;
      } else {
        reject(tp, row, laws, x, sh);  // its first barrier follows every thread's read of sh.accept
      }
    }
    if (next < 0) {
      const WalkLaw<T> law{row, sh.p_slot >= 0 ? laws + sh.p_slot * t.vocab : nullptr, t.vocab};
      const int64_t token = pr.greedy ? sh.info.greedy_token : draw_from(law, t.uniform(b, n - 1), sh);
      if (threadIdx.x == 0) {
        tokens[accepted] = token;
        t.num_accepted[b] = accepted;
      }
      return;
    }
    if (threadIdx.x == 0) tokens[accepted] = t.draft_token(b, next);
    ++accepted;
    node = next;
    __syncthreads();  // every thread is done with sh before the next node's is written
  }
}

}  // namespace sss_ext::cuda
