// Small kernels that misuse barriers, warps and shared memory on purpose, and one that uses them
// correctly: the emulator must stop each broken one with a message (never hang) and run the
// correct one to the expected result. Launched with 2 blocks of 64 threads; out [2, 64] int32.
// And one warp's tensor-core product (mma_tile), the emulator's model of mma.sync on its own.
#pragma once

#include <cuda_runtime.h>

#include "kernel_utils.cuh"

namespace emu_selftest {

// out[b, t] = the sum over t's warp of (63 - t + b), read back via shared memory and shuffles.
__global__ void clean(int* out) {
  __shared__ int buf[64];
  const int t = threadIdx.x;
  buf[t] = t + blockIdx.x;
  __syncthreads();
  int v = buf[63 - t];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[blockIdx.x * 64 + t] = v;
}

// Half of each warp has returned when the other half shuffles with the full mask.
__global__ void partial_warp(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[blockIdx.x * 64 + threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

// Half of each warp shuffles while the other half waits at a block barrier.
__global__ void split_warp(int* out) {
  int v = 1;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[blockIdx.x * 64 + threadIdx.x] = v;
}

// Thread 0 returns; the others wait for it at a barrier.
__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = 1;
}

// The two halves of the block wait at different barriers.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[blockIdx.x * 64 + threadIdx.x] = 1;
}

// Each thread reads its neighbour's slot with no barrier after the writes.
__global__ void missing_barrier(int* out) {
  __shared__ int buf[64];
  buf[threadIdx.x] = threadIdx.x;
  out[blockIdx.x * 64 + threadIdx.x] = buf[(threadIdx.x + 1) % 64];
}

// Block 1 reads what block 0 left in shared memory.
__global__ void stale_shared(int* out) {
  __shared__ int buf[64];
  if (blockIdx.x == 0) buf[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = buf[threadIdx.x];
}

// Both blocks write the same output row.
__global__ void double_write(int* out) { out[threadIdx.x] = blockIdx.x; }

// One warp (one block of 32 threads): d = c + a · b through kcache_ops::mma_tf32_m16n8k8, a
// [16, 8], b [8, 8], c and d [16, 8] float32, row-major; each lane loads and stores its own
// fragments (the layout of the function's comment).
__global__ void mma_tile(const float* a, const float* b, const float* c, float* d) {
  const int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const uint32_t frag_a[4] = {__float_as_uint(a[g * 8 + t]), __float_as_uint(a[(g + 8) * 8 + t]),
                              __float_as_uint(a[g * 8 + t + 4]),
                              __float_as_uint(a[(g + 8) * 8 + t + 4])};
  const uint32_t frag_b[2] = {__float_as_uint(b[t * 8 + g]), __float_as_uint(b[(t + 4) * 8 + g])};
  const int at[4] = {g * 8 + 2 * t, g * 8 + 2 * t + 1, (g + 8) * 8 + 2 * t,
                     (g + 8) * 8 + 2 * t + 1};  // d's elements of this lane
  float acc[4];
  for (int e = 0; e < 4; ++e) acc[e] = c[at[e]];
  kcache_ops::mma_tf32_m16n8k8(acc, frag_a, frag_b);
  for (int e = 0; e < 4; ++e) d[at[e]] = acc[e];
}

}  // namespace emu_selftest
