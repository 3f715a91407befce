// quantize_rows's launch arithmetic on plain numbers: v's leading dims merged into the kernel's row
// indexing, the grid and the kernel's parameters, and the dispatch over bits. No torch and no CUDA
// runtime calls, so the launcher (quantize_rows.cu) and the CPU harness of the kernels share it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "launch_grid.h"
#include "quantize_rows_kernel.cuh"

namespace kcache_ops {

// One quantize_rows call: data pointers, v's sizes and strides in elements.
struct QuantizeRowsArgs {
  const void* v;           // [..., D] of T, device address, last dim contiguous
  const int64_t* sizes;    // [ndim] sizes of v
  const int64_t* strides;  // [ndim] strides of v in elements
  int64_t ndim;            // >= 1
  uint8_t* codes;          // [..., D * bits / 8] uint8, contiguous
  void* meta;              // [..., 2] bfloat16, contiguous
  int64_t bits;            // 2 or 4
};

// The launch of quantize_rows_kernel<T, bits>.
struct QuantizeRowsPlan {
  bool fits;               // false: the leading dims do not merge into kQuantRowDims (make v
                           // contiguous and plan again)
  GridSize grid;           // (ceil(rows / kQuantWarps))
  int block;               // kQuantThreads
  QuantRowsParams params;
};

// The plan of a call with at least one row. Leading dims are merged from the innermost outward:
// a dim joins the group inside it when stepping it equals stepping over the whole group
// (stride == inner stride * inner size); dims of size 1 are dropped.
inline QuantizeRowsPlan plan_quantize_rows(const QuantizeRowsArgs& a) {
  int64_t size[kQuantRowDims], stride[kQuantRowDims];  // merged dims, innermost first
  int merged = 0;
  bool fits = true;
  int64_t rows = 1;
  for (int64_t i = a.ndim - 2; i >= 0; --i) {
    rows *= a.sizes[i];
    if (a.sizes[i] == 1 || !fits) continue;
    if (merged > 0 && a.strides[i] == stride[merged - 1] * size[merged - 1]) {
      size[merged - 1] *= a.sizes[i];
    } else if (merged == kQuantRowDims) {
      fits = false;
    } else {
      size[merged] = a.sizes[i];
      stride[merged] = a.strides[i];
      ++merged;
    }
  }
  const int64_t D = a.sizes[a.ndim - 1];
  QuantizeRowsPlan plan{
      .fits = fits,
      .grid = {.x = ceil_div<int64_t>(rows, kQuantWarps)},
      .block = kQuantThreads,
      .params = {
          .v = a.v,
          .row_size = {},
          .row_stride = {},
          .codes = a.codes,
          .meta = static_cast<__nv_bfloat16*>(a.meta),
          .rows = rows,
          .d = static_cast<int>(D),
          .code_bytes = static_cast<int>(D * a.bits / 8),
      },
  };
  for (int j = 0; j < kQuantRowDims; ++j) {  // outermost first; unused dims of size 1
    const bool used = j < merged;
    plan.params.row_size[kQuantRowDims - 1 - j] = used ? size[j] : 1;
    plan.params.row_stride[kQuantRowDims - 1 - j] = used ? stride[j] : 0;
  }
  return plan;
}

// f(std::integral_constant<int, kBits>{}) for bits in {2, 4} (checked before).
template <typename F>
void dispatch_quant_bits(int64_t bits, F&& f) {
  if (bits == 2) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 4>{});
}

}  // namespace kcache_ops
