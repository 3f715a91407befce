// Launcher-side CUDA helpers: error checks (usable from .cpp and .cu files; the op's name comes
// first from named_op.h). Device helpers (vector loads, reductions, ceil_div) are in
// kernel_utils.cuh, which has no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <c10/util/Exception.h>

// A CUDA runtime call: an error names the call and CUDA's reason, and is cleared (a sticky one
// stays), so that the next launch's check does not report it as its own.
#define KC_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    cudaError_t err_ = (expr);                                                           \
    if (err_ != cudaSuccess) cudaGetLastError();                                         \
    TORCH_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_));       \
  } while (0)

// After a launch: a bad configuration or a sticky error from an earlier kernel.
#define KC_CHECK_LAUNCH(op)                                                           \
  do {                                                                               \
    cudaError_t err_ = cudaGetLastError();                                           \
    TORCH_CHECK(err_ == cudaSuccess, op ": kernel launch failed: ", cudaGetErrorString(err_)); \
  } while (0)
