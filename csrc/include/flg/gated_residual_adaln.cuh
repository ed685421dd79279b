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
  float* xs = red + 32;                           // the rounded x_new row, D floats
  const int64_t row = blockIdx.x;  // b * S + s
  const int64_t dim = p.dim();
  const int64_t b = row / p.seq(), s = row % p.seq();
  const T* x = p.x.ptr<const T>() + b * p.x.stride(0) + s * p.x.stride(1);
  const T* y = p.y.ptr<const T>() + b * p.y.stride(0) + s * p.y.stride(1);
  const M* gate = p.gate.ptr<const M>() + b * p.gate.stride(0) + s * p.gate.stride(1);
  const M* scale = p.scale.ptr<const M>() + b * p.scale.stride(0) + s * p.scale.stride(1);
  const M* shift = p.shift.ptr<const M>() + b * p.shift.stride(0) + s * p.shift.stride(1);
  T* x_out = p.x_out.ptr<T>() + row * dim;
  T* h_out = p.h_out.ptr<T>() + row * dim;

  // 1. x_new = x + y * gate in fp32 (product and sum each rounded, as torch does), stored
  //    rounded to T; the rounded value feeds the statistics.
  float acc = 0.0f;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const T xn = from_f32<T>(__fadd_rn(to_f32(x[d]), __fmul_rn(to_f32(y[d]), to_f32(gate[d]))));
    x_out[d] = xn;
    const float v = to_f32(xn);
    xs[d] = v;
    acc += v;
  }
  const float mean = block_sum(acc, red) / static_cast<float>(dim);
  // 2. centred variance (biased, as LayerNorm)
  acc = 0.0f;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const float c = xs[d] - mean;
    acc += c * c;
  }
  const float rstd = rsqrtf(block_sum(acc, red) / static_cast<float>(dim) + p.eps);
  // 3. normalise and modulate
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    const float n = (xs[d] - mean) * rstd;
    h_out[d] = from_f32<T>(n * (1.0f + to_f32(scale[d])) + to_f32(shift[d]));
  }
}

#ifndef FLG_HOST_EMULATION  // csrc/emulate/ runs the kernel without the <<<>>> launcher
// Launches on `stream`; returns the first CUDA error and names its call in *stage.
template <typename T, typename M>
inline cudaError_t launch_gated_residual_adaln(const GatedResidualAdaLNParams& p, cudaStream_t stream,
                                               const char** stage) {
  const int64_t rows = p.batch() * p.seq();
  if (rows == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(32 + p.dim()) * sizeof(float);
  if (smem > 48 * 1024) {
    *stage = "cudaFuncSetAttribute(gated_residual_adaln_kernel, MaxDynamicSharedMemorySize)";
    cudaError_t err = cudaFuncSetAttribute(gated_residual_adaln_kernel<T, M>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  *stage = "gated_residual_adaln_kernel launch";
  gated_residual_adaln_kernel<T, M><<<static_cast<unsigned>(rows), row_threads(p.dim()), smem, stream>>>(p);
  return cudaGetLastError();
}
#endif  // FLG_HOST_EMULATION

}  // namespace cuda
}  // namespace flg
