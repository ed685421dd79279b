// Declarations of the C++ CPU ops. Each throws std::invalid_argument on bad input.
#pragma once

#include "flg/adaln_modulate.h"

namespace flg {
namespace cpu {
void adaln_modulate(const AdaLNModulateParams& p);
}  // namespace cpu
}  // namespace flg
