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

// The SparseAttnVArgs of a call: v the device address of v_cache's data (mapped host memory), lse
// read unless renormalize, v_sum and seq_lens (the mean tail) nullptr or both given, out [B, Hq,
// D] allocated by the caller (Tensor: at::Tensor in the launcher, the CPU harness's tensor in
// tests/cuda_emu, as qk_inputs.h says).
template <class Tensor>
SparseAttnVArgs sparse_attn_v_args(const Tensor& scores, const Tensor& indices, const void* v,
                                   const Tensor& v_cache, const Tensor* lse, bool renormalize,
                                   const Tensor* v_sum, const Tensor* seq_lens,
                                   const Tensor& out) {
  const bool tail = v_sum != nullptr;
  return {
      .scores = static_cast<const float*>(scores.data_ptr()),
      .sc_sb = scores.stride(0),
      .sc_sh = scores.stride(1),
      .sc_sn = scores.stride(2),
      .indices = static_cast<const int32_t*>(indices.data_ptr()),
      .ix_sb = indices.stride(0),
      .ix_sh = indices.stride(1),
      .ix_sn = indices.stride(2),
      .v = v,
      .v_sb = v_cache.stride(0),
      .v_sh = v_cache.stride(1),
      .v_ss = v_cache.stride(2),
      .lse = renormalize ? nullptr : static_cast<const float*>(lse->data_ptr()),
      .lse_sb = renormalize ? 0 : lse->stride(0),
      .lse_sh = renormalize ? 0 : lse->stride(1),
      .v_sum = tail ? static_cast<const float*>(v_sum->data_ptr()) : nullptr,
      .vs_sb = tail ? v_sum->stride(0) : 0,
      .vs_sh = tail ? v_sum->stride(1) : 0,
      .seq_lens = tail ? static_cast<const int32_t*>(seq_lens->data_ptr()) : nullptr,
      .seq_stride = tail ? seq_lens->stride(0) : 0,
      .out = out.data_ptr(),
      .B = scores.size(0),
      .Hq = scores.size(1),
      .Hkv = v_cache.size(1),
      .S = v_cache.size(2),
      .N = scores.size(2),
      .renormalize = renormalize,
  };
}

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
