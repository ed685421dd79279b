// attention: non-causal softmax attention forward, fp32 accumulation.
//
//   out[b, i, h, :] = sum_j softmax_j(scale * <q[b, i, h, :], k[b, j, h, :]>) * v[b, j, h, :]
//
// q is (B, Sq, H, D), k and v are (B, Skv, H, D), each read through its own (b, s, h)
// element strides with the last dim contiguous; out is contiguous (B, Sq, H, D) in the
// inputs' dtype. Scores, the online softmax and the weighted sum are fp32 (the CUDA
// tensor-core path rounds the probabilities to the input dtype before the P.V product,
// as flash attention does). Skv >= 1.
#pragma once

#include <cstdint>
#include <string>

#include "flg/common.h"

namespace flg {

struct AttentionParams {
  void* out;                 // (B, Sq, H, D) contiguous
  const void* q;             // element (b, s, h, d) at q[b * q_stride_b + s * q_stride_s + h * q_stride_h + d]
  const void* k;             // likewise with k's strides
  const void* v;             // likewise with v's strides
  int64_t batch;             // B
  int64_t seq_q;             // Sq
  int64_t seq_kv;            // Skv
  int64_t heads;             // H
  int64_t head_dim;          // D
  int64_t q_stride_b, q_stride_s, q_stride_h;  // elements
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  float scale;               // softmax scale, 1/sqrt(D) for SDPA's default
  int dtype;                 // DType code of q, k, v, out
};

inline Status check(const AttentionParams& p) {
  if (!p.out || !p.q || !p.k || !p.v) return Status::InvalidArgument;
  if (p.batch < 0 || p.seq_q < 0 || p.seq_kv <= 0 || p.heads <= 0 || p.head_dim <= 0) return Status::InvalidArgument;
  const int64_t strides[] = {p.q_stride_b, p.q_stride_s, p.q_stride_h, p.k_stride_b, p.k_stride_s,
                             p.k_stride_h, p.v_stride_b, p.v_stride_s, p.v_stride_h};
  for (int64_t s : strides)
    if (s < 0) return Status::InvalidArgument;
  if (p.dtype < 0 || p.dtype > 2) return Status::UnsupportedDType;
  if (!(p.scale > 0.0f) || !(p.scale < 1e30f)) return Status::InvalidArgument;
  return Status::Ok;
}

inline std::string describe(const AttentionParams& p, Status st, const char* where) {
  if (st == Status::UnsupportedDType)
    return std::string("attention (") + where + "): unsupported dtype " + dtype_name(p.dtype) +
           "; q, k, v must be float32, float16 or bfloat16";
  return std::string("attention (") + where +
         "): invalid arguments (null pointer, negative size or stride, empty key sequence, zero heads or head_dim, "
         "or a scale that is not a positive finite number)";
}

}  // namespace flg
