// CPU kernel of tree verification (multi-draft SSS by recursive rejection sampling).
// Framework-free like verify.h: raw pointers in and out, parallel_for injected by the caller.
// Algorithm: docs/algorithm.md §13; reference: sss_ext/reference_tree.py.
#pragma once

#include <vector>

#include "verify.h"

namespace sss_ext::cpu {

using sss_ext::TreeParams;  // common.h: shared with the CUDA kernel

// Errors of the tree layout, beyond common.h's Status. A logits, draft token or uniform error
// is an Error whose position is the node (the uniform column for kBadUniform).
enum class TreeInput : int32_t { kNone = 0, kNumNodes, kParents };

struct TreeError {
  Error error;
  TreeInput input = TreeInput::kNone;  // kNumNodes: num_nodes[row] = value; kParents: parents[row, node] = value
  int64_t row = -1, node = -1, value = 0;
  bool ok() const { return input == TreeInput::kNone && error.ok(); }
};

// The small inputs a row reads: its node count, parents, draft tokens and uniforms.
template <typename T>
TreeError check_tree_inputs(const TreeParams<T>& p) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = p.row_nodes(b);
    if (!p.valid_row_nodes(n)) return TreeError{Error{}, TreeInput::kNumNodes, b, -1, n};
    for (int64_t c = 0; c < n; ++c) {
      const int64_t parent = p.parent(b, c);
      if (c == 0 ? parent != -1 : (parent < 0 || parent >= c)) return TreeError{Error{}, TreeInput::kParents, b, c, parent};
      const int64_t x = c == 0 ? 0 : p.draft_token(b, c);
      if (x < 0 || x >= p.vocab) return TreeError{Error{Status::kBadDraftToken, Which::kNone, b, c, x}};
      const double u = p.uniform(b, c);
      if (!(u > 0.0 && u < 1.0)) return TreeError{Error{Status::kBadUniform, Which::kNone, b, c, -1}};
    }
  }
  return TreeError{};
}

// The per-node distributions are verify's per-position ones (p*, r~, log Z, the tilted argmax):
// node c is a draft position (r~ is needed) when it has children, a bonus position when it is
// a leaf. position_stats also tests a chain draft at a draft position; the tree tests its
// children itself, so that test reads a fixed token 0 and coin 1/2 and its result is unused.
template <typename T>
VerifyParams<T> node_params(const TreeParams<T>& p) {
  static const int64_t kAnyToken = 0;
  static const double kAnyUniform = 0.5;
  VerifyParams<T> v;
  v.target = p.target;
  v.draft = p.draft;
  v.ref = p.ref;
  v.draft_tokens = &kAnyToken;
  v.uniforms = &kAnyUniform;
  v.batch = p.batch;
  v.num_draft = p.max_nodes;
  v.vocab = p.vocab;
  v.sampling = p.sampling;
  v.shift = p.shift;
  return v;
}

// The current p or q of the walk at a node: the node's fresh distribution (log-probabilities from
// its normaliser, exactly as verify tests a draft), or weights / total after a rejection.
struct TreeLaw {
  bool fresh = true;
  double total = 1.0;
  std::vector<double> weights;  // (vocab,), only when !fresh
};

// Recursive rejection sampling in one row. stats: (n,) the row's node statistics.
template <typename T, bool kTilt>
SSS_CPU_MULTIVERSION void walk_tree(const TreeParams<T>& p, int64_t b, const PositionStats* stats, Scratch& scratch, TreeLaw& p_law,
                                    TreeLaw& q_law, std::vector<int64_t>& first_child, std::vector<int64_t>& next_sibling) {
  const int64_t n = p.row_nodes(b), vocab = p.vocab;
  first_child.assign(n, -1);
  next_sibling.assign(n, -1);
  for (int64_t c = n - 1; c >= 1; --c) {  // children in increasing node index
    next_sibling[c] = first_child[p.parent(b, c)];
    first_child[p.parent(b, c)] = c;
  }
  int64_t* path = p.path + b * p.max_nodes;
  int64_t* tokens = p.tokens + b * p.max_nodes;
  float* log_z = p.log_z + b * p.max_nodes;
  for (int64_t i = 0; i < p.max_nodes; ++i) {
    path[i] = tokens[i] = -1;
    log_z[i] = 0.0f;
  }
  const bool greedy = p.sampling.greedy();
  const double tau_inv = greedy ? 1.0 : 1.0 / p.sampling.temperature;
  int64_t node = 0, accepted = 0;
  path[0] = 0;
  while (true) {
    log_z[accepted] = static_cast<float>(stats[node].log_z);
    const PositionScores<T, kTilt> scores{p.target.row(b, node), p.draft.row(b, node), p.has_ref() ? p.ref.row(b, node) : nullptr,
                                          tau_inv, p.shift};
    const LogNormalizer& p_star = stats[node].p_star;
    const LogNormalizer& proposal = stats[node].proposal;
    const auto p_prob = [&](int64_t v) { return p_law.fresh ? p_star.prob(scores.tilted(v), v) : p_law.weights[v] / p_law.total; };
    const auto q_prob = [&](int64_t v) {
      return q_law.fresh ? proposal.prob(scores.proposal(v), v) : q_law.weights[v] / q_law.total;
    };
    p_law.fresh = q_law.fresh = true;
    p_law.total = q_law.total = 1.0;
    int64_t next = -1;
    for (int64_t child = first_child[node]; child >= 0; child = next_sibling[child]) {
      const int64_t x = p.draft_token(b, child);
      if (greedy) {
        if (x == stats[node].greedy_token) {
          next = child;
          break;
        }
        continue;
      }
      if (!(q_law.total > 0.0)) continue;  // q without mass (every token removed): rejected, nothing changes
      const double log_p = p_law.fresh ? p_star.log_prob(scores.tilted(x), x) : std::log(p_law.weights[x]) - std::log(p_law.total);
      const double log_q = q_law.fresh ? proposal.log_prob(scores.proposal(x), x) : std::log(q_law.weights[x]) - std::log(q_law.total);
      if (log_p > -kInf && log_q > -kInf && std::log(p.uniform(b, child - 1)) < log_p - log_q) {
        next = child;
        break;
      }
      // Rejected: p <- normalize((p - q)+) (kept without residual mass); without replacement
      // also q <- normalize(q without x). Both read the old p and q.
      scratch.values.resize(vocab);
      double* residual = scratch.values.data();
      for (int64_t v = 0; v < vocab; ++v) residual[v] = residual_weight(p_prob(v), q_prob(v));
      double residual_mass = 0.0;  // in vocabulary order, as inverse_cdf
      for (int64_t v = 0; v < vocab; ++v) residual_mass += residual[v];
      if (!p.replacement) {
        std::vector<double> remaining(vocab);
        for (int64_t v = 0; v < vocab; ++v) remaining[v] = v == x ? 0.0 : q_prob(v);
        double remaining_mass = 0.0;
        for (int64_t v = 0; v < vocab; ++v) remaining_mass += remaining[v];
        q_law.weights.swap(remaining);
        q_law.total = remaining_mass;
        q_law.fresh = false;
      }
      if (residual_mass > 0.0) {
        p_law.weights.assign(residual, residual + vocab);
        p_law.total = residual_mass;
        p_law.fresh = false;
      }
    }
    if (next < 0) {
      tokens[accepted] = greedy ? stats[node].greedy_token
                         : p_law.fresh ? inverse_cdf(p_prob, vocab, p.uniform(b, n - 1), scratch)
                                       : inverse_cdf([&](int64_t v) { return p_law.weights[v]; }, vocab, p.uniform(b, n - 1), scratch);
      p.num_accepted[b] = accepted;
      return;
    }
    tokens[accepted] = p.draft_token(b, next);
    path[++accepted] = node = next;
  }
}

template <typename T, bool kTilt, class ParallelFor>
TreeError verify_tree_impl(const TreeParams<T>& p, ParallelFor&& parallel_for) {
  const VerifyParams<T> nodes = node_params(p);
  // A node with children is a draft position of verify (r~ is read); a leaf is a bonus position
  // (the draft's logits are read only for the tilt). (batch, max_nodes)
  std::vector<char> has_children(p.batch * p.max_nodes, 0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t c = 1; c < p.row_nodes(b); ++c) has_children[b * p.max_nodes + p.parent(b, c)] = 1;
  std::vector<PositionStats> stats(p.batch * p.max_nodes);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  parallel_for(int64_t(0), p.batch * p.max_nodes, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.max_nodes, c = item % p.max_nodes;
      if (c >= p.row_nodes(b)) continue;  // past the row's nodes: never read
      stats[item] = position_stats<T, kTilt>(nodes, b, c, has_children[item] ? c + 1 : c, scratch);
    }
  });
  for (const PositionStats& s : stats)
    if (!s.error.ok()) return TreeError{s.error};

  parallel_for(int64_t(0), p.batch, std::max<int64_t>(1, grain / p.max_nodes), [&](int64_t begin, int64_t end) {
    Scratch scratch;
    TreeLaw p_law, q_law;
    std::vector<int64_t> first_child, next_sibling;
    for (int64_t b = begin; b < end; ++b)
      walk_tree<T, kTilt>(p, b, &stats[b * p.max_nodes], scratch, p_law, q_law, first_child, next_sibling);
  });
  return TreeError{};
}

// Batched tree verification. Outputs are written only when the returned TreeError is ok().
// With shift == 0 the tilt vanishes (p* = warp(q), Z = 1): the reference is never read.
template <typename T, class ParallelFor>
TreeError verify_tree(const TreeParams<T>& params, ParallelFor&& parallel_for) {
  const TreeError error = check_tree_inputs(params);
  if (!error.ok()) return error;
  if (params.has_ref() && params.shift != 0.0) return verify_tree_impl<T, true>(params, parallel_for);
  TreeParams<T> untilted = params;
  untilted.ref = LogitsView<T>{};
  return verify_tree_impl<T, false>(untilted, parallel_for);
}

}  // namespace sss_ext::cpu
