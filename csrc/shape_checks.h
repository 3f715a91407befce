// Device-independent argument checks of the ops (ranks, shapes, dtypes, head dims, strides), shared
// by the CPU implementations and the CUDA launchers. Device placement is checked next to each
// implementation; the values of seq_lens and indices in value_checks.h.
#pragma once

#include <cmath>
#include <optional>
#include <utility>

#include "checks.h"

namespace kcache_ops {

// The leading and trailing keys an op leaves out (qk_topn's ranking, lowbit_tail's sum): KCache's
// hot rows. Each is a key count, so the kernels' int positions hold it.
inline void check_skip_counts(int64_t skip_first, int64_t skip_last) {
  TORCH_CHECK(skip_first >= 0 && skip_first < (int64_t{1} << 31),
              "skip_first must be in [0, 2^31), got ", skip_first);
  TORCH_CHECK(skip_last >= 0 && skip_last < (int64_t{1} << 31),
              "skip_last must be in [0, 2^31), got ", skip_last);
}

// Sizes of a qk_topn call.
struct QkTopnDims {
  int64_t B, Hq, Hkv, G, S, D, n;
};

// q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B] int32, n in [1, 2^31), skip_first /
// skip_last >= 0, scale finite and top_p in (0, 1], both as float32s (the ops compute in float32).
inline QkTopnDims check_qk_topn_args(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& seq_lens, int64_t n, double scale,
                                     int64_t skip_first, int64_t skip_last, double top_p) {
  KC_CHECK_DIM(q, 3);
  KC_CHECK_DIM(k_cache, 4);
  KC_CHECK_DIM(seq_lens, 1);
  KC_CHECK_FLOATING(q);
  KC_CHECK_SAME_DTYPE(q, k_cache);
  KC_CHECK_DTYPE(seq_lens, at::kInt);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B, "k_cache batch (", k_cache.size(0), ") must equal q batch (",
              B, ")");
  TORCH_CHECK(seq_lens.size(0) == B, "seq_lens must have shape [", B, "] (q batch), got ",
              seq_lens.sizes());
  TORCH_CHECK(k_cache.size(3) == D, "k_cache head dim (", k_cache.size(3),
              ") must equal q head dim (", D, ")");
  KC_CHECK_GQA(Hq, Hkv, "q", "k_cache");
  KC_CHECK_HEAD_DIM(q, D);
  TORCH_CHECK(n >= 1 && n < (int64_t{1} << 31), "n must be in [1, 2^31), got ", n);
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), "scale must be finite (as a float32), got ",
              exact_text(scale));
  check_skip_counts(skip_first, skip_last);
  const float top_p32 = static_cast<float>(top_p);
  TORCH_CHECK(top_p32 > 0 && top_p32 <= 1, "top_p must be in (0, 1] (as a float32), got ",
              exact_text(top_p));
  KC_CHECK_LAST_CONTIGUOUS(q);
  KC_CHECK_LAST_CONTIGUOUS(k_cache);
  return {B, Hq, Hkv, Hq / Hkv, S, D, n};
}

// Sizes of a sparse_attn_v call.
struct SparseAttnVDims {
  int64_t B, Hq, Hkv, G, N, S, D;
  bool tail;  // the mean tail is added (v_sum and seq_lens given)
};

// scores [B, Hq, N] float32, indices [B, Hq, N] int32, v_cache [B, Hkv, S, D],
// lse [B, Hq] float32 (required when renormalize is false); the mean tail's v_sum [B, Hkv, D]
// float32 and seq_lens [B] int32, both or neither, only with renormalize=False.
inline SparseAttnVDims check_sparse_attn_v_args(const at::Tensor& scores,
                                                const at::Tensor& indices,
                                                const at::Tensor& v_cache,
                                                const std::optional<at::Tensor>& lse,
                                                bool renormalize,
                                                const std::optional<at::Tensor>& v_sum,
                                                const std::optional<at::Tensor>& seq_lens) {
  KC_CHECK_DIM(scores, 3);
  KC_CHECK_DIM(indices, 3);
  KC_CHECK_DIM(v_cache, 4);
  KC_CHECK_DTYPE(scores, at::kFloat);
  KC_CHECK_DTYPE(indices, at::kInt);
  KC_CHECK_FLOATING(v_cache);
  TORCH_CHECK(indices.sizes() == scores.sizes(), "indices must have the shape of scores ",
              scores.sizes(), ", got ", indices.sizes());
  const int64_t B = scores.size(0), Hq = scores.size(1), N = scores.size(2);
  const int64_t Hkv = v_cache.size(1), S = v_cache.size(2), D = v_cache.size(3);
  TORCH_CHECK(v_cache.size(0) == B, "v_cache batch (", v_cache.size(0),
              ") must equal scores batch (", B, ")");
  KC_CHECK_GQA(Hq, Hkv, "scores", "v_cache");
  KC_CHECK_HEAD_DIM(v_cache, D);
  KC_CHECK_LAST_CONTIGUOUS(scores);
  KC_CHECK_LAST_CONTIGUOUS(indices);
  KC_CHECK_LAST_CONTIGUOUS(v_cache);
  TORCH_CHECK(v_sum.has_value() == seq_lens.has_value(),
              "v_sum and seq_lens must be given together (the mean tail), got ",
              v_sum.has_value() ? "v_sum without seq_lens" : "seq_lens without v_sum");
  TORCH_CHECK(!v_sum.has_value() || !renormalize,
              "the mean tail (v_sum) needs renormalize=False, got renormalize=True");
  TORCH_CHECK(renormalize || lse.has_value(),
              "lse is required when renormalize=False, got None");
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "lse must be float32, got ",
                dtype_name(lse->scalar_type()));
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == B && lse->size(1) == Hq,
                "lse must have shape [", B, ", ", Hq, "] (scores batch, heads), got ",
                lse->sizes());
  }
  if (v_sum.has_value()) {
    TORCH_CHECK(v_sum->scalar_type() == at::kFloat, "v_sum must be float32, got ",
                dtype_name(v_sum->scalar_type()));
    TORCH_CHECK(v_sum->dim() == 3 && v_sum->size(0) == B && v_sum->size(1) == Hkv &&
                    v_sum->size(2) == D,
                "v_sum must have shape [", B, ", ", Hkv, ", ", D,
                "] (v_cache batch, heads, head dim), got ", v_sum->sizes());
    TORCH_CHECK(v_sum->stride(2) == 1, "v_sum must be contiguous in its last dim, got strides ",
                v_sum->strides());
    TORCH_CHECK(seq_lens->scalar_type() == at::kInt, "seq_lens must be int32, got ",
                dtype_name(seq_lens->scalar_type()));
    TORCH_CHECK(seq_lens->dim() == 1 && seq_lens->size(0) == B, "seq_lens must have shape [", B,
                "] (scores batch), got ", seq_lens->sizes());
  }
  return {B, Hq, Hkv, Hq / Hkv, N, S, D, v_sum.has_value()};
}

// Sizes of a gather_rows call.
struct GatherRowsDims {
  int64_t B, H, Hs, G, N, S, D;
};

// src [B, Hs, S, D] (any dtype; a gather is a copy), indices [B, H, N] int32.
inline GatherRowsDims check_gather_rows_args(const at::Tensor& src, const at::Tensor& indices) {
  KC_CHECK_DIM(src, 4);
  KC_CHECK_DIM(indices, 3);
  KC_CHECK_DTYPE(indices, at::kInt);
  const int64_t B = indices.size(0), H = indices.size(1), N = indices.size(2);
  const int64_t Hs = src.size(1), S = src.size(2), D = src.size(3);
  TORCH_CHECK(src.size(0) == B, "src batch (", src.size(0), ") must equal indices batch (", B,
              ")");
  KC_CHECK_GQA(H, Hs, "indices", "src");
  KC_CHECK_LAST_CONTIGUOUS(src);
  KC_CHECK_LAST_CONTIGUOUS(indices);
  return {B, H, Hs, H / Hs, N, S, D};
}

// Sizes of a reuse_rows call: E the entries of a step per KV head (G * N, or N with group_select).
struct ReuseRowsDims {
  int64_t B, Hq, Hkv, G, N, S, D, C, E;
};

// indices [B, Hq, N] int32, v_host [B, Hkv, S, D], new_pos [B] int32, rows [B, Hkv, C, D]
// (contiguous, dtype of v_host), held and used [B, Hkv, C] int32 (contiguous), step [1] int32;
// C >= E.
inline ReuseRowsDims check_reuse_rows_args(const at::Tensor& indices, const at::Tensor& v_host,
                                           const at::Tensor& new_pos, const at::Tensor& rows,
                                           const at::Tensor& held, const at::Tensor& used,
                                           const at::Tensor& step, bool group_select) {
  KC_CHECK_DIM(indices, 3);
  KC_CHECK_DIM(v_host, 4);
  KC_CHECK_DIM(new_pos, 1);
  KC_CHECK_DIM(rows, 4);
  KC_CHECK_DIM(held, 3);
  KC_CHECK_DIM(used, 3);
  KC_CHECK_DIM(step, 1);
  KC_CHECK_DTYPE(indices, at::kInt);
  KC_CHECK_DTYPE(new_pos, at::kInt);
  KC_CHECK_DTYPE(held, at::kInt);
  KC_CHECK_DTYPE(used, at::kInt);
  KC_CHECK_DTYPE(step, at::kInt);
  KC_CHECK_SAME_DTYPE(rows, v_host);
  const int64_t B = indices.size(0), Hq = indices.size(1), N = indices.size(2);
  const int64_t Hkv = v_host.size(1), S = v_host.size(2), D = v_host.size(3);
  TORCH_CHECK(v_host.size(0) == B, "v_host batch (", v_host.size(0),
              ") must equal indices batch (", B, ")");
  KC_CHECK_GQA(Hq, Hkv, "indices", "v_host");
  TORCH_CHECK(new_pos.size(0) == B, "new_pos must have shape [", B, "] (indices batch), got ",
              new_pos.sizes());
  TORCH_CHECK(step.size(0) == 1, "step must have shape [1], got ", step.sizes());
  const int64_t C = rows.size(2);
  TORCH_CHECK(rows.size(0) == B && rows.size(1) == Hkv && rows.size(3) == D,
              "rows must have shape [", B, ", ", Hkv, ", C, ", D, "] (v_host's batch, heads and ",
              "head dim), got ", rows.sizes());
  TORCH_CHECK(held.sizes() == rows.sizes().slice(0, 3), "held must have shape ",
              rows.sizes().slice(0, 3), " (rows' [B, Hkv, C]), got ", held.sizes());
  TORCH_CHECK(used.sizes() == held.sizes(), "used must have shape ", held.sizes(),
              " (rows' [B, Hkv, C]), got ", used.sizes());
  const int64_t E = group_select ? N : Hq / Hkv * N;
  TORCH_CHECK(C >= E, "rows must have at least ", E, " slots (the rows of one step: ",
              group_select ? "N with group_select" : "G x N", "), got ", C);
  TORCH_CHECK(S < (int64_t{1} << 31), "v_host must have fewer than 2^31 rows, got ", S);
  TORCH_CHECK(C < (int64_t{1} << 31), "rows must have fewer than 2^31 slots (pool_indices are ",
              "int32), got ", C);
  KC_CHECK_LAST_CONTIGUOUS(v_host);
  KC_CHECK_LAST_CONTIGUOUS(indices);
  for (const auto& [name, pool] : {std::pair<const char*, const at::Tensor*>{"rows", &rows},
                                   {"held", &held}, {"used", &used}}) {
    TORCH_CHECK(pool->is_contiguous(), name, " must be contiguous (the pool, updated in place), "
                "got strides ", pool->strides(), " for shape ", pool->sizes());
  }
  check_no_overlap({{"rows", &rows}, {"held", &held}, {"used", &used}},
                   {{"indices", &indices}, {"v_host", &v_host}, {"new_pos", &new_pos},
                    {"step", &step}});
  return {B, Hq, Hkv, Hq / Hkv, N, S, D, C, E};
}

// Sizes of a quantize_rows call: rows = the product of v's leading dims.
struct QuantizeRowsDims {
  int64_t rows, D, bits, code_bytes;  // code_bytes = D * bits / 8 per row
};

// v [..., D] (at least 1 dim; float32, float16 or bfloat16; last dim contiguous), bits in {2, 4},
// D a positive multiple of 8 / bits (the codes of one byte never straddle two rows).
inline QuantizeRowsDims check_quantize_rows_args(const at::Tensor& v, int64_t bits) {
  TORCH_CHECK(v.dim() >= 1, "v must have at least 1 dim ([..., D]), got a 0-dim tensor");
  KC_CHECK_FLOATING(v);
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  const int64_t D = v.size(-1), per_byte = 8 / bits;
  TORCH_CHECK(D > 0 && D % per_byte == 0, "v: last dim (D) must be a positive multiple of ",
              per_byte, " (8 / bits) for bits=", bits, ", got ", D);
  KC_CHECK_LAST_CONTIGUOUS(v);
  return {v.numel() / D, D, bits, D * bits / 8};
}

// Sizes of a lowbit_tail call (N: the index slots, D: the head dim of the codes).
struct LowbitTailDims {
  int64_t B, Hq, Hkv, G, S, D, N, bits;
};

// scores [B, Hq, S] float32 (qk_topn's return_scores), seq_lens [B] int32, lse [B, Hq] float32,
// indices [B, Hq, N] int32, v_codes [B, Hkv, S, D * bits / 8] uint8 (bits 2 or 4, D 64 or 128),
// v_meta [B, Hkv, S, 2] bfloat16, skip_first / skip_last >= 0.
inline LowbitTailDims check_lowbit_tail_args(const at::Tensor& scores, const at::Tensor& seq_lens,
                                             const at::Tensor& lse, const at::Tensor& indices,
                                             const at::Tensor& v_codes, const at::Tensor& v_meta,
                                             int64_t bits, int64_t skip_first,
                                             int64_t skip_last) {
  KC_CHECK_DIM(scores, 3);
  KC_CHECK_DTYPE(scores, at::kFloat);
  KC_CHECK_DIM(seq_lens, 1);
  KC_CHECK_DTYPE(seq_lens, at::kInt);
  const int64_t B = scores.size(0), Hq = scores.size(1), S = scores.size(2);
  TORCH_CHECK(seq_lens.size(0) == B, "seq_lens must have shape [", B, "] (scores batch), got ",
              seq_lens.sizes());
  KC_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == Hq, "lse must have shape [",
              B, ", ", Hq, "] (scores batch, heads), got ", lse.sizes());
  KC_CHECK_DIM(indices, 3);
  KC_CHECK_DTYPE(indices, at::kInt);
  TORCH_CHECK(indices.size(0) == B && indices.size(1) == Hq, "indices must have shape [", B,
              ", ", Hq, ", N] (scores batch, heads), got ", indices.sizes());
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  check_skip_counts(skip_first, skip_last);
  KC_CHECK_DIM(v_codes, 4);
  KC_CHECK_DTYPE(v_codes, at::kByte);
  KC_CHECK_DIM(v_meta, 4);
  KC_CHECK_DTYPE(v_meta, at::kBFloat16);
  const int64_t Hkv = v_codes.size(1), code_bytes = v_codes.size(3);
  TORCH_CHECK(v_codes.size(0) == B && v_codes.size(2) == S, "v_codes must have shape [", B,
              ", Hkv, ", S, ", D * bits / 8] (scores batch, -, keys), got ", v_codes.sizes());
  KC_CHECK_GQA(Hq, Hkv, "scores", "v_codes");
  const int64_t D = code_bytes * 8 / bits;
  TORCH_CHECK(code_bytes * 8 == D * bits && (D == 64 || D == 128), "v_codes last dim must be ",
              "D * bits / 8 with D 64 or 128 (", 64 * bits / 8, " or ", 128 * bits / 8,
              " bytes for bits = ", bits, "), got ", code_bytes);
  TORCH_CHECK(v_meta.size(0) == B && v_meta.size(1) == Hkv && v_meta.size(2) == S &&
                  v_meta.size(3) == 2,
              "v_meta must have shape [", B, ", ", Hkv, ", ", S,
              ", 2] (v_codes batch, heads, keys; scale and min), got ", v_meta.sizes());
  KC_CHECK_LAST_CONTIGUOUS(indices);
  KC_CHECK_LAST_CONTIGUOUS(v_codes);
  KC_CHECK_LAST_CONTIGUOUS(v_meta);
  return {B, Hq, Hkv, Hq / Hkv, S, D, indices.size(2), bits};
}

// lowbit_tail's exact rows on the device: hot_v [B, Hkv, H, D] (float32, float16 or bfloat16,
// contiguous in D) and hot_pos [B, H] int32, both or neither -> H (0 for neither).
inline int64_t check_hot_rows(const std::optional<at::Tensor>& hot_v_arg,
                              const std::optional<at::Tensor>& hot_pos_arg,
                              const LowbitTailDims& dims) {
  TORCH_CHECK(hot_v_arg.has_value() == hot_pos_arg.has_value(), "hot_v and hot_pos must be "
              "given together, got hot_v ", hot_v_arg ? "set" : "None", " and hot_pos ",
              hot_pos_arg ? "set" : "None");
  if (!hot_v_arg) return 0;
  const at::Tensor& hot_v = *hot_v_arg;
  const at::Tensor& hot_pos = *hot_pos_arg;
  KC_CHECK_DIM(hot_v, 4);
  KC_CHECK_FLOATING(hot_v);
  const int64_t H = hot_v.size(2);
  TORCH_CHECK(hot_v.size(0) == dims.B && hot_v.size(1) == dims.Hkv && hot_v.size(3) == dims.D,
              "hot_v must have shape [", dims.B, ", ", dims.Hkv, ", H, ", dims.D,
              "] (scores batch, v_codes heads, -, head dim), got ", hot_v.sizes());
  KC_CHECK_LAST_CONTIGUOUS(hot_v);
  KC_CHECK_DIM(hot_pos, 2);
  KC_CHECK_DTYPE(hot_pos, at::kInt);
  TORCH_CHECK(hot_pos.size(0) == dims.B && hot_pos.size(1) == H, "hot_pos must have shape [",
              dims.B, ", ", H, "] (scores batch, hot_v rows), got ", hot_pos.sizes());
  return H;
}

}  // namespace kcache_ops
