// The sum of a row's partial results on the GPU: out[r, d] = sum over p of partials[r, p, d], in
// the order of p (deterministic, no atomics), converted to the output's type. The second launch
// of the ops whose blocks each sum one part of a row's terms: lowbit_tail (a chunk of keys each)
// and sparse_attn_v (a part of its row list each, where few blocks would read host memory).
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kSumPartialsThreads = 256;

struct SumPartialsParams {
  const float* partials;  // [rows, parts, d] float32
  void* out;              // [rows, d] of T, contiguous
  int64_t total;          // rows · d
  int parts, d;
};

// grid ceil(total / kSumPartialsThreads), block kSumPartialsThreads: one output element a thread.
template <typename T>
__global__ void __launch_bounds__(kSumPartialsThreads) sum_partials_kernel(SumPartialsParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kSumPartialsThreads + threadIdx.x;
  if (t >= p.total) return;
  const float* src = p.partials + (t / p.d) * p.parts * p.d + t % p.d;  // [parts] at stride d
  float sum = src[0];
  for (int c = 1; c < p.parts; ++c) sum += src[static_cast<int64_t>(c) * p.d];
  static_cast<T*>(p.out)[t] = Vec16<T>::from(sum);
}

}  // namespace kcache_ops
