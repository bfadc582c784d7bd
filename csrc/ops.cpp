// Schemas of the sss_ext op family (one STABLE_TORCH_LIBRARY block) and the Python module that
// loads them: a CPython limited-API (abi3) module whose one function, build_info(), reports
// what the build was compiled with. Device implementations: csrc/adapter/ops_cpu.cpp,
// csrc/adapter/ops_cuda.cpp.
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include <string>

STABLE_TORCH_LIBRARY(sss_ext, m) {
  // One SSS verification round. logits: (B, K+1, V); draft_tokens: (B, K); uniforms: (B, K+1);
  // num_draft_tokens: (B,) in [0, K], None for K in every row (ragged layout: docs/ops.md, "Ragged drafts").
  // draft_logits None: one-hot drafts (a deterministic proposer); aligned_logits (B, K+1, V) then
  // gives r for the tilt. verification: "token" or "block" (docs/algorithm.md §12).
  // Returns tokens (B, K+1), num_accepted (B,), log_z (B, K+1).
  m.def(
      "verify(Tensor target_logits, Tensor? draft_logits, Tensor draft_tokens, Tensor? ref_logits, Tensor uniforms, "
      "float temperature, int top_k, float top_p, float shift, str mode, Tensor? num_draft_tokens=None, str top_k_ties=\"keep\", "
      "Tensor? aligned_logits=None, str verification=\"token\") -> (Tensor, Tensor, Tensor)");
  // One token per row from warp(softmax(logits / temperature)). logits: (B, V); uniforms: (B,). Returns (B,).
  // top_k_ties: "keep" (every token tied with the k-th largest score) or "exact-k" (docs/algorithm.md §2).
  m.def("sample(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p, str top_k_ties=\"keep\") -> Tensor");
  // Tree verification (docs/algorithm.md §13). logits: (B, N, V) at nodes 0..N-1 (node 0 the root); draft_tokens,
  // parents, uniforms: (B, N); num_nodes: (B,) in [1, N], None for N in every row.
  // Returns path (B, N), tokens (B, N), num_accepted (B,), log_z (B, N).
  m.def(
      "verify_tree(Tensor target_logits, Tensor draft_logits, Tensor draft_tokens, Tensor parents, Tensor? ref_logits, "
      "Tensor uniforms, float temperature, int top_k, float top_p, float shift, str mode, bool replacement, "
      "Tensor? num_nodes=None, str top_k_ties=\"keep\") -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

// "major.minor" of a version macro whose top bytes hold major and minor (TORCH_TARGET_VERSION:
// byte 7 and 6; Py_LIMITED_API: byte 3 and 2).
std::string major_minor(unsigned long long version, int major_shift) {
  return std::to_string((version >> major_shift) & 0xff) + "." + std::to_string((version >> (major_shift - 8)) & 0xff);
}

// Adds key: value to dict, taking the reference to value; false (Python error set) on failure.
bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int status = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return status == 0;
}

PyObject* string_or_none(const char* value) {
  if (value == nullptr) Py_RETURN_NONE;
  return PyUnicode_FromString(value);
}

PyObject* kernel_names(bool built) { return built ? Py_BuildValue("(sss)", "verify", "sample", "verify_tree") : PyTuple_New(0); }

PyObject* cpu_kernel_names() { return Py_BuildValue("(sss)", "verify", "sample", "verify_tree"); }

PyObject* build_info(PyObject* /*module*/, PyObject* /*args*/) {
#ifdef SSS_EXT_WITH_CUDA
  const bool cuda = true;
  const char* cuda_version = SSS_EXT_CUDA_VERSION;
  const char* cuda_archs = SSS_EXT_CUDA_ARCHS;
#else
  const bool cuda = false;
  const char* cuda_version = nullptr;
  const char* cuda_archs = nullptr;
#endif
#ifdef TORCH_TARGET_VERSION
  const std::string torch_target = major_minor(TORCH_TARGET_VERSION, 56);
  const char* torch_target_version = torch_target.c_str();
#else
  const char* torch_target_version = nullptr;
#endif
#ifdef Py_LIMITED_API
  const std::string limited = major_minor(Py_LIMITED_API, 24);
  const char* python_limited_api = limited.c_str();
#else
  const char* python_limited_api = nullptr;
#endif
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  const bool ok = set_item(info, "cuda", PyBool_FromLong(cuda)) && set_item(info, "cuda_version", string_or_none(cuda_version)) &&
                  set_item(info, "cuda_archs", string_or_none(cuda_archs)) && set_item(info, "cuda_kernels", kernel_names(cuda)) &&
                  set_item(info, "torch_version", PyUnicode_FromString(SSS_EXT_TORCH_VERSION)) &&
                  set_item(info, "torch_target_version", string_or_none(torch_target_version)) &&
                  set_item(info, "python_limited_api", string_or_none(python_limited_api)) &&
                  set_item(info, "cpu_kernels", cpu_kernel_names());
  if (!ok) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "What this build was compiled with: CUDA kernels, torch version, stable-ABI target, Python limited API."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT,
                      "_C",
                      "sss_ext's compiled ops (registered with torch.ops.sss_ext on import).",
                      -1,
                      methods,
                      nullptr,
                      nullptr,
                      nullptr,
                      nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
