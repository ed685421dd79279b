// flg::Tensor: how an op's tensor arguments cross into C++ and reach the kernels. A view
// (data pointer, dtype, device, sizes, element strides), no ownership, no torch. Each op
// declares its arguments once, as a struct of named Tensors and scalars with a `fields`
// visitor (see flg/adaln_modulate.h); bindings.cpp fills that struct from Python keyword
// arguments, converting and checking each view once, and the struct is then what the CPU
// code and the CUDA kernels read. `ArgCheck` states an op's shape / dtype / layout
// requirements and names the first one an argument breaks.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "flg/common.h"

#if defined(__CUDACC__)
#define FLG_HD __host__ __device__ __forceinline__
#else
#define FLG_HD inline
#endif

namespace flg {

// device codes shared with flgengine/ops/native.py (keep in sync)
enum class Device : int { CPU = 0, CUDA = 1 };

constexpr int kMaxDims = 6;

// A plain aggregate (trivially copyable): it travels by value into CUDA kernels.
struct Tensor {
  void* data;                  // element (i0, i1, ...) at data[i0 * strides[0] + i1 * strides[1] + ...]
  DType dtype;
  Device device;
  int ndim;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];   // in elements, >= 0

  FLG_HD int64_t size(int d) const { return sizes[d]; }
  FLG_HD int64_t stride(int d) const { return strides[d]; }
  template <typename T>
  FLG_HD T* ptr() const {
    return static_cast<T*>(data);
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
  }
  // Row-major contiguous (dims of size 1 may have any stride).
  bool contiguous() const {
    int64_t expect = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (sizes[d] != 1 && strides[d] != expect) return false;
      expect *= sizes[d];
    }
    return true;
  }
  // The last dim is contiguous (stride 1 or size 1): rows are read with unit stride.
  bool rows_contiguous() const { return ndim == 0 || sizes[ndim - 1] == 1 || strides[ndim - 1] == 1; }
  std::string shape_str() const {
    std::string s = "(";
    for (int d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(sizes[d]);
    return s + (ndim == 1 ? ",)" : ")");
  }
};

// A view over `data` (host code: tests, the emulator); strides in elements.
inline Tensor make_tensor(void* data, DType dtype, std::initializer_list<int64_t> sizes,
                          std::initializer_list<int64_t> strides, Device device = Device::CPU) {
  Tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(sizes.size());
  int d = 0;
  for (int64_t s : sizes) t.sizes[d++] = s;
  d = 0;
  for (int64_t s : strides) t.strides[d++] = s;
  return t;
}

// A contiguous view over `data`.
inline Tensor make_tensor(void* data, DType dtype, std::initializer_list<int64_t> sizes,
                          Device device = Device::CPU) {
  Tensor t = make_tensor(data, dtype, sizes, {}, device);
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[d] = stride;
    stride *= t.sizes[d];
  }
  return t;
}

// The requirements an op puts on its arguments, checked in order; the first one broken is
// kept as the message (later checks do nothing). Messages are built only on failure.
class ArgCheck {
 public:
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }

  ArgCheck& that(bool cond, const char* what) {
    if (ok() && !cond) error_ = what;
    return *this;
  }
  template <typename Message>
  ArgCheck& that(bool cond, Message&& message) {  // message(): std::string, called on failure
    if (ok() && !cond) error_ = message();
    return *this;
  }
  ArgCheck& shape(const char* name, const Tensor& t, std::initializer_list<int64_t> want) {
    if (!ok()) return *this;
    bool same = t.ndim == static_cast<int>(want.size());
    int d = 0;
    for (int64_t s : want) same = same && t.sizes[d++] == s;
    if (!same) {
      Tensor w{};
      w.ndim = static_cast<int>(want.size());
      d = 0;
      for (int64_t s : want) w.sizes[d++] = s;
      error_ = std::string(name) + " must have shape " + w.shape_str() + ", got " + t.shape_str();
    }
    return *this;
  }
  ArgCheck& ndim(const char* name, const Tensor& t, int n) {
    return that(t.ndim == n, [&] {
      return std::string(name) + " must have " + std::to_string(n) + " dims, got shape " + t.shape_str();
    });
  }
  ArgCheck& dtype(const char* name, const Tensor& t, DType want) {
    return that(t.dtype == want, [&] {
      return std::string(name) + " must be " + dtype_name(static_cast<int>(want)) + ", got " +
             dtype_name(static_cast<int>(t.dtype));
    });
  }
  // float32, float16 or bfloat16
  ArgCheck& float_dtype(const char* name, const Tensor& t) {
    const int c = static_cast<int>(t.dtype);
    return that(c >= 0 && c <= 2, [&] {
      return std::string(name) + " has unsupported dtype " + dtype_name(c) + " (float32, float16, bfloat16)";
    });
  }
  // a modulation's dtype: float32 or the activations' dtype `x`
  ArgCheck& mod_dtype(const char* name, const Tensor& t, DType x) {
    return that(t.dtype == DType::Float32 || t.dtype == x, [&] {
      return std::string(name) + " dtype " + dtype_name(static_cast<int>(t.dtype)) + " must be float32 or x's dtype " +
             dtype_name(static_cast<int>(x));
    });
  }
  ArgCheck& rows(const char* name, const Tensor& t) {
    return that(t.rows_contiguous(), [&] { return std::string(name) + " must have a contiguous last dim"; });
  }
  ArgCheck& contiguous(const char* name, const Tensor& t) {
    return that(t.contiguous(), [&] { return std::string(name) + " must be contiguous"; });
  }

 private:
  std::string error_;
};

// Throws std::invalid_argument("<op> (<backend>): <first broken requirement>") unless `c` passed.
inline void require(const ArgCheck& c, const char* op, const char* backend) {
  if (!c.ok()) throw std::invalid_argument(std::string(op) + " (" + backend + "): " + c.error());
}

}  // namespace flg
