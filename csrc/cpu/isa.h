// Run-time choice of the inner loops: Avx512Isa where the CPU has AVX-512 F/BW/BF16, Avx2Isa where
// it has AVX2, FMA and F16C, GenericIsa otherwise. KCACHE_OPS_CPU_ISA=avx2 or =generic caps the
// choice (the tests use it to cover every level on one machine; =avx512 is the default, another
// value an error). score_heads, qk_topn's head-count dispatch of Isa::score_rows;
// for_each_kv_group, the dispatch and parallel loop over the (sequence, KV head) groups that
// qk_topn and lowbit_tail share.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// Calls body() with `Isa` bound to Avx512Isa, Avx2Isa or GenericIsa.
#if defined(__x86_64__)
#define KC_ISA_SWITCH(...)                       \
  [&] {                                          \
    switch (isa_level()) {                       \
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
#define KC_ISA_SWITCH(...)  \
  [&] {                     \
    using Isa = GenericIsa; \
    return __VA_ARGS__();   \
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
// stay held by every thread that ever ran one, for the life of the process).
constexpr size_t kScratchKeepBytes = size_t{16} << 20;

// Calls group.template operator()<Isa, scalar_t, kD>(b, kvh, tmp) for every sequence b < B and KV
// head kvh < Hkv, in parallel (at::parallel_for over the B · Hkv groups), with scalar_t bound to
// `dtype` (float, Half or BFloat16) and kD to `head_dim` (64 or 128), both checked before
// (check_qk_topn_args), and Isa as KC_ISA_SWITCH picks it; tmp is this thread's Scratch (its
// bytes() what it holds), kept from one call to the next up to kScratchKeepBytes.
template <class Scratch, class Group>
void for_each_kv_group(at::ScalarType dtype, int64_t head_dim, int64_t B, int64_t Hkv,
                       const Group& group) {
  KC_DISPATCH_FLOAT_HALF_BF16(dtype, "for_each_kv_group", [&] {
    KC_HEAD_DIM_SWITCH(head_dim, [&] {
      KC_ISA_SWITCH([&] {
        at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
          static thread_local Scratch tmp;
          for (int64_t bg = begin; bg < end; ++bg)
            group.template operator()<Isa, scalar_t, kD>(bg / Hkv, bg % Hkv, tmp);
          if (tmp.bytes() > kScratchKeepBytes) tmp = Scratch{};
        });
      });
    });
  });
}

}  // namespace kcache_ops::cpu
