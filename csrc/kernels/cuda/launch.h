// Host entry points of the CUDA kernels, framework-free: raw pointers and sizes in the
// structs of ../common.h, a cudaStream_t, a caller-owned workspace. Usable from any engine
// (include this header, link the objects built from csrc/cuda/*.cu).
//
// Contract (both ops):
// - every launch goes to `stream`, nothing synchronises the host, output shapes are fixed,
//   so a call may be captured in a CUDA graph; the return value is the first launch error;
// - the workspace needs no initialisation and must stay untouched until the launches have
//   run; its size depends only on (batch, num_draft, vocab, T);
// - logits rows need unit vocabulary stride; draft_tokens and uniforms may be strided;
//   vocab < 2^31; logits / temperature must stay finite in float32;
// - values are checked on the device, never by the host: a row with a draft id outside
//   [0, vocab), a uniform outside (0, 1), a NaN or +inf logit, an all -inf logits row, or a
//   tilted target without support gets num_accepted = -1, tokens all -1 and log_z NaN
//   (sample: token -1). No input makes a kernel read out of bounds.
// Algorithm and tie rules: /work/shared/spec/ALGORITHM.md, csrc/kernels/cpu/verify.h.
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

}  // namespace sss_ext::cuda
