// The examples' inputs and output format, shared by verify_example.cpp (CPU) and
// verify_example.cu (CUDA). Inputs come from integer formulas, so that a test can rebuild
// them exactly (python_tests/test_cpp_example.py): logits are multiples of 1/4 in
// [-2.75, 3.75] (exact in float32), uniforms are k / n + 0.5 / n for integers 0 <= k < n.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <sss_ext/kernels/common.h>

namespace example {

// Logit of `model` (0 target, 1 draft, 2 reference draft) at row b, position i, token v:
// one base pattern over the vocabulary plus a small per-model perturbation.
inline float logit(int model, int64_t b, int64_t i, int64_t v) {
  const int64_t base = (v * 37 + b * 11 + i * 5) % 23, perturbation = model * ((v * 5 + b + i * model) % 3);
  return static_cast<float>(base - 11 + perturbation) / 4.0f;
}
// Draft token at (b, i): a token of base pattern 22 - (b + i) % 4, among the most likely
// (37 * 5 = 1 mod 23); taken mod vocab.
inline int64_t draft_token(int64_t b, int64_t i, int64_t vocab) {
  return (5 * (22 - (b + i) % 4 + 23 - (b * 11 + i * 5) % 23)) % 23 % vocab;
}
// Verification uniforms, (batch, num_draft + 1).
inline double verify_uniform(int64_t b, int64_t i) { return double((b * 5 + i * 3) % 11) / 11.0 + 0.5 / 11.0; }
// Sample uniforms, (batch,).
inline double sample_uniform(int64_t b) { return double((b * 3 + 1) % 7) / 7.0 + 0.5 / 7.0; }

// key=value arguments; sizes and sampling parameters are checked here, as an engine's own
// argument checks would (the kernels check the values inside the tensors).
struct Config {
  int64_t batch = 6, num_draft = 4, vocab = 40;
  sss_ext::Sampling sampling;
  double shift = 1.0;
  bool paper = false, ref = true;
  int threads = 2;
};

[[noreturn]] inline void usage(const char* program, const std::string& problem) {
  std::fprintf(stderr, "%s: %s\nusage: %s [batch=N] [num_draft=N] [vocab=N] [temperature=X] [top_k=N] [top_p=X] "
               "[shift=X] [mode=exact|paper] [ref=0|1] [threads=N]\n", program, problem.c_str(), program);
  std::exit(2);
}

inline Config parse_args(int argc, char** argv) {
  Config c;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) usage(argv[0], "expected key=value, got '" + arg + "'");
    const std::string key = arg.substr(0, eq), value = arg.substr(eq + 1);
    char* end = nullptr;
    const double number = std::strtod(value.c_str(), &end);
    const bool numeric = !value.empty() && *end == '\0';
    const auto integer = [&](int64_t low, int64_t high) {
      if (!numeric || !(number >= double(low) && number <= double(high)) || number != double(int64_t(number)))
        usage(argv[0], key + " must be an integer in [" + std::to_string(low) + ", " + std::to_string(high) + "], got '" + value + "'");
      return int64_t(number);
    };
    if (key == "batch") c.batch = integer(0, 1024);
    else if (key == "num_draft") c.num_draft = integer(0, 64);
    else if (key == "vocab") c.vocab = integer(1, 1 << 20);
    else if (key == "top_k") c.sampling.top_k = integer(0, 1 << 20);
    else if (key == "threads") c.threads = int(integer(1, 256));
    else if (key == "ref") c.ref = integer(0, 1) == 1;
    else if (key == "mode" && (value == "exact" || value == "paper")) c.paper = value == "paper";
    else if (key == "temperature" && numeric && number >= 0 && number <= 1e6) c.sampling.temperature = number;
    else if (key == "top_p" && numeric && number > 0 && number <= 1) c.sampling.top_p = number;
    else if (key == "shift" && numeric && number >= 0 && number <= 1e6) c.shift = number;
    else usage(argv[0], "bad argument '" + arg + "'");
  }
  if (c.paper && !c.ref) usage(argv[0], "mode=paper needs ref=1");
  if (c.batch * (c.num_draft + 1) * c.vocab > (int64_t(1) << 26)) usage(argv[0], "batch * (num_draft + 1) * vocab must be <= 2^26");
  if (c.sampling.temperature > 0 && c.sampling.temperature < 1e-6) usage(argv[0], "temperature must be 0 or >= 1e-6");
  return c;
}

// Host buffers of one verification round and one sample call, filled from the formulas.
struct Inputs {
  std::vector<float> target, draft, ref, sample_logits;  // (batch, num_draft + 1, vocab) x 3, (batch, vocab)
  std::vector<int64_t> draft_tokens;                     // (batch, num_draft)
  std::vector<double> uniforms, sample_uniforms;         // (batch, num_draft + 1), (batch,)

  explicit Inputs(const Config& c) {
    const int64_t positions = c.num_draft + 1;
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t i = 0; i < positions; ++i) {
        for (int64_t v = 0; v < c.vocab; ++v) {
          target.push_back(logit(0, b, i, v));
          draft.push_back(logit(1, b, i, v));
          ref.push_back(logit(2, b, i, v));
        }
        uniforms.push_back(verify_uniform(b, i));
        if (i < c.num_draft) draft_tokens.push_back(draft_token(b, i, c.vocab));
      }
      for (int64_t v = 0; v < c.vocab; ++v) sample_logits.push_back(logit(0, b, c.num_draft, v));
      sample_uniforms.push_back(sample_uniform(b));
    }
  }
};

// Kernel parameters over the buffers `in` (host or device copies of Inputs) and outputs.
template <typename Buffers>
sss_ext::VerifyParams<float> verify_params(const Config& c, const Buffers& in, int64_t* tokens, int64_t* num_accepted, float* log_z) {
  const int64_t positions = c.num_draft + 1;
  sss_ext::VerifyParams<float> p;
  p.target = {in.target, positions * c.vocab, c.vocab};
  p.draft = {in.draft, positions * c.vocab, c.vocab};
  if (c.ref) p.ref = {in.ref, positions * c.vocab, c.vocab};
  p.draft_tokens = in.draft_tokens;
  p.draft_tokens_stride_batch = c.num_draft;
  p.draft_tokens_stride_position = 1;
  p.uniforms = in.uniforms;
  p.uniforms_stride_batch = positions;
  p.uniforms_stride_position = 1;
  p.batch = c.batch;
  p.num_draft = c.num_draft;
  p.vocab = c.vocab;
  p.sampling = c.sampling;
  p.shift = c.shift;
  p.paper_mode = c.paper;
  p.tokens = tokens;
  p.num_accepted = num_accepted;
  p.log_z = log_z;
  return p;
}

template <typename Buffers>
sss_ext::SampleParams<float> sample_params(const Config& c, const Buffers& in, int64_t* tokens) {
  sss_ext::SampleParams<float> p;
  p.logits = {in.sample_logits, c.vocab, 0};
  p.uniforms = in.sample_uniforms;
  p.uniforms_stride = 1;
  p.batch = c.batch;
  p.vocab = c.vocab;
  p.sampling = c.sampling;
  p.tokens = tokens;
  return p;
}

// Raw pointers into host Inputs, the `Buffers` of the CPU example.
struct HostPointers {
  const float *target, *draft, *ref, *sample_logits;
  const int64_t* draft_tokens;
  const double *uniforms, *sample_uniforms;
  explicit HostPointers(const Inputs& in)
      : target(in.target.data()), draft(in.draft.data()), ref(in.ref.data()), sample_logits(in.sample_logits.data()),
        draft_tokens(in.draft_tokens.data()), uniforms(in.uniforms.data()), sample_uniforms(in.sample_uniforms.data()) {}
};

// One line per row: "verify <b> num_accepted=<n> tokens=<t0,...,tK> log_z=<z0,...,zK>" (log_z
// with 9 significant digits, exact for float32), then "sample <b> token=<t>".
inline void print_results(const Config& c, const std::vector<int64_t>& tokens, const std::vector<int64_t>& num_accepted,
                          const std::vector<float>& log_z, const std::vector<int64_t>& sample_tokens) {
  const int64_t positions = c.num_draft + 1;
  for (int64_t b = 0; b < c.batch; ++b) {
    std::printf("verify %lld num_accepted=%lld tokens=", (long long)b, (long long)num_accepted[b]);
    for (int64_t i = 0; i < positions; ++i) std::printf(i ? ",%lld" : "%lld", (long long)tokens[b * positions + i]);
    std::printf(" log_z=");
    for (int64_t i = 0; i < positions; ++i) std::printf(i ? ",%.9g" : "%.9g", double(log_z[b * positions + i]));
    std::printf("\n");
  }
  for (int64_t b = 0; b < c.batch; ++b) std::printf("sample %lld token=%lld\n", (long long)b, (long long)sample_tokens[b]);
}

}  // namespace example
