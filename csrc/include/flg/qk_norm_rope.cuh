// CUDA kernel of qk_norm_rope (math and layout in flg/qk_norm_rope.h).
// Grid (B * S, 2): one thread block per (b, s) row of q (blockIdx.y = 0) or k (1). A
// thread owns whole (x[2i], x[2i+1]) pairs: it reads them for the sum of squares, then
// again (from L1/L2, not DRAM) to normalise, round to T, rotate and write.
#pragma once

#include "flg/cuda_common.cuh"
#include "flg/qk_norm_rope.h"

namespace flg {
namespace cuda {

template <typename T>
__global__ void qk_norm_rope_kernel(QKNormRopeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* red = reinterpret_cast<float*>(smem);  // 32 floats (dynamic) for block_sum
  const int64_t row = blockIdx.x;  // b * S + s
  const int64_t b = row / p.seq(), s = row % p.seq();
  const bool is_k = blockIdx.y == 1;
  const int64_t n = p.heads() * p.head_dim();
  const int64_t half = p.head_dim() / 2, pairs = n / 2;
  const T* x = is_k ? p.k.ptr<const T>() + b * p.k.stride(0) + s * p.k.stride(1)
                    : p.q.ptr<const T>() + b * p.q.stride(0) + s * p.q.stride(1);
  const float* w = is_k ? p.k_weight.ptr<const float>() : p.q_weight.ptr<const float>();
  T* out = (is_k ? p.k_out.ptr<T>() : p.q_out.ptr<T>()) + row * n;
  const float* cs = p.cos.ptr<const float>() + s * p.cos.stride(0);
  const float* sn = p.sin.ptr<const float>() + s * p.sin.stride(0);

  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < pairs; j += blockDim.x) {
    const float x1 = to_f32(x[2 * j]), x2 = to_f32(x[2 * j + 1]);
    acc += x1 * x1 + x2 * x2;
  }
  const float r = rsqrtf(block_sum(acc, red) / static_cast<float>(n) + p.eps);
  for (int64_t j = threadIdx.x; j < pairs; j += blockDim.x) {
    const int64_t i = j % half;  // pair index within the head
    const float x1 = round_to<T>(__fmul_rn(__fmul_rn(to_f32(x[2 * j]), r), w[2 * j]));
    const float x2 = round_to<T>(__fmul_rn(__fmul_rn(to_f32(x[2 * j + 1]), r), w[2 * j + 1]));
    const float c = cs[i], sv = sn[i];
    out[2 * j] = from_f32<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, sv)));
    out[2 * j + 1] = from_f32<T>(__fadd_rn(__fmul_rn(x1, sv), __fmul_rn(x2, c)));
  }
}

#ifndef FLG_HOST_EMULATION  // csrc/emulate/ runs the kernel without the <<<>>> launcher
template <typename T>
inline cudaError_t launch_qk_norm_rope(const QKNormRopeParams& p, cudaStream_t stream, const char** stage) {
  *stage = "qk_norm_rope_kernel launch";
  const int64_t rows = p.batch() * p.seq();
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(rows), 2);
  qk_norm_rope_kernel<T><<<grid, row_threads(p.heads() * p.head_dim() / 2), 32 * sizeof(float), stream>>>(p);
  return cudaGetLastError();
}
#endif  // FLG_HOST_EMULATION

}  // namespace cuda
}  // namespace flg
