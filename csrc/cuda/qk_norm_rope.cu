// Launcher of the CUDA qk_norm_rope: checks, dtype dispatch, launch on the caller's
// stream. The kernel lives in flg/qk_norm_rope.cuh.
#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "flg/qk_norm_rope.cuh"

namespace flg {
namespace cuda {

void qk_norm_rope(const QKNormRopeParams& p, std::uintptr_t stream_handle) {
  require(check(p).that(p.batch() * p.seq() <= kMaxRows, "more than 2^31-1 rows"), "qk_norm_rope", "cuda");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const char* stage = "qk_norm_rope launch";
  cudaError_t err = cudaSuccess;
  switch (p.q.dtype) {
    case DType::Float32: err = launch_qk_norm_rope<float>(p, stream, &stage); break;
    case DType::Float16: err = launch_qk_norm_rope<__half>(p, stream, &stage); break;
    case DType::BFloat16: err = launch_qk_norm_rope<__nv_bfloat16>(p, stream, &stage); break;
  }
  FLG_CUDA_CHECK(err, stage);
}

}  // namespace cuda
}  // namespace flg
