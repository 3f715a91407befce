// Run-time choice of the inner loops: Avx512Isa where the CPU has AVX-512 F/BW/BF16, Avx2Isa where
// it has AVX2, FMA and F16C, GenericIsa otherwise. KCACHE_OPS_CPU_ISA=avx2 or =generic caps the
// choice (the tests use it to cover every level on one machine; =avx512 is the default, another
// value an error). score_heads, qk_topn's head-count dispatch of Isa::score_rows;
// dispatch_isa and parallel_tasks, the dispatch and the parallel loop of the CPU ops; split_rows,
// chunks_of and RowChunks, where qk_topn's and lowbit_tail's loops run over chunks of the
// (sequence, KV head) groups' rows instead of over the groups.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common.h"
#include "isa_generic.h"
#if defined(__x86_64__)
#include "isa_avx2.h"
#include "isa_avx512.h"
#endif

namespace kcache_ops::cpu {

enum class IsaLevel { kGeneric, kAvx2, kAvx512 };

inline IsaLevel isa_level() {
#if defined(__x86_64__)
  static const IsaLevel level = [] {
    const char* cap = std::getenv("KCACHE_OPS_CPU_ISA");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
    const bool capped = cap != nullptr && *cap != '\0';
    TORCH_CHECK(!capped || std::strcmp(cap, "generic") == 0 || std::strcmp(cap, "avx2") == 0 ||
                    std::strcmp(cap, "avx512") == 0,
                "KCACHE_OPS_CPU_ISA must be generic, avx2 or avx512, got \"", cap, "\"");
    if (capped && std::strcmp(cap, "generic") == 0) return IsaLevel::kGeneric;
    if (avx512 && (!capped || std::strcmp(cap, "avx2") != 0)) return IsaLevel::kAvx512;
    return avx2 ? IsaLevel::kAvx2 : IsaLevel::kGeneric;
  }();
  return level;
#else
  return IsaLevel::kGeneric;
#endif
}

// Calls body() with `Isa` bound to Avx512Isa, Avx2Isa or GenericIsa: the level isa_level() picks
// (KC_ISA_SWITCH), or that level capped at `cap` (KC_ISA_SWITCH_UPTO).
#define KC_ISA_SWITCH(...) KC_ISA_SWITCH_UPTO(IsaLevel::kAvx512, __VA_ARGS__)
#if defined(__x86_64__)
#define KC_ISA_SWITCH_UPTO(cap, ...)             \
  [&] {                                          \
    switch (std::min(isa_level(), (cap))) {      \
      case IsaLevel::kAvx512: {                  \
        using Isa = Avx512Isa;                   \
        return __VA_ARGS__();                    \
      }                                          \
      case IsaLevel::kAvx2: {                    \
        using Isa = Avx2Isa;                     \
        return __VA_ARGS__();                    \
      }                                          \
      default: {                                 \
        using Isa = GenericIsa;                  \
        return __VA_ARGS__();                    \
      }                                          \
    }                                            \
  }()
#else
#define KC_ISA_SWITCH_UPTO(cap, ...) \
  [&] {                              \
    using Isa = GenericIsa;          \
    return __VA_ARGS__();            \
  }()
#endif

// Scores `rows` keys for the first 8, 4, 2 or 1 of the `heads` left (as many as fit); returns how
// many. q [heads, kD] float32; s[h * s_stride + j] as Isa::score_rows.
template <class Isa, typename scalar_t, int64_t kD>
int64_t score_heads(const float* q, int64_t heads, const scalar_t* k, int64_t k_stride,
                    int64_t rows, float scale, float* s, int64_t s_stride) {
  if (heads >= 8) {
    Isa::template score_rows<scalar_t, kD, 8>(q, k, k_stride, rows, scale, s, s_stride);
    return 8;
  }
  if (heads >= 4) {
    Isa::template score_rows<scalar_t, kD, 4>(q, k, k_stride, rows, scale, s, s_stride);
    return 4;
  }
  if (heads >= 2) {
    Isa::template score_rows<scalar_t, kD, 2>(q, k, k_stride, rows, scale, s, s_stride);
    return 2;
  }
  Isa::template score_rows<scalar_t, kD, 1>(q, k, k_stride, rows, scale, s, s_stride);
  return 1;
}

// A thread keeps its Scratch from one call to the next while it holds at most this many bytes;
// a larger one is freed at the end of the call (a long context's G · L scores would otherwise
// stay held by every thread that ever ran one, for the life of the process). The buffers of a
// call whose rows are split, held by its calling thread, are kept up to this many per thread.
constexpr size_t kScratchKeepBytes = size_t{16} << 20;

// Calls body.template operator()<Isa, scalar_t, kD>() with scalar_t bound to `dtype` (float, Half
// or BFloat16) and kD to `head_dim` (64 or 128), both checked by the op's argument checks
// (shape_checks.h), and Isa as KC_ISA_SWITCH picks it, at most `cap`.
template <class Body>
void dispatch_isa(at::ScalarType dtype, int64_t head_dim, const Body& body,
                  IsaLevel cap = IsaLevel::kAvx512) {
  KC_DISPATCH_FLOAT_HALF_BF16(dtype, "dispatch_isa", [&] {
    KC_HEAD_DIM_SWITCH(head_dim, [&] {
      KC_ISA_SWITCH_UPTO(cap, [&] { body.template operator()<Isa, scalar_t, kD>(); });
    });
  });
}

// This thread's Scratch of a kind: one per thread and Scratch type, whichever loop asks for it.
template <class Scratch>
Scratch& thread_scratch() {
  static thread_local Scratch tmp;
  return tmp;
}

// Frees a thread's kept Scratch (its bytes() what it holds) on leaving the scope where it holds
// more than `keep` bytes, also when an error leaves it (a call refused part way kept what it had
// built for the thread's next call).
template <class Scratch>
class KeepAtMost {
 public:
  KeepAtMost(Scratch& tmp, size_t keep) : tmp_(tmp), keep_(keep) {}
  ~KeepAtMost() {
    if (tmp_.bytes() > keep_) tmp_ = Scratch{};
  }
  KeepAtMost(const KeepAtMost&) = delete;
  KeepAtMost& operator=(const KeepAtMost&) = delete;

 private:
  Scratch& tmp_;
  size_t keep_;
};

// Calls task(i, tmp) for every i < count, in parallel (parallel_for, common.h); tmp is the
// thread's Scratch, kept from one call to the next up to kScratchKeepBytes.
template <class Scratch, class Task>
void parallel_tasks(int64_t count, const Task& task) {
  parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    Scratch& tmp = thread_scratch<Scratch>();
    const KeepAtMost<Scratch> keep(tmp, kScratchKeepBytes);
    for (int64_t i = begin; i < end; ++i) task(i, tmp);
  });
}

// Whether the `groups` (sequence, KV head) groups of a call run with their rows split into chunks
// of keys: where they do not spread evenly over the threads (fewer than 4 a thread and not a
// multiple of the thread count), a whole row a task would keep some threads idle while others
// finish theirs (one sequence with 3 KV heads on 2 threads: the third row alone, or 16 threads
// with 13 of them idle).
inline bool split_rows(int64_t groups) {
  if (at::in_parallel_region()) return false;  // a nested parallel_for runs on one thread
  const int64_t threads = at::get_num_threads();
  return groups % threads != 0 && groups < 4 * threads;
}

// Keys per chunk of a split row. qk_topn and lowbit_tail add their chunks' parts in order whether
// or not the row is split: the same bits either way.
constexpr int64_t kChunkKeys = 4096;

// The chunks of kChunkKeys keys of a row of L keys: chunk c is keys [c * kChunkKeys, min(L,
// (c + 1) * kChunkKeys)); a row of 0 keys is one empty chunk.
inline int64_t chunks_of(int64_t L) {
  return std::max<int64_t>(1, (L + kChunkKeys - 1) / kChunkKeys);
}

// The rows of a split call, each in its chunks_of: chunk c is keys [j0, j1) of group `group`;
// first[g] is group g's first chunk (first[groups] the count).
struct RowChunks {
  struct Chunk {
    int64_t group, j0, j1;
  };
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;  // [groups + 1]

  // lens [groups] the groups' row lengths
  template <class Lens>
  void split(int64_t groups, const Lens& lens) {
    chunks.clear();
    first.clear();
    for (int64_t g = 0; g < groups; ++g) {
      first.push_back(static_cast<int64_t>(chunks.size()));
      const int64_t L = lens(g);
      for (int64_t c = 0; c < chunks_of(L); ++c)
        chunks.push_back({g, c * kChunkKeys, std::min(L, (c + 1) * kChunkKeys)});
    }
    first.push_back(static_cast<int64_t>(chunks.size()));
  }

  int64_t count() const { return static_cast<int64_t>(chunks.size()); }
  size_t bytes() const {
    return chunks.capacity() * sizeof(Chunk) + first.capacity() * sizeof(int64_t);
  }
};

}  // namespace kcache_ops::cpu
