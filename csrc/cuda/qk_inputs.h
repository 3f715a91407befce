// The inputs that qk_topn's score kernel reads: q, the K cache and seq_lens, as pointers and
// strides. Plain C++ (no torch, no CUDA runtime), so the kernels, the launch plans and the CPU
// harness of the kernels share it.
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

}  // namespace kcache_ops
