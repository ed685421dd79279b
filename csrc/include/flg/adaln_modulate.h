// adaln_modulate: LayerNorm without affine, then x * (1 + scale) + shift.
//
//   out[b, s, :] = (x[b, s, :] - mean) * rsqrt(var + eps) * (1 + scale[b, s, :]) + shift[b, s, :]
//
// x and out are contiguous (B, S, D). scale and shift are read through strides so a
// per-sample modulation (stride_s = 0) or a chunk view of the (B, 6, D) timestep
// modulation is used in place, never copied. Their last dim is contiguous.
// Statistics and the modulation are computed in fp32 whatever the storage dtype.
// Memory traffic: x read once (twice from cache), out written once, scale/shift read
// once per row: ~2 * B*S*D * sizeof(T) bytes from DRAM.
#pragma once

#include <cstdint>
#include <string>

#include "flg/common.h"

namespace flg {

struct AdaLNModulateParams {
  void* out;              // (B, S, D), dtype = x_dtype
  const void* x;          // (B, S, D), contiguous
  const void* scale;      // element (b, s, d) at scale[b * mod_stride_b + s * mod_stride_s + d]
  const void* shift;      // same strides as scale
  int64_t batch;          // B
  int64_t seq;            // S
  int64_t dim;            // D
  int64_t mod_stride_b;   // elements
  int64_t mod_stride_s;   // elements (0 = one modulation per sample)
  float eps;
  int x_dtype;            // DType code of x / out
  int mod_dtype;          // DType code of scale / shift (float32 or x_dtype)
};

inline Status check(const AdaLNModulateParams& p) {
  if (!p.out || !p.x || !p.scale || !p.shift) return Status::InvalidArgument;
  if (p.batch < 0 || p.seq < 0 || p.dim <= 0 || p.mod_stride_b < 0 || p.mod_stride_s < 0) return Status::InvalidArgument;
  if (p.x_dtype < 0 || p.x_dtype > 2) return Status::UnsupportedDType;
  if (p.mod_dtype != 0 && p.mod_dtype != p.x_dtype) return Status::UnsupportedDType;
  if (!(p.eps >= 0.0f)) return Status::InvalidArgument;
  return Status::Ok;
}

// The error a launcher throws for a failed check; `where` names the backend.
inline std::string describe(const AdaLNModulateParams& p, Status st, const char* where) {
  if (st == Status::UnsupportedDType)
    return std::string("adaln_modulate (") + where + "): unsupported dtypes x=" + dtype_name(p.x_dtype) +
           " scale/shift=" + dtype_name(p.mod_dtype) + "; scale/shift must be float32 or x's dtype";
  return std::string("adaln_modulate (") + where + "): invalid arguments (null pointer, negative size or eps)";
}

}  // namespace flg
