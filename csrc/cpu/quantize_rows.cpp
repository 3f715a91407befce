// kcache_ops::quantize_rows on the CPU: each row of D values to bits-bit codes with its own scale
// and min, both rounded to bfloat16 before the codes are computed (reference.quantize_rows, bit for
// bit on finite input; a finite row's min and max within [-2^125, 2^125]). Non-finite input
// (documented in ops.py): NaN elements are left out of the row's min and max and get code 0;
// every code stays in [0, 2^bits - 1].
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../named_op.h"
#include "../shape_checks.h"
#include "common.h"

namespace kcache_ops::cpu {
namespace {

constexpr char kOp[] = "quantize_rows";  // first in each error the op raises (named_op.h)

constexpr float kInf = std::numeric_limits<float>::infinity();
// A finite row's min and max are taken within [-kRange, kRange] (reference.QUANT_RANGE): its
// scale, min and every dequantised value stay finite (values beyond get the end codes). A zero is
// made +0 (`+ 0.0f`): which of -0 and +0 fmin gives depends on the order, the meta must not.
constexpr float kRange = 0x1p125f;

inline float within_range(float x) {
  return std::isfinite(x) ? std::fmin(std::fmax(x, -kRange), kRange) + 0.0f : x;
}

// The code of one value: round half to even of (x - base) / step in float32 (0 where step is not
// positive), clamped to [0, 2^kBits - 1]; a NaN quotient clamps to 0.
template <int kBits>
inline uint32_t quantize_value(float x, float step, float base) {
  constexpr float kLevels = (1 << kBits) - 1;
  const float q = step > 0.f ? std::rint((x - base) / step) : 0.f;
  return static_cast<uint32_t>(std::fmin(std::fmax(q, 0.f), kLevels));
}

// One row: x [D] (contiguous) -> codes [D * kBits / 8], meta [2] = (scale, min) in bfloat16.
// Code d sits in byte d / (8 / kBits) at bit (d % (8 / kBits)) * kBits.
template <typename scalar_t, int kBits>
void quantize_row(const scalar_t* x, int64_t D, uint8_t* codes, c10::BFloat16* meta) {
  constexpr int kPerByte = 8 / kBits;
  constexpr float kLevels = (1 << kBits) - 1;
  float lo = kInf, hi = -kInf;
  for (int64_t d = 0; d < D; ++d) {
    const float f = to_float(x[d]);
    lo = std::fmin(lo, f);
    hi = std::fmax(hi, f);
  }
  lo = within_range(lo);
  hi = within_range(hi);
  meta[0] = c10::BFloat16((hi - lo) / kLevels);
  meta[1] = c10::BFloat16(lo);
  const float step = static_cast<float>(meta[0]), base = static_cast<float>(meta[1]);
  for (int64_t i = 0; i < D / kPerByte; ++i) {
    uint32_t byte = 0;
    for (int k = 0; k < kPerByte; ++k) {
      byte |= quantize_value<kBits>(to_float(x[i * kPerByte + k]), step, base) << (k * kBits);
    }
    codes[i] = static_cast<uint8_t>(byte);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& v,  // [..., D]
                                                     int64_t bits) {
  const QuantizeRowsDims dims = check_quantize_rows_args(v, bits);
  KC_CHECK_CPU(v);
  std::vector<int64_t> codes_shape = v.sizes().vec(), meta_shape = v.sizes().vec();
  codes_shape.back() = dims.code_bytes;
  meta_shape.back() = 2;
  check_host_output(bytes_of({dims.rows, dims.code_bytes + 4}, 1), [&] {
    return c10::str("codes [rows, ", dims.code_bytes, "] and meta [rows, 2] of ",
                    dims.rows, " rows");
  });
  at::Tensor codes = at::empty(codes_shape, v.options().dtype(at::kByte));     // [..., D*bits/8]
  at::Tensor meta = at::empty(meta_shape, v.options().dtype(at::kBFloat16));  // [..., 2]
  const int64_t lead = v.dim() - 1;  // leading dims, any strides
  KC_DISPATCH_FLOAT_HALF_BF16(v.scalar_type(), "quantize_rows", [&] {
    const scalar_t* base = v.data_ptr<scalar_t>();
    uint8_t* codes_p = codes.data_ptr<uint8_t>();
    c10::BFloat16* meta_p = meta.data_ptr<c10::BFloat16>();
    parallel_for(0, dims.rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t offset = 0;  // of row r in elements, from its index over the leading dims
        for (int64_t i = lead - 1, rest = r; i >= 0; --i) {
          offset += (rest % v.size(i)) * v.stride(i);
          rest /= v.size(i);
        }
        uint8_t* row_codes = codes_p + r * dims.code_bytes;
        c10::BFloat16* row_meta = meta_p + r * 2;
        if (dims.bits == 2) {
          quantize_row<scalar_t, 2>(base + offset, dims.D, row_codes, row_meta);
        } else {
          quantize_row<scalar_t, 4>(base + offset, dims.D, row_codes, row_meta);
        }
      }
    });
  });
  return {codes, meta};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl(kOp, &NamedOp<kOp, &quantize_rows_cpu>::call); }

}  // namespace kcache_ops::cpu
