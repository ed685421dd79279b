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

#include "flg/tensor.h"

namespace flg {

// The op's arguments, declared once: the binding fills them by name, the kernels read them.
struct AttentionParams {
  Tensor out;   // (B, Sq, H, D) contiguous, dtype T (q's)
  Tensor q;     // (B, Sq, H, D), last dim contiguous, dtype T: float32, float16 or bfloat16
  Tensor k;     // (B, Skv, H, D), last dim contiguous, dtype T
  Tensor v;     // (B, Skv, H, D), last dim contiguous, dtype T
  float scale;  // softmax scale, 1/sqrt(D) for SDPA's default

  template <typename F>
  void fields(F&& f) {
    f("out", out); f("q", q); f("k", k); f("v", v); f("scale", scale);
  }
  FLG_HD int64_t batch() const { return q.sizes[0]; }
  FLG_HD int64_t seq_q() const { return q.sizes[1]; }
  FLG_HD int64_t seq_kv() const { return k.sizes[1]; }
  FLG_HD int64_t heads() const { return q.sizes[2]; }
  FLG_HD int64_t head_dim() const { return q.sizes[3]; }
};

// Limit of the CUDA kernels (the largest head-dim bucket); mirrored in flgengine/ops/native.py.
constexpr int64_t kAttentionMaxHeadDimCuda = 256;

inline ArgCheck check(const AttentionParams& p) {
  ArgCheck c;
  c.ndim("q", p.q, 4).float_dtype("q", p.q).rows("q", p.q).ndim("k", p.k, 4);
  if (!c.ok()) return c;
  const int64_t B = p.batch(), Sq = p.seq_q(), Skv = p.seq_kv(), H = p.heads(), D = p.head_dim();
  c.that(Skv > 0, "k and v have no keys (Skv = 0)").that(H > 0, "q has no heads").that(D > 0, "head dim D = 0");
  c.shape("k", p.k, {B, Skv, H, D}).dtype("k", p.k, p.q.dtype).rows("k", p.k);
  c.shape("v", p.v, {B, Skv, H, D}).dtype("v", p.v, p.q.dtype).rows("v", p.v);
  c.shape("out", p.out, {B, Sq, H, D}).dtype("out", p.out, p.q.dtype).contiguous("out", p.out);
  c.that(p.scale > 0.0f && p.scale < 1e30f, "scale must be a positive finite number");
  return c;
}

namespace cpu {
void attention(const AttentionParams& p);  // csrc/cpu/attention.cpp
}
namespace cuda {
void attention(const AttentionParams& p, std::uintptr_t stream);  // csrc/cuda/attention.cu
}

}  // namespace flg
