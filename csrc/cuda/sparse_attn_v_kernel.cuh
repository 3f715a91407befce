// sparse_attn_v on the GPU: out[b, h] = sum_i p_i · V[b, h / G, idx_i], V read zero-copy from
// pinned, device-mapped host memory (bytes and design: bench/NOTES.md), plus the mean tail
// c_h · (v_sum[b, h / G] - sum_valid V[b, h / G, idx_i]) when v_sum is given.
//
// One block per (KV head, slice of <= GS query heads of its group, sequence). The block first turns
// each head's N scores into softmax statistics (renormalize: max and sum over the valid entries;
// else the given lse) and, with the tail, its factor c_h = max(0, 1 - sum_i p_i) / (L_b - n_h)
// (0 when L_b <= n_h, n_h the valid entries). The tail is folded into the row weights: each valid
// row of head h weighs p_i - c_h and c_h · v_sum is added at the end, so the unweighted sum of the
// selected rows comes from the same reads (no second pass over host memory). The rows to read form
// one list: when every head of the slice has the same index row (group_select) the N rows, each
// weighted for all heads; otherwise the gs · N rows of the heads one after another, each weighted
// for its own head. The list is read in tiles of kAttnTile rows: the block stages each tile's row
// numbers and per-head weights (exp once per head and entry) in shared memory, then every thread
// issues its kAttnUnroll 16-byte row loads (32 KiB per block in flight) before it uses any, so all
// heads of a slice share one pipelined pass. kLanesPerRow lanes cover a row. Partial sums are reduced across lanes and warps in a fixed order
// (deterministic) and only out [B, Hq, D] is written.
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
  void* out;                       // [B, Hq, D] of T, contiguous
  int hq, hkv, s, n, slices;
  bool renormalize;
};

// Rows of the list one block iteration reads (each thread one 16-byte piece of kAttnUnroll rows).
template <typename T, int D>
constexpr int attn_tile_rows() {
  return (kAttnThreads / 32) * (32 / (D / Vec16<T>::kElems)) * kAttnUnroll;
}

// One tile of the row list in shared memory: row numbers (-1: skipped), the reading head and each
// head's weight.
template <int GS, int kTile>
struct AttnTile {
  int row[kTile];           // V row index, -1 for padding / out of range
  int head[kTile];          // the one head that reads the row, -1 when all heads do (shared rows)
  float weight[GS][kTile];  // p of head h for this row, 0 where the head does not read it
};

// grid (Hkv * slices, B), block kAttnThreads.
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
  __shared__ float red[kWarps];
  __shared__ float red_count[kWarps];
  __shared__ AttnTile<GS, kTile> tile;
  __shared__ float partial[kWarps][GS][D];

  const int b = blockIdx.y;
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

  // Softmax statistics per head.
  for (int h = 0; h < gs; ++h) {
    float bias, mult;
    if (p.renormalize) {
      float m = -INFINITY;
      for (int i = threadIdx.x; i < p.n; i += kAttnThreads)
        if (valid_index(h, i)) m = fmaxf(m, sc[h * p.sc_sh + i * p.sc_sn]);
      m = warp_max(m);
      if (lane == 0) red[warp] = m;
      __syncthreads();
      m = red[0];
      for (int w = 1; w < kWarps; ++w) m = fmaxf(m, red[w]);
      __syncthreads();
      float l = 0.0f;
      if (m != -INFINITY) {
        for (int i = threadIdx.x; i < p.n; i += kAttnThreads)
          if (valid_index(h, i)) l += expf(sc[h * p.sc_sh + i * p.sc_sn] - m);
      }
      l = warp_sum(l);
      if (lane == 0) red[warp] = l;
      __syncthreads();
      l = red[0];
      for (int w = 1; w < kWarps; ++w) l += red[w];
      __syncthreads();
      bias = m;
      mult = m == -INFINITY ? 0.0f : 1.0f / l;  // no valid entry: zeros
    } else {
      bias = p.lse[b * p.lse_sb + (h0 + h) * p.lse_sh];
      mult = 1.0f;
    }
    float tail = 0.0f;
    if (p.v_sum != nullptr) {  // renormalize is false: weights exp(s - lse)
      float mass = 0.0f, count = 0.0f;  // sum_i p_i and n_h (exact in float for n < 2^24)
      for (int i = threadIdx.x; i < p.n; i += kAttnThreads) {
        if (!valid_index(h, i)) continue;
        count += 1.0f;
        const float sv = sc[h * p.sc_sh + i * p.sc_sn];
        if (sv != -INFINITY) mass += expf(sv - bias);
      }
      mass = warp_sum(mass);
      count = warp_sum(count);
      if (lane == 0) {
        red[warp] = mass;
        red_count[warp] = count;
      }
      __syncthreads();
      mass = red[0];
      count = red_count[0];
      for (int w = 1; w < kWarps; ++w) {
        mass += red[w];
        count += red_count[w];
      }
      __syncthreads();
      const int len = min(max(p.seq_lens[b * p.seq_stride], 0), p.s);  // L_b clamped to [0, S]
      const int rest = len - static_cast<int>(count);                   // rows not selected
      tail = rest > 0 ? fmaxf(0.0f, 1.0f - mass) / static_cast<float>(rest) : 0.0f;
    }
    if (threadIdx.x == 0) {
      stat_bias[h] = bias;
      stat_mult[h] = mult;
      stat_tail[h] = tail;
    }
  }
  // Do all heads of the slice share their index rows (group_select)?
  bool same = true;
  for (int i = threadIdx.x; i < p.n; i += kAttnThreads) {
    const int j0 = ix[i * p.ix_sn];
    for (int h = 1; h < gs; ++h) same = same && ix[h * p.ix_sh + i * p.ix_sn] == j0;
  }
  const bool shared_rows = __syncthreads_and(same);  // also publishes stat_bias / _mult / _tail

  // Weight of head h for entry i of its selection: 0 for padding and out-of-range rows; else
  // p_i - c_h, p_i = 0 for a -inf score.
  auto weight = [&](int h, int i) {
    if (!valid_index(h, i)) return 0.0f;
    const float sv = sc[h * p.sc_sh + i * p.sc_sn];
    return (sv == -INFINITY ? 0.0f : expf(sv - stat_bias[h]) * stat_mult[h]) - stat_tail[h];
  };
  // Entry e of the row list: shared rows: entry e of every head; else entry e % n of head e / n.
  auto stage_entry = [&](int t, int e) {
    const int src = shared_rows ? 0 : e / p.n, i = shared_rows ? e : e % p.n;
    tile.row[t] = valid_index(src, i) ? ix[src * p.ix_sh + i * p.ix_sn] : -1;
    tile.head[t] = shared_rows ? -1 : src;
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

  const int entries = shared_rows ? p.n : gs * p.n;  // length of the row list
  for (int base = 0; base < entries; base += kTile) {  // block-uniform loop
    for (int t = threadIdx.x; t < kTile; t += kAttnThreads) {
      if (base + t < entries) {
        stage_entry(t, base + t);
      } else {
        tile.row[t] = -1;
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
      if (tile.row[t] >= 0) {
        float vf[kVec];
        Vec16<T>::to_float(raw[u], vf);
        const int only = tile.head[t];
#pragma unroll
        for (int h = 0; h < GS; ++h) {
          if (only < 0 || only == h) {  // a head never touches another head's rows (inf · 0)
            const float w = tile.weight[h][t];
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[h][e] = fmaf(w, vf[e], acc[h][e]);
          }
        }
      }
    }
    __syncthreads();  // the tile is restaged in the next iteration
  }

  // Sum the row slots of each warp (lanes with the same `sub`), then the warps in order.
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
      for (int e = 0; e < kVec; ++e) partial[warp][h][sub * kVec + e] = acc[h][e];
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.hq + h0) * D;  // [gs, D]
  for (int t = threadIdx.x; t < gs * D; t += kAttnThreads) {
    float sum = partial[0][t / D][t % D];
    for (int w = 1; w < kWarps; ++w) sum += partial[w][t / D][t % D];
    const float tail = stat_tail[t / D];  // nonzero only with v_sum
    if (tail != 0.0f) sum = fmaf(tail, p.v_sum[b * p.vs_sb + kvh * p.vs_sh + t % D], sum);
    out[t] = Vec16<T>::from(sum);
  }
}

}  // namespace kcache_ops
