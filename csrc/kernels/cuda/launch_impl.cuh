// Definitions of the launchers declared in launch.h; included once per storage type by
// csrc/kernels/cuda/instantiate/*.cu, which instantiate them. Framework-free.
#pragma once

#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "launch.h"
#include "tree.cuh"
#include "verify.cuh"

// The one launch statement of the kernels. The CUDA-on-CPU test harness (csrc/testing/)
// defines it first to run the same kernels on host threads.
#ifndef SSS_EXT_LAUNCH
#define SSS_EXT_LAUNCH(kernel, grid, threads, stream, ...) kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace sss_ext::cuda {
namespace detail {

// NVTX ranges around every launch when the environment has SSS_EXT_NVTX=1.
inline bool nvtx_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("SSS_EXT_NVTX");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return enabled;
}

struct NvtxRange {
  bool active;
  explicit NvtxRange(const char* name) : active(nvtx_enabled()) {
    if (active) nvtxRangePushA(name);
  }
  ~NvtxRange() {
    if (active) nvtxRangePop();
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

constexpr size_t align_bytes(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Workspace layout and grid sizes: functions of (batch, num_draft, vocab, T) and of whether
// the call truncates, never of the device, so the same uniforms give the same tokens on a
// given GPU and nothing is queried from the driver at launch (safe inside a CUDA-graph
// capture from the first call). A call that does not truncate gets no truncation buffers.
struct Layout {
  int64_t splits = 1;       // stats blocks per (row, position): chunks of kSplitVectors vectors
  int64_t draw_splits = 1;  // draw chunks per row
  int64_t trunc_chunks = 1;  // histogram / collect blocks per (row, position, stream)
  size_t partials = 0, truncations = 0, chunks = 0, done = 0, hist = 0, plans = 0, trunc_parts = 0, candidates = 0, block_masses = 0,
         total = 0;
};

// Top-k / top-p selection runs: sampled (not greedy) and some token is cut.
inline bool truncates(const Sampling& sampling, int64_t vocab) { return !sampling.greedy() && sampling.truncates(vocab); }

// Block verification runs: asked for on a sampled call (greedy block verification is the token rule).
template <typename T>
bool block_verifies(const VerifyParams<T>& params) { return params.block_verification && !params.sampling.greedy(); }

template <typename T>
Layout layout(int64_t batch, int64_t num_draft, int64_t vocab, bool truncated, bool block = false) {
  const int64_t rows = batch * (num_draft + 1);
  const int64_t vectors = num_vectors<T>(vocab);
  const int64_t selection_rows = truncated ? rows : 0;  // (row, position)s with selection buffers
  Layout out;
  out.splits = std::max<int64_t>(1, (vectors + kSplitVectors - 1) / kSplitVectors);
  out.draw_splits = std::clamp<int64_t>((vectors + 2 * kDrawThreads - 1) / (2 * kDrawThreads), 1, kMaxDrawSplits);
  out.partials = 0;
  out.truncations = out.partials + align_bytes(sizeof(Partial) * rows * out.splits);
  out.chunks = out.truncations + align_bytes(sizeof(Truncation) * rows * 2);
  out.done = out.chunks + align_bytes(sizeof(ChunkTotals) * batch * out.draw_splits);
  // Bucketed top-k / top-p selection: per (row, position, stream).
  out.trunc_chunks = std::max<int64_t>(1, (vectors + kTruncChunkVectors - 1) / kTruncChunkVectors);
  out.hist = out.done + align_bytes(sizeof(unsigned int) * batch);
  out.plans = out.hist + align_bytes(sizeof(TruncHist) * selection_rows * 2 * 2);  // levels 1 and 2
  out.trunc_parts = out.plans + align_bytes(sizeof(TruncPlan) * selection_rows * 2);
  out.candidates = out.trunc_parts + align_bytes(sizeof(TruncChunk) * selection_rows * 2 * out.trunc_chunks);
  out.block_masses = out.candidates + align_bytes(sizeof(Candidate) * selection_rows * 2 * 2 * kTruncCandidates);  // two groups
  out.total = out.block_masses + (block ? align_bytes(sizeof(double) * rows) : 0);
  return out;
}

// kernel<<<grid, threads, 0, stream>>>(problem); returns the launch error.
template <class Args>
cudaError_t launch_kernel(void (*kernel)(Args), int64_t grid, int threads, cudaStream_t stream, const Args& problem) {
  SSS_EXT_LAUNCH(kernel, static_cast<unsigned int>(grid), threads, stream, problem);
  return cudaGetLastError();
}

template <typename T, bool kGreedy, bool kTilt, bool kExact>
cudaError_t launch_stats(const Problem<T>& pr, int64_t rows, cudaStream_t stream) {
  const NvtxRange range("sss_ext::stats");
  return launch_kernel(stats_kernel<T, kGreedy, kTilt, kExact>, rows * pr.splits, kStatsThreads, stream, pr);
}

// The problem of a launch over the workspace laid out by `lay`.
template <typename T>
Problem<T> make_problem(const VerifyParams<T>& params, const Layout& lay, void* workspace) {
  Problem<T> pr;
  pr.p = params;
  pr.greedy = params.sampling.greedy();
  pr.tilt = params.has_ref() && params.shift != 0.0;
  pr.truncated = truncates(params.sampling, params.vocab);
  pr.block = block_verifies(params);
  pr.score.inverse_temperature = pr.greedy ? 1.0 : 1.0 / params.sampling.temperature;
  pr.score.shift = params.shift;
  pr.score.tilt = pr.tilt;
  pr.splits = static_cast<int>(lay.splits);
  pr.draw_splits = pr.greedy ? 1 : static_cast<int>(lay.draw_splits);
  char* base = static_cast<char*>(workspace);
  pr.partials = reinterpret_cast<Partial*>(base + lay.partials);
  pr.truncations = reinterpret_cast<Truncation*>(base + lay.truncations);
  pr.chunks = reinterpret_cast<ChunkTotals*>(base + lay.chunks);
  pr.done = reinterpret_cast<unsigned int*>(base + lay.done);
  pr.trunc_chunks = static_cast<int>(lay.trunc_chunks);
  pr.hist = reinterpret_cast<TruncHist*>(base + lay.hist);
  pr.plans = reinterpret_cast<TruncPlan*>(base + lay.plans);
  pr.trunc_parts = reinterpret_cast<TruncChunk*>(base + lay.trunc_parts);
  pr.candidates = reinterpret_cast<Candidate*>(base + lay.candidates);
  if (pr.block) pr.block_masses = reinterpret_cast<double*>(base + lay.block_masses);
  return pr;
}

// Whether the grids of (batch, num_draft, vocab) fit the launch limits.
inline bool fits_grids(const Layout& lay, int64_t batch, int64_t num_draft) {
  const int64_t rows = batch * (num_draft + 1);
  return rows * std::max<int64_t>(lay.splits, 2) < (int64_t(1) << 31) && batch * lay.draw_splits < (int64_t(1) << 31) &&
         rows * 2 * std::max<int64_t>(lay.trunc_chunks, 2) < (int64_t(1) << 31);
}

// Stages 1-2 (stats, truncation) at every (row, position) of pr.
template <typename T>
cudaError_t launch_position_stages(const Problem<T>& pr, const Layout& lay, cudaStream_t stream) {
  const int64_t rows = pr.p.batch * pr.positions();
  const bool exact = pr.p.vocab < kExactVocab;
  cudaError_t error;
  if (pr.greedy)
    error = pr.tilt ? launch_stats<T, true, true, false>(pr, rows, stream) : launch_stats<T, true, false, false>(pr, rows, stream);
  else if (exact)
    error = pr.tilt ? launch_stats<T, false, true, true>(pr, rows, stream) : launch_stats<T, false, false, true>(pr, rows, stream);
  else
    error = pr.tilt ? launch_stats<T, false, true, false>(pr, rows, stream) : launch_stats<T, false, false, false>(pr, rows, stream);
  if (error != cudaSuccess || !pr.truncated) return error;

  // bucketed selection (bucket_select.cuh): at most 3 passes over the logits
  const NvtxRange range("sss_ext::truncation");
  const int64_t streams = rows * 2, blocks = streams * lay.trunc_chunks;
  if ((error = launch_kernel(truncation_zero_kernel<T>, streams * 2, kTruncationThreads, stream, pr)) != cudaSuccess) return error;
  if ((error = launch_kernel(truncation_histogram_kernel<T>, blocks, kTruncationThreads, stream, pr)) != cudaSuccess) return error;
  if ((error = launch_kernel(truncation_plan_kernel<T>, streams, kTruncationThreads, stream, pr)) != cudaSuccess) return error;
  if ((error = launch_kernel(truncation_refine_kernel<T>, blocks, kTruncationThreads, stream, pr)) != cudaSuccess) return error;
  if ((error = launch_kernel(truncation_plan2_kernel<T>, streams, kTruncationThreads, stream, pr)) != cudaSuccess) return error;
  if ((error = launch_kernel(truncation_collect_kernel<T>, blocks, kTruncationThreads, stream, pr)) != cudaSuccess) return error;
  return launch_kernel(truncation_resolve_kernel<T>, streams, kTruncationThreads, stream, pr);
}

template <typename T>
cudaError_t run(VerifyParams<T> params, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.shift == 0.0) params.ref = LogitsView<T>{};  // no tilt (p* = warp(q), Z = 1): never read d
  if (params.vocab < 1 || params.vocab >= (int64_t(1) << 31) || params.num_draft < 0) return cudaErrorInvalidValue;
  const Layout lay =
      layout<T>(params.batch, params.num_draft, params.vocab, truncates(params.sampling, params.vocab), block_verifies(params));
  if (workspace == nullptr || workspace_bytes < lay.total) return cudaErrorInvalidValue;
  if (!fits_grids(lay, params.batch, params.num_draft)) return cudaErrorInvalidConfiguration;
  const Problem<T> pr = make_problem(params, lay, workspace);
  cudaError_t error = launch_position_stages(pr, lay, stream);
  if (error != cudaSuccess) return error;
  if (pr.block) {  // R_i of every (row, draft position): one pass over the logits of each
    const NvtxRange range("sss_ext::block_mass");
    if ((error = launch_kernel(block_mass_kernel<T>, pr.p.batch * pr.positions(), kDrawThreads, stream, pr)) != cudaSuccess)
      return error;
  }
  const NvtxRange range("sss_ext::draw");
  return launch_kernel(draw_kernel<T>, params.batch * pr.draw_splits, kDrawThreads, stream, pr);
}

// A tree call: verify's workspace for (batch, max_nodes - 1, vocab), then the row layouts and
// the walk's float64 vectors.
struct TreeLayout {
  Layout nodes;
  size_t last = 0, children = 0, laws = 0, total = 0;
  int slots = 0;
};

template <typename T>
TreeLayout tree_layout(const TreeParams<T>& params) {
  TreeLayout out;
  out.nodes = layout<T>(params.batch, params.max_nodes - 1, params.vocab, truncates(params.sampling, params.vocab));
  out.slots = params.sampling.greedy() ? 0 : params.replacement ? 2 : 3;
  out.last = out.nodes.total;
  out.children = out.last + align_bytes(sizeof(int64_t) * params.batch);
  out.laws = out.children + align_bytes(sizeof(unsigned char) * params.batch * params.max_nodes);
  out.total = out.laws + align_bytes(sizeof(double) * params.batch * out.slots * params.vocab);
  return out;
}

// The per-node view of a tree call: VerifyParams with positions = nodes and no chain drafts.
template <typename T>
VerifyParams<T> tree_node_params(const TreeParams<T>& t) {
  VerifyParams<T> v;
  v.target = t.target;
  v.draft = t.draft;
  v.ref = t.ref;
  v.draft_tokens = t.draft_tokens;  // never read: a tree has no chain drafts
  v.uniforms = t.uniforms;
  v.uniforms_stride_batch = t.uniforms_stride_batch;
  v.uniforms_stride_position = t.uniforms_stride_node;
  v.batch = t.batch;
  v.num_draft = t.max_nodes - 1;
  v.vocab = t.vocab;
  v.sampling = t.sampling;
  v.shift = t.shift;
  return v;
}

template <typename T>
cudaError_t run_tree(TreeParams<T> params, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.shift == 0.0) params.ref = LogitsView<T>{};  // no tilt (p* = warp(q), Z = 1): never read d
  if (params.vocab < 1 || params.vocab >= (int64_t(1) << 31) || params.max_nodes < 1) return cudaErrorInvalidValue;
  const TreeLayout lay = tree_layout(params);
  if (workspace == nullptr || workspace_bytes < lay.total) return cudaErrorInvalidValue;
  if (!fits_grids(lay.nodes, params.batch, params.max_nodes - 1) || params.batch >= (int64_t(1) << 31))
    return cudaErrorInvalidConfiguration;
  char* base = static_cast<char*>(workspace);
  TreeProblem<T> tp;
  tp.t = params;
  tp.last = reinterpret_cast<int64_t*>(base + lay.last);
  tp.children = reinterpret_cast<unsigned char*>(base + lay.children);
  tp.laws = lay.slots > 0 ? reinterpret_cast<double*>(base + lay.laws) : nullptr;
  tp.slots = lay.slots;
  tp.pr = make_problem(tree_node_params(params), lay.nodes, workspace);
  tp.pr.tree_last = tp.last;
  tp.pr.tree_children = tp.children;
  cudaError_t error;
  {
    const NvtxRange range("sss_ext::tree_layout");
    if ((error = launch_kernel(tree_layout_kernel<T>, params.batch, kWarp, stream, tp)) != cudaSuccess) return error;
  }
  if ((error = launch_position_stages(tp.pr, lay.nodes, stream)) != cudaSuccess) return error;
  const NvtxRange range("sss_ext::tree_walk");
  return launch_kernel(tree_walk_kernel<T>, params.batch, kDrawThreads, stream, tp);
}

// sample() is verify() with no draft tokens and no reference: the bonus draw from p*[0].
struct SampleLayout {
  size_t num_accepted = 0, log_z = 0, verify = 0, total = 0;
};

template <typename T>
SampleLayout sample_layout(const SampleParams<T>& params) {
  SampleLayout out;
  out.log_z = align_bytes(sizeof(int64_t) * params.batch);
  out.verify = out.log_z + align_bytes(sizeof(float) * params.batch);
  out.total = out.verify + layout<T>(params.batch, 0, params.vocab, truncates(params.sampling, params.vocab)).total;
  return out;
}

}  // namespace detail

template <typename T>
size_t verify_workspace_bytes(const VerifyParams<T>& params) {
  return detail::layout<T>(params.batch, params.num_draft, params.vocab, detail::truncates(params.sampling, params.vocab),
                           detail::block_verifies(params))
      .total;
}

template <typename T>
cudaError_t launch_verify(const VerifyParams<T>& params, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const detail::NvtxRange range("sss_ext::verify");
  return detail::run(params, workspace, workspace_bytes, stream);
}

template <typename T>
size_t verify_tree_workspace_bytes(const TreeParams<T>& params) {
  return detail::tree_layout(params).total;
}

template <typename T>
cudaError_t launch_verify_tree(const TreeParams<T>& params, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const detail::NvtxRange range("sss_ext::verify_tree");
  return detail::run_tree(params, workspace, workspace_bytes, stream);
}

template <typename T>
size_t sample_workspace_bytes(const SampleParams<T>& params) {
  return detail::sample_layout(params).total;
}

template <typename T>
cudaError_t launch_sample(const SampleParams<T>& params, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const detail::NvtxRange range("sss_ext::sample");
  if (params.batch == 0) return cudaSuccess;
  const detail::SampleLayout lay = detail::sample_layout(params);
  if (workspace == nullptr || workspace_bytes < lay.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  VerifyParams<T> v;
  v.target = params.logits;  // (batch, vocab) read as (batch, 1, vocab)
  v.draft = params.logits;   // never read: no draft tokens, no reference
  v.uniforms = params.uniforms;
  v.uniforms_stride_batch = params.uniforms_stride;
  v.uniforms_stride_position = 0;
  v.batch = params.batch;
  v.num_draft = 0;
  v.vocab = params.vocab;
  v.sampling = params.sampling;
  v.shift = 0.0;
  v.tokens = params.tokens;  // (batch, 1)
  v.num_accepted = reinterpret_cast<int64_t*>(base + lay.num_accepted);
  v.log_z = reinterpret_cast<float*>(base + lay.log_z);
  return detail::run(v, base + lay.verify, workspace_bytes - lay.verify, stream);
}

}  // namespace sss_ext::cuda
