// quantize_rows on the GPU: each row of v [..., D] to kBits-bit codes with its own scale and min,
// both rounded to bfloat16 before the codes are computed; bit for bit reference.quantize_rows on
// finite input (a finite row's min and max within [-2^125, 2^125]).
//
// One warp per row, kQuantWarps rows per block, no shared memory and no block barrier. The lanes
// stride over the row for its min and max (warp butterflies), lane 0 writes the rounded
// (scale, min), then each lane packs whole bytes of codes (8 / kBits consecutive values each,
// consecutive lanes on consecutive bytes, so loads and stores coalesce), reading the row a second
// time (from L1: the warp has just read it). A row is found from its index through up to
// kQuantRowDims leading dims of any strides (the launch plan merges the dims it can), so a slice
// like the prefill hand-off's [:, :, :T] is read in place.
//
// The quotient is __fdiv_rn (IEEE division whatever the build's fast-math flags), the rounding
// rintf (half to even). Non-finite input: NaN elements are left out of the min and max (fminf /
// fmaxf) and get code 0, because the clamp fminf(fmaxf(q, 0), levels) maps a NaN quotient to 0;
// every code is in range whatever the input.
#pragma once

#include <cstdint>

#include "kernel_utils.cuh"

namespace kcache_ops {

constexpr int kQuantThreads = 128;  // 4 warps, one row each
constexpr int kQuantWarps = kQuantThreads / 32;
constexpr int kQuantRowDims = 4;    // leading dims the kernel indexes (after merging)
// A finite row's min and max are taken within [-kQuantRange, kQuantRange]
// (reference.QUANT_RANGE): its scale, min and every dequantised value stay finite.
constexpr float kQuantRange = 0x1p125f;

struct QuantRowsParams {
  const void* v;                      // [..., D] of T, last dim contiguous
  int64_t row_size[kQuantRowDims];    // the merged leading dims, outermost first (1: unused)
  int64_t row_stride[kQuantRowDims];  // their strides in elements
  uint8_t* codes;                     // [rows, code_bytes] contiguous
  __nv_bfloat16* meta;                // [rows, 2] contiguous: (scale, min) per row
  int64_t rows;                       // product of the leading dims
  int d, code_bytes;                  // code_bytes = d * kBits / 8
};

// x clamped to [-kQuantRange, kQuantRange] where finite (an infinite min or max stays as it is),
// a zero made +0: which of -0 and +0 fminf gives depends on the order, the meta must not.
__device__ __forceinline__ float within_quant_range(float x) {
  return isfinite(x) ? fminf(fmaxf(x, -kQuantRange), kQuantRange) + 0.0f : x;
}

// The code of one value: rintf((x - base) / step) (0 unless step > 0), clamped to [0, levels].
template <int kBits>
__device__ __forceinline__ uint32_t quant_code(float x, float step, float base) {
  constexpr float kLevels = (1 << kBits) - 1;
  const float q = step > 0.0f ? rintf(__fdiv_rn(x - base, step)) : 0.0f;
  return static_cast<uint32_t>(fminf(fmaxf(q, 0.0f), kLevels));
}

// grid ceil(rows / kQuantWarps), block kQuantThreads.
template <typename T, int kBits>
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(QuantRowsParams p) {
  constexpr int kPerByte = 8 / kBits;
  constexpr float kLevels = (1 << kBits) - 1;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;  // the whole warp, so no shuffle below misses a lane

  int64_t offset = 0;  // of the row in elements
  int64_t rest = row;
#pragma unroll
  for (int i = kQuantRowDims - 1; i >= 0; --i) {
    offset += rest % p.row_size[i] * p.row_stride[i];
    rest /= p.row_size[i];
  }
  const T* x = static_cast<const T*>(p.v) + offset;  // [D]

  float lo = INFINITY, hi = -INFINITY;
  for (int d = lane; d < p.d; d += 32) {
    const float f = Vec16<T>::one(x[d]);
    lo = fminf(lo, f);
    hi = fmaxf(hi, f);
  }
  lo = within_quant_range(-warp_max(-lo));
  hi = within_quant_range(warp_max(hi));
  const __nv_bfloat16 scale = __float2bfloat16_rn(__fdiv_rn(hi - lo, kLevels));
  const __nv_bfloat16 base = __float2bfloat16_rn(lo);
  if (lane == 0) {
    p.meta[2 * row] = scale;
    p.meta[2 * row + 1] = base;
  }

  const float step_f = __bfloat162float(scale), base_f = __bfloat162float(base);
  uint8_t* codes = p.codes + row * p.code_bytes;  // [code_bytes]
  for (int i = lane; i < p.code_bytes; i += 32) {
    uint32_t byte = 0;
#pragma unroll
    for (int k = 0; k < kPerByte; ++k)
      byte |= quant_code<kBits>(Vec16<T>::one(x[i * kPerByte + k]), step_f, base_f) << (k * kBits);
    codes[i] = static_cast<uint8_t>(byte);
  }
}

}  // namespace kcache_ops
