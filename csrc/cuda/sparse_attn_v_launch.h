// sparse_attn_v's launch arithmetic on plain numbers: the grid and the kernel's parameters. No
// torch and no CUDA runtime calls, so the launcher (sparse_attn_v.cu) and the CPU harness of the
// kernels share it.
#pragma once

#include <cstdint>

#include "launch_grid.h"
#include "sparse_attn_v_kernel.cuh"

namespace kcache_ops {

// One sparse_attn_v call: data pointers, strides in elements, sizes (G = Hq / Hkv).
struct SparseAttnVArgs {
  const float* scores;          // [B, Hq, N] float32
  int64_t sc_sb, sc_sh, sc_sn;
  const int32_t* indices;       // [B, Hq, N] int32; outside [0, S) is skipped
  int64_t ix_sb, ix_sh, ix_sn;
  const void* v;                // [B, Hkv, S, D] of T, device address, rows 16-byte aligned
  int64_t v_sb, v_sh, v_ss;
  const float* lse;             // [B, Hq] float32, nullptr when renormalize
  int64_t lse_sb, lse_sh;
  const float* v_sum;           // [B, Hkv, D] float32, last dim contiguous; nullptr: no tail
  int64_t vs_sb, vs_sh;
  const int32_t* seq_lens;      // [B] int32 with v_sum, else nullptr
  int64_t seq_stride;
  void* out;                    // [B, Hq, D] of T, contiguous
  int64_t B, Hq, Hkv, S, N;
  bool renormalize;
};

// The launch of sparse_attn_v_kernel<T, D, group_slice>.
struct SparseAttnVPlan {
  int group_slice;              // GS: group_slice_width(G)
  GridSize grid;                // (Hkv * slices, B), slices = ceil(G / GS)
  int block;                    // kAttnThreads
  SparseAttnParams params;
};

// The plan of a call with an output of at least one element.
inline SparseAttnVPlan plan_sparse_attn_v(const SparseAttnVArgs& a) {
  const int64_t G = a.Hq / a.Hkv;
  const int gs = group_slice_width(G);
  const int slices = static_cast<int>(ceil_div<int64_t>(G, gs));
  return {
      .group_slice = gs,
      .grid = {.x = a.Hkv * slices, .y = a.B},
      .block = kAttnThreads,
      .params = {
          .scores = a.scores,
          .sc_sb = a.sc_sb,
          .sc_sh = a.sc_sh,
          .sc_sn = a.sc_sn,
          .indices = a.indices,
          .ix_sb = a.ix_sb,
          .ix_sh = a.ix_sh,
          .ix_sn = a.ix_sn,
          .v = a.v,
          .v_sb = a.v_sb,
          .v_sh = a.v_sh,
          .v_ss = a.v_ss,
          .lse = a.lse,
          .lse_sb = a.lse_sb,
          .lse_sh = a.lse_sh,
          .v_sum = a.v_sum,
          .vs_sb = a.vs_sb,
          .vs_sh = a.vs_sh,
          .seq_lens = a.seq_lens,
          .seq_stride = a.seq_stride,
          .out = a.out,
          .hq = static_cast<int>(a.Hq),
          .hkv = static_cast<int>(a.Hkv),
          .s = static_cast<int>(a.S),
          .n = static_cast<int>(a.N),
          .slices = slices,
          .renormalize = a.renormalize,
      },
  };
}

}  // namespace kcache_ops
