// sparse_attn_v on the GPU: out[b, h] = sum_i p_i · V[b, h / G, idx_i], V read zero-copy from
// pinned, device-mapped host memory (bytes and design: bench/NOTES.md), plus the mean tail
// c_h · (v_sum[b, h / G] - sum_valid V[b, h / G, idx_i]) when v_sum is given.
//
// One block per (KV head, slice of <= GS query heads of its group, sequence, part of the row list
// below: one part, unless the slices alone leave most multiprocessors idle reading host memory
// and the read is spread, KCACHE_OPS_HOST_READ_SPREAD=1, sparse_attn_v_launch.h). The block
// first turns each head's N scores into softmax statistics, one warp per head and all heads at
// once (renormalize: max and sum over the valid entries; else the given lse) and, with the tail,
// its factor c_h = max(0, 1 - sum_i p_i) / (L_b - n_h) (0 when L_b <= n_h, n_h the valid
// entries).
// The tail is folded into the row weights: each valid row of head h weighs p_i - c_h and
// c_h · v_sum is added at the end, so the unweighted sum of the selected rows comes from the same
// reads (no second pass over host memory).
//
// The rows to read form one list, each row with the heads that read it (a bit mask) and their
// weights:
//   * group_select (all heads of the slice have the same index row): the N rows, for all heads;
//   * per head, gs > 1 and gs · N <= kAttnUnionCap: the distinct rows of the slice's gs index rows
//     in ascending order, each read once for the heads that chose it (heads of a group often choose
//     the same rows: bench/NOTES.md). The valid entries are sorted as keys row << 32 | head << 16 |
//     entry in shared memory (bitonic), the first entry of each row's run numbered by a block scan;
//     a head's weight for a row sums its entries that chose it;
//   * otherwise the gs · N rows of the heads one after another, each for its own head.
// A head only ever accumulates rows whose bit it holds: a row another head chose is never
// multiplied by a 0 weight (inf · 0 = NaN). A NaN weight counts 0, as in the reference.
// The list is read in tiles of attn_tile_rows() rows: the block stages each tile's row numbers,
// masks and per-head weights (exp once per head and entry) in shared memory, then every thread
// issues its kAttnUnroll 16-byte row loads (32 KiB per block in flight) before it uses any, so all
// heads of a slice share one pipelined pass. kLanesPerRow lanes cover a row. Each thread
// accumulates its rows in list order and the partial sums are reduced across lanes and warps in a
// fixed order (deterministic, no atomics); only out [B, Hq, D] is written. With several parts,
// block p reads the list's entries [p · E / parts, (p + 1) · E / parts) of its E and writes its
// sums to partials [B, Hq, parts, D] float32 instead (part 0 with the mean tail's c_h · v_sum),
// which sum_partials_kernel adds in part order into out. The parts set the order of the sums, so
// where the host read is spread (KCACHE_OPS_HOST_READ_SPREAD=1; by default one part) the
// output's last bits depend on the device's multiprocessor count and on B (for one shape on one
// device they are the same in every call).
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnUnroll = 16;    // independent 16-byte host loads in flight per thread (32 KiB
                                   // per block)

struct SparseAttnParams {
  const float* scores;             // [B, Hq, N] float32
  int64_t sc_sb, sc_sh, sc_sn;     // strides in elements
  const int32_t* indices;          // [B, Hq, N] int32, -1 (or anything outside [0, S)) is skipped
  int64_t ix_sb, ix_sh, ix_sn;     // strides in elements
  const void* v;                   // [B, Hkv, S, D] of T, device address of mapped host memory
  int64_t v_sb, v_sh, v_ss;        // strides in elements
  const float* lse;                // [B, Hq] float32, or nullptr when renormalize
  int64_t lse_sb, lse_sh;          // strides in elements
  const float* v_sum;              // [B, Hkv, D] float32 (last dim contiguous), or nullptr: no tail
  int64_t vs_sb, vs_sh;            // strides in elements
  const int32_t* seq_lens;         // [B] int32 with v_sum (clamped to [0, S] here), else nullptr
  int64_t seq_stride;              // stride in elements
  void* out;                       // [B, Hq, D] of T, contiguous (written when parts == 1)
  float* partials;                 // [B, Hq, parts, D] float32 (written when parts > 1)
  int hq, hkv, s, n, slices, parts;
  bool renormalize;
};

// Rows of the list one block iteration reads (each thread one 16-byte piece of kAttnUnroll rows).
template <typename T, int D>
constexpr int attn_tile_rows() {
  return (kAttnThreads / 32) * (32 / (D / Vec16<T>::kElems)) * kAttnUnroll;
}

// One tile of the row list in shared memory: row numbers (-1: skipped), the heads that read each
// row and their weights.
template <int GS, int kTile>
struct AttnTile {
  int row[kTile];           // V row index, -1 for padding / out of range
  unsigned mask[kTile];     // bit h: head h of the slice selected the row
  float weight[GS][kTile];  // weight of head h for this row, 0 where its bit is clear
};

// Most entries (gs · N) of a per-head slice whose distinct rows are found (24 KiB of shared
// memory); a larger slice reads each head's rows on their own.
constexpr int kAttnUnionCap = 2048;

// The union of the index rows of a per-head slice: each valid entry (head h, entry i choosing row
// j) as the key j << 32 | h << 16 | i, sorted ascending, so that the entries of a row form one run
// (its heads in order); the runs are numbered in row order.
struct RowUnion {
  unsigned long long key[kAttnUnionCap];  // [sort size], kNoKey past the valid entries
  int start[kAttnUnionCap + 1];           // [distinct + 1]: run d is key[start[d], start[d + 1])
};

constexpr unsigned long long kNoKey = ~0ull;  // sorts after every valid key (rows are < 2^31)

// An entry's weight p_i as the reference's nan_to_num(0) takes it: a NaN weight (a NaN score or
// lse, or a softmax over a NaN or +inf score) counts 0, +inf the largest float.
__device__ __forceinline__ float reference_weight(float p) {
  return isnan(p) ? 0.0f : fminf(p, FLT_MAX);
}

__device__ __forceinline__ unsigned long long union_key(int row, int h, int i) {
  return static_cast<unsigned long long>(row) << 32 | static_cast<unsigned>(h) << 16 |
         static_cast<unsigned>(i);
}
__device__ __forceinline__ unsigned key_row(unsigned long long k) {
  return static_cast<unsigned>(k >> 32);
}
__device__ __forceinline__ int key_head(unsigned long long k) { return (k >> 16) & 0xffff; }
__device__ __forceinline__ int key_entry(unsigned long long k) { return k & 0xffff; }

// The union (before the row loop) and each warp's partial sums (after it) share their memory.
template <int GS, int D>
union AttnScratch {
  RowUnion rows;
  float partial[kAttnThreads / 32][GS][D];
};

// Builds u from the index rows of a slice's gs heads (entry i of head h: ix[h · ix_sh + i · ix_sn],
// skipped outside [0, s)), gs · n <= kAttnUnionCap; returns the number of distinct rows. Every
// thread must call it; ends with a barrier.
__device__ __forceinline__ int build_row_union(const int32_t* ix, int64_t ix_sh, int64_t ix_sn,
                                               int gs, int n, int s, RowUnion& u,
                                               int* warp_total) {
  const int entries = gs * n;
  const int size = bitonic_size(entries);
  for (int e = threadIdx.x; e < size; e += kAttnThreads) {
    unsigned long long k = kNoKey;
    if (e < entries) {
      const int h = e / n, i = e % n;
      const int j = ix[h * ix_sh + i * ix_sn];
      if (j >= 0 && j < s) k = union_key(j, h, i);
    }
    u.key[e] = k;
  }
  __syncthreads();
  block_bitonic_sort<kAttnThreads, false>(u.key, size);  // ascending
  // The first key of each run starts a distinct row: count them over contiguous pieces of the
  // sorted keys, number them by a scan, record where each starts.
  auto first_of_run = [&](int k) {
    return u.key[k] != kNoKey && (k == 0 || key_row(u.key[k]) != key_row(u.key[k - 1]));
  };
  const int per = ceil_div(size, kAttnThreads);
  const int lo = min(static_cast<int>(threadIdx.x) * per, size), hi = min(lo + per, size);
  int mine = 0;
  for (int k = lo; k < hi; ++k) mine += first_of_run(k);
  int distinct;
  __syncwarp();  // every lane scans: spares the scan's shuffles their WARPSYNC.COLLECTIVE copies
  int d = block_scan<kAttnThreads>(mine, distinct, warp_total);
  for (int k = lo; k < hi; ++k) {
    if (first_of_run(k)) u.start[d++] = k;
    if (u.key[k] != kNoKey && (k + 1 == size || u.key[k + 1] == kNoKey))
      u.start[distinct] = k + 1;  // the end of the last run
  }
  __syncthreads();
  return distinct;
}

// grid (Hkv * slices, B, parts), block kAttnThreads.
template <typename T, int D, int GS>
__global__ void __launch_bounds__(kAttnThreads) sparse_attn_v_kernel(SparseAttnParams p) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kLanesPerRow = D / kVec;  // 8, 16 or 32
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;
  constexpr int kWarps = kAttnThreads / 32;
  constexpr int kTile = attn_tile_rows<T, D>();
  static_assert(D % kVec == 0 && 32 % kLanesPerRow == 0, "unsupported head dim");

  __shared__ float stat_bias[GS];   // p = exp(s - bias) * mult
  __shared__ float stat_mult[GS];
  __shared__ float stat_tail[GS];   // the mean tail's c_h, 0 without a tail
  __shared__ int warp_total[kWarps];
  __shared__ AttnTile<GS, kTile> tile;
  __shared__ AttnScratch<GS, D> scratch;  // the row union, then the warps' partial sums

  const int b = blockIdx.y;
  const int part = blockIdx.z;
  const int kvh = blockIdx.x / p.slices;
  const int G = p.hq / p.hkv;
  const int h0 = kvh * G + (blockIdx.x % p.slices) * GS;  // first query head of this block
  const int gs = min(GS, kvh * G + G - h0);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  const float* sc = p.scores + b * p.sc_sb + h0 * p.sc_sh;   // head h, entry i: h*sc_sh + i*sc_sn
  const int32_t* ix = p.indices + b * p.ix_sb + h0 * p.ix_sh;
  auto valid_index = [&](int h, int i) {
    const int j = ix[h * p.ix_sh + i * p.ix_sn];
    return j >= 0 && j < p.s;
  };

  // Entry i of head h: its score, and whether its row is valid; both loads are made whatever the
  // index (a padding entry has a score too), so a lane's loads of several entries overlap.
  auto entry = [&](int h, int i, bool& valid) {
    valid = valid_index(h, i);
    return sc[h * p.sc_sh + i * p.sc_sn];
  };
  // L_b clamped to [0, S], for the mean tail
  const int len = p.v_sum != nullptr ? clamped_len(p.seq_lens, p.seq_stride, b, p.s) : 0;

  // Softmax statistics, one warp per head (heads warp, warp + kWarps, ...), all heads at once:
  // lane-strided passes over the head's N entries and warp reductions, no block barrier (the
  // __syncthreads_and below publishes them). The __syncwarp states what ptxas cannot see (h is
  // the same in all lanes of a warp): without it every shuffle below gets a divergence test and a
  // WARPSYNC.COLLECTIVE copy (bench/NOTES.md).
  for (int h = warp; h < gs; h += kWarps) {
    __syncwarp();
    float bias, mult;
    if (p.renormalize) {
      float m = -INFINITY;
      for (int i = lane; i < p.n; i += 32) {
        bool valid;
        const float sv = entry(h, i, valid);
        m = valid ? fmaxf(m, sv) : m;
      }
      m = warp_max(m);
      float l = 0.0f;
      if (m != -INFINITY) {
        for (int i = lane; i < p.n; i += 32) {
          bool valid;
          const float sv = entry(h, i, valid);
          l += valid ? expf(sv - m) : 0.0f;
        }
      }
      l = warp_sum(l);
      bias = m;
      mult = m == -INFINITY ? 0.0f : 1.0f / l;  // no valid entry: zeros
    } else {
      bias = p.lse[b * p.lse_sb + (h0 + h) * p.lse_sh];
      mult = 1.0f;
    }
    float tail = 0.0f;
    if (p.v_sum != nullptr) {  // renormalize is false: weights exp(s - lse)
      float mass = 0.0f, count = 0.0f;  // sum_i p_i and n_h (exact in float for n < 2^24)
      for (int i = lane; i < p.n; i += 32) {
        bool valid;
        const float sv = entry(h, i, valid);
        count += valid ? 1.0f : 0.0f;
        mass += valid && sv != -INFINITY ? reference_weight(expf(sv - bias)) : 0.0f;
      }
      mass = warp_sum(mass);
      count = warp_sum(count);
      const int rest = len - static_cast<int>(count);                   // rows not selected
      tail = rest > 0 ? fmaxf(0.0f, 1.0f - mass) / static_cast<float>(rest) : 0.0f;
    }
    if (lane == 0) {
      stat_bias[h] = bias;
      stat_mult[h] = mult;
      stat_tail[h] = tail;
    }
  }
  // Do all heads of the slice share their index rows (group_select)?
  bool same = true;
  for (int i = threadIdx.x; i < p.n; i += kAttnThreads) {
    const int j0 = ix[i * p.ix_sn];
    for (int h = 1; h < gs; ++h) same &= ix[h * p.ix_sh + i * p.ix_sn] == j0;  // loads overlap
  }
  const bool shared_rows = __syncthreads_and(same);  // also publishes stat_bias / _mult / _tail

  // Per head: the distinct rows of the slice, each read once for the heads that chose it, when
  // the union fits in shared memory (a single head has no other head's rows to share).
  const bool row_union = !shared_rows && gs > 1 && p.n <= kAttnUnionCap / gs;
  const int distinct =
      row_union ? build_row_union(ix, p.ix_sh, p.ix_sn, gs, p.n, p.s, scratch.rows, warp_total) : 0;

  // Weight of head h for entry i of its selection: 0 for padding and out-of-range rows; else
  // p_i - c_h, p_i = 0 for a -inf score.
  auto weight = [&](int h, int i) {
    bool valid;
    const float sv = entry(h, i, valid);
    if (!valid) return 0.0f;
    const float pv = sv == -INFINITY ? 0.0f : expf(sv - stat_bias[h]) * stat_mult[h];
    return reference_weight(pv) - stat_tail[h];
  };
  // Entry e of the row list into tile slot t. Shared rows: entry e of every head. Row union: the
  // e-th distinct row, weighted for each head by the sum over its entries that chose the row (in
  // entry order). Else: entry e % n of head e / n, for that head alone.
  auto stage_entry = [&](int t, int e) {
    if (row_union) {
      const RowUnion& u = scratch.rows;
#pragma unroll
      for (int h = 0; h < GS; ++h) tile.weight[h][t] = 0.0f;
      unsigned mask = 0;
      for (int k = u.start[e]; k < u.start[e + 1]; ++k) {  // the run of keys of this row
        const int h = key_head(u.key[k]);
        mask |= 1u << h;
        tile.weight[h][t] += weight(h, key_entry(u.key[k]));
      }
      tile.row[t] = key_row(u.key[u.start[e]]);
      tile.mask[t] = mask;
      return;
    }
    const int src = shared_rows ? 0 : e / p.n, i = shared_rows ? e : e % p.n;
    const bool valid = valid_index(src, i);
    tile.row[t] = valid ? ix[src * p.ix_sh + i * p.ix_sn] : -1;
    tile.mask[t] = !valid ? 0u : shared_rows ? (1u << gs) - 1 : 1u << src;
#pragma unroll
    for (int h = 0; h < GS; ++h) {
      const bool reads = h < gs && (shared_rows || h == src);
      tile.weight[h][t] = reads ? weight(h, i) : 0.0f;
    }
  };

  const int sub = lane % kLanesPerRow;  // which 16-byte piece of a row
  const int rslot = lane / kLanesPerRow;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh + sub * kVec;
  float acc[GS][kVec];
#pragma unroll
  for (int h = 0; h < GS; ++h) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[h][e] = 0.0f;
  }

  const int entries = shared_rows ? p.n : row_union ? distinct : gs * p.n;  // the row list
  const int first = static_cast<int>(int64_t{entries} * part / p.parts);  // this block's part
  const int end = static_cast<int>(int64_t{entries} * (part + 1) / p.parts);
  for (int base = first; base < end; base += kTile) {  // block-uniform loop
    for (int t = threadIdx.x; t < kTile; t += kAttnThreads) {
      if (base + t < end) {
        stage_entry(t, base + t);
      } else {
        tile.row[t] = -1;
        tile.mask[t] = 0;
      }
    }
    __syncthreads();
    uint4 raw[kAttnUnroll];
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      const int j = tile.row[(warp * kAttnUnroll + u) * kRowsPerLoad + rslot];
      raw[u] = j >= 0 ? load16(vb + static_cast<int64_t>(j) * p.v_ss) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      const int t = (warp * kAttnUnroll + u) * kRowsPerLoad + rslot;
      const unsigned mask = tile.mask[t];  // 0 for a skipped row
      // (Without this outer test ptxas if-converts the head tests and sinks each fp32 load next
      // to its first use: one load in flight instead of kAttnUnroll.)
      if (mask != 0) {
        float vf[kVec];
        Vec16<T>::to_float(raw[u], vf);
#pragma unroll
        for (int h = 0; h < GS; ++h) {
          if (mask >> h & 1u) {  // a head never touches another head's rows (inf · 0)
            const float w = tile.weight[h][t];
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[h][e] = fmaf(w, vf[e], acc[h][e]);
          }
        }
      }
    }
    __syncthreads();  // the tile is restaged in the next iteration
  }

  // Sum the row slots of each warp (lanes with the same `sub`), then the warps in order. Every
  // lane ends the tile loop (its bound is block-uniform, which ptxas cannot see): the __syncwarp
  // spares the GS · kVec · log2(32 / kLanesPerRow) shuffles their WARPSYNC.COLLECTIVE copies.
  __syncwarp();
#pragma unroll
  for (int h = 0; h < GS; ++h) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
#pragma unroll
      for (int off = kLanesPerRow; off < 32; off <<= 1)
        acc[h][e] += __shfl_xor_sync(kFullMask, acc[h][e], off);
    }
  }
  if (rslot == 0) {
#pragma unroll
    for (int h = 0; h < GS; ++h) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) scratch.partial[warp][h][sub * kVec + e] = acc[h][e];
    }
  }
  __syncthreads();
  const int64_t row0 = static_cast<int64_t>(b) * p.hq + h0;  // [B, Hq] row of the first head
  T* out = static_cast<T*>(p.out) + row0 * D;                 // [gs, D]
  // [gs, D] at head stride parts · D, in partials [B, Hq, parts, D] (none with one part)
  float* partial = p.parts > 1 ? p.partials + (row0 * p.parts + part) * D : nullptr;
  for (int t = threadIdx.x; t < gs * D; t += kAttnThreads) {
    float sum = scratch.partial[0][t / D][t % D];
    for (int w = 1; w < kWarps; ++w) sum += scratch.partial[w][t / D][t % D];
    const float tail = part == 0 ? stat_tail[t / D] : 0.0f;  // nonzero only with v_sum
    if (tail != 0.0f) sum = fmaf(tail, p.v_sum[b * p.vs_sb + kvh * p.vs_sh + t % D], sum);
    if (p.parts == 1) {
      out[t] = Vec16<T>::from(sum);
    } else {
      partial[static_cast<int64_t>(t / D) * p.parts * D + t % D] = sum;
    }
  }
}

}  // namespace kcache_ops
