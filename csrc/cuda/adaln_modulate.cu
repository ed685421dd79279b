// Launcher of the CUDA adaln_modulate: checks, dtype dispatch, launch on the caller's
// stream. The kernel lives in flg/adaln_modulate.cuh.
#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "cuda/ops.h"
#include "flg/adaln_modulate.cuh"

namespace flg {
namespace cuda {

void adaln_modulate(const AdaLNModulateParams& p, std::uintptr_t stream_handle) {
  const Status st = check(p);
  if (st != Status::Ok) throw std::invalid_argument(describe(p, st, "cuda"));
  if (p.batch * p.seq > 0x7fffffffLL) throw std::invalid_argument("adaln_modulate (cuda): more than 2^31-1 rows");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t err = cudaSuccess;
  const bool mod32 = p.mod_dtype == 0;
  switch (static_cast<DType>(p.x_dtype)) {
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

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace flg
