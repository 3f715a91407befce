// kcache_ops::lowbit_tail on the CPU: per (batch, kv head), each valid key outside the skipped
// first and last keys that a head of the group did not select adds exp(s - lse), from qk_topn's
// scores, times its dequantized low-bit V row (dequantized once per key) to that head's output.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../shape_checks.h"
#include "../value_checks.h"
#include "common.h"
#include "isa.h"

namespace kcache_ops::cpu {
namespace {

// row [kD] = min + scale * code_d, the codes of one row packed 8 / bits to a byte (low bits first).
// codes [kD * bits / 8]; meta [2] bfloat16 (scale, min).
template <int64_t kD>
void dequantize_row(const uint8_t* codes, const c10::BFloat16* meta, int64_t bits, float* row) {
  const float step = to_float(meta[0]), base = to_float(meta[1]);
  const int64_t per = 8 / bits;
  const int mask = (1 << bits) - 1;
  for (int64_t d = 0; d < kD; ++d) {
    const int code = (codes[d / per] >> ((d % per) * bits)) & mask;
    row[d] = base + step * static_cast<float>(code);
  }
}

// The exact rows of one (batch, kv head) on the host: slot i's row at v + i * v_stride elements
// (of dtype), its position pos[i * pos_stride]; count 0 for none.
struct HotRowsView {
  const void* v;
  at::ScalarType dtype;
  int64_t v_stride;
  const int32_t* pos;
  int64_t pos_stride, count;
};

// Buffers of one group, kept per thread across calls.
struct Scratch {
  std::vector<float> acc;         // [G, kD] the heads' outputs
  std::vector<uint8_t> selected;  // [G, L] 1 where the head selected the key

  size_t bytes() const { return acc.capacity() * sizeof(float) + selected.capacity(); }
};

// One (batch, kv head): s [G, L] the heads' scores (row stride s_head, key stride s_key),
// codes [L, kD * bits / 8] (row stride c_stride), meta [L, 2] (row stride m_stride),
// lse [G] (stride lse_stride), idx [G, N] (row stride idx_stride) -> out [G, kD] float32, over
// the keys first <= j < end (0 <= first <= end <= L), then the hot rows at positions in [0, L).
template <class Isa, int64_t kD>
void tail_group(const float* s, int64_t s_head, int64_t s_key, const uint8_t* codes,
                int64_t c_stride, const c10::BFloat16* meta, int64_t m_stride, int64_t bits,
                const float* lse, int64_t lse_stride, const int32_t* idx, int64_t idx_stride,
                int64_t G, int64_t N, int64_t L, int64_t first, int64_t end,
                const HotRowsView& hot, Scratch& tmp, float* out) {
  scratch_resize(tmp.selected, G * L, "lowbit_tail", "selected [G, L] uint8");
  std::fill(tmp.selected.begin(), tmp.selected.end(), 0);
  for (int64_t h = 0; h < G; ++h) {
    for (int64_t i = 0; i < N; ++i) {
      const int32_t j = idx[h * idx_stride + i];
      if (j >= 0 && j < L) tmp.selected[h * L + j] = 1;
    }
  }
  tmp.acc.assign(G * kD, 0.f);
  // head h's weight of key j, exp(s - lse) (<= 1 with qk_topn's lse): 0 for a NaN one, as in the
  // reference, and for one that underflows (the key adds nothing); +inf the largest float
  const auto weight = [&](int64_t h, int64_t j) {
    const float p = std::exp(s[h * s_head + j * s_key] - lse[h * lse_stride]);
    return p > 0.f ? std::min(p, std::numeric_limits<float>::max()) : 0.f;
  };
  float v[kD];  // one dequantized row
  for (int64_t j = first; j < end; ++j) {
    bool have_row = false;  // dequantized once, for the first head that needs it
    for (int64_t h = 0; h < G; ++h) {
      const float p = weight(h, j);
      if (tmp.selected[h * L + j] || p == 0.f) continue;
      if (!have_row) {
        dequantize_row<kD>(codes + j * c_stride, meta + j * m_stride, bits, v);
        have_row = true;
      }
      Isa::template axpy<float, kD>(tmp.acc.data() + h * kD, p, v);
    }
  }
  for (int64_t i = 0; i < hot.count; ++i) {  // exact rows, added as a tail row would be
    const int64_t j = hot.pos[i * hot.pos_stride];
    if (j < 0 || j >= L) continue;
    KC_DISPATCH_FLOAT_HALF_BF16(hot.dtype, "hot_v", [&] {
      const scalar_t* row = static_cast<const scalar_t*>(hot.v) + i * hot.v_stride;
      for (int64_t h = 0; h < G; ++h) {
        const float p = weight(h, j);
        if (p != 0.f) Isa::template axpy<scalar_t, kD>(tmp.acc.data() + h * kD, p, row);
      }
    });
  }
  std::copy(tmp.acc.begin(), tmp.acc.end(), out);
}

at::Tensor lowbit_tail_cpu(const at::Tensor& scores,    // [B, Hq, S] float32
                           const at::Tensor& seq_lens,  // [B] int32
                           const at::Tensor& lse,       // [B, Hq] float32
                           const at::Tensor& indices,   // [B, Hq, N] int32
                           const at::Tensor& v_codes,   // [B, Hkv, S, D * bits / 8] uint8
                           const at::Tensor& v_meta,    // [B, Hkv, S, 2] bfloat16
                           int64_t bits,
                           bool /*check_values*/,  // values are on the host: always checked
                           int64_t skip_first, int64_t skip_last,
                           const std::optional<at::Tensor>& hot_v_arg,     // [B, Hkv, H, D]
                           const std::optional<at::Tensor>& hot_pos_arg) {  // [B, H] int32
  const LowbitTailDims dims = check_lowbit_tail_args(scores, seq_lens, lse, indices, v_codes,
                                                     v_meta, bits, skip_first, skip_last);
  const int64_t H = check_hot_rows(hot_v_arg, hot_pos_arg, dims);
  KC_CHECK_CPU("lowbit_tail", scores);
  KC_CHECK_CPU("lowbit_tail", seq_lens);
  KC_CHECK_CPU("lowbit_tail", lse);
  KC_CHECK_CPU("lowbit_tail", indices);
  KC_CHECK_CPU("lowbit_tail", v_codes);
  KC_CHECK_CPU("lowbit_tail", v_meta);
  check_seq_lens_values(seq_lens, dims.S, "v_codes");
  check_index_values(indices, dims.S, "v_codes");
  const at::Tensor hot_v = hot_v_arg.value_or(at::Tensor());      // undefined: none
  const at::Tensor hot_pos = hot_pos_arg.value_or(at::Tensor());
  if (hot_v.defined()) {  // given (even with no row, as the fake checks them)
    KC_CHECK_CPU("lowbit_tail", hot_v);
    KC_CHECK_CPU("lowbit_tail", hot_pos);
    check_index_values(hot_pos, dims.S, "v_codes", "hot_pos", "an empty slot");
  }
  // [B, Hq, D] float32
  at::Tensor out = at::empty({dims.B, dims.Hq, dims.D}, scores.options());
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t G = dims.G;
  // scores are float32 whatever the model's dtype: one instance per head dim (scalar_t = float)
  for_each_kv_group<Scratch>(at::kFloat, dims.D, dims.B, dims.Hkv,
                            [&]<class Isa, typename scalar_t, int64_t kD>(
                                int64_t b, int64_t kvh, Scratch& tmp) {
    const int64_t h0 = kvh * G;  // first query head of the group
    const int64_t L = lens[b * seq_lens.stride(0)];
    const int64_t first = std::min(skip_first, L);  // the summed keys [first, end)
    const int64_t end = std::max(first, L - std::min(skip_last, L));
    const HotRowsView hot =
        H == 0 ? HotRowsView{nullptr, at::kFloat, 0, nullptr, 0, 0}
               : HotRowsView{static_cast<const char*>(hot_v.data_ptr()) +
                                 (b * hot_v.stride(0) + kvh * hot_v.stride(1)) *
                                     hot_v.element_size(),
                             hot_v.scalar_type(), hot_v.stride(2),
                             hot_pos.data_ptr<int32_t>() + b * hot_pos.stride(0),
                             hot_pos.stride(1), H};
    tail_group<Isa, kD>(
        scores.data_ptr<float>() + b * scores.stride(0) + h0 * scores.stride(1),
        scores.stride(1), scores.stride(2),
        v_codes.data_ptr<uint8_t>() + b * v_codes.stride(0) + kvh * v_codes.stride(1),
        v_codes.stride(2),
        v_meta.data_ptr<c10::BFloat16>() + b * v_meta.stride(0) + kvh * v_meta.stride(1),
        v_meta.stride(2), dims.bits,
        lse.data_ptr<float>() + b * lse.stride(0) + h0 * lse.stride(1), lse.stride(1),
        indices.data_ptr<int32_t>() + b * indices.stride(0) + h0 * indices.stride(1),
        indices.stride(1), G, dims.N, L, first, end, hot, tmp,
        out.data_ptr<float>() + (b * dims.Hq + h0) * dims.D);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl("lowbit_tail", &lowbit_tail_cpu); }

}  // namespace kcache_ops::cpu
