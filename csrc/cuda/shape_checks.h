// Device-independent argument checks of the three ops (shapes, dtypes, n), in the style of
// ../checks.h: each names the argument, what was expected and what came. Returns the sizes the
// launchers need.
#pragma once

#include <optional>

#include "../checks.h"

namespace kcache_ops {

struct QkDims {
  int64_t b, hq, hkv, s, d;
};

// q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B] int32, n >= 1.
inline QkDims check_qk_topn_args(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& seq_lens, int64_t n) {
  KC_CHECK_DIM(q, 3);
  KC_CHECK_DIM(k_cache, 4);
  KC_CHECK_DIM(seq_lens, 1);
  KC_CHECK_FLOATING(q);
  KC_CHECK_SAME_DTYPE(q, k_cache);
  KC_CHECK_DTYPE(seq_lens, at::kInt);
  KC_CHECK_LAST_CONTIGUOUS(q);
  KC_CHECK_LAST_CONTIGUOUS(k_cache);
  const QkDims d{q.size(0), q.size(1), k_cache.size(1), k_cache.size(2), q.size(2)};
  TORCH_CHECK(k_cache.size(0) == d.b, "k_cache batch must equal q batch (", d.b, "), got ",
              k_cache.size(0));
  TORCH_CHECK(seq_lens.size(0) == d.b, "seq_lens must have shape (", d.b, "), got ",
              seq_lens.sizes());
  TORCH_CHECK(k_cache.size(3) == d.d, "k_cache head dim must equal q head dim (", d.d, "), got ",
              k_cache.size(3));
  KC_CHECK_HEAD_DIM(q, d.d);
  KC_CHECK_GQA(d.hq, d.hkv, "q", "k_cache");
  TORCH_CHECK(n >= 1, "n must be >= 1, got ", n);
  return d;
}

struct AttnDims {
  int64_t b, hq, n, hkv, s, d;
};

// scores [B, Hq, N] float32, indices [B, Hq, N] int32, v_cache [B, Hkv, S, D], lse [B, Hq] float32
// (required when renormalize is false).
inline AttnDims check_sparse_attn_v_args(const at::Tensor& scores, const at::Tensor& indices,
                                         const at::Tensor& v_cache,
                                         const std::optional<at::Tensor>& lse, bool renormalize) {
  KC_CHECK_DIM(scores, 3);
  KC_CHECK_DIM(indices, 3);
  KC_CHECK_DIM(v_cache, 4);
  KC_CHECK_DTYPE(scores, at::kFloat);
  KC_CHECK_DTYPE(indices, at::kInt);
  KC_CHECK_FLOATING(v_cache);
  KC_CHECK_LAST_CONTIGUOUS(v_cache);
  TORCH_CHECK(indices.sizes() == scores.sizes(), "indices must have the shape of scores (",
              scores.sizes(), "), got ", indices.sizes());
  const AttnDims d{scores.size(0), scores.size(1), scores.size(2),
                   v_cache.size(1), v_cache.size(2), v_cache.size(3)};
  TORCH_CHECK(v_cache.size(0) == d.b, "v_cache batch must equal scores batch (", d.b, "), got ",
              v_cache.size(0));
  KC_CHECK_HEAD_DIM(v_cache, d.d);
  KC_CHECK_GQA(d.hq, d.hkv, "scores", "v_cache");
  TORCH_CHECK(renormalize || lse.has_value(), "lse is required when renormalize=False");
  if (lse.has_value()) {
    KC_CHECK_DTYPE((*lse), at::kFloat);
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == d.b && lse->size(1) == d.hq,
                "lse must have shape (", d.b, ", ", d.hq, "), got ", lse->sizes());
  }
  return d;
}

struct GatherDims {
  int64_t b, h, n, hs, s, d;
};

// src [B, Hs, S, D], indices [B, H, N] int32 with H a multiple of Hs.
inline GatherDims check_gather_rows_args(const at::Tensor& src, const at::Tensor& indices) {
  KC_CHECK_DIM(src, 4);
  KC_CHECK_DIM(indices, 3);
  KC_CHECK_DTYPE(indices, at::kInt);
  KC_CHECK_LAST_CONTIGUOUS(src);
  const GatherDims d{indices.size(0), indices.size(1), indices.size(2),
                     src.size(1),     src.size(2),     src.size(3)};
  TORCH_CHECK(src.size(0) == d.b, "src batch must equal indices batch (", d.b, "), got ",
              src.size(0));
  KC_CHECK_GQA(d.h, d.hs, "indices", "src");
  return d;
}

}  // namespace kcache_ops
