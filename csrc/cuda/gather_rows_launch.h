// gather_rows's launch arithmetic on plain numbers: the grid and the kernel's parameters. No torch
// and no CUDA runtime calls, so the launcher (gather_rows.cu) and the CPU harness of the kernels
// share it.
#pragma once

#include <cstdint>

#include "gather_rows_kernel.cuh"
#include "launch_grid.h"

namespace kcache_ops {

// One gather_rows call: data pointers, strides in elements, sizes (G = H / Hs).
struct GatherRowsArgs {
  const void* src;              // [B, Hs, S, D], device address; rows and strides multiples of 16 B
  int64_t src_sb, src_sh, src_ss;
  int64_t elem_bytes;           // bytes per element of src and dst
  const int32_t* indices;       // [B, H, N] int32; outside [0, S) gives a zero row
  int64_t ix_sb, ix_sh, ix_sn;
  void* dst;                    // [B, H, N, D] contiguous, 16-byte aligned
  int64_t B, H, Hs, S, N, D;
};

// The launch of gather_rows_kernel.
struct GatherRowsPlan {
  GridSize grid;                // (ceil(pieces / (kGatherThreads * kGatherUnroll)))
  int block;                    // kGatherThreads
  GatherParams params;
};

// The plan of a call with an output of at least one element.
inline GatherRowsPlan plan_gather_rows(const GatherRowsArgs& a) {
  const int64_t row_pieces = a.D * a.elem_bytes / 16;  // 16-byte pieces per row
  const int64_t total = a.B * a.H * a.N * row_pieces;
  return {
      .grid = {.x = ceil_div<int64_t>(total, int64_t{kGatherThreads} * kGatherUnroll)},
      .block = kGatherThreads,
      .params = {
          .src = static_cast<const char*>(a.src),
          .src_sb = a.src_sb * a.elem_bytes,
          .src_sh = a.src_sh * a.elem_bytes,
          .src_ss = a.src_ss * a.elem_bytes,
          .indices = a.indices,
          .ix_sb = a.ix_sb,
          .ix_sh = a.ix_sh,
          .ix_sn = a.ix_sn,
          .dst = static_cast<uint4*>(a.dst),
          .total = total,
          .h = static_cast<int>(a.H),
          .n = static_cast<int>(a.N),
          .group = static_cast<int>(a.H / a.Hs),
          .s = static_cast<int>(a.S),
          .row_pieces = static_cast<int>(row_pieces),
      },
  };
}

}  // namespace kcache_ops
