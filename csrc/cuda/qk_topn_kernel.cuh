// qk_topn on the GPU: a score kernel and a select kernel, whose blocks merge a row's slices when it
// is split over several (bytes and design: bench/NOTES.md).
//
// 1. qk_scores_kernel — one block per (chunk of keys, KV head, slice of <= GS query heads of its
//    group, sequence), the chunks sized to whole waves of 2 blocks per SM. Each K row is read once,
//    by 16-byte asynchronous copies into shared memory two iterations ahead of its use (evict-first
//    in L2), and dotted with all the slice's query heads held in registers; the dots are
//    reduce-scattered over the row's lanes so that each lane ends with one head's score and updates
//    that head's running (max, sumexp) with one exp2. It writes the float32 scores s[b, h, j]
//    (j < L_b) to a scratch buffer (G·4 bytes per key against D·sizeof(T) bytes of K: 6% for
//    Llama-3 bf16) and the chunk's (max, sumexp) per head.
// 2. qk_select_kernel — one block per (slice of keys, query head or KV head in group mode,
//    sequence), the slices (>= 2048 keys) sized so that the grid fills up to 4 blocks per SM. In
//    group mode it first merges the chunks' (max, sumexp) of the group's heads into lse (a warp per
//    head) and writes the ranking keys (float_key) of its slice's group mass c_j = sum_h
//    exp(s_hj - lse_h) once, to a [B, Hkv, S↑4] buffer that it then ranks. Where the slice fits in
//    shared memory beside its picks (`staged`), the keys it ranks (of the group mass, or of the
//    head's scores, transformed once) are kept there instead, and the passes below never read
//    device memory; keys the block does not rank are written as 0, so that the passes test no
//    bounds (per head and not staged they rank the score row, transforming and testing every key in
//    every pass). radix_select finds the slice's N-th largest ranking key by a 3-pass radix select
//    (11 + 11 + 10 bits, histograms in shared memory), ending early when the threshold's bin holds
//    exactly the keys still needed; collect_candidates gathers the keys above it plus the
//    lowest-index keys equal to it, sorted by (key desc, index asc) with a bitonic sort in shared
//    memory. With one slice per row these are written (scores, indices, lse, padding); with
//    several, each slice's N best go to a picks buffer, and the last of the row's blocks to finish
//    (a counter per row, zeroed by the score kernel) merges the slices' sorted lists
//    (bitonic_size(N) slots each) pairwise in a tree (each pair's best by a bitonic merge) into the
//    row's N best (every key of those is among its own slice's N best) and writes them with the
//    row's lse.
//    The ranking key is s (per head) or the group mass c_j (group mode).
// NaN as the reference: a NaN score makes its row's lse NaN and ranks above every number (per
// head); a NaN term of the group mass counts 0.
// Everything is deterministic: no float atomics, reductions in a fixed order, ties by index.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"
#include "qk_inputs.h"

namespace kcache_ops {

constexpr int kScoreThreads = 256;  // 8 warps
constexpr int kScoreUnroll = 4;     // K rows per thread per iteration of the key loop
constexpr int kScoreStages = 3;     // iterations of K rows in shared memory (2 in flight)
constexpr int kScoreBlocksPerSm = 2;  // launch bounds: registers for 2 blocks (16 warps) per SM
constexpr int kSelectThreads = 512;
constexpr int kSelectBins = 2048;     // 11-bit radix digits
constexpr int kMaxTopN = 4096;        // candidates sorted in shared memory (32 KiB)
constexpr int kStagedGroups = kMaxTopN / 2 + 32;  // 16-byte groups of a staged slice and its
                                                  // picks: 8192 keys after 64 picks
constexpr int kMaxGroupSelect = 128;  // query heads per KV head in group mode (lse in shared memory)
constexpr int kSelectBlocksPerSm = 4;  // launch bounds of qk_select_kernel: 32 registers

struct QkScoresParams {
  QkInputs in;               // q [B, Hq, D], k [B, Hkv, S, D], seq_lens [B]
  float* scores;             // [B, Hq, score_stride] scratch, written for j < L_b
  MaxSum* partials;          // [B, Hq, num_chunks] (max, sumexp) of each chunk
  int64_t score_stride;      // S rounded up to a multiple of 4 (16-byte aligned rows)
  int hq, hkv, s, chunk, num_chunks, slices;
  float scale;
  int* slices_done;          // [select_rows] qk_select_kernel's counters, zeroed here; or nullptr
  int select_rows;           // its length (B · ranked rows: at most 2 · SMs when rows split)
};

// Keys of one block-iteration for element type T and head dim D (the chunk is a multiple of it).
template <typename T, int D>
constexpr int score_keys_per_iter() {
  return (kScoreThreads / 32) * (32 / (D / Vec16<T>::kElems)) * kScoreUnroll;
}

// Shared memory of a score block: the K stages, then (after the key loop) the warps' (max, sumexp)
// per head. 48 KiB, the static limit: 2 blocks per SM use 98 of its 228 KiB.
template <int GS>
union ScoreShared {
  uint4 stage[kScoreStages][kScoreUnroll][kScoreThreads];  // [stage, u, thread] 16-byte pieces
  MaxSum warp_part[kScoreThreads / 32][GS];
};

// Starts the asynchronous copies of this thread's 16-byte pieces of kScoreUnroll K rows into its
// slots of one stage: row u is key j0 + u · keys_per_load at krow + u · u_step. A key at or past
// `end` is not copied: its slot keeps what it held (zeros, or a row of an earlier iteration), and
// its score is computed but not used. K is read once per step: evict-first in L2, so that the
// score scratch this pass writes stays there for the select (and the group mass) that read it.
template <typename T>
__device__ __forceinline__ void stage_key_rows(uint4 (&slots)[kScoreUnroll][kScoreThreads],
                                               const T* krow, int64_t u_step, int j0,
                                               int keys_per_load, int end) {
#pragma unroll
  for (int u = 0; u < kScoreUnroll; ++u) {
    if (j0 + u * keys_per_load < end)
      copy16_async_evict_first(&slots[u][threadIdx.x], krow + u * u_step);
  }
}

// grid (num_chunks, Hkv * slices, B), block kScoreThreads, kScoreBlocksPerSm blocks per SM.
// Per group of kJoint keys a lane covers (u = g·kJoint ...): each lane dots its 16-byte piece of
// each row with the GS query heads, the kJoint · GS dots are reduce-scattered over the key's lanes
// (one (key, head) per lane), and every lane then updates the running (max, sumexp) of its own
// head with one exp2; one lane per (key, head) writes the score.
template <typename T, int D, int GS>
__global__ void __launch_bounds__(kScoreThreads, kScoreBlocksPerSm)
    qk_scores_kernel(QkScoresParams p) {
  constexpr int kVec = Vec16<T>::kElems;  // elements per 16-byte load
  constexpr int kLanesPerKey = D / kVec;  // 8, 16 or 32 lanes share one key row
  constexpr int kKeysPerLoad = 32 / kLanesPerKey;
  // Keys (of this lane's kScoreUnroll) reduced together: at most one (key, head) value per lane.
  constexpr int kJoint = kLanesPerKey / GS < kScoreUnroll ? kLanesPerKey / GS : kScoreUnroll;
  constexpr int kValues = kJoint * GS;              // [kJoint, GS] dots per reduction
  constexpr int kDup = kLanesPerKey / kValues;      // lanes of a key ending with the same value
  static_assert(D % kVec == 0 && 32 % kLanesPerKey == 0, "unsupported head dim");
  static_assert(kScoreUnroll % kJoint == 0, "whole groups of keys");

  // sequence, KV head, first query head and query heads of this block, its keys
  const auto [b, kvh, h0, gs, chunk_begin, chunk_end] = chunk_block<GS>(
      p.in.seq_lens, p.in.seq_stride, p.hq, p.hkv, p.s, p.slices, p.chunk);

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int sub = lane % kLanesPerKey;  // which 16-byte piece of the row this lane reads
  const int kslot = lane / kLanesPerKey;
  const int my_value = sub / kDup;  // the (key, head) this lane ends up with, of each group
  const int my_head = my_value % GS;
  const int my_joint = my_value / GS;  // which key of the group: u = g · kJoint + my_joint
  const bool has_head = my_head < gs;
  const bool writer = has_head && sub % kDup == 0;

  // This lane's slice of each query head, float32.
  float qf[GS][kVec];
  load_q_slice<T, GS, kVec>(qf, static_cast<const T*>(p.in.q) + b * p.in.q_sb, p.in.q_sh, h0, gs,
                            sub);

  MaxSum run = maxsum_empty();  // of my_head over this lane's keys

  const T* kb = static_cast<const T*>(p.in.k) + b * p.in.k_sb + kvh * p.in.k_sh + sub * kVec;
  // [score_stride] scratch row of my_head (written only when has_head)
  float* my_scores =
      p.scores + (static_cast<int64_t>(b) * p.hq + h0 + (has_head ? my_head : 0)) * p.score_stride;
  constexpr int kKeysPerIter = score_keys_per_iter<T, D>();
  // This lane's piece of its first row (key j of u = 0) in each iteration; the rows of u > 0 follow
  // at u · kKeysPerLoad keys. Advanced by a pointer step, not a 64-bit multiply per load.
  const int first_key = warp * kScoreUnroll * kKeysPerLoad + kslot;
  const int64_t u_step = kKeysPerLoad * p.in.k_ss;  // elements from the row of u to that of u + 1
  const int64_t iter_step = kKeysPerIter * p.in.k_ss;  // from one iteration to the next
  // K rows staged through shared memory by asynchronous copies (cp.async), kScoreStages - 1
  // iterations ahead of the one being scored, so 2 · kScoreUnroll 16-byte loads per thread stay in
  // flight while it computes, in shared memory rather than registers. Each thread copies its own
  // pieces and reads back only those: no barrier in the loop. The loop is block-uniform.
  __shared__ ScoreShared<GS> sh;
#pragma unroll
  for (int st = 0; st < kScoreStages; ++st) {
#pragma unroll
    for (int u = 0; u < kScoreUnroll; ++u) sh.stage[st][u][threadIdx.x] = make_uint4(0, 0, 0, 0);
  }
  // this lane's piece of the first row of the next iteration to stage
  const T* kstage = kb + static_cast<int64_t>(chunk_begin + first_key) * p.in.k_ss;
  for (int st = 0; st < kScoreStages - 1; ++st, kstage += iter_step) {
    const int ahead = chunk_begin + st * kKeysPerIter;
    if (ahead < chunk_end)
      stage_key_rows(sh.stage[st], kstage, u_step, ahead + first_key, kKeysPerLoad, chunk_end);
    __pipeline_commit();  // an empty group past the chunk keeps the wait counts uniform
  }
  int slot = 0;  // the stage this iteration scores
  for (int base = chunk_begin; base < chunk_end; base += kKeysPerIter, kstage += iter_step) {
    const int ahead = base + (kScoreStages - 1) * kKeysPerIter;
    const int fill = slot == 0 ? kScoreStages - 1 : slot - 1;  // scored in the last iteration
    if (ahead < chunk_end)
      stage_key_rows(sh.stage[fill], kstage, u_step, ahead + first_key, kKeysPerLoad, chunk_end);
    __pipeline_commit();
    __pipeline_wait_prior(kScoreStages - 1);  // this iteration's rows have landed
    uint4 raw[kScoreUnroll];
#pragma unroll
    for (int u = 0; u < kScoreUnroll; ++u) raw[u] = sh.stage[slot][u][threadIdx.x];
#pragma unroll
    for (int g = 0; g < kScoreUnroll / kJoint; ++g) {
      const float s = joint_score<T, GS, kJoint, kLanesPerKey>(qf, raw + g * kJoint, sub, p.scale);
      const int j = base + first_key + (g * kJoint + my_joint) * kKeysPerLoad;
      if (has_head && j < chunk_end) {
        if (writer) store_evict_last(my_scores + j, s);  // read next by the mass / the select
        maxsum_add(run, s);
      }
    }
    slot = slot == kScoreStages - 1 ? 0 : slot + 1;
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with the stages before they hold warp_part

  // Merge the lanes of a head that saw other keys (other my_joint, other kslot: the lane bits from
  // kDup · GS up), then the warps in a fixed order.
  run = maxsum_finish(run);
#pragma unroll
  for (int off = kDup * GS; off < 32; off <<= 1)
    run = maxsum_merge(run, {__shfl_xor_sync(kFullMask, run.m, off),
                             __shfl_xor_sync(kFullMask, run.l, off)});
  if (writer && lane < kDup * GS) sh.warp_part[warp][my_head] = run;
  __syncthreads();
  if (threadIdx.x < gs) {
    MaxSum r = sh.warp_part[0][threadIdx.x];
    for (int w = 1; w < kScoreThreads / 32; ++w) r = maxsum_merge(r, sh.warp_part[w][threadIdx.x]);
    p.partials[(static_cast<int64_t>(b) * p.hq + h0 + threadIdx.x) * p.num_chunks + blockIdx.x] = r;
  }
  // The select's counters of finished slices per row, zeroed once a call (the select runs after
  // this kernel on the stream); here, after the key loop, whose registers it would otherwise hold.
  if (p.slices_done != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
    for (int i = threadIdx.x; i < p.select_rows; i += kScoreThreads) p.slices_done[i] = 0;
  }
}

struct QkSelectParams {
  const float* scores;       // [B, Hq, score_stride] scratch from qk_scores_kernel
  const MaxSum* partials;    // [B, Hq, num_chunks]
  uint32_t* mass_keys;       // [B, Hkv, score_stride] ranking keys of the group mass, written
                             // by qk_select_kernel (group mode and not staged; else unused)
  unsigned long long* picks; // [B, ranked rows, slices, n] each slice's sorted picks, which the
                             // row's last block merges; nullptr when slices = 1
  int* slices_done;          // [B, ranked rows] the row's slices finished (zeroed by
                             // qk_scores_kernel); nullptr when slices = 1
  int64_t score_stride;      // multiple of 4
  const int32_t* seq_lens;   // [B]
  int64_t seq_stride;        // in elements
  float* out_scores;         // [B, Hq, N] contiguous
  int32_t* out_indices;      // [B, Hq, N] contiguous
  float* out_lse;            // [B, Hq] contiguous
  int hq, hkv, s, n, num_chunks;
  int skip_first, skip_last; // the ranked keys of row b: skip_first <= j < L_b - skip_last
  float top_p;               // < 1: each head keeps the shortest prefix reaching this mass
  int slices;                // blocks per ranked row of qk_select_kernel
  int64_t slice_keys;        // keys per slice, a multiple of 4
  bool group_select;
  bool staged;               // a slice's ranking keys are kept in shared memory (select_staged)
};

// Shared state of one select block.
struct SelectShared {
  union {
    unsigned long long cand[kMaxTopN];  // (key << 32) | ~index, sorted descending
    uint4 keys4[kStagedGroups];         // staged ranking keys, after the picks (staged_keys)
  };
  int hist[kSelectBins];
  int warp_total[kSelectThreads / 32];
  float lse[kMaxGroupSelect];         // of the ranked row's heads
  int keep[kMaxGroupSelect];          // with top_p < 1: the entries each head keeps
  int digit, remaining, bin_count, n_gt;
  bool last;  // this block is its row's last slice to finish
};

// Where a select block keeps the ranking keys of its slice when they fit in shared memory: in
// sh.cand, as 16-byte groups, after the slots of its picks (a whole row's sort uses
// bitonic_size(n) of them), which collect_candidates writes while it reads the staged keys.
__host__ __device__ constexpr int staged_keys_offset(int n) {
  return (bitonic_size(n) + 1) / 2;  // 16-byte slots: 2 picks each
}

// Whether a slice of slice_keys keys (a multiple of 4) fits there for n picks.
__host__ __device__ constexpr bool select_staged(int64_t slice_keys, int n) {
  return staged_keys_offset(n) + slice_keys / 4 <= kStagedGroups;
}

// Exclusive prefix sum of v over threadIdx.x, and the block's total (block_scan); ends with a
// barrier, so that it can be called again at once. Every thread must call it.
__device__ __forceinline__ int block_exclusive_scan(int v, int& total, SelectShared& sh) {
  const int before = block_scan<kSelectThreads>(v, total, sh.warp_total);
  __syncthreads();
  return before;
}

// A head's share exp(s - lse) = 2^((s - lse) · log2 e) of the group mass: exp2f (the
// multi-function unit's ex2 and its subnormal scaling: 6 instructions with the subtraction and
// the product, where expf takes 9); 0 where it is NaN (a NaN score or lse), as the reference's
// nan_to_num: a head with a NaN lse does not rank its group's keys. The exponent is taken from
// s - lse, as expf's is: the product's rounding, |s - lse| · 2^-24, and exp2f's 2 ulps (expf: 1-2)
// change a share by a few parts in 10^6 where it matters (|s - lse| < 88), so only near-ties of
// the ranking, which alone it decides, may order otherwise; subnormal shares rank as the
// reference's. (s · log2 e - lse · log2 e, one fma, rounds lse · log2 e first: up to
// |lse| · 2^-25 on the exponent of every share of the head, 19 % at |lse| = 3e6.)
__device__ __forceinline__ float head_mass(float s, float lse) {
  const float p = exp2f((s - lse) * kLog2e);
  return isnan(p) ? 0.0f : p;
}

// Score-scratch loads (16 bytes: 4 keys of one head) a thread issues for the group mass before it
// waits for any: kMassLoads heads of its keys, so that a multiprocessor full of select warps (4
// blocks) has 64 · 32 · 2 · 16 B = 64 KiB in flight, above the ≈ 32 KiB per multiprocessor that the
// H200's bandwidth × latency needs (one load in flight per thread left it at 1.2 TB/s). 4 loads
// would need more than the 32 registers of 4 blocks per SM.
constexpr int kMassLoads = 2;

// The keys a select block ranks: [first, end) of one ranked row, within its slice (the whole row
// when the row is not split), the scratch rows of the heads ranked together, and what is ranked.
// The loops over them start at the 16-byte group of `first` (first / 4); the keys there before
// `first` read 0 (keyed) or are skipped.
// What is ranked is either the block's own ranking keys (`keyed`: float_key of the group mass or of
// the scores, written by the block itself, with 0 at the keys of its 16-byte groups outside
// [first, end), a value no float_key takes) or, per head when the slice is not staged, the score
// row itself (its floats' bits, each loop applying float_key and skipping the keys outside).
struct SelectRow {
  const float* scores;   // [nh, score_stride] scratch rows of the heads, 16-byte aligned
  const uint4* rank;     // what is ranked, 4 keys per group from key 4 · rank_q4: the score row
                         // or the group mass's key row (device memory), or the block's keys of
                         // its slice in shared memory (staged)
  int rank_q4;           // the 16-byte group of keys that rank[0] holds
  int64_t score_stride;  // multiple of 4
  int nh;                // query heads ranked together: G in group mode, else 1
  int len;               // valid keys of the row, L_b clamped to [0, S]
  int first, end;        // the block's ranked keys, end <= len (end <= first: none)
};

// The count-th largest ranking key of a row on the bits of `mask`, and how many keys equal to it
// there (key & mask == key) are taken, lowest indices first; the keys above it there are the
// other count - need_eq picks. An early exit of the radix select leaves low bits out of the mask
// when every key of the threshold's bin is taken (take_all_eq): then no index order is needed.
struct SelectThreshold {
  uint32_t key;      // the threshold's bits under mask
  uint32_t mask;     // the key bits the radix passes decided
  int need_eq;
  bool take_all_eq;  // need_eq is every key equal to the threshold under mask
};

// lse of the row's heads row0 .. row0 + nh - 1 from their chunk partials, into sh.lse (and into
// out_lse when `out`): warp w merges head w's (then w + 16's, ...) partials, its lanes strided over
// the chunks, then a butterfly (a fixed order: deterministic, and the same lse in every block of
// a row). Every thread must call it; ends with a barrier.
__device__ __forceinline__ void select_lse(const QkSelectParams& p, int64_t row0, int nh, bool out,
                                           SelectShared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll 1
  for (int h = warp; h < nh; h += kSelectThreads / 32) {
    __syncwarp();  // the whole warp (h is per warp): its shuffles need no divergence copies
    const MaxSum* part = p.partials + (row0 + h) * p.num_chunks;  // [num_chunks]
    MaxSum r{-INFINITY, 0.0f};
#pragma unroll 1
    for (int c = lane; c < p.num_chunks; c += 32) r = maxsum_merge(r, part[c]);
    r = warp_maxsum(r);
    if (lane == 0) {  // m + log(l) rounded once from double, as the CPU op's (logf is off by
      // up to an ulp); l itself is the chunks' float sums, where the CPU op's is double
      const float lse = r.m == -INFINITY
                            ? -INFINITY
                            : static_cast<float>(static_cast<double>(r.m) + log(double{r.l}));
      sh.lse[h] = lse;
      if (out) p.out_lse[row0 + h] = lse;
    }
  }
  __syncthreads();
}

// Whether key j (of a 16-byte group the loops visit) is one the block ranks.
__device__ __forceinline__ bool in_block(const SelectRow& row, int j) {
  return j >= row.first && j < row.end;
}

// The ranking keys of the 16-byte group q4 whose values are v (keys 4·q4 .. 4·q4 + 3): float_key of
// each, 0 outside the block's keys.
__device__ __forceinline__ uint4 group_keys(const SelectRow& row, int q4, float4 v) {
  const int j = 4 * q4;
  return make_uint4(in_block(row, j) ? float_key(v.x) : 0u,
                    in_block(row, j + 1) ? float_key(v.y) : 0u,
                    in_block(row, j + 2) ? float_key(v.z) : 0u,
                    in_block(row, j + 3) ? float_key(v.w) : 0u);
}

// Group mode: the ranking keys (group_keys) of the group mass c_j = sum_h head_mass(s_hj, lse_h)
// (h in the KV head's group, in order; lse in sh.lse) of the block's keys [first, end) widened to
// 16-byte groups (within its slice: slices are multiples of 4 keys), written to `out`, which
// row.rank reads (the mass key row, or shared memory), one 16-byte group of keys per thread and
// step, kMassLoads heads' loads at a time. No barrier: radix_select and collect_candidates each
// pass one before they read it back.
__device__ __forceinline__ void group_mass(const SelectRow& row, uint4* out,
                                           const SelectShared& sh) {
  for (int q4 = row.first / 4 + threadIdx.x; q4 < (row.end + 3) / 4; q4 += kSelectThreads) {
    float4 c = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float* at = row.scores + 4 * q4;  // head h0's 4 keys: a step per head, not a multiply
    for (int h0 = 0; h0 < row.nh; h0 += kMassLoads) {
      if (h0 > 0) at += kMassLoads * row.score_stride;  // (never past the last head's row)
      float4 v[kMassLoads];  // heads h0 .. h0 + kMassLoads - 1 at the thread's 4 keys
#pragma unroll
      for (int u = 0; u < kMassLoads; ++u) {  // the loads first, all in flight together
        if (h0 + u < row.nh) v[u] = *reinterpret_cast<const float4*>(at + u * row.score_stride);
      }
#pragma unroll
      for (int u = 0; u < kMassLoads; ++u) {
        if (h0 + u >= row.nh) break;
        const float lse = sh.lse[h0 + u];
        c.x += head_mass(v[u].x, lse);
        c.y += head_mass(v[u].y, lse);
        c.z += head_mass(v[u].z, lse);
        c.w += head_mass(v[u].w, lse);
      }
    }
    out[q4 - row.rank_q4] = group_keys(row, q4, c);
  }
}

// Per head, staged: the ranking keys (group_keys) of the block's keys of the score row, written to
// `out` in shared memory (which row.rank reads), 16 bytes per thread and step; no barrier, as in
// group_mass.
__device__ __forceinline__ void stage_scores(const SelectRow& row, uint4* out) {
  for (int q4 = row.first / 4 + threadIdx.x; q4 < (row.end + 3) / 4; q4 += kSelectThreads)
    out[q4 - row.rank_q4] = group_keys(row, q4, reinterpret_cast<const float4*>(row.scores)[q4]);
}

// Ranking keys of keys 4·q4 .. 4·q4 + 3 (one 16-byte load of what is ranked): the keys as written
// (kKeyed), or float_key of the scores. Unkeyed, entries outside the block's keys are read from
// the row's padding, another slice or beyond L and must be skipped by the caller (ranked_here).
template <bool kKeyed>
__device__ __forceinline__ void ranking_keys4(const SelectRow& row, int q4, uint32_t* key) {
  const uint4 v = row.rank[q4 - row.rank_q4];
  key[0] = kKeyed ? v.x : float_key(__uint_as_float(v.x));
  key[1] = kKeyed ? v.y : float_key(__uint_as_float(v.y));
  key[2] = kKeyed ? v.z : float_key(__uint_as_float(v.z));
  key[3] = kKeyed ? v.w : float_key(__uint_as_float(v.w));
}

// Whether key j may count in the radix passes and the collect: any one whose ranking key the block
// wrote (kKeyed: the 0 outside the block's keys sorts below every threshold they can reach, since
// radix_select runs only when more than n keys are ranked, all above 0, so that its threshold is
// above 0 and a later pass's prefix is not 0; and collect_candidates takes keys above the
// threshold, or equal to it only when radix_select set it), else one of the block's keys.
template <bool kKeyed>
__device__ __forceinline__ bool ranked_here(const SelectRow& row, int j) {
  return kKeyed || in_block(row, j);
}

// The radix select's digits: 11 + 11 + 10 bits from the top.
constexpr int kRadixPasses = 3;
__host__ __device__ constexpr int radix_shift(int pass) {
  return pass == 0 ? 21 : pass == 1 ? 10 : 0;
}
__host__ __device__ constexpr int radix_bits(int pass) { return pass == 2 ? 10 : 11; }

// The radix select between passes: the threshold's bits decided so far, the picks still needed
// at or below them, and whether the threshold is final (an early exit).
struct RadixState {
  SelectThreshold thr;
  int remaining;
  bool done;
};

// Histogram into sh.hist (zeroed here) of pass `pass`'s digit of the block's keys whose bits above
// the digit equal the prefix. Every thread must call it; ends with a barrier.
template <bool kKeyed>
__device__ __forceinline__ void radix_histogram(const SelectRow& row, uint32_t prefix, int pass,
                                                SelectShared& sh) {
  const uint32_t hi_mask = pass == 0 ? 0u : ~0u << (radix_shift(pass) + radix_bits(pass));
  const uint32_t digit_mask = (1u << radix_bits(pass)) - 1u;
  static_assert(kSelectBins % kSelectThreads == 0, "whole bins a thread");
#pragma unroll
  for (int i = 0; i < kSelectBins / kSelectThreads; ++i)
    sh.hist[i * kSelectThreads + threadIdx.x] = 0;
  __syncthreads();
#pragma unroll 2
  for (int q4 = row.first / 4 + threadIdx.x; q4 < (row.end + 3) / 4; q4 += kSelectThreads) {
    uint32_t key[4];
    ranking_keys4<kKeyed>(row, q4, key);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (ranked_here<kKeyed>(row, 4 * q4 + e) && (key[e] & hi_mask) == prefix)
        atomicAdd(&sh.hist[(key[e] >> radix_shift(pass)) & digit_mask], 1);
    }
  }
  __syncthreads();
}

// Pass `pass`'s digit from the histogram in sh.hist: the bin where the count from the top reaches
// st.remaining; ends the select (st.done) when that bin holds exactly the keys still needed.
// Thread t owns bins [4t, 4t + 4). Each warp sums its lanes' bins from the top (a suffix sum);
// after one barrier every warp alike finds, from the warps' totals, the highest warp whose bins
// and those above reach st.remaining, and only that warp's lanes look into their bins; the other
// warps wait at the next barrier (a block-wide scan made every thread scan the warps' totals).
// Block-uniform; every thread must call it; ends with a barrier.
__device__ __forceinline__ void radix_digit(int pass, RadixState& st, SelectShared& sh) {
  constexpr int kWarps = kSelectThreads / 32;
  static_assert(kWarps < 32 && kSelectBins == 4 * kSelectThreads, "a lane a warp; 4 bins a lane");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int4 bins = reinterpret_cast<const int4*>(sh.hist)[threadIdx.x];  // bins 4t .. 4t + 3
  const int mine = bins.x + bins.y + bins.z + bins.w;
  const int upper = warp_suffix_sum(mine);  // keys in this lane's bins and its warp's higher lanes'
  if (lane == 0) sh.warp_total[warp] = upper;
  __syncthreads();
  // lane w < kWarps: the keys in warps w and above; the threshold's warp is the highest w whose
  // sum reaches st.remaining (warp 0's sum, the pass's keys, always does)
  const int from_warp = warp_suffix_sum(lane < kWarps ? sh.warp_total[lane] : 0);
  int found = from_warp >= st.remaining ? lane : -1;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) found = max(found, __shfl_xor_sync(kFullMask, found, off));
  const int above_warp = __shfl_sync(kFullMask, from_warp, found + 1);  // keys in higher warps
  if (warp == found) {  // warp-uniform
    int above = above_warp + upper - mine;  // keys in the bins of higher threads
    const int c[4] = {bins.x, bins.y, bins.z, bins.w};
#pragma unroll
    for (int i = 3; i >= 0; --i) {
      if (above < st.remaining && above + c[i] >= st.remaining) {
        sh.digit = 4 * threadIdx.x + i;
        sh.remaining = st.remaining - above;
        sh.bin_count = c[i];
      }
      above += c[i];
    }
  }
  __syncthreads();
  st.thr.key |= static_cast<uint32_t>(sh.digit) << radix_shift(pass);
  st.remaining = sh.remaining;
  const bool bin_taken = sh.bin_count == st.remaining;  // every key of the bin is a pick
  __syncthreads();  // sh.digit / sh.remaining / sh.bin_count are rewritten in the next pass
  if (bin_taken || pass == kRadixPasses - 1) {
    st.thr.mask = ~0u << radix_shift(pass);
    st.thr.need_eq = st.remaining;
    st.thr.take_all_eq = bin_taken;
    st.done = true;
  }
}

// Phase 2: the threshold of the block's n best keys by a 3-pass radix select over histograms in
// shared memory, ending early when the threshold's bin holds exactly the keys still needed;
// already final (threshold 0, below every key) when every key is taken (end - first <= n).
// Block-uniform; every thread must call it.
template <bool kKeyed>
__device__ __forceinline__ SelectThreshold radix_select(const SelectRow& row, int n,
                                                        SelectShared& sh) {
  RadixState st = {.thr = {.key = 0u, .mask = ~0u, .need_eq = 0, .take_all_eq = false},
                   .remaining = n,
                   .done = row.end - row.first <= n};
#pragma unroll
  for (int pass = 0; pass < kRadixPasses && !st.done; ++pass) {
    radix_histogram<kKeyed>(row, st.thr.key, pass, sh);
    radix_digit(pass, st, sh);
  }
  return st.thr;
}

// A candidate as sorted: (key << 32) | ~index, so that equal keys order by ascending index. 0, the
// padding, sorts below every candidate.
__device__ __forceinline__ unsigned long long candidate(uint32_t key, int j) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<uint32_t>(~j);
}

// Phase 3: the block's count picks into sh.cand[0, count), in no order: keys above the threshold
// at slots from a shared counter, keys equal to it (under thr.mask) in index order through a
// block-wide scan, 4·kSelectThreads keys per tile; when all of those are taken (take_all_eq), at
// counter slots with the keys above it, and no scan. Every thread must call it; ends with a
// barrier.
template <bool kKeyed>
__device__ __forceinline__ void collect_candidates(const SelectRow& row, SelectThreshold thr,
                                                   int count, SelectShared& sh) {
  const int n_gt = count - thr.need_eq;  // keys strictly above the threshold
  const int unordered = thr.take_all_eq ? count : n_gt;  // picks taken in any order
  const bool ordered_eq = thr.need_eq > 0 && !thr.take_all_eq;
  if (threadIdx.x == 0) sh.n_gt = 0;
  __syncthreads();
  int eq_base = 0;  // keys equal to the threshold in earlier tiles (the same in every thread)
  const int end4 = (row.end + 3) / 4;
  for (int base4 = row.first / 4; base4 < end4; base4 += kSelectThreads) {  // block-uniform
    const int q4 = base4 + threadIdx.x;
    uint32_t key[4] = {0u, 0u, 0u, 0u};
    if (q4 < end4) ranking_keys4<kKeyed>(row, q4, key);
    int my_eq = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = 4 * q4 + e;
      const uint32_t top = key[e] & thr.mask;
      if (ranked_here<kKeyed>(row, j) &&
          (top > thr.key || (thr.take_all_eq && top == thr.key))) {
        const int pos = atomicAdd(&sh.n_gt, 1);
        if (pos < unordered) sh.cand[pos] = candidate(key[e], j);
      }
      my_eq += ordered_eq && ranked_here<kKeyed>(row, j) && top == thr.key;
    }
    if (!ordered_eq) continue;  // block-uniform
    int tile_total;
    int rank = eq_base + block_exclusive_scan(my_eq, tile_total, sh);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = 4 * q4 + e;
      if (ranked_here<kKeyed>(row, j) && (key[e] & thr.mask) == thr.key) {
        if (rank < thr.need_eq) sh.cand[n_gt + rank] = candidate(key[e], j);
        ++rank;
      }
    }
    eq_base += tile_total;
  }
  __syncthreads();
}

// The key position of candidate c (the low 32 bits hold ~index).
__device__ __forceinline__ int cand_index(unsigned long long c) {
  return static_cast<int>(~static_cast<uint32_t>(c));
}

// Head h's full-softmax mass exp(s_j - lse) of sorted pick i, 0 where it is NaN (as the
// reference's nan_to_num) or the pick is not a valid key. The float32 exp rounded from double,
// nearer the reference's torch.exp and the CPU op's std::exp (neither promises correct rounding)
// than expf: with expf and logf (each off by up to an ulp or two), 8 equal scores (each mass
// 0.125 only when rounded to nearest), whose prefix of 4 reaches top_p = 0.5 exactly, kept a
// fifth entry on the H200.
__device__ __forceinline__ double pick_mass(const SelectRow& row, int h, int i,
                                            const SelectShared& sh) {
  const int j = cand_index(sh.cand[i]);
  if (j < 0 || j >= row.len) return 0.0;
  const float m =
      static_cast<float>(exp(double{row.scores[h * row.score_stride + j] - sh.lse[h]}));
  return isnan(m) ? 0.0 : static_cast<double>(m);
}

// With top_p < 1, the entries each head of the row keeps, into sh.keep[h]: the shortest prefix of
// its count sorted picks whose mass reaches top_p (the first pick when count > 0: nothing is
// ahead of it). Warp w takes heads w, w + 16, ...; lane l the run of picks [l · run, (l + 1) ·
// run): it adds their masses, the runs' sums are scanned over the lanes (in double), and each lane
// finds its first pick with at least top_p of mass ahead of it; the first over the lanes ends the
// prefix. Every thread must call it; ends with a barrier.
__device__ __forceinline__ void mass_prefix_counts(const QkSelectParams& p, const SelectRow& row,
                                                   int count, SelectShared& sh) {
  const int lane = threadIdx.x % 32;
  const int run = (count + 31) / 32;
  const int lo = min(count, lane * run), hi = min(count, lo + run);
  for (int h = threadIdx.x / 32; h < row.nh; h += kSelectThreads / 32) {
    __syncwarp();  // the whole warp (h is per warp): its shuffles need no divergence copies
    double sum = 0.0;  // this lane's run
    for (int i = lo; i < hi; ++i) sum += pick_mass(row, h, i, sh);
    double ahead = sum;  // inclusive scan over the lanes, then shifted by one: exclusive
    for (int off = 1; off < 32; off <<= 1) {
      const double up = __shfl_up_sync(kFullMask, ahead, off);
      if (lane >= off) ahead += up;
    }
    ahead = __shfl_up_sync(kFullMask, ahead, 1);
    if (lane == 0) ahead = 0.0;
    int first = count;  // the first pick past the prefix
    for (int i = lo; i < hi; ++i) {
      if (ahead >= p.top_p) {
        first = i;
        break;
      }
      ahead += pick_mass(row, h, i, sh);
    }
    for (int off = 16; off > 0; off >>= 1)
      first = min(first, __shfl_xor_sync(kFullMask, first, off));
    if (lane == 0) sh.keep[h] = first;
  }
  __syncthreads();
}

// Phase 5: from the row's picks sorted by (key desc, index asc) in sh.cand[0, count), writes n
// entries per head of the row: the count best picks with their scores (with top_p < 1, the
// head's mass prefix of them), then padding (-1, -inf). Every thread must call it.
__device__ __forceinline__ void write_selection(const QkSelectParams& p, const SelectRow& row,
                                                int64_t row0, int count, SelectShared& sh) {
  const bool cut = p.top_p < 1.0f;
  if (cut) mass_prefix_counts(p, row, count, sh);
  // one (head, entry) per thread and step: the heads' score loads all in flight at once
  for (int o = threadIdx.x; o < row.nh * p.n; o += kSelectThreads) {
    const int h = o / p.n, i = o - h * p.n;
    const int j = i < count ? cand_index(sh.cand[i]) : -1;
    const bool kept = j >= 0 && j < row.len && (!cut || i < sh.keep[h]);
    p.out_indices[row0 * p.n + o] = kept ? j : -1;
    p.out_scores[row0 * p.n + o] = kept ? row.scores[h * row.score_stride + j] : -INFINITY;
  }
}

// The end of a row's ranked keys skip_first <= j < len - skip_last (none when that is empty).
__device__ __forceinline__ int ranked_end(const QkSelectParams& p, int len) {
  return max(0, len - p.skip_last);
}

// Where the block stages its slice's ranking keys, [slice_keys / 4] in sh; nullptr when the plan
// does not stage them.
__device__ __forceinline__ uint4* staged_keys(const QkSelectParams& p, SelectShared& sh) {
  return p.staged ? sh.keys4 + staged_keys_offset(p.n) : nullptr;
}

// Group mode, not staged: the group mass's key row of KV head x of sequence b, [score_stride / 4].
__device__ __forceinline__ uint4* mass_row(const QkSelectParams& p, int b, int x) {
  const int64_t row = static_cast<int64_t>(b) * p.hkv + x;  // in [B, Hkv]
  return reinterpret_cast<uint4*>(p.mass_keys + row * p.score_stride);
}

// The ranked row `x` (query head, or KV head in group mode) of sequence b, its ranked keys
// [first, end) in slice `slice`, and the index of its first query head in [B, Hq] (row0). What it
// ranks: `staged` (the slice's keys in shared memory, its first group the slice's first) where
// not nullptr, else the group mass's key row or the score row.
__device__ __forceinline__ SelectRow select_row(const QkSelectParams& p, int b, int x, int slice,
                                                const uint4* staged, int64_t& row0) {
  const int G = p.hq / p.hkv;
  row0 = static_cast<int64_t>(b) * p.hq + (p.group_select ? x * G : x);
  const float* scores = p.scores + row0 * p.score_stride;  // [nh, score_stride]
  const int len = clamped_len(p.seq_lens, p.seq_stride, b, p.s);
  const int64_t begin = slice * p.slice_keys;  // < S for every launched slice
  const int64_t end = min(static_cast<int64_t>(ranked_end(p, len)), begin + p.slice_keys);
  return {
      .scores = scores,
      .rank = staged           ? staged
              : p.group_select ? mass_row(p, b, x)
                               : reinterpret_cast<const uint4*>(scores),
      .rank_q4 = staged ? static_cast<int>(begin / 4) : 0,
      .score_stride = p.score_stride,
      .nh = p.group_select ? G : 1,
      .len = len,
      .first = static_cast<int>(max(begin, static_cast<int64_t>(p.skip_first))),
      .end = static_cast<int>(end),
  };
}

// The sorted picks [slices, n] of ranked row blockIdx.y of sequence b in p.picks.
__device__ __forceinline__ unsigned long long* row_picks(const QkSelectParams& p, int b) {
  return p.picks + (static_cast<int64_t>(b) * gridDim.y + blockIdx.y) * gridDim.x * p.n;
}

// Whether this block is the last of its row's slices to finish. After a barrier (every thread's
// picks written), thread 0 fences, which orders the whole block's picks before its ticket from
// the row's counter (a fence is cumulative over the barrier, as in a grid-wide sync), and the
// thread that takes the last ticket fences again before its block reads the other slices'
// picks. One fence per block, not per thread. Block-uniform; every thread must call it.
__device__ __forceinline__ bool last_slice(const QkSelectParams& p, int b, SelectShared& sh) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    int* done = p.slices_done + static_cast<int64_t>(b) * gridDim.y + blockIdx.y;
    const bool last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
    if (last) __threadfence();
    sh.last = last;
  }
  __syncthreads();
  return sh.last;
}

// The row's last block: its lse (in group mode already in sh.lse from select_lse) and the tree
// merge of its slices' sorted picks, each list padded to bitonic_size(n) in shared memory
// (slices · bitonic_size(n) <= kMaxTopN; the staged keys there are no longer needed), read
// through L2 (__ldcg: written by other blocks), then the row's selection written. The row is
// taken again from the block's indices (not kept live through the radix passes, whose registers
// it would spill).
__device__ __forceinline__ void merge_slices(const QkSelectParams& p, SelectShared& sh) {
  const int b = blockIdx.z;
  int64_t row0;
  const SelectRow row = select_row(p, b, blockIdx.y, 0, nullptr, row0);  // not ranked here
  if (p.group_select) {
    for (int h = threadIdx.x; h < row.nh; h += kSelectThreads) p.out_lse[row0 + h] = sh.lse[h];
  } else {
    select_lse(p, row0, row.nh, true, sh);
  }
  const int size = bitonic_size(p.n);  // one slice's list
  const int log_size = log2_pow2(size);
  const unsigned long long* picks = row_picks(p, b);  // [slices, n]
  for (int i = threadIdx.x; i < p.slices * size; i += kSelectThreads) {
    const int t = i & (size - 1);  // entry t of slice i / size
    sh.cand[i] = t < p.n ? __ldcg(picks + (i >> log_size) * p.n + t) : 0ull;
  }
  __syncthreads();
  block_merge_sorted_lists<kSelectThreads>(sh.cand, p.slices, size);
  // the row's picks: min(n, its ranked keys)
  write_selection(p, row, row0, max(0, min(p.n, ranked_end(p, row.len) - p.skip_first)), sh);
}

// grid (slices, Hq or Hkv in group mode, B), block kSelectThreads, kSelectBlocksPerSm per SM.
// Each block ranks its slice of a row: in group mode it first merges the heads' lse and writes the
// slice's group mass; then radix_select and collect_candidates take the slice's min(n, keys) best
// keys, which phase 4 sorts. With one slice that is the row's selection, written here; with
// several, the slice's sorted picks (n slots, padded with 0) go to p.picks, and the row's last
// block to finish merges them: every key of the row's n best is among its slice's n best.
__global__ void __launch_bounds__(kSelectThreads, kSelectBlocksPerSm)
    qk_select_kernel(QkSelectParams p) {
  __shared__ SelectShared sh;
  const int b = blockIdx.z;
  const bool whole_row = gridDim.x == 1;
  uint4* staged = staged_keys(p, sh);  // [slice_keys / 4] or nullptr
  int64_t row0;
  const SelectRow row = select_row(p, b, blockIdx.y, blockIdx.x, staged, row0);
  if (p.group_select || whole_row) select_lse(p, row0, row.nh, whole_row, sh);
  if (p.group_select) {
    group_mass(row, staged ? staged : mass_row(p, b, blockIdx.y), sh);
  } else if (staged) {
    stage_scores(row, staged);
  }
  const int count = max(0, min(p.n, row.end - row.first));  // the block's picks
  const int size = bitonic_size(count);
  for (int i = threadIdx.x; i < size; i += kSelectThreads) sh.cand[i] = 0ull;  // sorts last
  if (p.group_select || staged) {  // block-uniform: the block wrote the keys it ranks
    collect_candidates<true>(row, radix_select<true>(row, p.n, sh), count, sh);
  } else {
    collect_candidates<false>(row, radix_select<false>(row, p.n, sh), count, sh);
  }
  block_bitonic_sort<kSelectThreads, true>(sh.cand, size);  // phase 4: (key desc, index asc)
  if (whole_row) {
    write_selection(p, row, row0, count, sh);
    return;
  }
  unsigned long long* picks = row_picks(p, b) + blockIdx.x * p.n;  // [n]
  for (int i = threadIdx.x; i < p.n; i += kSelectThreads) picks[i] = i < count ? sh.cand[i] : 0ull;
  if (last_slice(p, b, sh)) merge_slices(p, sh);
}

}  // namespace kcache_ops
