// What the launch plans of the ops share: the size of a grid, the query-head slice width of the
// GQA kernels, the wave model that picks their chunk of keys per block and the spread of host
// reads. Plain C++ (no torch, no CUDA runtime), like the *_launch.h headers that use it.
#pragma once

#include <cstdint>

namespace kcache_ops {

// Blocks of a launch along x, y and z (the launcher turns it into a dim3).
struct GridSize {
  int64_t x = 1, y = 1, z = 1;
};

// GS, the query heads one block of qk_scores_kernel / sparse_attn_v_kernel handles together, for a
// GQA group of `group_size` query heads: 4 for groups up to 4, else 8 (larger groups take several
// slices of 8). The launchers dispatch on it to the kernels' template constant.
constexpr int group_slice_width(int64_t group_size) { return group_size <= 4 ? 4 : 8; }

// Keys per block over S keys, when one chunk of keys takes `blocks_per_chunk` blocks and `wave`
// blocks are resident at once: of first, first + step, ... up to last, the chunk that minimises
// the grid's time in whole waves, ceil(blocks / wave) · (chunk + overhead_keys), where
// overhead_keys counts a block's fixed cost in keys of its loop; the smallest such chunk on ties.
inline int64_t wave_chunk(int64_t S, int64_t blocks_per_chunk, int64_t wave, int64_t first,
                          int64_t step, int64_t last, int64_t overhead_keys) {
  int64_t best = first, best_cost = -1;
  for (int64_t chunk = first; chunk <= last; chunk += step) {
    const int64_t blocks = blocks_per_chunk * ((S + chunk - 1) / chunk);
    const int64_t cost = (blocks + wave - 1) / wave * (chunk + overhead_keys);
    if (best_cost < 0 || cost < best_cost) {
      best = chunk;
      best_cost = cost;
    }
  }
  return best;
}

// Host reads per multiprocessor. The H200's measurements of 2026-12-04 suggested that a
// multiprocessor reads mapped host memory at no more than about 3 GB/s (sparse_attn_v at batch 1:
// 8 blocks, 16 or 64 KiB each, every load in flight, 11 and 26 µs; gather_rows: 128 and 256 KiB
// in 32 KiB blocks, both ≈ 15 µs; bench/NOTES.md, "Host reads per multiprocessor"), so that a
// read from host memory would fill PCIe (≈ 55 GB/s) only over ≈ 20 or more multiprocessors; the
// kernels that read host memory can therefore plan at least as many blocks as the device has
// multiprocessors where the read splits that finely. Measured on an H100 (2026-12-06): that pays
// for gather_rows (128 KiB to 1 MiB, 3 µs less each, 85-91 % of a memcpy of the same bytes) and
// not for sparse_attn_v (at batch 1 within a µs either way alone, its fixed work per block
// repeated in every part; the default step, where it runs beside lowbit_tail, 11 µs slower at
// 32K x 1 and 124 µs at 128K x 8). So gather_rows spreads by default and sparse_attn_v does not;
// KCACHE_OPS_HOST_READ_SPREAD=0 or 1 plans both one way, for the benchmarks' comparison
// (host_read_sms).

}  // namespace kcache_ops
