// qk_norm_rope: Wan's q/k path of self-attention in one pass over q and k.
//
// For x in {q, k} (each (B, S, N) with N = H * Dh) and its weight w (N,):
//   r          = rsqrt(mean_n(x[b, s, n]^2) + eps)                  (fp32)
//   n[j]       = round_T((x[j] * r) * w[j])                          (F.rms_norm's output)
//   for each head and pair i < Dh/2, with (x1, x2) = (n[2i], n[2i+1]) of that head,
//   c = cos[s, i], s = sin[s, i]:
//   out[b, s, head, 2i]   = round_T(x1 * c - x2 * s)                 (fp32)
//   out[b, s, head, 2i+1] = round_T(x1 * s + x2 * c)
//
// q and k are read through (b, s) row strides, last dim contiguous; q_out and k_out are
// contiguous (B, S, H, Dh), i.e. the same flat index as a contiguous (B, S, N). Weights
// are contiguous fp32 (N,); cos and sin are fp32 (S, Dh/2) with a row stride.
#pragma once

#include <cstdint>
#include <string>

#include "flg/common.h"

namespace flg {

struct QKNormRopeParams {
  void* q_out;               // (B, S, H, Dh) contiguous, dtype T
  void* k_out;               // (B, S, H, Dh) contiguous, dtype T
  const void* q;             // element (b, s, n) at q[b * q_stride_b + s * q_stride_s + n]
  const void* k;             // likewise with k's strides
  const float* q_weight;     // (N,) contiguous
  const float* k_weight;     // (N,) contiguous
  const float* cos;          // element (s, i) at cos[s * cos_stride_s + i]
  const float* sin;          // element (s, i) at sin[s * sin_stride_s + i]
  int64_t batch;             // B
  int64_t seq;               // S
  int64_t heads;             // H
  int64_t head_dim;          // Dh (even)
  int64_t q_stride_b, q_stride_s;  // elements
  int64_t k_stride_b, k_stride_s;
  int64_t cos_stride_s, sin_stride_s;
  float eps;
  int dtype;                 // DType code of q, k, q_out, k_out
};

inline Status check(const QKNormRopeParams& p) {
  if (!p.q_out || !p.k_out || !p.q || !p.k || !p.q_weight || !p.k_weight || !p.cos || !p.sin)
    return Status::InvalidArgument;
  if (p.batch < 0 || p.seq < 0 || p.heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0) return Status::InvalidArgument;
  if (p.q_stride_b < 0 || p.q_stride_s < 0 || p.k_stride_b < 0 || p.k_stride_s < 0 || p.cos_stride_s < 0 ||
      p.sin_stride_s < 0)
    return Status::InvalidArgument;
  if (p.dtype < 0 || p.dtype > 2) return Status::UnsupportedDType;
  if (!(p.eps >= 0.0f)) return Status::InvalidArgument;
  return Status::Ok;
}

inline std::string describe(const QKNormRopeParams& p, Status st, const char* where) {
  if (st == Status::UnsupportedDType)
    return std::string("qk_norm_rope (") + where + "): unsupported dtype " + dtype_name(p.dtype) +
           "; q and k must be float32, float16 or bfloat16";
  return std::string("qk_norm_rope (") + where +
         "): invalid arguments (null pointer, negative size or stride, odd or zero head_dim, zero heads or negative eps)";
}

}  // namespace flg
