// sparse_attn_v's launch arithmetic on plain numbers: the grid and the kernel's parameters. No
// torch and no CUDA runtime calls, so the launcher (sparse_attn_v.cu) and the CPU harness of the
// kernels share it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch_grid.h"
#include "sparse_attn_v_kernel.cuh"
#include "sum_partials_launch.h"

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
  int64_t B, Hq, Hkv, S, N, D;
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
      .D = v_cache.size(3),
      .renormalize = renormalize,
  };
}

// The launches of sparse_attn_v_kernel<T, D, group_slice> and, with several parts, of
// sum_partials_kernel<T>.
struct SparseAttnVPlan {
  int group_slice;              // GS: group_slice_width(G)
  int slices;                   // blocks per KV head and part: ceil(G / GS)
  int parts;                    // blocks per slice, each a part of its row list
  int64_t partial_floats;       // partials [B, Hq, parts, D] float32; 0 when parts == 1 (the
                                // kernel then writes out itself)
  GridSize grid;                // (Hkv * slices, B, parts)
  int block;                    // kAttnThreads
};

// The fewest rows of a slice's longest list (G · N, or GS · N) a part is planned for: a smaller
// part would add a block's fixed work (the statistics, the row union) for little of the read.
constexpr int64_t kAttnMinPartRows = 16;

// Parts of each slice's row list when `blocks` blocks (B · Hkv · slices) read it and a list holds
// at most `list_rows` rows, spread over `sms` multiprocessors (host_read_sms: 1 for a read of
// device memory, and by default, where the spread did not pay when measured): where the blocks
// would leave more than half of them idle, enough for a block on every one, ceil(sms / blocks)
// (host reads per multiprocessor, launch_grid.h), but no more than parts of kAttnMinPartRows
// rows of the longest list; else 1 (a second launch for little).
inline int sparse_attn_v_parts(int64_t blocks, int64_t list_rows, int sms) {
  if (2 * blocks > sms) return 1;
  const int64_t most = std::max<int64_t>(1, list_rows / kAttnMinPartRows);
  return static_cast<int>(std::clamp<int64_t>(ceil_div<int64_t>(sms, blocks), 1, most));
}

// The plan of a call with an output of at least one element, spreading over `sms` multiprocessors.
inline SparseAttnVPlan plan_sparse_attn_v(const SparseAttnVArgs& a, int sms) {
  const int64_t G = a.Hq / a.Hkv;
  const int gs = group_slice_width(G);
  const int slices = static_cast<int>(ceil_div<int64_t>(G, gs));
  const int64_t list_rows = std::min<int64_t>(G, gs) * a.N;  // a slice's list at most (per head)
  const int parts = sparse_attn_v_parts(a.B * a.Hkv * slices, list_rows, sms);
  return {
      .group_slice = gs,
      .slices = slices,
      .parts = parts,
      .partial_floats = parts > 1 ? a.B * a.Hq * parts * a.D : 0,
      .grid = {.x = a.Hkv * slices, .y = a.B, .z = parts},
      .block = kAttnThreads,
  };
}

// Parameters of sparse_attn_v_kernel: partials [B, Hq, parts, D] float32 (plan.partial_floats),
// unused when plan.parts == 1.
inline SparseAttnParams sparse_attn_v_params(const SparseAttnVArgs& a,
                                             const SparseAttnVPlan& plan, float* partials) {
  return {
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
      .partials = plan.parts > 1 ? partials : nullptr,
      .hq = static_cast<int>(a.Hq),
      .hkv = static_cast<int>(a.Hkv),
      .s = static_cast<int>(a.S),
      .n = static_cast<int>(a.N),
      .slices = plan.slices,
      .parts = plan.parts,
      .renormalize = a.renormalize,
  };
}

// The launch that sums the parts' partials into a.out, when plan.parts > 1.
inline SumPartialsPlan sparse_attn_v_sum_plan(const SparseAttnVArgs& a,
                                              const SparseAttnVPlan& plan,
                                              const float* partials) {
  return plan_sum_partials(partials, a.out, a.B * a.Hq, plan.parts, static_cast<int>(a.D));
}

}  // namespace kcache_ops
