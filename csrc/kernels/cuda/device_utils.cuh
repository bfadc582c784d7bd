// Device helpers of the CUDA kernels: 128-bit row loads at any row alignment, float64 score
// arithmetic independent of the compiler's FMA contraction, float64 and float32 exps, and
// block-wide reductions / scans. Framework-free (CUDA runtime only).
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

// 16 bytes starting `offset` bytes (0 < offset < 16, even) into the 32 bytes lo:hi.
__device__ __forceinline__ uint4 shift_bytes(const uint4& lo, const uint4& hi, int offset) {
  const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  const int shift = (offset % 4) * 8;  // 0 or 16
  uint32_t out[4];
  const int q = offset / 4;  // uniform per row: selects, no dynamic register indexing
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a = q == 0 ? w[i] : q == 1 ? w[i + 1] : q == 2 ? w[i + 2] : w[i + 3];
    const uint32_t b = q == 0 ? w[i + 1] : q == 1 ? w[i + 2] : q == 2 ? w[i + 3] : w[i + 4];
    out[i] = __funnelshift_r(a, b, shift);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Vocabulary tiling: vector k holds elements [k * kVec, (k + 1) * kVec) of every stream, so
// chunk boundaries depend only on the vocabulary size. Each stream's row has its own
// misalignment `skew` (bytes past a 16-byte boundary); elements outside [0, vocab) read as
// -inf and are never loaded.
template <typename T>
__host__ __device__ __forceinline__ int64_t num_vectors(int64_t vocab) {
  return (vocab + Storage<T>::kVec - 1) / Storage<T>::kVec;
}

template <typename T>
__device__ __forceinline__ int row_skew(const T* row) {
  return row == nullptr ? 0 : static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16);
}

// The kVec elements starting at v0 = k * kVec as raw bits: one aligned 16-byte load when the
// row is aligned, two aligned loads and a byte shift when it is not, element loads at the
// ends of the row (and for rows not aligned to their element size).
template <typename T>
__device__ __forceinline__ uint4 load_vector(const T* row, int skew, int64_t v0, int64_t vocab) {
  constexpr int kVec = Storage<T>::kVec;
  if (v0 + kVec <= vocab && skew % sizeof(T) == 0) {
    if (skew == 0) return __ldg(reinterpret_cast<const uint4*>(row + v0));
    const int64_t lead = skew / static_cast<int>(sizeof(T));  // elements before v0 in the first aligned vector
    if (v0 - lead >= 0 && v0 - lead + 2 * kVec <= vocab) {
      const uint4* base = reinterpret_cast<const uint4*>(row + (v0 - lead));
      return shift_bytes(__ldg(base), __ldg(base + 1), skew);
    }
  }
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (sizeof(T) == 4) {
      const int64_t v = v0 + w;
      words[w] = v < vocab ? element_bits(row, v) : Storage<T>::kNegInfBits;
    } else {
      const int64_t v = v0 + 2 * w;
      const uint32_t lo = v < vocab ? element_bits(row, v) : Storage<T>::kNegInfBits;
      const uint32_t hi = v + 1 < vocab ? element_bits(row, v + 1) : Storage<T>::kNegInfBits;
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

// exp(x) in float64 within ~2 ulp for x <= ~709; 0 below -708 and for -inf / NaN, the rule
// of exp_nonpositive in csrc/kernels/cpu/row_ops.h. Table of 2^(j/64) and a degree-5
// polynomial on |r| <= ln2/128: ten float64 operations.
struct ExpTable {
  double two_pow[64];  // 2^(j/64)
};

__device__ __forceinline__ void init_exp_table(ExpTable& table) {
  for (int j = threadIdx.x; j < 64; j += blockDim.x) table.two_pow[j] = exp2(static_cast<double>(j) / 64.0);
}

constexpr double kExpFlush = -708.0;  // exp(x) = 0 for x < kExpFlush

__device__ __forceinline__ double fast_exp(double x, const ExpTable& table) {
  if (!(x >= kExpFlush)) return 0.0;                   // also -inf and NaN
  const double kScale = 92.332482616893656;            // 64 / ln 2
  const double kLn2Hi = 0.010830424696223417;          // ln 2 / 64 to 37 bits: k * kLn2Hi exact
  const double kLn2Lo = 2.572804622327669e-14;         // ln 2 / 64 - kLn2Hi
  const double kShifter = 6755399441055744.0;          // 1.5 * 2^52
  const double shifted = __fma_rn(x, kScale, kShifter);
  const double k = __dsub_rn(shifted, kShifter);
  const int n = __double2loint(shifted);  // round(x * 64 / ln 2) >= -65373: the scale below is normal
  double r = __fma_rn(-k, kLn2Hi, x);
  r = __fma_rn(-k, kLn2Lo, r);
  double p = 1.0 / 120.0;
  p = __fma_rn(p, r, 1.0 / 24.0);
  p = __fma_rn(p, r, 1.0 / 6.0);
  p = __fma_rn(p, r, 0.5);
  p = __fma_rn(p, r, 1.0);
  p = __fma_rn(p, r, 1.0);
  const double t = __dmul_rn(table.two_pow[n & 63], p);
  const int e = n >> 6;  // arithmetic shift: floor(n / 64) >= -1022
  return __dmul_rn(t, __hiloint2double((e + 1023) << 20, 0));
}

// exp(x) for a float64 x <= 0 in float32 arithmetic, for sums of exp(score - max): the
// argument is rounded to float32 once (after the float64 subtraction of the maximum, so the
// error does not grow with 1 / temperature), then ex2.approx (~2 ulp; flushes below 2^-126,
// far under the rounding of a sum >= 1).
__device__ __forceinline__ float exp_f32(double x) {
  const float t = __double2float_rn(__dmul_rn(x, 1.4426950408889634));  // log2(e) x; -inf stays -inf
  float y;
#if defined(__CUDA_ARCH__)
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(t));
#else
  y = exp2f(t);  // host compilation pass only
#endif
  return y;
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
