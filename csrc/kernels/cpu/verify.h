// CPU kernels of the sss_ext op family: batched SSS verification and the fused sampler.
// Framework-free: raw pointers in, raw pointers out, parallelism injected by the caller as
// parallel_for(begin, end, grain, fn(begin, end)). Algorithm: docs/algorithm.md §1-§4.
#pragma once

#include <vector>

#include "row_ops.h"

namespace sss_ext::cpu {

// The scores of one (row, position): tilted target s, proposal zr / tau, and the untilted
// target / reference. kTilt = false means s = zq / tau (no reference model or lambda = 0).
// "/ tau" is "* (1 / tau)" everywhere (also in the reference), so all round alike.
template <typename T, bool kTilt>
struct PositionScores {
  const T* target;  // (vocab,)
  const T* draft;   // (vocab,), nullptr at the row's bonus position without a reference
  const T* ref;     // (vocab,), nullptr without a reference
  double inverse_temperature;
  double shift;
  SSS_FORCE_INLINE double tilted(int64_t v) const {
    const double q = load(target, v);
    if constexpr (!kTilt) {
      return q * inverse_temperature;
    } else {
      const double r = load(draft, v);
      const double d = load(ref, v);
      const double s = q * inverse_temperature + shift * (r * inverse_temperature - d * inverse_temperature);
      return (q == -kInf || r == -kInf || d == -kInf) ? -kInf : s;
    }
  }
  SSS_FORCE_INLINE double proposal(int64_t v) const { return load(draft, v) * inverse_temperature; }
  SSS_FORCE_INLINE double target_score(int64_t v) const { return load(target, v) * inverse_temperature; }
  SSS_FORCE_INLINE double ref_score(int64_t v) const { return load(ref, v) * inverse_temperature; }
};

template <typename T>
inline int64_t draft_token(const VerifyParams<T>& p, int64_t b, int64_t i) {
  return p.draft_tokens[b * p.draft_tokens_stride_batch + i * p.draft_tokens_stride_position];
}

template <typename T>
inline double uniform(const VerifyParams<T>& p, int64_t b, int64_t i) {
  return p.uniforms[b * p.uniforms_stride_batch + i * p.uniforms_stride_position];
}

// What verification needs to know about one (row, position).
struct PositionStats {
  LogNormalizer p_star;    // warp(softmax(s))
  LogNormalizer proposal;  // warp(softmax(zr / tau)), positions < the row's draft count
  double log_z = 0.0;      // log sum_v q (r/d)^lambda, untruncated
  int64_t greedy_token = -1;
  bool accept = false;
  double log_ratio = -kInf;  // log p*(x) - log r~(x) at the draft x; -inf where either is 0
  Error error;
};

// Rejects NaN / +inf, all -inf rows and rows whose finite logits scaled by
// inverse_temperature leave [-kMaxScaledScore, kMaxScaledScore]; returns the row maximum.
template <typename T>
SSS_FORCE_INLINE double checked_row_max(const T* row, int64_t vocab, double inverse_temperature, Which which, int64_t b,
                                        int64_t i, Error& error) {
  double best = -kInf, lowest = kInf;
  int bad = 0;
#pragma omp simd reduction(max : best) reduction(min : lowest) reduction(| : bad)
  for (int64_t v = 0; v < vocab; ++v) {
    const double x = load(row, v);
    bad |= !(x < kInf);
    best = std::max(best, x);
    lowest = std::min(lowest, x == -kInf ? kInf : x);
  }
  if (bad) {
    int64_t v = 0;
    while (load(row, v) < kInf) ++v;
    error = Error{Status::kNonFiniteLogit, which, b, i, v};
  } else if (best == -kInf) {
    error = Error{Status::kEmptyRow, which, b, i, -1};
  } else if (!(std::max(std::fabs(best), std::fabs(lowest)) * inverse_temperature <= kMaxScaledScore)) {
    error = Error{Status::kScoreRange, which, b, i, -1};
  }
  return best;
}

// log Z = log sum_v q (r/d)^lambda from the scaled row maxima (m_*) and shifted log-sums
// (l_* = log sum exp(x - m_*)); the two groups are summed apart so neither loses the other.
SSS_FORCE_INLINE double log_normaliser_z(double m_s, double l_s, double m_q, double l_q, double m_r, double l_r, double m_d,
                                         double l_d, double shift) {
  return (m_s - m_q - shift * (m_r - m_d)) + (l_s - l_q - shift * (l_r - l_d));
}

// Position i <= num_draft of row b, which verifies num_draft drafts.
template <typename T, bool kTilt>
SSS_CPU_MULTIVERSION PositionStats position_stats(const VerifyParams<T>& p, int64_t b, int64_t i, int64_t num_draft, Scratch& scratch) {
  PositionStats out;
  const bool has_draft = i < num_draft;                              // a draft token to accept or reject
  const bool has_proposal = has_draft && !p.one_hot_proposal;        // ... drawn from r~, not one-hot
  const bool has_ref = p.has_ref();
  const bool greedy = p.sampling.greedy();
  const PositionScores<T, kTilt> scores{p.target.row(b, i), (has_proposal || has_ref) ? p.draft.row(b, i) : nullptr,
                                        has_ref ? p.ref.row(b, i) : nullptr, greedy ? 1.0 : 1.0 / p.sampling.temperature,
                                        p.shift};
  const double tau_inv = scores.inverse_temperature;
  const double target_max = checked_row_max(scores.target, p.vocab, tau_inv, Which::kTarget, b, i, out.error);
  double draft_max = -kInf, ref_max = -kInf;
  if (out.error.ok() && scores.draft) draft_max = checked_row_max(scores.draft, p.vocab, tau_inv, Which::kDraft, b, i, out.error);
  if (out.error.ok() && has_ref) ref_max = checked_row_max(scores.ref, p.vocab, tau_inv, Which::kRef, b, i, out.error);
  if (!out.error.ok()) return out;

  const auto tilted = [&](int64_t v) { return scores.tilted(v); };
  const double tilted_max = kTilt ? row_max(tilted, p.vocab) : target_max * tau_inv;
  if (tilted_max == -kInf) {
    out.error = Error{Status::kNoSupport, Which::kNone, b, i, -1};
    return out;
  }
  if (!(std::fabs(tilted_max) <= kMaxScaledScore)) {
    out.error = Error{Status::kScoreRange, Which::kNone, b, i, -1};
    return out;
  }
  if (greedy) {
    out.greedy_token = row_argmax(tilted, p.vocab);
    out.accept = has_draft && draft_token(p, b, i) == out.greedy_token;
    return out;
  }

  const double proposal_max = draft_max * tau_inv, target_max_t = target_max * tau_inv, ref_max_t = ref_max * tau_inv;
  const auto proposal = [&](int64_t v) { return scores.proposal(v); };
  // Untruncated shifted log-sums of s, zr/tau, zq/tau, zd/tau (the last three only with a reference).
  double l_s, l_r = 0.0, l_q = 0.0, l_d = 0.0;
  if (!p.sampling.truncates(p.vocab)) {
    // One fused pass for every normaliser this position needs.
    const int64_t vocab = p.vocab;
    double sum_s = 0.0, sum_r = 0.0, sum_q = 0.0, sum_d = 0.0;
    if (has_ref) {
#pragma omp simd reduction(+ : sum_s, sum_r, sum_q, sum_d)
      for (int64_t v = 0; v < vocab; ++v) {
        sum_s += exp_nonpositive(scores.tilted(v) - tilted_max);
        sum_r += exp_nonpositive(scores.proposal(v) - proposal_max);
        sum_q += exp_nonpositive(scores.target_score(v) - target_max_t);
        sum_d += exp_nonpositive(scores.ref_score(v) - ref_max_t);
      }
      l_q = std::log(sum_q);
      l_d = std::log(sum_d);
    } else if (has_proposal) {
#pragma omp simd reduction(+ : sum_s, sum_r)
      for (int64_t v = 0; v < vocab; ++v) {
        sum_s += exp_nonpositive(scores.tilted(v) - tilted_max);
        sum_r += exp_nonpositive(scores.proposal(v) - proposal_max);
      }
    } else {
#pragma omp simd reduction(+ : sum_s)
      for (int64_t v = 0; v < vocab; ++v) sum_s += exp_nonpositive(scores.tilted(v) - tilted_max);
    }
    l_s = std::log(sum_s);
    l_r = std::log(sum_r);
    out.p_star.max = tilted_max;
    out.p_star.log_sum = l_s;
    out.proposal.max = proposal_max;
    out.proposal.log_sum = l_r;
  } else {
    out.p_star = normalize(tilted, p.vocab, tilted_max, p.sampling, scratch);
    if (has_proposal) out.proposal = normalize(proposal, p.vocab, proposal_max, p.sampling, scratch);
    if (has_ref) {
      l_s = log_sum_exp_shifted(tilted, p.vocab, tilted_max);
      l_r = log_sum_exp_shifted(proposal, p.vocab, proposal_max);
      l_q = log_sum_exp_shifted([&](int64_t v) { return scores.target_score(v); }, p.vocab, target_max_t);
      l_d = log_sum_exp_shifted([&](int64_t v) { return scores.ref_score(v); }, p.vocab, ref_max_t);
    }
  }
  if (has_ref) out.log_z = log_normaliser_z(tilted_max, l_s, target_max_t, l_q, proposal_max, l_r, ref_max_t, l_d, p.shift);

  if (has_draft) {
    const int64_t x = draft_token(p, b, i);
    const double u = uniform(p, b, i);
    const double log_p = out.p_star.log_prob(scores.tilted(x), x);
    const double log_r = has_proposal ? out.proposal.log_prob(scores.proposal(x), x) : 0.0;  // one-hot: r~(x) = 1
    const double log_m = p.paper_mode ? log_p + out.log_z : log_p;
    out.accept = log_p > -kInf && log_r > -kInf && std::log(u) < log_m - log_r;
    if (log_p > -kInf && log_r > -kInf) out.log_ratio = log_p - log_r;
  }
  return out;
}

// Block verification (docs/algorithm.md §12). Notation: P_i = p*_i, Q_i = r~_i, draft x_i at
// position i. log p_i of a row from its positions' stats: p_0 = 1,
// p_{k+1} = min(1, p_k P_k(x_k) / Q_k(x_k)).
inline double block_log_weight(const PositionStats* row, int64_t i) {
  double log_weight = 0.0;
  for (int64_t k = 0; k < i; ++k) log_weight = std::min(0.0, log_weight + row[k].log_ratio);
  return log_weight;
}

// R_i = sum_v (p_i P_i(v) - Q_i(v))+ at draft position i of row b (weight = p_i); one-hot
// drafts: p_i (1 - P_i(x_i)).
template <typename T, bool kTilt>
SSS_CPU_MULTIVERSION double block_residual_mass(const VerifyParams<T>& p, int64_t b, int64_t i, const PositionStats& stats,
                                                double weight) {
  const PositionScores<T, kTilt> scores{p.target.row(b, i), (!p.one_hot_proposal || p.has_ref()) ? p.draft.row(b, i) : nullptr,
                                        p.has_ref() ? p.ref.row(b, i) : nullptr, 1.0 / p.sampling.temperature, p.shift};
  if (p.one_hot_proposal) {
    const int64_t x = draft_token(p, b, i);
    return weight * (1.0 - stats.p_star.prob(scores.tilted(x), x));
  }
  double mass = 0.0;
  for (int64_t v = 0; v < p.vocab; ++v)
    mass += residual_weight(weight * stats.p_star.prob(scores.tilted(v), v), stats.proposal.prob(scores.proposal(v), v));
  return mass;
}

// tau of a row (the accepted prefix length): the largest i in 1..n with u[i-1] < h_i (h_n = p_n,
// n the row's draft count), else 0; sets weight = p_tau.
template <typename T>
int64_t block_prefix(const VerifyParams<T>& p, int64_t b, const PositionStats* row, const double* masses, int64_t num_draft,
                     double& weight) {
  int64_t tau = 0;
  weight = 1.0;
  for (int64_t i = 1; i <= num_draft; ++i) {
    const double weight_i = std::exp(block_log_weight(row, i));
    const double h = i < num_draft ? block_threshold(masses[i], weight_i) : weight_i;
    if (uniform(p, b, i - 1) < h) {
      tau = i;
      weight = weight_i;
    }
  }
  return tau;
}

// The correction (first rejection j < num_draft) or bonus (j == num_draft) token of row b,
// which verifies num_draft drafts; driven by the uniform at position num_draft. The correction
// weighs p* by `weight` (block verification: p_j; token verification: 1).
template <typename T, bool kTilt>
SSS_CPU_MULTIVERSION int64_t draw_last_token(const VerifyParams<T>& p, int64_t b, int64_t j, int64_t num_draft, const PositionStats& stats,
                                             double weight, Scratch& scratch) {
  if (p.sampling.greedy()) return stats.greedy_token;
  const bool reads_draft = (j < num_draft && !p.one_hot_proposal) || p.has_ref();
  const PositionScores<T, kTilt> scores{p.target.row(b, j), reads_draft ? p.draft.row(b, j) : nullptr,
                                        p.has_ref() ? p.ref.row(b, j) : nullptr, 1.0 / p.sampling.temperature, p.shift};
  const double u = uniform(p, b, num_draft);
  const auto p_star = [&](int64_t v) { return stats.p_star.prob(scores.tilted(v), v); };
  if (j < num_draft && p.paper_mode) {
    // (Z p* - r~)+ / Z = (p* - exp(log r~ - log Z))+: the same law, no overflow for any log Z.
    const double log_z = stats.log_z;
    const auto residual = [&](int64_t v) {
      const double log_r = stats.proposal.log_prob(scores.proposal(v), v);
      return residual_weight(p_star(v), log_r == -kInf ? 0.0 : std::exp(log_r - log_z));
    };
    const int64_t token = inverse_cdf(residual, p.vocab, u, scratch);
    if (token >= 0) return token;
  } else if (j < num_draft && p.one_hot_proposal) {
    // (p* - 1[v = x])+ = p* without the rejected draft x.
    const int64_t x = draft_token(p, b, j);
    const auto residual = [&](int64_t v) { return v == x ? 0.0 : weight * p_star(v); };
    const int64_t token = inverse_cdf(residual, p.vocab, u, scratch);
    if (token >= 0) return token;
  } else if (j < num_draft) {
    const auto residual = [&](int64_t v) {
      return residual_weight(weight * p_star(v), stats.proposal.prob(scores.proposal(v), v));
    };
    const int64_t token = inverse_cdf(residual, p.vocab, u, scratch);
    if (token >= 0) return token;
  }
  return inverse_cdf(p_star, p.vocab, u, scratch);
}

// Validates the small inputs a row reads (draft counts, draft ids and uniforms up to its
// bonus position); the logits are checked row by row inside the kernel.
template <typename T>
Error check_tokens_and_uniforms(const VerifyParams<T>& p) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t num_draft = p.row_draft(b);
    if (!p.valid_row_draft(num_draft)) return Error{Status::kBadNumDraft, Which::kNone, b, -1, num_draft};
    for (int64_t i = 0; i < num_draft; ++i) {
      const int64_t x = draft_token(p, b, i);
      if (x < 0 || x >= p.vocab) return Error{Status::kBadDraftToken, Which::kNone, b, i, x};
    }
    for (int64_t i = 0; i <= num_draft; ++i) {
      const double u = uniform(p, b, i);
      if (!(u > 0.0 && u < 1.0)) return Error{Status::kBadUniform, Which::kNone, b, i, -1};
    }
  }
  return Error{};
}

template <typename T, bool kTilt, class ParallelFor>
Error verify_impl(const VerifyParams<T>& p, ParallelFor&& parallel_for) {
  const int64_t positions = p.num_draft + 1;
  std::vector<PositionStats> stats(p.batch * positions);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  parallel_for(int64_t(0), p.batch * positions, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / positions, i = item % positions, num_draft = p.row_draft(b);
      if (i <= num_draft) stats[item] = position_stats<T, kTilt>(p, b, i, num_draft, scratch);  // past it: never read
    }
  });
  for (const PositionStats& s : stats)
    if (!s.error.ok()) return s.error;

  // Block verification: R_i at draft positions 1 <= i < n of each row (n: its draft count).
  const bool block = p.block_verification && !p.sampling.greedy();
  std::vector<double> masses(block ? p.batch * positions : 0);
  if (block) {
    parallel_for(int64_t(0), p.batch * positions, grain, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / positions, i = item % positions;
        if (i == 0 || i >= p.row_draft(b)) continue;
        const PositionStats* row = &stats[b * positions];
        masses[item] = block_residual_mass<T, kTilt>(p, b, i, row[i], std::exp(block_log_weight(row, i)));
      }
    });
  }

  parallel_for(int64_t(0), p.batch, std::max<int64_t>(1, grain / positions), [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t b = begin; b < end; ++b) {
      const PositionStats* row = &stats[b * positions];
      const int64_t num_draft = p.row_draft(b);
      int64_t accepted = 0;
      double weight = 1.0;
      if (block)
        accepted = block_prefix(p, b, row, &masses[b * positions], num_draft, weight);
      else
        while (accepted < num_draft && row[accepted].accept) ++accepted;
      int64_t* tokens = p.tokens + b * positions;
      for (int64_t i = 0; i < positions; ++i) {
        tokens[i] = i < accepted ? draft_token(p, b, i) : -1;
        p.log_z[b * positions + i] = static_cast<float>(row[i].log_z);  // 0 past the bonus position
      }
      tokens[accepted] = draw_last_token<T, kTilt>(p, b, accepted, num_draft, row[accepted], weight, scratch);
      p.num_accepted[b] = accepted;
    }
  });
  return Error{};
}

// Batched SSS verification. Outputs are written only when the returned Error is ok().
// With shift == 0 the tilt vanishes (p* = warp(q), Z = 1): the reference is never read.
template <typename T, class ParallelFor>
Error verify(const VerifyParams<T>& params, ParallelFor&& parallel_for) {
  const Error error = check_tokens_and_uniforms(params);
  if (!error.ok()) return error;
  if (params.has_ref() && params.shift != 0.0) return verify_impl<T, true>(params, parallel_for);
  VerifyParams<T> untilted = params;
  untilted.ref = LogitsView<T>{};
  return verify_impl<T, false>(untilted, parallel_for);
}

// One token per row from warp(softmax(logits / tau)) by inverse CDF, or the argmax at tau = 0.
template <typename T, class ParallelFor>
Error sample(const SampleParams<T>& p, ParallelFor&& parallel_for) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const double u = p.uniforms[b * p.uniforms_stride];
    if (!(u > 0.0 && u < 1.0)) return Error{Status::kBadUniform, Which::kNone, b, -1, -1};
  }
  std::vector<Error> errors(p.batch);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  parallel_for(int64_t(0), p.batch, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t b = begin; b < end; ++b) {
      const T* row = p.logits.row(b, 0);
      const double tau_inv = p.sampling.greedy() ? 1.0 : 1.0 / p.sampling.temperature;
      const double max = checked_row_max(row, p.vocab, tau_inv, Which::kLogits, b, -1, errors[b]);
      if (!errors[b].ok()) continue;
      if (p.sampling.greedy()) {
        p.tokens[b] = row_argmax([&](int64_t v) { return load(row, v); }, p.vocab);
        continue;
      }
      const auto score = [&](int64_t v) { return load(row, v) * tau_inv; };
      const LogNormalizer norm = normalize(score, p.vocab, max * tau_inv, p.sampling, scratch);
      p.tokens[b] = inverse_cdf([&](int64_t v) { return norm.prob(score(v), v); }, p.vocab, p.uniforms[b * p.uniforms_stride], scratch);
    }
  });
  for (const Error& e : errors)
    if (!e.ok()) return e;
  return Error{};
}

}  // namespace sss_ext::cpu
