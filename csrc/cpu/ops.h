// Declarations of the C++ CPU ops. Each throws std::invalid_argument on bad input.
#pragma once

#include "flg/adaln_modulate.h"
#include "flg/attention.h"
#include "flg/gated_residual_adaln.h"
#include "flg/qk_norm_rope.h"

namespace flg {
namespace cpu {
void adaln_modulate(const AdaLNModulateParams& p);
void gated_residual_adaln(const GatedResidualAdaLNParams& p);
void qk_norm_rope(const QKNormRopeParams& p);
void attention(const AttentionParams& p);
}  // namespace cpu
}  // namespace flg
