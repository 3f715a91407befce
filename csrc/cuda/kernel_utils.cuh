// Device helpers shared by the kernels: 16-byte vector loads and conversions, asynchronous
// evict-first copies to shared memory, the order-preserving float->uint32 key, warp reductions, a
// sequence's clamped length, a block's chunk of keys and slice of query heads (qk_topn,
// lowbit_tail), and the per-lane q slices, dot products and reduce-scatter of qk_topn's score
// kernel, which scores key rows against a group of query heads. Plain CUDA: no torch headers
// (flashinfer keeps torch out of its kernels), so the *_kernel.cuh headers stay independent of
// the launchers.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

namespace kcache_ops {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Elements of T in one 16-byte vector, and its conversion to float32.
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ __forceinline__ static float one(float x) { return x; }
  __device__ __forceinline__ static float from(float x) { return x; }
};

template <>
struct Vec16<__half> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static float one(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
};

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static float one(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// One 16-byte load (LDG.E.128); p must be 16-byte aligned.
__device__ __forceinline__ uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// Starts an asynchronous 16-byte copy from global to shared memory (cp.async, bypassing L1) of
// data read once, marked evict-first in L2 so that it does not push out data read again soon;
// complete after __pipeline_commit and __pipeline_wait_prior. Both pointers 16-byte aligned.
// Before sm_80 (and in the CPU emulator, tests/cuda_emu) a plain __pipeline_memcpy_async.
__device__ __forceinline__ void copy16_async_evict_first(void* dst_shared, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint64_t policy;  // no side effect: computed once per kernel
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(dst_shared))),
               "l"(src), "l"(policy)
               : "memory");
#else
  __pipeline_memcpy_async(dst_shared, src, 16);
#endif
}

// a & b as one instruction where nvcc would make two: given (x | c1) & c2 with constants, it
// rewrites the expression as (x & c2) | (c1 & c2), an AND and an OR; the PTX `and` stays one LOP3.
// Plain C++ in the CPU emulator.
__device__ __forceinline__ uint32_t and_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("and.b32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  return a & b;
#endif
}

#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
// A model of one block FMA of the tensor cores, c + x[0] · y[0] + ... + x[3] · y[3] over tf32
// values, after what Fasi et al. (2021, "Numerical behavior of NVIDIA tensor cores") measured on
// the A100: the products exact, each addend's significand aligned to the largest addend's and cut
// below its 24 bits (no extra alignment bit: the most pessimistic of their findings), the aligned
// addends summed exactly, the sum cut to float32 (round toward zero; an overflow gives inf, as
// IEEE addition does). With a non-finite addend, the IEEE sum (inf and NaN as there).
__device__ inline float tensor_core_fma4(float c, const float (&x)[4], const float (&y)[4]) {
  // tf32 products have at most 22 significant bits: exact in double
  const double terms[5] = {c, static_cast<double>(x[0]) * y[0], static_cast<double>(x[1]) * y[1],
                           static_cast<double>(x[2]) * y[2], static_cast<double>(x[3]) * y[3]};
  double ieee = 0.0;
  int top = -100000;  // the largest addend's exponent (frexp's: |v| < 2^top)
  for (const double v : terms) {
    ieee += v;
    int e = top;
    if (v != 0.0) std::frexp(v, &e);
    top = e > top ? e : top;
  }
  if (!std::isfinite(ieee) || top == -100000) return static_cast<float>(ieee);  // or all zero
  const double unit = std::ldexp(1.0, top - 24);  // the last bit of the largest's significand
  double sum = 0.0;  // exact: 5 multiples of unit below 2^24 units each
  for (const double v : terms) sum += std::trunc(v / unit) * unit;
  const float f = static_cast<float>(sum);  // to nearest; then toward zero where that was away
  return std::isfinite(f) && std::fabs(f) > std::fabs(sum) ? std::nextafter(f, 0.0f) : f;
}
#endif

// One warp's D += A · B on the tensor cores (mma.sync m16n8k8, tf32 inputs, float32
// accumulation): A 16 x 8, B 8 x 8, D 16 x 8. Lane (g, t) = (lane / 4, lane % 4) holds
// a = {A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4]}, b = {B[t][g], B[t + 4][g]} and
// d = {D[g][2t], D[g][2t + 1], D[g + 8][2t], D[g + 8][2t + 1]}; the inputs are float bits, of which
// the tensor cores read the tf32 part (the low 13 mantissa bits are ignored). Every lane of the
// warp calls it. Before sm_80 (and in the CPU emulator) the same product from shuffles, the inputs
// cut to tf32 in the same way, each element's products k = 0..3 and then 4..7 added as the
// tensor cores are modelled to add them (tensor_core_fma4: truncating, so the emulator's sums
// drift at least as far as the hardware's are measured to).
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  constexpr uint32_t kTf32 = 0xffffe000u;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // rows[r][k] = A[g + 8r][k], cols[c][k] = B[k][2t + c], by halves of k: [half][k % 4]
  float rows[2][2][4], cols[2][2][4];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    // A[row][k] is a[2 · hi + row / 8] of lane 4 · (row % 8) + from, B[k][col] is b[hi] of lane
    // 4 · col + from
    const int from = k % 4, hi = k / 4;
    for (int r = 0; r < 2; ++r)
      rows[r][hi][from] =
          __uint_as_float(__shfl_sync(kFullMask, a[2 * hi + r], 4 * g + from) & kTf32);
    for (int c = 0; c < 2; ++c)
      cols[c][hi][from] =
          __uint_as_float(__shfl_sync(kFullMask, b[hi], 4 * (2 * t + c) + from) & kTf32);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {  // d[e] = D[g + 8 (e / 2)][2t + e % 2]
    for (int hi = 0; hi < 2; ++hi)
      d[e] = tensor_core_fma4(d[e], rows[e / 2][hi], cols[e % 2][hi]);
  }
#endif
}

// Stores a float that is read again soon (by the next kernel), marked evict-last in L2, so that
// data streamed through L2 meanwhile (marked evict-first) does not push it out. Before sm_80 (and
// in the CPU emulator) a plain store.
__device__ __forceinline__ void store_evict_last(float* p, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint64_t policy;  // no side effect: computed once per kernel
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;" ::"l"(p), "f"(v), "l"(policy)
               : "memory");
#else
  *p = v;
#endif
}

// Order-preserving map float -> uint32 (a < b  <=>  key(a) < key(b)); -0 is folded into +0 so that
// equal scores tie (and tie to the lower index) as they do in torch.sort, and every NaN, whatever its
// sign, maps to the largest key, above +inf: torch.sort ranks NaN first in descending order.
__device__ __forceinline__ uint32_t float_key(float f) {
  if (isnan(f)) return 0xffffffffu;
  const uint32_t bits = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Running (max, sum of exp(x - max)) of a stream of scores; merging is exact up to rounding and
// never produces NaN for empty (-inf, 0) states. A NaN score makes the state (NaN, NaN) for good
// (fmaxf alone would drop it), so its row's lse is NaN, as the reference's logsumexp.
struct MaxSum {
  float m;
  float l;
};

// Two (max, sumexp) states as one. An infinite max is the log-sum-exp itself, as torch.logsumexp:
// (-inf, 0) when every score was -inf, (+inf, 1) once one was +inf (no exp(inf - inf)).
__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
  if (isnan(a.m) || isnan(b.m)) return {NAN, NAN};
  const float m = fmaxf(a.m, b.m);
  if (isinf(m)) return {m, m > 0.0f ? 1.0f : 0.0f};
  return {m, a.l * expf(a.m - m) + b.l * expf(b.m - m)};
}

constexpr float kLog2e = 1.4426950408889634f;

// The state of an empty stream for maxsum_add: a finite max, so that adding -inf never computes
// -inf - (-inf). maxsum_finish turns it back into (-inf, 0).
__device__ __forceinline__ MaxSum maxsum_empty() { return {-FLT_MAX, 0.0f}; }

// Adds one score s with one exp (exp2): the smaller of (s, max) relative to the larger; s equal to
// the max adds 1 (so that +inf added to +inf is not exp(inf - inf)). A NaN score makes l NaN for
// good; maxsum_finish turns that into (NaN, NaN).
__device__ __forceinline__ void maxsum_add(MaxSum& r, float s) {
  const bool up = s > r.m;
  const float e = s == r.m ? 1.0f : exp2f((up ? r.m - s : s - r.m) * kLog2e);
  r.l = up ? fmaf(r.l, e, 1.0f) : r.l + e;
  r.m = up ? s : r.m;
}

// A maxsum_add state as maxsum_merge takes it: (-inf, 0) when nothing was added, (NaN, NaN) after
// a NaN.
__device__ __forceinline__ MaxSum maxsum_finish(MaxSum r) {
  if (isnan(r.l)) return {NAN, NAN};
  return r.l == 0.0f ? MaxSum{-INFINITY, 0.0f} : r;
}

// Butterfly reduction over the 32 lanes: every lane ends with the same value.
__device__ __forceinline__ MaxSum warp_maxsum(MaxSum v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(kFullMask, v.m, off), __shfl_xor_sync(kFullMask, v.l, off)};
    v = maxsum_merge(v, o);
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// kValues partial dots v (of several keys and heads) whose lanes are the kLanes lanes that share a
// key, summed over those lanes and scattered over them: at each butterfly step a lane keeps half of
// its values (the upper lane of a pair the upper half) and adds its partner's copy of them, so lane
// `sub` ends with the full sum of value sub / (kLanes / kValues) in v[0]. kValues - 1 +
// log2(kLanes / kValues) shuffles instead of kValues · log2(kLanes). Every lane of the warp must
// call it.
template <int kValues, int kLanes>
__device__ __forceinline__ float reduce_scatter(float (&v)[kValues], int sub) {
  static_assert(kValues <= kLanes && (kValues & (kValues - 1)) == 0, "one value per lane");
  constexpr int kSteps = kLanes >= 32 ? 5 : kLanes >= 16 ? 4 : kLanes >= 8 ? 3 : 2;  // log2
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int off = kLanes >> (step + 1);
    const bool upper = (sub & off) != 0;
#pragma unroll
    for (int i = 0; i < kValues / 2; ++i) {
      const int half = (kValues >> step) / 2;  // values kept after this step (0: only v[0] is left)
      if (i < half) {
        const float send = upper ? v[i] : v[i + half];
        const float keep = upper ? v[i + half] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, off);
      }
    }
    if ((kValues >> step) / 2 == 0) v[0] += __shfl_xor_sync(kFullMask, v[0], off);
  }
  return v[0];
}

// L_b = seq_lens[b · stride] clamped to [0, s].
__device__ __forceinline__ int clamped_len(const int32_t* seq_lens, int64_t stride, int b, int s) {
  const int l = seq_lens[b * stride];
  return l < 0 ? 0 : (l > s ? s : l);
}

// What one block of a grid (num_chunks, Hkv · slices, B) covers, where each KV head's group of
// hq / hkv query heads is cut into `slices` slices of up to GS heads and the keys into chunks of
// `chunk`: sequence b, KV head kvh, query heads h0 .. h0 + gs - 1, keys chunk_begin ..
// chunk_end - 1 (chunk_end at most L_b; chunk_begin >= chunk_end leaves the block no key).
struct ChunkBlock {
  int b, kvh, h0, gs, chunk_begin, chunk_end;
};

template <int GS>
__device__ __forceinline__ ChunkBlock chunk_block(const int32_t* seq_lens, int64_t seq_stride,
                                                  int hq, int hkv, int s, int slices, int chunk) {
  const int b = blockIdx.z;
  const int kvh = blockIdx.y / slices;
  const int G = hq / hkv;
  const int h0 = kvh * G + (blockIdx.y % slices) * GS;
  const int len = clamped_len(seq_lens, seq_stride, b, s);
  const int chunk_begin = blockIdx.x * chunk;
  return {.b = b,
          .kvh = kvh,
          .h0 = h0,
          .gs = min(GS, kvh * G + G - h0),
          .chunk_begin = chunk_begin,
          .chunk_end = min(chunk_begin + chunk, len)};
}

// This lane's piece `sub` (kVec elements from sub · kVec) of the query heads h0 .. h0 + GS - 1 as
// float32; heads from gs on are zeros. q: one sequence's rows [Hq, D] of T, head stride q_sh.
template <typename T, int GS, int kVec>
__device__ __forceinline__ void load_q_slice(float (&qf)[GS][kVec],  // [GS, kVec] out
                                             const T* q, int64_t q_sh, int h0, int gs, int sub) {
#pragma unroll
  for (int h = 0; h < GS; ++h) {
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      qf[h][e] = h < gs ? Vec16<T>::one(q[(h0 + h) * q_sh + sub * kVec + e]) : 0.0f;
  }
}

// This lane's partial dots of its piece of a key row with each of the GS heads' pieces
// (fmaf over e in order; the lanes of a key then sum them).
template <int GS, int kVec>
__device__ __forceinline__ void dot_heads(const float (&qf)[GS][kVec],  // [GS, kVec]
                                          const float (&kf)[kVec],      // [kVec]
                                          float* dot) {                 // [GS] out
#pragma unroll
  for (int h = 0; h < GS; ++h) {
    float d = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) d = fmaf(qf[h][e], kf[e], d);
    dot[h] = d;
  }
}

// The score of this lane's (key, head) pair among kJoint keys and GS query heads: raw [kJoint]
// are this lane's 16-byte pieces of the keys' rows, qf its pieces of the heads; the kJoint · GS
// dots are reduce-scattered over the kLanes lanes of a key (reduce_scatter), times scale. Every
// lane of the warp must call it.
template <typename T, int GS, int kJoint, int kLanes>
__device__ __forceinline__ float joint_score(const float (&qf)[GS][Vec16<T>::kElems],
                                             const uint4* raw, int sub, float scale) {
  constexpr int kVec = Vec16<T>::kElems;
  float dot[kJoint * GS];  // [kJoint, GS]
#pragma unroll
  for (int t = 0; t < kJoint; ++t) {
    float kf[kVec];
    Vec16<T>::to_float(raw[t], kf);
    dot_heads<GS, kVec>(qf, kf, dot + t * GS);
  }
  return reduce_scatter<kJoint * GS, kLanes>(dot, sub) * scale;
}

// Exclusive prefix sum of v over the kThreads threads of a block, in a fixed order, and the
// block's total; warp_total [kThreads / 32] in shared memory. Every thread must call it. It reads
// warp_total after its only barrier: a second call needs a barrier in between.
template <int kThreads>
__device__ __forceinline__ int block_scan(int v, int& total, int* warp_total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int t = __shfl_up_sync(kFullMask, inc, off);
    if (lane >= off) inc += t;
  }
  if (lane == 31) warp_total[warp] = inc;
  __syncthreads();
  int before = inc - v;
  total = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    before += w < warp ? warp_total[w] : 0;
    total += warp_total[w];
  }
  return before;
}

// Sum of v over this lane and the lanes above it in the warp (an inclusive suffix sum). Every lane
// of the warp must call it.
__device__ __forceinline__ int warp_suffix_sum(int v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int up = __shfl_down_sync(kFullMask, v, off);
    if (lane + off < 32) v += up;
  }
  return v;
}

// The smallest power of two >= count (1 for count <= 1): block_bitonic_sort's size for count keys.
__host__ __device__ constexpr int bitonic_size(int count) {
  int size = 1;
  while (size < count) size <<= 1;
  return size;
}

// log2 of a power of two.
__host__ __device__ constexpr int log2_pow2(int size) {
  int log = 0;
  while ((1 << log) < size) ++log;
  return log;
}

// block_bitonic_sort's network for size <= 64 in one warp's registers: lane l holds entries l and
// l + 32 and takes each stage's partner l ^ stride of either by a shuffle (stride 32: its own
// other entry), so that no stage waits on a block barrier. Every lane of the warp must call it;
// it reads and writes only its own two entries of key (those below size).
template <bool kDescending>
__device__ __forceinline__ void warp_bitonic_sort(unsigned long long* key, int size) {
  const int lane = threadIdx.x % 32;
  unsigned long long x[2];  // entries lane and lane + 32 (0 past size: never written back)
#pragma unroll
  for (int h = 0; h < 2; ++h) x[h] = lane + 32 * h < size ? key[lane + 32 * h] : 0ull;
  for (int k = 2; k <= size; k <<= 1) {
    for (int stride = k >> 1; stride > 0; stride >>= 1) {
      if (stride == 32) {  // k = 64: this lane's two entries are a pair (ascending: 64 & i = 0)
        if (kDescending ? x[0] < x[1] : x[0] > x[1]) {
          const unsigned long long t = x[0];
          x[0] = x[1];
          x[1] = t;
        }
        continue;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && size <= 32) break;  // warp-uniform: no entry l + 32
        const int i = lane + 32 * h;
        const unsigned long long other = __shfl_xor_sync(kFullMask, x[h], stride);  // l ^ stride's
        const bool ascending = ((i & k) == 0) != kDescending;  // this pair's direction
        const bool keep_min = ((i & stride) == 0) == ascending;  // the pair's first keeps the min
        if (keep_min ? other < x[h] : other > x[h]) x[h] = other;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (lane + 32 * h < size) key[lane + 32 * h] = x[h];
  }
}

// Sorts key[0, size) by a block of kThreads threads, size a power of two, descending if
// kDescending else ascending: a bitonic network of log2(size) · (log2(size) + 1) / 2
// compare-exchange stages, one barrier each, every thread taking size / 2 / kThreads pairs of a
// stage; up to 64 keys, by warp 0 alone without barriers (warp_bitonic_sort). Every thread must
// call it, after a barrier that makes key visible to all; ends with a barrier.
template <int kThreads, bool kDescending>
__device__ __forceinline__ void block_bitonic_sort(unsigned long long* key, int size) {
  if (size <= 64) {  // block-uniform
    if (threadIdx.x < 32) warp_bitonic_sort<kDescending>(key, size);
    __syncthreads();
    return;
  }
  for (int k = 2; k <= size; k <<= 1) {
    for (int stride = k >> 1; stride > 0; stride >>= 1) {
      for (int q = threadIdx.x; q < size / 2; q += kThreads) {
        const int i = 2 * q - (q & (stride - 1));  // q with a 0 inserted at bit log2(stride)
        const unsigned long long a = key[i], c = key[i + stride];
        const bool ascending = ((i & k) == 0) != kDescending;  // this pair's direction
        if (ascending ? a > c : a < c) {
          key[i] = c;
          key[i + stride] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Merges `lists` lists key[l · size, (l + 1) · size) (size a power of two), each sorted
// descending, into the `size` largest keys of all of them, sorted descending, in key[0, size): a
// tree of pairwise merges by a block of kThreads threads. At the level of width w, every list a
// that is a multiple of 2w with a list a + w beside it takes, entry by entry, the larger of its
// entry t and that list's entry size - 1 - t (the `size` largest of both, as one bitonic
// sequence), then sorts it with a bitonic merge of log2(size) compare-exchange stages. Lists
// a + w are only read at their level, so each level's steps need one barrier each:
// ceil(log2(lists)) · (1 + log2(size)) in all, where sorting the lists' union from scratch takes
// k · (k + 1) / 2 stages over all of it, k = log2(bitonic_size(lists · size)). Every thread must
// call it; ends with a barrier (none when lists = 1).
template <int kThreads>
__device__ __forceinline__ void block_merge_sorted_lists(unsigned long long* key, int lists,
                                                         int size) {
  const int log_size = log2_pow2(size);
  for (int w = 1; w < lists; w <<= 1) {
    const int pairs = (lists - w + 2 * w - 1) / (2 * w);  // lists a = 2w · m with a + w < lists
    const int pair_shift = log_size + log2_pow2(2 * w);  // list a = (q >> log_size) · 2w
    for (int q = threadIdx.x; q < pairs * size; q += kThreads) {
      const int t = (q >> log_size << pair_shift) + (q & (size - 1));  // entry t of list a
      const unsigned long long other = key[t - 2 * (q & (size - 1)) + w * size + size - 1];
      if (other > key[t]) key[t] = other;
    }
    __syncthreads();
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int q = threadIdx.x; q < pairs * size / 2; q += kThreads) {
        const int r = q & (size / 2 - 1);  // pair r of list a = (q >> (log_size - 1)) · 2w
        // r with a 0 inserted at bit log2(stride)
        const int i = (q >> (log_size - 1) << pair_shift) + 2 * r - (r & (stride - 1));
        const unsigned long long x = key[i], y = key[i + stride];
        if (x < y) {
          key[i] = y;
          key[i + stride] = x;
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace kcache_ops
