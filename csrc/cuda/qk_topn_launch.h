// qk_topn's launch arithmetic on plain numbers: the score pass's chunk of keys, the scratch sizes,
// the grids and the kernels' parameters. No torch and no CUDA runtime calls (the multiprocessor
// count is an argument), so the launcher (qk_topn.cu) and the CPU harness of the kernels share it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "launch_grid.h"
#include "qk_inputs.h"
#include "qk_topn_kernel.cuh"

namespace kcache_ops {

// One qk_topn call: data pointers, strides in elements, sizes (G = Hq / Hkv).
struct QkTopnArgs {
  QkInputs in;                 // q [B, Hq, D], k [B, Hkv, S, D], seq_lens [B]
  float* out_scores;           // [B, Hq, n] contiguous
  int32_t* out_indices;        // [B, Hq, n] contiguous
  float* out_lse;              // [B, Hq] contiguous
  int64_t B, Hq, Hkv, S, n;
  float scale;
  bool group_select;
};

// Sizes of the two launches and of their scratch buffers.
struct QkTopnPlan {
  int group_slice;             // GS of qk_scores_kernel: group_slice_width(G)
  int slices;                  // score blocks per KV head and chunk: ceil(G / GS)
  int chunk;                   // keys per score block
  int num_chunks;              // chunks per row: ceil(S / chunk), 0 when S = 0 (no score launch)
  int64_t score_stride;        // S rounded up to a multiple of 4 (16-byte aligned scratch rows)
  int64_t scratch_floats;      // scores scratch [B, Hq, score_stride] float32
  int64_t partial_count;       // partials [B, Hq, num_chunks] MaxSum
  GridSize scores_grid;        // (num_chunks, Hkv * slices, B)
  int scores_block;            // kScoreThreads
  int64_t mass_floats;         // group mass [B, Hkv, score_stride] float32, 0 unless group mode
  int mass_keys_per_block;     // keys per block of qk_group_mass_kernel, a multiple of 2048
  GridSize mass_grid;          // (ceil(S / mass_keys_per_block), Hkv, B), launched in group mode
  int mass_block;              // kSelectThreads
  int select_slices;           // blocks per ranked row of the radix passes and the collect; 1: no
                               // split
  int64_t split_ints;          // split select workspace [B, ranked rows, split_row_ints(n)] int32
                               // (zeroed), 0 when select_slices = 1
  GridSize hist_grid;          // (select_slices, ranked rows, B): qk_select_hist_kernel<0, 1, 2>
                               // and qk_select_collect_kernel
  GridSize select_grid;        // (Hq, or Hkv in group mode; B)
  int select_block;            // kSelectThreads
};

// The score scratch's row stride for S keys: S rounded up to a multiple of 4 floats, so that
// every row is 16-byte aligned (the select's float4 loads).
inline int64_t qk_score_stride(int64_t S) { return ceil_div<int64_t>(S, 4) * 4; }

// A score block's fixed cost (q load, block reduction, partials, its share of the launch) counted
// as this many keys of its loop, for the wave model of qk_score_chunk.
constexpr int64_t kScoreBlockOverheadKeys = 128;

// Keys per block of the score pass over S keys when one chunk of keys takes `blocks_per_chunk`
// blocks: the multiple of 256 (at least 512, so of every kernel's score_keys_per_iter) that
// minimises the grid's time in whole waves of kScoreBlocksPerSm blocks per multiprocessor,
// ceil(blocks / wave) · (chunk + kScoreBlockOverheadKeys); the smallest such chunk on ties.
inline int qk_score_chunk(int64_t S, int64_t blocks_per_chunk, int sms) {
  const int64_t wave = int64_t{sms} * kScoreBlocksPerSm;  // blocks resident at once
  const int64_t max_chunk = std::max<int64_t>(ceil_div<int64_t>(S, 256) * 256, 512);
  return static_cast<int>(
      wave_chunk(S, blocks_per_chunk, wave, 512, 256, max_chunk, kScoreBlockOverheadKeys));
}

// Keys per block of the group-mass pass over S keys with `rows` (B · Hkv) rows: at least
// kMassBlocksPerSm blocks per multiprocessor over the grid, a multiple of 4 · kSelectThreads (one
// 16-byte group per thread and step).
inline int qk_mass_keys_per_block(int64_t S, int64_t rows, int sms) {
  constexpr int64_t kStep = 4 * kSelectThreads;
  const int64_t blocks_per_row =
      std::max<int64_t>(1, ceil_div<int64_t>(kMassBlocksPerSm * int64_t{sms}, rows));
  return static_cast<int>(
      std::max<int64_t>(ceil_div<int64_t>(ceil_div<int64_t>(S, blocks_per_row), kStep), 1) *
      kStep);
}

// Blocks per ranked row for the radix passes and the collect of the select: 1 when the rows fill 2
// blocks per multiprocessor by themselves, else enough for that, each slice at least
// kSelectSliceKeys keys (below that the four more launches cost more than the passes they split).
constexpr int64_t kSelectSliceKeys = 8 * kSelectThreads;

inline int qk_select_slices(int64_t S, int64_t rows, int sms) {
  if (rows >= 2 * int64_t{sms}) return 1;
  const int64_t by_size = std::max<int64_t>(1, S / kSelectSliceKeys);
  return static_cast<int>(std::min(ceil_div<int64_t>(2 * int64_t{sms}, rows), by_size));
}

// The plan of a call with B, Hq > 0 on a device of `sms` multiprocessors.
inline QkTopnPlan plan_qk_topn(const QkTopnArgs& a, int sms) {
  const int64_t G = a.Hq / a.Hkv;
  const int gs = group_slice_width(G);
  const int slices = static_cast<int>(ceil_div<int64_t>(G, gs));
  const int chunk = qk_score_chunk(a.S, a.B * a.Hkv * slices, sms);
  const int num_chunks = static_cast<int>(ceil_div<int64_t>(a.S, chunk));
  const int64_t score_stride = qk_score_stride(a.S);
  const int mass_keys = qk_mass_keys_per_block(a.S, a.B * a.Hkv, sms);
  const int64_t ranked_rows = a.group_select ? a.Hkv : a.Hq;  // per sequence
  const int select_slices = qk_select_slices(a.S, a.B * ranked_rows, sms);
  return {
      .group_slice = gs,
      .slices = slices,
      .chunk = chunk,
      .num_chunks = num_chunks,
      .score_stride = score_stride,
      .scratch_floats = a.B * a.Hq * score_stride,
      .partial_count = a.B * a.Hq * num_chunks,
      .scores_grid = {.x = num_chunks, .y = a.Hkv * slices, .z = a.B},
      .scores_block = kScoreThreads,
      .mass_floats = a.group_select ? a.B * a.Hkv * score_stride : 0,
      .mass_keys_per_block = mass_keys,
      .mass_grid = {.x = ceil_div<int64_t>(a.S, mass_keys), .y = a.Hkv, .z = a.B},
      .mass_block = kSelectThreads,
      .select_slices = select_slices,
      .split_ints = select_slices > 1 ? a.B * ranked_rows * split_row_ints(a.n) : 0,
      .hist_grid = {.x = select_slices, .y = ranked_rows, .z = a.B},
      .select_grid = {.x = ranked_rows, .y = a.B},
      .select_block = kSelectThreads,
  };
}

// Parameters of qk_scores_kernel. scratch [B, Hq, score_stride] float32, partials [B, Hq,
// num_chunks] (sizes from the plan).
inline QkScoresParams qk_scores_params(const QkTopnArgs& a, const QkTopnPlan& plan,
                                       float* scratch, MaxSum* partials) {
  return {
      .in = a.in,
      .scores = scratch,
      .partials = partials,
      .score_stride = plan.score_stride,
      .hq = static_cast<int>(a.Hq),
      .hkv = static_cast<int>(a.Hkv),
      .s = static_cast<int>(a.S),
      .chunk = plan.chunk,
      .num_chunks = plan.num_chunks,
      .slices = plan.slices,
      .scale = a.scale,
  };
}

// Parameters of qk_group_mass_kernel: the group mass [B, Hkv, score_stride] (plan.mass_floats)
// from the scratch and partials that qk_scores_kernel wrote.
inline QkMassParams qk_mass_params(const QkTopnArgs& a, const QkTopnPlan& plan,
                                   const float* scratch, const MaxSum* partials, float* mass) {
  return {
      .scores = scratch,
      .partials = partials,
      .score_stride = plan.score_stride,
      .seq_lens = a.in.seq_lens,
      .seq_stride = a.in.seq_stride,
      .mass = mass,
      .hq = static_cast<int>(a.Hq),
      .hkv = static_cast<int>(a.Hkv),
      .s = static_cast<int>(a.S),
      .num_chunks = plan.num_chunks,
      .keys_per_block = plan.mass_keys_per_block,
  };
}

// Parameters of qk_select_hist_kernel, qk_select_collect_kernel and qk_select_kernel over the
// scratch and partials that qk_scores_kernel wrote, in group mode the mass of qk_group_mass_kernel
// (else nullptr), and the zeroed split workspace [plan.split_ints] when plan.select_slices > 1
// (else nullptr).
inline QkSelectParams qk_select_params(const QkTopnArgs& a, const QkTopnPlan& plan,
                                       const float* scratch, const MaxSum* partials,
                                       const float* mass, int* split) {
  return {
      .scores = scratch,
      .partials = partials,
      .mass = mass,
      .split = plan.select_slices > 1 ? split : nullptr,
      .score_stride = plan.score_stride,
      .seq_lens = a.in.seq_lens,
      .seq_stride = a.in.seq_stride,
      .out_scores = a.out_scores,
      .out_indices = a.out_indices,
      .out_lse = a.out_lse,
      .hq = static_cast<int>(a.Hq),
      .hkv = static_cast<int>(a.Hkv),
      .s = static_cast<int>(a.S),
      .n = static_cast<int>(a.n),
      .num_chunks = plan.num_chunks,
      .group_select = a.group_select,
  };
}

}  // namespace kcache_ops
