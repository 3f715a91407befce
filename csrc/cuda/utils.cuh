// Shared CUDA helpers: error checks that name the op, ceil_div. No torch headers here beyond c10's
// exception macro, so kernels stay plain CUDA.
#pragma once

#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#define KC_CUDA_CHECK(op, expr)                                                      \
  do {                                                                               \
    cudaError_t err_ = (expr);                                                       \
    TORCH_CHECK(err_ == cudaSuccess, op ": " #expr " failed: ", cudaGetErrorString(err_)); \
  } while (0)

// After a launch: a bad configuration or a sticky error from an earlier kernel.
#define KC_CHECK_LAUNCH(op)                                                           \
  do {                                                                               \
    cudaError_t err_ = cudaGetLastError();                                           \
    TORCH_CHECK(err_ == cudaSuccess, op ": kernel launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace kcache_ops {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace kcache_ops
