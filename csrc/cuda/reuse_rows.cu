// kcache_ops::reuse_rows on CUDA: checks (v_host must be pinned, device-mapped host memory, or
// device memory; the pool on the device of indices), device guard, current stream, one launch of
// reuse_rows_kernel.cuh as reuse_rows_launch.h plans it. No host synchronisation except the index
// range check, which check_values=False skips (launch_utils.h).
#include <tuple>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "../named_op.h"
#include "../shape_checks.h"
#include "reuse_rows_launch.h"
#include "utils.cuh"

namespace kcache_ops {
namespace {

constexpr char kOp[] = "reuse_rows";  // first in each error the op raises (named_op.h)

std::tuple<at::Tensor, at::Tensor> reuse_rows_cuda(
    const at::Tensor& indices,  // [B, Hq, N] int32, CUDA
    const at::Tensor& v_host,   // [B, Hkv, S, D], pinned mapped host memory or CUDA
    const at::Tensor& new_pos,  // [B] int32, CUDA
    const at::Tensor& rows,     // [B, Hkv, C, D], CUDA, updated
    const at::Tensor& held,     // [B, Hkv, C] int32, CUDA, updated
    const at::Tensor& used,     // [B, Hkv, C] int32, CUDA, updated
    const at::Tensor& step,     // [1] int32, CUDA
    bool group_select, bool check_values) {
  const ReuseRowsDims d =
      check_reuse_rows_args(indices, v_host, new_pos, rows, held, used, step, group_select);
  TORCH_CHECK(indices.is_cuda(), "indices must be a CUDA tensor, got ", indices.device());
  for (const auto& [name, t] : {std::pair{"new_pos", &new_pos}, {"rows", &rows},
                                {"held", &held}, {"used", &used}, {"step", &step}})
    TORCH_CHECK(t->device() == indices.device(), name, " must be on ",
                indices.device(), " (the device of indices), got ", t->device());
  const c10::cuda::CUDAGuard guard(indices.device());
  const void* v_dev = readable_device_ptr(v_host, indices.device(), "v_host");
  check_vec16_aligned(v_host, "v_host");
  check_vec16_aligned(rows, "rows");
  check_element_aligned({{"indices", &indices}, {"new_pos", &new_pos}, {"held", &held},
                         {"used", &used}, {"step", &step}});
  TORCH_CHECK(d.C <= kReuseMaxSlots && d.E <= kReuseMaxEntries,
              "the CUDA kernel holds a pool of at most ", kReuseMaxSlots,
              " slots and a step of at most ", kReuseMaxEntries, " entries (G x N, or N with ",
              "group_select) per sequence and KV head in shared memory, got ", d.C, " slots and ",
              d.E, " entries");
  // the kernel's int offsets: a row's 16-byte pieces, a KV head's G x N outputs
  TORCH_CHECK(d.B * d.Hkv < (int64_t{1} << 31) && d.D * v_host.element_size() < (int64_t{1} << 31)
                  && d.G * d.N < (int64_t{1} << 31),
              "sizes out of range for the CUDA kernel (B x Hkv, a row's bytes and ",
              "G x N below 2^31): B=", d.B, ", Hkv=", d.Hkv, ", D=", d.D, " (",
              d.D * v_host.element_size(), " bytes a row), G=", d.G, ", N=", d.N);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor pool_indices = at::empty({d.B, d.Hq, d.N}, indices.options());  // [B, Hq, N]
  at::Tensor counts = at::empty({d.B, d.Hkv, 2}, indices.options());       // [B, Hkv, 2]
  if (d.N == 0 || d.B * d.Hkv == 0) {  // no entry: nothing read
    counts.zero_();
    return {pool_indices, counts};
  }
  if (check_values && should_validate_values(stream))
    check_indices_on_device(indices, d.S, "v_host");

  const ReuseRowsPlan plan = plan_reuse_rows(indices, v_dev, v_host, new_pos, rows, held, used,
                                             step, pool_indices, counts, group_select);
  reuse_rows_kernel<<<to_dim3(plan.grid), plan.block, 0, stream>>>(plan.params);
  KC_CHECK_LAUNCH("reuse_rows");
  return {pool_indices, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl(kOp, &NamedOp<kOp, &reuse_rows_cuda>::call); }

}  // namespace kcache_ops
