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

// Positions, int32 of at least 1 dim, on the host (indices [B, H, N]; lowbit_tail's hot_pos
// [B, H]), read in place by their strides (a contiguous copy of expanded indices could be larger
// than the host has): every -1 (what `minus_one` says it means) <= value < S, S the capacity of
// the tensor named src_name; the first one outside is named by its index in the error.
inline void check_index_values(const at::Tensor& indices, int64_t S, const char* src_name,
                               const char* name = "indices", const char* minus_one = "padding") {
  if (indices.numel() == 0) return;
  const int32_t* p = indices.data_ptr<int32_t>();
  const int64_t last = indices.dim() - 1, n = indices.size(last), step = indices.stride(last);
  std::vector<int64_t> where(indices.dim(), 0);  // the row's index in each dim before the last
  int64_t row = 0;                                // where the row starts, in elements
  for (int64_t r = 0, rows = indices.numel() / n; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const int32_t value = p[row + i * step];
      if (value >= -1 && value < S) continue;
      where[last] = i;
      TORCH_CHECK(false, name, c10::IntArrayRef(where), " must be -1 (", minus_one,
                  ") or in [0, ", S, ") (", src_name, " capacity), got ", value);
    }
    for (int64_t d = last - 1; d >= 0; --d) {  // on to the next row, the later dims first
      if (++where[d] < indices.size(d)) {
        row += indices.stride(d);
        break;
      }
      row -= (indices.size(d) - 1) * indices.stride(d);
      where[d] = 0;
    }
  }
}

// The mean tail's indices [B, H, N] int32 (each already -1 or in [0, S)) against seq_lens [B] int32
// (each already in [0, S]), both on the host: every index of sequence b is -1 or below L_b, as
// v_sum sums the rows j < L_b only (sparse_attn_v).
inline void check_indices_below_lens(const at::Tensor& indices, const at::Tensor& seq_lens) {
  const int32_t* p = indices.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < indices.size(0); ++b) {
    const int32_t len = lens[b * seq_lens.stride(0)];
    for (int64_t h = 0; h < indices.size(1); ++h) {
      for (int64_t i = 0; i < indices.size(2); ++i) {
        const int32_t value =
            p[b * indices.stride(0) + h * indices.stride(1) + i * indices.stride(2)];
        TORCH_CHECK(value < len, "indices[", b, ", ", h, ", ", i, "] must be -1 (padding) or in "
                    "[0, ", len, ") (seq_lens[", b, "]: the mean tail's v_sum holds the rows "
                    "j < L_b), got ", value);
      }
    }
  }
}

}  // namespace kcache_ops
