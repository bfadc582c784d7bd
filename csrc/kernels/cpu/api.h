// The CPU kernels in one include: cpu::verify / cpu::sample (verify.h) and cpu::verify_tree
// (tree.h) with an injected parallel_for (parallel.h), their serial one-argument forms, and
// status names (status.h).
// Header-only; C++17; build with -ffp-contract=off (sss_ext::kernels_cpu adds it) so the
// float64 arithmetic rounds like the reference. Contract: docs/cpp_api.md.
#pragma once

#include "../status.h"
#include "parallel.h"
#include "tree.h"
#include "verify.h"

namespace sss_ext::cpu {

// verify(params, SerialFor{}): one batched SSS verification round on the calling thread.
template <typename T>
Error verify(const VerifyParams<T>& params) {
  return verify(params, SerialFor{});
}

// sample(params, SerialFor{}): one token per row on the calling thread.
template <typename T>
Error sample(const SampleParams<T>& params) {
  return sample(params, SerialFor{});
}

// verify_tree(params, SerialFor{}): one batched tree verification round on the calling thread.
template <typename T>
TreeError verify_tree(const TreeParams<T>& params) {
  return verify_tree(params, SerialFor{});
}

}  // namespace sss_ext::cpu
