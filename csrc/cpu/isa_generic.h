// The portable inner loops of the CPU ops: plain C++ the compiler vectorises for the baseline ISA.
// Same interface as Avx2Isa (isa_avx2.h); KC_ISA_SWITCH (isa.h) picks one at run time.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace kcache_ops::cpu {

struct GenericIsa {
  // s[h * s_stride + j] = scale * <q_h, k_j> for h < kH, j < rows.
  // q [kH, kD] float32; k: rows of kD (row stride k_stride).
  template <typename scalar_t, int64_t kD, int64_t kH>
  static void score_rows(const float* q, const scalar_t* k, int64_t k_stride, int64_t rows,
                         float scale, float* s, int64_t s_stride) {
    float kf[kD];  // one K row in float32
    for (int64_t j = 0; j < rows; ++j) {
      for (int64_t d = 0; d < kD; ++d) kf[d] = to_float(k[j * k_stride + d]);
      for (int64_t h = 0; h < kH; ++h) {
        float acc[16] = {};  // independent lanes: vectorisable without reassociation
        for (int64_t d = 0; d < kD; d += 16) {
          for (int64_t l = 0; l < 16; ++l) acc[l] += q[h * kD + d + l] * kf[d + l];
        }
        float sum = 0.f;
        for (int64_t l = 0; l < 16; ++l) sum += acc[l];
        s[h * s_stride + j] = sum * scale;
      }
    }
  }

  // max of x [n], n >= 1; NaN when an x_i is NaN
  static float max_of(const float* x, int64_t n) {
    float m = x[0];
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) {
      m = std::max(m, x[i]);
      nan = nan || std::isnan(x[i]);
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : m;
  }

  // sum_i exp(x_i - shift) over x [n]
  static float sum_exp(const float* x, int64_t n, float shift) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - shift);
    return sum;
  }

  // acc [n] += exp(x [n] - shift), 0 where that is NaN (a NaN x_i or shift)
  static void add_exp(float* acc, const float* x, int64_t n, float shift) {
    for (int64_t i = 0; i < n; ++i) {
      const float e = std::exp(x[i] - shift);
      acc[i] += std::isnan(e) ? 0.f : e;
    }
  }

  // The first i in [begin, end) with x[i] > thr, or end.
  static int64_t first_above(const float* x, int64_t begin, int64_t end, float thr) {
    while (begin < end && !(x[begin] > thr)) ++begin;
    return begin;
  }

  // acc [kD] += p * row [kD]
  template <typename scalar_t, int64_t kD>
  static void axpy(float* acc, float p, const scalar_t* row) {
    for (int64_t d = 0; d < kD; ++d) acc[d] += p * to_float(row[d]);
  }

  // w [n] = exp(x [n] - shift) as lowbit_tail weighs a key: 0 where that is NaN or not above 0
  // (underflow), the largest float where it is +inf. x may be w.
  static void tail_weights(const float* x, float* w, int64_t n, float shift) {
    for (int64_t i = 0; i < n; ++i) w[i] = tail_weight(x[i] - shift);
  }

  // row [kD] = base + step * code_d, the codes of one row packed 8 / kBits to a byte, low bits
  // first. codes [kD * kBits / 8].
  template <int64_t kD, int64_t kBits>
  static void dequantize_row(const uint8_t* codes, float step, float base, float* row) {
    constexpr int64_t kPer = 8 / kBits;
    for (int64_t d = 0; d < kD; ++d) {
      const int code = (codes[d / kPer] >> ((d % kPer) * kBits)) & ((1 << kBits) - 1);
      row[d] = base + step * static_cast<float>(code);
    }
  }

  // sb [n, 2] = the rows' (step, base) as float32; whether all are tail_row_bounded.
  template <int64_t kBits>
  static bool tail_meta(const c10::BFloat16* meta, int64_t m_stride, int64_t n, float* sb) {
    return tail_meta_rows<kBits>(meta, m_stride, n, sb);
  }

  // acc [G, kD] += sum over keys i < n of w[h * w_stride + i] * row_i for each head h < G, row_i
  // = base_i + step_i * code (dequantize_row) with its codes at codes + i * c_stride and (step_i,
  // base_i) = (sb[2 i], sb[2 i + 1]); every row tail_row_bounded, as Avx2Isa's sums need. A row
  // is dequantized once, for the heads that weigh it above 0 (none: skipped).
  template <int64_t kD, int64_t kBits>
  static void tail_rows(const float* w, int64_t w_stride, int64_t G, int64_t n,
                        const uint8_t* codes, int64_t c_stride, const float* sb, float* acc) {
    float row[kD];
    for (int64_t i = 0; i < n; ++i) {
      bool have_row = false;
      for (int64_t h = 0; h < G; ++h) {
        const float p = w[h * w_stride + i];
        if (p == 0.f) continue;
        if (!have_row) {
          dequantize_row<kD, kBits>(codes + i * c_stride, sb[2 * i], sb[2 * i + 1], row);
          have_row = true;
        }
        axpy<float, kD>(acc + h * kD, p, row);
      }
    }
  }
};

}  // namespace kcache_ops::cpu
