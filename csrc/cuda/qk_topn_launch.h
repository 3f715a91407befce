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
  int64_t skip_first, skip_last;  // ranked keys: skip_first <= j < L_b - skip_last (< 2^31 each)
  float top_p;                    // in (0, 1]: below 1, each head's mass prefix is kept
};

// The QkTopnArgs of a call: its inputs, its outputs scores [B, Hq, n] float32, indices [B, Hq, n]
// int32 and lse [B, Hq] float32 (contiguous, allocated by the caller), and its arguments
// (Tensor: as qk_inputs).
template <class Tensor>
QkTopnArgs qk_topn_args(const Tensor& q, const Tensor& k_cache, const Tensor& seq_lens,
                        const Tensor& scores, const Tensor& indices, const Tensor& lse, int64_t n,
                        double scale, bool group_select, int64_t skip_first, int64_t skip_last,
                        double top_p) {
  return {
      .in = qk_inputs(q, k_cache, seq_lens),
      .out_scores = static_cast<float*>(scores.data_ptr()),
      .out_indices = static_cast<int32_t*>(indices.data_ptr()),
      .out_lse = static_cast<float*>(lse.data_ptr()),
      .B = q.size(0),
      .Hq = q.size(1),
      .Hkv = k_cache.size(1),
      .S = k_cache.size(2),
      .n = n,
      .scale = static_cast<float>(scale),
      .group_select = group_select,
      .skip_first = skip_first,
      .skip_last = skip_last,
      .top_p = static_cast<float>(top_p),
  };
}

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
  int64_t mass_keys;           // group mass keys [B, Hkv, score_stride] uint32, 0 unless group
                               // mode and not select_staged
  int select_slices;           // blocks per ranked row of qk_select_kernel; > 1: the row's last
                               // block merges their picks
  int64_t select_slice_keys;   // keys per slice, a multiple of 4
  bool select_staged;          // a slice's ranking keys fit in a select block's shared memory
  int64_t pick_count;          // picks [B, ranked rows, select_slices, n] (unsigned 64-bit), 0
                               // when select_slices = 1
  GridSize select_grid;        // (select_slices, Hq or Hkv in group mode, B)
  int64_t select_rows;         // the select's counters, one per ranked row (B · ranked rows)
                               // when select_slices > 1, else 0
  int select_block;            // kSelectThreads
};

// The score scratch's row stride for S keys: S rounded up to a multiple of 4 floats, so that
// every row is 16-byte aligned (the select's 16-byte loads).
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

// Slices of a ranked row for qk_select_kernel: as many as one wave of kSelectBlocksPerSm blocks per
// multiprocessor holds (all resident at once: 512 threads, 43 KiB of shared memory each), each
// slice at least kSelectSliceKeys keys (one 16-byte group per thread), and the slices' lists of
// picks, bitonic_size(n) slots each, within the merge's shared memory (kMaxTopN).
constexpr int64_t kSelectSliceKeys = 4 * kSelectThreads;

inline int qk_select_slices(int64_t S, int64_t rows, int64_t n, int sms) {
  const int64_t want = std::max<int64_t>(1, kSelectBlocksPerSm * int64_t{sms} / rows);
  const int64_t by_size = std::max<int64_t>(1, S / kSelectSliceKeys);
  const int64_t by_merge = std::max<int64_t>(1, kMaxTopN / bitonic_size(static_cast<int>(n)));
  return static_cast<int>(std::min({want, by_size, by_merge}));
}

// Keys per slice when a row of S keys is split in `slices`: S / slices rounded up to a multiple of
// 4 (16-byte aligned slices), at least 4.
inline int64_t qk_select_slice_keys(int64_t S, int slices) {
  return std::max<int64_t>(1, ceil_div<int64_t>(ceil_div<int64_t>(S, slices), 4)) * 4;
}

// The plan of a call with B, Hq > 0 on a device of `sms` multiprocessors.
inline QkTopnPlan plan_qk_topn(const QkTopnArgs& a, int sms) {
  const int64_t G = a.Hq / a.Hkv;
  const int gs = group_slice_width(G);
  const int slices = static_cast<int>(ceil_div<int64_t>(G, gs));
  const int chunk = qk_score_chunk(a.S, a.B * a.Hkv * slices, sms);
  const int num_chunks = static_cast<int>(ceil_div<int64_t>(a.S, chunk));
  const int64_t score_stride = qk_score_stride(a.S);
  const int64_t ranked_rows = a.group_select ? a.Hkv : a.Hq;  // per sequence
  const int64_t slice_keys =
      qk_select_slice_keys(a.S, qk_select_slices(a.S, a.B * ranked_rows, a.n, sms));
  const int select_slices =
      static_cast<int>(std::max<int64_t>(1, ceil_div<int64_t>(a.S, slice_keys)));
  const bool staged = select_staged(slice_keys, static_cast<int>(a.n));
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
      .mass_keys = a.group_select && !staged ? a.B * a.Hkv * score_stride : 0,
      .select_slices = select_slices,
      .select_slice_keys = slice_keys,
      .select_staged = staged,
      .pick_count = select_slices > 1 ? a.B * ranked_rows * select_slices * a.n : 0,
      .select_grid = {.x = select_slices, .y = ranked_rows, .z = a.B},
      .select_rows = select_slices > 1 ? a.B * ranked_rows : 0,
      .select_block = kSelectThreads,
  };
}

// A buffer only a split select uses (its picks, its counters): `p` when the plan splits rows,
// else nullptr.
template <class T>
T* when_split(const QkTopnPlan& plan, T* p) {
  return plan.select_slices > 1 ? p : nullptr;
}

// Parameters of qk_scores_kernel. scratch [B, Hq, score_stride] float32, partials [B, Hq,
// num_chunks], slices_done [plan.select_rows] int32 (sizes from the plan), which it zeroes for the
// select when its rows are split.
inline QkScoresParams qk_scores_params(const QkTopnArgs& a, const QkTopnPlan& plan,
                                       float* scratch, MaxSum* partials, int* slices_done) {
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
      .slices_done = when_split(plan, slices_done),
      .select_rows = static_cast<int>(plan.select_rows),
  };
}

// Parameters of qk_select_kernel over the scratch, partials and counters that qk_scores_kernel
// wrote, the group mass keys [plan.mass_keys] (unused when it is empty), and the picks
// [plan.pick_count] when plan.select_slices > 1 (else nullptr).
inline QkSelectParams qk_select_params(const QkTopnArgs& a, const QkTopnPlan& plan,
                                       const float* scratch, const MaxSum* partials,
                                       uint32_t* mass_keys, unsigned long long* picks,
                                       int* slices_done) {
  return {
      .scores = scratch,
      .partials = partials,
      .mass_keys = mass_keys,
      .picks = when_split(plan, picks),
      .slices_done = when_split(plan, slices_done),
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
      .skip_first = static_cast<int>(a.skip_first),
      .skip_last = static_cast<int>(a.skip_last),
      .top_p = a.top_p,
      .slices = plan.select_slices,
      .slice_keys = plan.select_slice_keys,
      .group_select = a.group_select,
      .staged = plan.select_staged,
  };
}

}  // namespace kcache_ops
