// C++ CPU implementation of qk_norm_rope (math and layout in flg/qk_norm_rope.h).
// Per (b, s) row of q and of k: sum of squares in double, normalised value
// (x * r) * w in fp32 rounded to T, then the pair rotation in fp32. Rows split across
// OpenMP threads.
#include <cmath>

#include "flg/qk_norm_rope.h"

namespace flg {
namespace cpu {
namespace {

template <typename T>
float round_to(float v) {
  T t;
  Scalar<T>::store(&t, v);
  return Scalar<T>::load(&t);
}

template <typename T>
void row(const T* x, const float* w, const float* cs, const float* sn, T* out, int64_t n, int64_t half, float eps) {
  double sq = 0.0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < n; ++j) {
    const double v = Scalar<T>::load(x + j);
    sq += v * v;
  }
  const float r = static_cast<float>(1.0 / std::sqrt(static_cast<float>(sq / static_cast<double>(n)) + eps));
  for (int64_t j = 0; j < n / 2; ++j) {
    const int64_t i = j % half;
    const float x1 = round_to<T>(Scalar<T>::load(x + 2 * j) * r * w[2 * j]);
    const float x2 = round_to<T>(Scalar<T>::load(x + 2 * j + 1) * r * w[2 * j + 1]);
    const float c = cs[i], s = sn[i];
    Scalar<T>::store(out + 2 * j, x1 * c - x2 * s);
    Scalar<T>::store(out + 2 * j + 1, x1 * s + x2 * c);
  }
}

template <typename T>
void run(const QKNormRopeParams& p) {
  const int64_t S = p.seq();
  const int64_t rows = p.batch() * S;
  const int64_t n = p.heads() * p.head_dim(), half = p.head_dim() / 2;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < 2 * rows; ++r) {
    const bool is_k = r >= rows;
    const int64_t rr = is_k ? r - rows : r;
    const int64_t b = rr / S, s = rr % S;
    const float* cs = p.cos.ptr<const float>() + s * p.cos.stride(0);
    const float* sn = p.sin.ptr<const float>() + s * p.sin.stride(0);
    if (is_k)
      row(p.k.ptr<const T>() + b * p.k.stride(0) + s * p.k.stride(1), p.k_weight.ptr<const float>(), cs, sn,
          p.k_out.ptr<T>() + rr * n, n, half, p.eps);
    else
      row(p.q.ptr<const T>() + b * p.q.stride(0) + s * p.q.stride(1), p.q_weight.ptr<const float>(), cs, sn,
          p.q_out.ptr<T>() + rr * n, n, half, p.eps);
  }
}

}  // namespace

void qk_norm_rope(const QKNormRopeParams& p) {
  require(check(p), "qk_norm_rope", "cpu");
  switch (p.q.dtype) {
    case DType::Float32: run<float>(p); break;
    case DType::Float16: run<Half16>(p); break;
    case DType::BFloat16: run<BFloat16>(p); break;
  }
}

}  // namespace cpu
}  // namespace flg
