// gather_rows on the GPU: dst[b, h, i] = src[b, h / G', idx] with src in pinned, device-mapped host
// memory, read zero-copy. A pure copy, so the kernel works on 16-byte pieces whatever the dtype:
// piece e of the flat [B, H, N, row_pieces] output is copied by one thread, `per_thread` (at most
// kGatherUnroll) pieces per thread loaded before any is stored (many host reads in flight),
// consecutive threads on consecutive pieces of a row (coalesced). Rows with an index outside
// [0, S) (-1: padding) are zero.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 8;

struct GatherParams {
  const char* src;              // [B, Hs, S, row_bytes], device address of mapped host memory
  int64_t src_sb, src_sh, src_ss;  // strides in bytes (multiples of 16)
  const int32_t* indices;       // [B, H, N] int32
  int64_t ix_sb, ix_sh, ix_sn;  // strides in elements
  uint4* dst;                   // [B, H, N, row_pieces] contiguous
  int64_t total;                // B * H * N * row_pieces
  int h, n, group, s, row_pieces;  // group = H / Hs
  int per_thread;               // pieces per thread: 1 .. kGatherUnroll
};

// grid ceil(total / (kGatherThreads * per_thread)), block kGatherThreads. Three passes over the
// thread's pieces: every index load, then every host load, then every store (in one pass, each
// host load waited for its own index load, one after the other: per_thread device-memory
// latencies before the last host read was even issued).
__global__ void __launch_bounds__(kGatherThreads) gather_rows_kernel(GatherParams p) {
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * kGatherThreads * p.per_thread + threadIdx.x;
  int j[kGatherUnroll];         // each piece's source row (-1: none, a zero piece)
  int64_t at[kGatherUnroll];    // and its byte offset in src, less the row's (j · src_ss)
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    const int64_t e = first + u * kGatherThreads;
    j[u] = -1;
    at[u] = 0;
    if (u < p.per_thread && e < p.total) {
      const int64_t row = e / p.row_pieces;  // over [B, H, N]
      const int c = static_cast<int>(e - row * p.row_pieces);
      const int i = static_cast<int>(row % p.n);
      const int64_t bh = row / p.n;
      const int h = static_cast<int>(bh % p.h);
      const int64_t b = bh / p.h;
      j[u] = p.indices[b * p.ix_sb + h * p.ix_sh + i * p.ix_sn];
      at[u] = b * p.src_sb + (h / p.group) * p.src_sh + c * 16;
    }
  }
  uint4 piece[kGatherUnroll];
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    piece[u] = j[u] >= 0 && j[u] < p.s ? load16(p.src + at[u] + j[u] * p.src_ss)
                                       : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    const int64_t e = first + u * kGatherThreads;
    if (u < p.per_thread && e < p.total) p.dst[e] = piece[u];
  }
}

}  // namespace kcache_ops
