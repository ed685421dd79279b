// Declarations of the CUDA launchers. Each checks its arguments, dispatches on dtype,
// launches on the caller's stream and throws std::runtime_error naming the failed call.
#pragma once

#include <cstdint>

#include "flg/adaln_modulate.h"

namespace flg {
namespace cuda {
void adaln_modulate(const AdaLNModulateParams& p, std::uintptr_t stream);
int device_count();  // 0 when no driver or device is present
}  // namespace cuda
}  // namespace flg
