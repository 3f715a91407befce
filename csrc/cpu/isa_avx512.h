// qk_topn's scoring loop with AVX-512 (F, BW, BF16; x86-64 only): 16 lanes per instruction, and
// for bfloat16 K the vdpbf16ps dot product (bf16 pairs, float32 accumulation: bf16 products are
// exact in float32) with no conversion of K; lowbit_tail's sums (tail_rows) 16 columns a vector.
// Everything else comes from Avx2Isa. Compiled per function (target attributes); KC_ISA_SWITCH
// (isa.h) picks it only where the CPU has the features.
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
// the maskz forms with every lane for srlv, cvtepi32_ps and permutexvar, on which GCC 12 warns
// falsely (-Wmaybe-uninitialized on _mm*_undefined_*).
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

  // Lane i of the result is the sum of the lanes of v[i], for 8 vectors, each summed as
  // ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)).
  KC_AVX512_INLINE static __m256 reduce8(const __m256* v) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
  }

  // The sum of the lanes of v in reduce8's order, so that a row scored alone (a tile's last
  // rows) scores as it would among 4: equal keys tie, and go to the lower index.
  KC_AVX512_INLINE static float reduce1(__m256 v) {
    const __m256 t = _mm256_hadd_ps(v, v), u = _mm256_hadd_ps(t, t);  // u[0], u[4]: the halves
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
  }

  // s[h * s_stride + r] = scale * (sum of the lanes of acc[h][r]). With 4 rows, the sums of 8
  // accumulators come out of one transposing reduction as two heads' 4 consecutive scores.
  template <int64_t kH, int64_t kR>
  KC_AVX512_INLINE static void store_sums(const __m512 (&acc)[kH][kR], float scale, float* s,
                                          int64_t s_stride) {
    if constexpr (kR == 4) {
      constexpr int64_t kHalves = kH * kR < 8 ? 8 : kH * kR;
      __m256 half[kHalves];  // [kH * kR] accumulators folded to 8 lanes, zero-padded to 8
      for (int64_t i = 0; i < kHalves; ++i) half[i] = _mm256_setzero_ps();
      for (int64_t h = 0; h < kH; ++h) {
        for (int64_t r = 0; r < kR; ++r) {
          half[h * kR + r] = fold8(acc[h][r]);
        }
      }
      for (int64_t h = 0; h < kH; h += 2) {  // heads h and h + 1
        const __m256 sums = _mm256_mul_ps(reduce8(half + h * kR), _mm256_set1_ps(scale));
        _mm_storeu_ps(s + h * s_stride, _mm256_castps256_ps128(sums));
        if (h + 1 < kH) _mm_storeu_ps(s + (h + 1) * s_stride, _mm256_extractf128_ps(sums, 1));
      }
    } else {
      for (int64_t h = 0; h < kH; ++h) {
        for (int64_t r = 0; r < kR; ++r) {
          s[h * s_stride + r] = reduce1(fold8(acc[h][r])) * scale;
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
