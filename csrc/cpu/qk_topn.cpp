// kcache_ops::qk_topn on the CPU: per (batch, kv head), the scores of all G query heads of the
// group reading each K row once, the max of each 64-key tile of them, a log-sum-exp, and a top-N
// selection that skips the tiles whose max is below its threshold. Where the groups do not spread
// over the threads (split_rows), their rows are scored in chunks of keys in parallel instead.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../host_memory.h"
#include "../named_op.h"
#include "../shape_checks.h"
#include "../value_checks.h"
#include "common.h"
#include "isa.h"
#include "top_n.h"

namespace kcache_ops::cpu {
namespace {

constexpr char kOp[] = "qk_topn";  // first in each error the op raises (named_op.h)

// The log-sum-exp state of some scores of a head: their max and the sum of exp(s - max), in
// double (float32 adds of one tile's sum after another drift: a relative 2e-5 at 3M keys).
struct LsePart {
  float max = kNegInf;
  double sum = 0.0;

  // Takes in scores whose max is `their_max`; sum_at(m) is their sum of exp(s - m). As
  // torch.logsumexp: a NaN score makes the max, and so the lse, NaN for good; an infinite max is
  // the lse (-inf while every score is -inf, +inf once one is).
  template <class SumAt>
  void absorb(float their_max, const SumAt& sum_at) {
    // std::max keeps a NaN running max (its first argument); a NaN max is taken here
    const float m = std::isnan(their_max) ? their_max : std::max(max, their_max);
    if (!std::isinf(m))  // exp(s - m) would be exp(inf - inf) for an infinite score
      sum = sum * std::exp(static_cast<double>(max) - m) + sum_at(m);
    max = m;
  }

  float lse() const { return std::isinf(max) ? max : static_cast<float>(max + std::log(sum)); }
};

// Where one group's intermediate values live: the scores of head h at s + h * s_stride [L], the
// max of each kTile-key tile of them at tile_max + h * tiles [tiles], and with group_select
// the mass [L] and the max of each of its tiles [tiles].
struct GroupRows {
  float* s;
  int64_t s_stride;
  float* tile_max;
  int64_t tiles;
  float* mass;
  float* mass_max;
};

// Keys [j0, j1) of one group, j0 a multiple of kTile and j1 too or the row's end: the G heads'
// scores scale * <q_h, k_j> and their tiles' maxima into r, and their lse states into part [G].
// qf [G, kD] float32; k row j at k + j * k_stride. Tiles of kTile keys: all head passes over a
// tile read its K rows from L1.
template <class Isa, typename scalar_t, int64_t kD>
void score_keys(const float* qf, const scalar_t* k, int64_t k_stride, int64_t G, float scale,
                int64_t j0, int64_t j1, const GroupRows& r, LsePart* part) {
  std::fill(part, part + G, LsePart{});
  for (int64_t j = j0; j < j1; j += kTile) {
    const int64_t rows = std::min(kTile, j1 - j);
    for (int64_t h = 0; h < G;) {
      h += score_heads<Isa, scalar_t, kD>(qf + h * kD, G - h, k + j * k_stride, k_stride, rows,
                                          scale, r.s + h * r.s_stride + j, r.s_stride);
    }
    for (int64_t h = 0; h < G; ++h) {
      const float* tile = r.s + h * r.s_stride + j;
      const float tile_max = Isa::max_of(tile, rows);
      r.tile_max[h * r.tiles + j / kTile] = tile_max;
      part[h].absorb(tile_max, [&](float m) { return Isa::sum_exp(tile, rows, m); });
    }
  }
}

// lse [G] of a group whose keys were scored in `chunks` chunks: parts [chunks, G], added in order.
void finish_lse(const LsePart* parts, int64_t chunks, int64_t G, float* lse) {
  for (int64_t h = 0; h < G; ++h) {
    LsePart all;
    for (int64_t c = 0; c < chunks; ++c) {
      const LsePart& p = parts[c * G + h];
      all.absorb(p.max, [&](float m) { return p.sum * std::exp(static_cast<double>(p.max) - m); });
    }
    lse[h] = all.lse();
  }
}

// group_select's mass of a group's L keys: c_j = sum_h exp(s_hj - lse_h), a NaN term counting 0,
// into r.mass, and the max of each of its tiles into r.mass_max.
template <class Isa>
void group_mass(const GroupRows& r, const float* lse, int64_t G, int64_t L) {
  std::fill(r.mass, r.mass + L, 0.f);
  for (int64_t h = 0; h < G; ++h) Isa::add_exp(r.mass, r.s + h * r.s_stride, L, lse[h]);
  for (int64_t j = 0; j < L; j += kTile)
    r.mass_max[j / kTile] = Isa::max_of(r.mass + j, std::min(kTile, L - j));
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

// The arguments of a call that every group reads.
struct Options {
  int64_t G, n, skip_first, skip_last;
  float scale, top_p;
  bool group_select;
};

// One (batch, kv head) group: its queries q [G, kD] (row stride q_stride), keys k [L, kD] (row
// stride k_stride), and outputs scores/indices [G, n] and lse [G]; all [G, all_stride] every
// score (-inf from L on) unless nullptr.
template <typename scalar_t>
struct Group {
  const scalar_t* q;
  int64_t q_stride;
  const scalar_t* k;
  int64_t k_stride, L;
  float* scores;
  int32_t* indices;
  float* lse;
  float* all;
  int64_t all_stride;
};

// The group's queries in float32 into qf [G, kD].
template <typename scalar_t, int64_t kD>
void queries_to_float(const Group<scalar_t>& g, int64_t G, float* qf) {
  for (int64_t h = 0; h < G; ++h) {
    for (int64_t d = 0; d < kD; ++d) qf[h * kD + d] = to_float(g.q[h * g.q_stride + d]);
  }
}

// A group's outputs from its scores and lse: the top n of keys skip_first <= j < L -
// skip_last (with top_p < 1 each head's mass prefix of them); with return_scores, the scores past
// L -inf.
template <class Isa, typename scalar_t>
void select_heads(const Group<scalar_t>& g, const GroupRows& r, const Options& o, TopN& top) {
  const int64_t lo = std::min(o.skip_first, g.L);  // the ranked keys [lo, hi)
  const int64_t hi = std::max(lo, g.L - std::min(o.skip_last, g.L));
  if (o.group_select) top_n<Isa>(r.mass, r.mass_max, lo, hi, o.n, top);
  for (int64_t h = 0; h < o.G; ++h) {
    const float* s_head = r.s + h * r.s_stride;  // [L]
    if (!o.group_select) top_n<Isa>(s_head, r.tile_max + h * r.tiles, lo, hi, o.n, top);
    write_head(top.best, s_head, o.n, g.scores + h * o.n, g.indices + h * o.n);
    if (o.top_p < 1.0f)
      keep_mass_prefix(g.lse[h], o.top_p, o.n, g.scores + h * o.n, g.indices + h * o.n);
    if (g.all != nullptr)  // the rest of the row (past L, and the padding): no stale memory
      std::fill(g.all + h * g.all_stride + g.L, g.all + (h + 1) * g.all_stride, kNegInf);
  }
}

// The queries, scores, maxima, mass and lse parts of `groups` groups (one, on a thread, or every
// group of a split call, on the calling thread), kept across calls: about G * L * 4 bytes a group
// of L keys, one after the other.
struct Buffers {
  std::vector<float> qf;        // [groups, G, kD] the queries in float32
  // each group's in turn, at key0 / tile0: scores [G, L] (unless written into the output
  // `all`), tile maxima [G, tiles], and with group_select mass [L] and its maxima [tiles]
  std::vector<float> s;
  std::vector<float> tile_max;
  std::vector<float> mass;
  std::vector<float> mass_max;
  std::vector<LsePart> parts;   // [chunks, G] the chunks of every group, in order
  std::vector<int64_t> key0;    // [groups + 1] where group i's keys start: the sum of the L before
  std::vector<int64_t> tile0;   // [groups + 1] where its tiles start
  TopN top;                     // the selection of one group at a time

  // Sizes them for groups of lens(i) keys scored in `chunks` chunks in all; own_scores: s is
  // needed (return_scores off).
  template <class Lens>
  void resize(int64_t groups, const Lens& lens, int64_t G, int64_t kD, int64_t chunks,
              const Options& o, bool own_scores) {
    key0.assign(1, 0);
    tile0.assign(1, 0);
    for (int64_t i = 0; i < groups; ++i) {
      key0.push_back(key0.back() + lens(i));
      tile0.push_back(tile0.back() + tiles_of(lens(i)));
    }
    const int64_t keys = key0.back(), tiles = tile0.back();
    scratch_resize(qf, groups * G * kD, "queries [G, D] float32");
    if (own_scores) {
      scratch_resize(s, G * keys,
                     groups == 1 ? "scores [G, L] float32" : "scores [G, sum of L] float32");
    }
    scratch_resize(tile_max, G * tiles, "tile maxima [G, L / 64] float32");
    if (o.group_select) {
      scratch_resize(mass, keys, "group mass [L] float32");
      scratch_resize(mass_max, tiles, "group mass maxima [L / 64] float32");
    }
    scratch_resize(parts, chunks * G, "lse parts [chunks, G]");
  }

  // Group i's rows: its scores in the output `all` where that is given, else in s; no mass
  // (nullptr) without group_select.
  template <typename scalar_t>
  GroupRows rows(int64_t i, const Group<scalar_t>& g, int64_t G, const Options& o) {
    return GroupRows{g.all != nullptr ? g.all : s.data() + G * key0[i],
                     g.all != nullptr ? g.all_stride : g.L,
                     tile_max.data() + G * tile0[i],
                     tiles_of(g.L),
                     o.group_select ? mass.data() + key0[i] : nullptr,
                     o.group_select ? mass_max.data() + tile0[i] : nullptr};
  }

  size_t bytes() const {
    return (qf.capacity() + s.capacity() + tile_max.capacity() + mass.capacity() +
            mass_max.capacity()) * sizeof(float) + parts.capacity() * sizeof(LsePart) +
           (key0.capacity() + tile0.capacity()) * sizeof(int64_t) + top.bytes();
  }
};

// A group's outputs once its keys are scored (parts [chunks, G] their lse parts): lse, with
// group_select the mass, and the selection.
template <class Isa, typename scalar_t>
void finish_group(const Group<scalar_t>& g, const GroupRows& r, const LsePart* parts,
                  int64_t chunks, const Options& o, TopN& top) {
  finish_lse(parts, chunks, o.G, g.lse);
  if (o.group_select) group_mass<Isa>(r, g.lse, o.G, g.L);
  select_heads<Isa>(g, r, o, top);
}

// One group on one thread, chunk by chunk: the same chunks as select_split, so the same bits.
template <class Isa, typename scalar_t, int64_t kD>
void select_group(const Group<scalar_t>& g, const Options& o, Buffers& tmp) {
  const int64_t chunks = chunks_of(g.L), G = o.G;
  tmp.resize(1, [&](int64_t) { return g.L; }, G, kD, chunks, o, g.all == nullptr);
  const GroupRows r = tmp.rows(0, g, G, o);
  queries_to_float<scalar_t, kD>(g, G, tmp.qf.data());
  for (int64_t c = 0; c < chunks; ++c) {
    score_keys<Isa, scalar_t, kD>(tmp.qf.data(), g.k, g.k_stride, G, o.scale, c * kChunkKeys,
                                  std::min(g.L, (c + 1) * kChunkKeys), r,
                                  tmp.parts.data() + c * G);
  }
  finish_group<Isa>(g, r, tmp.parts.data(), chunks, o, tmp.top);
}

// The buffers of a call whose rows are split (select_split), kept by the calling thread across
// calls while they hold at most kScratchKeepBytes per thread of the loop.
struct SplitScratch {
  RowChunks chunks;  // every group's chunks
  Buffers buf;       // every group's rows

  size_t bytes() const { return chunks.bytes() + buf.bytes(); }
};

// The groups with their rows split into chunks of kChunkKeys keys: every chunk's scores in one
// parallel loop, then each group's lse, mass and selection in another (the selection reads the
// tile maxima, under 2n tiles every key once for its blocks' maxima, and a tile's keys only where
// its max passes the threshold). The same chunks, and lse parts added in the same order, as
// select_group: the same bits.
template <class Isa, typename scalar_t, int64_t kD>
void select_split(const std::vector<Group<scalar_t>>& groups, const Options& o) {
  // the calling thread's: the loop's threads see it through this name
  SplitScratch& sp = thread_scratch<SplitScratch>();
  const KeepAtMost<SplitScratch> keep(sp, kScratchKeepBytes * at::get_num_threads());
  const int64_t count = static_cast<int64_t>(groups.size()), G = o.G;
  const auto len = [&](int64_t i) { return groups[i].L; };
  sp.chunks.split(count, len);
  sp.buf.resize(count, len, G, kD, sp.chunks.count(), o, groups[0].all == nullptr);
  for (int64_t i = 0; i < count; ++i)
    queries_to_float<scalar_t, kD>(groups[i], G, sp.buf.qf.data() + i * G * kD);
  parallel_for(0, sp.chunks.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const RowChunks::Chunk& ch = sp.chunks.chunks[c];
      const Group<scalar_t>& g = groups[ch.group];
      score_keys<Isa, scalar_t, kD>(sp.buf.qf.data() + ch.group * G * kD, g.k, g.k_stride, G,
                                    o.scale, ch.j0, ch.j1, sp.buf.rows(ch.group, g, G, o),
                                    sp.buf.parts.data() + c * G);
    }
  });
  parallel_tasks<Buffers>(count, [&](int64_t i, Buffers& tmp) {
    const int64_t c0 = sp.chunks.first[i];
    finish_group<Isa>(groups[i], sp.buf.rows(i, groups[i], G, o), sp.buf.parts.data() + c0 * G,
                      sp.chunks.first[i + 1] - c0, o, tmp.top);
  });
}

// The instruction set that scores bfloat16 queries q [B, Hq, D] as float32 would. The AVX-512
// loop's vdpbf16ps reads a subnormal bfloat16 input (below 2^-126) and a subnormal partial sum as
// zero whatever MXCSR says. A key's subnormal values then drop products below |q| * 2^-126 each,
// the partial sums less than 2^-126 each: in all under 2^-58 a score while |scale| * D *
// max(|q|, 1) < 2^66, nothing a weight exp(s - lse), or an order of scores further apart, could
// show. A subnormal query value's products with K are not bounded so (K is not read here): those
// calls take the AVX2 loop (float32 FMAs), as do a larger q or scale. What it does not cover: a
// product past float32's range (|q_d * k_d| >= 2^128, keys near float32's limit) may give another
// non-finite score there than the reference's (an inf for a NaN), see ops.qk_topn.
IsaLevel bf16_query_isa(const at::Tensor& q, double scale) {
  if (isa_level() != IsaLevel::kAvx512) return isa_level();
  const float bound = std::ldexp(1.f, 66) / (std::abs(static_cast<float>(scale)) * q.size(2));
  bool exact = 1.f < bound;
  for (int64_t b = 0; b < q.size(0); ++b) {
    for (int64_t h = 0; h < q.size(1); ++h) {
      const c10::BFloat16* row = q.data_ptr<c10::BFloat16>() + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < q.size(2); ++d) {
        const float x = std::abs(static_cast<float>(row[d]));
        exact &= x < bound && (x == 0.f || x >= std::numeric_limits<float>::min());
      }
    }
  }
  return exact ? IsaLevel::kAvx512 : IsaLevel::kAvx2;
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
  KC_CHECK_CPU(q);
  KC_CHECK_CPU(k_cache);
  KC_CHECK_CPU(seq_lens);
  check_seq_lens_values(seq_lens, dims.S);
  // every score: [B, Hq, S] of [B, Hq, S rounded up to 4], the layout of the CUDA score scratch
  // that the CUDA op returns; or [0]
  const int64_t row = (dims.S + 3) / 4 * 4;
  // n past S pads with -1: a large n ("keep every key") would be killed writing its padding
  check_host_output(bytes_of({dims.B, dims.Hq, n * 8 + (return_scores ? row * 4 : 0)}, 1), [&] {
    return c10::str("n = ", n, " (scores and indices [", dims.B, ", ", dims.Hq, ", n]",
                    return_scores ? ", all_scores [B, Hq, S]" : "", ")");
  });
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({dims.B, dims.Hq, n}, f32);                   // [B, Hq, n]
  at::Tensor indices = at::empty({dims.B, dims.Hq, n}, f32.dtype(at::kInt));  // [B, Hq, n]
  at::Tensor lse = at::empty({dims.B, dims.Hq}, f32);                         // [B, Hq]
  at::Tensor all = return_scores ? at::empty({dims.B, dims.Hq, row}, f32).narrow(2, 0, dims.S)
                                 : at::empty({0}, f32);
  // nullptr also where S = 0 (no score to write)
  float* all_ptr = return_scores && dims.S > 0 ? all.data_ptr<float>() : nullptr;
  const Options o{dims.G, n, skip_first, skip_last, static_cast<float>(scale),
                  static_cast<float>(top_p), group_select};
  const int64_t groups = dims.B * dims.Hkv;
  const IsaLevel isa =
      q.scalar_type() == at::kBFloat16 ? bf16_query_isa(q, scale) : IsaLevel::kAvx512;
  dispatch_isa(q.scalar_type(), dims.D, [&]<class Isa, typename scalar_t, int64_t kD>() {
    const auto group = [&](int64_t bg) {  // group bg = b * Hkv + kvh
      const int64_t b = bg / dims.Hkv, kvh = bg % dims.Hkv;
      const int64_t head0 = b * dims.Hq + kvh * dims.G;  // first query head of the group
      return Group<scalar_t>{
          q.data_ptr<scalar_t>() + b * q.stride(0) + kvh * dims.G * q.stride(1), q.stride(1),
          data_from<scalar_t>(k_cache, b * k_cache.stride(0) + kvh * k_cache.stride(1)),
          k_cache.stride(2), seq_lens.data_ptr<int32_t>()[b * seq_lens.stride(0)],
          scores.data_ptr<float>() + head0 * n, indices.data_ptr<int32_t>() + head0 * n,
          lse.data_ptr<float>() + head0,
          all_ptr == nullptr ? nullptr : all_ptr + head0 * all.stride(1),
          all_ptr == nullptr ? 0 : all.stride(1)};
    };
    if (split_rows(groups)) {
      std::vector<Group<scalar_t>> all_groups;  // [B * Hkv]
      for (int64_t bg = 0; bg < groups; ++bg) all_groups.push_back(group(bg));
      select_split<Isa, scalar_t, kD>(all_groups, o);
      return;
    }
    parallel_tasks<Buffers>(groups, [&](int64_t bg, Buffers& tmp) {
      select_group<Isa, scalar_t, kD>(group(bg), o, tmp);
    });
  }, isa);
  return {scores, indices, lse, all};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl(kOp, &NamedOp<kOp, &qk_topn_cpu>::call); }

}  // namespace kcache_ops::cpu
