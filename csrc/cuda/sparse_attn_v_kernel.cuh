// sparse_attn_v on the GPU: out[b, h] = sum_i p_i · V[b, h / G, idx_i], V read zero-copy from
// pinned, device-mapped host memory (bytes and design: bench/NOTES.md).
//
// One block per (KV head, slice of <= GS query heads of its group, sequence). The block first turns
// each head's N scores into softmax statistics (renormalize: max and sum over the valid entries;
// else the given lse). When every head of the slice has the same index row (group_select) each V
// row is read once over PCIe for all of them; otherwise each head reads its own rows. Each lane
// reads one 16-byte piece of a row, kLanesPerRow lanes cover a row, and each thread keeps kUnroll
// row loads in flight before it uses any. Partial sums are reduced across lanes and warps in a
// fixed order (deterministic) and only out [B, Hq, D] is written.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnUnroll = 8;     // independent 16-byte host loads in flight per thread

struct SparseAttnParams {
  const float* scores;             // [B, Hq, N] float32
  int64_t sc_sb, sc_sh, sc_sn;     // strides in elements
  const int32_t* indices;          // [B, Hq, N] int32, -1 (or anything outside [0, S)) is skipped
  int64_t ix_sb, ix_sh, ix_sn;     // strides in elements
  const void* v;                   // [B, Hkv, S, D] of T, device address of mapped host memory
  int64_t v_sb, v_sh, v_ss;        // strides in elements
  const float* lse;                // [B, Hq] float32, or nullptr when renormalize
  int64_t lse_sb, lse_sh;          // strides in elements
  void* out;                       // [B, Hq, D] of T, contiguous
  int hq, hkv, s, n, slices;
  bool renormalize;
};

// grid (Hkv * slices, B), block kAttnThreads.
template <typename T, int D, int GS>
__global__ void __launch_bounds__(kAttnThreads) sparse_attn_v_kernel(SparseAttnParams p) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kLanesPerRow = D / kVec;  // 8, 16 or 32
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;
  constexpr int kWarps = kAttnThreads / 32;
  constexpr int kRowsPerIter = kWarps * kRowsPerLoad * kAttnUnroll;
  static_assert(D % kVec == 0 && 32 % kLanesPerRow == 0, "unsupported head dim");

  __shared__ float stat_bias[GS];   // p = exp(s - bias) * mult
  __shared__ float stat_mult[GS];
  __shared__ float red[kWarps];
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
    if (threadIdx.x == 0) {
      stat_bias[h] = bias;
      stat_mult[h] = mult;
    }
  }
  // Do all heads of the slice share their index rows (group_select)?
  bool same = true;
  for (int i = threadIdx.x; i < p.n; i += kAttnThreads) {
    const int j0 = ix[i * p.ix_sn];
    for (int h = 1; h < gs; ++h) same = same && ix[h * p.ix_sh + i * p.ix_sn] == j0;
  }
  const bool shared_rows = __syncthreads_and(same);  // also publishes stat_bias / stat_mult

  const int sub = lane % kLanesPerRow;  // which 16-byte piece of a row
  const int rslot = lane / kLanesPerRow;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh + sub * kVec;
  float acc[GS][kVec];
#pragma unroll
  for (int h = 0; h < GS; ++h) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[h][e] = 0.0f;
  }

  // Pass over the rows of head `src` (relative to h0), adding them to heads [lo, hi).
  const int passes = shared_rows ? 1 : gs;
  for (int pass = 0; pass < passes; ++pass) {
    const int src = shared_rows ? 0 : pass;
    const int lo = shared_rows ? 0 : pass, hi = shared_rows ? gs : pass + 1;
    for (int base = 0; base < p.n; base += kRowsPerIter) {
      uint4 raw[kAttnUnroll];
#pragma unroll
      for (int u = 0; u < kAttnUnroll; ++u) {
        const int i = base + (warp * kAttnUnroll + u) * kRowsPerLoad + rslot;
        raw[u] = make_uint4(0, 0, 0, 0);
        if (i < p.n && valid_index(src, i))
          raw[u] = load16(vb + static_cast<int64_t>(ix[src * p.ix_sh + i * p.ix_sn]) * p.v_ss);
      }
#pragma unroll
      for (int u = 0; u < kAttnUnroll; ++u) {
        const int i = base + (warp * kAttnUnroll + u) * kRowsPerLoad + rslot;
        if (i < p.n && valid_index(src, i)) {
          float vf[kVec];
          Vec16<T>::to_float(raw[u], vf);
#pragma unroll
          for (int h = 0; h < GS; ++h) {
            if (h >= lo && h < hi) {
              const float sv = sc[h * p.sc_sh + i * p.sc_sn];
              const float w = sv == -INFINITY ? 0.0f : expf(sv - stat_bias[h]) * stat_mult[h];
#pragma unroll
              for (int e = 0; e < kVec; ++e) acc[h][e] = fmaf(w, vf[e], acc[h][e]);
            }
          }
        }
      }
    }
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
    out[t] = Vec16<T>::from(sum);
  }
}

}  // namespace kcache_ops
