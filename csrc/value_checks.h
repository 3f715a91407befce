// Checks of the values the ops read as positions (seq_lens, indices) against the capacity of the
// cache, on host-readable tensors. Device-independent: the CPU ops call them directly, the CUDA
// launchers on a host copy once a device-side range check has failed (cuda/launch_utils.h).
#pragma once

#include <cstdint>
#include <vector>

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

// Positions, int32 of any shape, on the host (indices [B, H, N]; lowbit_tail's hot_pos [B, H]):
// every -1 (what `minus_one` says it means) <= value < S, S the capacity of the tensor named
// src_name; the first one outside is named by its index in the error.
inline void check_index_values(const at::Tensor& indices, int64_t S, const char* src_name,
                               const char* name = "indices", const char* minus_one = "padding") {
  const at::Tensor flat = indices.contiguous();
  const int32_t* p = flat.data_ptr<int32_t>();
  for (int64_t k = 0; k < flat.numel(); ++k) {
    if (p[k] >= -1 && p[k] < S) continue;
    std::vector<int64_t> where(flat.dim());  // k's index in each dim
    for (int64_t d = flat.dim() - 1, rest = k; d >= 0; rest /= flat.size(d), --d)
      where[d] = rest % flat.size(d);
    TORCH_CHECK(false, name, c10::IntArrayRef(where), " must be -1 (", minus_one, ") or in [0, ",
                S, ") (", src_name, " capacity), got ", p[k]);
  }
}

}  // namespace kcache_ops
