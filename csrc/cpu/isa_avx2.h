// The inner loops of the CPU ops with AVX2 + FMA + F16C intrinsics (x86-64 only). Only these
// functions are compiled for that ISA (function target attributes, no global -mavx2), and
// KC_ISA_SWITCH (isa.h) calls them only where the CPU reports the features. Same interface as
// GenericIsa (isa_generic.h).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

#define KC_AVX2 __attribute__((target("avx2,fma,f16c")))
// For the per-row helpers: inlined into their (AVX2) callers, never called through the PLT.
#define KC_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

namespace kcache_ops::cpu {

struct Avx2Isa {
  // How far ahead of the row being scored K is prefetched: 8 KiB of rows (32 bfloat16 rows of
  // 128 values). On the Zen 5 VM (bench/NOTES_CPU.md) 4 KiB left qk_topn ~20 % slower on rows of
  // 64 bfloat16 values, and 16 KiB gained nothing clear over 8 on any shape.
  static constexpr int64_t kAheadBytes = 8192;
  // And into L2 (_MM_HINT_T1) 32 KiB ahead, beside it: on an Intel Xeon VM qk_topn then took
  // 25 % less time on bfloat16 K from memory (D 128, one thread; 16 and 64 KiB did as well),
  // 5-15 % less on float32 and on SmolLM2's D 64; the Zen 5 VM measured no gain from L2 hints.
  static constexpr int64_t kL2AheadBytes = 32768;

  // 8 consecutive values as float32
  KC_AVX2_INLINE static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  KC_AVX2_INLINE static __m256 load8(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  KC_AVX2_INLINE static __m256 load8(const c10::BFloat16* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i wide = _mm256_cvtepu16_epi32(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }

  // the max of v's lanes, none NaN
  KC_AVX2_INLINE static float hmax(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }

  KC_AVX2_INLINE static float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }

  // exp of 8 floats (Cephes polynomial, about 1 ulp), subnormal results included as std::exp gives
  // them (2^n applied as 2^(n/2) · 2^(n - n/2), both normal for n down to -150): 0 below -103.98,
  // where even those round to 0; inputs above 88 are clamped there; NaN stays NaN (min/max return
  // their second operand when one is NaN).
  KC_AVX2_INLINE static __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-103.98f);
    const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(88.f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i half = _mm256_srai_epi32(ni, 1);  // n = half + (n - half)
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 pow_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 pow_b = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(_mm256_mul_ps(p, pow_a), pow_b));
  }

  // Lanes i < n of x [n < 8]; the others -inf.
  KC_AVX2_INLINE static __m256 load_tail(const float* x, int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
    return _mm256_blendv_ps(_mm256_set1_ps(-__builtin_inff()), _mm256_maskload_ps(x, mask),
                            _mm256_castsi256_ps(mask));
  }

  // Prefetches the kR rows kAheadBytes of rows past k (row stride k_stride) into L1 and those
  // kL2AheadBytes past it into L2, so memory streams ahead of the scoring (a prefetch past the
  // end of the cache is harmless).
  template <typename scalar_t, int64_t kD, int64_t kR>
  KC_AVX2_INLINE static void prefetch_ahead(const scalar_t* k, int64_t k_stride) {
    constexpr int64_t kRowBytes = kD * static_cast<int64_t>(sizeof(scalar_t));
    constexpr int64_t kAhead = kAheadBytes / kRowBytes;  // rows
    constexpr int64_t kL2Ahead = kL2AheadBytes / kRowBytes;  // rows
    for (int64_t r = 0; r < kR; ++r) {
      const char* ahead = reinterpret_cast<const char*>(k + (r + kAhead) * k_stride);
      const char* l2 = reinterpret_cast<const char*>(k + (r + kL2Ahead) * k_stride);
      for (int64_t b = 0; b < kRowBytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      for (int64_t b = 0; b < kRowBytes; b += 64) _mm_prefetch(l2 + b, _MM_HINT_T1);
    }
  }

  // s[h * s_stride + r] = scale * <q_h, k_r> for h < kH, r < kR: kR rows at once share each q
  // load, and their kR * kH accumulators are independent FMA chains.
  template <typename scalar_t, int64_t kD, int64_t kH, int64_t kR>
  KC_AVX2_INLINE static void score_step(const float* q, const scalar_t* k, int64_t k_stride,
                                        float scale, float* s, int64_t s_stride) {
    __m256 acc[kR][kH];
    for (int64_t r = 0; r < kR; ++r) {
      for (int64_t h = 0; h < kH; ++h) acc[r][h] = _mm256_setzero_ps();
    }
    prefetch_ahead<scalar_t, kD, kR>(k, k_stride);
#pragma GCC unroll 16
    for (int64_t d = 0; d < kD; d += 8) {
      __m256 kv[kR];
      for (int64_t r = 0; r < kR; ++r) kv[r] = load8(k + r * k_stride + d);
      for (int64_t h = 0; h < kH; ++h) {
        const __m256 qv = _mm256_loadu_ps(q + h * kD + d);
        for (int64_t r = 0; r < kR; ++r) acc[r][h] = _mm256_fmadd_ps(qv, kv[r], acc[r][h]);
      }
    }
    for (int64_t r = 0; r < kR; ++r) {
      for (int64_t h = 0; h < kH; ++h) s[h * s_stride + r] = hsum(acc[r][h]) * scale;
    }
  }

  // s[h * s_stride + j] = scale * <q_h, k_j> for h < kH, j < rows.
  // q [kH, kD] float32; k: rows of kD (row stride k_stride). Each K row is read once for kH heads.
  template <typename scalar_t, int64_t kD, int64_t kH>
  KC_AVX2 static void score_rows(const float* q, const scalar_t* k, int64_t k_stride,
                                 int64_t rows, float scale, float* s, int64_t s_stride) {
    constexpr int64_t kR = kH >= 8 ? 1 : kH == 4 ? 2 : 4;  // rows per step: <= 8 accumulators
    int64_t j = 0;
    for (; j + kR <= rows; j += kR) {
      score_step<scalar_t, kD, kH, kR>(q, k + j * k_stride, k_stride, scale, s + j, s_stride);
    }
    for (; j < rows; ++j) {
      score_step<scalar_t, kD, kH, 1>(q, k + j * k_stride, k_stride, scale, s + j, s_stride);
    }
  }

  // max of x [n], n >= 1; NaN when an x_i is NaN (vmaxps alone would drop it)
  KC_AVX2 static float max_of(const float* x, int64_t n) {
    __m256 m = _mm256_set1_ps(-__builtin_inff());
    __m256 nan = _mm256_setzero_ps();  // lanes that have seen a NaN
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      m = _mm256_max_ps(m, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (i < n) {
      const __m256 v = load_tail(x + i, n - i);
      m = _mm256_max_ps(m, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(nan) != 0) return __builtin_nanf("");
    return hmax(m);
  }

  // sum_i exp(x_i - shift) over x [n]
  KC_AVX2 static float sum_exp(const float* x, int64_t n, float shift) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 sum = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      sum = _mm256_add_ps(sum, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
    }
    if (i < n) sum = _mm256_add_ps(sum, exp8(_mm256_sub_ps(load_tail(x + i, n - i), sh)));
    return hsum(sum);
  }

  // exp(d), 0 in the lanes where d is NaN
  KC_AVX2_INLINE static __m256 exp8_nan_to_zero(__m256 d) {
    return _mm256_andnot_ps(_mm256_cmp_ps(d, d, _CMP_UNORD_Q), exp8(d));
  }

  // acc [n] += exp(x [n] - shift), 0 where that is NaN (a NaN x_i or shift)
  KC_AVX2 static void add_exp(float* acc, const float* x, int64_t n, float shift) {
    const __m256 sh = _mm256_set1_ps(shift);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8_nan_to_zero(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
      _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), e));
    }
    if (i < n) {
      alignas(32) float e[8];
      _mm256_store_ps(e, exp8_nan_to_zero(_mm256_sub_ps(load_tail(x + i, n - i), sh)));
      for (int64_t l = 0; i + l < n; ++l) acc[i + l] += e[l];
    }
  }

  // The first i in [begin, end) with x[i] > thr, or end; 8 keys per compare.
  KC_AVX2 static int64_t first_above(const float* x, int64_t begin, int64_t end, float thr) {
    const __m256 t = _mm256_set1_ps(thr);
    for (; begin + 8 <= end; begin += 8) {
      const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + begin), t, _CMP_GT_OQ));
      if (hits) return begin + __builtin_ctz(hits);
    }
    while (begin < end && !(x[begin] > thr)) ++begin;
    return begin;
  }

  // w [n] = exp(x [n] - shift) as lowbit_tail weighs a key (tail_weight, common.h): 8 keys an
  // exp8 (the last few through load_tail, so a key's weight does not depend on its lane), and
  // std::exp for the lanes exp8 clamps (above 88: garbage lse, never qk_topn's). x may be w.
  KC_AVX2 static void tail_weights(const float* x, float* w, int64_t n, float shift) {
    const __m256 sh = _mm256_set1_ps(shift), top = _mm256_set1_ps(88.f);
    const __m256 zero = _mm256_setzero_ps(), largest = _mm256_set1_ps(3.40282347e38f);
    for (int64_t i = 0; i < n; i += 8) {
      const int64_t lanes = n - i < 8 ? n - i : 8;
      const __m256 d = _mm256_sub_ps(lanes == 8 ? _mm256_loadu_ps(x + i) : load_tail(x + i, lanes),
                                     sh);  // -inf past the end: exp 0
      const __m256 p = exp8(d);  // NaN stays NaN, and fails p > 0 below
      alignas(32) float out[8], dl[8];
      _mm256_store_ps(out, _mm256_and_ps(_mm256_cmp_ps(p, zero, _CMP_GT_OQ),
                                         _mm256_min_ps(p, largest)));
      const int clamped = _mm256_movemask_ps(_mm256_cmp_ps(d, top, _CMP_GT_OQ));
      if (clamped != 0) {
        _mm256_store_ps(dl, d);
        for (int l = 0; l < 8; ++l) {
          if (clamped >> l & 1) out[l] = tail_weight(dl[l]);
        }
      }
      std::memcpy(w + i, out, lanes * sizeof(float));
    }
  }

  // The shifts that bring code l of 8 codes of kBits bits (low bits first) to lane l's low bits.
  template <int64_t kBits>
  KC_AVX2_INLINE static __m256i code_shifts() {
    static_assert(kBits == 2 || kBits == 4, "8 codes in 2 or 4 bytes");
    return _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits, 6 * kBits,
                             7 * kBits);
  }

  // base + step * code_l for the 8 codes in the kBits bytes at codes (sv, bv: step and base in
  // every lane; shifts: code_shifts). One FMA: GenericIsa's multiply and add give the same bits
  // wherever step * code is exact in float32 (a bfloat16 step, 8 significant bits, times a code
  // of at most 4: always, unless it overflows, which quantize_rows' copies never do).
  template <int64_t kBits>
  KC_AVX2_INLINE static __m256 dequantize8(const uint8_t* codes, __m256 sv, __m256 bv,
                                           __m256i shifts) {
    uint32_t word = 0;
    std::memcpy(&word, codes, kBits);
    const __m256i code =
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                         _mm256_set1_epi32((1 << kBits) - 1));
    return _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(code), bv);
  }

  // row [kD] = base + step * code_d, the codes of one row packed 8 / kBits to a byte, low bits
  // first: 8 codes a step (dequantize8). codes [kD * kBits / 8].
  template <int64_t kD, int64_t kBits>
  KC_AVX2 static void dequantize_row(const uint8_t* codes, float step, float base, float* row) {
    const __m256i shifts = code_shifts<kBits>();
    const __m256 sv = _mm256_set1_ps(step), bv = _mm256_set1_ps(base);
    for (int64_t d = 0; d < kD; d += 8) {
      _mm256_storeu_ps(row + d, dequantize8<kBits>(codes + d * kBits / 8, sv, bv, shifts));
    }
  }

  // sb [n, 2] = the rows' (step, base) as float32; whether all are tail_row_bounded (common.h).
  // Contiguous meta (m_stride 2) 4 rows a step, else tail_meta_rows.
  template <int64_t kBits>
  KC_AVX2 static bool tail_meta(const c10::BFloat16* meta, int64_t m_stride, int64_t n,
                                float* sb) {
    if (m_stride != 2) return tail_meta_rows<kBits>(meta, m_stride, n, sb);
    const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    constexpr float kTop = (1 << kBits) - 1;  // the largest code
    const __m256 top = _mm256_setr_ps(kTop, 1, kTop, 1, kTop, 1, kTop, 1);  // (step, base) pairs
    const __m256 limit = _mm256_set1_ps(kTailRowLimit);
    __m256 bounded = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const __m256 x = load8(meta + 2 * i);  // 4 rows' (step, base)
      _mm256_storeu_ps(sb + 2 * i, x);
      const __m256 mag = _mm256_mul_ps(_mm256_and_ps(x, no_sign), top);
      bounded = _mm256_and_ps(bounded, _mm256_cmp_ps(mag, limit, _CMP_LE_OQ));
    }
    const bool rest = tail_meta_rows<kBits>(meta + 2 * i, 2, n - i, sb + 2 * i);
    return rest && _mm256_movemask_ps(bounded) == 0xff;
  }

  // acc [kH, kD] (row stride kD) += sum over keys i < n of w[h * w_stride + i] * row_i, as
  // tail_rows; kH <= 4 heads. The sums stay in registers across the keys, kH heads by kV vectors
  // of 8 columns at a time (at most 8 sums, enough independent FMA chains to keep both FMA ports
  // busy), the keys in runs of kRun, whose codes (<= 16 KiB), weights and meta stay in L1 while
  // each run is dequantised once per tile of columns.
  template <int64_t kD, int64_t kBits, int64_t kH>
  KC_AVX2_INLINE static void tail_tile(const float* w, int64_t w_stride, int64_t n,
                                       const uint8_t* codes, int64_t c_stride, const float* sb,
                                       float* acc) {
    constexpr int64_t kV = kH == 1 ? 4 : 2, kRun = 256;
    static_assert(kD % (8 * kV) == 0, "whole tiles of 8 kV columns");
    const __m256i shifts = code_shifts<kBits>();
    for (int64_t i0 = 0; i0 < n; i0 += kRun) {
      const int64_t i1 = std::min(n, i0 + kRun);
      for (int64_t c = 0; c < kD; c += 8 * kV) {
        __m256 sum[kH][kV];
        for (int64_t h = 0; h < kH; ++h) {
          for (int64_t v = 0; v < kV; ++v) sum[h][v] = _mm256_loadu_ps(acc + h * kD + c + 8 * v);
        }
        for (int64_t i = i0; i < i1; ++i) {
          const __m256 sv = _mm256_broadcast_ss(sb + 2 * i);
          const __m256 bv = _mm256_broadcast_ss(sb + 2 * i + 1);
          const uint8_t* row = codes + i * c_stride + c * kBits / 8;
          __m256 x[kV];  // columns [c, c + 8 kV) of row i
          for (int64_t v = 0; v < kV; ++v) {
            x[v] = dequantize8<kBits>(row + v * kBits, sv, bv, shifts);
          }
          for (int64_t h = 0; h < kH; ++h) {
            const __m256 p = _mm256_broadcast_ss(w + h * w_stride + i);
            for (int64_t v = 0; v < kV; ++v) sum[h][v] = _mm256_fmadd_ps(p, x[v], sum[h][v]);
          }
        }
        for (int64_t h = 0; h < kH; ++h) {
          for (int64_t v = 0; v < kV; ++v) _mm256_storeu_ps(acc + h * kD + c + 8 * v, sum[h][v]);
        }
      }
    }
  }

  // acc [G, kD] += sum over keys i < n of w[h * w_stride + i] * row_i for each head h < G, row_i
  // = base_i + step_i * code (dequantize_row's values) with its codes at codes + i * c_stride and
  // (step_i, base_i) = (sb[2 i], sb[2 i + 1]). Every key is summed, weight 0 or not: the caller
  // gives tail_row_bounded rows only. The heads 4 at a time (Tile::tail_tile: this one, or
  // Avx512Isa's, called); in each sum the keys in order, so the bits are those of dequantize_row
  // and an axpy a key.
  template <int64_t kD, int64_t kBits, class Tile = Avx2Isa>
  KC_AVX2 static void tail_rows(const float* w, int64_t w_stride, int64_t G, int64_t n,
                                const uint8_t* codes, int64_t c_stride, const float* sb,
                                float* acc) {
    for (int64_t h = 0; h < G; h += 4) {
      const float* wh = w + h * w_stride;
      float* ah = acc + h * kD;
      switch (std::min<int64_t>(G - h, 4)) {
        case 1: Tile::template tail_tile<kD, kBits, 1>(wh, w_stride, n, codes, c_stride, sb, ah);
          break;
        case 2: Tile::template tail_tile<kD, kBits, 2>(wh, w_stride, n, codes, c_stride, sb, ah);
          break;
        case 3: Tile::template tail_tile<kD, kBits, 3>(wh, w_stride, n, codes, c_stride, sb, ah);
          break;
        default: Tile::template tail_tile<kD, kBits, 4>(wh, w_stride, n, codes, c_stride, sb, ah);
      }
    }
  }

  // acc [kD] += p * row [kD]
  template <typename scalar_t, int64_t kD>
  KC_AVX2 static void axpy(float* acc, float p, const scalar_t* row) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int64_t d = 0; d < kD; d += 8) {
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, load8(row + d), _mm256_loadu_ps(acc + d)));
    }
  }
};

}  // namespace kcache_ops::cpu
