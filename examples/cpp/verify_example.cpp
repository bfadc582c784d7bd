// One SSS verification round and one sample call through the CPU kernels, from plain
// arrays, without torch: the inputs of example_inputs.h, rows spread over `threads`
// std::threads (a stand-in for an engine's own pool), tokens printed one row per line.
//
//   cmake -S . -B build && cmake --build build && build/examples/cpp/verify_example temperature=0.7 top_k=5
#include <sss_ext/kernels/cpu/api.h>

#include <cstdio>
#include <vector>

#include "example_inputs.h"

int main(int argc, char** argv) {
  const example::Config config = example::parse_args(argc, argv);
  const example::Inputs inputs(config);
  const example::HostPointers host(inputs);
  const int64_t positions = config.num_draft + 1;
  std::vector<int64_t> tokens(config.batch * positions), num_accepted(config.batch), sample_tokens(config.batch);
  std::vector<float> log_z(config.batch * positions);

  // The outputs are written only when the call succeeds; an Error names what was refused.
  const sss_ext::cpu::ThreadsFor pool{config.threads};
  const sss_ext::Error verified = sss_ext::cpu::verify(
      example::verify_params(config, host, tokens.data(), num_accepted.data(), log_z.data()), pool);
  const sss_ext::Error sampled = sss_ext::cpu::sample(example::sample_params(config, host, sample_tokens.data()), pool);
  for (const sss_ext::Error& e : {verified, sampled}) {
    if (!e.ok()) {
      std::fprintf(stderr, "refused: %s in %s at row %lld, position %lld, index %lld\n", sss_ext::status_name(e.status),
                   sss_ext::tensor_name(e.which), (long long)e.batch_index, (long long)e.position, (long long)e.value_index);
      return 1;
    }
  }
  example::print_results(config, tokens, num_accepted, log_z, sample_tokens);
  return 0;
}
