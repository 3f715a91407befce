// reuse_rows's launch arithmetic on plain numbers: the grid and the kernel's parameters. No torch
// and no CUDA runtime calls, so the launcher (reuse_rows.cu) and the CPU harness of the kernels
// share it.
#pragma once

#include <cstdint>

#include "launch_grid.h"
#include "reuse_rows_kernel.cuh"

namespace kcache_ops {

// The launch of reuse_rows_kernel.
struct ReuseRowsPlan {
  GridSize grid;  // (B * Hkv)
  int block;      // kReuseThreads
  ReuseParams params;
};

// The plan of a call with at least one entry (N > 0): v_dev the device address of v_host's data
// (mapped host memory); rows, held, used (the pool, updated) and pool_indices [B, Hq, N], counts
// [B, Hkv, 2] (allocated by the caller) contiguous. Tensor: at::Tensor in the launcher, the CPU
// harness's tensor in tests/cuda_emu, as qk_inputs.h says.
template <class Tensor>
ReuseRowsPlan plan_reuse_rows(const Tensor& indices, const void* v_dev, const Tensor& v_host,
                              const Tensor& new_pos, const Tensor& rows, const Tensor& held,
                              const Tensor& used, const Tensor& step, const Tensor& pool_indices,
                              const Tensor& counts, bool group_select) {
  const int64_t B = indices.size(0), Hq = indices.size(1), N = indices.size(2);
  const int64_t Hkv = v_host.size(1), elem = static_cast<int64_t>(v_host.element_size());
  return {
      .grid = {.x = B * Hkv},
      .block = kReuseThreads,
      .params = {
          .indices = static_cast<const int32_t*>(indices.data_ptr()),
          .ix_sb = indices.stride(0),
          .ix_sh = indices.stride(1),
          .ix_sn = indices.stride(2),
          .v_host = static_cast<const char*>(v_dev),
          .v_sb = v_host.stride(0) * elem,
          .v_sh = v_host.stride(1) * elem,
          .v_ss = v_host.stride(2) * elem,
          .new_pos = static_cast<const int32_t*>(new_pos.data_ptr()),
          .new_pos_stride = new_pos.stride(0),
          .step = static_cast<const int32_t*>(step.data_ptr()),
          .rows = static_cast<uint4*>(rows.data_ptr()),
          .held = static_cast<int32_t*>(held.data_ptr()),
          .used = static_cast<int32_t*>(used.data_ptr()),
          .pool_indices = static_cast<int32_t*>(pool_indices.data_ptr()),
          .counts = static_cast<int32_t*>(counts.data_ptr()),
          .hkv = static_cast<int>(Hkv),
          .group = static_cast<int>(Hq / Hkv),
          .n = static_cast<int>(N),
          .s = static_cast<int>(v_host.size(2)),
          .c = static_cast<int>(rows.size(2)),
          .e = static_cast<int>(group_select ? N : Hq / Hkv * N),
          .row_pieces = static_cast<int>(v_host.size(3) * elem / 16),
          .group_select = group_select,
      },
  };
}

}  // namespace kcache_ops
