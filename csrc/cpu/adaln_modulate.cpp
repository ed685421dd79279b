// C++ CPU implementation of adaln_modulate (math and layout in flg/adaln_modulate.h).
// Reference-grade: statistics accumulated in double, modulation applied in fp32,
// rows split across OpenMP threads.
#include <cmath>

#include "flg/adaln_modulate.h"

namespace flg {
namespace cpu {
namespace {

template <typename T, typename M>
void run(const AdaLNModulateParams& p) {
  const int64_t S = p.seq(), D = p.dim();
  const int64_t rows = p.batch() * S;
  const T* x_all = p.x.ptr<const T>();
  T* out_all = p.out.ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / S, s = row % S;
    const T* x = x_all + row * D;
    T* out = out_all + row * D;
    const M* scale = p.scale.ptr<const M>() + b * p.scale.stride(0) + s * p.scale.stride(1);
    const M* shift = p.shift.ptr<const M>() + b * p.shift.stride(0) + s * p.shift.stride(1);
    double sum = 0.0;
    for (int64_t d = 0; d < D; ++d) sum += Scalar<T>::load(x + d);
    const double mean = sum / static_cast<double>(D);
    double sq = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double c = Scalar<T>::load(x + d) - mean;
      sq += c * c;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(D) + p.eps));
    const float meanf = static_cast<float>(mean);
    for (int64_t d = 0; d < D; ++d) {
      const float y = (Scalar<T>::load(x + d) - meanf) * rstd;
      Scalar<T>::store(out + d, y * (1.0f + Scalar<M>::load(scale + d)) + Scalar<M>::load(shift + d));
    }
  }
}

template <typename T>
void run_mod(const AdaLNModulateParams& p) {
  if (p.scale.dtype == DType::Float32) run<T, float>(p);
  else run<T, T>(p);
}

}  // namespace

void adaln_modulate(const AdaLNModulateParams& p) {
  require(check(p), "adaln_modulate", "cpu");
  switch (p.x.dtype) {
    case DType::Float32: run_mod<float>(p); break;
    case DType::Float16: run_mod<Half16>(p); break;
    case DType::BFloat16: run_mod<BFloat16>(p); break;
  }
}

}  // namespace cpu
}  // namespace flg
