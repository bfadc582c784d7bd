// The CUDA variant of verify_example.cpp: the same inputs copied to the device, one
// verification round and one sample call on a stream with a caller-owned workspace, the same
// output lines. Rows the kernels refuse come back as num_accepted = -1, tokens -1 and log_z
// NaN (sample: token -1) instead of an Error (csrc/kernels/cuda/launch.h).
#include <sss_ext/kernels/cuda/launch.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "example_inputs.h"

#define CHECK_CUDA(call)                                                                        \
  do {                                                                                          \
    const cudaError_t status_ = (call);                                                         \
    if (status_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(status_));              \
      return 1;                                                                                 \
    }                                                                                           \
  } while (0)

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* device = nullptr;
  if (cudaMalloc(&device, std::max<size_t>(host.size(), 1) * sizeof(T)) != cudaSuccess) return nullptr;
  if (cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess) return nullptr;
  return device;
}

// Device copies of example::Inputs, the `Buffers` of example::verify_params.
struct DevicePointers {
  const float *target, *draft, *ref, *sample_logits;
  const int64_t* draft_tokens;
  const double *uniforms, *sample_uniforms;
};

int main(int argc, char** argv) {
  const example::Config config = example::parse_args(argc, argv);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "no CUDA device visible\n");
    return 77;
  }
  const example::Inputs inputs(config);
  const DevicePointers in{device_copy(inputs.target),       device_copy(inputs.draft),    device_copy(inputs.ref),
                          device_copy(inputs.sample_logits), device_copy(inputs.draft_tokens), device_copy(inputs.uniforms),
                          device_copy(inputs.sample_uniforms)};
  const int64_t positions = config.num_draft + 1;
  std::vector<int64_t> tokens(config.batch * positions), num_accepted(config.batch), sample_tokens(config.batch);
  std::vector<float> log_z(config.batch * positions);
  int64_t *d_tokens = device_copy(tokens), *d_num_accepted = device_copy(num_accepted), *d_sample = device_copy(sample_tokens);
  float* d_log_z = device_copy(log_z);
  if (!in.target || !in.draft || !in.ref || !in.sample_logits || !in.draft_tokens || !in.uniforms || !in.sample_uniforms ||
      !d_tokens || !d_num_accepted || !d_sample || !d_log_z) {
    std::fprintf(stderr, "device allocation or copy failed\n");
    return 1;
  }

  const auto verify = example::verify_params(config, in, d_tokens, d_num_accepted, d_log_z);
  const auto sample = example::sample_params(config, in, d_sample);
  // One workspace serves both calls: they run in order on one stream.
  const size_t bytes = std::max(sss_ext::cuda::verify_workspace_bytes(verify), sss_ext::cuda::sample_workspace_bytes(sample));
  void* workspace = nullptr;
  cudaStream_t stream = nullptr;
  CHECK_CUDA(cudaMalloc(&workspace, std::max<size_t>(bytes, 1)));
  CHECK_CUDA(cudaStreamCreate(&stream));
  CHECK_CUDA(sss_ext::cuda::launch_verify(verify, workspace, bytes, stream));
  CHECK_CUDA(sss_ext::cuda::launch_sample(sample, workspace, bytes, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  CHECK_CUDA(cudaMemcpy(tokens.data(), d_tokens, tokens.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(num_accepted.data(), d_num_accepted, num_accepted.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(log_z.data(), d_log_z, log_z.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(sample_tokens.data(), d_sample, sample_tokens.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  example::print_results(config, tokens, num_accepted, log_z, sample_tokens);
  return 0;
}
