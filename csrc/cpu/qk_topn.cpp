// kcache_ops::qk_topn on the CPU: per (batch, kv head), the scores of all G query heads of the
// group reading each K row once, an online log-sum-exp, and a threshold-filtered top-N selection.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "../shape_checks.h"
#include "../value_checks.h"
#include "common.h"
#include "isa.h"

namespace kcache_ops::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kTile = 64;  // keys per tile: 64 K rows (<= 32 KiB) stay in L1 across head passes

// One candidate of a selection: its ranking key and its position.
struct Cand {
  float key;
  int32_t idx;
};

// Descending key, ties to the lower index.
struct Better {
  bool operator()(const Cand& a, const Cand& b) const {
    return a.key > b.key || (a.key == b.key && a.idx < b.idx);
  }
};

// As Better, with NaN above every number (torch.sort ranks NaN first in descending order).
struct BetterNanFirst {
  bool operator()(const Cand& a, const Cand& b) const {
    const bool a_nan = std::isnan(a.key), b_nan = std::isnan(b.key);
    if (a_nan || b_nan) return a_nan && (!b_nan || a.idx < b.idx);
    return Better()(a, b);
  }
};

// Keeps the n best of buf (more than n) and returns the key of the worst kept.
float keep_best(std::vector<Cand>& buf, int64_t n) {
  std::nth_element(buf.begin(), buf.begin() + (n - 1), buf.end(), Better());
  buf.resize(n);
  return buf[n - 1].key;
}

// Buffers of a selection, reused across calls.
struct TopN {
  std::vector<Cand> best;       // [<= 2n] candidates; after top_n(), the best min(n, len) sorted
  std::vector<float> tile_max;  // [tiles] max key of each kTile-key tile
  std::vector<float> ranked;    // [tiles] tile_max, reordered by nth_element
};

// top_n of a row that holds a NaN key (bad input): every key ranked by BetterNanFirst.
void top_n_with_nan(const float* keys, int64_t len, int64_t n, TopN& top) {
  top.best.clear();
  for (int64_t j = 0; j < len; ++j) top.best.push_back({keys[j], static_cast<int32_t>(j)});
  const int64_t m = std::min(n, len);
  std::partial_sort(top.best.begin(), top.best.begin() + m, top.best.end(), BetterNanFirst());
  top.best.resize(m);
}

// The min(n, len) best of keys[0, len) into top.best, sorted best first.
// Keys above a threshold gather in top.best; whenever it holds 2n, the best n stay and the
// threshold rises to the worst of them (positions come in ascending order, so a later key equal
// to the threshold ranks below it). The threshold starts just under the n-th largest tile max:
// n distinct keys reach it, so nothing below it is among the n best, and tiles whose max stays
// below the threshold are skipped whole. A row with a NaN key goes to top_n_with_nan.
template <class Isa>
void top_n(const float* keys, int64_t len, int64_t n, TopN& top) {
  const int64_t tiles = (len + kTile - 1) / kTile;
  top.tile_max.resize(tiles);
  bool has_nan = false;
  for (int64_t t = 0; t < tiles; ++t) {
    top.tile_max[t] = Isa::max_of(keys + t * kTile, std::min(kTile, len - t * kTile));
    has_nan = has_nan || std::isnan(top.tile_max[t]);
  }
  if (has_nan) return top_n_with_nan(keys, len, n, top);
  float thr = kNegInf;  // keys <= thr at later positions are not among the n best
  if (tiles >= n) {
    top.ranked = top.tile_max;
    std::nth_element(top.ranked.begin(), top.ranked.begin() + (n - 1), top.ranked.end(),
                     std::greater<float>());
    thr = std::nextafter(top.ranked[n - 1], kNegInf);
    // never a subnormal: with denormals flushed (torch.set_flush_denormal) one just under a max
    // of 0 reads as 0, and a key equal to that max would fail `key > thr` (a comparison, not
    // fpclassify, which under that mode takes a subnormal for 0 too)
    constexpr float kNormal = std::numeric_limits<float>::min();
    if (std::fabs(thr) < kNormal) thr = -kNormal;
  }
  top.best.clear();
  const int64_t first = std::min(len, n);  // always candidates, so min(n, len) come out
  for (int64_t j = 0; j < first; ++j) top.best.push_back({keys[j], static_cast<int32_t>(j)});
  for (int64_t t = first / kTile; t < tiles; ++t) {
    if (!(top.tile_max[t] > thr)) continue;
    const int64_t end = std::min(len, (t + 1) * kTile);
    for (int64_t j = std::max(first, t * kTile); (j = Isa::first_above(keys, j, end, thr)) < end;
         ++j) {
      top.best.push_back({keys[j], static_cast<int32_t>(j)});
      if (static_cast<int64_t>(top.best.size()) == 2 * n) {
        thr = std::max(thr, keep_best(top.best, n));
      }
    }
  }
  if (static_cast<int64_t>(top.best.size()) > n) keep_best(top.best, n);
  std::sort(top.best.begin(), top.best.end(), Better());
}

// Scores of one group: s[h * L + j] = scale * <q_h, k_j> for h < G, j < L, and lse[h] over them.
// qf [G, kD] float32; k: L rows of kD (row stride k_stride). Tiles of kTile keys: all head passes
// over a tile read its K rows from L1, then each head's online log-sum-exp absorbs the tile (a NaN
// score makes the head's running max, and so its lse, NaN for good; as torch.logsumexp, an
// infinite running max is the lse: -inf while every score is -inf, +inf once one is).
template <class Isa, typename scalar_t, int64_t kD>
void group_scores(const float* qf, const scalar_t* k, int64_t k_stride, int64_t G, int64_t L,
                  float scale, float* s /* [G, L] */, float* lse /* [G] */) {
  // [G] online lse state; the sum in double: float32 adds of one tile sum after another drift
  // (a relative 2e-5 at 3M keys)
  std::vector<float> run_max(G, kNegInf);
  std::vector<double> run_sum(G, 0.0);
  for (int64_t j0 = 0; j0 < L; j0 += kTile) {
    const int64_t rows = std::min(kTile, L - j0);
    for (int64_t h = 0; h < G;) {
      h += score_heads<Isa, scalar_t, kD>(qf + h * kD, G - h, k + j0 * k_stride, k_stride, rows,
                                          scale, s + h * L + j0, L);
    }
    for (int64_t h = 0; h < G; ++h) {
      const float* tile = s + h * L + j0;
      const float tile_max = Isa::max_of(tile, rows);
      // std::max keeps a NaN running max (its first argument); a NaN tile max is taken here
      const float m = std::isnan(tile_max) ? tile_max : std::max(run_max[h], tile_max);
      if (!std::isinf(m))  // exp(s - m) would be exp(inf - inf) for an infinite score
        run_sum[h] = run_sum[h] * std::exp(static_cast<double>(run_max[h]) - m) +
                     Isa::sum_exp(tile, rows, m);
      run_max[h] = m;
    }
  }
  for (int64_t h = 0; h < G; ++h)
    lse[h] = std::isinf(run_max[h]) ? run_max[h]
                                    : static_cast<float>(run_max[h] + std::log(run_sum[h]));
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

// With top_p < 1: the n entries of one head (written by write_head) cut to the shortest prefix
// whose mass exp(s - lse) (a NaN term counting 0) reaches top_p, the rest padding. The first
// entry is always kept: nothing is ahead of it.
void keep_mass_prefix(float lse, float top_p, int64_t n, float* scores /* [n] */,
                      int32_t* indices /* [n] */) {
  double ahead = 0.0;  // the mass of the entries before entry i
  for (int64_t i = 0; i < n && indices[i] >= 0; ++i) {
    if (ahead >= top_p) {
      std::fill(scores + i, scores + n, kNegInf);
      std::fill(indices + i, indices + n, -1);
      return;
    }
    const float m = std::exp(scores[i] - lse);
    if (!std::isnan(m)) ahead += m;
  }
}

// Buffers of one group's selection, kept per thread across calls (no allocation and page faults
// per call; about G * S * 4 bytes per thread).
struct Scratch {
  std::vector<float> qf;    // [G, kD] the group's queries in float32
  std::vector<float> s;     // [G, L] scores
  std::vector<float> mass;  // [L] c_j of group_select
  TopN top;                 // selection

  size_t bytes() const {
    return (qf.capacity() + s.capacity() + mass.capacity() + top.tile_max.capacity() +
            top.ranked.capacity()) * sizeof(float) + top.best.capacity() * sizeof(Cand);
  }
};

// The min(n, hi - lo) best of keys[lo, hi) into top.best, sorted best first, with their
// positions in keys.
template <class Isa>
void top_n_in(const float* keys, int64_t lo, int64_t hi, int64_t n, TopN& top) {
  top_n<Isa>(keys + lo, hi - lo, n, top);
  for (Cand& c : top.best) c.idx += static_cast<int32_t>(lo);
}

// One (batch, kv head): q [G, kD] (row stride q_stride), k [L, kD] (row stride k_stride) ->
// scores/indices [G, n] (the top n of keys skip_first <= j < L - skip_last; with top_p < 1 each
// head's mass prefix of them), lse [G] (over all j < L), and every score into all [G, all_stride]
// (-inf from L on) unless all is nullptr.
template <class Isa, typename scalar_t, int64_t kD>
void select_group(const scalar_t* q, int64_t q_stride, const scalar_t* k, int64_t k_stride,
                  int64_t G, int64_t L, int64_t n, float scale, bool group_select,
                  int64_t skip_first, int64_t skip_last, float top_p, Scratch& tmp, float* scores,
                  int32_t* indices, float* lse, float* all, int64_t all_stride) {
  scratch_resize(tmp.qf, G * kD, "qk_topn", "queries [G, D] float32");
  for (int64_t h = 0; h < G; ++h) {
    for (int64_t d = 0; d < kD; ++d) tmp.qf[h * kD + d] = to_float(q[h * q_stride + d]);
  }
  scratch_resize(tmp.s, G * L, "qk_topn", "scores [G, L] float32");
  group_scores<Isa, scalar_t, kD>(tmp.qf.data(), k, k_stride, G, L, scale, tmp.s.data(), lse);
  // head h's scores [L] by pointer: &tmp.s[h * L] would index an empty vector where L = 0
  const auto head_scores = [&](int64_t h) { return tmp.s.data() + h * L; };
  if (all != nullptr) {  // the rest of each row (past L, and the padding) -inf: no stale memory
    for (int64_t h = 0; h < G; ++h) {
      std::copy_n(head_scores(h), L, all + h * all_stride);
      std::fill(all + h * all_stride + L, all + (h + 1) * all_stride,
                -std::numeric_limits<float>::infinity());
    }
  }
  const int64_t lo = std::min(skip_first, L);                 // the ranked keys [lo, hi)
  const int64_t hi = std::max(lo, L - std::min(skip_last, L));
  if (group_select) {
    scratch_resize(tmp.mass, L, "qk_topn", "group mass [L] float32");
    std::fill(tmp.mass.begin(), tmp.mass.end(), 0.f);
    for (int64_t h = 0; h < G; ++h) Isa::add_exp(tmp.mass.data(), head_scores(h), L, lse[h]);
    top_n_in<Isa>(tmp.mass.data(), lo, hi, n, tmp.top);
  }
  for (int64_t h = 0; h < G; ++h) {
    if (!group_select) top_n_in<Isa>(head_scores(h), lo, hi, n, tmp.top);
    write_head(tmp.top.best, head_scores(h), n, scores + h * n, indices + h * n);
    if (top_p < 1.0f) keep_mass_prefix(lse[h], top_p, n, scores + h * n, indices + h * n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_topn_cpu(
    const at::Tensor& q,         // [B, Hq, D]
    const at::Tensor& k_cache,   // [B, Hkv, S, D]
    const at::Tensor& seq_lens,  // [B] int32
    int64_t n, double scale, bool group_select,
    bool /*check_values*/,  // seq_lens are on the host: always checked, no sync to save
    bool return_scores, int64_t skip_first, int64_t skip_last, double top_p) {
  const QkTopnDims dims =
      check_qk_topn_args(q, k_cache, seq_lens, n, scale, skip_first, skip_last, top_p);
  KC_CHECK_CPU("qk_topn", q);
  KC_CHECK_CPU("qk_topn", k_cache);
  KC_CHECK_CPU("qk_topn", seq_lens);
  check_seq_lens_values(seq_lens, dims.S);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({dims.B, dims.Hq, n}, f32);                   // [B, Hq, n]
  at::Tensor indices = at::empty({dims.B, dims.Hq, n}, f32.dtype(at::kInt));  // [B, Hq, n]
  at::Tensor lse = at::empty({dims.B, dims.Hq}, f32);                         // [B, Hq]
  // every score: [B, Hq, S] of [B, Hq, S rounded up to 4], the layout of the CUDA score scratch
  // that the CUDA op returns; or [0]
  const int64_t row = (dims.S + 3) / 4 * 4;
  at::Tensor all = return_scores ? at::empty({dims.B, dims.Hq, row}, f32).narrow(2, 0, dims.S)
                                 : at::empty({0}, f32);
  float* all_ptr = return_scores ? all.data_ptr<float>() : nullptr;
  const int64_t all_stride = return_scores ? all.stride(1) : 0;
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t G = dims.G;
  for_each_kv_group<Scratch>(q.scalar_type(), dims.D, dims.B, dims.Hkv,
                            [&]<class Isa, typename scalar_t, int64_t kD>(
                                int64_t b, int64_t kvh, Scratch& tmp) {
    const int64_t head0 = b * dims.Hq + kvh * G;  // first query head of the group
    select_group<Isa, scalar_t, kD>(
        q.data_ptr<scalar_t>() + b * q.stride(0) + kvh * G * q.stride(1), q.stride(1),
        k_cache.data_ptr<scalar_t>() + b * k_cache.stride(0) + kvh * k_cache.stride(1),
        k_cache.stride(2), G, lens[b * seq_lens.stride(0)], n, static_cast<float>(scale),
        group_select, skip_first, skip_last, static_cast<float>(top_p), tmp,
        scores.data_ptr<float>() + head0 * n,
        indices.data_ptr<int32_t>() + head0 * n, lse.data_ptr<float>() + head0,
        all_ptr == nullptr ? nullptr : all_ptr + head0 * all_stride, all_stride);
  });
  return {scores, indices, lse, all};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl("qk_topn", &qk_topn_cpu); }

}  // namespace kcache_ops::cpu
