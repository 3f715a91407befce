// Helpers shared by the CPU implementations: device and value checks (they read tensor data on the
// host), float conversion of the storage dtypes, and the dtype / head-dim dispatch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../checks.h"

namespace kcache_ops::cpu {

#define KC_CHECK_CPU(op, x) \
  TORCH_CHECK((x).device().is_cpu(), op ": " #x " must be on cpu, got ", (x).device())

// seq_lens [B] int32 (strided): every 0 <= L_b <= S.
inline void check_seq_lens_values(const at::Tensor& seq_lens, int64_t S) {
  const int32_t* p = seq_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < seq_lens.size(0); ++b) {
    const int32_t len = p[b * seq_lens.stride(0)];
    TORCH_CHECK(len >= 0 && len <= S, "seq_lens[", b, "] must be in [0, ", S,
                "] (k_cache capacity), got ", len);
  }
}

// indices [B, H, N] int32 (last dim contiguous): every -1 <= index < S.
inline void check_index_values(const at::Tensor& indices, int64_t S, const char* src_name) {
  const int32_t* p = indices.data_ptr<int32_t>();
  for (int64_t b = 0; b < indices.size(0); ++b) {
    for (int64_t h = 0; h < indices.size(1); ++h) {
      const int32_t* row = p + b * indices.stride(0) + h * indices.stride(1);
      for (int64_t i = 0; i < indices.size(2); ++i) {
        TORCH_CHECK(row[i] >= -1 && row[i] < S, "indices[", b, ", ", h, ", ", i,
                    "] must be -1 (padding) or in [0, ", S, ") (", src_name,
                    " capacity), got ", row[i]);
      }
    }
  }
}

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Binds scalar_t to float, c10::Half or c10::BFloat16 (the storage dtypes of q/k/v).
#define KC_DISPATCH_FLOAT_HALF_BF16(type, name, ...)     \
  AT_DISPATCH_SWITCH(type, name,                         \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Calls body() with `constexpr int64_t kD` bound to the head dim (64 or 128, checked before).
#define KC_HEAD_DIM_SWITCH(d, ...)             \
  [&] {                                        \
    if ((d) == 64) {                           \
      constexpr int64_t kD = 64;               \
      return __VA_ARGS__();                    \
    }                                          \
    constexpr int64_t kD = 128;                \
    return __VA_ARGS__();                      \
  }()

}  // namespace kcache_ops::cpu
