// reuse_rows on the GPU: KCache's pool of reused V rows, one decode step, in one launch (the
// schema's comment in ../registration.cpp has the semantics). One block per (sequence, KV head),
// in shared memory:
//   1. each entry's position (per head: the G heads' N entries one after another; group_select:
//      the entry-wise max over the group's heads), and the position each slot holds;
//   2. each entry's first entry of the same position (a scan of the entries before it) and, for a
//      first entry, the first slot holding it (a scan of `held`); a thread takes a contiguous run
//      of entries, so one block scan numbers the misses in entry order;
//   3. with misses: the slots' refill keys, ((step last read + 1) << 32) | slot, those this step
//      found raised above every other, sorted (a bitonic network); the i-th miss takes the i-th
//      slot;
//   4. the missed rows copied from v_host (mapped host memory) into their slots, in 16-byte pieces,
//      kReuseUnroll loads in flight per thread, and held / used updated;
//   5. every entry's slot written out: pool_indices, for sparse_attn_v over the pool.
// The step counter is read from device memory, so the launch can be captured in a CUDA graph.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kReuseThreads = 256;
constexpr int kReuseUnroll = 4;
// The largest pool (slots C per sequence and KV head) and step (entries E) one block holds in its
// shared memory: 12 bytes a slot (its refill key and position), 8 an entry (40 KiB).
constexpr int kReuseMaxSlots = 2048;
constexpr int kReuseMaxEntries = 2048;
static_assert(kReuseMaxEntries <= kReuseThreads * 32, "a thread's entries must fit a 32-bit mask");
constexpr int kReuseMiss = 0x7fffffff;  // step 2's mark of an entry whose row is not in the pool

struct ReuseParams {
  const int32_t* indices;       // [B, Hq, N] int32; outside [0, S) is padding
  int64_t ix_sb, ix_sh, ix_sn;  // strides in elements
  const char* v_host;           // [B, Hkv, S, row_bytes], device address of mapped host memory
  int64_t v_sb, v_sh, v_ss;     // strides in bytes (multiples of 16)
  const int32_t* new_pos;       // [B] int32: the step's new token, kept for this step only
  int64_t new_pos_stride;
  const int32_t* step;          // [1] int32: the step's number, read here (graph replays)
  uint4* rows;                  // [B, Hkv, C, row_pieces] contiguous, updated
  int32_t* held;                // [B, Hkv, C] contiguous: the position a slot holds, updated
  int32_t* used;                // [B, Hkv, C] contiguous: the step a slot was last read, updated
  int32_t* pool_indices;        // [B, Hq, N] contiguous, written
  int32_t* counts;              // [B, Hkv, 2] contiguous: distinct positions read, found
  int hkv, group, n, s, c, e, row_pieces;  // e = group_select ? n : group * n; c >= e
  bool group_select;
};

// The refill order of the slots (ascending): (step last read + 1, at least 0), then slot; a slot
// found by this step (kReuseFoundKey | slot, above every int32 step) never. The CPU op sorts the
// same keys (cpu/reuse_rows.cpp).
constexpr unsigned long long kReuseFoundKey = 0xffffffffull << 32;
__device__ __forceinline__ unsigned long long refill_key(int64_t last_read, int slot) {
  return static_cast<unsigned long long>(max(last_read + 1, int64_t{0})) << 32 |
         static_cast<unsigned>(slot);
}

// grid B * Hkv, block kReuseThreads; p.c <= kReuseMaxSlots, p.e <= kReuseMaxEntries.
__global__ void __launch_bounds__(kReuseThreads) reuse_rows_kernel(ReuseParams p) {
  // step 3: the slots' refill keys, sorted; then key r the r-th miss's (position << 32) | slot
  __shared__ unsigned long long keys[kReuseMaxSlots];
  __shared__ int held[kReuseMaxSlots];   // the position each slot holds, -1 none
  __shared__ int pos[kReuseMaxEntries];  // the position of each entry, -1 none
  // per entry: -1 reads nothing; -2 - f: its row is entry f's; >= 0: its slot (kReuseMiss in
  // step 2 until a slot is chosen)
  __shared__ int ent[kReuseMaxEntries];
  __shared__ int warp_total[kReuseThreads / 32];
  const int bk = blockIdx.x, b = bk / p.hkv, kv = bk % p.hkv;
  const int32_t* ix = p.indices + b * p.ix_sb + static_cast<int64_t>(kv) * p.group * p.ix_sh;
  const int64_t pool = static_cast<int64_t>(bk) * p.c;  // the first slot of this block's pool
  auto index = [&](int g, int i) {  // head g of the group, entry i; -1 padding
    const int j = ix[g * p.ix_sh + i * p.ix_sn];
    return j >= 0 && j < p.s ? j : -1;
  };

  // 1. positions, and the pool's
  for (int c = threadIdx.x; c < p.c; c += kReuseThreads) held[c] = p.held[pool + c];
  for (int e = threadIdx.x; e < p.e; e += kReuseThreads) {
    int j = -1;
    if (p.group_select) {
      for (int g = 0; g < p.group; ++g) j = max(j, index(g, e));
    } else {
      j = index(e / p.n, e % p.n);
    }
    pos[e] = j;
  }
  __syncthreads();

  // 2. first entries and lookups (whole scans, no early exit: the loads pipeline), a contiguous
  // run of entries per thread
  const int run = (p.e + kReuseThreads - 1) / kReuseThreads;
  const int e0 = min(p.e, static_cast<int>(threadIdx.x) * run), e1 = min(p.e, e0 + run);
  int my_misses = 0, my_hits = 0;
  for (int e = e0; e < e1; ++e) {
    const int j = pos[e];
    int v = -1;
    if (j >= 0) {
      int f = e;  // the first entry of position j
      for (int x = e - 1; x >= 0; --x) f = pos[x] == j ? x : f;
      if (f < e) {
        v = -2 - f;
      } else {
        v = kReuseMiss;  // or the first slot holding j
        for (int c = p.c - 1; c >= 0; --c) v = held[c] == j ? c : v;
        ++(v == kReuseMiss ? my_misses : my_hits);
      }
    }
    ent[e] = v;
  }
  int totals;  // misses in the low 16 bits, hits above (each at most kReuseMaxEntries)
  const int before = block_scan<kReuseThreads>(my_misses | my_hits << 16, totals, warp_total);
  const int misses = totals & 0xffff, hits = totals >> 16;
  const int now = *p.step;

  // 3. the least recently used slots that this step does not read, for the misses
  unsigned fetched = 0;  // bit e - e0: entry e is read from v_host
  if (misses > 0) {
    const int size = bitonic_size(p.c);
    for (int c = threadIdx.x; c < size; c += kReuseThreads)
      keys[c] = c < p.c ? refill_key(p.used[pool + c], c) : ~0ull;
    __syncthreads();
    for (int e = e0; e < e1; ++e)
      if (ent[e] >= 0 && ent[e] != kReuseMiss) keys[ent[e]] = kReuseFoundKey | ent[e];
    __syncthreads();
    block_bitonic_sort<kReuseThreads, false>(keys, size);
    int r = before & 0xffff;  // this thread's first miss, in entry order
    for (int e = e0; e < e1; ++e) {
      if (ent[e] != kReuseMiss) continue;
      ent[e] = static_cast<int>(keys[r] & 0xffffffffu);
      keys[r++] = static_cast<unsigned long long>(pos[e]) << 32 | static_cast<unsigned>(ent[e]);
      fetched |= 1u << (e - e0);
    }
    __syncthreads();
  }

  // 4. the missed rows from host RAM; the slots' positions and last steps
  const int64_t total = static_cast<int64_t>(misses) * p.row_pieces;
  const char* src = p.v_host + b * p.v_sb + kv * p.v_sh;
  for (int64_t first = threadIdx.x; first < total; first += kReuseThreads * kReuseUnroll) {
    uint4 piece[kReuseUnroll];
    int64_t dst[kReuseUnroll];
#pragma unroll
    for (int u = 0; u < kReuseUnroll; ++u) {
      const int64_t q = first + u * kReuseThreads;
      if (q < total) {
        const int r = static_cast<int>(q / p.row_pieces), c = static_cast<int>(q % p.row_pieces);
        const unsigned long long miss = keys[r];  // (position << 32) | slot
        piece[u] = load16(src + static_cast<int64_t>(miss >> 32) * p.v_ss + c * 16);
        dst[u] = (pool + static_cast<int>(miss & 0xffffffffu)) * p.row_pieces + c;
      }
    }
#pragma unroll
    for (int u = 0; u < kReuseUnroll; ++u)
      if (first + u * kReuseThreads < total) p.rows[dst[u]] = piece[u];
  }
  const int new_pos = p.new_pos[b * p.new_pos_stride];
  for (int e = e0; e < e1; ++e) {
    if (ent[e] < 0) continue;  // padding, or a row another entry reads
    const bool kept = pos[e] != new_pos;  // the new token's slot serves this step only
    if (fetched >> (e - e0) & 1u) p.held[pool + ent[e]] = kept ? pos[e] : -1;
    p.used[pool + ent[e]] = kept ? now : -1;
  }

  // 5. every entry's slot
  int32_t* out = p.pool_indices + (static_cast<int64_t>(b) * p.hkv + kv) * p.group * p.n;
  for (int q = threadIdx.x; q < p.group * p.n; q += kReuseThreads) {
    const int g = q / p.n, i = q % p.n;
    const int e = p.group_select ? i : q;
    const int f = ent[e] <= -2 ? -2 - ent[e] : e;
    out[q] = index(g, i) < 0 ? -1 : ent[f];
  }
  if (threadIdx.x == 0) {
    p.counts[2 * static_cast<int64_t>(bk)] = misses + hits;
    p.counts[2 * static_cast<int64_t>(bk) + 1] = hits;
  }
}

}  // namespace kcache_ops
