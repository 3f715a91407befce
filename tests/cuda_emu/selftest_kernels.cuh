// Small kernels that misuse barriers, warps, shared memory and asynchronous copies on purpose, and
// two that use them correctly: the emulator must stop each broken one with a message (never hang)
// and run the correct ones to the expected result. Launched with 2 blocks of 64 threads; out
// [2, 64] int32. And one warp's tensor-core product (mma_tile), the emulator's model of mma.sync
// on its own, and kernel_utils.cuh's bitonic sort on its own (bitonic_sort).
#pragma once

#include <cuda_pipeline_primitives.h>
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

// The handoff of qk_select_kernel's last_slice: every thread but the last writes its entry of the
// block's row, a barrier, and thread 0 fences and takes a ticket from the row's last entry (global
// memory); without the barrier or without the fence the race check must stop it.
template <bool kBarrier, bool kFence>
__device__ void ticket(int* out) {
  int* row = out + blockIdx.x * 64;  // [64]: 63 entries, then the ticket counter
  if (threadIdx.x < 63) row[threadIdx.x] = threadIdx.x;
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    if (kFence) __threadfence();
    atomicAdd(row + 63, 1);
  }
  __syncthreads();
}
__global__ void ticket_clean(int* out) { ticket<true, true>(out); }
__global__ void ticket_unordered(int* out) { ticket<false, true>(out); }
__global__ void ticket_unfenced(int* out) { ticket<true, false>(out); }

// The reading half of that handoff: both blocks write their row and take a ticket from one counter
// (row 1's last entry); the last block's ticket thread fences after its ticket (kAcquire), a
// barrier, and thread 1 reads the other block's row and writes its sum into row 0's last entry.
// Without that fence the race check must stop it.
template <bool kAcquire>
__device__ void handoff(int* out) {
  __shared__ int last;
  if (threadIdx.x < 63) out[blockIdx.x * 64 + threadIdx.x] = threadIdx.x + 100 * blockIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(out + 127, 1) == 0x7F7F7F7F + 1;  // the poisoned counter, then the first
    if (kAcquire && last) __threadfence();
  }
  __syncthreads();
  if (last && threadIdx.x == 1) {
    const int* other = out + (1 - blockIdx.x) * 64;  // [63]
    int sum = 0;
    for (int i = 0; i < 63; ++i) sum += __ldcg(other + i);
    out[63] = sum;
  }
}
__global__ void handoff_clean(int* out) { handoff<true>(out); }
__global__ void handoff_unfenced(int* out) { handoff<false>(out); }

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

// Lanes 0-15 of each warp reduce through kcache_ops::warp_sum at one call, lanes 16-31 at
// another: the shuffles of both are on warp_sum's line, but the lanes are at different calls (on a
// GPU, two shuffles of half a warp each, whose full mask names lanes that never arrive).
__global__ void divergent_warp_sum(int* out) {
  const int t = threadIdx.x;
  float v;
  if (t % 32 < 16) {
    v = kcache_ops::warp_sum(static_cast<float>(t)) + 1.0f;
  } else {
    v = kcache_ops::warp_sum(static_cast<float>(2 * t)) * 3.0f;
  }
  out[blockIdx.x * 64 + t] = static_cast<int>(v);
}

// Warp 0 scans through kcache_ops::block_scan at one call, warp 1 at another: the barrier inside
// is one line reached from two calls.
__global__ void divergent_block_scan(int* out) {
  __shared__ int warp_total[2];
  const int t = threadIdx.x;
  int total = 0, before;
  if (t < 32) {
    before = kcache_ops::block_scan<64>(t, total, warp_total);
  } else {
    before = 2 * kcache_ops::block_scan<64>(t + 1, total, warp_total);
  }
  out[blockIdx.x * 64 + t] = before + total;
}

// Global memory the asynchronous-copy kernels copy from: v[i] = 1000 + i, 16-byte aligned.
struct AsyncSource {
  alignas(16) int v[264];
};
constexpr AsyncSource make_async_source() {
  AsyncSource s{};
  for (int i = 0; i < 264; ++i) s.v[i] = 1000 + i;
  return s;
}
inline constexpr AsyncSource kAsyncSource = make_async_source();

// Asynchronous copies used correctly: two commit groups (the second zero-fills its copy in odd
// threads), each read after the wait that covers it, another thread's slot after a barrier.
// out[b, t] = (1000 + t) + (t odd ? 0 : 1001 + t) + (1063 - t).
__global__ void async_clean(int* out) {
  __shared__ int a[64];
  __shared__ int c[64];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&a[t], &kAsyncSource.v[t], 4);
  __pipeline_commit();
  __pipeline_memcpy_async(&c[t], &kAsyncSource.v[t + 1], 4, t % 2 ? 4 : 0);
  __pipeline_commit();
  __pipeline_wait_prior(1);  // the first group has landed; the newest one may not have
  int v = a[t];
  __pipeline_wait_prior(0);
  v += c[t];
  __syncthreads();
  out[blockIdx.x * 64 + t] = v + a[63 - t];
}

// Reads its copy's destination without waiting for it.
__global__ void async_read_before_wait(int* out) {
  __shared__ int a[64];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&a[t], &kAsyncSource.v[t], 4);
  __pipeline_commit();
  const int v = a[t];
  __pipeline_wait_prior(0);
  out[blockIdx.x * 64 + t] = v;
}

// __pipeline_wait_prior(1) leaves the newest group in flight, and the kernel reads that one.
__global__ void async_newest_group(int* out) {
  __shared__ int a[64];
  __shared__ int c[64];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&a[t], &kAsyncSource.v[t], 4);
  __pipeline_commit();
  __pipeline_memcpy_async(&c[t], &kAsyncSource.v[t + 1], 4);
  __pipeline_commit();
  __pipeline_wait_prior(1);
  const int v = c[t];
  __pipeline_wait_prior(0);
  out[blockIdx.x * 64 + t] = v + a[t];
}

// A copy never committed is in no group: __pipeline_wait_prior(0) does not wait for it.
__global__ void async_uncommitted(int* out) {
  __shared__ int a[64];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&a[t], &kAsyncSource.v[t], 4);
  __pipeline_wait_prior(0);
  out[blockIdx.x * 64 + t] = a[t];
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

// Reads the slot of the next thread after waiting for its own copy only (no barrier).
__global__ void async_read_other(int* out) {
  __shared__ int a[64];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&a[t], &kAsyncSource.v[t], 4);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  out[blockIdx.x * 64 + t] = a[(t + 1) % 64];
}

// A 16-byte copy into a destination 4 bytes past a 16-byte boundary.
__global__ void async_misaligned_dst(int* out) {
  __shared__ uint4 a[65];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(reinterpret_cast<char*>(&a[t]) + 4, &kAsyncSource.v[4 * t], 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  out[blockIdx.x * 64 + t] = static_cast<int>(a[t].y);
}

// A 16-byte copy from a source 4 bytes past a 16-byte boundary.
__global__ void async_misaligned_src(int* out) {
  __shared__ uint4 a[64];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&a[t], &kAsyncSource.v[4 * t + 1], 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  out[blockIdx.x * 64 + t] = static_cast<int>(a[t].x);
}

// kcache_ops::block_bitonic_sort of `size` (a power of two <= 256) 64-bit keys, given as [size, 2]
// int32 words (low, high), by a block of 128 threads: descending in block 0, ascending in block 1;
// out [2, size, 2] the same way. Up to 64 keys one warp sorts them (warp_bitonic_sort).
__global__ void bitonic_sort(const int* keys, int size, int* out) {
  __shared__ unsigned long long k[256];
  for (int i = threadIdx.x; i < size; i += 128)
    k[i] = (static_cast<unsigned long long>(static_cast<uint32_t>(keys[2 * i + 1])) << 32) |
           static_cast<uint32_t>(keys[2 * i]);
  __syncthreads();
  if (blockIdx.x == 0) {
    kcache_ops::block_bitonic_sort<128, true>(k, size);
  } else {
    kcache_ops::block_bitonic_sort<128, false>(k, size);
  }
  int* o = out + blockIdx.x * size * 2;  // [size, 2]
  for (int i = threadIdx.x; i < size; i += 128) {
    o[2 * i] = static_cast<int>(static_cast<uint32_t>(k[i]));
    o[2 * i + 1] = static_cast<int>(static_cast<uint32_t>(k[i] >> 32));
  }
}

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
