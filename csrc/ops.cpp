// Schemas of the sss_ext op family (one TORCH_LIBRARY block) and the Python module that
// loads them. Device implementations: csrc/adapter/ops_cpu.cpp, csrc/adapter/ops_cuda.cpp.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(sss_ext, m) {
  // One SSS verification round. logits: (B, K+1, V); draft_tokens: (B, K); uniforms: (B, K+1);
  // num_draft_tokens: (B,) in [0, K], None for K in every row (ragged layout: README "Ragged drafts").
  // Returns tokens (B, K+1), num_accepted (B,), log_z (B, K+1).
  m.def(
      "verify(Tensor target_logits, Tensor draft_logits, Tensor draft_tokens, Tensor? ref_logits, Tensor uniforms, "
      "float temperature, int top_k, float top_p, float shift, str mode, Tensor? num_draft_tokens=None, str top_k_ties=\"keep\") -> (Tensor, Tensor, Tensor)");
  // One token per row from warp(softmax(logits / temperature)). logits: (B, V); uniforms: (B,). Returns (B,).
  // top_k_ties: "keep" (every token tied with the k-th largest score) or "exact-k" (docs/algorithm.md §2).
  m.def("sample(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p, str top_k_ties=\"keep\") -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.def("build_info", [] {
    pybind11::dict info;
#ifdef SSS_EXT_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = SSS_EXT_CUDA_VERSION;
    info["cuda_archs"] = SSS_EXT_CUDA_ARCHS;
    info["cuda_kernels"] = pybind11::make_tuple("verify", "sample");
#else
    info["cuda"] = false;
    info["cuda_version"] = pybind11::none();
    info["cuda_archs"] = pybind11::none();
    info["cuda_kernels"] = pybind11::make_tuple();
#endif
    info["torch_version"] = SSS_EXT_TORCH_VERSION;
    info["cpu_kernels"] = pybind11::make_tuple("verify", "sample");
    return info;
  });
}
