// The CPU qk_topn's selection: the n best of a range of keys (descending, ties to the lower
// position, NaN first as torch.sort ranks it), skipping every 64-key tile whose max is below the
// running threshold. The tiles' maxima come from the caller, which keeps them as it scores.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "common.h"

namespace kcache_ops::cpu {

constexpr int64_t kTile = 64;  // keys per tile: 64 K rows (<= 32 KiB) stay in L1 across head passes

// The kTile-key tiles of a row of L keys.
inline int64_t tiles_of(int64_t L) { return (L + kTile - 1) / kTile; }

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
inline float keep_best(std::vector<Cand>& buf, int64_t n) {
  std::nth_element(buf.begin(), buf.begin() + (n - 1), buf.end(), Better());
  buf.resize(n);
  return buf[n - 1].key;
}

// Buffers of a selection, reused across calls.
struct TopN {
  std::vector<Cand> best;       // [<= 2n] candidates; after top_n(), the best min(n, len) sorted
  std::vector<float> tile_max;  // [tiles] max of the ranked keys of each tile the range touches
  std::vector<float> ranked;    // [tiles or blocks] the maxima the threshold starts from
                                // (threshold_block), reordered by nth_element

  size_t bytes() const {
    return best.capacity() * sizeof(Cand) +
           (tile_max.capacity() + ranked.capacity()) * sizeof(float);
  }
};

// top_n of a range that holds a NaN key (bad input): every key ranked by BetterNanFirst.
inline void top_n_with_nan(const float* keys, int64_t lo, int64_t hi, int64_t n, TopN& top) {
  top.best.clear();
  for (int64_t j = lo; j < hi; ++j) top.best.push_back({keys[j], static_cast<int32_t>(j)});
  const int64_t m = std::min(n, hi - lo);
  std::partial_sort(top.best.begin(), top.best.begin() + m, top.best.end(), BetterNanFirst());
  top.best.resize(m);
}

// Keys per block of the maxima that start top_n's threshold, for a range of m keys over `tiles`
// tiles: kTile (the tiles', known already) where there are 2n tiles or more, else the largest of
// 32, 16 and 8 that gives 2n blocks, else 8 where that gives n; 0 (no threshold) under n blocks
// of 8. Where 2n blocks each hold a key above the threshold, few others do: about 1.4 n normal
// scores, under the 2n that make top_n keep its best n.
inline int64_t threshold_block(int64_t m, int64_t tiles, int64_t n) {
  if (tiles >= 2 * n) return kTile;
  for (int64_t b = kTile / 2; b >= 8; b /= 2) {
    if ((m + b - 1) / b >= 2 * n) return b;
  }
  return (m + 7) / 8 >= n ? 8 : 0;
}

// The min(n, hi - lo) best of keys[lo, hi) into top.best, sorted best first, with their positions
// in keys. row_max[t] is the max of the row's keys [t * kTile, (t + 1) * kTile) (up to its end).
// Keys above a threshold gather in top.best; whenever it holds 2n, the best n stay and the
// threshold rises to the worst of them (positions come in ascending order, so a later key equal
// to the threshold ranks below it). The threshold starts just under the n-th largest max of the
// ranked keys of a block (threshold_block; the tiles or smaller): n distinct keys reach it, so
// nothing below it is among the n best, and tiles whose max stays below the threshold are skipped
// whole. With no threshold (-inf) the first n keys are candidates whatever they are (-inf keys
// may be among the n best). A range with a NaN key goes to top_n_with_nan.
template <class Isa>
void top_n(const float* keys, const float* row_max, int64_t lo, int64_t hi, int64_t n,
           TopN& top) {
  top.best.clear();
  if (lo >= hi) return;
  const int64_t t0 = lo / kTile, tiles = (hi - 1) / kTile + 1 - t0;  // tiles [t0, t0 + tiles)
  top.tile_max.resize(tiles);
  bool has_nan = false;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t a = (t0 + t) * kTile, j0 = std::max(lo, a), j1 = std::min(hi, a + kTile);
    // a tile the range cuts (its first or last) has the max of its ranked keys only
    top.tile_max[t] =
        j0 == a && j1 == a + kTile ? row_max[t0 + t] : Isa::max_of(keys + j0, j1 - j0);
    has_nan = has_nan || std::isnan(top.tile_max[t]);
  }
  if (has_nan) return top_n_with_nan(keys, lo, hi, n, top);
  float thr = kNegInf;  // keys <= thr at later positions are not among the n best
  const int64_t block = threshold_block(hi - lo, tiles, n);
  if (block == kTile) {
    top.ranked = top.tile_max;
  } else if (block > 0) {  // [ceil((hi - lo) / block)] the blocks' maxima, none NaN
    top.ranked.clear();
    for (int64_t j = lo; j < hi; j += block)
      top.ranked.push_back(Isa::max_of(keys + j, std::min(block, hi - j)));
  }
  if (block > 0) {
    std::nth_element(top.ranked.begin(), top.ranked.begin() + (n - 1), top.ranked.end(),
                     std::greater<float>());
    thr = std::nextafter(top.ranked[n - 1], kNegInf);
    // never a subnormal: with denormals flushed (torch.set_flush_denormal) one just under a max
    // of 0 reads as 0, and a key equal to that max would fail `key > thr` (a comparison, not
    // fpclassify, which under that mode takes a subnormal for 0 too)
    constexpr float kNormal = std::numeric_limits<float>::min();
    if (std::fabs(thr) < kNormal) thr = -kNormal;
  }
  const int64_t first = thr == kNegInf ? lo + std::min(hi - lo, n) : lo;  // [lo, first): all in
  for (int64_t j = lo; j < first; ++j) top.best.push_back({keys[j], static_cast<int32_t>(j)});
  for (int64_t t = first / kTile; t < t0 + tiles; ++t) {
    if (!(top.tile_max[t - t0] > thr)) continue;
    const int64_t end = std::min(hi, (t + 1) * kTile);
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

}  // namespace kcache_ops::cpu
