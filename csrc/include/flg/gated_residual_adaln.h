// gated_residual_adaln: the gated residual add fused with the next adaLN.
//
//   x_new[b, s, :] = round_T(x[b, s, :] + y[b, s, :] * gate[b, s, :])        (fp32 math)
//   h[b, s, :]     = (x_new - mean) * rsqrt(var + eps) * (1 + scale[b, s, :]) + shift[b, s, :]
//
// with mean / biased variance over the row of the *rounded* x_new (what the unfused
// model normalises), statistics in fp32, h rounded to x's dtype T.
//
// x and y are (B, S, D) read through (b, s) strides (last dim contiguous); x_out and h_out
// are contiguous (B, S, D). gate, scale and shift are (B, S, D) views, each with its own
// (b, s) strides, so a per-sample modulation (stride 0 over S), a (D,) vector expanded over
// B (stride 0 over B) or a chunk view of the (B, [S,] 6, D) timestep modulation is used in
// place. They share one dtype M: float32 or T. Memory traffic: x, y read once, x_out, h_out
// written once.
#pragma once

#include <cstdint>

#include "flg/tensor.h"

namespace flg {

// The op's arguments, declared once: the binding fills them by name, the kernels read them.
struct GatedResidualAdaLNParams {
  Tensor x_out;  // (B, S, D) contiguous, dtype T (x's)
  Tensor h_out;  // (B, S, D) contiguous, dtype T
  Tensor x;      // (B, S, D), last dim contiguous, dtype T: float32, float16 or bfloat16
  Tensor y;      // (B, S, D), last dim contiguous, dtype T
  Tensor gate;   // (B, S, D), last dim contiguous, any (b, s) strides; dtype M: float32 or T
  Tensor scale;  // likewise, dtype M
  Tensor shift;  // likewise, dtype M
  float eps;

  template <typename F>
  void fields(F&& f) {
    f("x_out", x_out); f("h_out", h_out); f("x", x); f("y", y);
    f("gate", gate); f("scale", scale); f("shift", shift); f("eps", eps);
  }
  FLG_HD int64_t batch() const { return x.sizes[0]; }
  FLG_HD int64_t seq() const { return x.sizes[1]; }
  FLG_HD int64_t dim() const { return x.sizes[2]; }
};

// Limit of the CUDA kernel: it keeps the x_new row in shared memory (128 KiB); mirrored in
// flgengine/ops/native.py.
constexpr int64_t kGatedResidualMaxDimCuda = 32768;

inline ArgCheck check(const GatedResidualAdaLNParams& p) {
  ArgCheck c;
  c.ndim("x", p.x, 3).float_dtype("x", p.x).rows("x", p.x);
  if (!c.ok()) return c;
  const int64_t B = p.batch(), S = p.seq(), D = p.dim();
  c.that(D > 0, "x has D = 0");
  c.shape("y", p.y, {B, S, D}).dtype("y", p.y, p.x.dtype).rows("y", p.y);
  c.shape("gate", p.gate, {B, S, D}).rows("gate", p.gate).mod_dtype("gate", p.gate, p.x.dtype);
  c.shape("scale", p.scale, {B, S, D}).rows("scale", p.scale).mod_dtype("scale", p.scale, p.x.dtype);
  c.shape("shift", p.shift, {B, S, D}).rows("shift", p.shift).mod_dtype("shift", p.shift, p.x.dtype);
  c.that(p.gate.dtype == p.scale.dtype && p.gate.dtype == p.shift.dtype, "gate, scale and shift must share one dtype");
  c.shape("x_out", p.x_out, {B, S, D}).dtype("x_out", p.x_out, p.x.dtype).contiguous("x_out", p.x_out);
  c.shape("h_out", p.h_out, {B, S, D}).dtype("h_out", p.h_out, p.x.dtype).contiguous("h_out", p.h_out);
  c.that(p.eps >= 0.0f, "eps must be >= 0");
  return c;
}

namespace cpu {
void gated_residual_adaln(const GatedResidualAdaLNParams& p);  // csrc/cpu/gated_residual_adaln.cpp
}
namespace cuda {
void gated_residual_adaln(const GatedResidualAdaLNParams& p, std::uintptr_t stream);  // csrc/cuda/...cu
}

}  // namespace flg
