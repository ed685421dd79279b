// adaln_modulate: LayerNorm without affine, then x * (1 + scale) + shift.
//
//   out[b, s, :] = (x[b, s, :] - mean) * rsqrt(var + eps) * (1 + scale[b, s, :]) + shift[b, s, :]
//
// x and out are contiguous (B, S, D). scale and shift are (B, S, D) views read through their
// own (b, s) strides, so a per-sample modulation (stride 0 over S) or a chunk view of the
// (B, 6, D) timestep modulation is used in place, never copied. Their last dim is contiguous.
// Statistics and the modulation are computed in fp32 whatever the storage dtype.
// Memory traffic: x read once (twice from cache), out written once, scale/shift read
// once per row: ~2 * B*S*D * sizeof(T) bytes from DRAM.
#pragma once

#include <cstdint>

#include "flg/tensor.h"

namespace flg {

// The op's arguments, declared once: the binding fills them by name, the kernels read them.
struct AdaLNModulateParams {
  Tensor out;    // (B, S, D) contiguous, dtype T (x's)
  Tensor x;      // (B, S, D) contiguous, dtype T: float32, float16 or bfloat16
  Tensor scale;  // (B, S, D), last dim contiguous, any (b, s) strides; dtype M: float32 or T
  Tensor shift;  // like scale, dtype M
  float eps;

  template <typename F>
  void fields(F&& f) {
    f("out", out); f("x", x); f("scale", scale); f("shift", shift); f("eps", eps);
  }
  FLG_HD int64_t batch() const { return x.sizes[0]; }
  FLG_HD int64_t seq() const { return x.sizes[1]; }
  FLG_HD int64_t dim() const { return x.sizes[2]; }
};

inline ArgCheck check(const AdaLNModulateParams& p) {
  ArgCheck c;
  c.ndim("x", p.x, 3).float_dtype("x", p.x).contiguous("x", p.x);
  if (!c.ok()) return c;
  const int64_t B = p.batch(), S = p.seq(), D = p.dim();
  c.that(D > 0, "x has D = 0");
  c.shape("out", p.out, {B, S, D}).dtype("out", p.out, p.x.dtype).contiguous("out", p.out);
  c.shape("scale", p.scale, {B, S, D}).rows("scale", p.scale).mod_dtype("scale", p.scale, p.x.dtype);
  c.shape("shift", p.shift, {B, S, D}).rows("shift", p.shift).mod_dtype("shift", p.shift, p.x.dtype);
  c.that(p.scale.dtype == p.shift.dtype, "scale and shift must share one dtype");
  c.that(p.eps >= 0.0f, "eps must be >= 0");
  return c;
}

namespace cpu {
void adaln_modulate(const AdaLNModulateParams& p);  // csrc/cpu/adaln_modulate.cpp
}
namespace cuda {
void adaln_modulate(const AdaLNModulateParams& p, std::uintptr_t stream);  // csrc/cuda/adaln_modulate.cu
}

}  // namespace flg
