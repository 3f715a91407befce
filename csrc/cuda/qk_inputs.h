// The inputs that qk_topn's score kernel reads: q, the K cache and seq_lens, as pointers and
// strides, and how a call's tensors give them. Plain C++ (no torch, no CUDA runtime), so the
// kernels, the launch plans and the CPU harness of the kernels share it.
#pragma once

#include <cstdint>

namespace kcache_ops {

struct QkInputs {
  const void* q;             // [B, Hq, D] of T, last dim contiguous
  int64_t q_sb, q_sh;        // strides in elements
  const void* k;             // [B, Hkv, S, D] of T, last dim contiguous, rows 16-byte aligned
  int64_t k_sb, k_sh, k_ss;  // strides in elements
  const int32_t* seq_lens;   // [B], clamped to [0, S] by the kernels
  int64_t seq_stride;        // in elements
};

// The QkInputs of a call. Tensor: at::Tensor in the launcher, the CPU harness's tensor in
// tests/cuda_emu; both give data_ptr(), size(d), stride(d) and element_size(), so the launchers and
// the harness pack a call with the same code (the *_args functions of the launch headers).
template <class Tensor>
QkInputs qk_inputs(const Tensor& q, const Tensor& k_cache, const Tensor& seq_lens) {
  return {
      .q = q.data_ptr(),
      .q_sb = q.stride(0),
      .q_sh = q.stride(1),
      .k = k_cache.data_ptr(),
      .k_sb = k_cache.stride(0),
      .k_sh = k_cache.stride(1),
      .k_ss = k_cache.stride(2),
      .seq_lens = static_cast<const int32_t*>(seq_lens.data_ptr()),
      .seq_stride = seq_lens.stride(0),
  };
}

}  // namespace kcache_ops
