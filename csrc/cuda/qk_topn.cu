// kcache_ops::qk_topn on CUDA: checks, device guard, current stream, dtype / head-dim / group
// dispatch, and the two launches of qk_topn_kernel.cuh. No host synchronisation except the optional
// seq_lens range check outside graph capture (launch_utils.h).
#include <algorithm>
#include <tuple>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "qk_topn_kernel.cuh"
#include "../shape_checks.h"
#include "utils.cuh"

namespace kcache_ops {
namespace {

// Keys per block of the score pass: at least 4 blocks per multiprocessor over the whole grid, at
// least 512 keys per block (a multiple of every kernel's keys per iteration).
int score_chunk(int64_t s, int64_t blocks_per_chunk, int sms) {
  const int64_t want_chunks = ceil_div<int64_t>(4 * sms, blocks_per_chunk);
  const int64_t chunk = ceil_div<int64_t>(ceil_div<int64_t>(s, want_chunks), 256) * 256;
  return static_cast<int>(std::max<int64_t>(chunk, 512));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_topn_cuda(
    const at::Tensor& q,         // [B, Hq, D], CUDA
    const at::Tensor& k_cache,   // [B, Hkv, S, D], CUDA, same dtype
    const at::Tensor& seq_lens,  // [B] int32, CUDA
    int64_t n, double scale, bool group_select) {
  constexpr const char* kOp = "qk_topn";
  const QkTopnDims dims = check_qk_topn_args(q, k_cache, seq_lens, n);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  KC_CHECK_DEVICE(k_cache, q.device());
  KC_CHECK_DEVICE(seq_lens, q.device());
  check_vec16_aligned(k_cache, kOp, "k_cache");
  TORCH_CHECK(n <= kMaxTopN, "n must be at most ", kMaxTopN, " on CUDA, got ", n);
  const int64_t g = dims.Hq / dims.Hkv;
  TORCH_CHECK(!group_select || g <= kMaxGroupSelect, "group_select supports at most ",
              kMaxGroupSelect, " query heads per KV head, got ", g);
  TORCH_CHECK(dims.S < (int64_t{1} << 31) && dims.B < 65536 && dims.Hq < 65536,
              "qk_topn: sizes out of range for the CUDA kernels: B=", dims.B, ", Hq=", dims.Hq,
              ", S=", dims.S);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({dims.B, dims.Hq, n}, fopts);                  // [B, Hq, N]
  at::Tensor indices = at::empty({dims.B, dims.Hq, n}, fopts.dtype(at::kInt)); // [B, Hq, N]
  at::Tensor lse = at::empty({dims.B, dims.Hq}, fopts);                        // [B, Hq]
  if (dims.B == 0 || dims.Hq == 0) return {scores, indices, lse};
  if (should_validate_values(stream))
    check_seq_lens_on_device(seq_lens, dims.S);

  dispatch_group_slice(g, [&](auto gs_tag) {
    constexpr int GS = decltype(gs_tag)::value;
    const int slices = static_cast<int>(ceil_div<int64_t>(g, GS));
    const int chunk = score_chunk(dims.S, dims.B * dims.Hkv * slices,
                                  multiprocessor_count(q.get_device()));
    const int num_chunks = static_cast<int>(ceil_div<int64_t>(dims.S, chunk));
    const int64_t score_stride = ceil_div<int64_t>(dims.S, 4) * 4;  // 16-byte aligned rows
    at::Tensor scratch = at::empty({dims.B, dims.Hq, score_stride}, fopts);  // [B, Hq, stride]
    // [B, Hq, num_chunks] (max, sumexp) pairs
    at::Tensor partials = at::empty({dims.B, dims.Hq, num_chunks, 2}, fopts);
    if (num_chunks > 0) {
      dispatch_float_dtype(q.scalar_type(), kOp, [&](auto type_tag) {
        using T = std::remove_pointer_t<decltype(type_tag)>;
        dispatch_head_dim(dims.D, kOp, [&](auto d_tag) {
          constexpr int D = decltype(d_tag)::value;
          QkScoresParams p{q.data_ptr(), q.stride(0), q.stride(1),
                           k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                           k_cache.stride(2), seq_lens.data_ptr<int32_t>(), seq_lens.stride(0),
                           scratch.data_ptr<float>(),
                           reinterpret_cast<MaxSum*>(partials.data_ptr<float>()), score_stride,
                           static_cast<int>(dims.Hq), static_cast<int>(dims.Hkv),
                           static_cast<int>(dims.S), chunk, num_chunks, slices,
                           static_cast<float>(scale)};
          const dim3 grid(num_chunks, static_cast<unsigned>(dims.Hkv * slices),
                          static_cast<unsigned>(dims.B));
          qk_scores_kernel<T, D, GS><<<grid, kScoreThreads, 0, stream>>>(p);
          KC_CHECK_LAUNCH("qk_topn (scores)");
        });
      });
    }
    QkSelectParams sp{scratch.data_ptr<float>(),
                      reinterpret_cast<const MaxSum*>(partials.data_ptr<float>()), score_stride,
                      seq_lens.data_ptr<int32_t>(), seq_lens.stride(0),
                      scores.data_ptr<float>(), indices.data_ptr<int32_t>(), lse.data_ptr<float>(),
                      static_cast<int>(dims.Hq), static_cast<int>(dims.Hkv),
                      static_cast<int>(dims.S), static_cast<int>(n), num_chunks, group_select};
    const dim3 grid(static_cast<unsigned>(group_select ? dims.Hkv : dims.Hq),
                    static_cast<unsigned>(dims.B));
    qk_select_kernel<<<grid, kSelectThreads, 0, stream>>>(sp);
    KC_CHECK_LAUNCH("qk_topn (select)");
  });
  return {scores, indices, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl("qk_topn", &qk_topn_cuda); }

}  // namespace kcache_ops
