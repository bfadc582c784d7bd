// Parallelism of the CPU kernels, injected by the caller. cpu::verify and cpu::sample
// (verify.h) take any callable
//
//   parallel_for(int64_t begin, int64_t end, int64_t grain, fn)
//
// that calls fn(int64_t chunk_begin, int64_t chunk_end) on disjoint chunks covering
// [begin, end) -- in any order, from any threads, concurrently or not -- and returns once
// every chunk has run; `grain` is a hint (the smallest chunk worth a task). fn writes only
// the items of its chunk; it may throw std::bad_alloc, which the hook must pass on or
// handle. An engine passes a thin wrapper around its own pool (the torch adapter passes
// at::parallel_for); the two hooks here need nothing beyond the standard library.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace sss_ext::cpu {

// Everything on the calling thread: the default of the one-argument entry points (api.h).
struct SerialFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t /*grain*/, const F& fn) const {
    if (begin < end) fn(begin, end);
  }
};

// Up to num_threads chunks of at least `grain` items, one std::thread each (the calling
// thread runs the first); threads are started per call, so this suits batch-sized work,
// not a hot loop of tiny calls. An exception thrown by fn terminates the process.
struct ThreadsFor {
  int num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    if (begin >= end) return;
    const int64_t items = end - begin;
    const int64_t max_chunks = std::max<int64_t>(1, items / std::max<int64_t>(grain, 1));
    const int64_t chunks = std::min<int64_t>(std::max(num_threads, 1), max_chunks);
    const int64_t size = (items + chunks - 1) / chunks;
    std::vector<std::thread> workers;
    workers.reserve(static_cast<size_t>(chunks - 1));
    for (int64_t c = 1; c < chunks; ++c) {
      const int64_t chunk_begin = begin + c * size, chunk_end = std::min(end, chunk_begin + size);
      if (chunk_begin < chunk_end) workers.emplace_back([&fn, chunk_begin, chunk_end] { fn(chunk_begin, chunk_end); });
    }
    fn(begin, std::min(end, begin + size));
    for (std::thread& worker : workers) worker.join();
  }
};

}  // namespace sss_ext::cpu
