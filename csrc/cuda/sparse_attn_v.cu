// kcache_ops::sparse_attn_v on CUDA: checks (v_cache must be pinned, device-mapped host memory,
// or device memory), device guard, current stream, dtype / head-dim / group dispatch, the launch of
// sparse_attn_v_kernel.cuh as sparse_attn_v_launch.h plans it for the device's multiprocessors
// (the mean tail included), and where it splits the rows, sum_partials_kernel's. No host
// synchronisation except the index and seq_lens range checks, which check_values=False skips
// (launch_utils.h).
#include <type_traits>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "../named_op.h"
#include "../shape_checks.h"
#include "sparse_attn_v_launch.h"
#include "utils.cuh"

namespace kcache_ops {
namespace {

constexpr char kOp[] = "sparse_attn_v";  // first in each error the op raises (named_op.h)

at::Tensor sparse_attn_v_cuda(
    const at::Tensor& scores,              // [B, Hq, N] float32, CUDA
    const at::Tensor& indices,             // [B, Hq, N] int32, CUDA
    const at::Tensor& v_cache,             // [B, Hkv, S, D], pinned mapped host memory or CUDA
    const std::optional<at::Tensor>& lse,  // [B, Hq] float32, CUDA; needed unless renormalize
    bool renormalize, bool check_values,
    const std::optional<at::Tensor>& v_sum,      // [B, Hkv, D] float32, CUDA; the mean tail
    const std::optional<at::Tensor>& seq_lens) {  // [B] int32, CUDA; given with v_sum
  const SparseAttnVDims dims =
      check_sparse_attn_v_args(scores, indices, v_cache, lse, renormalize, v_sum, seq_lens);
  TORCH_CHECK(scores.is_cuda(), "scores must be a CUDA tensor, got ", scores.device());
  KC_CHECK_DEVICE(indices, scores.device());
  TORCH_CHECK(!lse.has_value() || lse->device() == scores.device(), "lse must be on ",
              scores.device(), " (the device of scores), got ", lse->device());
  if (dims.tail) {
    TORCH_CHECK(v_sum->device() == scores.device(), "v_sum must be on ",
                scores.device(), " (the device of scores), got ", v_sum->device());
    TORCH_CHECK(seq_lens->device() == scores.device(), "seq_lens must be on ",
                scores.device(), " (the device of scores), got ", seq_lens->device());
  }
  const c10::cuda::CUDAGuard guard(scores.device());
  const void* v_dev = readable_device_ptr(v_cache, scores.device(), "v_cache");
  check_vec16_aligned(v_cache, "v_cache");
  const at::Tensor none;  // an absent optional's stand-in: not checked
  check_element_aligned({{"scores", &scores}, {"indices", &indices},
                         {"lse", lse ? &*lse : &none}, {"v_sum", v_sum ? &*v_sum : &none},
                         {"seq_lens", seq_lens ? &*seq_lens : &none}});
  // N < 2^24: a block's entry count (its heads · N) is an int, and the mean tail counts a head's
  // entries in a float, exact below 2^24
  TORCH_CHECK(dims.S < (int64_t{1} << 31) && dims.B < 65536 && dims.N < (int64_t{1} << 24),
              "sizes out of range for the CUDA kernel (B < 65536, S < 2^31, "
              "N < 2^24): B=", dims.B, ", S=", dims.S, ", N=", dims.N);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({dims.B, dims.Hq, dims.D},
                             scores.options().dtype(v_cache.scalar_type()));  // [B, Hq, D]
  if (check_values && should_validate_values(stream)) {  // as on the CPU, even with no output
    if (dims.tail) check_seq_lens_on_device(*seq_lens, dims.S, "v_cache");
    check_indices_on_device(indices, dims.S, "v_cache");
    if (dims.tail) check_indices_below_lens_on_device(indices, *seq_lens);
  }
  if (out.numel() == 0) return out;

  const SparseAttnVArgs args = sparse_attn_v_args(
      scores, indices, v_dev, v_cache, lse ? &*lse : nullptr, renormalize,
      dims.tail ? &*v_sum : nullptr, dims.tail ? &*seq_lens : nullptr, out);
  const SparseAttnVPlan plan =
      plan_sparse_attn_v(args, host_read_sms(scores.get_device(), !v_cache.is_cuda(),
                                             /*by_default=*/false));
  // [B, Hq, parts, D] float32: the parts' sums when a slice's rows are split (else empty)
  at::Tensor partials = at::empty({plan.partial_floats}, scores.options());
  const SparseAttnParams p = sparse_attn_v_params(args, plan, partials.data_ptr<float>());
  dispatch_kernel_instance(v_cache.scalar_type(), dims.D, plan.group_slice,
                           [&](auto type_tag, auto d_tag, auto gs_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    sparse_attn_v_kernel<T, decltype(d_tag)::value, decltype(gs_tag)::value>
        <<<to_dim3(plan.grid), plan.block, 0, stream>>>(p);
    KC_CHECK_LAUNCH("sparse_attn_v");
    if (plan.parts > 1) {
      const SumPartialsPlan sum = sparse_attn_v_sum_plan(args, plan, partials.data_ptr<float>());
      sum_partials_kernel<T><<<to_dim3(sum.grid), sum.block, 0, stream>>>(sum.params);
      KC_CHECK_LAUNCH("sparse_attn_v (sum of the parts)");
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl(kOp, &NamedOp<kOp, &sparse_attn_v_cuda>::call); }

}  // namespace kcache_ops
