// Checks of the values the ops read as positions (seq_lens, indices) against the capacity of the
// cache, on host-readable tensors. Device-independent: the CPU ops call them directly, the CUDA
// launchers on a host copy once a device-side range check has failed (cuda/launch_utils.h).
#pragma once

#include <cstdint>

#include <torch/types.h>

namespace kcache_ops {

// seq_lens [B] int32 (strided, on the host): every 0 <= L_b <= S, S the capacity of the tensor
// named src_name.
inline void check_seq_lens_values(const at::Tensor& seq_lens, int64_t S,
                                  const char* src_name = "k_cache") {
  const int32_t* p = seq_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < seq_lens.size(0); ++b) {
    const int32_t len = p[b * seq_lens.stride(0)];
    TORCH_CHECK(len >= 0 && len <= S, "seq_lens[", b, "] must be in [0, ", S,
                "] (", src_name, " capacity), got ", len);
  }
}

// indices [B, H, N] int32 (last dim contiguous, on the host): every -1 <= index < S, S the
// capacity of the tensor named src_name.
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

}  // namespace kcache_ops
