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
// contiguous (B, S, H, Dh), i.e. the same flat index as a contiguous (B, S, N); their shape
// gives H and Dh. Weights are contiguous fp32 (N,); cos and sin are fp32 (S, Dh/2) with a
// row stride.
#pragma once

#include <cstdint>

#include "flg/tensor.h"

namespace flg {

// The op's arguments, declared once: the binding fills them by name, the kernels read them.
struct QKNormRopeParams {
  Tensor q_out;     // (B, S, H, Dh) contiguous, dtype T (q's); Dh even
  Tensor k_out;     // (B, S, H, Dh) contiguous, dtype T
  Tensor q;         // (B, S, H * Dh), last dim contiguous, dtype T: float32, float16 or bfloat16
  Tensor k;         // like q
  Tensor q_weight;  // (H * Dh,) contiguous float32
  Tensor k_weight;  // (H * Dh,) contiguous float32
  Tensor cos;       // (S, Dh / 2) float32, last dim contiguous
  Tensor sin;       // (S, Dh / 2) float32, last dim contiguous
  float eps;

  template <typename F>
  void fields(F&& f) {
    f("q_out", q_out); f("k_out", k_out); f("q", q); f("k", k);
    f("q_weight", q_weight); f("k_weight", k_weight); f("cos", cos); f("sin", sin); f("eps", eps);
  }
  FLG_HD int64_t batch() const { return q.sizes[0]; }
  FLG_HD int64_t seq() const { return q.sizes[1]; }
  FLG_HD int64_t heads() const { return q_out.sizes[2]; }
  FLG_HD int64_t head_dim() const { return q_out.sizes[3]; }
};

inline ArgCheck check(const QKNormRopeParams& p) {
  ArgCheck c;
  c.ndim("q", p.q, 3).float_dtype("q", p.q).rows("q", p.q).ndim("q_out", p.q_out, 4);
  if (!c.ok()) return c;
  const int64_t B = p.batch(), S = p.seq(), N = p.q.size(2), H = p.heads(), Dh = p.head_dim();
  c.that(H > 0 && Dh > 0 && Dh % 2 == 0 && H * Dh == N, [&] {
    return "q_out " + p.q_out.shape_str() + " must split q's last dim " + std::to_string(N) +
           " into heads of an even, non-zero head dim";
  });
  c.shape("q_out", p.q_out, {B, S, H, Dh}).dtype("q_out", p.q_out, p.q.dtype).contiguous("q_out", p.q_out);
  c.shape("k_out", p.k_out, {B, S, H, Dh}).dtype("k_out", p.k_out, p.q.dtype).contiguous("k_out", p.k_out);
  c.shape("k", p.k, {B, S, N}).dtype("k", p.k, p.q.dtype).rows("k", p.k);
  c.shape("q_weight", p.q_weight, {N}).dtype("q_weight", p.q_weight, DType::Float32).contiguous("q_weight", p.q_weight);
  c.shape("k_weight", p.k_weight, {N}).dtype("k_weight", p.k_weight, DType::Float32).contiguous("k_weight", p.k_weight);
  c.shape("cos", p.cos, {S, Dh / 2}).dtype("cos", p.cos, DType::Float32).rows("cos", p.cos);
  c.shape("sin", p.sin, {S, Dh / 2}).dtype("sin", p.sin, DType::Float32).rows("sin", p.sin);
  c.that(p.eps >= 0.0f, "eps must be >= 0");
  return c;
}

namespace cpu {
void qk_norm_rope(const QKNormRopeParams& p);  // csrc/cpu/qk_norm_rope.cpp
}
namespace cuda {
void qk_norm_rope(const QKNormRopeParams& p, std::uintptr_t stream);  // csrc/cuda/qk_norm_rope.cu
}

}  // namespace flg
