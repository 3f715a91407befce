// kcache_ops::quantize_rows on CUDA: checks, device guard, current stream, dtype / bits dispatch,
// one launch of quantize_rows_kernel.cuh as quantize_rows_launch.h plans it. No host
// synchronisation and no allocation that depends on values (safe under CUDA graph capture); strided
// v is read in place unless its leading dims do not merge into the kernel's kQuantRowDims, which
// costs one contiguous copy.
#include <tuple>
#include <type_traits>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "quantize_rows_launch.h"
#include "../named_op.h"
#include "../shape_checks.h"
#include "utils.cuh"

namespace kcache_ops {
namespace {

constexpr char kOp[] = "quantize_rows";  // first in each error the op raises (named_op.h)

std::tuple<at::Tensor, at::Tensor> quantize_rows_cuda(const at::Tensor& v,  // [..., D], CUDA
                                                      int64_t bits) {
  const QuantizeRowsDims dims = check_quantize_rows_args(v, bits);
  TORCH_CHECK(v.is_cuda(), "v must be a CUDA tensor, got ", v.device());
  const c10::cuda::CUDAGuard guard(v.device());
  check_element_aligned({{"v", &v}});
  // D <= 2^30: a lane's d += 32 past D stays an int
  TORCH_CHECK(dims.D <= (int64_t{1} << 30) &&
                  ceil_div<int64_t>(dims.rows, kQuantWarps) < (int64_t{1} << 31),
              "sizes out of range for the CUDA kernel (D <= 2^30, rows below ",
              kQuantWarps, " x 2^31): rows=", dims.rows, ", D=", dims.D);

  std::vector<int64_t> codes_shape = v.sizes().vec(), meta_shape = v.sizes().vec();
  codes_shape.back() = dims.code_bytes;
  meta_shape.back() = 2;
  at::Tensor codes = at::empty(codes_shape, v.options().dtype(at::kByte));     // [..., D*bits/8]
  at::Tensor meta = at::empty(meta_shape, v.options().dtype(at::kBFloat16));  // [..., 2]
  if (dims.rows == 0) return {codes, meta};

  auto plan_for = [&](const at::Tensor& x) {  // x [..., D]: v or its contiguous copy
    return plan_quantize_rows({
        .v = x.data_ptr(),
        .sizes = x.sizes().data(),
        .strides = x.strides().data(),
        .ndim = x.dim(),
        .codes = codes.data_ptr<uint8_t>(),
        .meta = meta.data_ptr(),
        .bits = bits,
    });
  };
  QuantizeRowsPlan plan = plan_for(v);
  at::Tensor v_copy;  // [..., D], only where v's leading dims do not merge
  if (!plan.fits) {
    v_copy = v.contiguous();
    plan = plan_for(v_copy);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(v.scalar_type(), [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    dispatch_quant_bits(bits, [&](auto bits_tag) {
      quantize_rows_kernel<T, decltype(bits_tag)::value>
          <<<to_dim3(plan.grid), plan.block, 0, stream>>>(plan.params);
      KC_CHECK_LAUNCH("quantize_rows");
    });
  });
  return {codes, meta};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl(kOp, &NamedOp<kOp, &quantize_rows_cuda>::call); }

}  // namespace kcache_ops
