// Stand-in for the CUDA runtime header, enough to compile the kernels of csrc/cuda/*_kernel.cuh
// with g++ and run them on the CPU under the fiber emulator (../emu.h, ../runtime.cpp).
#pragma once

#include <math.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../emu.h"

#define __global__
// Every __device__ function is inlined (into its kernel): the runtime tells the call sites of a
// barrier or shuffle apart by the inlined call chain at the call's return address (runtime.cpp,
// site_of), which then reaches from the intrinsic through every helper to the kernel, so that lanes
// entering one helper (warp_sum, block_scan...) from two different callers are not paired.
#define __device__ __attribute__((always_inline))
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// A function-local static: shared by the fibers of a block (they all run on one OS thread), i.e.
// one instance per block as blocks run one after another. The harness's translation unit holds no
// other static data, and the link script gathers it into one section that the runtime poisons
// before each block and watches for races.
#define __shared__ static

// Vector types with CUDA's alignment (16-byte loads are checked for alignment under UBSan).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// Integer and float helpers of the CUDA math library.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }

// Block barriers; the call site names the barrier in messages and in the mutant runs.
#define __syncthreads() ::emu::sync_block(1, 0, __FILE__, __LINE__)
#define __syncthreads_and(pred) (::emu::sync_block((pred) ? 1 : 0, 1, __FILE__, __LINE__) != 0)
#define __syncthreads_or(pred) (::emu::sync_block((pred) ? 1 : 0, 2, __FILE__, __LINE__) != 0)
#define __syncthreads_count(pred) ::emu::sync_block((pred) ? 1 : 0, 3, __FILE__, __LINE__)
#define __syncwarp(...) ::emu::detail::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

// Warp shuffles: warp barriers that exchange one value of at most 8 bytes.
#define __shfl_sync(...) ::emu::detail::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::detail::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::detail::shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::detail::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)

namespace emu::detail {

// Inlined, as __device__ functions are: a call into the runtime from an out-of-line copy of these
// would have one return address for all its callers.
#define EMU_INLINE inline __attribute__((always_inline))

template <typename T>
EMU_INLINE T exchange(unsigned mask, T v, int src, const char* kind, const char* file, int line) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::emu::shuffle(mask, bits, src, kind, file, line);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

EMU_INLINE void check_width(int width, const char* file, int line) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    ::emu::fail("shuffle width must be a power of two in [1, 32]", file, line);
}

template <typename T>
EMU_INLINE T shfl_idx(const char* file, int line, unsigned mask, T v,
                      int src_lane, int width = 32) {
  check_width(width, file, line);
  const int lane = ::emu::lane_id();
  return exchange(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)), "__shfl_sync", file,
                  line);
}

template <typename T>
EMU_INLINE T shfl_up(const char* file, int line, unsigned mask, T v,
                     unsigned delta, int width = 32) {
  check_width(width, file, line);
  const int lane = ::emu::lane_id();
  const int d = static_cast<int>(delta);
  const int src = (lane & (width - 1)) >= d ? lane - d : -1;
  return exchange(mask, v, src, "__shfl_up_sync", file, line);
}

template <typename T>
EMU_INLINE T shfl_down(const char* file, int line, unsigned mask, T v,
                       unsigned delta, int width = 32) {
  check_width(width, file, line);
  const int lane = ::emu::lane_id();
  const int src =
      (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1;
  return exchange(mask, v, src, "__shfl_down_sync", file, line);
}

template <typename T>
EMU_INLINE T shfl_xor(const char* file, int line, unsigned mask, T v,
                      int lane_mask, int width = 32) {
  check_width(width, file, line);
  const int lane = ::emu::lane_id();
  const int src = lane ^ lane_mask;
  // A partner outside the caller's segment of `width` lanes returns the caller's own value.
  return exchange(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : -1,
                  "__shfl_xor_sync", file, line);
}

EMU_INLINE void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  ::emu::shuffle(mask, 0, -1, "__syncwarp", file, line);
}

#undef EMU_INLINE

}  // namespace emu::detail

inline int atomicAdd(int* p, int v) { return ::emu::atomic_add(p, v); }
// Blocks run one after another here, so an earlier block's writes are already visible to a later
// one: the fence orders nothing (the race check records it for the tickets it checks), and a load
// through L2 alone (__ldcg) is a plain load.
inline void __threadfence() { ::emu::thread_fence(); }
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return ::emu::atomic_or(p, v); }
