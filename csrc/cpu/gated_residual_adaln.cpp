// C++ CPU implementation of gated_residual_adaln (math and layout in
// flg/gated_residual_adaln.h). Per row: x_new = round_T(x + y * gate) written out and kept
// in an fp32 row buffer, statistics of the rounded row in double, h in fp32. Rows split
// across OpenMP threads.
#include <cmath>
#include <stdexcept>
#include <vector>

#include "cpu/ops.h"
#include "flg/gated_residual_adaln.h"

namespace flg {
namespace cpu {
namespace {

template <typename T, typename M>
void run(const GatedResidualAdaLNParams& p) {
  const int64_t rows = p.batch * p.seq;
  const int64_t D = p.dim;
#pragma omp parallel
  {
    std::vector<float> xs(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t b = row / p.seq, s = row % p.seq;
      const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + s * p.x_stride_s;
      const T* y = static_cast<const T*>(p.y) + b * p.y_stride_b + s * p.y_stride_s;
      const M* gate = static_cast<const M*>(p.gate) + b * p.gate_stride_b + s * p.gate_stride_s;
      const M* scale = static_cast<const M*>(p.scale) + b * p.scale_stride_b + s * p.scale_stride_s;
      const M* shift = static_cast<const M*>(p.shift) + b * p.shift_stride_b + s * p.shift_stride_s;
      T* x_out = static_cast<T*>(p.x_out) + row * D;
      T* h_out = static_cast<T*>(p.h_out) + row * D;
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
  if (p.mod_dtype == 0) run<T, float>(p);
  else run<T, T>(p);
}

}  // namespace

void gated_residual_adaln(const GatedResidualAdaLNParams& p) {
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
