// sum_partials_kernel's launch on plain numbers (no torch, no CUDA runtime), for the launchers of
// the ops that use it and the CPU harness of the kernels.
#pragma once

#include <cstdint>

#include "launch_grid.h"
#include "sum_partials_kernel.cuh"

namespace kcache_ops {

// The launch of sum_partials_kernel.
struct SumPartialsPlan {
  GridSize grid;  // (ceil(rows · d / kSumPartialsThreads))
  int block;      // kSumPartialsThreads
  SumPartialsParams params;
};

// out [rows, d] = the sum over parts of partials [rows, parts, d] float32 (rows · d > 0).
inline SumPartialsPlan plan_sum_partials(const float* partials, void* out, int64_t rows,
                                         int parts, int d) {
  return {
      .grid = {.x = ceil_div<int64_t>(rows * d, kSumPartialsThreads)},
      .block = kSumPartialsThreads,
      .params = {.partials = partials, .out = out, .total = rows * d, .parts = parts, .d = d},
  };
}

}  // namespace kcache_ops
