// C++ CPU implementation of adaln_modulate (math and layout in flg/adaln_modulate.h).
// Reference-grade: statistics accumulated in double, modulation applied in fp32,
// rows split across OpenMP threads.
#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu/ops.h"
#include "flg/adaln_modulate.h"

namespace flg {
namespace cpu {
namespace {

template <typename T, typename M>
void run(const AdaLNModulateParams& p) {
  const int64_t rows = p.batch * p.seq;
  const T* x_all = static_cast<const T*>(p.x);
  T* out_all = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / p.seq, s = row % p.seq;
    const T* x = x_all + row * p.dim;
    T* out = out_all + row * p.dim;
    const M* scale = static_cast<const M*>(p.scale) + b * p.mod_stride_b + s * p.mod_stride_s;
    const M* shift = static_cast<const M*>(p.shift) + b * p.mod_stride_b + s * p.mod_stride_s;
    double sum = 0.0;
    for (int64_t d = 0; d < p.dim; ++d) sum += Scalar<T>::load(x + d);
    const double mean = sum / static_cast<double>(p.dim);
    double sq = 0.0;
    for (int64_t d = 0; d < p.dim; ++d) {
      const double c = Scalar<T>::load(x + d) - mean;
      sq += c * c;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(p.dim) + p.eps));
    const float meanf = static_cast<float>(mean);
    for (int64_t d = 0; d < p.dim; ++d) {
      const float y = (Scalar<T>::load(x + d) - meanf) * rstd;
      Scalar<T>::store(out + d, y * (1.0f + Scalar<M>::load(scale + d)) + Scalar<M>::load(shift + d));
    }
  }
}

template <typename T>
void run_mod(const AdaLNModulateParams& p) {
  if (p.mod_dtype == 0) run<T, float>(p);
  else run<T, T>(p);
}

}  // namespace

void adaln_modulate(const AdaLNModulateParams& p) {
  const Status st = check(p);
  if (st != Status::Ok) throw std::invalid_argument(describe(p, st, "cpu"));
  switch (static_cast<DType>(p.x_dtype)) {
    case DType::Float32: run_mod<float>(p); break;
    case DType::Float16: run_mod<Half16>(p); break;
    case DType::BFloat16: run_mod<BFloat16>(p); break;
  }
}

}  // namespace cpu
}  // namespace flg
