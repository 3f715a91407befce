// Run-time choice of the inner loops: Avx2Isa where the CPU has AVX2, FMA and F16C, GenericIsa
// otherwise. KCACHE_OPS_CPU_ISA=generic forces the portable loops (the tests use it to cover them).
#pragma once

#include <cstdlib>
#include <cstring>

#include "isa_generic.h"
#if defined(__x86_64__)
#include "isa_avx2.h"
#endif

namespace kcache_ops::cpu {

inline bool use_avx2() {
#if defined(__x86_64__)
  static const bool yes = [] {
    const char* forced = std::getenv("KCACHE_OPS_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return yes;
#else
  return false;
#endif
}

// Calls body() with `Isa` bound to Avx2Isa or GenericIsa.
#if defined(__x86_64__)
#define KC_ISA_SWITCH(...)      \
  [&] {                         \
    if (use_avx2()) {           \
      using Isa = Avx2Isa;      \
      return __VA_ARGS__();     \
    }                           \
    using Isa = GenericIsa;     \
    return __VA_ARGS__();       \
  }()
#else
#define KC_ISA_SWITCH(...)      \
  [&] {                         \
    using Isa = GenericIsa;     \
    return __VA_ARGS__();       \
  }()
#endif

}  // namespace kcache_ops::cpu
