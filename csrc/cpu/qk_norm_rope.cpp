// C++ CPU implementation of qk_norm_rope (math and layout in flg/qk_norm_rope.h).
// Per (b, s) row of q and of k: sum of squares in double, normalised value
// (x * r) * w in fp32 rounded to T, then the pair rotation in fp32. Rows split across
// OpenMP threads.
#include <cmath>
#include <stdexcept>

#include "cpu/ops.h"
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
  const int64_t rows = p.batch * p.seq;
  const int64_t n = p.heads * p.head_dim, half = p.head_dim / 2;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < 2 * rows; ++r) {
    const bool is_k = r >= rows;
    const int64_t rr = is_k ? r - rows : r;
    const int64_t b = rr / p.seq, s = rr % p.seq;
    const float* cs = p.cos + s * p.cos_stride_s;
    const float* sn = p.sin + s * p.sin_stride_s;
    if (is_k)
      row(static_cast<const T*>(p.k) + b * p.k_stride_b + s * p.k_stride_s, p.k_weight, cs, sn,
          static_cast<T*>(p.k_out) + rr * n, n, half, p.eps);
    else
      row(static_cast<const T*>(p.q) + b * p.q_stride_b + s * p.q_stride_s, p.q_weight, cs, sn,
          static_cast<T*>(p.q_out) + rr * n, n, half, p.eps);
  }
}

}  // namespace

void qk_norm_rope(const QKNormRopeParams& p) {
  const Status st = check(p);
  if (st != Status::Ok) throw std::invalid_argument(describe(p, st, "cpu"));
  switch (static_cast<DType>(p.dtype)) {
    case DType::Float32: run<float>(p); break;
    case DType::Float16: run<Half16>(p); break;
    case DType::BFloat16: run<BFloat16>(p); break;
  }
}

}  // namespace cpu
}  // namespace flg
