// Launcher of the CUDA gated_residual_adaln: checks, dtype dispatch, launch on the
// caller's stream. The kernel lives in flg/gated_residual_adaln.cuh.
#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "flg/gated_residual_adaln.cuh"

namespace flg {
namespace cuda {

void gated_residual_adaln(const GatedResidualAdaLNParams& p, std::uintptr_t stream_handle) {
  ArgCheck c = check(p);
  c.that(p.batch() * p.seq() <= kMaxRows, "more than 2^31-1 rows");
  c.that(p.dim() <= kGatedResidualMaxDimCuda, [&] {
    return "D=" + std::to_string(p.dim()) + " exceeds " + std::to_string(kGatedResidualMaxDimCuda) +
           " (the row is kept in shared memory)";
  });
  require(c, "gated_residual_adaln", "cuda");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const char* stage = "gated_residual_adaln launch";
  cudaError_t err = cudaSuccess;
  const bool mod32 = p.gate.dtype == DType::Float32;
  switch (p.x.dtype) {
    case DType::Float32: err = launch_gated_residual_adaln<float, float>(p, stream, &stage); break;
    case DType::Float16:
      err = mod32 ? launch_gated_residual_adaln<__half, float>(p, stream, &stage)
                  : launch_gated_residual_adaln<__half, __half>(p, stream, &stage);
      break;
    case DType::BFloat16:
      err = mod32 ? launch_gated_residual_adaln<__nv_bfloat16, float>(p, stream, &stage)
                  : launch_gated_residual_adaln<__nv_bfloat16, __nv_bfloat16>(p, stream, &stage);
      break;
  }
  FLG_CUDA_CHECK(err, stage);
}

}  // namespace cuda
}  // namespace flg
