// kcache_ops::sparse_attn_v on the CPU: per (batch, kv head), each query head of the group sums
// its selected V rows weighted by the softmax of its scores (renormalize) or by exp(score - lse),
// plus the mean tail when v_sum and seq_lens are given.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "../named_op.h"
#include "../shape_checks.h"
#include "../value_checks.h"
#include "common.h"
#include "isa.h"

namespace kcache_ops::cpu {
namespace {

constexpr char kOp[] = "sparse_attn_v";  // first in each error the op raises (named_op.h)

// The weights p_i of one head (DESIGN §3): exp(score_i - shift), 0 for padding and -inf scores
// (a softmax's shift is -inf only when every valid score is); as the reference's nan_to_num(0), a
// NaN weight (a NaN score or shift, or an infinite score with an infinite shift) counts 0 and
// +inf (a finite score with lse = -inf, say) the largest float.
inline float entry_weight(const float* scores, const int32_t* idx, int64_t i, float shift) {
  if (idx[i] < 0 || scores[i] == kNegInf) return 0.f;
  const float p = std::exp(scores[i] - shift);
  return std::isnan(p) ? 0.f : std::min(p, std::numeric_limits<float>::max());
}

// The mean tail's factor c = max(0, 1 - sum_i p_i) / (L - n) of one head, n its valid entries;
// 0 when L <= n (no row is left). The tail c · (v_sum - sum_valid v_i) is added by weighting each
// valid row p_i - c and starting from c · v_sum, so the rows are read once.
inline float tail_factor(const float* scores, const int32_t* idx, int64_t N, float lse,
                         int64_t len) {
  float mass = 0.f;
  int64_t n = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (idx[i] < 0) continue;
    ++n;
    mass += entry_weight(scores, idx, i, lse);
  }
  return len > n ? std::max(0.f, 1.f - mass) / static_cast<float>(len - n) : 0.f;
}

// out[kD] = sum_i p_i * v[idx_i] over the valid entries of one head, p_i as DESIGN §3; zeros when
// no entry is valid. With v_sum [kD] (the head's mean tail, renormalize=False): plus
// c · (v_sum - sum_valid v[idx_i]), c = tail_factor(.., len). scores/idx [N]; v: the head's rows
// (row stride v_stride).
template <class Isa, typename scalar_t, int64_t kD>
void attend_head(const float* scores, const int32_t* idx, int64_t N, const scalar_t* v,
                 int64_t v_stride, bool renormalize, float lse, const float* v_sum, int64_t len,
                 scalar_t* out) {
  for (int64_t i = 0; i < N; ++i) {  // all rows in flight at once: they are scattered in memory
    if (idx[i] < 0) continue;
    const char* row = reinterpret_cast<const char*>(v + idx[i] * v_stride);
    for (int64_t b = 0; b < kD * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
      __builtin_prefetch(row + b);
    }
  }
  float acc[kD] = {};
  float shift = lse;  // exp(score - shift) · norm are the weights
  float norm = 1.f;
  if (renormalize) {  // the softmax's max: NaN once a valid score is NaN (every weight then 0)
    shift = kNegInf;
    for (int64_t i = 0; i < N; ++i) {
      if (idx[i] >= 0) shift = std::isnan(scores[i]) ? scores[i] : std::max(shift, scores[i]);
    }
    // the weights are normalised before they meet V (as on CUDA): the sum is a convex
    // combination of the rows, finite for finite rows however large (summed first and divided
    // at the end, rows near the float range would overflow)
    float total = 0.f;
    for (int64_t i = 0; i < N; ++i) total += entry_weight(scores, idx, i, shift);
    norm = total > 0.f ? 1.f / total : 0.f;
  }
  const float tail = v_sum != nullptr ? tail_factor(scores, idx, N, lse, len) : 0.f;
  if (tail != 0.f) {
    for (int64_t d = 0; d < kD; ++d) acc[d] = tail * v_sum[d];
  }
  for (int64_t i = 0; i < N; ++i) {
    if (idx[i] < 0) continue;
    const bool weighted = scores[i] != kNegInf;
    if (!weighted && tail == 0.f) continue;  // the row adds nothing: not read
    const float p = entry_weight(scores, idx, i, shift) * norm;
    Isa::template axpy<scalar_t, kD>(acc, p - tail, v + idx[i] * v_stride);
  }
  for (int64_t d = 0; d < kD; ++d) out[d] = static_cast<scalar_t>(acc[d]);
}

// The G query heads of batch b, KV head kvh; arguments as sparse_attn_v_cpu.
template <class Isa, typename scalar_t, int64_t kD>
void attend_group(const at::Tensor& scores, const at::Tensor& indices, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& lse, bool renormalize,
                  const std::optional<at::Tensor>& v_sum,
                  const std::optional<at::Tensor>& seq_lens, const SparseAttnVDims& dims,
                  int64_t b, int64_t kvh, at::Tensor& out) {
  const scalar_t* v = data_from<scalar_t>(v_cache, b * v_cache.stride(0) + kvh * v_cache.stride(1));
  const float* group_sum =  // [kD] or nullptr: no tail
      dims.tail ? v_sum->data_ptr<float>() + b * v_sum->stride(0) + kvh * v_sum->stride(1)
                : nullptr;
  const int64_t len = dims.tail ? seq_lens->data_ptr<int32_t>()[b * seq_lens->stride(0)] : 0;
  for (int64_t h = kvh * dims.G; h < (kvh + 1) * dims.G; ++h) {
    const float* s = data_from<float>(scores, b * scores.stride(0) + h * scores.stride(1));
    const int32_t* idx =
        data_from<int32_t>(indices, b * indices.stride(0) + h * indices.stride(1));
    const float head_lse =
        renormalize ? 0.f : lse->data_ptr<float>()[b * lse->stride(0) + h * lse->stride(1)];
    attend_head<Isa, scalar_t, kD>(s, idx, dims.N, v, v_cache.stride(2), renormalize, head_lse,
                                   group_sum, len,
                                   out.data_ptr<scalar_t>() + (b * dims.Hq + h) * dims.D);
  }
}

at::Tensor sparse_attn_v_cpu(const at::Tensor& scores,   // [B, Hq, N] float32
                             const at::Tensor& indices,  // [B, Hq, N] int32
                             const at::Tensor& v_cache,  // [B, Hkv, S, D]
                             const std::optional<at::Tensor>& lse,  // [B, Hq] float32
                             bool renormalize,
                             bool /*check_values*/,  // indices, seq_lens on the host: checked
                             const std::optional<at::Tensor>& v_sum,      // [B, Hkv, D] float32
                             const std::optional<at::Tensor>& seq_lens) {  // [B] int32
  const SparseAttnVDims dims =
      check_sparse_attn_v_args(scores, indices, v_cache, lse, renormalize, v_sum, seq_lens);
  KC_CHECK_CPU(scores);
  KC_CHECK_CPU(indices);
  KC_CHECK_CPU(v_cache);
  const std::pair<const char*, const std::optional<at::Tensor>*> optional_args[] = {
      {"lse", &lse}, {"v_sum", &v_sum}, {"seq_lens", &seq_lens}};
  for (const auto& [name, t] : optional_args)  // by name: the macro would print "*lse"
    TORCH_CHECK(!t->has_value() || (*t)->device().is_cpu(), name,
                " must be on cpu, got ", (*t)->device());
  check_host_output(bytes_of({dims.B, dims.Hq, dims.D}, v_cache.element_size()), [&] {
    return c10::str("out [", dims.B, ", ", dims.Hq, ", ", dims.D, "]");
  });
  if (dims.tail) check_seq_lens_values(*seq_lens, dims.S, "v_cache");
  check_index_values(indices, dims.S, "v_cache");
  if (dims.tail) check_indices_below_lens(indices, *seq_lens);
  at::Tensor out = at::empty({dims.B, dims.Hq, dims.D}, v_cache.options());  // [B, Hq, D]
  KC_DISPATCH_FLOAT_HALF_BF16(v_cache.scalar_type(), "sparse_attn_v", [&] {
    KC_HEAD_DIM_SWITCH(dims.D, [&] {
      KC_ISA_SWITCH([&] {
        parallel_for(0, dims.B * dims.Hkv, 1, [&](int64_t begin, int64_t end) {
          for (int64_t bg = begin; bg < end; ++bg) {
            attend_group<Isa, scalar_t, kD>(scores, indices, v_cache, lse, renormalize, v_sum,
                                            seq_lens, dims, bg / dims.Hkv, bg % dims.Hkv, out);
          }
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl(kOp, &NamedOp<kOp, &sparse_attn_v_cpu>::call); }

}  // namespace kcache_ops::cpu
