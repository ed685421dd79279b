// Launcher of the CUDA attention: checks, dtype dispatch (float16 / bfloat16: tensor-core
// kernel; float32: CUDA-core kernel), head-dim bucket, launch on the caller's stream. The
// kernels live in flg/attention.cuh.
#include <stdexcept>
#include <string>

#include "cuda/check.h"
#include "flg/attention.cuh"

namespace flg {
namespace cuda {

void attention(const AttentionParams& p, std::uintptr_t stream_handle) {
  ArgCheck c = check(p);
  c.that(p.head_dim() % 8 == 0 && p.head_dim() <= kAttentionMaxHeadDimCuda, [&] {
    return "head_dim=" + std::to_string(p.head_dim()) + " must be a multiple of 8 and at most " +
           std::to_string(kAttentionMaxHeadDimCuda);
  });
  c.that(p.heads() <= 65535 && p.batch() <= 65535, "heads and batch must each be at most 65535 (grid y / z)");
  c.that((p.seq_q() + 63) / 64 <= 0x7fffffffLL, "seq_q too long for the grid");
  require(c, "attention", "cuda");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const char* stage = "attention launch";
  cudaError_t err = cudaSuccess;
  switch (p.q.dtype) {
    case DType::Float32: err = launch_attention<float>(p, stream, &stage); break;
    case DType::Float16: err = launch_attention<__half>(p, stream, &stage); break;
    case DType::BFloat16: err = launch_attention<__nv_bfloat16>(p, stream, &stage); break;
  }
  FLG_CUDA_CHECK(err, stage);
}

}  // namespace cuda
}  // namespace flg
