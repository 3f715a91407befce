// kcache_ops::qk_topn on the CPU: per (batch, kv head), the scores of all G query heads of the
// group reading each K row once, an online log-sum-exp, and a bounded-heap top-N selection.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../shape_checks.h"
#include "common.h"

namespace kcache_ops::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 256;  // keys scored before each online-lse update (stays in L1)

// One candidate of a selection: its ranking key and its position.
struct Cand {
  float key;
  int32_t idx;
};

// Descending key, ties to the lower index.
inline bool better(const Cand& a, const Cand& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

// The min(n, len) best of keys[0, len) into heap, sorted best first. A heap whose top is the worst
// kept candidate; positions come in ascending order, so an equal key never displaces it.
void top_n(const float* keys, int64_t len, int64_t n, std::vector<Cand>& heap) {
  heap.clear();
  const int64_t first = std::min(len, n);
  for (int64_t j = 0; j < first; ++j) heap.push_back({keys[j], static_cast<int32_t>(j)});
  std::make_heap(heap.begin(), heap.end(), better);
  for (int64_t j = first; j < len; ++j) {
    if (keys[j] > heap.front().key) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {keys[j], static_cast<int32_t>(j)};
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort(heap.begin(), heap.end(), better);
}

// <a, b> over kD floats with 16 independent lanes (vectorisable without reassociation).
template <int64_t kD>
inline float dot(const float* a, const float* b) {
  float acc[16] = {};
  for (int64_t d = 0; d < kD; d += 16) {
    for (int64_t l = 0; l < 16; ++l) acc[l] += a[d + l] * b[d + l];
  }
  float sum = 0.f;
  for (int64_t l = 0; l < 16; ++l) sum += acc[l];
  return sum;
}

// Scores of one group: s[h * L + j] = scale * <q_h, k_j> for h < G, j < L, and lse[h] over them.
// q: G rows of kD (row stride q_stride); k: L rows of kD (row stride k_stride).
template <typename scalar_t, int64_t kD>
void group_scores(const scalar_t* q, int64_t q_stride, const scalar_t* k, int64_t k_stride,
                  int64_t G, int64_t L, float scale, float* s /* [G, L] */,
                  float* lse /* [G] */) {
  std::vector<float> qf(G * kD);  // [G, kD] float32 copy of the queries
  for (int64_t h = 0; h < G; ++h) {
    for (int64_t d = 0; d < kD; ++d) qf[h * kD + d] = to_float(q[h * q_stride + d]);
  }
  std::vector<float> run_max(G, kNegInf), run_sum(G, 0.f);  // [G] online lse state
  float kf[kD];                                               // one K row in float32
  for (int64_t j0 = 0; j0 < L; j0 += kChunk) {
    const int64_t j1 = std::min(L, j0 + kChunk);
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t* row = k + j * k_stride;
      for (int64_t d = 0; d < kD; ++d) kf[d] = to_float(row[d]);
      for (int64_t h = 0; h < G; ++h) s[h * L + j] = dot<kD>(&qf[h * kD], kf) * scale;
    }
    for (int64_t h = 0; h < G; ++h) {
      const float* sh = s + h * L;
      const float m = std::max(run_max[h], *std::max_element(sh + j0, sh + j1));
      float sum = run_sum[h] * std::exp(run_max[h] - m);
      for (int64_t j = j0; j < j1; ++j) sum += std::exp(sh[j] - m);
      run_max[h] = m;
      run_sum[h] = sum;
    }
  }
  for (int64_t h = 0; h < G; ++h) lse[h] = L > 0 ? run_max[h] + std::log(run_sum[h]) : kNegInf;
}

// Writes n entries of one head: the selected candidates, then padding (-inf, -1).
// pick [m <= n] selected positions; s_head [L] the head's scores.
void write_head(const std::vector<Cand>& pick, const float* s_head, int64_t n,
                float* scores /* [n] */, int32_t* indices /* [n] */) {
  const int64_t m = static_cast<int64_t>(pick.size());
  for (int64_t i = 0; i < m; ++i) {
    scores[i] = s_head[pick[i].idx];
    indices[i] = pick[i].idx;
  }
  std::fill(scores + m, scores + n, kNegInf);
  std::fill(indices + m, indices + n, -1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_topn_cpu(const at::Tensor& q,  // [B, Hq, D]
                                                           const at::Tensor& k_cache,  // [B, Hkv, S, D]
                                                           const at::Tensor& seq_lens,  // [B] int32
                                                           int64_t n, double scale,
                                                           bool group_select) {
  const QkTopnDims dim = check_qk_topn_args(q, k_cache, seq_lens, n);
  KC_CHECK_CPU("qk_topn", q);
  KC_CHECK_CPU("qk_topn", k_cache);
  KC_CHECK_CPU("qk_topn", seq_lens);
  check_seq_lens_values(seq_lens, dim.S);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({dim.B, dim.Hq, n}, f32);                        // [B, Hq, n]
  at::Tensor indices = at::empty({dim.B, dim.Hq, n}, f32.dtype(at::kInt));       // [B, Hq, n]
  at::Tensor lse = at::empty({dim.B, dim.Hq}, f32);                              // [B, Hq]
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t G = dim.G;
  KC_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "qk_topn", [&] {
    KC_HEAD_DIM_SWITCH(dim.D, [&] {
      at::parallel_for(0, dim.B * dim.Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> s;     // [G, L] scores of the group
        std::vector<float> mass;  // [L] c_j of group_select
        std::vector<Cand> heap;   // [<= n] selection
        for (int64_t bg = begin; bg < end; ++bg) {
          const int64_t b = bg / dim.Hkv, g = bg % dim.Hkv;
          const int64_t L = lens[b * seq_lens.stride(0)];
          s.resize(G * L);
          const scalar_t* qp = q.data_ptr<scalar_t>() + b * q.stride(0) + g * G * q.stride(1);
          const scalar_t* kp =
              k_cache.data_ptr<scalar_t>() + b * k_cache.stride(0) + g * k_cache.stride(1);
          float* lse_p = lse.data_ptr<float>() + b * dim.Hq + g * G;
          group_scores<scalar_t, kD>(qp, q.stride(1), kp, k_cache.stride(2), G, L,
                                     static_cast<float>(scale), s.data(), lse_p);
          float* out_s = scores.data_ptr<float>() + (b * dim.Hq + g * G) * n;
          int32_t* out_i = indices.data_ptr<int32_t>() + (b * dim.Hq + g * G) * n;
          if (group_select) {
            mass.assign(L, 0.f);
            for (int64_t h = 0; h < G; ++h) {
              for (int64_t j = 0; j < L; ++j) mass[j] += std::exp(s[h * L + j] - lse_p[h]);
            }
            top_n(mass.data(), L, n, heap);
          }
          for (int64_t h = 0; h < G; ++h) {
            if (!group_select) top_n(&s[h * L], L, n, heap);
            write_head(heap, &s[h * L], n, out_s + h * n, out_i + h * n);
          }
        }
      });
    });
  });
  return {scores, indices, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl("qk_topn", &qk_topn_cpu); }

}  // namespace kcache_ops::cpu
