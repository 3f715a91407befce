// The AVX-512 intrinsics of csrc/cpu/isa_avx512.h, written lane by lane from the pseudo-code of
// Intel's SDM on GCC's own __m512 / __m512i / __m512bh vector types, so that Avx512Isa's loops run
// on a CPU without AVX-512. Included after isa_avx2.h (immintrin.h) and before isa_avx512.h, whose
// calls the macros at the end redirect here; KC_AVX512_TARGET compiles its functions for AVX2.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <c10/util/Half.h>

#include "../../csrc/cpu/isa_avx2.h"

#define KC_AVX512_TARGET "avx2,fma,f16c"

namespace kcache_ops::avx512_emu {

// bfloat16 bits -> float32 (make_fp32: the bits are the upper half)
inline float bf16_value(uint16_t bits) {
  const uint32_t u = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A subnormal as the zero of its sign: DAZ on an input, FTZ on a result.
inline float flush(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x;
}

// convert_fp32_to_bfloat16 (DAZ, round to nearest even, a NaN quieted)
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if (std::isnan(x)) return static_cast<uint16_t>((u >> 16) | 0x40);
  if (std::fpclassify(x) == FP_SUBNORMAL) u &= 0x80000000u;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

KC_AVX2_INLINE __m512 loadu_ps(const float* p) {
  __m512 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

KC_AVX2_INLINE __m512i loadu_si512(const void* p) {
  __m512i v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

KC_AVX2_INLINE __m512 setzero_ps() { return __m512{}; }

// a * b + c per lane, rounded once
KC_AVX2_INLINE __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
}

// lanes 8 * imm .. 8 * imm + 7 of v
KC_AVX2_INLINE __m256 extractf32x8_ps(__m512 v, int imm) {
  float lanes[8];
  for (int i = 0; i < 8; ++i) lanes[i] = v[8 * (imm & 1) + i];
  return _mm256_loadu_ps(lanes);
}

// lanes 4 * imm .. 4 * imm + 3 of v, 0 where `mask` is off
KC_AVX2_INLINE __m128 maskz_extractf32x4_ps(__mmask8 mask, __m512 v, int imm) {
  float lanes[4];
  for (int i = 0; i < 4; ++i) lanes[i] = (mask >> i) & 1 ? v[4 * (imm & 3) + i] : 0.f;
  return _mm_loadu_ps(lanes);
}

KC_AVX2_INLINE __m512 add_ps(__m512 a, __m512 b) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = a[i] + b[i];
  return r;
}

KC_AVX2_INLINE __m512 mul_ps(__m512 a, __m512 b) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = a[i] * b[i];
  return r;
}

// 128-bit chunks 0, 1 from a's chunks imm bits [1:0], [3:2]; chunks 2, 3 from b's, bits [5:4],
// [7:6]; 0 in the lanes off in `mask`
KC_AVX2_INLINE __m512 maskz_shuffle_f32x4(__mmask16 mask, __m512 a, __m512 b, int imm) {
  __m512 r;
  for (int c = 0; c < 4; ++c) {
    const int from = (imm >> (2 * c)) & 3;
    for (int i = 0; i < 4; ++i) {
      r[4 * c + i] = (mask >> (4 * c + i)) & 1 ? (c < 2 ? a : b)[4 * from + i] : 0.f;
    }
  }
  return r;
}

// in each 128-bit chunk: lanes 0, 1 from a's lanes imm bits [1:0], [3:2]; lanes 2, 3 from b's,
// bits [5:4], [7:6]
KC_AVX2_INLINE __m512 shuffle_ps(__m512 a, __m512 b, int imm) {
  __m512 r;
  for (int c = 0; c < 4; ++c) {
    for (int i = 0; i < 4; ++i) r[4 * c + i] = (i < 2 ? a : b)[4 * c + ((imm >> (2 * i)) & 3)];
  }
  return r;
}

KC_AVX2_INLINE __m512 sub_ps(__m512 a, __m512 b) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = a[i] - b[i];
  return r;
}

// -(a * b) + c per lane, rounded once
KC_AVX2_INLINE __m512 fnmadd_ps(__m512 a, __m512 b, __m512 c) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(-a[i], b[i], c[i]);
  return r;
}

// a * b where `mask` is on, 0 elsewhere
KC_AVX2_INLINE __m512 maskz_mul_ps(__mmask16 mask, __m512 a, __m512 b) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = (mask >> i) & 1 ? a[i] * b[i] : 0.f;
  return r;
}

// VMINPS / VMAXPS: b where either is NaN (or both are zeros), 0 where `mask` is off
KC_AVX2_INLINE __m512 maskz_min_ps(__mmask16 mask, __m512 a, __m512 b) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = (mask >> i) & 1 ? (a[i] < b[i] ? a[i] : b[i]) : 0.f;
  return r;
}

KC_AVX2_INLINE __m512 maskz_max_ps(__mmask16 mask, __m512 a, __m512 b) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = (mask >> i) & 1 ? (a[i] > b[i] ? a[i] : b[i]) : 0.f;
  return r;
}

// a where `mask` is on, 0 elsewhere
KC_AVX2_INLINE __m512 maskz_mov_ps(__mmask16 mask, __m512 a) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = (mask >> i) & 1 ? a[i] : 0.f;
  return r;
}

// bit i: a[i] <pred> b[i], for the predicates the loops use (ordered and quiet)
KC_AVX2_INLINE __mmask16 cmp_ps_mask(__m512 a, __m512 b, int pred) {
  __mmask16 m = 0;
  for (int i = 0; i < 16; ++i) {
    const bool ordered = !std::isnan(a[i]) && !std::isnan(b[i]);
    bool bit = false;
    switch (pred) {
      case _CMP_LT_OQ: bit = ordered && a[i] < b[i]; break;
      case _CMP_GT_OQ: bit = ordered && a[i] > b[i]; break;
      case _CMP_ORD_Q: bit = ordered; break;
      default: std::abort();  // a predicate this emulation does not know
    }
    m |= static_cast<__mmask16>(bit) << i;
  }
  return m;
}

// Each lane rounded to an integer (imm: to nearest even, as _MM_FROUND_TO_NEAREST_INT with no
// scale; std::nearbyint rounds so in the default rounding mode, which no test changes), 0 where
// `mask` is off
KC_AVX2_INLINE __m512 maskz_roundscale_ps(__mmask16 mask, __m512 a, int imm) {
  if ((imm & ~_MM_FROUND_NO_EXC) != _MM_FROUND_TO_NEAREST_INT) std::abort();
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = (mask >> i) & 1 ? std::nearbyint(a[i]) : 0.f;
  return r;
}

// p's lanes where `mask` is on (no other lane is read), src's elsewhere
KC_AVX2_INLINE __m512 mask_loadu_ps(__m512 src, __mmask16 mask, const float* p) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = (mask >> i) & 1 ? p[i] : src[i];
  return r;
}

KC_AVX2_INLINE __m512 maskz_loadu_ps(__mmask16 mask, const float* p) {
  return mask_loadu_ps(__m512{}, mask, p);
}

// a's lanes where `mask` is on to p (no other lane is written)
KC_AVX2_INLINE void mask_storeu_ps(float* p, __mmask16 mask, __m512 a) {
  for (int i = 0; i < 16; ++i) {
    if ((mask >> i) & 1) p[i] = a[i];
  }
}

// 16 float16 -> float32 (exact), lanes off in `mask` zero
KC_AVX2_INLINE __m512 maskz_cvtph_ps(__mmask16 mask, __m256i a) {
  uint16_t halves[16];
  std::memcpy(halves, &a, sizeof halves);
  __m512 r;
  for (int i = 0; i < 16; ++i) {
    const float x = c10::Half(halves[i], c10::Half::from_bits());
    r[i] = (mask >> i) & 1 ? x : 0.f;
  }
  return r;
}

// bf16 lanes 0-15 from b, 16-31 from a
KC_AVX2_INLINE __m512bh cvtne2ps_pbh(__m512 a, __m512 b) {
  uint16_t bits[32];  // __m512bh's lanes are short in GCC 12, __bf16 in later compilers
  for (int i = 0; i < 16; ++i) {
    bits[i] = to_bf16(b[i]);
    bits[16 + i] = to_bf16(a[i]);
  }
  __m512bh r;
  std::memcpy(&r, bits, sizeof r);
  return r;
}

// VDPBF16PS: lane i of acc plus the products of bf16 pairs 2i + 1, then 2i (each exact in float32),
// each sum rounded to nearest even; DAZ and FTZ.
KC_AVX2_INLINE __m512 dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
  uint16_t a_bits[32], b_bits[32];
  std::memcpy(a_bits, &a, sizeof a_bits);
  std::memcpy(b_bits, &b, sizeof b_bits);
  __m512 r;
  for (int i = 0; i < 16; ++i) {
    float s = flush(acc[i]);
    for (int e : {2 * i + 1, 2 * i}) {
      const float x = flush(bf16_value(a_bits[e]));
      const float y = flush(bf16_value(b_bits[e]));
      s = flush(std::fma(x, y, s));
    }
    r[i] = s;
  }
  return r;
}

// __m512i as 16 int32 lanes and back
struct Lanes32 {
  int32_t v[16];
};

KC_AVX2_INLINE Lanes32 lanes32(__m512i a) {
  Lanes32 l;
  std::memcpy(l.v, &a, sizeof l.v);
  return l;
}

KC_AVX2_INLINE __m512i from_lanes32(const Lanes32& l) {
  __m512i r;
  std::memcpy(&r, l.v, sizeof r);
  return r;
}

KC_AVX2_INLINE void storeu_ps(float* p, __m512 a) { std::memcpy(p, &a, sizeof a); }

KC_AVX2_INLINE __m512 set1_ps(float x) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r[i] = x;
  return r;
}

KC_AVX2_INLINE __m512i set1_epi32(int x) {
  Lanes32 l;
  for (int i = 0; i < 16; ++i) l.v[i] = x;
  return from_lanes32(l);
}

// lanes 2i and 2i + 1 the low and high words of x
KC_AVX2_INLINE __m512i set1_epi64(int64_t x) {
  __m512i r;
  for (int i = 0; i < 8; ++i) r[i] = x;
  return r;
}

// lane i the i-th argument
KC_AVX2_INLINE __m512i setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7,
                                  int e8, int e9, int e10, int e11, int e12, int e13, int e14,
                                  int e15) {
  return from_lanes32({{e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15}});
}

KC_AVX2_INLINE __m512i and_si512(__m512i a, __m512i b) { return a & b; }

// lane i: a's lane idx[i] mod 16, or 0 where `mask` is off
KC_AVX2_INLINE __m512i maskz_permutexvar_epi32(__mmask16 mask, __m512i idx, __m512i a) {
  const Lanes32 i = lanes32(idx), x = lanes32(a);
  Lanes32 r;
  for (int l = 0; l < 16; ++l) r.v[l] = (mask >> l) & 1 ? x.v[i.v[l] & 15] : 0;
  return from_lanes32(r);
}

// lane i: a's lane idx[i] mod 16, or 0 where `mask` is off
KC_AVX2_INLINE __m512 maskz_permutexvar_ps(__mmask16 mask, __m512i idx, __m512 a) {
  const Lanes32 i = lanes32(idx);
  __m512 r;
  for (int l = 0; l < 16; ++l) r[l] = (mask >> l) & 1 ? a[i.v[l] & 15] : 0.f;
  return r;
}

KC_AVX2_INLINE __m512 castsi512_ps(__m512i a) {
  __m512 r;
  std::memcpy(&r, &a, sizeof r);
  return r;
}

KC_AVX2_INLINE __m512i add_epi32(__m512i a, __m512i b) {
  const Lanes32 x = lanes32(a), y = lanes32(b);
  Lanes32 r;
  for (int l = 0; l < 16; ++l) r.v[l] = static_cast<int32_t>(uint32_t(x.v[l]) + uint32_t(y.v[l]));
  return from_lanes32(r);
}

KC_AVX2_INLINE __m512i sub_epi32(__m512i a, __m512i b) {
  const Lanes32 x = lanes32(a), y = lanes32(b);
  Lanes32 r;
  for (int l = 0; l < 16; ++l) r.v[l] = static_cast<int32_t>(uint32_t(x.v[l]) - uint32_t(y.v[l]));
  return from_lanes32(r);
}

// lane i: a's lane shifted left by imm (0 from 32 on), 0 where `mask` is off
KC_AVX2_INLINE __m512i maskz_slli_epi32(__mmask16 mask, __m512i a, unsigned imm) {
  const Lanes32 x = lanes32(a);
  Lanes32 r;
  for (int l = 0; l < 16; ++l) {
    const uint32_t shifted = imm > 31 ? 0u : static_cast<uint32_t>(x.v[l]) << imm;
    r.v[l] = (mask >> l) & 1 ? static_cast<int32_t>(shifted) : 0;
  }
  return from_lanes32(r);
}

// lane i: a's lane shifted right by imm with its sign (sign bits from 32 on), 0 where `mask` is off
KC_AVX2_INLINE __m512i maskz_srai_epi32(__mmask16 mask, __m512i a, unsigned imm) {
  const Lanes32 x = lanes32(a);
  Lanes32 r;
  for (int l = 0; l < 16; ++l) r.v[l] = (mask >> l) & 1 ? x.v[l] >> std::min(imm, 31u) : 0;
  return from_lanes32(r);
}

// float32 -> int32, rounded to nearest even (the default MXCSR); NaN and values out of range give
// INT32_MIN (the integer indefinite); 0 where `mask` is off
KC_AVX2_INLINE __m512i maskz_cvtps_epi32(__mmask16 mask, __m512 a) {
  Lanes32 r;
  for (int l = 0; l < 16; ++l) {
    const float x = std::nearbyint(a[l]);
    const bool fits = x >= -0x1p31f && x < 0x1p31f;  // false for NaN
    r.v[l] = !((mask >> l) & 1) ? 0 : fits ? static_cast<int32_t>(x) : INT32_MIN;
  }
  return from_lanes32(r);
}

// lane i: a's lane shifted right (logical) by count's lane, 0 from 32 on; 0 where `mask` is off
KC_AVX2_INLINE __m512i maskz_srlv_epi32(__mmask16 mask, __m512i a, __m512i count) {
  const Lanes32 x = lanes32(a), c = lanes32(count);
  Lanes32 r;
  for (int l = 0; l < 16; ++l) {
    const uint32_t n = static_cast<uint32_t>(c.v[l]);
    const uint32_t shifted = n > 31 ? 0u : static_cast<uint32_t>(x.v[l]) >> n;
    r.v[l] = (mask >> l) & 1 ? static_cast<int32_t>(shifted) : 0;
  }
  return from_lanes32(r);
}

// int32 lanes -> float32 (round to nearest even, as cvtdq2ps under the default MXCSR); 0 where
// `mask` is off
KC_AVX2_INLINE __m512 maskz_cvtepi32_ps(__mmask16 mask, __m512i a) {
  const Lanes32 x = lanes32(a);
  __m512 r;
  for (int l = 0; l < 16; ++l) r[l] = (mask >> l) & 1 ? static_cast<float>(x.v[l]) : 0.f;
  return r;
}

}  // namespace kcache_ops::avx512_emu

// Some are macros in GCC's headers when compiled without optimization.
#undef _mm512_loadu_ps
#undef _mm512_loadu_si512
#undef _mm512_setzero_ps
#undef _mm512_fmadd_ps
#undef _mm512_extractf32x8_ps
#undef _mm512_maskz_extractf32x4_ps
#undef _mm512_add_ps
#undef _mm512_mul_ps
#undef _mm512_maskz_shuffle_f32x4
#undef _mm512_shuffle_ps
#undef _mm512_maskz_permutexvar_ps
#undef _mm512_maskz_cvtph_ps
#undef _mm512_cvtne2ps_pbh
#undef _mm512_dpbf16_ps
#undef _mm512_storeu_ps
#undef _mm512_set1_ps
#undef _mm512_set1_epi32
#undef _mm512_set1_epi64
#undef _mm512_setr_epi32
#undef _mm512_and_si512
#undef _mm512_maskz_permutexvar_epi32
#undef _mm512_maskz_srlv_epi32
#undef _mm512_maskz_cvtepi32_ps
#undef _mm512_sub_ps
#undef _mm512_fnmadd_ps
#undef _mm512_maskz_mul_ps
#undef _mm512_maskz_min_ps
#undef _mm512_maskz_max_ps
#undef _mm512_maskz_mov_ps
#undef _mm512_cmp_ps_mask
#undef _mm512_maskz_roundscale_ps
#undef _mm512_mask_loadu_ps
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm512_castsi512_ps
#undef _mm512_add_epi32
#undef _mm512_sub_epi32
#undef _mm512_maskz_slli_epi32
#undef _mm512_maskz_srai_epi32
#undef _mm512_maskz_cvtps_epi32
#define _mm512_loadu_ps kcache_ops::avx512_emu::loadu_ps
#define _mm512_loadu_si512 kcache_ops::avx512_emu::loadu_si512
#define _mm512_setzero_ps kcache_ops::avx512_emu::setzero_ps
#define _mm512_fmadd_ps kcache_ops::avx512_emu::fmadd_ps
#define _mm512_extractf32x8_ps kcache_ops::avx512_emu::extractf32x8_ps
#define _mm512_maskz_extractf32x4_ps kcache_ops::avx512_emu::maskz_extractf32x4_ps
#define _mm512_add_ps kcache_ops::avx512_emu::add_ps
#define _mm512_mul_ps kcache_ops::avx512_emu::mul_ps
#define _mm512_maskz_shuffle_f32x4 kcache_ops::avx512_emu::maskz_shuffle_f32x4
#define _mm512_shuffle_ps kcache_ops::avx512_emu::shuffle_ps
#define _mm512_maskz_permutexvar_ps kcache_ops::avx512_emu::maskz_permutexvar_ps
#define _mm512_maskz_cvtph_ps kcache_ops::avx512_emu::maskz_cvtph_ps
#define _mm512_cvtne2ps_pbh kcache_ops::avx512_emu::cvtne2ps_pbh
#define _mm512_dpbf16_ps kcache_ops::avx512_emu::dpbf16_ps
#define _mm512_storeu_ps kcache_ops::avx512_emu::storeu_ps
#define _mm512_set1_ps kcache_ops::avx512_emu::set1_ps
#define _mm512_set1_epi32 kcache_ops::avx512_emu::set1_epi32
#define _mm512_set1_epi64 kcache_ops::avx512_emu::set1_epi64
#define _mm512_setr_epi32 kcache_ops::avx512_emu::setr_epi32
#define _mm512_and_si512 kcache_ops::avx512_emu::and_si512
#define _mm512_maskz_permutexvar_epi32 kcache_ops::avx512_emu::maskz_permutexvar_epi32
#define _mm512_maskz_srlv_epi32 kcache_ops::avx512_emu::maskz_srlv_epi32
#define _mm512_maskz_cvtepi32_ps kcache_ops::avx512_emu::maskz_cvtepi32_ps
#define _mm512_sub_ps kcache_ops::avx512_emu::sub_ps
#define _mm512_fnmadd_ps kcache_ops::avx512_emu::fnmadd_ps
#define _mm512_maskz_mul_ps kcache_ops::avx512_emu::maskz_mul_ps
#define _mm512_maskz_min_ps kcache_ops::avx512_emu::maskz_min_ps
#define _mm512_maskz_max_ps kcache_ops::avx512_emu::maskz_max_ps
#define _mm512_maskz_mov_ps kcache_ops::avx512_emu::maskz_mov_ps
#define _mm512_cmp_ps_mask kcache_ops::avx512_emu::cmp_ps_mask
#define _mm512_maskz_roundscale_ps kcache_ops::avx512_emu::maskz_roundscale_ps
#define _mm512_mask_loadu_ps kcache_ops::avx512_emu::mask_loadu_ps
#define _mm512_maskz_loadu_ps kcache_ops::avx512_emu::maskz_loadu_ps
#define _mm512_mask_storeu_ps kcache_ops::avx512_emu::mask_storeu_ps
#define _mm512_castsi512_ps kcache_ops::avx512_emu::castsi512_ps
#define _mm512_add_epi32 kcache_ops::avx512_emu::add_epi32
#define _mm512_sub_epi32 kcache_ops::avx512_emu::sub_epi32
#define _mm512_maskz_slli_epi32 kcache_ops::avx512_emu::maskz_slli_epi32
#define _mm512_maskz_srai_epi32 kcache_ops::avx512_emu::maskz_srai_epi32
#define _mm512_maskz_cvtps_epi32 kcache_ops::avx512_emu::maskz_cvtps_epi32
