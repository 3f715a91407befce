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
//    [0, L_b), change nothing). Then the sums run on the tensor cores: a row's dequantized value
//    is min + scale · code, so Σ_j w_hj · row_j = Σ_j (w_hj · scale_j) · code_j + Σ_j w_hj · min_j,
//    and the first sum is a matrix product codes^T [D, keys] · (w · scale) [keys, heads] with the
//    slice's heads as its 8 columns (mma.sync m16n8k8 in tf32, float32 accumulation): the codes
//    are exact in tf32, and w · scale is split into two tf32 parts (within 2^-21 of it). Lane
//    (g, t) holds the D / 8 codes of elements [g · D / 8, (g + 1) · D / 8) of keys t + 4u (one
//    aligned code word per key, two for D 128 at 4 bits: the mma's A fragments, the element order
//    within a row tile chosen so), and computes the weight w = exp(s - lse) of those keys for head
//    g (one bitmap test and one exp per (key, head) pair), its w · scale (the B fragment) and
//    w · min, summed per head. Code words, meta words and scores are staged in shared memory by
//    asynchronous copies kTailStages - 1 iterations ahead. A head that selected the key weighs it
//    0: a selected key is left out exactly, never added and subtracted. Each (head, element) sum
//    of a warp is held by one lane; the warps are summed in a fixed order into the chunk's partial
//    [gs, D], each head's sum of mins added to every element of its row.
//    With hot rows (hot_v at positions hot_pos: rows of V kept exactly on the device), each
//    block also adds its share of them, the slots i = chunk + num_chunks · n, with their exact
//    weights, to its partial (add_hot_rows).
// 2. sum_partials_kernel (sum_partials_kernel.cuh) sums each head's chunk partials in chunk
//    order into out. With a single chunk the launcher skips it: kernel 1 writes out itself.
// The weights need no running max: lse is given and every weight is at most 1 up to rounding. A
// NaN weight (a NaN score or lse, or L_b = 0) counts 0, as the reference's nan_to_num. Entries
// j >= L_b of the scores, codes and meta are never read. Deterministic: no float atomics.
#pragma once

#include <cfloat>
#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kTailThreads = 128;      // 4 warps
constexpr int kTailCodeWords = 8;      // 4-byte code words a lane stages per iteration
constexpr int kTailStages = 3;         // iterations staged in shared memory (2 in flight)
constexpr int kTailBlocksPerSm = 4;    // launch bounds: registers for 4 blocks (16 warps) per SM
constexpr int kTailMaxChunk = 4096;    // keys per block at most: the bitmap is GS · 512 bytes
constexpr int kTailChunkStep = 256;    // chunks are multiples of it (and of every keys-per-iter)

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
  const void* hot_v;             // [B, Hkv, H, D] (hot_dtype), D contiguous
  int64_t hv_sb, hv_sh, hv_si;   // strides in elements
  const int32_t* hot_pos;        // [B, H] int32; outside [0, L_b) left out
  int64_t hp_sb, hp_si;          // strides in elements
  int hot_rows, hot_dtype;       // H (0: none); 0 float32, 1 float16, 2 bfloat16
};

// Where a lane's data lies in the tensor-core layout of lowbit_tail_kernel<D, GS, Bits>. Lane
// (g, t) = (lane / 4, lane % 4) holds the D / 8 codes of elements [g · D / 8, (g + 1) · D / 8) of
// each of its keys, and weighs those keys for head g. In a block iteration a warp covers
// kWarpKeys keys; the lane's key slot u is key 4u + t of them, so a k-step of 8 keys holds the
// lane's slots 2ks (key t) and 2ks + 1 (key t + 4), as the mma's A and B fragments want them.
template <int D, int Bits>
struct TailLayout {
  static constexpr int kCodes = D / 8;                          // codes of a row per lane
  static constexpr int kBitOffset = kCodes * Bits;              // a lane's bits of a row
  static constexpr int kKeyWords = kCodes * Bits > 32 ? 2 : 1;  // 4-byte words holding them
  static constexpr int kSlots = kTailCodeWords / kKeyWords;     // keys per lane and iteration
  static constexpr int kKeySteps = kSlots / 2;                  // mma k-steps of 8 keys
  static constexpr int kWarpKeys = 4 * kSlots;                  // keys per warp and iteration
  static constexpr int kBlockKeys = kTailThreads / 32 * kWarpKeys;
  static constexpr int kTiles = D / 16;                         // mma row tiles of 16 elements
  static_assert(kKeyWords * 32 == kCodes * Bits || kCodes * Bits <= 32, "whole words");
  static_assert(kTailChunkStep % kBlockKeys == 0, "chunks of whole iterations");
};

// Bits 0 .. n - 1 of a word set (none for n <= 0, all for n >= 32).
__device__ __forceinline__ uint32_t low_bits(int n) {
  return n >= 32 ? ~0u : (n <= 0 ? 0u : (1u << n) - 1u);
}

// The staged rows of a block: per stage, slot and thread, the code words of the lane's key in
// that slot (kKeyWords per key), and where the lane weighs a head the key's score for that head
// and the key's (scale, min) word. Each thread copies and reads back only its own slots.
struct TailStage {
  uint32_t code[kTailStages][kTailCodeWords][kTailThreads];
  uint32_t meta[kTailStages][kTailCodeWords][kTailThreads];
  float score[kTailStages][kTailCodeWords][kTailThreads];
};

// A tail block's memory after its key loop: the warps' sums, and the weights of a tile of hot
// rows.
template <int GS, int D>
struct TailSums {
  float partial[kTailThreads / 32][GS][D];  // [warp, head, D]
  float hot_w[GS][kTailThreads];            // [head, slot of the tile]
};

// Shared memory of a tail block: the stages during the key loop, the sums after it.
template <int GS, int D>
union TailShared {
  TailStage stage;
  TailSums<GS, D> sums;
};

// Starts the asynchronous copies of one iteration into stage `slot`: the key of slot u is
// j0 + 4u, its code words at crow + u · c_step bytes, its meta word at mrow + u · m_step and its
// score at srow + u · s_step. A key at or past `end` is not copied (its slots keep older values;
// the loop gives it no weight). A lane without a head copies head h0's scores and meta, which it
// does not weigh: no branch on it (the warp issues each copy once whichever lanes take part).
template <class Layout>
__device__ __forceinline__ void stage_tail_rows(TailStage& st, int slot, const uint8_t* crow,
                                                int64_t c_step, const uint32_t* mrow,
                                                int64_t m_step, const float* srow, int64_t s_step,
                                                int j0, int end) {
  uint32_t* code = &st.code[slot][0][threadIdx.x];  // slot u's word w: [(u · kKeyWords + w) · T]
  uint32_t* meta = &st.meta[slot][0][threadIdx.x];
  float* score = &st.score[slot][0][threadIdx.x];
#pragma unroll
  for (int u = 0; u < Layout::kSlots; ++u, crow += c_step, mrow += m_step, srow += s_step) {
    if (j0 + 4 * u >= end) continue;
#pragma unroll
    for (int w = 0; w < Layout::kKeyWords; ++w)
      __pipeline_memcpy_async(code + (u * Layout::kKeyWords + w) * kTailThreads, crow + 4 * w, 4);
    __pipeline_memcpy_async(score + u * kTailThreads, srow, 4);
    __pipeline_memcpy_async(meta + u * kTailThreads, mrow, 4);
  }
}

// A lane's codes as floats without a shift or an integer to float conversion (which issues at
// 1/8 of an FFMA's rate). Once per word, exponent_bits sets the exponent field of its halves, Bits
// wide from bit 0; then code e of the word, at bit p < 16 of its half, masked in place together
// with the exponent, is the low part of the mantissa of 2^(23 - kTopBit) · (1 + code · 2^(p - 23)),
// and subtracting 2^(23 - kTopBit) leaves code · 2^(p - kTopBit) exactly: one logic op and one
// add per code. kTopBit = 16 - Bits is the highest p; code_unit undoes the power of two on the
// sums at the end (exact, a power of two; only a product w · scale · code below 2^-112 rounds
// differently from one without it, as a subnormal).
template <int Bits>
struct TailCodes {
  static constexpr int kPerHalf = 16 / Bits;  // codes in 16 bits
  static constexpr int kPerWord = 32 / Bits;
  static constexpr int kTopBit = 16 - Bits;   // the position of the last of them
  static constexpr uint32_t kExponent = static_cast<uint32_t>(127 + 23 - kTopBit) << 23;
  static constexpr float kBase = static_cast<float>(1u << (23 - kTopBit));

  // The code word's halves (low, high) with the exponent field set to all ones.
  __device__ __forceinline__ static uint2 exponent_bits(uint32_t codes) {
    return make_uint2(codes | 0x7f800000u, (codes >> 16) | 0x7f800000u);
  }
  // code e < kPerWord of the word · 2^(p - kTopBit), as float bits
  __device__ __forceinline__ static uint32_t value(uint2 halves, int e) {
    const int p = Bits * (e % kPerHalf);
    const uint32_t half = e < kPerHalf ? halves.x : halves.y;
    return __float_as_uint(
        __uint_as_float(and_u32(half, kExponent | (((1u << Bits) - 1u) << p))) - kBase);
  }
  // 2^(kTopBit - p) of code e: value(e) · code_unit(e) is the code
  __host__ __device__ static constexpr float code_unit(int e) {
    return static_cast<float>(1u << (kTopBit - Bits * (e % kPerHalf)));
  }
};

// x as hi + lo, both exact in tf32 (the tensor cores' 10 mantissa bits): hi is x cut to tf32, lo
// the rest (exact in float) rounded to nearest tf32, so hi + lo is x within 2^-21 · |x|, or
// within 2^-137 where lo is below 2^-126 (tf32's subnormals are 2^-136 apart).
__device__ __forceinline__ uint2 split_tf32(float x) {
  const float hi = __uint_as_float(__float_as_uint(x) & 0xffffe000u);
  return make_uint2(__float_as_uint(hi), (__float_as_uint(x - hi) + 0x1000u) & 0xffffe000u);
}

// Element i of a row of hot rows as float32: rows of float32 (dtype 0), float16 (1) or
// bfloat16 (2).
__device__ __forceinline__ float hot_element(const void* rows, int64_t i, int dtype) {
  if (dtype == 0) return static_cast<const float*>(rows)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(rows)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(rows)[i]);
}

// The hot rows a block adds (p.hot_v at positions p.hot_pos): its share, the slots
// i = blockIdx.x + num_chunks · n, so that every chunk's block takes some. hot[k] += the sum over
// those slots, in order, of w_hi · hot_v[b, kvh, i, e] for element (h, e) = threadIdx.x +
// k · kTailThreads of the slice's [gs, D], w_hi = exp(s_h,pos_i − lse_h) where
// 0 <= pos_i < len, as the key loop weighs a key (a NaN weight counts 0), 0 elsewhere; a slot of
// weight 0 adds nothing whatever its row holds. weights: shared, a tile of slots at a time.
template <int D, int GS>
__device__ __forceinline__ void add_hot_rows(const LowbitTailParams& p, int b, int kvh, int h0,
                                             int gs, int len,
                                             float (&weights)[GS][kTailThreads],
                                             float (&hot)[GS * D / kTailThreads]) {
  constexpr int kPer = GS * D / kTailThreads;  // elements of [gs, D] per thread
  // slots whose rows a thread loads at once: up to 32 loads in flight, registers the key loop
  // leaves free (the blocks per multiprocessor unchanged)
  constexpr int kHotBatch = kPer >= 8 ? 4 : 8;
  static_assert(kTailThreads % kHotBatch == 0, "tiles of whole batches");
  const int step = p.num_chunks;
  const int count = p.hot_rows > static_cast<int>(blockIdx.x)
                        ? (p.hot_rows - static_cast<int>(blockIdx.x) + step - 1) / step
                        : 0;  // this block's slots
  const int32_t* pos = p.hot_pos + b * p.hp_sb;
  const float* srow = p.scores + b * p.s_sb + h0 * p.s_sh;  // head h0 + h: + h · s_sh
  // element e of the row of slot i: rows[i · hv_si + e]
  const void* rows = static_cast<const char*>(p.hot_v) +
                     (b * p.hv_sb + kvh * p.hv_sh) * (p.hot_dtype == 0 ? 4 : 2);
  for (int n0 = 0; n0 < count; n0 += kTailThreads) {  // block-uniform
    const int n = n0 + threadIdx.x;
    const int j = n < count ? pos[(blockIdx.x + static_cast<int64_t>(step) * n) * p.hp_si] : -1;
#pragma unroll
    for (int h = 0; h < GS; ++h) {
      float w = 0.0f;
      if (j >= 0 && j < len && h < gs) {
        const float lse = p.lse[b * p.lse_sb + (h0 + h) * p.lse_sh];
        const float e = expf(srow[h * p.s_sh + static_cast<int64_t>(j) * p.s_ss] - lse);
        w = e > 0.0f ? fminf(e, FLT_MAX) : 0.0f;
      }
      weights[h][threadIdx.x] = w;
    }
    __syncthreads();
    // the tile's rows kHotBatch slots at a time, all their loads issued before any is used; a
    // slot past the tile has weight 0 (every thread wrote its weights) and reads no row
    const int tile = min(kTailThreads, count - n0);
    for (int t0 = 0; t0 < tile; t0 += kHotBatch) {
      float v[kPer][kHotBatch];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int i = threadIdx.x + k * kTailThreads;  // element (i / D, i % D)
#pragma unroll
        for (int u = 0; u < kHotBatch; ++u) {
          const int64_t slot = blockIdx.x + static_cast<int64_t>(step) * (n0 + t0 + u);
          v[k][u] = i < gs * D && t0 + u < tile
                        ? hot_element(rows, slot * p.hv_si + i % D, p.hot_dtype)
                        : 0.0f;
        }
      }
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int i = threadIdx.x + k * kTailThreads;
#pragma unroll
        for (int u = 0; u < kHotBatch; ++u) {
          const float w = i < gs * D ? weights[i / D][t0 + u] : 0.0f;
          hot[k] += w != 0.0f ? w * v[k][u] : 0.0f;
        }
      }
    }
    __syncthreads();  // the next tile rewrites the weights
  }
}

// grid (num_chunks, Hkv * slices, B), block kTailThreads, kTailBlocksPerSm blocks per SM; Bits
// (2 or 4) is p.bits.
template <int D, int GS, int Bits>
__global__ void __launch_bounds__(kTailThreads, kTailBlocksPerSm)
    lowbit_tail_kernel(LowbitTailParams p) {
  using Layout = TailLayout<D, Bits>;
  using Codes = TailCodes<Bits>;
  constexpr int kWarps = kTailThreads / 32;
  constexpr int kWords = kTailMaxChunk / 32;
  static_assert(GS <= 8, "a slice's heads are the mma's 8 columns");

  __shared__ uint32_t selected[GS][kWords];  // bit (j - chunk_begin): head h selected key j
  __shared__ TailShared<GS, D> sh;

  // sequence, KV head, first query head and query heads of this block, its keys
  const auto [b, kvh, h0, gs, chunk_begin, chunk_end] =
      chunk_block<GS>(p.seq_lens, p.seq_stride, p.hq, p.hkv, p.s, p.slices, p.chunk);
  const int words = (p.chunk + 31) / 32;

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4;  // the elements [g · D / 8, (g + 1) · D / 8) and the head g it weighs
  const int t = lane % 4;  // its keys: t + 4u; it sums heads 2t and 2t + 1

  // The selection bitmap of the chunk, starting from the skipped keys (set for every head).
  const int len = clamped_len(p.seq_lens, p.seq_stride, b, p.s);  // L_b
  const int cold_end = max(0, len - p.skip_last);
  for (int i = threadIdx.x; i < GS * words; i += kTailThreads) {
    const int key0 = chunk_begin + (i % words) * 32;  // the word's first key
    selected[i / words][i % words] = low_bits(p.skip_first - key0) | ~low_bits(cold_end - key0);
  }
  __syncthreads();
  const int32_t* ix = p.indices + b * p.ix_sb + h0 * p.ix_sh;  // head h, entry i: h*ix_sh + i*ix_sn
  for (int i = threadIdx.x; i < gs * p.n; i += kTailThreads) {
    const int h = i / p.n, e = i % p.n;
    const int j = ix[h * p.ix_sh + e * p.ix_sn];
    if (j >= chunk_begin && j < chunk_end) {
      atomicOr(&selected[h][(j - chunk_begin) / 32], 1u << ((j - chunk_begin) % 32));
    }
  }

  const bool has_head = g < gs;
  const int head_row = has_head ? g : 0;  // the head whose bitmap and scores this lane reads
  const float my_lse = has_head ? p.lse[b * p.lse_sb + (h0 + g) * p.lse_sh] : 0.0f;
  // acc[m]: Σ w · scale · code / Codes::code_unit(e) of elements g · D / 8 + {2m, 2m + 1} (rows
  // g, g + 8 of row tile m) for heads 2t, 2t + 1: {(2m, 2t), (2m, 2t + 1), (2m + 1, 2t),
  // (2m + 1, 2t + 1)}
  float acc[Layout::kTiles][4];
#pragma unroll
  for (int m = 0; m < Layout::kTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[m][r] = 0.0f;
  }
  float min_sum = 0.0f;  // Σ w · min of the pairs this lane weighs (head g)
  __syncthreads();  // the bitmap is complete

  // this lane's codes: from bit g · kBitOffset of a code row, inside the aligned 4-byte word at
  // byte (g · kBitOffset / 32) · 4 (code rows are 16-byte aligned)
  const int code_shift = g * Layout::kBitOffset % 32;
  const uint8_t* cb = p.codes + b * p.c_sb + kvh * p.c_sh + g * Layout::kBitOffset / 32 * 4;
  const uint32_t* mb = p.meta + b * p.m_sb + kvh * p.m_sh;
  // the score row of the head this lane weighs (head h0 for a lane without one: copied, unused)
  const float* sb = p.scores + b * p.s_sb + (h0 + head_row) * p.s_sh;
  constexpr int kKeysPerIter = Layout::kBlockKeys;
  // This lane's first key in each iteration; slot u is 4u keys further. Code, meta and score
  // rows advance by pointer steps, not a 64-bit multiply per load.
  const int first_key = warp * Layout::kWarpKeys + t;
  const int64_t row0 = chunk_begin + first_key;
  const int64_t c_step = 4 * p.c_ss, m_step = 4 * p.m_ss, s_step = 4 * p.s_ss;  // u -> u + 1
  // the next iteration to stage: this lane's key of slot 0
  const uint8_t* crow = cb + row0 * p.c_ss;
  const uint32_t* mrow = mb + row0 * p.m_ss;
  const float* srow = sb + row0 * p.s_ss;
  // Code words, meta words and scores staged through shared memory by asynchronous copies,
  // kTailStages - 1 iterations ahead of the one being weighted; each thread reads back only its
  // own slots. Slots never copied hold zeros.
#pragma unroll
  for (int st = 0; st < kTailStages; ++st) {
#pragma unroll
    for (int u = 0; u < kTailCodeWords; ++u) {
      sh.stage.code[st][u][threadIdx.x] = 0u;
      sh.stage.meta[st][u][threadIdx.x] = 0u;
      sh.stage.score[st][u][threadIdx.x] = 0.0f;
    }
  }
  for (int st = 0; st < kTailStages - 1;
       ++st, crow += kKeysPerIter * p.c_ss, mrow += kKeysPerIter * p.m_ss,
       srow += kKeysPerIter * p.s_ss) {
    const int ahead = chunk_begin + st * kKeysPerIter;
    if (ahead < chunk_end)
      stage_tail_rows<Layout>(sh.stage, st, crow, c_step, mrow, m_step, srow, s_step,
                              ahead + first_key, chunk_end);
    __pipeline_commit();  // an empty group past the chunk keeps the wait counts uniform
  }
  int slot = 0;  // the stage this iteration weights
  // Block-uniform loop: every lane takes part in every mma.
  for (int base = chunk_begin; base < chunk_end;
       base += kKeysPerIter, crow += kKeysPerIter * p.c_ss, mrow += kKeysPerIter * p.m_ss,
       srow += kKeysPerIter * p.s_ss) {
    const int ahead = base + (kTailStages - 1) * kKeysPerIter;
    const int fill = slot == 0 ? kTailStages - 1 : slot - 1;  // weighted in the last iteration
    if (ahead < chunk_end)
      stage_tail_rows<Layout>(sh.stage, fill, crow, c_step, mrow, m_step, srow, s_step,
                              ahead + first_key, chunk_end);
    __pipeline_commit();
    __pipeline_wait_prior(kTailStages - 1);  // this iteration's rows have landed
    uint32_t code[kTailCodeWords];
#pragma unroll
    for (int w = 0; w < kTailCodeWords; ++w)
      code[w] = sh.stage.code[slot][w][threadIdx.x] >> code_shift;
    // This lane's (key, head g) weights w = exp(s - lse), 0 where the head selected the key or
    // it is not valid, as w · scale split into two tf32 parts (the mma's B operand).
    uint2 ws[Layout::kSlots];
#pragma unroll
    for (int u = 0; u < Layout::kSlots; ++u) {
      // Branch-free, so that the slots' shared-memory reads overlap: every read is of a written
      // slot (the stages start zeroed), and selects keep what an invalid one gives out.
      const int j = base + first_key + 4 * u;
      const bool valid = has_head && j < chunk_end;
      const int bit = valid ? j - chunk_begin : 0;
      const uint32_t word = selected[head_row][bit / 32];
      const float score = sh.stage.score[slot][u][threadIdx.x];
      const uint32_t meta = sh.stage.meta[slot][u][threadIdx.x];
      // expf, not exp2f((s - lse) · log2e): that product's rounding is |s - lse| · 2^-24 of
      // the weight, which a cancelling sum (rows near the float range) amplifies past 1e-5
      const float e = expf(score - my_lse);
      // not selected, and a weight above 0 (a NaN one counts 0); `&`, not `&&`: no branch
      const bool take = valid & (((word >> (bit % 32)) & 1u) == 0u) & (e > 0.0f);
      const float w = take ? fminf(e, FLT_MAX) : 0.0f;
      // a weight of 0 never meets the row's meta (NaN past L_b, or a NaN row)
      const float w_scale = take ? w * __uint_as_float(meta << 16) : 0.0f;  // the bf16 scale
      min_sum = take ? fmaf(w, __uint_as_float(meta & 0xffff0000u), min_sum) : min_sum;  // min
      ws[u] = split_tf32(w_scale);
    }
    slot = slot == kTailStages - 1 ? 0 : slot + 1;
    // The codes' words with their exponent fields set (per slot and word).
    uint2 halves[kTailCodeWords];
#pragma unroll
    for (int w = 0; w < kTailCodeWords; ++w) halves[w] = Codes::exponent_bits(code[w]);
    // Row tile by row tile, this iteration's k-steps into a fresh fragment, then added to the
    // running sums in float32: the tensor cores add within an mma with truncation, so a chunk's
    // 100s of mma into one fragment would drift (6.5e-5 in the emulator's model of them, against
    // the tests' 1e-5); a few per fragment do not (at most 0.35 of the tolerance there).
#pragma unroll
    for (int m = 0; m < Layout::kTiles; ++m) {
      constexpr int kTilesPerWord = Layout::kTiles / Layout::kKeyWords;
      const int w = m / kTilesPerWord, e = 2 * (m % kTilesPerWord);  // the word; its codes e,
                                                                      // e + 1: rows g, g + 8
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int ks = 0; ks < Layout::kKeySteps; ++ks) {
        // keys t and t + 4 of the step: slots 2ks and 2ks + 1
        const uint2 key_t = halves[(2 * ks) * Layout::kKeyWords + w];
        const uint2 key_t4 = halves[(2 * ks + 1) * Layout::kKeyWords + w];
        const uint32_t a[4] = {Codes::value(key_t, e), Codes::value(key_t, e + 1),
                               Codes::value(key_t4, e), Codes::value(key_t4, e + 1)};
        const uint32_t b_hi[2] = {ws[2 * ks].x, ws[2 * ks + 1].x};
        const uint32_t b_lo[2] = {ws[2 * ks].y, ws[2 * ks + 1].y};
        mma_tf32_m16n8k8(part, a, b_hi);
        mma_tf32_m16n8k8(part, a, b_lo);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[m][r] += part[r];
    }
  }

  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with the stages before they hold the warps' sums

  // Each head's Σ w · min over the warp (the lanes (h, t) weigh head h), added once to each of
  // its elements; each (head, element) of the warp is held by one lane. Then the warps in order.
  min_sum += __shfl_xor_sync(kFullMask, min_sum, 1);
  min_sum += __shfl_xor_sync(kFullMask, min_sum, 2);
  const float mins[2] = {__shfl_sync(kFullMask, min_sum, 4 * (2 * t)),
                         __shfl_sync(kFullMask, min_sum, 4 * (2 * t + 1))};
#pragma unroll
  for (int m = 0; m < Layout::kTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = 2 * m + r / 2, h = 2 * t + r % 2;  // code e of the lane, head h
      if (h < gs)
        sh.sums.partial[warp][h][g * Layout::kCodes + e] =
            fmaf(acc[m][r], Codes::code_unit(e % Codes::kPerWord), mins[r % 2]);
    }
  }
  __syncthreads();
  // this block's share of the hot rows, per element of the sum below
  static_assert(GS * D % kTailThreads == 0, "whole elements per thread");
  float hot[GS * D / kTailThreads];
#pragma unroll
  for (int k = 0; k < GS * D / kTailThreads; ++k) hot[k] = 0.0f;
  if (p.hot_rows > 0)
    add_hot_rows<D, GS>(p, b, kvh, h0, gs, len, sh.sums.hot_w, hot);
  // head h of this block: [D] at out + h * num_chunks * D
  float* out = p.partials + ((static_cast<int64_t>(b) * p.hq + h0) * p.num_chunks + blockIdx.x) * D;
#pragma unroll
  for (int k = 0; k < GS * D / kTailThreads; ++k) {
    const int i = threadIdx.x + k * kTailThreads;  // element (i / D, i % D) of [gs, D]
    if (i >= gs * D) continue;
    float sum = sh.sums.partial[0][i / D][i % D];
    for (int w = 1; w < kWarps; ++w) sum += sh.sums.partial[w][i / D][i % D];
    out[static_cast<int64_t>(i / D) * p.num_chunks * D + i % D] = sum + hot[k];
  }
}

}  // namespace kcache_ops
