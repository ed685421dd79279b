// Host stand-in for the CUDA runtime / device intrinsics the flgengine kernels use, so
// their device code runs on the CPU under FLG_HOST_EMULATION: every CUDA thread of a
// block is a std::thread, __syncthreads a block barrier, warp shuffles go through an
// exchange buffer between two warp barriers. Numerics: fp32 as on the device (rsqrtf,
// exp2f from libm, so last-bit differences from the GPU are expected); fp16/bf16
// conversions round to nearest even like the device intrinsics.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <vector>

#include "flg/common.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)
#define __shared__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = void*;

namespace flg_emu {
struct BlockState {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float xch[32][32];
};
inline BlockState* state = nullptr;
inline std::barrier<>& warp_barrier() { return *state->warps[threadIdx.x / 32]; }
}  // namespace flg_emu

inline void __syncthreads() { flg_emu::state->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { flg_emu::warp_barrier().arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
  flg_emu::state->xch[w][l] = v;
  __syncwarp();
  const float r = flg_emu::state->xch[w][l ^ static_cast<unsigned>(mask)];
  __syncwarp();
  return r;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

// 16-bit float types: bit patterns, converted with flg/common.h's host routines.
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return flg::half_to_float(h.bits); }
inline __half __float2half_rn(float v) { return {flg::float_to_half(v)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return flg::bf16_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {flg::float_to_bf16(v)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
