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
#include "shape_checks.h"
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
  const QkDims dims = check_qk_topn_args(q, k_cache, seq_lens, n);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  KC_CHECK_DEVICE(k_cache, q.device());
  KC_CHECK_DEVICE(seq_lens, q.device());
  check_vec16_aligned(k_cache, kOp, "k_cache");
  TORCH_CHECK(n <= kMaxTopN, "n must be at most ", kMaxTopN, " on CUDA, got ", n);
  const int64_t g = dims.hq / dims.hkv;
  TORCH_CHECK(!group_select || g <= kMaxGroupSelect, "group_select supports at most ",
              kMaxGroupSelect, " query heads per KV head, got ", g);
  TORCH_CHECK(dims.s < (int64_t{1} << 31) && dims.b < 65536 && dims.hq < 65536,
              "qk_topn: sizes out of range for the CUDA kernels: B=", dims.b, ", Hq=", dims.hq,
              ", S=", dims.s);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({dims.b, dims.hq, n}, fopts);                  // [B, Hq, N]
  at::Tensor indices = at::empty({dims.b, dims.hq, n}, fopts.dtype(at::kInt)); // [B, Hq, N]
  at::Tensor lse = at::empty({dims.b, dims.hq}, fopts);                        // [B, Hq]
  if (dims.b == 0 || dims.hq == 0) return {scores, indices, lse};
  if (should_validate_values(stream))
    check_values_in_range(seq_lens, 0, dims.s, kOp, "seq_lens (valid keys per sequence)");

  dispatch_group_slice(g, [&](auto gs_tag) {
    constexpr int GS = decltype(gs_tag)::value;
    const int slices = static_cast<int>(ceil_div<int64_t>(g, GS));
    const int chunk = score_chunk(dims.s, dims.b * dims.hkv * slices,
                                  multiprocessor_count(q.get_device()));
    const int num_chunks = static_cast<int>(ceil_div<int64_t>(dims.s, chunk));
    const int64_t score_stride = ceil_div<int64_t>(dims.s, 4) * 4;  // 16-byte aligned rows
    at::Tensor scratch = at::empty({dims.b, dims.hq, score_stride}, fopts);  // [B, Hq, stride]
    // [B, Hq, num_chunks] (max, sumexp) pairs
    at::Tensor partials = at::empty({dims.b, dims.hq, num_chunks, 2}, fopts);
    if (num_chunks > 0) {
      dispatch_float_dtype(q.scalar_type(), kOp, [&](auto type_tag) {
        using T = std::remove_pointer_t<decltype(type_tag)>;
        dispatch_head_dim(dims.d, kOp, [&](auto d_tag) {
          constexpr int D = decltype(d_tag)::value;
          QkScoresParams p{q.data_ptr(), q.stride(0), q.stride(1),
                           k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                           k_cache.stride(2), seq_lens.data_ptr<int32_t>(), seq_lens.stride(0),
                           scratch.data_ptr<float>(),
                           reinterpret_cast<MaxSum*>(partials.data_ptr<float>()), score_stride,
                           static_cast<int>(dims.hq), static_cast<int>(dims.hkv),
                           static_cast<int>(dims.s), chunk, num_chunks, slices,
                           static_cast<float>(scale)};
          const dim3 grid(num_chunks, static_cast<unsigned>(dims.hkv * slices),
                          static_cast<unsigned>(dims.b));
          qk_scores_kernel<T, D, GS><<<grid, kScoreThreads, 0, stream>>>(p);
          KC_CHECK_LAUNCH("qk_topn (scores)");
        });
      });
    }
    QkSelectParams sp{scratch.data_ptr<float>(),
                      reinterpret_cast<const MaxSum*>(partials.data_ptr<float>()), score_stride,
                      seq_lens.data_ptr<int32_t>(), seq_lens.stride(0),
                      scores.data_ptr<float>(), indices.data_ptr<int32_t>(), lse.data_ptr<float>(),
                      static_cast<int>(dims.hq), static_cast<int>(dims.hkv),
                      static_cast<int>(dims.s), static_cast<int>(n), num_chunks, group_select};
    const dim3 grid(static_cast<unsigned>(group_select ? dims.hkv : dims.hq),
                    static_cast<unsigned>(dims.b));
    qk_select_kernel<<<grid, kSelectThreads, 0, stream>>>(sp);
    KC_CHECK_LAUNCH("qk_topn (select)");
  });
  return {scores, indices, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CUDA, m) { m.impl("qk_topn", &qk_topn_cuda); }

}  // namespace kcache_ops
