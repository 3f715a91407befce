// kcache_ops::gather_rows on the CPU: dst[b, h, i] = src[b, h / G, indices[b, h, i]], a row copy
// (any dtype); index -1 gives a zero row.
#include <cstring>

#include "../named_op.h"
#include "../shape_checks.h"
#include "../value_checks.h"
#include "common.h"

namespace kcache_ops::cpu {
namespace {

constexpr char kOp[] = "gather_rows";  // first in each error the op raises (named_op.h)

at::Tensor gather_rows_cpu(const at::Tensor& src,      // [B, Hs, S, D]
                           const at::Tensor& indices,  // [B, H, N] int32
                           bool /*check_values*/) {    // indices on the host: checked
  const GatherRowsDims dims = check_gather_rows_args(src, indices);
  KC_CHECK_CPU(src);
  KC_CHECK_CPU(indices);
  const int64_t elem = static_cast<int64_t>(src.element_size());
  check_host_output(bytes_of({dims.B, dims.H, dims.N, dims.D}, elem), [&] {
    return c10::str("dst [", dims.B, ", ", dims.H, ", ", dims.N, ", ", dims.D, "]");
  });
  check_index_values(indices, dims.S, "src");
  at::Tensor dst = at::empty({dims.B, dims.H, dims.N, dims.D}, src.options());  // [B, H, N, D]
  if (dst.numel() == 0) return dst;  // no row has bytes: memcpy and memset would get a null dst
  const int64_t row_bytes = dims.D * elem;
  const char* src_p = static_cast<const char*>(src.data_ptr());
  char* dst_p = static_cast<char*>(dst.data_ptr());
  parallel_for(0, dims.B * dims.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / dims.H, h = bh % dims.H;
      const char* head = src_p + (b * src.stride(0) + (h / dims.G) * src.stride(1)) * elem;
      const int32_t* idx =
          indices.data_ptr<int32_t>() + b * indices.stride(0) + h * indices.stride(1);
      char* out = dst_p + bh * dims.N * row_bytes;
      for (int64_t i = 0; i < dims.N; ++i, out += row_bytes) {
        if (idx[i] < 0) {
          std::memset(out, 0, row_bytes);
        } else {
          std::memcpy(out, head + idx[i] * src.stride(2) * elem, row_bytes);
        }
      }
    }
  });
  return dst;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl(kOp, &NamedOp<kOp, &gather_rows_cpu>::call); }

}  // namespace kcache_ops::cpu
