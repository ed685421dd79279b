// What the CUDA runtime sees of this machine (build_info).
#pragma once

namespace flg {
namespace cuda {
int device_count();  // 0 when no driver or device is present (csrc/cuda/device.cu)
}  // namespace cuda
}  // namespace flg
