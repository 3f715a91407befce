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

// Where one (batch, kv head) group reads and writes: s [G, L] the heads' scores (row stride
// s_head, key stride s_key), codes [L, kD * bits / 8] (row stride c_stride), meta [L, 2] (row
// stride m_stride), lse [G] (stride lse_stride), idx [G, N] (row stride idx_stride) -> out [G, kD]
// float32, over the keys first <= j < end (0 <= first <= end <= L), then the hot rows.
struct Group {
  const float* s;
  int64_t s_head, s_key;
  const uint8_t* codes;
  int64_t c_stride;
  const c10::BFloat16* meta;
  int64_t m_stride;
  const float* lse;
  int64_t lse_stride;
  const int32_t* idx;
  int64_t idx_stride, L, first, end;
  HotRowsView hot;
  float* out;

  // head h's weight of key j, exp(s - lse) (<= 1 with qk_topn's lse): 0 for a NaN one, as in the
  // reference, and for one that underflows (the key adds nothing); +inf the largest float
  float weight(int64_t h, int64_t j) const {
    const float p = std::exp(s[h * s_head + j * s_key] - lse[h * lse_stride]);
    return p > 0.f ? std::min(p, std::numeric_limits<float>::max()) : 0.f;
  }
};

// selected [G, L] at the keys j0 <= j < j1 (the rest untouched): 1 where the head selected the
// key, else 0.
void mark_selected(const Group& g, int64_t G, int64_t N, int64_t j0, int64_t j1,
                   uint8_t* selected) {
  for (int64_t h = 0; h < G; ++h) {
    std::fill(selected + h * g.L + j0, selected + h * g.L + j1, 0);
    for (int64_t i = 0; i < N; ++i) {
      const int32_t j = g.idx[h * g.idx_stride + i];
      if (j >= j0 && j < j1) selected[h * g.L + j] = 1;
    }
  }
}

// acc [G, kD] = the tail of the keys in [j0, j1) ∩ [first, end) not selected ([G, L]), each
// row dequantized once, for the first head that needs it.
template <class Isa, int64_t kD>
void chunk_tail(const Group& g, int64_t G, int64_t bits, int64_t j0, int64_t j1,
                const uint8_t* selected, float* acc) {
  std::fill(acc, acc + G * kD, 0.f);
  float v[kD];  // one dequantized row
  for (int64_t j = std::max(j0, g.first); j < std::min(j1, g.end); ++j) {
    bool have_row = false;
    for (int64_t h = 0; h < G; ++h) {
      const float p = g.weight(h, j);
      if (selected[h * g.L + j] || p == 0.f) continue;
      if (!have_row) {
        dequantize_row<kD>(g.codes + j * g.c_stride, g.meta + j * g.m_stride, bits, v);
        have_row = true;
      }
      Isa::template axpy<float, kD>(acc + h * kD, p, v);
    }
  }
}

// out [G, kD] = the chunks' sums parts [chunks, G, kD] added in order, then the hot rows at
// positions in [0, L), each added as a tail row would be.
template <class Isa, int64_t kD>
void finish_group(const Group& g, int64_t G, const float* parts, int64_t chunks) {
  std::fill(g.out, g.out + G * kD, 0.f);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t e = 0; e < G * kD; ++e) g.out[e] += parts[c * G * kD + e];
  }
  const HotRowsView& hot = g.hot;
  for (int64_t i = 0; i < hot.count; ++i) {
    const int64_t j = hot.pos[i * hot.pos_stride];
    if (j < 0 || j >= g.L) continue;
    KC_DISPATCH_FLOAT_HALF_BF16(hot.dtype, "hot_v", [&] {
      const scalar_t* row = static_cast<const scalar_t*>(hot.v) + i * hot.v_stride;
      for (int64_t h = 0; h < G; ++h) {
        const float p = g.weight(h, j);
        if (p != 0.f) Isa::template axpy<scalar_t, kD>(g.out + h * kD, p, row);
      }
    });
  }
}

// Buffers of one group, kept per thread across calls.
struct Scratch {
  std::vector<float> parts;       // [chunks, G, kD] the chunks' sums
  std::vector<uint8_t> selected;  // [G, L] 1 where the head selected the key

  size_t bytes() const { return parts.capacity() * sizeof(float) + selected.capacity(); }
};

// One group on one thread, chunk by chunk.
template <class Isa, int64_t kD>
void tail_group(const Group& g, int64_t G, int64_t N, int64_t bits, Scratch& tmp) {
  scratch_resize(tmp.selected, G * g.L, "lowbit_tail", "selected [G, L] uint8");
  mark_selected(g, G, N, 0, g.L, tmp.selected.data());
  const int64_t chunks = chunks_of(g.L);
  scratch_resize(tmp.parts, chunks * G * kD, "lowbit_tail", "chunk sums [chunks, G, D] float32");
  for (int64_t c = 0; c < chunks; ++c) {
    chunk_tail<Isa, kD>(g, G, bits, c * kChunkKeys, std::min(g.L, (c + 1) * kChunkKeys),
                        tmp.selected.data(), tmp.parts.data() + c * G * kD);
  }
  finish_group<Isa, kD>(g, G, tmp.parts.data(), chunks);
}

// The buffers of a call whose rows are split (tail_split), kept by the calling thread across
// calls while they hold at most kScratchKeepBytes per thread of the loop.
struct SplitScratch {
  RowChunks rows;                 // every group's chunks
  std::vector<int64_t> key0;      // [groups + 1] a group's first key in selected
  std::vector<uint8_t> selected;  // every group's [G, L], one after another
  std::vector<float> parts;       // [chunks, G, kD] the chunks' sums

  size_t bytes() const {
    return rows.bytes() + key0.capacity() * sizeof(int64_t) + selected.capacity() +
           parts.capacity() * sizeof(float);
  }
};

// The groups with their rows split into chunks of kChunkKeys keys: each chunk's sums in one
// parallel loop, then each group's on this thread (a few adds per chunk and the hot rows: one
// parallel region a call, as on the other path, since on a busy host every region's threads wait
// for each other's time slices). The same bits as tail_group: the same chunks, their sums added
// in the same order.
template <class Isa, int64_t kD>
void tail_split(const std::vector<Group>& groups, int64_t G, int64_t N, int64_t bits) {
  static thread_local SplitScratch callers;
  SplitScratch& sp = callers;  // the calling thread's: the loop's threads see it through this name
  sp.rows.split(static_cast<int64_t>(groups.size()), [&](int64_t i) { return groups[i].L; });
  sp.key0.assign(1, 0);
  for (const Group& g : groups) sp.key0.push_back(sp.key0.back() + g.L);
  scratch_resize(sp.selected, G * sp.key0.back(), "lowbit_tail",
                 "selected [B * Hkv][G, L_b] uint8");
  scratch_resize(sp.parts, sp.rows.count() * G * kD, "lowbit_tail",
                 "chunk sums [chunks, G, D] float32");
  parallel_tasks<Scratch>(sp.rows.count(), [&](int64_t c, Scratch&) {
    const RowChunks::Chunk& ch = sp.rows.chunks[c];
    const Group& g = groups[ch.group];
    uint8_t* selected = sp.selected.data() + G * sp.key0[ch.group];  // [G, L]
    mark_selected(g, G, N, ch.j0, ch.j1, selected);
    chunk_tail<Isa, kD>(g, G, bits, ch.j0, ch.j1, selected, sp.parts.data() + c * G * kD);
  });
  for (int64_t i = 0; i < static_cast<int64_t>(groups.size()); ++i) {
    finish_group<Isa, kD>(groups[i], G, sp.parts.data() + sp.rows.first[i] * G * kD,
                          sp.rows.first[i + 1] - sp.rows.first[i]);
  }
  if (sp.bytes() > kScratchKeepBytes * at::get_num_threads()) sp = SplitScratch{};
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
  dispatch_isa(at::kFloat, dims.D, [&]<class Isa, typename scalar_t, int64_t kD>() {
    const auto group = [&](int64_t b, int64_t kvh) {
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
      return Group{
          scores.data_ptr<float>() + b * scores.stride(0) + h0 * scores.stride(1),
          scores.stride(1), scores.stride(2),
          v_codes.data_ptr<uint8_t>() + b * v_codes.stride(0) + kvh * v_codes.stride(1),
          v_codes.stride(2),
          v_meta.data_ptr<c10::BFloat16>() + b * v_meta.stride(0) + kvh * v_meta.stride(1),
          v_meta.stride(2), lse.data_ptr<float>() + b * lse.stride(0) + h0 * lse.stride(1),
          lse.stride(1),
          indices.data_ptr<int32_t>() + b * indices.stride(0) + h0 * indices.stride(1),
          indices.stride(1), L, first, end, hot,
          out.data_ptr<float>() + (b * dims.Hq + h0) * dims.D};
    };
    const int64_t groups = dims.B * dims.Hkv;
    if (split_rows(groups)) {
      std::vector<Group> all;  // [B * Hkv]
      for (int64_t bg = 0; bg < groups; ++bg) all.push_back(group(bg / dims.Hkv, bg % dims.Hkv));
      tail_split<Isa, kD>(all, G, dims.N, dims.bits);
      return;
    }
    parallel_tasks<Scratch>(groups, [&](int64_t bg, Scratch& tmp) {
      tail_group<Isa, kD>(group(bg / dims.Hkv, bg % dims.Hkv), G, dims.N, dims.bits, tmp);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl("lowbit_tail", &lowbit_tail_cpu); }

}  // namespace kcache_ops::cpu
