// lowbit_tail's launch arithmetic on plain numbers: the chunk of keys per block, the partials'
// size, the grids and the kernels' parameters. No torch and no CUDA runtime calls (the
// multiprocessor count is an argument), so the launcher (lowbit_tail.cu) and the CPU harness of
// the kernels share it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch_grid.h"
#include "lowbit_tail_kernel.cuh"
#include "sum_partials_launch.h"

namespace kcache_ops {

// One lowbit_tail call: data pointers, strides (in elements unless said), sizes (G = Hq / Hkv).
struct LowbitTailArgs {
  const float* scores;         // [B, Hq, S] float32
  int64_t s_sb, s_sh, s_ss;
  const int32_t* seq_lens;     // [B] int32
  int64_t seq_stride;
  const uint8_t* codes;        // [B, Hkv, S, D * bits / 8] uint8, rows 16-byte aligned
  int64_t c_sb, c_sh, c_ss;
  const void* meta;            // [B, Hkv, S, 2] bfloat16, each row's pair 4-byte aligned
  int64_t m_sb, m_sh, m_ss;    // even (whole pairs)
  const float* lse;            // [B, Hq] float32
  int64_t lse_sb, lse_sh;
  const int32_t* indices;      // [B, Hq, N] int32; outside [0, L_b) ignored
  int64_t ix_sb, ix_sh, ix_sn;
  int64_t skip_first, skip_last;  // left out: j < skip_first, j >= L_b - skip_last (< 2^31 each)
  float* out;                  // [B, Hq, D] float32, contiguous
  int64_t B, Hq, Hkv, S, D, N, bits;
  const void* hot_v;           // [B, Hkv, H, D] float32 / float16 / bfloat16 (hot_dtype 0 / 1 / 2)
  int64_t hv_sb, hv_sh, hv_si;
  const int32_t* hot_pos;      // [B, H] int32
  int64_t hp_sb, hp_si;
  int64_t hot_rows, hot_dtype;  // H: 0 for none
};

// The LowbitTailArgs of a call: the codes' strides taken in bytes (the harness passes them as
// 4-byte words), out [B, Hq, D] float32 allocated by the caller, and the hot rows hot_v /
// hot_pos (nullptr: none) with hot_dtype 0 / 1 / 2 for float32 / float16 / bfloat16 rows
// (Tensor: at::Tensor in the launcher, the CPU harness's tensor in tests/cuda_emu, as
// qk_inputs.h says).
template <class Tensor>
LowbitTailArgs lowbit_tail_args(const Tensor& scores, const Tensor& seq_lens, const Tensor& lse,
                                const Tensor& indices, const Tensor& codes, const Tensor& meta,
                                int64_t bits, int64_t skip_first, int64_t skip_last,
                                const Tensor& out, const Tensor* hot_v, const Tensor* hot_pos,
                                int64_t hot_dtype) {
  const int64_t code_bytes = codes.element_size();
  LowbitTailArgs a{
      .scores = static_cast<const float*>(scores.data_ptr()),
      .s_sb = scores.stride(0),
      .s_sh = scores.stride(1),
      .s_ss = scores.stride(2),
      .seq_lens = static_cast<const int32_t*>(seq_lens.data_ptr()),
      .seq_stride = seq_lens.stride(0),
      .codes = static_cast<const uint8_t*>(codes.data_ptr()),
      .c_sb = codes.stride(0) * code_bytes,
      .c_sh = codes.stride(1) * code_bytes,
      .c_ss = codes.stride(2) * code_bytes,
      .meta = meta.data_ptr(),
      .m_sb = meta.stride(0),
      .m_sh = meta.stride(1),
      .m_ss = meta.stride(2),
      .lse = static_cast<const float*>(lse.data_ptr()),
      .lse_sb = lse.stride(0),
      .lse_sh = lse.stride(1),
      .indices = static_cast<const int32_t*>(indices.data_ptr()),
      .ix_sb = indices.stride(0),
      .ix_sh = indices.stride(1),
      .ix_sn = indices.stride(2),
      .skip_first = skip_first,
      .skip_last = skip_last,
      .out = static_cast<float*>(out.data_ptr()),
      .B = scores.size(0),
      .Hq = scores.size(1),
      .Hkv = codes.size(1),
      .S = codes.size(2),
      .D = codes.size(3) * code_bytes * 8 / bits,
      .N = indices.size(2),
      .bits = bits,
  };
  if (hot_v != nullptr && hot_v->size(2) > 0) {  // else no hot row: hot_rows 0
    a.hot_v = hot_v->data_ptr();
    a.hv_sb = hot_v->stride(0);
    a.hv_sh = hot_v->stride(1);
    a.hv_si = hot_v->stride(2);
    a.hot_pos = static_cast<const int32_t*>(hot_pos->data_ptr());
    a.hp_sb = hot_pos->stride(0);
    a.hp_si = hot_pos->stride(1);
    a.hot_rows = hot_v->size(2);
    a.hot_dtype = hot_dtype;
  }
  return a;
}

// Sizes of the tail's launch and of its partials (their sum's launch: lowbit_tail_sum_plan).
struct LowbitTailPlan {
  int group_slice;             // GS of lowbit_tail_kernel: group_slice_width(G)
  int slices;                  // blocks per KV head and chunk: ceil(G / GS)
  int chunk;                   // keys per block, a multiple of kTailChunkStep, <= kTailMaxChunk
  int num_chunks;              // ceil(S / chunk), 0 when S = 0 (no launch: out is zeros)
  int64_t partial_floats;      // partials [B, Hq, num_chunks, D] float32; 0 when num_chunks <= 1
                               // (lowbit_tail_kernel then writes out directly)
  GridSize tail_grid;          // (num_chunks, Hkv * slices, B)
  int tail_block;              // kTailThreads
};

// A block's fixed cost (bitmap, block reduction, its share of the launch and of the reduction)
// counted as this many keys of its loop, for the wave model of lowbit_tail_chunk.
constexpr int64_t kTailBlockOverheadKeys = 128;

// Keys per block over S keys when one chunk of keys takes `blocks_per_chunk` blocks: the multiple
// of kTailChunkStep up to kTailMaxChunk that minimises the grid's time in whole waves of
// `blocks_per_sm` blocks per multiprocessor, ceil(blocks / wave) · (chunk + overhead); the
// smallest such chunk on ties.
inline int lowbit_tail_chunk(int64_t S, int64_t blocks_per_chunk, int sms, int blocks_per_sm) {
  const int64_t wave = int64_t{sms} * blocks_per_sm;  // blocks resident at once
  const int64_t max_chunk = std::min<int64_t>(
      std::max<int64_t>(ceil_div<int64_t>(S, kTailChunkStep), 1) * kTailChunkStep, kTailMaxChunk);
  return static_cast<int>(wave_chunk(S, blocks_per_chunk, wave, kTailChunkStep, kTailChunkStep,
                                     max_chunk, kTailBlockOverheadKeys));
}

// The plan of a call with B, Hq > 0 on a device of `sms` multiprocessors, where `blocks_per_sm`
// blocks of the kernel instance fit on one at once (its occupancy: at least kTailBlocksPerSm, the
// launch bounds, and more where its registers and shared memory allow: an earlier kernel's grid,
// planned for 3 where the H200 held 4, ran in 1.45 waves).
inline LowbitTailPlan plan_lowbit_tail(const LowbitTailArgs& a, int sms, int blocks_per_sm) {
  const int64_t G = a.Hq / a.Hkv;
  const int gs = group_slice_width(G);
  const int slices = static_cast<int>(ceil_div<int64_t>(G, gs));
  const int chunk = lowbit_tail_chunk(a.S, a.B * a.Hkv * slices, sms, blocks_per_sm);
  const int num_chunks = static_cast<int>(ceil_div<int64_t>(a.S, chunk));
  return {
      .group_slice = gs,
      .slices = slices,
      .chunk = chunk,
      .num_chunks = num_chunks,
      .partial_floats = num_chunks > 1 ? a.B * a.Hq * num_chunks * a.D : 0,
      .tail_grid = {.x = num_chunks, .y = a.Hkv * slices, .z = a.B},
      .tail_block = kTailThreads,
  };
}

// Parameters of lowbit_tail_kernel. partials [B, Hq, num_chunks, D] float32 (plan.partial_floats),
// or a.out when plan.num_chunks == 1.
inline LowbitTailParams lowbit_tail_params(const LowbitTailArgs& a, const LowbitTailPlan& plan,
                                           float* partials) {
  return {
      .scores = a.scores,
      .s_sb = a.s_sb,
      .s_sh = a.s_sh,
      .s_ss = a.s_ss,
      .seq_lens = a.seq_lens,
      .seq_stride = a.seq_stride,
      .codes = a.codes,
      .c_sb = a.c_sb,
      .c_sh = a.c_sh,
      .c_ss = a.c_ss,
      .meta = static_cast<const uint32_t*>(a.meta),
      .m_sb = a.m_sb / 2,
      .m_sh = a.m_sh / 2,
      .m_ss = a.m_ss / 2,
      .lse = a.lse,
      .lse_sb = a.lse_sb,
      .lse_sh = a.lse_sh,
      .indices = a.indices,
      .ix_sb = a.ix_sb,
      .ix_sh = a.ix_sh,
      .ix_sn = a.ix_sn,
      .skip_first = static_cast<int>(a.skip_first),
      .skip_last = static_cast<int>(a.skip_last),
      .partials = plan.num_chunks == 1 ? a.out : partials,
      .hq = static_cast<int>(a.Hq),
      .hkv = static_cast<int>(a.Hkv),
      .s = static_cast<int>(a.S),
      .n = static_cast<int>(a.N),
      .chunk = plan.chunk,
      .num_chunks = plan.num_chunks,
      .slices = plan.slices,
      .bits = static_cast<int>(a.bits),
      .hot_v = a.hot_v,
      .hv_sb = a.hv_sb,
      .hv_sh = a.hv_sh,
      .hv_si = a.hv_si,
      .hot_pos = a.hot_pos,
      .hp_sb = a.hp_sb,
      .hp_si = a.hp_si,
      .hot_rows = static_cast<int>(a.hot_rows),
      .hot_dtype = static_cast<int>(a.hot_dtype),
  };
}

// The launch that sums the partials lowbit_tail_kernel wrote into a.out, when plan.num_chunks > 1.
inline SumPartialsPlan lowbit_tail_sum_plan(const LowbitTailArgs& a, const LowbitTailPlan& plan,
                                            const float* partials) {
  return plan_sum_partials(partials, a.out, a.B * a.Hq, plan.num_chunks, static_cast<int>(a.D));
}

}  // namespace kcache_ops
