// CUDA kernel of gated_residual_adaln (math and layout in flg/gated_residual_adaln.h).
// One thread block per (b, s) row. Each thread computes x_new for its elements, writes
// it, and keeps the rounded value in shared memory (dynamic: 32 + D floats); the block then
// takes the fp32 mean and centred variance from shared memory and writes h. Every
// thread reads back only the shared-memory slots it wrote itself, so the only block-wide
// synchronisation is inside the reductions. x and y are read once, x_new and h written once.
#pragma once

#include "flg/cuda_common.cuh"
#include "flg/gated_residual_adaln.h"

namespace flg {
namespace cuda {

template <typename T, typename M>
__global__ void gated_residual_adaln_kernel(GatedResidualAdaLNParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* red = reinterpret_cast<float*>(smem);  // 32 floats for block_sum
  float* xs = red + 32;                           // the rounded x_new row, p.dim floats
  const int64_t row = blockIdx.x;  // b * S + s
  const int64_t b = row / p.seq, s = row % p.seq;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + s * p.x_stride_s;
  const T* y = static_cast<const T*>(p.y) + b * p.y_stride_b + s * p.y_stride_s;
  const M* gate = static_cast<const M*>(p.gate) + b * p.gate_stride_b + s * p.gate_stride_s;
  const M* scale = static_cast<const M*>(p.scale) + b * p.scale_stride_b + s * p.scale_stride_s;
  const M* shift = static_cast<const M*>(p.shift) + b * p.shift_stride_b + s * p.shift_stride_s;
  T* x_out = static_cast<T*>(p.x_out) + row * p.dim;
  T* h_out = static_cast<T*>(p.h_out) + row * p.dim;

  // 1. x_new = x + y * gate in fp32 (product and sum each rounded, as torch does), stored
  //    rounded to T; the rounded value feeds the statistics.
  float acc = 0.0f;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    const T xn = from_f32<T>(__fadd_rn(to_f32(x[d]), __fmul_rn(to_f32(y[d]), to_f32(gate[d]))));
    x_out[d] = xn;
    const float v = to_f32(xn);
    xs[d] = v;
    acc += v;
  }
  const float mean = block_sum(acc, red) / static_cast<float>(p.dim);
  // 2. centred variance (biased, as LayerNorm)
  acc = 0.0f;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    const float c = xs[d] - mean;
    acc += c * c;
  }
  const float rstd = rsqrtf(block_sum(acc, red) / static_cast<float>(p.dim) + p.eps);
  // 3. normalise and modulate
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    const float n = (xs[d] - mean) * rstd;
    h_out[d] = from_f32<T>(n * (1.0f + to_f32(scale[d])) + to_f32(shift[d]));
  }
}

#ifndef FLG_HOST_EMULATION  // csrc/emulate/ runs the kernel without the <<<>>> launcher
// Launches on `stream`; returns the first CUDA error and names its call in *stage.
template <typename T, typename M>
inline cudaError_t launch_gated_residual_adaln(const GatedResidualAdaLNParams& p, cudaStream_t stream,
                                               const char** stage) {
  const int64_t rows = p.batch * p.seq;
  if (rows == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(32 + p.dim) * sizeof(float);
  if (smem > 48 * 1024) {
    *stage = "cudaFuncSetAttribute(gated_residual_adaln_kernel, MaxDynamicSharedMemorySize)";
    cudaError_t err = cudaFuncSetAttribute(gated_residual_adaln_kernel<T, M>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  *stage = "gated_residual_adaln_kernel launch";
  gated_residual_adaln_kernel<T, M><<<static_cast<unsigned>(rows), row_threads(p.dim), smem, stream>>>(p);
  return cudaGetLastError();
}
#endif  // FLG_HOST_EMULATION

}  // namespace cuda
}  // namespace flg
