// qk_topn's scoring loop with AVX-512 (F, BW, BF16; x86-64 only): 16 lanes per instruction, and
// for bfloat16 K the vdpbf16ps dot product (bf16 pairs, float32 accumulation: bf16 products are
// exact in float32) with no conversion of K; lowbit_tail's sums (tail_rows) 16 columns a vector;
// the exps of qk_topn's lse and group mass and of lowbit_tail's weights, and the scans of
// qk_topn's selection (max_of, first_above), 16 keys a vector. Everything else comes from
// Avx2Isa. Compiled per function (target attributes); KC_ISA_SWITCH (isa.h) picks it only where
// the CPU has the features.
// vdpbf16ps takes subnormal inputs and results as zero whatever MXCSR says: qk_topn runs this
// loop on bfloat16 only for queries whose scores that cannot move by more than 2^-58
// (bf16_query_isa, qk_topn.cpp), else the AVX2 one.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "isa_avx2.h"

#ifndef KC_AVX512_TARGET  // tests/avx512_emu/intrinsics.h compiles these loops for AVX2
#define KC_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
#endif
#define KC_AVX512 __attribute__((target(KC_AVX512_TARGET)))
#define KC_AVX512_INLINE __attribute__((target(KC_AVX512_TARGET), always_inline)) inline

namespace kcache_ops::cpu {

// maskz_cvtph_ps and extractf32x8 stand in for cvtph_ps, castps512_ps256 and reduce_add_ps, and
// the maskz forms with every lane for srlv, cvtepi32_ps, permutexvar, shuffle_f32x4 and
// extractf32x4, on which GCC 12 warns falsely (-Wmaybe-uninitialized on _mm*_undefined_*).
struct Avx512Isa : Avx2Isa {
  // 16 consecutive values as float32
  KC_AVX512_INLINE static __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
  KC_AVX512_INLINE static __m512 load16(const c10::Half* p) {
    return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

  // The two 8-lane halves of v added.
  KC_AVX512_INLINE static __m256 fold8(__m512 v) {
    return _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
  }

  // One level of a sum tree over vectors. Level 0 adds lanes i and i + 8 of a, then of b, and
  // returns a's 8 sums then b's; level 1 adds lanes i and i + 4 of each 8-lane half, level 2
  // lanes i and i + 2 of each 128-bit chunk, level 3 lanes i and i + 1 of each pair. a's sums
  // fill the lower half of the result (levels 0, 1) or of each chunk (levels 2, 3), b's the upper.
  template <int kLevel>
  KC_AVX512_INLINE static __m512 add_halves(__m512 a, __m512 b) {
    if constexpr (kLevel == 0) {
      return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0x44),
                           _mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0xEE));
    } else if constexpr (kLevel == 1) {
      return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0x88),
                           _mm512_maskz_shuffle_f32x4(0xFFFF, a, b, 0xDD));
    } else if constexpr (kLevel == 2) {
      return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
    } else {
      return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
    }
  }

  // v[i] = add_halves<kLevel>(v[2i], v[2i + 1]) for i < ceil(kN / 2), an odd last one with itself
  template <int kLevel, int64_t kN>
  KC_AVX512_INLINE static void halve(__m512* v) {
    for (int64_t i = 0; i < (kN + 1) / 2; ++i) {
      v[i] = add_halves<kLevel>(v[2 * i], v[std::min(2 * i + 1, kN - 1)]);
    }
  }

  // The lane sums of v [kN] (kN 4, 8 or 16; v is overwritten) in 4 levels of add_halves, each
  // summed as hsum(fold8(v_j)) sums one: lane l of 128-bit chunk c of the result is the sum of
  // v[(4 l + c) mod kN]. 45 shuffles and adds for 16 vectors.
  template <int64_t kN>
  KC_AVX512_INLINE static __m512 lane_sums(__m512 (&v)[kN]) {
    static_assert(kN == 4 || kN == 8 || kN == 16, "4, 8 or 16 vectors");
    halve<0, kN>(v);
    halve<1, kN / 2>(v);
    halve<2, kN / 4>(v);
    halve<3, (kN + 7) / 8>(v);
    return v[0];
  }

  // s[h * s_stride + r] = scale * (sum of the lanes of acc[h][r]), each as hsum(fold8(acc[h][r]))
  // sums it, so that a row scored alone (a tile's last rows) scores as it would among 4: equal
  // keys tie, and go to the lower index. 4 rows: one lane_sums puts head h's 4 sums in chunk h.
  template <int64_t kH, int64_t kR>
  KC_AVX512_INLINE static void store_sums(const __m512 (&acc)[kH][kR], float scale, float* s,
                                          int64_t s_stride) {
    if constexpr (kR == 4) {
      static_assert(kH == 1 || kH == 2 || kH == 4, "1, 2 or 4 heads");
      __m512 v[kH * kR];  // v[kH r + h] = acc[h][r]: head h, row r ends in lane r of chunk h
      for (int64_t h = 0; h < kH; ++h) {
        for (int64_t r = 0; r < kR; ++r) v[kH * r + h] = acc[h][r];
      }
      __m512 sums = lane_sums(v);
      if constexpr (kH < 4) {  // v[j] is in lane j / 4 of chunk j mod 4: moved to lane 4 h + r
        constexpr auto from = [](int l) {  // where lane l's sum is: head l / 4, row l % 4
          const int j = kH * (l % 4) + l / 4;
          return l / 4 < kH ? 4 * (j % 4) + j / 4 : 0;
        };
        sums = _mm512_maskz_permutexvar_ps(
            0xFFFF,
            _mm512_setr_epi32(from(0), from(1), from(2), from(3), from(4), from(5), from(6),
                              from(7), from(8), from(9), from(10), from(11), from(12), from(13),
                              from(14), from(15)),
            sums);
      }
      sums = _mm512_mul_ps(sums, _mm512_set1_ps(scale));
      _mm_storeu_ps(s, _mm512_maskz_extractf32x4_ps(0xF, sums, 0));
      if constexpr (kH > 1) _mm_storeu_ps(s + s_stride, _mm512_maskz_extractf32x4_ps(0xF, sums, 1));
      if constexpr (kH > 2) {
        _mm_storeu_ps(s + 2 * s_stride, _mm512_maskz_extractf32x4_ps(0xF, sums, 2));
        _mm_storeu_ps(s + 3 * s_stride, _mm512_maskz_extractf32x4_ps(0xF, sums, 3));
      }
    } else {
      for (int64_t h = 0; h < kH; ++h) {
        for (int64_t r = 0; r < kR; ++r) {
          s[h * s_stride + r] = hsum(fold8(acc[h][r])) * scale;
        }
      }
    }
  }

  // s[h * s_stride + r] = scale * <q_h, k_r> for h < kH <= 4, r < kR. q [kH, kD] float32, or for
  // bfloat16 K qb [kH, kD / 32] the queries as bf16 pairs (dot products by vdpbf16ps).
  template <typename scalar_t, int64_t kD, int64_t kH, int64_t kR>
  KC_AVX512_INLINE static void score_step(const float* q, const __m512bh* qb, const scalar_t* k,
                                          int64_t k_stride, float scale, float* s,
                                          int64_t s_stride) {
    __m512 acc[kH][kR];
    for (int64_t h = 0; h < kH; ++h) {
      for (int64_t r = 0; r < kR; ++r) acc[h][r] = _mm512_setzero_ps();
    }
    prefetch_ahead<scalar_t, kD, kR>(k, k_stride);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#pragma GCC unroll 8
      for (int64_t c = 0; c < kD / 32; ++c) {
        __m512bh kv[kR];
        for (int64_t r = 0; r < kR; ++r) {
          kv[r] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + r * k_stride + 32 * c));
        }
        for (int64_t h = 0; h < kH; ++h) {
          for (int64_t r = 0; r < kR; ++r) {
            acc[h][r] = _mm512_dpbf16_ps(acc[h][r], qb[h * (kD / 32) + c], kv[r]);
          }
        }
      }
    } else {
#pragma GCC unroll 16
      for (int64_t d = 0; d < kD; d += 16) {
        __m512 kv[kR];
        for (int64_t r = 0; r < kR; ++r) kv[r] = load16(k + r * k_stride + d);
        for (int64_t h = 0; h < kH; ++h) {
          const __m512 qv = _mm512_loadu_ps(q + h * kD + d);
          for (int64_t r = 0; r < kR; ++r) acc[h][r] = _mm512_fmadd_ps(qv, kv[r], acc[h][r]);
        }
      }
    }
    store_sums<kH, kR>(acc, scale, s, s_stride);
  }

  // As score_rows for at most 4 heads: steps of 4 rows, then single rows.
  template <typename scalar_t, int64_t kD, int64_t kH>
  KC_AVX512 static void score_rows_upto4(const float* q, const scalar_t* k, int64_t k_stride,
                                         int64_t rows, float scale, float* s, int64_t s_stride) {
    __m512bh qb[kH * (kD / 32)];  // bfloat16 K only: q was bfloat16, the round trip is exact
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      for (int64_t i = 0; i < kH * (kD / 32); ++i) {
        qb[i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 32 * i + 16), _mm512_loadu_ps(q + 32 * i));
      }
    }
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4) {
      score_step<scalar_t, kD, kH, 4>(q, qb, k + j * k_stride, k_stride, scale, s + j, s_stride);
    }
    for (; j < rows; ++j) {
      score_step<scalar_t, kD, kH, 1>(q, qb, k + j * k_stride, k_stride, scale, s + j, s_stride);
    }
  }

  // s[h * s_stride + j] = scale * <q_h, k_j> for h < kH, j < rows (as Avx2Isa::score_rows);
  // 8 heads go as two passes of 4 over the same rows (the second reads them from L1).
  template <typename scalar_t, int64_t kD, int64_t kH>
  KC_AVX512 static void score_rows(const float* q, const scalar_t* k, int64_t k_stride,
                                   int64_t rows, float scale, float* s, int64_t s_stride) {
    constexpr int64_t kPass = kH < 4 ? kH : 4;
    for (int64_t h = 0; h < kH; h += kPass) {
      score_rows_upto4<scalar_t, kD, kPass>(q + h * kD, k, k_stride, rows, scale,
                                            s + h * s_stride, s_stride);
    }
  }

  // exp8 over 16 lanes: the same operations lane for lane, so the same bits.
  KC_AVX512_INLINE static __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-103.98f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_maskz_max_ps(0xFFFF, lo, _mm512_maskz_min_ps(0xFFFF, _mm512_set1_ps(88.f), x));
    const __m512 n =
        _mm512_maskz_roundscale_ps(0xFFFF, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512i ni = _mm512_maskz_cvtps_epi32(0xFFFF, n);
    const __m512i half = _mm512_maskz_srai_epi32(0xFFFF, ni, 1);  // n = half + (n - half)
    const __m512i bias = _mm512_set1_epi32(127);
    const __m512 pow_a =
        _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_add_epi32(half, bias), 23));
    const __m512 pow_b = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(
        0xFFFF, _mm512_add_epi32(_mm512_sub_epi32(ni, half), bias), 23));
    return _mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), _mm512_mul_ps(p, pow_a), pow_b);
  }

  // The first min(n, 16) lanes, n >= 1
  KC_AVX512_INLINE static __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  }

  // The lanes of x [n] below 16, the rest -inf (exp16: 0).
  KC_AVX512_INLINE static __m512 load_upto16(const float* x, int64_t n) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), first_lanes(n), x);
  }

  // max of x [n], n >= 1; NaN when an x_i is NaN (vmaxps alone would drop it): 16 keys a vmaxps
  KC_AVX512 static float max_of(const float* x, int64_t n) {
    __m512 m = _mm512_set1_ps(-__builtin_inff());
    __mmask16 ordered = 0xFFFF;  // lanes that have seen no NaN
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = n - i >= 16 ? _mm512_loadu_ps(x + i) : load_upto16(x + i, n - i);
      m = _mm512_maskz_max_ps(0xFFFF, m, v);
      ordered &= _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
    }
    if (ordered != 0xFFFF) return __builtin_nanf("");
    return hmax(_mm256_max_ps(_mm512_extractf32x8_ps(m, 0), _mm512_extractf32x8_ps(m, 1)));
  }

  // The first i in [begin, end) with x[i] > thr, or end; 16 keys per compare (lanes past end
  // -inf: above no threshold).
  KC_AVX512 static int64_t first_above(const float* x, int64_t begin, int64_t end, float thr) {
    const __m512 t = _mm512_set1_ps(thr);
    for (; begin < end; begin += 16) {
      const __m512 v = end - begin >= 16 ? _mm512_loadu_ps(x + begin)
                                         : load_upto16(x + begin, end - begin);
      const unsigned hits = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
      if (hits != 0) return begin + __builtin_ctz(hits);
    }
    return end;
  }

  // sum_i exp(x_i - shift) over x [n], 16 keys an exp16
  KC_AVX512 static float sum_exp(const float* x, int64_t n, float shift) {
    const __m512 sh = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      sum = _mm512_add_ps(sum, exp16(_mm512_sub_ps(load_upto16(x + i, n - i), sh)));
    }
    return hsum(fold8(sum));
  }

  // acc [n] += exp(x [n] - shift), 0 where that is NaN (a NaN x_i or shift): Avx2Isa::add_exp's
  // bits, 16 keys an exp16.
  KC_AVX512 static void add_exp(float* acc, const float* x, int64_t n, float shift) {
    const __m512 sh = _mm512_set1_ps(shift);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 lanes = first_lanes(n - i);
      const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), sh);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, d, _CMP_ORD_Q), exp16(d));
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, acc + i), e);
      _mm512_mask_storeu_ps(acc + i, lanes, sum);
    }
  }

  // w [n] = exp(x [n] - shift) as lowbit_tail weighs a key (tail_weight, common.h), x may be w:
  // Avx2Isa's bits, 16 keys an exp16, and std::exp for the lanes it clamps (above 88: garbage lse).
  KC_AVX512 static void tail_weights(const float* x, float* w, int64_t n, float shift) {
    const __m512 sh = _mm512_set1_ps(shift), top = _mm512_set1_ps(88.f);
    const __m512 zero = _mm512_setzero_ps(), largest = _mm512_set1_ps(3.40282347e38f);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 lanes = first_lanes(n - i);
      const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), sh);
      const __m512 p = exp16(d);  // NaN stays NaN, and fails p > 0 below
      const __m512 out = _mm512_maskz_min_ps(_mm512_cmp_ps_mask(p, zero, _CMP_GT_OQ), p, largest);
      _mm512_mask_storeu_ps(w + i, lanes, out);
      const __mmask16 clamped = lanes & _mm512_cmp_ps_mask(d, top, _CMP_GT_OQ);
      for (unsigned m = clamped; m != 0; m &= m - 1) {  // the clamped lanes only (rarely any)
        const int l = __builtin_ctz(m);
        w[i + l] = tail_weight(d[l]);
      }
    }
  }

  // The 16 codes of kBits bits (low bits first) in the 2 * kBits bytes at codes, code l in lane
  // l's low bits: each lane takes the 32-bit word that holds its code and shifts it down.
  template <int64_t kBits>
  KC_AVX512_INLINE static __m512i codes16(const uint8_t* codes) {
    static_assert(kBits == 2 || kBits == 4, "16 codes in 4 or 8 bytes");
    constexpr auto shift = [](int l) { return l % (32 / kBits) * kBits; };  // in its word
    const __m512i shifts = _mm512_setr_epi32(
        shift(0), shift(1), shift(2), shift(3), shift(4), shift(5), shift(6), shift(7), shift(8),
        shift(9), shift(10), shift(11), shift(12), shift(13), shift(14), shift(15));
    uint64_t bytes = 0;
    std::memcpy(&bytes, codes, 2 * kBits);
    __m512i words;  // lane l: the word of code l
    if constexpr (kBits == 2) {
      words = _mm512_set1_epi32(static_cast<int>(bytes));
    } else {  // lanes 0-7 the first word, 8-15 the second
      const __m512i second = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      words = _mm512_maskz_permutexvar_epi32(0xFFFF, second,
                                             _mm512_set1_epi64(static_cast<int64_t>(bytes)));
    }
    return _mm512_and_si512(_mm512_maskz_srlv_epi32(0xFFFF, words, shifts),
                            _mm512_set1_epi32((1 << kBits) - 1));
  }

  // As Avx2Isa::tail_tile, 16 columns a vector: kH <= 4 heads by 4 vectors of sums (64 columns)
  // held in registers across runs of kRun keys. Each sum takes fma(p, base + step * code, sum)
  // in key order, the same operations on each column as Avx2Isa's: the same bits. Not inline:
  // Avx2Isa::tail_rows calls it.
  template <int64_t kD, int64_t kBits, int64_t kH>
  KC_AVX512 static void tail_tile(const float* w, int64_t w_stride, int64_t n,
                                  const uint8_t* codes, int64_t c_stride, const float* sb,
                                  float* acc) {
    constexpr int64_t kV = 4, kRun = 256;
    static_assert(kD % (16 * kV) == 0, "whole tiles of 16 kV columns");
    for (int64_t i0 = 0; i0 < n; i0 += kRun) {
      const int64_t i1 = std::min(n, i0 + kRun);
      for (int64_t c = 0; c < kD; c += 16 * kV) {
        __m512 sum[kH][kV];
        for (int64_t h = 0; h < kH; ++h) {
          for (int64_t v = 0; v < kV; ++v) sum[h][v] = _mm512_loadu_ps(acc + h * kD + c + 16 * v);
        }
        for (int64_t i = i0; i < i1; ++i) {
          const __m512 sv = _mm512_set1_ps(sb[2 * i]), bv = _mm512_set1_ps(sb[2 * i + 1]);
          const uint8_t* row = codes + i * c_stride + c * kBits / 8;
          __m512 x[kV];  // columns [c, c + 16 kV) of row i
          for (int64_t v = 0; v < kV; ++v) {
            x[v] = _mm512_fmadd_ps(
                sv, _mm512_maskz_cvtepi32_ps(0xFFFF, codes16<kBits>(row + 2 * kBits * v)), bv);
          }
          for (int64_t h = 0; h < kH; ++h) {
            const __m512 p = _mm512_set1_ps(w[h * w_stride + i]);
            for (int64_t v = 0; v < kV; ++v) sum[h][v] = _mm512_fmadd_ps(p, x[v], sum[h][v]);
          }
        }
        for (int64_t h = 0; h < kH; ++h) {
          for (int64_t v = 0; v < kV; ++v) _mm512_storeu_ps(acc + h * kD + c + 16 * v, sum[h][v]);
        }
      }
    }
  }

  // As Avx2Isa::tail_rows (the same bits), by this tail_tile.
  template <int64_t kD, int64_t kBits>
  KC_AVX512 static void tail_rows(const float* w, int64_t w_stride, int64_t G, int64_t n,
                                  const uint8_t* codes, int64_t c_stride, const float* sb,
                                  float* acc) {
    Avx2Isa::tail_rows<kD, kBits, Avx512Isa>(w, w_stride, G, n, codes, c_stride, sb, acc);
  }
};

}  // namespace kcache_ops::cpu
