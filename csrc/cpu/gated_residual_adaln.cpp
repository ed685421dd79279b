// C++ CPU implementation of gated_residual_adaln (math and layout in
// flg/gated_residual_adaln.h). Per row: x_new = round_T(x + y * gate) written out and kept
// in an fp32 row buffer, statistics of the rounded row in double, h in fp32. Rows split
// across OpenMP threads.
#include <cmath>
#include <vector>

#include "flg/gated_residual_adaln.h"

namespace flg {
namespace cpu {
namespace {

template <typename T, typename M>
void run(const GatedResidualAdaLNParams& p) {
  const int64_t S = p.seq(), D = p.dim();
  const int64_t rows = p.batch() * S;
#pragma omp parallel
  {
    std::vector<float> xs(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t b = row / S, s = row % S;
      const T* x = p.x.ptr<const T>() + b * p.x.stride(0) + s * p.x.stride(1);
      const T* y = p.y.ptr<const T>() + b * p.y.stride(0) + s * p.y.stride(1);
      const M* gate = p.gate.ptr<const M>() + b * p.gate.stride(0) + s * p.gate.stride(1);
      const M* scale = p.scale.ptr<const M>() + b * p.scale.stride(0) + s * p.scale.stride(1);
      const M* shift = p.shift.ptr<const M>() + b * p.shift.stride(0) + s * p.shift.stride(1);
      T* x_out = p.x_out.ptr<T>() + row * D;
      T* h_out = p.h_out.ptr<T>() + row * D;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) {
        const float prod = Scalar<T>::load(y + d) * Scalar<M>::load(gate + d);
        Scalar<T>::store(x_out + d, Scalar<T>::load(x + d) + prod);
        xs[d] = Scalar<T>::load(x_out + d);  // the rounded value: the statistics see what was stored
        sum += xs[d];
      }
      const double mean = sum / static_cast<double>(D);
      double sq = 0.0;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < D; ++d) {
        const double c = xs[d] - mean;
        sq += c * c;
      }
      const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(D) + p.eps));
      const float meanf = static_cast<float>(mean);
      for (int64_t d = 0; d < D; ++d) {
        const float n = (xs[d] - meanf) * rstd;
        Scalar<T>::store(h_out + d, n * (1.0f + Scalar<M>::load(scale + d)) + Scalar<M>::load(shift + d));
      }
    }
  }
}

template <typename T>
void run_mod(const GatedResidualAdaLNParams& p) {
  if (p.gate.dtype == DType::Float32) run<T, float>(p);
  else run<T, T>(p);
}

}  // namespace

void gated_residual_adaln(const GatedResidualAdaLNParams& p) {
  require(check(p), "gated_residual_adaln", "cpu");
  switch (p.x.dtype) {
    case DType::Float32: run_mod<float>(p); break;
    case DType::Float16: run_mod<Half16>(p); break;
    case DType::BFloat16: run_mod<BFloat16>(p); break;
  }
}

}  // namespace cpu
}  // namespace flg
