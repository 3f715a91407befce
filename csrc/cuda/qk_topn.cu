// kcache_ops::qk_topn on CUDA: checks, device guard, current stream, scratch allocation, dtype /
// head-dim / group dispatch, and the launches of qk_topn_kernel.cuh as qk_topn_launch.h plans them
// (scores; the select, which in group mode writes the group mass first and whose blocks merge
// the slices of a row split over several). No host synchronisation except the seq_lens range
// check, which check_values=False skips (launch_utils.h).
#include <tuple>
#include <type_traits>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "qk_topn_launch.h"
#include "../named_op.h"
#include "../shape_checks.h"
#include "utils.cuh"

namespace kcache_ops {
namespace {

constexpr char kOp[] = "qk_topn";  // first in each error the op raises (named_op.h)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_topn_cuda(
    const at::Tensor& q,         // [B, Hq, D], CUDA
    const at::Tensor& k_cache,   // [B, Hkv, S, D], CUDA, same dtype
    const at::Tensor& seq_lens,  // [B] int32, CUDA
    int64_t n, double scale, bool group_select, bool check_values, bool return_scores,
    int64_t skip_first, int64_t skip_last, double top_p) {
  const QkTopnDims dims =
      check_qk_topn_args(q, k_cache, seq_lens, n, scale, skip_first, skip_last, top_p);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  KC_CHECK_DEVICE(k_cache, q.device());
  KC_CHECK_DEVICE(seq_lens, q.device());
  check_vec16_aligned(k_cache, "k_cache");
  check_element_aligned({{"q", &q}, {"seq_lens", &seq_lens}});
  TORCH_CHECK(n <= kMaxTopN, "n must be at most ", kMaxTopN, " on CUDA, got ", n);
  TORCH_CHECK(!group_select || dims.G <= kMaxGroupSelect, "group_select supports at most ",
              kMaxGroupSelect, " query heads per KV head, got ", dims.G);
  // S <= 2^30: a chunk's end and the keys staged ahead of a block's loop stay ints (at S near
  // 2^31 they wrapped), with room to spare
  TORCH_CHECK(dims.S <= (int64_t{1} << 30) && dims.B < 65536 && dims.Hq < 65536,
              "sizes out of range for the CUDA kernels (B, Hq < 65536, S <= 2^30): B=",
              dims.B, ", Hq=", dims.Hq, ", S=", dims.S);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({dims.B, dims.Hq, n}, fopts);                  // [B, Hq, N]
  at::Tensor indices = at::empty({dims.B, dims.Hq, n}, fopts.dtype(at::kInt)); // [B, Hq, N]
  at::Tensor lse = at::empty({dims.B, dims.Hq}, fopts);                        // [B, Hq]
  // every score: the score pass's scratch [B, Hq, S rounded up to 4] seen as [B, Hq, S]
  at::Tensor scratch = at::empty({dims.B, dims.Hq, qk_score_stride(dims.S)}, fopts);
  at::Tensor all_scores = return_scores ? scratch.narrow(2, 0, dims.S) : at::empty({0}, fopts);
  // the values first, as on the CPU: seq_lens [B] holds lengths where Hq == 0 leaves no work
  if (check_values && should_validate_values(stream))
    check_seq_lens_on_device(seq_lens, dims.S);
  if (dims.B == 0 || dims.Hq == 0) return {scores, indices, lse, all_scores};

  const QkTopnArgs args = qk_topn_args(q, k_cache, seq_lens, scores, indices, lse, n, scale,
                                       group_select, skip_first, skip_last, top_p);
  const QkTopnPlan plan = plan_qk_topn(args, multiprocessor_count(q.get_device()));
  // [B, Hq, num_chunks] (max, sumexp) pairs
  at::Tensor partials = at::empty({dims.B, dims.Hq, plan.num_chunks, 2}, fopts);
  auto* partials_ptr = reinterpret_cast<MaxSum*>(partials.data_ptr<float>());
  // [B, ranked rows] the select's counters of finished slices (zeroed by the score pass)
  at::Tensor slices_done = at::empty({plan.select_rows}, fopts.dtype(at::kInt));

  if (plan.num_chunks > 0) {
    const QkScoresParams p = qk_scores_params(args, plan, scratch.data_ptr<float>(), partials_ptr,
                                              slices_done.data_ptr<int>());
    dispatch_kernel_instance(q.scalar_type(), dims.D, plan.group_slice,
                             [&](auto type_tag, auto d_tag, auto gs_tag) {
      using T = std::remove_pointer_t<decltype(type_tag)>;
      qk_scores_kernel<T, decltype(d_tag)::value, decltype(gs_tag)::value>
          <<<to_dim3(plan.scores_grid), plan.scores_block, 0, stream>>>(p);
      KC_CHECK_LAUNCH("qk_topn (scores)");
    });
  }
  // [B, Hkv, score_stride] the group mass's ranking keys, uint32 (group mode, else empty)
  at::Tensor mass_keys = at::empty({plan.mass_keys}, fopts.dtype(at::kInt));
  // [B, ranked rows, select_slices, n] unsigned 64-bit picks of a split select (else empty)
  at::Tensor picks = at::empty({plan.pick_count}, fopts.dtype(at::kLong));
  const QkSelectParams sp =
      qk_select_params(args, plan, scratch.data_ptr<float>(), partials_ptr,
                       reinterpret_cast<uint32_t*>(mass_keys.data_ptr<int32_t>()),
                       reinterpret_cast<unsigned long long*>(picks.data_ptr<int64_t>()),
                       slices_done.data_ptr<int>());
  qk_select_kernel<<<to_dim3(plan.select_grid), plan.select_block, 0, stream>>>(sp);
  KC_CHECK_LAUNCH("qk_topn (select)");
  return {scores, indices, lse, all_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl(kOp, &NamedOp<kOp, &qk_topn_cuda>::call); }

}  // namespace kcache_ops
