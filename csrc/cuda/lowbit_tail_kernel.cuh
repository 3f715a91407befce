// lowbit_tail on the GPU: out[b, h] = sum over skip_first <= j < L_b - skip_last not selected by
// head h of exp(s_hj - lse_h) · dequant(v)[b, h / G, j], over the low-bit copy of V in device
// memory and the scores qk_topn computed (its score scratch: K is not read again; bytes and
// design: bench/NOTES.md).
//
// 1. lowbit_tail_kernel — one block per (chunk of keys, KV head, slice of <= GS query heads of its
//    group, sequence), the chunks sized to whole waves (lowbit_tail_launch.h). The block first
//    marks the keys of its chunk that each head leaves out in a bitmap in shared memory (one bit
//    per key and head: the skipped first and last keys, then the heads' index rows with integer
//    atomicOr, so the bits do not depend on the order; indices outside the chunk, and so outside
//    [0, L_b), change nothing). Then
//    D / kTailVec lanes share a key, each holding kTailVec codes of its row (one aligned 4-byte
//    word of the code row); the scores of a few keys are spread over the key's lanes so that each
//    lane loads one (key, head) score, the bits qk_topn ranked by, and the row's (scale, min) word,
//    and computes that pair's weight w = exp(s - lse) (one bitmap test and one exp). A row's
//    dequantized value is min + scale · code, so w · row = (w · scale) · code + w · min: the
//    weighing lane adds w · min to its head's sum of mins once per key, and the key's lanes take
//    the heads' w · scale by shuffles and multiply them by the codes themselves (no dequantized row
//    is formed: D FMAs per key fewer). Code words, meta words and scores are staged in shared
//    memory by asynchronous copies kTailStages - 1 iterations ahead. A head that selected the key
//    weighs it 0: a selected key is left out exactly, never added and subtracted. The lanes and
//    warps are summed in a fixed order into the chunk's partial [gs, D], each head's sum of mins
//    added to every element of its row.
// 2. lowbit_tail_reduce_kernel — sums each head's chunk partials in chunk order into out. With a
//    single chunk the launcher skips it: kernel 1 writes out itself.
// The weights need no running max: lse is given and every weight is at most 1 up to rounding. A
// NaN weight (a NaN score or lse, or L_b = 0) counts 0, as the reference's nan_to_num. Entries
// j >= L_b of the scores, codes and meta are never read. Deterministic: no float atomics.
#pragma once

#include <cfloat>
#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kTailThreads = 128;      // 4 warps
constexpr int kTailVec = 8;            // elements of a row per lane: 2 or 4 bytes of codes
constexpr int kTailUnroll = 8;         // keys per lane and iteration
constexpr int kTailStages = 3;         // iterations staged in shared memory (2 in flight)
constexpr int kTailBlocksPerSm = 3;    // launch bounds: registers for 3 blocks (12 warps) per SM
constexpr int kTailMaxChunk = 4096;    // keys per block at most: the bitmap is GS · 512 bytes
constexpr int kTailChunkStep = 256;    // chunks are multiples of it (and of every keys-per-iter)
constexpr int kTailReduceThreads = 256;

struct LowbitTailParams {
  const float* scores;           // [B, Hq, S] float32; entries j >= L_b never read
  int64_t s_sb, s_sh, s_ss;      // strides in elements
  const int32_t* seq_lens;       // [B], clamped to [0, S]
  int64_t seq_stride;            // in elements
  const uint8_t* codes;          // [B, Hkv, S, D * bits / 8] uint8, rows 16-byte aligned
  int64_t c_sb, c_sh, c_ss;      // strides in bytes
  const uint32_t* meta;          // [B, Hkv, S] (scale, min) bfloat16 pairs, one 4-byte word each
  int64_t m_sb, m_sh, m_ss;      // strides in words
  const float* lse;              // [B, Hq] float32
  int64_t lse_sb, lse_sh;        // strides in elements
  const int32_t* indices;        // [B, Hq, N] int32; outside [0, L_b) ignored
  int64_t ix_sb, ix_sh, ix_sn;   // strides in elements
  int skip_first, skip_last;     // left out as if selected: j < skip_first, j >= L_b - skip_last
  float* partials;               // [B, Hq, num_chunks, D] float32 (out when num_chunks == 1)
  int hq, hkv, s, n, chunk, num_chunks, slices, bits;
};

// Keys of one block-iteration of lowbit_tail_kernel for head dim D.
template <int D>
constexpr int tail_keys_per_iter() {
  return (kTailThreads / 32) * (32 / (D / kTailVec)) * kTailUnroll;
}

// Bits 0 .. n - 1 of a word set (none for n <= 0, all for n >= 32).
__device__ __forceinline__ uint32_t low_bits(int n) {
  return n >= 32 ? ~0u : (n <= 0 ? 0u : (1u << n) - 1u);
}

// The staged rows of a block: per stage, thread and row u of its iteration, the aligned 4-byte word
// of the code row that holds its codes; per group g of keys (g < the iteration's groups), the
// score of the (key, head) whose weight the thread computes and that key's (scale, min) word. Each
// thread copies and reads back only its own slots.
struct TailStage {
  uint32_t code[kTailStages][kTailUnroll][kTailThreads];
  uint32_t meta[kTailStages][kTailUnroll][kTailThreads];
  float score[kTailStages][kTailUnroll][kTailThreads];
};

// Shared memory of a tail block: the stages during the key loop, the warps' sums after it.
template <int GS, int D>
union TailShared {
  TailStage stage;
  float partial[kTailThreads / 32][GS][D];  // [warp, head, D]
};

// Starts the asynchronous copies of one iteration into stage `slot`: row u (key j0 + u ·
// keys_per_load) its code word at crow + u · c_step bytes; group g (of `groups`) the score of key
// j0 + u_g · keys_per_load, u_g = g · joint + my_joint, at srow + key · s_ss and its meta word at
// mrow + u_g · m_step, where this thread weighs a head (has_head). A key at or past `end` is not
// copied (its slots keep older values; the loop gives it no weight).
__device__ __forceinline__ void stage_tail_rows(TailStage& st, int slot, const uint8_t* crow,
                                                int64_t c_step, const uint32_t* mrow,
                                                int64_t m_step, const float* srow, int64_t s_ss,
                                                int j0, int keys_per_load, int end, int groups,
                                                int joint, int my_joint, bool has_head) {
#pragma unroll
  for (int u = 0; u < kTailUnroll; ++u) {
    if (j0 + u * keys_per_load < end)
      __pipeline_memcpy_async(&st.code[slot][u][threadIdx.x], crow + u * c_step, 4);
  }
  for (int g = 0; g < groups; ++g) {
    const int u = g * joint + my_joint;
    const int j = j0 + u * keys_per_load;
    if (has_head && j < end) {
      __pipeline_memcpy_async(&st.score[slot][g][threadIdx.x], srow + j * s_ss, 4);
      __pipeline_memcpy_async(&st.meta[slot][g][threadIdx.x], mrow + u * m_step, 4);
    }
  }
}

// A lane's kTailVec codes as floats without a shift or an integer to float conversion (which
// issues at 1/8 of an FFMA's rate). Once per row, exponent_bits sets the exponent field of the
// word that holds the codes, Bits wide from bit 0 (Bits = 4: codes 4..7 in the upper half,
// brought down first); then code e, at bit p < 16, masked in place together with the exponent, is
// the low part of the mantissa of 2^(23 - kTopBit) · (1 + code · 2^(p - 23)), and subtracting
// 2^(23 - kTopBit) leaves code · 2^(p - kTopBit) exactly: one logic op and one add per code.
// kTopBit = 16 - Bits is the highest p; code_unit undoes the power of two on the sums at the end
// (exact, a power of two; only a product w · scale · code below 2^-112 rounds differently from
// one without it, as a subnormal).
template <int Bits>
struct TailCodes {
  static constexpr int kPerHalf = 16 / Bits;  // codes in 16 bits
  static constexpr int kTopBit = 16 - Bits;   // the position of the last of them
  static constexpr uint32_t kExponent = static_cast<uint32_t>(127 + 23 - kTopBit) << 23;
  static constexpr float kBase = static_cast<float>(1u << (23 - kTopBit));

  // The code word's halves (low, high) with the exponent field set to all ones.
  __device__ __forceinline__ static uint2 exponent_bits(uint32_t codes) {
    return make_uint2(codes | 0x7f800000u, (codes >> 16) | 0x7f800000u);
  }
  // code e · 2^(p - kTopBit) (Bits = 2 takes only the low half: the compiler drops the high one)
  __device__ __forceinline__ static float value(uint2 halves, int e) {
    const int p = Bits * (e % kPerHalf);
    const uint32_t half = e < kPerHalf ? halves.x : halves.y;
    return __uint_as_float(and_u32(half, kExponent | (((1u << Bits) - 1u) << p))) - kBase;
  }
  // 2^(kTopBit - p) of code e: value(e) · code_unit(e) is the code
  __host__ __device__ static constexpr float code_unit(int e) {
    return static_cast<float>(1u << (kTopBit - Bits * (e % kPerHalf)));
  }
};

// grid (num_chunks, Hkv * slices, B), block kTailThreads, kTailBlocksPerSm blocks per SM; Bits
// (2 or 4) is p.bits.
template <int D, int GS, int Bits>
__global__ void __launch_bounds__(kTailThreads, kTailBlocksPerSm)
    lowbit_tail_kernel(LowbitTailParams p) {
  constexpr int kLanesPerKey = D / kTailVec;  // 8 or 16 lanes share one key row
  constexpr int kKeysPerLoad = 32 / kLanesPerKey;
  constexpr int kWarps = kTailThreads / 32;
  constexpr int kWords = kTailMaxChunk / 32;
  // Keys (of this lane's kTailUnroll) whose weights are computed together: at most one
  // (key, head) pair per lane.
  constexpr int kJoint = kLanesPerKey / GS < kTailUnroll ? kLanesPerKey / GS : kTailUnroll;
  constexpr int kValues = kJoint * GS;          // [kJoint, GS] weights per group of keys
  constexpr int kDup = kLanesPerKey / kValues;  // lanes of a key computing the same weight
  constexpr int kGroups = kTailUnroll / kJoint;
  static_assert(D % kTailVec == 0 && 32 % kLanesPerKey == 0, "unsupported head dim");
  static_assert(kTailUnroll % kJoint == 0, "whole groups of keys");

  __shared__ uint32_t selected[GS][kWords];  // bit (j - chunk_begin): head h selected key j
  __shared__ TailShared<GS, D> sh;

  // sequence, KV head, first query head and query heads of this block, its keys
  const auto [b, kvh, h0, gs, chunk_begin, chunk_end] =
      chunk_block<GS>(p.seq_lens, p.seq_stride, p.hq, p.hkv, p.s, p.slices, p.chunk);
  const int words = (p.chunk + 31) / 32;

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int sub = lane % kLanesPerKey;  // which kTailVec elements of the row this lane holds
  const int kslot = lane / kLanesPerKey;
  const int key_lane0 = lane - sub;     // the first lane of this lane's key
  const int my_value = sub / kDup;      // the (key, head) whose weight this lane computes
  const int my_head = my_value % GS;
  const int my_joint = my_value / GS;   // which key of a group: u = g · kJoint + my_joint
  // the one lane of a (key, head) pair that adds its w · min (the others compute the same weight)
  const bool adds_min = sub % kDup == 0;

  // The selection bitmap of the chunk, starting from the skipped keys (set for every head).
  const int cold_end = max(0, clamped_len(p.seq_lens, p.seq_stride, b, p.s) - p.skip_last);
  for (int t = threadIdx.x; t < GS * words; t += kTailThreads) {
    const int key0 = chunk_begin + (t % words) * 32;  // the word's first key
    selected[t / words][t % words] = low_bits(p.skip_first - key0) | ~low_bits(cold_end - key0);
  }
  __syncthreads();
  const int32_t* ix = p.indices + b * p.ix_sb + h0 * p.ix_sh;  // head h, entry i: h*ix_sh + i*ix_sn
  for (int t = threadIdx.x; t < gs * p.n; t += kTailThreads) {
    const int h = t / p.n, i = t % p.n;
    const int j = ix[h * p.ix_sh + i * p.ix_sn];
    if (j >= chunk_begin && j < chunk_end) {
      atomicOr(&selected[h][(j - chunk_begin) / 32], 1u << ((j - chunk_begin) % 32));
    }
  }

  const bool has_head = my_head < gs;
  const float my_lse = has_head ? p.lse[b * p.lse_sb + (h0 + my_head) * p.lse_sh] : 0.0f;
  using Codes = TailCodes<Bits>;
  // Σ w · scale · code / Codes::code_unit(e), head h, element sub · kTailVec + e
  float acc[GS][kTailVec];
#pragma unroll
  for (int h = 0; h < GS; ++h) {
#pragma unroll
    for (int e = 0; e < kTailVec; ++e) acc[h][e] = 0.0f;
  }
  float min_sum = 0.0f;  // Σ w · min of the pairs this lane weighs (head my_head)
  __syncthreads();  // the bitmap is complete

  // this lane's codes: Bits · kTailVec bits from byte sub · kTailVec · Bits / 8 of a code row,
  // inside the aligned 4-byte word at code_byte & ~3 (code rows are 16-byte aligned)
  const int code_byte = sub * kTailVec * Bits / 8;
  const int code_shift = (code_byte & 3) * 8;
  const uint8_t* cb = p.codes + b * p.c_sb + kvh * p.c_sh + (code_byte & ~3);
  const uint32_t* mb = p.meta + b * p.m_sb + kvh * p.m_sh;
  // the score row of the head whose weights this lane computes (head h0 for a lane without one:
  // never copied)
  const float* srow = p.scores + b * p.s_sb + (h0 + (has_head ? my_head : 0)) * p.s_sh;
  constexpr int kKeysPerIter = tail_keys_per_iter<D>();
  // This lane's first row (key j of u = 0) in each iteration; the rows of u > 0 follow at
  // u · kKeysPerLoad keys. Code and meta rows advance by pointer steps, not a 64-bit multiply per
  // load.
  const int first_key = warp * kTailUnroll * kKeysPerLoad + kslot;
  const int64_t row0 = chunk_begin + first_key;
  const int64_t c_step = kKeysPerLoad * p.c_ss, m_step = kKeysPerLoad * p.m_ss;  // row u -> u + 1
  // the next iteration to stage: this lane's rows of u = 0
  const uint8_t* crow = cb + row0 * p.c_ss;
  const uint32_t* mrow = mb + row0 * p.m_ss;
  // Code words, meta words and scores staged through shared memory by asynchronous copies,
  // kTailStages - 1 iterations ahead of the one being weighted; each thread reads back only its
  // own slots. Slots never copied hold zeros.
#pragma unroll
  for (int st = 0; st < kTailStages; ++st) {
#pragma unroll
    for (int u = 0; u < kTailUnroll; ++u) {
      sh.stage.code[st][u][threadIdx.x] = 0u;
      sh.stage.meta[st][u][threadIdx.x] = 0u;
      sh.stage.score[st][u][threadIdx.x] = 0.0f;
    }
  }
  for (int st = 0; st < kTailStages - 1;
       ++st, crow += kKeysPerIter * p.c_ss, mrow += kKeysPerIter * p.m_ss) {
    const int ahead = chunk_begin + st * kKeysPerIter;
    if (ahead < chunk_end)
      stage_tail_rows(sh.stage, st, crow, c_step, mrow, m_step, srow, p.s_ss, ahead + first_key,
                      kKeysPerLoad, chunk_end, kGroups, kJoint, my_joint, has_head);
    __pipeline_commit();  // an empty group past the chunk keeps the wait counts uniform
  }
  int slot = 0;  // the stage this iteration weights
  // Block-uniform loop: every lane takes part in every shuffle.
  for (int base = chunk_begin; base < chunk_end;
       base += kKeysPerIter, crow += kKeysPerIter * p.c_ss, mrow += kKeysPerIter * p.m_ss) {
    const int ahead = base + (kTailStages - 1) * kKeysPerIter;
    const int fill = slot == 0 ? kTailStages - 1 : slot - 1;  // weighted in the last iteration
    if (ahead < chunk_end)
      stage_tail_rows(sh.stage, fill, crow, c_step, mrow, m_step, srow, p.s_ss,
                      ahead + first_key, kKeysPerLoad, chunk_end, kGroups, kJoint, my_joint,
                      has_head);
    __pipeline_commit();
    __pipeline_wait_prior(kTailStages - 1);  // this iteration's rows have landed
    uint32_t code[kTailUnroll], meta[kGroups];
    float score[kGroups];
#pragma unroll
    for (int u = 0; u < kTailUnroll; ++u)
      code[u] = sh.stage.code[slot][u][threadIdx.x] >> code_shift;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      score[g] = sh.stage.score[slot][g][threadIdx.x];
      meta[g] = sh.stage.meta[slot][g][threadIdx.x];
    }
    slot = slot == kTailStages - 1 ? 0 : slot + 1;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      // This lane's (key my_joint of the group, head my_head) pair: its weight, computed once.
      const int my_j = base + first_key + (g * kJoint + my_joint) * kKeysPerLoad;
      float my_w = 0.0f;  // exp(s - lse), 0 where the head selected the key or it is not valid
      if (has_head && my_j < chunk_end) {
        const int bit = my_j - chunk_begin;
        if (((selected[my_head][bit / 32] >> (bit % 32)) & 1u) == 0u) {
          const float e = exp2f((score[g] - my_lse) * kLog2e);
          my_w = e > 0.0f ? fminf(e, FLT_MAX) : 0.0f;  // NaN -> 0
        }
      }
      float my_ws = 0.0f;  // w · scale; a weight of 0 never meets the row's meta (NaN past L_b)
      if (my_w != 0.0f) {
        my_ws = my_w * __uint_as_float(meta[g] << 16);  // the bfloat16 scale
        if (adds_min) min_sum = fmaf(my_w, __uint_as_float(meta[g] & 0xffff0000u), min_sum);
      }
#pragma unroll
      for (int t = 0; t < kJoint; ++t) {
        const int u = g * kJoint + t;
        float ws[GS];  // each head's w · scale of key u, from the lanes that computed them
        bool any = false;
#pragma unroll
        for (int h = 0; h < GS; ++h) {
          ws[h] = __shfl_sync(kFullMask, my_ws, key_lane0 + (t * GS + h) * kDup);
          any = any || ws[h] != 0.0f;
        }
        if (any) {
          const uint2 halves = Codes::exponent_bits(code[u]);
#pragma unroll
          for (int e = 0; e < kTailVec; ++e) {
            const float c = Codes::value(halves, e);  // code · 2^-(its code_unit)
#pragma unroll
            for (int h = 0; h < GS; ++h) acc[h][e] = fmaf(ws[h], c, acc[h][e]);
          }
        }
      }
    }
  }

  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with the stages before they hold the warps' sums

  // Each head's Σ w · min over the warp, added once to each element (on the lanes of key slot 0);
  // then the key slots of each warp are summed (lanes with the same `sub`), then the warps in
  // order.
#pragma unroll
  for (int h = 0; h < GS; ++h) {
    float mins = has_head && my_head == h ? min_sum : 0.0f;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) mins += __shfl_xor_sync(kFullMask, mins, off);
#pragma unroll
    for (int e = 0; e < kTailVec; ++e)
      acc[h][e] = kslot == 0 ? fmaf(acc[h][e], Codes::code_unit(e), mins)
                             : acc[h][e] * Codes::code_unit(e);
  }
#pragma unroll
  for (int h = 0; h < GS; ++h) {
#pragma unroll
    for (int e = 0; e < kTailVec; ++e) {
#pragma unroll
      for (int off = kLanesPerKey; off < 32; off <<= 1)
        acc[h][e] += __shfl_xor_sync(kFullMask, acc[h][e], off);
    }
  }
  if (kslot == 0) {
#pragma unroll
    for (int h = 0; h < GS; ++h) {
#pragma unroll
      for (int e = 0; e < kTailVec; ++e) sh.partial[warp][h][sub * kTailVec + e] = acc[h][e];
    }
  }
  __syncthreads();
  // head h of this block: [D] at out + h * num_chunks * D
  float* out = p.partials + ((static_cast<int64_t>(b) * p.hq + h0) * p.num_chunks + blockIdx.x) * D;
  for (int t = threadIdx.x; t < gs * D; t += kTailThreads) {
    float sum = sh.partial[0][t / D][t % D];
    for (int w = 1; w < kWarps; ++w) sum += sh.partial[w][t / D][t % D];
    out[static_cast<int64_t>(t / D) * p.num_chunks * D + t % D] = sum;
  }
}

struct LowbitTailReduceParams {
  const float* partials;  // [rows, num_chunks, d] float32 from lowbit_tail_kernel
  float* out;             // [rows, d] float32, contiguous
  int64_t total;          // rows · d
  int num_chunks, d;
};

// grid (ceil(total / kTailReduceThreads)), block kTailReduceThreads: out[r, e] = the sum over c of
// partials[r, c, e], in chunk order.
__global__ void __launch_bounds__(kTailReduceThreads)
    lowbit_tail_reduce_kernel(LowbitTailReduceParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTailReduceThreads + threadIdx.x;
  if (t >= p.total) return;
  const float* src = p.partials + (t / p.d) * p.num_chunks * p.d + t % p.d;
  float sum = src[0];
  for (int c = 1; c < p.num_chunks; ++c) sum += src[static_cast<int64_t>(c) * p.d];
  p.out[t] = sum;
}

}  // namespace kcache_ops
