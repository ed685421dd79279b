// Launcher of the CUDA adaln_modulate: checks, dtype dispatch, launch on the caller's
// stream. The kernel lives in flg/adaln_modulate.cuh.
#include <stdexcept>

#include "cuda/check.h"
#include "flg/adaln_modulate.cuh"

namespace flg {
namespace cuda {

void adaln_modulate(const AdaLNModulateParams& p, std::uintptr_t stream_handle) {
  require(check(p).that(p.batch() * p.seq() <= kMaxRows, "more than 2^31-1 rows"), "adaln_modulate", "cuda");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t err = cudaSuccess;
  const bool mod32 = p.scale.dtype == DType::Float32;
  switch (p.x.dtype) {
    case DType::Float32: err = launch_adaln_modulate<float, float>(p, stream); break;
    case DType::Float16:
      err = mod32 ? launch_adaln_modulate<__half, float>(p, stream) : launch_adaln_modulate<__half, __half>(p, stream);
      break;
    case DType::BFloat16:
      err = mod32 ? launch_adaln_modulate<__nv_bfloat16, float>(p, stream)
                  : launch_adaln_modulate<__nv_bfloat16, __nv_bfloat16>(p, stream);
      break;
  }
  FLG_CUDA_CHECK(err, "adaln_modulate kernel launch");
}

}  // namespace cuda
}  // namespace flg
