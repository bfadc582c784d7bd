// CUDA-on-CPU execution model for the test harness: the CUDA built-ins the kernels of
// csrc/kernels/cuda/ use, implemented on host threads so the unmodified kernel source runs
// under the host compiler (and its sanitizers). Test-only; docs/cuda_on_cpu.md.
//
// Model:
// - a launch runs its blocks one at a time, in forward or reverse block order (so a
//   `__shared__` variable can be a function-scope static: one block at a time);
// - the CUDA threads of a block are fibers on one OS thread by default: each runs until it
//   waits at a barrier or a warp collective, in forward or reverse thread order, which is
//   deterministic and fast; a deadlock is found when no fiber can run. Built with
//   SSS_CUDA_ON_CPU_OS_THREADS, each CUDA thread is an OS thread instead (for
//   ThreadSanitizer), and a watchdog reports a launch in which no barrier completes for
//   SSS_CUDA_ON_CPU_TIMEOUT seconds (default 120);
// - __syncthreads / __syncthreads_or: a block barrier that checks every live thread arrived
//   from the same source line (synccheck); threads that returned drop out of it;
// - warp collectives (__shfl_*_sync, __match_any_sync, __reduce_*_sync, __syncwarp) exchange
//   values through per-lane slots behind a barrier of exactly the lanes their mask names;
//   a lane missing from its own mask, a mask naming an exited lane, or lanes of one mask
//   arriving from different lines is reported;
// - 16-, 8- and 4-byte loads through __ldg / __ldcg check their alignment;
// - every defect prints "cuda_on_cpu: ..." and ends the process with exit code 86.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(SSS_CUDA_ON_CPU_OS_THREADS) && !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// ---------------------------------------------------------------------------------------
// Qualifiers and launch.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define SSS_EXT_LAUNCH(kernel, grid, threads, stream, ...) ::cuda_on_cpu::launch(kernel, grid, threads, __VA_ARGS__)

// ---------------------------------------------------------------------------------------
// Runtime API types.
using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

struct CudaDim3 {
  unsigned int x = 1, y = 1, z = 1;
};

struct __half {
  unsigned short bits;
};

inline void nvtxRangePushA(const char*) {}
inline void nvtxRangePop() {}

namespace cuda_on_cpu {

[[noreturn]] inline void fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fprintf(stdout, "cuda_on_cpu: ");
  std::vfprintf(stdout, format, args);
  std::fprintf(stdout, "\n");
  va_end(args);
  std::fflush(stdout);
  std::_Exit(86);
}

inline std::chrono::seconds timeout() {
  static const std::chrono::seconds seconds{[] {
    const char* value = std::getenv("SSS_CUDA_ON_CPU_TIMEOUT");
    return value != nullptr ? std::atol(value) : 120L;
  }()};
  return seconds;
}

// Paths of the harness run, read by the driver.
struct Counters {
  std::atomic<long long> launches{0}, blocks{0}, block_barriers{0}, warp_collectives{0}, match_any{0};
  std::atomic<long long> radix_blocks{0};  // blocks that called __match_any_sync (the radix descent)
};
inline Counters& counters() {
  static Counters c;
  return c;
}

inline std::atomic<bool>& launch_active() {
  static std::atomic<bool> value{false};
  return value;
}

#if defined(SSS_CUDA_ON_CPU_OS_THREADS)
// Progress of the launch in flight: every completed barrier counts. A watchdog ends the
// process when it stands still for timeout() seconds during a launch (a hang).
inline std::atomic<long long>& progress() {
  static std::atomic<long long> value{0};
  return value;
}
inline void start_watchdog() {
  static const bool started = [] {
    std::thread([] {
      long long seen = -1;
      auto since = std::chrono::steady_clock::now();
      for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        const long long now = progress().load();
        if (!launch_active().load() || now != seen) {
          seen = now;
          since = std::chrono::steady_clock::now();
        } else if (std::chrono::steady_clock::now() - since > timeout()) {
          fail("hang: no barrier completed for %lld s during a launch", static_cast<long long>(timeout().count()));
        }
      }
    }).detach();
    return true;
  }();
  (void)started;
}

// Sleeps until `generation` moves past `mine` (futex wait: no lock is taken on wake-up).
inline void wait_generation(const std::atomic<uint64_t>& generation, uint64_t mine, int) {
  while (generation.load(std::memory_order_acquire) == mine) generation.wait(mine, std::memory_order_acquire);
}
inline void advance(std::atomic<uint64_t>& generation) {
  progress()++;
  generation.fetch_add(1, std::memory_order_release);
  generation.notify_all();
}
#else
// Fiber contexts. x86-64: a switch saves the callee-saved registers and the FP control words
// on the stack and swaps stack pointers (no system call, unlike swapcontext, which the
// other architectures use). The harness is one translation unit, so the symbol is defined here.
#if defined(__x86_64__)
extern "C" void sss_cuda_on_cpu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl sss_cuda_on_cpu_switch
  .type sss_cuda_on_cpu_switch, @function
sss_cuda_on_cpu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sss_cuda_on_cpu_switch, .-sss_cuda_on_cpu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { sss_cuda_on_cpu_switch(&from.sp, to.sp); }
// A context that starts `entry` (which never returns) on the stack [stack, stack + size).
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  uint64_t* frame = reinterpret_cast<uint64_t*>(top) - 2;  // 16-aligned slot for the "return" address
  frame[0] = reinterpret_cast<uint64_t>(entry);
  for (int r = 1; r <= 6; ++r) frame[-r] = 0;        // rbp rbx r12 r13 r14 r15
  frame[-7] = 0x1f80ull | (uint64_t(0x037f) << 32);  // MXCSR and x87 control word defaults
  c.sp = frame - 7;
}
#else
struct Context {
  ucontext_t context;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.context);
  c.context.uc_stack.ss_sp = stack;
  c.context.uc_stack.ss_size = size;
  c.context.uc_link = nullptr;
  makecontext(&c.context, entry, 0);
}
#endif

// Fibers of the block in flight: the scheduler resumes a waiting fiber once the generation
// it waits on has moved.
struct Fiber {
  Context context;
  std::vector<char> stack;
  const std::atomic<uint64_t>* waits_on = nullptr;
  uint64_t waits_for = 0;
  int wait_line = -1;
  bool done = false;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping of this fiber's stack
};
struct FiberScheduler {
  Context context;
  void* fake_stack = nullptr;
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
  std::vector<Fiber> fibers;
  int current = -1;
};
inline FiberScheduler& scheduler() {
  static FiberScheduler s;
  return s;
}

// Switches from the running fiber to the scheduler; `dying`: the fiber is never resumed.
inline void to_scheduler(bool dying) {
  FiberScheduler& s = scheduler();
  Fiber& f = s.fibers[static_cast<size_t>(s.current)];
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, s.stack_bottom, s.stack_size);
#endif
  switch_context(f.context, s.context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.fake_stack, &s.stack_bottom, &s.stack_size);
#endif
  (void)dying;
}

inline void wait_generation(const std::atomic<uint64_t>& generation, uint64_t mine, int line) {
  FiberScheduler& s = scheduler();
  Fiber& f = s.fibers[static_cast<size_t>(s.current)];
  f.waits_on = &generation;
  f.waits_for = mine;
  f.wait_line = line;
  while (generation.load(std::memory_order_relaxed) == mine) to_scheduler(false);
  f.waits_on = nullptr;
}
inline void advance(std::atomic<uint64_t>& generation) { generation.fetch_add(1, std::memory_order_relaxed); }
#endif

// Threads of the current block. Arrivals are counted under a mutex; waiters sleep on the
// generation word.
struct BlockSync {
  std::mutex mutex;
  int live = 0;
  int arrived = 0;
  std::atomic<uint64_t> generation{0};
  int line = -1;
  int or_accumulator = 0;
  std::atomic<int> or_result{0};
  bool used_match_any = false;

  void release() {  // under the mutex
    arrived = 0;
    or_result.store(or_accumulator, std::memory_order_relaxed);
    or_accumulator = 0;
    advance(generation);
  }
  int sync(int line_here, int predicate) {
    uint64_t mine;
    {
      std::lock_guard<std::mutex> lock(mutex);
      counters().block_barriers++;
      if (arrived == 0) {
        line = line_here;
      } else if (line != line_here) {
        fail("barrier divergence: __syncthreads at line %d vs line %d", line, line_here);
      }
      or_accumulator |= predicate;
      mine = generation.load(std::memory_order_relaxed);
      if (++arrived == live) {
        release();
        return or_result.load(std::memory_order_relaxed);
      }
    }
    wait_generation(generation, mine, line_here);
    return or_result.load(std::memory_order_relaxed);
  }
  void exit_thread() {
    std::lock_guard<std::mutex> lock(mutex);
    --live;
    if (arrived > 0 && arrived == live) release();
  }
};

// Lanes of one warp: one barrier per mask, each with per-lane slots in two buffers (round r
// uses buffer r % 2: no lane can be two rounds ahead of another of its mask).
struct WarpSync {
  struct Group {
    int arrived = 0;
    std::atomic<uint64_t> generation{0};
    int line = -1;
    uint64_t slots[2][32] = {};
  };
  std::mutex mutex;
  uint32_t exited = 0;
  Group full;  // mask 0xffffffff
  std::map<uint32_t, Group> partial;

  // Called with `lock` held by lane `lane`: the group of `mask` after the caller's checks.
  Group& group(uint32_t mask, int lane, int line, const char* what) {
    if (!((mask >> lane) & 1u)) fail("lane %d calls %s at line %d with mask %08x that does not name it", lane, what, line, mask);
    if (mask & exited) fail("%s at line %d names exited lanes (mask %08x, exited %08x)", what, line, mask, exited);
    return mask == 0xffffffffu ? full : partial[mask];
  }
  // Called with `lock` held; returns with it held once every lane of `mask` arrived.
  void wait_group(std::unique_lock<std::mutex>& lock, Group& g, uint32_t mask, int line_here) {
    if (g.arrived == 0) {
      g.line = line_here;
    } else if (g.line != line_here) {
      fail("warp divergence: mask %08x at line %d vs line %d", mask, g.line, line_here);
    }
    const uint64_t mine = g.generation.load(std::memory_order_relaxed);
    if (++g.arrived == std::popcount(mask)) {
      g.arrived = 0;
      advance(g.generation);
      return;
    }
    lock.unlock();
    wait_generation(g.generation, mine, line_here);
    lock.lock();
  }
  template <class F>
  void for_each_group(F f) {
    f(0xffffffffu, full);
    for (auto& [mask, g] : partial) f(mask, g);
  }
};

struct Launch {
  BlockSync block;
  std::vector<WarpSync> warps;
};

inline Launch*& current_launch() {
  static Launch* launch = nullptr;
  return launch;
}

// Block order of the next launches, and (fibers) the order in which threads are resumed.
inline bool& reverse_blocks() {
  static bool reverse = false;
  return reverse;
}

}  // namespace cuda_on_cpu

#if defined(SSS_CUDA_ON_CPU_OS_THREADS)
inline thread_local CudaDim3 threadIdx;
inline thread_local CudaDim3 blockIdx;
#else
inline CudaDim3 threadIdx;  // set by the fiber scheduler before it resumes a fiber
inline CudaDim3 blockIdx;
#endif
inline CudaDim3 blockDim;
inline CudaDim3 gridDim;

namespace cuda_on_cpu {

inline int lane_id() { return static_cast<int>(threadIdx.x % 32); }
inline WarpSync& my_warp() { return current_launch()->warps[threadIdx.x / 32]; }

// One round of a warp collective: every lane of `mask` publishes `bits`, then reads.
template <class Read>
uint64_t warp_round(uint32_t mask, uint64_t bits, int line, Read read) {
  counters().warp_collectives++;
  WarpSync& w = my_warp();
  const int lane = lane_id();
  std::unique_lock<std::mutex> lock(w.mutex);
  WarpSync::Group& g = w.group(mask, lane, line, "a warp collective");
  uint64_t* slots = g.slots[g.generation.load(std::memory_order_relaxed) & 1];
  slots[lane] = bits;
  w.wait_group(lock, g, mask, line);
  return read(slots, lane);
}

template <class V>
uint64_t to_bits(V value) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable_v<V>);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  return bits;
}

template <class V>
V from_bits(uint64_t bits) {
  V value;
  std::memcpy(&value, &bits, sizeof(V));
  return value;
}

template <class V>
V shuffle(uint32_t mask, V value, int line, int (*source)(int lane, int arg), int arg) {
  const uint64_t bits = warp_round(mask, to_bits(value), line, [&](const uint64_t* slots, int lane) {
    const int src = source(lane, arg);
    if (src < 0 || src >= 32) return slots[lane];
    if (!((mask >> src) & 1u)) fail("shuffle at line %d reads lane %d outside mask %08x", line, src, mask);
    return slots[src];
  });
  return from_bits<V>(bits);
}

inline int source_xor(int lane, int arg) { return lane ^ arg; }
inline int source_up(int lane, int arg) { return lane - arg >= 0 ? lane - arg : lane; }
inline int source_index(int, int arg) { return arg & 31; }

inline int syncthreads(int line, int predicate) { return current_launch()->block.sync(line, predicate); }

template <class V>
unsigned int match_any(uint32_t mask, V value, int line) {
  counters().match_any++;
  current_launch()->block.used_match_any = true;
  const uint64_t bits = to_bits(value);
  return static_cast<unsigned int>(warp_round(mask, bits, line, [&](const uint64_t* slots, int) {
    uint64_t peers = 0;
    for (int l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && slots[l] == bits) peers |= uint64_t(1) << l;
    return peers;
  }));
}

template <class Op>
unsigned int reduce_u32(uint32_t mask, unsigned int value, int line, Op op, unsigned int init) {
  return static_cast<unsigned int>(warp_round(mask, value, line, [&](const uint64_t* slots, int) {
    unsigned int total = init;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) total = op(total, static_cast<unsigned int>(slots[l]));
    return static_cast<uint64_t>(total);
  }));
}

inline void syncwarp(uint32_t mask, int line) {
  WarpSync& w = my_warp();
  const int lane = lane_id();
  std::unique_lock<std::mutex> lock(w.mutex);
  w.wait_group(lock, w.group(mask, lane, line, "__syncwarp"), mask, line);
}

template <class P>
P checked_load(const P* address, const char* what) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(P) != 0)
    fail("misaligned %zu-byte load through %s at %p", sizeof(P), what, static_cast<const void*>(address));
  return *address;
}

// A CUDA thread returned from the kernel: it leaves its warp and the block barrier.
inline void thread_exit(Launch& launch) {
  WarpSync& w = my_warp();
  {
    std::lock_guard<std::mutex> lock(w.mutex);
    w.exited |= 1u << lane_id();
    // A warp group waiting for this lane can never complete.
    w.for_each_group([&](uint32_t mask, const WarpSync::Group& g) {
      if (g.arrived != 0 && ((mask >> lane_id()) & 1u)) fail("lane %d exited while lanes of mask %08x wait at line %d", lane_id(), mask, g.line);
    });
  }
  launch.block.exit_thread();
}

// Every thread of `block` returned: nothing may still wait; reset for the next block.
inline void end_block(Launch& launch, int64_t block, int threads) {
  counters().blocks++;
  if (launch.block.used_match_any) counters().radix_blocks++;
  if (launch.block.arrived != 0) fail("block %lld ended with %d threads waiting at line %d", (long long)block, launch.block.arrived, launch.block.line);
  launch.block.live = threads;
  launch.block.used_match_any = false;
  for (WarpSync& w : launch.warps) {
    w.exited = 0;
    w.for_each_group([&](uint32_t mask, const WarpSync::Group& g) {
      if (g.arrived != 0) fail("block %lld ended with lanes waiting in a warp collective (mask %08x, line %d)", (long long)block, mask, g.line);
    });
  }
}

#if !defined(SSS_CUDA_ON_CPU_OS_THREADS)
inline std::function<void()>*& fiber_body() {
  static std::function<void()>* body = nullptr;
  return body;
}

inline void fiber_entry() {
  FiberScheduler& s = scheduler();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &s.stack_bottom, &s.stack_size);
#endif
  (*fiber_body())();
  thread_exit(*current_launch());
  s.fibers[static_cast<size_t>(s.current)].done = true;
  to_scheduler(true);
}

// Runs the fibers of one block until all returned; a round in which none can run is a deadlock.
inline void run_block(int64_t block, int threads, bool reverse) {
  FiberScheduler& s = scheduler();
#if defined(__SANITIZE_ADDRESS__)
  constexpr size_t kStack = 1 << 20;
#else
  constexpr size_t kStack = 256 << 10;
#endif
  if (s.fibers.size() < static_cast<size_t>(threads)) s.fibers.resize(static_cast<size_t>(threads));
  blockIdx = CudaDim3{static_cast<unsigned int>(block), 0, 0};
  for (int t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[static_cast<size_t>(t)];
    if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
    make_context(f.context, f.stack.data(), f.stack.size(), fiber_entry);
    f.done = false;
    f.waits_on = nullptr;
  }
  for (int finished = 0; finished < threads;) {
    bool progressed = false;
    for (int n = 0; n < threads; ++n) {
      const int t = reverse ? threads - 1 - n : n;
      Fiber& f = s.fibers[static_cast<size_t>(t)];
      if (f.done || (f.waits_on != nullptr && f.waits_on->load(std::memory_order_relaxed) == f.waits_for)) continue;
      s.current = t;
      threadIdx = CudaDim3{static_cast<unsigned int>(t), 0, 0};
#if defined(__SANITIZE_ADDRESS__)
      __sanitizer_start_switch_fiber(&s.fake_stack, f.stack.data(), f.stack.size());
#endif
      switch_context(s.context, f.context);
#if defined(__SANITIZE_ADDRESS__)
      __sanitizer_finish_switch_fiber(s.fake_stack, nullptr, nullptr);
#endif
      progressed = true;
      finished += f.done ? 1 : 0;
    }
    if (!progressed) {
      int waiting = -1;
      for (int t = 0; t < threads && waiting < 0; ++t)
        if (!s.fibers[static_cast<size_t>(t)].done) waiting = t;
      fail("hang in block %lld: no thread can run (thread %d waits at line %d; %d of %d threads returned)", (long long)block, waiting,
           s.fibers[static_cast<size_t>(waiting)].wait_line, finished, threads);
    }
  }
}
#endif

// Runs kernel(args) over `grid` blocks of `threads` threads.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), int64_t grid, int threads, const Args&... args) {
  if (grid < 1 || grid >= (int64_t(1) << 31) || threads < 1 || threads > 1024 || threads % 32 != 0) return cudaErrorInvalidConfiguration;
  counters().launches++;
  Launch launch;
  launch.warps = std::vector<WarpSync>(static_cast<size_t>(threads / 32));
  launch.block.live = threads;
  current_launch() = &launch;
  blockDim = CudaDim3{static_cast<unsigned int>(threads), 1, 1};
  gridDim = CudaDim3{static_cast<unsigned int>(grid), 1, 1};
  const bool reverse = reverse_blocks();
  launch_active() = true;
#if defined(SSS_CUDA_ON_CPU_OS_THREADS)
  // Block boundaries: every thread meets here before the next block starts.
  std::mutex boundary_mutex;
  int boundary_arrived = 0;
  std::atomic<uint64_t> boundary_generation{0};
  const auto boundary = [&](int64_t block) {
    uint64_t mine;
    {
      std::lock_guard<std::mutex> lock(boundary_mutex);
      mine = boundary_generation.load(std::memory_order_relaxed);
      if (++boundary_arrived == threads) {
        boundary_arrived = 0;
        end_block(launch, block, threads);
        advance(boundary_generation);
        return;
      }
    }
    wait_generation(boundary_generation, mine, -1);
  };
  start_watchdog();
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      threadIdx = CudaDim3{static_cast<unsigned int>(t), 0, 0};
      for (int64_t n = 0; n < grid; ++n) {
        const int64_t block = reverse ? grid - 1 - n : n;
        blockIdx = CudaDim3{static_cast<unsigned int>(block), 0, 0};
        kernel(args...);
        thread_exit(launch);
        boundary(block);
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
#else
  std::function<void()> body = [&] { kernel(args...); };
  fiber_body() = &body;
  for (int64_t n = 0; n < grid; ++n) {
    const int64_t block = reverse ? grid - 1 - n : n;
    run_block(block, threads, reverse);
    end_block(launch, block, threads);
  }
  fiber_body() = nullptr;
#endif
  launch_active() = false;
  current_launch() = nullptr;
  return cudaSuccess;
}

}  // namespace cuda_on_cpu

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// ---------------------------------------------------------------------------------------
// Barriers and warp collectives (the line of the call site identifies a barrier).
#define __syncthreads() ::cuda_on_cpu::syncthreads(__LINE__, 0)
#define __syncthreads_or(predicate) ::cuda_on_cpu::syncthreads(__LINE__, (predicate) ? 1 : 0)
#define __syncwarp(...) ::cuda_on_cpu::syncwarp(__VA_OPT__(__VA_ARGS__) __VA_OPT__(, ) __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) ::cuda_on_cpu::shuffle(mask, value, __LINE__, ::cuda_on_cpu::source_xor, lane_mask)
#define __shfl_up_sync(mask, value, delta) ::cuda_on_cpu::shuffle(mask, value, __LINE__, ::cuda_on_cpu::source_up, delta)
#define __shfl_sync(mask, value, src_lane) ::cuda_on_cpu::shuffle(mask, value, __LINE__, ::cuda_on_cpu::source_index, src_lane)
#define __match_any_sync(mask, value) ::cuda_on_cpu::match_any(mask, value, __LINE__)
#define __reduce_and_sync(mask, value) \
  ::cuda_on_cpu::reduce_u32(mask, value, __LINE__, [](unsigned int a, unsigned int b) { return a & b; }, 0xffffffffu)
#define __reduce_or_sync(mask, value) \
  ::cuda_on_cpu::reduce_u32(mask, value, __LINE__, [](unsigned int a, unsigned int b) { return a | b; }, 0u)

// __syncwarp() without a mask means the full warp.
namespace cuda_on_cpu {
inline void syncwarp(int line) { syncwarp(0xffffffffu, line); }
}  // namespace cuda_on_cpu

// ---------------------------------------------------------------------------------------
// Memory: atomics, fences, cached loads.
template <class V>
V atomicAdd(V* address, V value) {
  return std::atomic_ref<V>(*address).fetch_add(value);
}
template <class V>
V atomicOr(V* address, V value) {
  return std::atomic_ref<V>(*address).fetch_or(value);
}
template <class V>
V atomicAnd(V* address, V value) {
  return std::atomic_ref<V>(*address).fetch_and(value);
}
template <class V>
V atomicMin(V* address, V value) {
  std::atomic_ref<V> ref(*address);
  V old = ref.load();
  while (value < old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <class V>
V atomicMax(V* address, V value) {
  std::atomic_ref<V> ref(*address);
  V old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class P>
P __ldg(const P* address) {
  return ::cuda_on_cpu::checked_load(address, "__ldg");
}
template <class P>
P __ldcg(const P* address) {
  return ::cuda_on_cpu::checked_load(address, "__ldcg");
}

// ---------------------------------------------------------------------------------------
// Arithmetic intrinsics (compile with -ffp-contract=off: the _rn forms round each operation).
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline double __ull2double_rn(unsigned long long x) { return static_cast<double>(x); }
inline unsigned long long __double2ull_rz(double x) {
  if (!(x > 0.0)) return 0;  // the device conversion saturates; NaN gives 0
  if (x >= 18446744073709551616.0) return ~0ull;
  return static_cast<unsigned long long>(x);
}
inline int __double2loint(double x) { return static_cast<int>(static_cast<uint32_t>(std::bit_cast<uint64_t>(x))); }
inline double __hiloint2double(int hi, int lo) {
  return std::bit_cast<double>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo));
}
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<uint32_t>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<uint64_t>(x)); }
inline int __popc(unsigned int x) { return std::popcount(x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<uint32_t>(x)) + 1; }
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
  return static_cast<unsigned int>(((static_cast<uint64_t>(hi) << 32) | lo) >> (shift & 31));
}
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

// CUDA's device min / max overloads for mixed integer and floating types.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
