// kcache_ops::lowbit_tail on the CPU: per (batch, kv head), each valid key outside the skipped
// first and last keys that a head of the group did not select adds exp(s - lse), from qk_topn's
// scores, times its dequantized low-bit V row (once per key and 4 heads: Isa::tail_rows) to
// that head's output.
#include <algorithm>
#include <vector>

#include "../named_op.h"
#include "../shape_checks.h"
#include "../value_checks.h"
#include "common.h"
#include "isa.h"

namespace kcache_ops::cpu {
namespace {

constexpr char kOp[] = "lowbit_tail";  // first in each error the op raises (named_op.h)

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

  // head h's weight of key j (tail_weight, common.h)
  float weight(int64_t h, int64_t j) const {
    return tail_weight(s[h * s_head + j * s_key] - lse[h * lse_stride]);
  }
};

// acc [G, kD] = the tail of the keys in [j0, j1) ∩ [first, end): the G heads' weights of those
// keys (Isa::tail_weights; 0 where the head selected the key, which leaves it out), then the
// rows' sums (Isa::tail_rows). A row not tail_row_bounded (a garbage meta, or values within a
// factor 2 of the float range) is added first, to the heads that weigh it above 0, then weighed
// 0 with a meta of (0, 0): tail_rows' sums take every key, and 0 times an inf would be NaN.
// scratch: the thread's, sized here to [G + 2, kChunkKeys] (the weights, then the keys' (step,
// base)); N entries of idx a head.
template <class Isa, int64_t kD, int64_t kBits>
void chunk_tail(const Group& g, int64_t G, int64_t N, int64_t j0, int64_t j1,
                std::vector<float>& scratch, float* acc) {
  std::fill(acc, acc + G * kD, 0.f);
  const int64_t a = std::max(j0, g.first), n = std::min(j1, g.end) - a;  // keys [a, a + n)
  if (n <= 0) return;
  scratch_resize(scratch, (G + 2) * kChunkKeys,
                 "weights and meta [G + 2, 4096] float32");
  float* w = scratch.data();                    // [G, kChunkKeys] weights of keys a + i
  float* sb = scratch.data() + G * kChunkKeys;  // [kChunkKeys, 2] (step, base) of key a + i
  for (int64_t h = 0; h < G; ++h) {
    float* wh = w + h * kChunkKeys;                  // [n] head h's weights of keys a + i
    const float* s_h = g.s + h * g.s_head + a * g.s_key;  // [n] its scores (key stride s_key)
    if (g.s_key != 1) {  // gathered first: tail_weights reads n scores in a row
      for (int64_t i = 0; i < n; ++i) wh[i] = s_h[i * g.s_key];
      s_h = wh;
    }
    Isa::tail_weights(s_h, wh, n, g.lse[h * g.lse_stride]);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t j = g.idx[h * g.idx_stride + i];
      if (j >= a && j < a + n) wh[j - a] = 0.f;
    }
  }
  const uint8_t* codes = g.codes + a * g.c_stride;  // [n, kD * kBits / 8] (row stride c_stride)
  if (!Isa::template tail_meta<kBits>(g.meta + a * g.m_stride, g.m_stride, n, sb)) {
    float v[kD];  // one dequantized row
    for (int64_t i = 0; i < n; ++i) {
      if (tail_row_bounded<kBits>(sb[2 * i], sb[2 * i + 1])) continue;
      Isa::template dequantize_row<kD, kBits>(codes + i * g.c_stride, sb[2 * i], sb[2 * i + 1], v);
      for (int64_t h = 0; h < G; ++h) {
        float& p = w[h * kChunkKeys + i];
        if (p != 0.f) Isa::template axpy<float, kD>(acc + h * kD, p, v);
        p = 0.f;
      }
      sb[2 * i] = sb[2 * i + 1] = 0.f;
    }
  }
  Isa::template tail_rows<kD, kBits>(w, kChunkKeys, G, n, codes, g.c_stride, sb, acc);
}

// out [G, kD] = the chunks' sums parts [chunks, G, kD] added in order to zeros (so a -0 sum of a
// chunk, a subnormal weight times a small negative value, gives +0 as the scalar loop did), then
// the hot rows at positions in [0, L), each with its weight from tail_weight (std::exp) for every
// head.
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

// Buffers of one thread, kept across calls.
struct Scratch {
  std::vector<float> parts;  // [chunks, G, kD] the chunks' sums (one group on one thread)
  std::vector<float> w;      // [G + 2, kChunkKeys] a chunk's weights and meta (chunk_tail)

  size_t bytes() const { return (parts.capacity() + w.capacity()) * sizeof(float); }
};

// One group on one thread, chunk by chunk.
template <class Isa, int64_t kD, int64_t kBits>
void tail_group(const Group& g, int64_t G, int64_t N, Scratch& tmp) {
  const int64_t chunks = chunks_of(g.L);
  scratch_resize(tmp.parts, chunks * G * kD, "chunk sums [chunks, G, D] float32");
  for (int64_t c = 0; c < chunks; ++c) {
    chunk_tail<Isa, kD, kBits>(g, G, N, c * kChunkKeys, std::min(g.L, (c + 1) * kChunkKeys),
                               tmp.w, tmp.parts.data() + c * G * kD);
  }
  finish_group<Isa, kD>(g, G, tmp.parts.data(), chunks);
}

// The buffers of a call whose rows are split (tail_split), kept by the calling thread across
// calls while they hold at most kScratchKeepBytes per thread of the loop.
struct SplitScratch {
  RowChunks rows;            // every group's chunks
  std::vector<float> parts;  // [chunks, G, kD] the chunks' sums

  size_t bytes() const { return rows.bytes() + parts.capacity() * sizeof(float); }
};

// The groups with their rows split into chunks of kChunkKeys keys: each chunk's sums in one
// parallel loop, then each group's on this thread (a few adds per chunk and the hot rows: one
// parallel region a call, as on the other path, since on a busy host every region's threads wait
// for each other's time slices). The same bits as tail_group: the same chunks, their sums added
// in the same order.
template <class Isa, int64_t kD, int64_t kBits>
void tail_split(const std::vector<Group>& groups, int64_t G, int64_t N) {
  // the calling thread's (one whatever the instance of this template): the loop's threads see it
  // through this name
  SplitScratch& sp = thread_scratch<SplitScratch>();
  const KeepAtMost<SplitScratch> keep(sp, kScratchKeepBytes * at::get_num_threads());
  sp.rows.split(static_cast<int64_t>(groups.size()), [&](int64_t i) { return groups[i].L; });
  scratch_resize(sp.parts, sp.rows.count() * G * kD,
                 "chunk sums [chunks, G, D] float32");
  parallel_tasks<Scratch>(sp.rows.count(), [&](int64_t c, Scratch& tmp) {
    const RowChunks::Chunk& ch = sp.rows.chunks[c];
    chunk_tail<Isa, kD, kBits>(groups[ch.group], G, N, ch.j0, ch.j1, tmp.w,
                               sp.parts.data() + c * G * kD);
  });
  for (int64_t i = 0; i < static_cast<int64_t>(groups.size()); ++i) {
    finish_group<Isa, kD>(groups[i], G, sp.parts.data() + sp.rows.first[i] * G * kD,
                          sp.rows.first[i + 1] - sp.rows.first[i]);
  }
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
  KC_CHECK_CPU(scores);
  KC_CHECK_CPU(seq_lens);
  KC_CHECK_CPU(lse);
  KC_CHECK_CPU(indices);
  KC_CHECK_CPU(v_codes);
  KC_CHECK_CPU(v_meta);
  check_host_output(bytes_of({dims.B, dims.Hq, dims.D}, 4), [&] {
    return c10::str("out [", dims.B, ", ", dims.Hq, ", ", dims.D, "] float32");
  });
  check_seq_lens_values(seq_lens, dims.S, "v_codes");
  check_index_values(indices, dims.S, "v_codes");
  const at::Tensor hot_v = hot_v_arg.value_or(at::Tensor());      // undefined: none
  const at::Tensor hot_pos = hot_pos_arg.value_or(at::Tensor());
  if (hot_v.defined()) {  // given (even with no row, as the fake checks them)
    KC_CHECK_CPU(hot_v);
    KC_CHECK_CPU(hot_pos);
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
          data_from<float>(scores, b * scores.stride(0) + h0 * scores.stride(1)),
          scores.stride(1), scores.stride(2),
          data_from<uint8_t>(v_codes, b * v_codes.stride(0) + kvh * v_codes.stride(1)),
          v_codes.stride(2),
          data_from<c10::BFloat16>(v_meta, b * v_meta.stride(0) + kvh * v_meta.stride(1)),
          v_meta.stride(2), lse.data_ptr<float>() + b * lse.stride(0) + h0 * lse.stride(1),
          lse.stride(1),
          data_from<int32_t>(indices, b * indices.stride(0) + h0 * indices.stride(1)),
          indices.stride(1), L, first, end, hot,
          out.data_ptr<float>() + (b * dims.Hq + h0) * dims.D};
    };
    const int64_t groups = dims.B * dims.Hkv;
    const auto run = [&]<int64_t kBits>() {
      if (split_rows(groups)) {
        std::vector<Group> all;  // [B * Hkv]
        for (int64_t bg = 0; bg < groups; ++bg) all.push_back(group(bg / dims.Hkv, bg % dims.Hkv));
        tail_split<Isa, kD, kBits>(all, G, dims.N);
        return;
      }
      parallel_tasks<Scratch>(groups, [&](int64_t bg, Scratch& tmp) {
        tail_group<Isa, kD, kBits>(group(bg / dims.Hkv, bg % dims.Hkv), G, dims.N, tmp);
      });
    };
    if (dims.bits == 2) {  // 2 or 4, checked
      run.template operator()<2>();
    } else {
      run.template operator()<4>();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl(kOp, &NamedOp<kOp, &lowbit_tail_cpu>::call); }

}  // namespace kcache_ops::cpu
