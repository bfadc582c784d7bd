// CUDA kernels of the sss_ext op family (docs/algorithm.md §3-§5), framework-free.
// Semantics mirror csrc/kernels/cpu/verify.h token for token; only the precision of the
// log-normalisers differs (see stats below), so tokens can differ from the float64
// reference only where rounding moves a decision or a running sum across u * total
// (the exactness rule in launch.h).
//
// One call is a fixed sequence of launches on one stream, no host sync, fixed shapes:
//   1. stats        grid (batch, num_draft + 1, splits), splits = vocabulary chunks of a
//                   fixed size (the same on every GPU): one pass over the logits with
//                   128-bit loads; per block and score stream (p*, r~, and q, d for log Z)
//                   the max and sum of exp(score - max); value flags; the greedy argmax
//                   (float64 scores, lowest index on ties).
//   2. truncation   only with top-k / top-p: the kept set and its normaliser over exact
//                   float64 scores by bucketed selection (bucket_select.cuh): grids (batch,
//                   num_draft + 1, {p*, r~}, vocabulary chunks of a fixed size), 16-byte
//                   loads, 2 passes over the logits (histogram, collect), 3 when a boundary
//                   bucket must be split (level-2 histogram) or is one score (one chunk read);
//                   rows it cannot settle fall back to the radix descent (radix_select.cuh).
//   3. draw         grid (batch, draw_splits): every block re-derives its row's decisions
//                   from the partials (a warp per position; cheap and deterministic) and
//                   block 0 writes tokens, num_accepted, log_z; then each block sums the
//                   float64 weights of the correction (residual) / bonus distribution of
//                   position j over its vocabulary chunk; the row's last block to finish
//                   picks the chunk where the running mass first exceeds u * total and
//                   rescans that chunk alone (float64 block scan) for the token.
// Greedy calls stop after the decisions (the token is the argmax). Every reduction has a
// fixed order, so a call is deterministic run to run.
//
// A ragged row (num_draft_tokens[b] = n < num_draft) skips every block of positions past n.
// Invalid inputs never cause an out-of-bounds read: a row with a count outside [0, num_draft],
// a draft id outside [0, V), a
// uniform outside (0, 1), a NaN/+inf logit, an all -inf logits row, a scaled logit or tilted
// row maximum outside [-kMaxScaledScore, kMaxScaledScore], or no tilted support gets
// num_accepted = -1, tokens all -1 and log_z NaN (the CPU kernels raise instead).
#pragma once

// The stages in order; each header includes the one before it.
#include "problem.cuh"
#include "stats.cuh"
#include "radix_select.cuh"
#include "bucket_select.cuh"
#include "draw.cuh"
