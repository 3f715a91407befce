// kcache_ops::lowbit_tail on CUDA: checks, device guard, current stream, the partials' allocation,
// head-dim / group dispatch, and the launches (one, or two when the keys take several
// chunks) of lowbit_tail_kernel.cuh as lowbit_tail_launch.h plans them. No host synchronisation
// except the seq_lens / index range checks, which check_values=False skips (launch_utils.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "lowbit_tail_launch.h"
#include "../named_op.h"
#include "../shape_checks.h"
#include "utils.cuh"

namespace kcache_ops {
namespace {

constexpr char kOp[] = "lowbit_tail";  // first in each error the op raises (named_op.h)

at::Tensor lowbit_tail_cuda(const at::Tensor& scores,    // [B, Hq, S] float32, CUDA
                            const at::Tensor& seq_lens,  // [B] int32, CUDA
                            const at::Tensor& lse,       // [B, Hq] float32, CUDA
                            const at::Tensor& indices,   // [B, Hq, N] int32, CUDA
                            const at::Tensor& v_codes,   // [B, Hkv, S, D * bits / 8] uint8, CUDA
                            const at::Tensor& v_meta,    // [B, Hkv, S, 2] bfloat16, CUDA
                            int64_t bits, bool check_values, int64_t skip_first,
                            int64_t skip_last,
                            const std::optional<at::Tensor>& hot_v_arg,     // [B, Hkv, H, D]
                            const std::optional<at::Tensor>& hot_pos_arg) {  // [B, H] int32
  const LowbitTailDims dims = check_lowbit_tail_args(scores, seq_lens, lse, indices, v_codes,
                                                     v_meta, bits, skip_first, skip_last);
  const int64_t H = check_hot_rows(hot_v_arg, hot_pos_arg, dims);
  const at::Tensor hot_v = hot_v_arg.value_or(at::Tensor());      // undefined: none
  const at::Tensor hot_pos = hot_pos_arg.value_or(at::Tensor());
  TORCH_CHECK(scores.is_cuda(), "scores must be a CUDA tensor, got ", scores.device());
  KC_CHECK_DEVICE(seq_lens, scores.device());
  KC_CHECK_DEVICE(lse, scores.device());
  KC_CHECK_DEVICE(indices, scores.device());
  KC_CHECK_DEVICE(v_codes, scores.device());
  KC_CHECK_DEVICE(v_meta, scores.device());
  if (hot_v.defined()) {  // given (checked with hot_pos even when it has no row, as the fake is)
    KC_CHECK_DEVICE(hot_v, scores.device());
    KC_CHECK_DEVICE(hot_pos, scores.device());
  }
  check_vec16_aligned(v_codes, "v_codes");
  check_element_aligned({{"scores", &scores}, {"seq_lens", &seq_lens}, {"lse", &lse},
                         {"indices", &indices}, {"hot_v", &hot_v}, {"hot_pos", &hot_pos}});
  bool meta_aligned = reinterpret_cast<uintptr_t>(v_meta.data_ptr()) % 4 == 0;
  for (int64_t i = 0; i < 3; ++i)
    meta_aligned = meta_aligned && (v_meta.size(i) <= 1 || v_meta.stride(i) % 2 == 0);
  TORCH_CHECK(meta_aligned || v_meta.numel() == 0, "v_meta rows must be 4-byte aligned "
              "(data pointer and every stride but the last a multiple of 4 bytes), got strides ",
              v_meta.strides());
  // N < 2^24: a block's entry count (its heads · N) is an int; S <= 2^30: a chunk's end and
  // the keys staged ahead stay ints (at S near 2^31 they wrapped)
  TORCH_CHECK(dims.S <= (int64_t{1} << 30) && dims.B < 65536 && dims.Hq < 65536 &&
                  dims.N < (int64_t{1} << 24),
              "sizes out of range for the CUDA kernels (B, Hq < 65536, S <= 2^30, "
              "N < 2^24): B=", dims.B, ", Hq=", dims.Hq, ", S=", dims.S, ", N=", dims.N);
  TORCH_CHECK(H < (int64_t{1} << 30), "hot_v rows out of range for the CUDA "
              "kernels (below 2^30): H=", H);

  const c10::cuda::CUDAGuard guard(scores.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = scores.options();
  at::Tensor out = at::empty({dims.B, dims.Hq, dims.D}, fopts);  // [B, Hq, D]
  if (check_values && should_validate_values(stream)) {  // as on the CPU, even with no output
    check_seq_lens_on_device(seq_lens, dims.S, "v_codes");
    check_indices_on_device(indices, dims.S, "v_codes");
    if (H > 0) check_indices_on_device(hot_pos, dims.S, "v_codes", "hot_pos", "an empty slot");
  }
  if (out.numel() == 0) return out;

  const at::ScalarType hot_type = H > 0 ? hot_v.scalar_type() : at::kFloat;
  const LowbitTailArgs args = lowbit_tail_args(
      scores, seq_lens, lse, indices, v_codes, v_meta, dims.bits, skip_first, skip_last, out,
      H > 0 ? &hot_v : nullptr, H > 0 ? &hot_pos : nullptr,
      hot_type == at::kFloat ? 0 : hot_type == at::kHalf ? 1 : 2);  // the kernel's hot_element
  // the instance this call launches, and how many of its blocks fit on a multiprocessor
  const int group_slice = group_slice_width(dims.G);
  int blocks_per_sm = kTailBlocksPerSm;
  dispatch_tail_instance(dims.D, group_slice, dims.bits,
                         [&](auto d_tag, auto gs_tag, auto bits_tag) {
    blocks_per_sm = resident_blocks_per_sm(
        reinterpret_cast<const void*>(lowbit_tail_kernel<decltype(d_tag)::value,
                                                         decltype(gs_tag)::value,
                                                         decltype(bits_tag)::value>),
        kTailThreads);
  });
  const LowbitTailPlan plan =
      plan_lowbit_tail(args, multiprocessor_count(scores.get_device()), blocks_per_sm);
  if (plan.num_chunks == 0) return out.zero_();  // S = 0: no key
  at::Tensor partials = at::empty({plan.partial_floats}, fopts);  // [B, Hq, num_chunks, D]
  const LowbitTailParams p = lowbit_tail_params(args, plan, partials.data_ptr<float>());
  dispatch_tail_instance(dims.D, plan.group_slice, dims.bits,
                         [&](auto d_tag, auto gs_tag, auto bits_tag) {
    lowbit_tail_kernel<decltype(d_tag)::value, decltype(gs_tag)::value, decltype(bits_tag)::value>
        <<<to_dim3(plan.tail_grid), plan.tail_block, 0, stream>>>(p);
    KC_CHECK_LAUNCH("lowbit_tail");
  });
  if (plan.num_chunks > 1) {
    const SumPartialsPlan sum = lowbit_tail_sum_plan(args, plan, partials.data_ptr<float>());
    sum_partials_kernel<float><<<to_dim3(sum.grid), sum.block, 0, stream>>>(sum.params);
    KC_CHECK_LAUNCH("lowbit_tail (sum of the chunks)");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl(kOp, &NamedOp<kOp, &lowbit_tail_cuda>::call); }

}  // namespace kcache_ops
