// CUDA-on-CPU driver: runs the CUDA kernels of csrc/kernels/cuda/ (unmodified source, on host
// threads through runtime.h) and the CPU kernel on the same inputs and compares them.
// Test-only; python_tests/cuda/test_cuda_on_cpu.py builds and runs it (docs/cuda_on_cpu.md).
//
// Cases come one per line on stdin as key=value words (see Case); every case runs with the
// blocks of each launch in forward and in reverse order. Per case it prints
//   ok NAME rows=R paths=collect:N,...        or        FAIL NAME reason
// and defects of the kernels themselves (barrier divergence, misaligned loads, hangs) end the
// process with "cuda_on_cpu: ..." and exit code 86. Inputs live in exact-size allocations, so
// AddressSanitizer sees any read past a row; the workspace is filled with garbage bytes
// before each launch (nothing may read it before writing).
#include "runtime.h"  // first: the CUDA built-ins

#include <algorithm>
#include <cinttypes>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>
#include <string>

#include "kernels/cpu/api.h"
#include "kernels/cuda/launch_impl.cuh"

namespace {

using sss_ext::bfloat16_t;
using sss_ext::float16_t;

struct Case {
  std::string name = "case";
  std::string op = "verify";  // verify | sample | tree (K = max_nodes)
  std::string dtype = "f32";  // f32 | bf16 | f16
  int64_t batch = 1, num_draft = 1, vocab = 8;
  double temperature = 1.0, top_p = 1.0, shift = 1.0;
  int64_t top_k = 0;
  bool keep_ties = true, with_ref = true, paper = false, ragged = false, misalign = false;
  bool one_hot = false;  // one-hot drafts: the draft tensor is only the tilt's r (absent without a ref)
  bool block = false;    // block verification (docs/algorithm.md §12)
  bool replacement = true;      // tree: siblings drawn i.i.d. (else distinct tokens, q without them)
  std::string shape = "random";  // tree: random (parent uniform below the node) | wide (all at the root) | chain
  // normal | constant | narrow | close | masked | flat
  std::string pattern = "normal";
  double scale = 2.0;
  int64_t finite = 0;     // masked: finite logits per row (the rest -inf)
  int64_t poison = 0;     // rows (from the end) with a NaN target logit at position 0: refused rows
  uint64_t seed = 1;
};

Case parse(const std::string& line) {
  Case c;
  std::istringstream words(line);
  std::string word;
  while (words >> word) {
    const size_t eq = word.find('=');
    if (eq == std::string::npos) cuda_on_cpu::fail("bad case word '%s'", word.c_str());
    const std::string key = word.substr(0, eq), value = word.substr(eq + 1);
    if (key == "name") c.name = value;
    else if (key == "op") c.op = value;
    else if (key == "dtype") c.dtype = value;
    else if (key == "B") c.batch = std::stoll(value);
    else if (key == "K") c.num_draft = std::stoll(value);
    else if (key == "V") c.vocab = std::stoll(value);
    else if (key == "temp") c.temperature = std::stod(value);
    else if (key == "top_k") c.top_k = std::stoll(value);
    else if (key == "top_p") c.top_p = std::stod(value);
    else if (key == "ties") c.keep_ties = value == "keep";
    else if (key == "ref") c.with_ref = value == "1";
    else if (key == "shift") c.shift = std::stod(value);
    else if (key == "paper") c.paper = value == "1";
    else if (key == "ragged") c.ragged = value == "1";
    else if (key == "one_hot") c.one_hot = value == "1";
    else if (key == "block") c.block = value == "1";
    else if (key == "misalign") c.misalign = value == "1";
    else if (key == "pattern") c.pattern = value;
    else if (key == "scale") c.scale = std::stod(value);
    else if (key == "finite") c.finite = std::stoll(value);
    else if (key == "poison") c.poison = std::stoll(value);
    else if (key == "seed") c.seed = std::stoull(value);
    else if (key == "replacement") c.replacement = value == "1";
    else if (key == "shape") c.shape = value;
    else cuda_on_cpu::fail("unknown case key '%s'", key.c_str());
  }
  return c;
}

template <typename T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    uint32_t bits = std::bit_cast<uint32_t>(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{0x7fc0};
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    return bfloat16_t{static_cast<uint16_t>(bits >> 16)};
  } else {
    return float16_t{std::bit_cast<uint16_t>(static_cast<_Float16>(x))};
  }
}

// An exact-size heap array (AddressSanitizer's redzone starts right after it), optionally
// starting `skew` elements into its allocation so rows are not 16-byte aligned.
template <typename V>
struct Buffer {
  std::unique_ptr<V[]> storage;
  V* data = nullptr;
  Buffer(int64_t count, int64_t skew) : storage(new V[static_cast<size_t>(count + skew)]), data(storage.get() + skew) {}
  V& operator[](int64_t i) { return data[i]; }
};

// Logits of one (row, position, tensor): a row of V values following the case's pattern.
void fill_row(const Case& c, std::mt19937_64& rng, float* out) {
  std::normal_distribution<float> normal(0.0f, static_cast<float>(c.scale));
  const int64_t V = c.vocab;
  if (c.pattern == "constant") {
    for (int64_t v = 0; v < V; ++v) out[v] = 0.5f;
  } else if (c.pattern == "flat") {  // few distinct values: many ties, low-precision-like rows
    std::uniform_int_distribution<int> level(0, 3);
    for (int64_t v = 0; v < V; ++v) out[v] = 0.25f * static_cast<float>(level(rng));
  } else if (c.pattern == "narrow") {  // every score within one bucket of width 1/32
    std::uniform_real_distribution<float> u(0.0f, 0.03f);
    for (int64_t v = 0; v < V; ++v) out[v] = u(rng);
  } else if (c.pattern == "close") {  // four scores within 2^-20 of each other
    std::uniform_int_distribution<int> level(0, 3);
    for (int64_t v = 0; v < V; ++v) out[v] = 1.0f + std::ldexp(static_cast<float>(level(rng)), -22);
  } else if (c.pattern == "masked") {  // `finite` random positions finite, the rest -inf
    for (int64_t v = 0; v < V; ++v) out[v] = -INFINITY;
    std::uniform_int_distribution<int64_t> index(0, V - 1);
    for (int64_t n = 0; n < std::max<int64_t>(c.finite, 1); ++n) out[index(rng)] = normal(rng);
  } else {
    for (int64_t v = 0; v < V; ++v) out[v] = normal(rng);
  }
}

template <typename T>
void fill_tensor(const Case& c, std::mt19937_64& rng, Buffer<T>& tensor, int64_t positions) {
  std::vector<float> row(static_cast<size_t>(c.vocab));
  for (int64_t r = 0; r < c.batch * positions; ++r) {
    fill_row(c, rng, row.data());
    for (int64_t v = 0; v < c.vocab; ++v) tensor[r * c.vocab + v] = from_float<T>(row[static_cast<size_t>(v)]);
  }
}

sss_ext::Sampling sampling_of(const Case& c) {
  sss_ext::Sampling sampling;
  sampling.temperature = c.temperature;
  sampling.top_k = c.top_k;
  sampling.top_p = c.top_p;
  sampling.top_k_ties = c.keep_ties ? sss_ext::TopKTies::kKeep : sss_ext::TopKTies::kExactK;
  return sampling;
}

double open_uniform(std::mt19937_64& rng) {  // in (0, 1)
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  double u;
  do u = unit(rng);
  while (!(u > 0.0 && u < 1.0));
  return u;
}

// An exact-size workspace of random bytes: a kernel that reads it before writing gets garbage.
Buffer<unsigned char> garbage_workspace(size_t bytes, std::mt19937_64& rng) {
  Buffer<unsigned char> workspace(static_cast<int64_t>(bytes), 0);
  for (size_t j = 0; j < bytes; ++j) workspace[static_cast<int64_t>(j)] = static_cast<unsigned char>(rng());
  return workspace;
}

template <typename T>
T nan_value() {
  return from_float<T>(NAN);
}

struct Paths {
  std::map<std::string, long long> counts;
  void add(const std::string& key, long long n = 1) {
    if (n != 0) counts[key] += n;
  }
  std::string text() const {
    std::string out;
    for (const auto& [key, n] : counts) out += (out.empty() ? "" : ",") + key + ":" + std::to_string(n);
    return out.empty() ? "none" : out;
  }
};

// The plans of the bucketed top-k / top-p selection, read back from the workspace.
template <typename T>
void plan_paths(const sss_ext::VerifyParams<T>& p, const std::vector<int64_t>& counts, const unsigned char* workspace, Paths& paths) {
  using namespace sss_ext::cuda;
  const auto lay = detail::layout<T>(p.batch, p.num_draft, p.vocab, true);
  const auto* plans = reinterpret_cast<const TruncPlan*>(workspace + lay.plans);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = counts[static_cast<size_t>(b)];
    if (n < 0 || n > p.num_draft) continue;
    for (int64_t i = 0; i <= n; ++i) {
      for (int stream = 0; stream < 2; ++stream) {
        if (stream == 1 && (i == n || p.one_hot_proposal)) continue;
        const TruncPlan& plan = plans[(b * (p.num_draft + 1) + i) * 2 + stream];
        const char* mode = plan.mode == kCollect ? "collect" : plan.mode == kTies ? "ties" : plan.mode == kRadix ? "radix_plan"
                           : plan.mode == kTiesCounted ? "ties_counted" : "refine_unresolved";
        paths.add(std::string(mode) + (plan.level == 2 ? "_level2" : ""));
        if (plan.level == 1 && plan.kb == kTruncBuckets - 1 && plan.members_k > 0) paths.add("minus_inf_kb");
      }
    }
  }
}

template <typename T>
bool run_verify(const Case& c, Paths& paths, std::string& why) {
  const int64_t B = c.batch, K = c.num_draft, V = c.vocab, P = K + 1;
  const int64_t skew = c.misalign ? 1 : 0;
  std::mt19937_64 rng(c.seed);
  Buffer<T> target(B * P * V, skew), draft(B * (c.with_ref ? P : K) * V, skew), ref(c.with_ref ? B * P * V : 0, skew);
  fill_tensor(c, rng, target, P);
  fill_tensor(c, rng, draft, c.with_ref ? P : K);
  if (c.with_ref) fill_tensor(c, rng, ref, P);
  Buffer<int64_t> tokens_in(B * K, 0), counts(B, 0);
  Buffer<double> uniforms(B * P, 0);
  std::uniform_int_distribution<int64_t> token(0, V - 1), count(0, K);
  for (int64_t j = 0; j < B * K; ++j) tokens_in[j] = token(rng);
  for (int64_t j = 0; j < B * P; ++j) uniforms[j] = open_uniform(rng);
  for (int64_t b = 0; b < B; ++b) counts[b] = c.ragged ? count(rng) : K;
  // Masked rows: the drafted token must have draft probability > 0 to be a valid proposal.
  if (c.pattern == "masked") {
    const int64_t draft_positions = c.with_ref ? P : K;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < K; ++i) {
        const T* row = draft.data + (b * draft_positions + i) * V;
        for (int64_t v = 0; v < V; ++v)
          if (std::isfinite(sss_ext::to_float(row[v]))) tokens_in[b * K + i] = v;
      }
  }
  // Past each ragged row's bonus position: garbage that must be neither read nor checked.
  for (int64_t b = 0; b < B && c.ragged; ++b) {
    const int64_t n = counts[b];
    for (int64_t i = n + 1; i < P; ++i) {
      for (int64_t v = 0; v < V; ++v) target[(b * P + i) * V + v] = nan_value<T>();
      if (c.with_ref)
        for (int64_t v = 0; v < V; ++v) ref[(b * P + i) * V + v] = nan_value<T>();
      uniforms[b * P + i] = 7.0;
    }
    for (int64_t i = c.with_ref ? n + 1 : n; i < (c.with_ref ? P : K); ++i)
      for (int64_t v = 0; v < V; ++v) draft[(b * (c.with_ref ? P : K) + i) * V + v] = nan_value<T>();
    for (int64_t i = n; i < K; ++i) tokens_in[b * K + i] = (i % 2) ? -3 : V + 5;
  }
  for (int64_t b = std::max<int64_t>(0, B - c.poison); b < B; ++b) target[b * P * V] = nan_value<T>();

  sss_ext::VerifyParams<T> p;
  p.target = {target.data, P * V, V};
  p.draft = {draft.data, (c.with_ref ? P : K) * V, V};
  if (c.one_hot && !c.with_ref) p.draft = {};  // never read: a read dereferences null
  if (c.with_ref) p.ref = {ref.data, P * V, V};
  p.draft_tokens = tokens_in.data;
  p.draft_tokens_stride_batch = K;
  p.draft_tokens_stride_position = 1;
  p.uniforms = uniforms.data;
  p.uniforms_stride_batch = P;
  p.uniforms_stride_position = 1;
  if (c.ragged) {
    p.num_draft_tokens = counts.data;
    p.num_draft_tokens_stride = 1;
  }
  p.batch = B;
  p.num_draft = K;
  p.vocab = V;
  p.sampling = sampling_of(c);
  p.shift = c.shift;
  p.paper_mode = c.paper;
  p.one_hot_proposal = c.one_hot;
  p.block_verification = c.block;

  // CPU kernel, one row at a time: a row it refuses must be an invalid row of the CUDA call.
  std::vector<int64_t> cpu_tokens(static_cast<size_t>(B * P), -1), cpu_accepted(static_cast<size_t>(B), -1);
  std::vector<float> cpu_log_z(static_cast<size_t>(B * P), NAN);
  for (int64_t b = 0; b < B; ++b) {
    sss_ext::VerifyParams<T> row = p;
    row.batch = 1;
    row.target.data = p.target.row(b, 0);
    row.draft.data = p.draft.row(b, 0);
    if (c.with_ref) row.ref.data = p.ref.row(b, 0);
    row.draft_tokens = p.draft_tokens + b * K;
    row.uniforms = p.uniforms + b * P;
    if (c.ragged) row.num_draft_tokens = p.num_draft_tokens + b;
    row.tokens = cpu_tokens.data() + b * P;
    row.num_accepted = cpu_accepted.data() + b;
    row.log_z = cpu_log_z.data() + b * P;
    if (!sss_ext::cpu::verify(row).ok()) {
      std::fill_n(row.tokens, P, -1);
      *row.num_accepted = -1;
      std::fill_n(row.log_z, P, NAN);
    }
  }

  std::vector<int64_t> counts_seen(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) counts_seen[static_cast<size_t>(b)] = counts[b];
  for (int order = 0; order < 2; ++order) {
    cuda_on_cpu::reverse_blocks() = order == 1;
    Buffer<int64_t> tokens(B * P, 0), accepted(B, 0);
    Buffer<float> log_z(B * P, 0);
    p.tokens = tokens.data;
    p.num_accepted = accepted.data;
    p.log_z = log_z.data;
    const size_t bytes = sss_ext::cuda::verify_workspace_bytes(p);
    const Buffer<unsigned char> workspace = garbage_workspace(bytes, rng);
    const long long radix_before = cuda_on_cpu::counters().radix_blocks;
    const cudaError_t error = sss_ext::cuda::launch_verify(p, workspace.data, bytes, nullptr);
    if (error != cudaSuccess) {
      why = "launch_verify returned " + std::to_string(error);
      return false;
    }
    for (int64_t b = 0; b < B; ++b) {
      bool same = accepted[b] == cpu_accepted[static_cast<size_t>(b)];
      for (int64_t i = 0; i < P; ++i) same = same && tokens[b * P + i] == cpu_tokens[static_cast<size_t>(b * P + i)];
      for (int64_t i = 0; i < P && same; ++i) {
        const float got = log_z[b * P + i], want = cpu_log_z[static_cast<size_t>(b * P + i)];
        same = (std::isnan(got) && std::isnan(want)) || std::fabs(got - want) <= 2e-5f + 2e-6f * std::fabs(want);
      }
      if (!same) {
        std::ostringstream s;
        s << (order ? "reverse" : "forward") << " block order, row " << b << ": cuda num_accepted " << accepted[b] << " tokens";
        for (int64_t i = 0; i < P; ++i) s << ' ' << tokens[b * P + i] << '/' << log_z[b * P + i];
        s << "; cpu num_accepted " << cpu_accepted[static_cast<size_t>(b)] << " tokens";
        for (int64_t i = 0; i < P; ++i) s << ' ' << cpu_tokens[static_cast<size_t>(b * P + i)] << '/' << cpu_log_z[static_cast<size_t>(b * P + i)];
        why = s.str();
        return false;
      }
    }
    if (order == 0) {
      const bool greedy = p.sampling.greedy();
      if (!greedy && p.sampling.truncates(V)) plan_paths(p, counts_seen, workspace.data, paths);
      paths.add("radix_blocks", cuda_on_cpu::counters().radix_blocks - radix_before);
      paths.add(greedy ? "greedy" : V < sss_ext::cuda::kExactVocab ? "exact_exp" : "fast_exp");
      for (int64_t b = 0; b < B; ++b) {
        if (accepted[b] < 0) paths.add("invalid_rows");
        else if (counts[b] < K) paths.add("ragged_rows");
        if (accepted[b] >= 0 && accepted[b] < counts[b]) paths.add("rejections");
        if (accepted[b] > 0) paths.add("acceptances");
        // Block verification accepting a prefix between the first draft and the last one.
        if (c.block && !greedy && accepted[b] > 0 && accepted[b] < counts[b]) paths.add("block_partial");
      }
    }
  }
  return true;
}

template <typename T>
bool run_sample(const Case& c, Paths& paths, std::string& why) {
  const int64_t B = c.batch, V = c.vocab;
  std::mt19937_64 rng(c.seed);
  Buffer<T> logits(B * V, c.misalign ? 1 : 0);
  fill_tensor(c, rng, logits, 1);
  for (int64_t b = std::max<int64_t>(0, B - c.poison); b < B; ++b) logits[b * V] = nan_value<T>();
  Buffer<double> uniforms(B, 0);
  for (int64_t b = 0; b < B; ++b) uniforms[b] = open_uniform(rng);
  sss_ext::SampleParams<T> p;
  p.logits = {logits.data, V, 0};
  p.uniforms = uniforms.data;
  p.uniforms_stride = 1;
  p.batch = B;
  p.vocab = V;
  p.sampling = sampling_of(c);
  std::vector<int64_t> cpu_tokens(static_cast<size_t>(B), -1);
  for (int64_t b = 0; b < B; ++b) {
    sss_ext::SampleParams<T> row = p;
    row.batch = 1;
    row.logits.data = p.logits.row(b, 0);
    row.uniforms = p.uniforms + b;
    row.tokens = cpu_tokens.data() + b;
    if (!sss_ext::cpu::sample(row).ok()) cpu_tokens[static_cast<size_t>(b)] = -1;
  }
  for (int order = 0; order < 2; ++order) {
    cuda_on_cpu::reverse_blocks() = order == 1;
    Buffer<int64_t> tokens(B, 0);
    p.tokens = tokens.data;
    const size_t bytes = sss_ext::cuda::sample_workspace_bytes(p);
    const Buffer<unsigned char> workspace = garbage_workspace(bytes, rng);
    const cudaError_t error = sss_ext::cuda::launch_sample(p, workspace.data, bytes, nullptr);
    if (error != cudaSuccess) {
      why = "launch_sample returned " + std::to_string(error);
      return false;
    }
    for (int64_t b = 0; b < B; ++b) {
      if (tokens[b] != cpu_tokens[static_cast<size_t>(b)]) {
        why = std::string(order ? "reverse" : "forward") + " block order, row " + std::to_string(b) + ": cuda token " +
              std::to_string(tokens[b]) + ", cpu token " + std::to_string(cpu_tokens[static_cast<size_t>(b)]);
        return false;
      }
    }
  }
  paths.add("sample");
  paths.add(p.sampling.greedy() ? "greedy" : V < sss_ext::cuda::kExactVocab ? "exact_exp" : "fast_exp");
  return true;
}

// A token from softmax(row / temperature) over the row's finite logits (uniform at temperature
// 0), avoiding `taken` tokens while others are left: drafts that the tree's nodes accept often.
template <typename T>
int64_t draft_from(const T* row, int64_t V, double temperature, const std::vector<int64_t>& taken, std::mt19937_64& rng) {
  std::vector<double> w(static_cast<size_t>(V), 0.0);
  double top = -INFINITY;
  for (int64_t v = 0; v < V; ++v) top = std::max(top, static_cast<double>(sss_ext::to_float(row[v])));
  double total = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    const double z = sss_ext::to_float(row[v]);
    const bool free = std::find(taken.begin(), taken.end(), v) == taken.end() || static_cast<int64_t>(taken.size()) >= V;
    w[static_cast<size_t>(v)] = free && std::isfinite(z) ? (temperature > 0 ? std::exp((z - top) / temperature) : 1.0) : 0.0;
    total += w[static_cast<size_t>(v)];
  }
  if (!(total > 0.0)) return std::uniform_int_distribution<int64_t>(0, V - 1)(rng);
  const double threshold = open_uniform(rng) * total;
  double running = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    running += w[static_cast<size_t>(v)];
    if (running > threshold) return v;
  }
  return V - 1;
}

template <typename T>
bool run_tree(const Case& c, Paths& paths, std::string& why) {
  const int64_t B = c.batch, N = c.num_draft, V = c.vocab;
  const int64_t skew = c.misalign ? 1 : 0;
  std::mt19937_64 rng(c.seed);
  Buffer<T> target(B * N * V, skew), draft(B * N * V, skew), ref(c.with_ref ? B * N * V : 0, skew);
  fill_tensor(c, rng, target, N);
  fill_tensor(c, rng, draft, N);
  if (c.with_ref) fill_tensor(c, rng, ref, N);
  Buffer<int64_t> tokens_in(B * N, 0), parents(B * N, 0), counts(B, 0);
  Buffer<double> uniforms(B * N, 0);
  std::uniform_int_distribution<int64_t> count(1, N);
  for (int64_t b = 0; b < B; ++b) {
    counts[b] = c.ragged ? count(rng) : N;
    parents[b * N] = -1;
    tokens_in[b * N] = 0;
    for (int64_t node = 1; node < N; ++node) {
      const int64_t parent = c.shape == "wide" ? 0 : c.shape == "chain" ? node - 1
                                                                        : std::uniform_int_distribution<int64_t>(0, node - 1)(rng);
      parents[b * N + node] = parent;
      std::vector<int64_t> siblings;  // drawn before this node
      for (int64_t s = 1; s < node && !c.replacement; ++s)
        if (parents[b * N + s] == parent) siblings.push_back(tokens_in[b * N + s]);
      tokens_in[b * N + node] = draft_from(draft.data + (b * N + parent) * V, V, c.temperature, siblings, rng);
    }
    for (int64_t node = 0; node < N; ++node) uniforms[b * N + node] = open_uniform(rng);
  }
  // Past each ragged row's last node: garbage that must be neither read nor checked.
  for (int64_t b = 0; b < B && c.ragged; ++b) {
    for (int64_t node = counts[b]; node < N; ++node) {
      for (int64_t v = 0; v < V; ++v) {
        target[(b * N + node) * V + v] = draft[(b * N + node) * V + v] = nan_value<T>();
        if (c.with_ref) ref[(b * N + node) * V + v] = nan_value<T>();
      }
      parents[b * N + node] = node % 2 ? -7 : node + 3;
      tokens_in[b * N + node] = node % 2 ? -3 : V + 5;
      uniforms[b * N + node] = 7.0;
    }
  }
  // Rows the CPU kernel refuses, from the end: a NaN logit, a parent not before its node, a
  // uniform of 0.
  for (int64_t k = 0; k < std::min(c.poison, B); ++k) {
    const int64_t b = B - 1 - k, n = counts[b];
    if (k % 3 == 0 || n == 1) target[b * N * V] = nan_value<T>();
    else if (k % 3 == 1) parents[b * N + n - 1] = n - 1;
    else uniforms[b * N + n - 1] = 0.0;
  }

  sss_ext::TreeParams<T> p;
  p.target = {target.data, N * V, V};
  p.draft = {draft.data, N * V, V};
  if (c.with_ref) p.ref = {ref.data, N * V, V};
  p.draft_tokens = tokens_in.data;
  p.draft_tokens_stride_batch = N;
  p.draft_tokens_stride_node = 1;
  p.parents = parents.data;
  p.parents_stride_batch = N;
  p.parents_stride_node = 1;
  p.uniforms = uniforms.data;
  p.uniforms_stride_batch = N;
  p.uniforms_stride_node = 1;
  if (c.ragged) {
    p.num_nodes = counts.data;
    p.num_nodes_stride = 1;
  }
  p.batch = B;
  p.max_nodes = N;
  p.vocab = V;
  p.sampling = sampling_of(c);
  p.shift = c.shift;
  p.replacement = c.replacement;

  // CPU kernel, one row at a time: a row it refuses must be an invalid row of the CUDA call.
  const size_t cells = static_cast<size_t>(B * N);
  std::vector<int64_t> cpu_path(cells, -1), cpu_tokens(cells, -1), cpu_accepted(static_cast<size_t>(B), -1);
  std::vector<float> cpu_log_z(cells, NAN);
  for (int64_t b = 0; b < B; ++b) {
    sss_ext::TreeParams<T> row = p;
    row.batch = 1;
    row.target.data = p.target.row(b, 0);
    row.draft.data = p.draft.row(b, 0);
    if (c.with_ref) row.ref.data = p.ref.row(b, 0);
    row.draft_tokens = p.draft_tokens + b * N;
    row.parents = p.parents + b * N;
    row.uniforms = p.uniforms + b * N;
    if (c.ragged) row.num_nodes = p.num_nodes + b;
    row.path = cpu_path.data() + b * N;
    row.tokens = cpu_tokens.data() + b * N;
    row.num_accepted = cpu_accepted.data() + b;
    row.log_z = cpu_log_z.data() + b * N;
    if (!sss_ext::cpu::verify_tree(row).ok()) {
      std::fill_n(row.path, N, -1);
      std::fill_n(row.tokens, N, -1);
      *row.num_accepted = -1;
      std::fill_n(row.log_z, N, NAN);
    }
  }

  for (int order = 0; order < 2; ++order) {
    cuda_on_cpu::reverse_blocks() = order == 1;
    Buffer<int64_t> path(B * N, 0), tokens(B * N, 0), accepted(B, 0);
    Buffer<float> log_z(B * N, 0);
    p.path = path.data;
    p.tokens = tokens.data;
    p.num_accepted = accepted.data;
    p.log_z = log_z.data;
    const size_t bytes = sss_ext::cuda::verify_tree_workspace_bytes(p);
    const Buffer<unsigned char> workspace = garbage_workspace(bytes, rng);
    const cudaError_t error = sss_ext::cuda::launch_verify_tree(p, workspace.data, bytes, nullptr);
    if (error != cudaSuccess) {
      why = "launch_verify_tree returned " + std::to_string(error);
      return false;
    }
    for (int64_t b = 0; b < B; ++b) {
      bool same = accepted[b] == cpu_accepted[static_cast<size_t>(b)];
      for (int64_t i = 0; i < N; ++i) {
        const size_t j = static_cast<size_t>(b * N + i);
        const float got = log_z[b * N + i], want = cpu_log_z[j];
        same = same && path[b * N + i] == cpu_path[j] && tokens[b * N + i] == cpu_tokens[j] &&
               ((std::isnan(got) && std::isnan(want)) || std::fabs(got - want) <= 2e-5f + 2e-6f * std::fabs(want));
      }
      if (!same) {
        std::ostringstream s;
        s << (order ? "reverse" : "forward") << " block order, row " << b << ": cuda num_accepted " << accepted[b]
          << " path/token/log_z";
        for (int64_t i = 0; i < N; ++i) s << ' ' << path[b * N + i] << '/' << tokens[b * N + i] << '/' << log_z[b * N + i];
        s << "; cpu num_accepted " << cpu_accepted[static_cast<size_t>(b)] << " path/token/log_z";
        for (int64_t i = 0; i < N; ++i) {
          const size_t j = static_cast<size_t>(b * N + i);
          s << ' ' << cpu_path[j] << '/' << cpu_tokens[j] << '/' << cpu_log_z[j];
        }
        why = s.str();
        return false;
      }
    }
  }
  paths.add("tree");
  paths.add(p.sampling.greedy() ? "greedy" : V < sss_ext::cuda::kExactVocab ? "exact_exp" : "fast_exp");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t accepted = cpu_accepted[static_cast<size_t>(b)];
    if (accepted < 0) paths.add("invalid_rows");
    else if (counts[b] < N) paths.add("ragged_rows");
    if (accepted > 0) paths.add("acceptances");
    // Rejections: a child before the taken one at a node of the path, or any child at the
    // last node (then the token is drawn from a residual).
    bool rejected = false, residual = false;
    for (int64_t i = 0; i <= accepted; ++i) {
      const int64_t node = cpu_path[static_cast<size_t>(b * N + i)];
      const int64_t taken = i < accepted ? cpu_path[static_cast<size_t>(b * N + i + 1)] : counts[b];
      for (int64_t child = node + 1; child < taken; ++child) {
        if (parents[b * N + child] != node) continue;
        rejected = true;
        residual |= i == accepted;
      }
    }
    if (rejected) paths.add("tree_rejections");
    if (residual) paths.add("tree_residual_draws");
  }
  return true;
}

template <typename T>
bool run_case(const Case& c, Paths& paths, std::string& why) {
  if (c.op == "tree") return run_tree<T>(c, paths, why);
  return c.op == "sample" ? run_sample<T>(c, paths, why) : run_verify<T>(c, paths, why);
}

}  // namespace

int main() {
  std::string line;
  int failures = 0, cases = 0;
  while (std::getline(std::cin, line)) {
    if (line.empty() || line[0] == '#') continue;
    const Case c = parse(line);
    Paths paths;
    std::string why;
    bool ok;
    if (c.dtype == "f32") ok = run_case<float>(c, paths, why);
    else if (c.dtype == "bf16") ok = run_case<bfloat16_t>(c, paths, why);
    else if (c.dtype == "f16") ok = run_case<float16_t>(c, paths, why);
    else cuda_on_cpu::fail("unknown dtype '%s'", c.dtype.c_str());
    ++cases;
    if (ok) {
      std::printf("ok %s rows=%" PRId64 " paths=%s\n", c.name.c_str(), c.batch, paths.text().c_str());
    } else {
      ++failures;
      std::printf("FAIL %s %s\n", c.name.c_str(), why.c_str());
    }
    std::fflush(stdout);
  }
  const cuda_on_cpu::Counters& n = cuda_on_cpu::counters();
  std::printf("%d cases, %d failed (launches %lld, blocks %lld, block barriers %lld, warp collectives %lld)\n", cases, failures,
              n.launches.load(), n.blocks.load(), n.block_barriers.load(), n.warp_collectives.load());
  return failures == 0 ? 0 : 1;
}
