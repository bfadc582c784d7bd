// Host entry points of the CUDA kernels, framework-free: raw pointers and sizes in the
// structs of ../common.h, a cudaStream_t, a caller-owned workspace. Usable from any engine:
// include <sss_ext/kernels/cuda/launch.h>, link sss_ext::kernels_cuda (docs/cpp_api.md).
//
// Contract (every op):
// - every launch goes to `stream`, nothing synchronises the host and nothing is queried from
//   the driver (grid sizes depend only on the problem sizes), output shapes are fixed, so a
//   call may be captured in a CUDA graph, the first call included; the return value is the
//   first launch error;
// - the workspace needs no initialisation (buffers that must start at zero are zeroed by a
//   kernel of the launch sequence) and must stay untouched until the launches have run; its
//   size depends only on (batch, num_draft, vocab, T) and on whether the call truncates (top-k
//   or top-p cutting some token at temperature > 0): per (row, position) the stats partials,
//   and only for a truncating call the top-k / top-p selection's two 24 KiB integer
//   histograms, a plan, per-chunk sums and 2 x 2048 candidate slots (16 B) per stream {p*, r~}
//   -- about 224 KiB per (row, position), 37 MB at batch 32, num_draft 4; a few KiB otherwise;
// - logits rows need unit vocabulary stride, any alignment (each row is read with 16-byte
//   loads after its own misalignment); draft_tokens and uniforms may be strided; vocab < 2^31;
// - ragged rows (VerifyParams::num_draft_tokens): row b reads positions 0..n only (n =
//   num_draft_tokens[b], its bonus position): logits, draft ids and uniforms past n are
//   neither read nor checked, log_z past n is 0, tokens past the emitted ones are -1;
// - values are checked on the device, never by the host: a row with a count outside
//   [0, num_draft], a draft id outside [0, vocab), a uniform outside (0, 1) (also at
//   temperature 0), a NaN or +inf logit, an all -inf logits row (target positions 0..n,
//   draft positions 0..n-1 and n when ref is given, ref 0..n), a finite logit with
//   |logit / temperature| > kMaxScaledScore (scale 1 at temperature 0), a tilted row maximum
//   outside [-kMaxScaledScore, kMaxScaledScore] or a tilted target without support gets
//   num_accepted = -1, tokens all -1 and log_z NaN
//   (sample: token -1): the rows the CPU kernels refuse. No input makes a kernel read out of
//   bounds;
// - a call is deterministic (fixed reduction orders, fixed vocabulary chunks): the same inputs
//   give the same outputs on every run on the same GPU. Across GPU architectures the float32
//   exponentials (ex2.approx) may round differently, so there the exactness rule is what holds.
//
// Exactness: CUDA tokens equal the float64 reference's except within float32 rounding of a
// decision boundary, the rule stated in docs/algorithm.md §8 (CUDA kernels).
//
// Algorithm and tie rules: docs/algorithm.md, csrc/kernels/cpu/verify.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "../common.h"

namespace sss_ext::cuda {

// Bytes of workspace for launch_verify.
template <typename T>
size_t verify_workspace_bytes(const VerifyParams<T>& params);

// One batched SSS verification round: tokens (batch, num_draft + 1), num_accepted (batch,),
// log_z (batch, num_draft + 1).
template <typename T>
cudaError_t launch_verify(const VerifyParams<T>& params, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Bytes of workspace for launch_sample.
template <typename T>
size_t sample_workspace_bytes(const SampleParams<T>& params);

// One token per row from warp(softmax(logits / temperature)): tokens (batch,).
template <typename T>
cudaError_t launch_sample(const SampleParams<T>& params, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Bytes of workspace for launch_verify_tree: verify's for (batch, max_nodes - 1, vocab), the
// row layouts and, for a sampled call, 2 (with replacement) or 3 float64 vectors of vocab per
// row (the walk's p, its next residual, q).
template <typename T>
size_t verify_tree_workspace_bytes(const TreeParams<T>& params);

// One batched round of tree verification (csrc/kernels/cpu/tree.h, docs/algorithm.md §13):
// path, tokens, log_z (batch, max_nodes), num_accepted (batch,). The contract above holds with
// nodes for positions: a ragged row (TreeParams::num_nodes) reads its nodes < num_nodes[b]
// only; a row the CPU kernel refuses (a node count outside [1, max_nodes], parents[b, 0] != -1
// or parents[b, c] outside [0, c), a draft id outside [0, vocab) or a uniform outside (0, 1) at
// a node < num_nodes[b], and the logits checks at every node, r~'s at the nodes with children)
// gets num_accepted = -1, path and tokens all -1 and log_z NaN.
template <typename T>
cudaError_t launch_verify_tree(const TreeParams<T>& params, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace sss_ext::cuda
