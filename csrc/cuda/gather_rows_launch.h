// gather_rows's launch arithmetic on plain numbers: the grid and the kernel's parameters. No torch
// and no CUDA runtime calls, so the launcher (gather_rows.cu) and the CPU harness of the kernels
// share it.
#pragma once

#include <algorithm>
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

// The GatherRowsArgs of a call: src_dev the device address of src's data (mapped host memory), dst
// [B, H, N, D] allocated by the caller (Tensor: at::Tensor in the launcher, the CPU harness's
// tensor in tests/cuda_emu, as qk_inputs.h says).
template <class Tensor>
GatherRowsArgs gather_rows_args(const void* src_dev, const Tensor& src, const Tensor& indices,
                                const Tensor& dst) {
  return {
      .src = src_dev,
      .src_sb = src.stride(0),
      .src_sh = src.stride(1),
      .src_ss = src.stride(2),
      .elem_bytes = static_cast<int64_t>(src.element_size()),
      .indices = static_cast<const int32_t*>(indices.data_ptr()),
      .ix_sb = indices.stride(0),
      .ix_sh = indices.stride(1),
      .ix_sn = indices.stride(2),
      .dst = dst.data_ptr(),
      .B = indices.size(0),
      .H = indices.size(1),
      .Hs = src.size(1),
      .S = src.size(2),
      .N = indices.size(2),
      .D = src.size(3),
  };
}

// The launch of gather_rows_kernel.
struct GatherRowsPlan {
  GridSize grid;                // (ceil(pieces / (kGatherThreads * per_thread)))
  int block;                    // kGatherThreads
  GatherParams params;
};

// Pieces per thread for `total` pieces spread over `sms` multiprocessors (host_read_sms):
// kGatherUnroll where the grid still has a block for every multiprocessor, fewer (down to 1)
// where that spreads a smaller read over more of them (launch_grid.h, host reads per
// multiprocessor). Below 256 · sms pieces even 1 leaves some without a block.
inline int gather_pieces_per_thread(int64_t total, int sms) {
  return static_cast<int>(std::clamp<int64_t>(total / (int64_t{kGatherThreads} * sms), 1,
                                              kGatherUnroll));
}

// The plan of a call with an output of at least one element, spreading over `sms` multiprocessors.
inline GatherRowsPlan plan_gather_rows(const GatherRowsArgs& a, int sms) {
  const int64_t row_pieces = a.D * a.elem_bytes / 16;  // 16-byte pieces per row
  const int64_t total = a.B * a.H * a.N * row_pieces;
  const int per_thread = gather_pieces_per_thread(total, sms);
  return {
      .grid = {.x = ceil_div<int64_t>(total, int64_t{kGatherThreads} * per_thread)},
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
          .per_thread = per_thread,
      },
  };
}

}  // namespace kcache_ops
