// kcache_ops::gather_rows on CUDA: checks (src must be pinned, device-mapped host memory), device
// guard, current stream, one launch of gather_rows_kernel.cuh as gather_rows_launch.h plans it
// for the device's multiprocessors (any dtype, any row of a multiple of 16 bytes). No host
// synchronisation except the optional index range check outside graph capture (launch_utils.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gather_rows_launch.h"
#include "launch_utils.h"
#include "../named_op.h"
#include "../shape_checks.h"
#include "utils.cuh"

namespace kcache_ops {
namespace {

constexpr char kOp[] = "gather_rows";  // first in each error the op raises (named_op.h)

at::Tensor gather_rows_cuda(const at::Tensor& src,      // [B, Hs, S, D], pinned mapped host memory
                            const at::Tensor& indices,  // [B, H, N] int32, CUDA
                            bool check_values) {
  const GatherRowsDims dims = check_gather_rows_args(src, indices);
  TORCH_CHECK(indices.is_cuda(), "indices must be a CUDA tensor, got ", indices.device());
  const c10::cuda::CUDAGuard guard(indices.device());
  const void* src_dev = host_mapped_device_ptr(src, "src");
  check_vec16_aligned(src, "src");
  check_element_aligned({{"indices", &indices}});
  // the kernel's int offsets: rows, heads, entries and a row's 16-byte pieces
  const int64_t row_bytes = dims.D * src.element_size();
  TORCH_CHECK(dims.S < (int64_t{1} << 31) && dims.H < (int64_t{1} << 31) &&
                  dims.N < (int64_t{1} << 31) && row_bytes < (int64_t{1} << 31),
              "sizes out of range for the CUDA kernel (each below 2^31): H=", dims.H,
              ", S=", dims.S, ", N=", dims.N, ", a row's bytes=", row_bytes);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dst = at::empty({dims.B, dims.H, dims.N, dims.D},
                             indices.options().dtype(src.scalar_type()));  // [B, H, N, D]
  if (check_values && should_validate_values(stream))  // as on the CPU, even with no output
    check_indices_on_device(indices, dims.S, "src");
  if (dst.numel() == 0) return dst;

  const GatherRowsArgs args = gather_rows_args(src_dev, src, indices, dst);
  const GatherRowsPlan plan =
      plan_gather_rows(args, host_read_sms(indices.get_device(), /*reads_host=*/true,
                                           /*by_default=*/true));
  TORCH_CHECK(plan.grid.x < (int64_t{1} << 31), "output too large: ", dst.sizes());
  gather_rows_kernel<<<to_dim3(plan.grid), plan.block, 0, stream>>>(plan.params);
  KC_CHECK_LAUNCH("gather_rows");
  return dst;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl(kOp, &NamedOp<kOp, &gather_rows_cuda>::call); }

}  // namespace kcache_ops
