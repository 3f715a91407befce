// The AVX-512 intrinsics of csrc/cpu/isa_avx512.h, written lane by lane from the pseudo-code of
// Intel's SDM on GCC's own __m512 / __m512i / __m512bh vector types, so that Avx512Isa's loops run
// on a CPU without AVX-512. Included after isa_avx2.h (immintrin.h) and before isa_avx512.h, whose
// calls the macros at the end redirect here; KC_AVX512_TARGET compiles its functions for AVX2.
#pragma once

#include <cmath>
#include <cstdint>
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
#define _mm512_loadu_ps kcache_ops::avx512_emu::loadu_ps
#define _mm512_loadu_si512 kcache_ops::avx512_emu::loadu_si512
#define _mm512_setzero_ps kcache_ops::avx512_emu::setzero_ps
#define _mm512_fmadd_ps kcache_ops::avx512_emu::fmadd_ps
#define _mm512_extractf32x8_ps kcache_ops::avx512_emu::extractf32x8_ps
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
