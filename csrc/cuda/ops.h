// Declarations of the CUDA launchers. Each checks its arguments, dispatches on dtype,
// launches on the caller's stream and throws std::invalid_argument for bad arguments or
// std::runtime_error naming the failed CUDA call.
#pragma once

#include <cstdint>

#include "flg/adaln_modulate.h"
#include "flg/attention.h"
#include "flg/gated_residual_adaln.h"
#include "flg/qk_norm_rope.h"

namespace flg {
namespace cuda {
// Limits of the CUDA kernels beyond the ops' own checks (mirrored in flgengine/ops/native.py).
constexpr int64_t kGatedResidualMaxDim = 32768;  // the x_new row lives in shared memory (128 KiB)
constexpr int64_t kAttentionMaxHeadDim = 256;    // largest head-dim bucket

void adaln_modulate(const AdaLNModulateParams& p, std::uintptr_t stream);
void gated_residual_adaln(const GatedResidualAdaLNParams& p, std::uintptr_t stream);
void qk_norm_rope(const QKNormRopeParams& p, std::uintptr_t stream);
void attention(const AttentionParams& p, std::uintptr_t stream);
int device_count();  // 0 when no driver or device is present
}  // namespace cuda
}  // namespace flg
