// Named check macro for CUDA calls: the exception says which call failed and why.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define FLG_CUDA_CHECK(expr, what)                                                              \
  do {                                                                                          \
    cudaError_t flg_err_ = (expr);                                                              \
    if (flg_err_ != cudaSuccess) {                                                              \
      throw std::runtime_error(std::string("flgengine CUDA error in ") + (what) + ": " +        \
                               cudaGetErrorName(flg_err_) + " (" + cudaGetErrorString(flg_err_) + \
                               ")");                                                            \
    }                                                                                           \
  } while (0)
