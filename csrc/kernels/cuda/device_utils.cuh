// Device helpers of the CUDA kernels: 128-bit row loads, float64 score arithmetic that is
// independent of the compiler's FMA contraction, a fast float64 exp, and block-wide
// reductions / scans. Framework-free (CUDA runtime only).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"

namespace sss_ext::cuda {

constexpr double kInfD = __builtin_huge_val();
constexpr float kInfF = __builtin_huge_valf();
constexpr int kWarp = 32;

// ---------------------------------------------------------------------------------------
// Storage types: 16 bytes hold kVec<T> elements; the bit pattern of -inf pads loads.
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static constexpr int kVec = 4;
  static constexpr uint32_t kNegInfBits = 0xff800000u;
};
template <>
struct Storage<bfloat16_t> {
  static constexpr int kVec = 8;
  static constexpr uint32_t kNegInfBits = 0xff80u;
};
template <>
struct Storage<float16_t> {
  static constexpr int kVec = 8;
  static constexpr uint32_t kNegInfBits = 0xfc00u;
};

template <typename T>
__device__ __forceinline__ uint32_t element_bits(const T* row, int64_t v) {
  if constexpr (sizeof(T) == 4) {
    return __ldg(reinterpret_cast<const unsigned int*>(row) + v);
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(row) + v);
  }
}

template <typename T>
__device__ __forceinline__ float bits_to_value(uint32_t bits) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(bits);
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    return __uint_as_float(bits << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
}

// Element e (0 <= e < kVec) of a 16-byte vector.
template <typename T>
__device__ __forceinline__ float unpack(const uint4& raw, int e) {
  constexpr int kPerWord = static_cast<int>(4 / sizeof(T));
  const uint32_t word = e < 2 * kPerWord ? (e < kPerWord ? raw.x : raw.y) : (e < 3 * kPerWord ? raw.z : raw.w);
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(word);
  } else {
    return bits_to_value<T>((e & 1) ? (word >> 16) : (word & 0xffffu));
  }
}

// Vocabulary tiling of one (row, position): 16-byte vectors start at `origin` (<= 0) so that
// they are aligned for every stream; elements outside [0, vocab) read as -inf and are never
// loaded. `aligned` is false when the streams' rows disagree on alignment: then every element
// is loaded on its own.
struct RowTiling {
  int64_t origin = 0;
  int64_t num_vectors = 0;
  bool aligned = false;
};

template <typename T>
__device__ __forceinline__ RowTiling row_tiling(const T* a, const T* b, const T* c, int64_t vocab) {
  constexpr int kVec = Storage<T>::kVec;
  const uintptr_t address = reinterpret_cast<uintptr_t>(a);
  const uintptr_t misalign = address % 16;
  bool aligned = misalign % sizeof(T) == 0;
  if (b != nullptr) aligned &= reinterpret_cast<uintptr_t>(b) % 16 == misalign;
  if (c != nullptr) aligned &= reinterpret_cast<uintptr_t>(c) % 16 == misalign;
  RowTiling t;
  t.aligned = aligned;
  t.origin = aligned ? -static_cast<int64_t>(misalign / sizeof(T)) : 0;
  t.num_vectors = (vocab - t.origin + kVec - 1) / kVec;
  return t;
}

// The kVec elements starting at v0 (a multiple of kVec past tiling.origin) as raw bits.
template <typename T>
__device__ __forceinline__ uint4 load_vector(const T* row, int64_t v0, int64_t vocab, bool aligned) {
  constexpr int kVec = Storage<T>::kVec;
  if (aligned && v0 >= 0 && v0 + kVec <= vocab) return __ldg(reinterpret_cast<const uint4*>(row + v0));
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (sizeof(T) == 4) {
      const int64_t v = v0 + w;
      words[w] = (v >= 0 && v < vocab) ? element_bits(row, v) : Storage<T>::kNegInfBits;
    } else {
      const int64_t v = v0 + 2 * w;
      const uint32_t lo = (v >= 0 && v < vocab) ? element_bits(row, v) : Storage<T>::kNegInfBits;
      const uint32_t hi = (v + 1 >= 0 && v + 1 < vocab) ? element_bits(row, v + 1) : Storage<T>::kNegInfBits;
      words[w] = lo | (hi << 16);
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

template <typename T>
__device__ __forceinline__ double load_double(const T* row, int64_t v) {
  return static_cast<double>(bits_to_value<T>(element_bits(row, v)));
}

// ---------------------------------------------------------------------------------------
// float64 scores, bit-compatible with csrc/kernels/cpu/verify.h (PositionScores) and the
// reference: "/ tau" is "* (1 / tau)" everywhere. Explicit _rn intrinsics keep the results
// independent of -fmad.
struct ScoreParams {
  double inverse_temperature = 1.0;  // 1 at temperature 0 (greedy scores are untempered)
  double shift = 1.0;
  bool tilt = false;  // s = zq/tau + shift*(zr/tau - zd/tau); else s = zq/tau
};

__device__ __forceinline__ double temper(double x, const ScoreParams& sp) { return __dmul_rn(x, sp.inverse_temperature); }

__device__ __forceinline__ double tilted_score(double zq, double zr, double zd, const ScoreParams& sp) {
  const double q = temper(zq, sp);
  if (!sp.tilt) return q;
  const double s = __dadd_rn(q, __dmul_rn(sp.shift, __dsub_rn(temper(zr, sp), temper(zd, sp))));
  return (zq == -kInfD || zr == -kInfD || zd == -kInfD) ? -kInfD : s;
}

// exp(x) in float64 within ~2 ulp for x <= ~709; 0 below -745. Table of 2^(j/64) and a
// degree-5 polynomial on |r| <= ln2/128: ten float64 operations.
struct ExpTable {
  double two_pow[64];  // 2^(j/64)
};

__device__ __forceinline__ void init_exp_table(ExpTable& table) {
  for (int j = threadIdx.x; j < 64; j += blockDim.x) table.two_pow[j] = exp2(static_cast<double>(j) / 64.0);
}

__device__ __forceinline__ double fast_exp(double x, const ExpTable& table) {
  if (!(x > -745.0)) return 0.0;  // also -inf
  const double kScale = 92.332482616893656;          // 64 / ln 2
  const double kLn2Hi = 0.010830424696223417;         // ln 2 / 64 to 37 bits: k * kLn2Hi exact
  const double kLn2Lo = 2.572804622327669e-14;         // ln 2 / 64 - kLn2Hi
  const double kShifter = 6755399441055744.0;         // 1.5 * 2^52
  const double shifted = __fma_rn(x, kScale, kShifter);
  const double k = __dsub_rn(shifted, kShifter);
  const int n = __double2loint(shifted);  // round(x * 64 / ln 2)
  double r = __fma_rn(-k, kLn2Hi, x);
  r = __fma_rn(-k, kLn2Lo, r);
  double p = 1.0 / 120.0;
  p = __fma_rn(p, r, 1.0 / 24.0);
  p = __fma_rn(p, r, 1.0 / 6.0);
  p = __fma_rn(p, r, 0.5);
  p = __fma_rn(p, r, 1.0);
  p = __fma_rn(p, r, 1.0);
  const double t = __dmul_rn(table.two_pow[n & 63], p);
  const int e = n >> 6;  // arithmetic shift: floor(n / 64)
  if (e < -1000) {       // subnormal range: scale in two steps
    return __dmul_rn(__dmul_rn(t, __hiloint2double((e + 1000 + 1023) << 20, 0)), __hiloint2double((-1000 + 1023) << 20, 0));
  }
  return __dmul_rn(t, __hiloint2double((e + 1023) << 20, 0));
}

// ---------------------------------------------------------------------------------------
// Block-wide collectives (kThreads a multiple of 32, <= 1024). `scratch` is shared memory of
// kThreads / 32 elements; every call starts and ends with a barrier so scratch may be reused.
template <int kThreads, typename V, typename F>
__device__ __forceinline__ V block_reduce(V value, F op, V* scratch) {
  constexpr int kWarps = kThreads / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  V total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = op(total, scratch[w]);
  __syncthreads();
  return total;
}

// Exclusive prefix sum over threads in thread order, and the block total. The summation
// order depends only on kThreads, so every kernel that calls it gets identical bits.
template <int kThreads>
__device__ __forceinline__ double block_exclusive_sum(double value, double& total, double* scratch) {
  constexpr int kWarps = kThreads / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  double inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const double other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive = __dadd_rn(other, inclusive);
  }
  double exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
  if (lane == 0) exclusive = 0.0;
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  double warp_offset = 0.0;
  total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) warp_offset = total;
    total = __dadd_rn(total, scratch[w]);
  }
  __syncthreads();
  return __dadd_rn(warp_offset, exclusive);
}

}  // namespace sss_ext::cuda
