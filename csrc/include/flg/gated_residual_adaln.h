// gated_residual_adaln: the gated residual add fused with the next adaLN.
//
//   x_new[b, s, :] = round_T(x[b, s, :] + y[b, s, :] * gate[b, s, :])        (fp32 math)
//   h[b, s, :]     = (x_new - mean) * rsqrt(var + eps) * (1 + scale[b, s, :]) + shift[b, s, :]
//
// with mean / biased variance over the row of the *rounded* x_new (what the unfused
// model normalises), statistics in fp32, h rounded to x's dtype T.
//
// x and y are (B, S, D) read through row strides (last dim contiguous); x_out and h_out
// are contiguous (B, S, D). gate, scale and shift each have their own (b, s) strides, so a
// per-sample modulation (stride_s = 0), a (D,) vector expanded over B (stride_b = 0) or a
// chunk view of the (B, [S,] 6, D) timestep modulation is used in place. They share one
// dtype M: float32 or T. Memory traffic: x, y read once, x_out, h_out written once.
#pragma once

#include <cstdint>
#include <string>

#include "flg/common.h"

namespace flg {

struct GatedResidualAdaLNParams {
  void* x_out;            // (B, S, D) contiguous, dtype T
  void* h_out;            // (B, S, D) contiguous, dtype T
  const void* x;          // element (b, s, d) at x[b * x_stride_b + s * x_stride_s + d]
  const void* y;          // same layout rule with y's strides, dtype T
  const void* gate;       // element (b, s, d) at gate[b * gate_stride_b + s * gate_stride_s + d]
  const void* scale;      // likewise with scale's strides
  const void* shift;      // likewise with shift's strides
  int64_t batch;          // B
  int64_t seq;            // S
  int64_t dim;            // D
  int64_t x_stride_b, x_stride_s;            // elements
  int64_t y_stride_b, y_stride_s;
  int64_t gate_stride_b, gate_stride_s;      // 0 = broadcast over that axis
  int64_t scale_stride_b, scale_stride_s;
  int64_t shift_stride_b, shift_stride_s;
  float eps;
  int x_dtype;            // DType code of x, y, x_out, h_out
  int mod_dtype;          // DType code of gate, scale, shift (float32 or x_dtype)
};

inline Status check(const GatedResidualAdaLNParams& p) {
  if (!p.x_out || !p.h_out || !p.x || !p.y || !p.gate || !p.scale || !p.shift) return Status::InvalidArgument;
  if (p.batch < 0 || p.seq < 0 || p.dim <= 0) return Status::InvalidArgument;
  const int64_t strides[] = {p.x_stride_b,    p.x_stride_s,     p.y_stride_b,     p.y_stride_s,
                             p.gate_stride_b, p.gate_stride_s,  p.scale_stride_b, p.scale_stride_s,
                             p.shift_stride_b, p.shift_stride_s};
  for (int64_t s : strides)
    if (s < 0) return Status::InvalidArgument;
  if (p.x_dtype < 0 || p.x_dtype > 2) return Status::UnsupportedDType;
  if (p.mod_dtype != 0 && p.mod_dtype != p.x_dtype) return Status::UnsupportedDType;
  if (!(p.eps >= 0.0f)) return Status::InvalidArgument;
  return Status::Ok;
}

inline std::string describe(const GatedResidualAdaLNParams& p, Status st, const char* where) {
  if (st == Status::UnsupportedDType)
    return std::string("gated_residual_adaln (") + where + "): unsupported dtypes x=" + dtype_name(p.x_dtype) +
           " gate/scale/shift=" + dtype_name(p.mod_dtype) + "; gate/scale/shift must be float32 or x's dtype";
  return std::string("gated_residual_adaln (") + where +
         "): invalid arguments (null pointer, negative size or stride, zero dim or negative eps)";
}

}  // namespace flg
