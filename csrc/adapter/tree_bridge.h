// The bridge of tree verification (bridge.h's counterpart for verify_tree): named argument
// checks, the kernel's parameter struct from the checked inputs and outputs, and the kernel's
// errors as ValueErrors that name the argument.
#pragma once

#include "../kernels/cpu/tree.h"
#include "bridge.h"

namespace sss_ext::adapter {

// A checked verify_tree call: logits with unit vocabulary stride, sizes and scalars.
struct TreeInputs {
  Tensor target, draft, draft_tokens, parents, uniforms;
  std::optional<Tensor> ref;        // nullopt: standard SD
  std::optional<Tensor> num_nodes;  // (batch,) int64; nullopt: N for every row
  int64_t batch, max_nodes, vocab;
  ScalarType dtype;
  Sampling sampling;
  double shift;
  bool replacement;
};

struct TreeOutputs {
  Tensor path;          // (batch, max_nodes) int64
  Tensor tokens;        // (batch, max_nodes) int64
  Tensor num_accepted;  // (batch,) int64
  Tensor log_z;         // (batch, max_nodes) float32
};

inline void check_node_ids(const Tensor& t, const char* name, int64_t batch, int64_t max_nodes, const Tensor& target) {
  SSS_CHECK_VALUE(t.dim() == 2 && t.scalar_type() == ScalarType::Long && t.size(0) == batch && t.size(1) == max_nodes, name,
                  " must be an int64 tensor of shape (B, N) = (", batch, ", ", max_nodes, "), got ", PyDtype{t.scalar_type()},
                  " of shape ", PyShape{t.sizes()});
  check_same_device(target, "target_logits", t, name);
}

inline TreeInputs check_tree_args(const Tensor& target_logits, const Tensor& draft_logits, const Tensor& draft_tokens, const Tensor& parents,
                                  const std::optional<Tensor>& ref_logits, const Tensor& uniforms, double temperature, int64_t top_k,
                                  double top_p, double shift, std::string_view mode, bool replacement,
                                  const std::optional<Tensor>& num_nodes, std::string_view top_k_ties) {
  check_logits(target_logits, "target_logits", 3, "(B, N, V)");
  const int64_t batch = target_logits.size(0), max_nodes = target_logits.size(1), vocab = target_logits.size(2);
  SSS_CHECK_VALUE(max_nodes >= 1, "target_logits must have shape (B, N, V) with N >= 1 (node 0 is the root), got ",
                  PyShape{target_logits.sizes()});
  SSS_CHECK_VALUE(vocab >= 1, "target_logits must have a vocabulary dimension of size >= 1");
  const ScalarType dtype = target_logits.scalar_type();
  SSS_CHECK_VALUE(draft_logits.defined(), "draft_logits must be a torch.Tensor of shape (B, N, V), got None");
  const bool has_ref = is_given(ref_logits);
  for (const auto& [tensor, name] : {std::pair<const Tensor*, const char*>{&draft_logits, "draft_logits"},
                                     std::pair<const Tensor*, const char*>{has_ref ? &*ref_logits : nullptr, "ref_logits"}}) {
    if (tensor == nullptr) continue;
    check_logits(*tensor, name, 3, "(B, N, V)");
    SSS_CHECK_VALUE(tensor->sizes().equals(target_logits.sizes()), name, " must have shape (B, N, V) = ", PyShape{target_logits.sizes()},
                    ", got ", PyShape{tensor->sizes()});
    SSS_CHECK_VALUE(tensor->scalar_type() == dtype, name, " must have the dtype of target_logits (", dtype, "), got ",
                    tensor->scalar_type());
    check_same_device(target_logits, "target_logits", *tensor, name);
  }
  check_node_ids(draft_tokens, "draft_tokens", batch, max_nodes, target_logits);
  check_node_ids(parents, "parents", batch, max_nodes, target_logits);
  SSS_CHECK_VALUE(uniforms.scalar_type() == ScalarType::Double && uniforms.dim() == 2 && uniforms.size(0) == batch &&
                      uniforms.size(1) == max_nodes,
                  "uniforms must be a float64 tensor of shape (B, N) = (", batch, ", ", max_nodes, "), got ",
                  PyDtype{uniforms.scalar_type()}, " of shape ", PyShape{uniforms.sizes()});
  check_same_device(target_logits, "target_logits", uniforms, "uniforms");
  check_sampling(temperature, top_k, top_p);
  SSS_CHECK_VALUE(std::isfinite(shift) && shift >= 0, "shift (lambda) must be a finite float >= 0, got ", shift);
  SSS_CHECK_VALUE(mode == "exact", "mode must be 'exact' for tree verification (the paper's rule has no tree form), got '", mode, "'");
  const TopKTies ties = parse_top_k_ties(top_k_ties);
  const bool ragged = is_given(num_nodes);
  if (ragged) {  // values in [1, N] are checked by the kernel
    const Tensor& counts = *num_nodes;
    SSS_CHECK_VALUE(counts.dim() == 1 && counts.scalar_type() == ScalarType::Long && counts.size(0) == batch,
                    "num_nodes must be an int64 tensor of shape (B,) = (", batch, ",), got ", PyDtype{counts.scalar_type()},
                    " of shape ", PyShape{counts.sizes()});
    check_same_device(target_logits, "target_logits", counts, "num_nodes");
  }
  return TreeInputs{vocab_contiguous(target_logits),
                    vocab_contiguous(draft_logits),
                    draft_tokens,
                    parents,
                    uniforms,
                    has_ref ? std::optional<Tensor>(vocab_contiguous(*ref_logits)) : std::nullopt,
                    ragged ? num_nodes : std::nullopt,
                    batch,
                    max_nodes,
                    vocab,
                    dtype,
                    Sampling{temperature, top_k, top_p, ties},
                    shift,
                    replacement};
}

inline TreeOutputs empty_tree_outputs(const TreeInputs& in) {
  const int64_t rows_nodes[] = {in.batch, in.max_nodes};
  const int64_t rows[] = {in.batch};
  return TreeOutputs{empty_on(in.target, rows_nodes, OutputDtype::kInt64), empty_on(in.target, rows_nodes, OutputDtype::kInt64),
                     empty_on(in.target, rows, OutputDtype::kInt64), empty_on(in.target, rows_nodes, OutputDtype::kFloat32)};
}

template <typename T>
TreeParams<T> tree_params(const TreeInputs& in, const TreeOutputs& out) {
  TreeParams<T> p;
  p.target = logits_view<T>(in.target);
  p.draft = logits_view<T>(in.draft);
  if (in.ref) p.ref = logits_view<T>(*in.ref);
  p.draft_tokens = input_data<int64_t>(in.draft_tokens);
  p.draft_tokens_stride_batch = in.draft_tokens.stride(0);
  p.draft_tokens_stride_node = in.draft_tokens.stride(1);
  p.parents = input_data<int64_t>(in.parents);
  p.parents_stride_batch = in.parents.stride(0);
  p.parents_stride_node = in.parents.stride(1);
  p.uniforms = input_data<double>(in.uniforms);
  p.uniforms_stride_batch = in.uniforms.stride(0);
  p.uniforms_stride_node = in.uniforms.stride(1);
  if (in.num_nodes) {
    p.num_nodes = input_data<int64_t>(*in.num_nodes);
    p.num_nodes_stride = in.num_nodes->stride(0);
  }
  p.batch = in.batch;
  p.max_nodes = in.max_nodes;
  p.vocab = in.vocab;
  p.sampling = in.sampling;
  p.shift = in.shift;
  p.replacement = in.replacement;
  p.path = output_data<int64_t>(out.path);
  p.tokens = output_data<int64_t>(out.tokens);
  p.num_accepted = output_data<int64_t>(out.num_accepted);
  p.log_z = output_data<float>(out.log_z);
  return p;
}

// Raises a ValueError for a kernel-reported error; returns normally when ok.
inline void raise_if_tree_error(const cpu::TreeError& e, int64_t max_nodes, int64_t vocab) {
  switch (e.input) {
    case cpu::TreeInput::kNumNodes:
      throw_value_error("num_nodes must hold values in [1, N] = [1, ", max_nodes, "], found ", e.value, " at row ", e.row);
    case cpu::TreeInput::kParents:
      if (e.node == 0) throw_value_error("parents[b, 0] must be -1 (node 0 is the root), found ", e.value, " at row ", e.row);
      throw_value_error("parents must satisfy 0 <= parents[b, c] < c for nodes c >= 1, found ", e.value, " at (row, node) (", e.row,
                        ", ", e.node, ")");
    case cpu::TreeInput::kNone: break;
  }
  const Error& error = e.error;
  switch (error.status) {
    case Status::kOk: return;
    case Status::kBadDraftToken:
      throw_value_error("draft_tokens must hold token ids in [0, ", vocab, ") at nodes c >= 1, found ", error.value_index,
                        " at (row, node) (", error.batch_index, ", ", error.position, ")");
    case Status::kBadUniform:
      throw_value_error("uniforms must lie in the open interval (0, 1); 0, 1 and NaN are not allowed, found at (row, column) (",
                        error.batch_index, ", ", error.position, ")");
    case Status::kNonFiniteLogit:
      throw_value_error(tensor_name(error.which), " must be finite or -inf; found NaN or +inf at row ", error.batch_index, ", node ",
                        error.position, ", token ", error.value_index);
    case Status::kEmptyRow:
      throw_value_error(tensor_name(error.which), " has a row with every logit -inf (no token can be drawn) at row ", error.batch_index,
                        ", node ", error.position);
    case Status::kScoreRange:
      if (error.which == Which::kNone)
        throw_value_error("the tilted score zq/temperature + shift * (zr/temperature - zd/temperature) has a row maximum outside "
                          "[-1e300, 1e300] at row ",
                          error.batch_index, ", node ", error.position, ": use a smaller shift or a larger temperature");
      throw_value_error(tensor_name(error.which), " / temperature leaves the supported range [-1e300, 1e300] at row ", error.batch_index,
                        ", node ", error.position, ": use a larger temperature (or 0 for greedy) or smaller logits");
    case Status::kNoSupport:
      throw_value_error("the tilted target p* has no token with positive probability at row ", error.batch_index, ", node ",
                        error.position, ": target_logits, draft_logits and ref_logits mask disjoint vocabularies");
    default: throw_value_error("verify_tree: unexpected kernel status ", status_name(error.status));
  }
}

}  // namespace sss_ext::adapter
