// Shared vocabulary of the flgengine kernels: dtype codes and scalar conversions. No
// torch, no Python (tensor arguments are flg::Tensor views, flg/tensor.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace flg {

// dtype codes shared with flgengine/ops/native.py (keep in sync).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float16";
    case 2: return "bfloat16";
    default: return "unknown";
  }
}

// ---- host-side scalar conversions (CPU ops) -------------------------------------
// IEEE half <-> float and bfloat16 <-> float with round-to-nearest-even, so the C++
// CPU ops read and write the same bits torch does.
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u); // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in half
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);
    // value = q * 2^-24 with q = mant * 2^(exp - 126); round to nearest even
    uint32_t exp = absu >> 23;
    uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;  // >= 14 here
    uint32_t q = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t rounding = 0xfffu + ((absu >> 13) & 1u);
  uint32_t v = absu + rounding - (112u << 23);
  return static_cast<uint16_t>(sign | (v >> 13));
}

template <typename T> struct Scalar;
template <> struct Scalar<float> {
  using storage = float;
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
struct Half16 { uint16_t bits; };
struct BFloat16 { uint16_t bits; };
template <> struct Scalar<Half16> {
  static float load(const Half16* p) { return half_to_float(p->bits); }
  static void store(Half16* p, float v) { p->bits = float_to_half(v); }
};
template <> struct Scalar<BFloat16> {
  static float load(const BFloat16* p) { return bf16_to_float(p->bits); }
  static void store(BFloat16* p, float v) { p->bits = float_to_bf16(v); }
};

}  // namespace flg
