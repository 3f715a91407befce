// kcache_ops::sparse_attn_v on the CPU: per (batch, kv head), each query head of the group sums
// its selected V rows weighted by the softmax of its scores (renormalize) or by exp(score - lse).
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "../shape_checks.h"
#include "common.h"

namespace kcache_ops::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// out[kD] = sum_i p_i * v[idx_i] over the valid entries of one head, p_i as DESIGN §3; zeros when
// no entry is valid. scores/idx [N]; v: the head's rows (row stride v_stride).
template <typename scalar_t, int64_t kD>
void attend_head(const float* scores, const int32_t* idx, int64_t N, const scalar_t* v,
                 int64_t v_stride, bool renormalize, float lse, scalar_t* out) {
  float acc[kD] = {};
  float shift = lse;  // exp(score - shift) are the weights
  if (renormalize) {
    shift = kNegInf;
    for (int64_t i = 0; i < N; ++i) {
      if (idx[i] >= 0) shift = std::max(shift, scores[i]);
    }
  }
  float total = 0.f;  // sum of the weights
  if (shift != kNegInf) {
    for (int64_t i = 0; i < N; ++i) {
      if (idx[i] < 0 || scores[i] == kNegInf) continue;
      const float p = std::exp(scores[i] - shift);
      const scalar_t* row = v + idx[i] * v_stride;
      for (int64_t d = 0; d < kD; ++d) acc[d] += p * to_float(row[d]);
      total += p;
    }
  }
  const float norm = renormalize && total > 0.f ? 1.f / total : 1.f;
  for (int64_t d = 0; d < kD; ++d) out[d] = static_cast<scalar_t>(acc[d] * norm);
}

at::Tensor sparse_attn_v_cpu(const at::Tensor& scores,   // [B, Hq, N] float32
                             const at::Tensor& indices,  // [B, Hq, N] int32
                             const at::Tensor& v_cache,  // [B, Hkv, S, D]
                             const std::optional<at::Tensor>& lse,  // [B, Hq] float32
                             bool renormalize) {
  const SparseAttnVDims dim = check_sparse_attn_v_args(scores, indices, v_cache, lse, renormalize);
  KC_CHECK_CPU("sparse_attn_v", scores);
  KC_CHECK_CPU("sparse_attn_v", indices);
  KC_CHECK_CPU("sparse_attn_v", v_cache);
  if (lse.has_value()) KC_CHECK_CPU("sparse_attn_v", *lse);
  check_index_values(indices, dim.S, "v_cache");
  at::Tensor out = at::empty({dim.B, dim.Hq, dim.D}, v_cache.options());  // [B, Hq, D]
  const float* lse_p = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  KC_DISPATCH_FLOAT_HALF_BF16(v_cache.scalar_type(), "sparse_attn_v", [&] {
    KC_HEAD_DIM_SWITCH(dim.D, [&] {
      at::parallel_for(0, dim.B * dim.Hkv, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bg = begin; bg < end; ++bg) {
          const int64_t b = bg / dim.Hkv, g = bg % dim.Hkv;
          const scalar_t* v =
              v_cache.data_ptr<scalar_t>() + b * v_cache.stride(0) + g * v_cache.stride(1);
          for (int64_t h = g * dim.G; h < (g + 1) * dim.G; ++h) {
            const float* s = scores.data_ptr<float>() + b * scores.stride(0) + h * scores.stride(1);
            const int32_t* idx =
                indices.data_ptr<int32_t>() + b * indices.stride(0) + h * indices.stride(1);
            const float head_lse = renormalize ? 0.f : lse_p[b * lse->stride(0) + h * lse->stride(1)];
            attend_head<scalar_t, kD>(s, idx, dim.N, v, v_cache.stride(2), renormalize, head_lse,
                                      out.data_ptr<scalar_t>() + (b * dim.Hq + h) * dim.D);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl("sparse_attn_v", &sparse_attn_v_cpu); }

}  // namespace kcache_ops::cpu
