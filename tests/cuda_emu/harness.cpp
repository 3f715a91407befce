// The kernels of csrc/cuda/*_kernel.cuh, compiled unmodified against the stand-in CUDA headers of
// include/, and the launches of csrc/cuda/*.cu (grid and chunk sizing, parameter packing) on the
// tensors of a case. The only translation unit that holds kernel code: its static data is the
// kernels' __shared__ memory (shared.ld), and it is the one compiled with the access
// instrumentation that feeds the race check of runtime.cpp.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "case.h"
#include "gather_rows_kernel.cuh"
#include "qk_topn_kernel.cuh"
#include "selftest_kernels.cuh"
#include "sparse_attn_v_kernel.cuh"

namespace emu {
namespace {

using kcache_ops::ceil_div;

// The launchers' dispatch (csrc/cuda/launch_utils.h): dtype, head dim, query heads per block.
template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kF32: return f(static_cast<float*>(nullptr));
    case DType::kF16: return f(static_cast<__half*>(nullptr));
    case DType::kBF16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: throw std::runtime_error("dtype must be float32, float16 or bfloat16");
  }
}

template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  if (d == 64) return f(std::integral_constant<int, 64>{});
  if (d == 128) return f(std::integral_constant<int, 128>{});
  throw std::runtime_error("head dim must be 64 or 128, got " + std::to_string(d));
}

template <typename F>
void dispatch_group_slice(int64_t g, F&& f) {
  if (g <= 4) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 8>{});
}

// csrc/cuda/qk_topn.cu: keys per block of the score pass.
int score_chunk(int64_t s, int64_t blocks_per_chunk, int sms) {
  const int64_t want_chunks = ceil_div<int64_t>(4 * sms, blocks_per_chunk);
  const int64_t chunk = ceil_div<int64_t>(ceil_div<int64_t>(s, want_chunks), 256) * 256;
  return static_cast<int>(std::max<int64_t>(chunk, 512));
}

Outputs run_qk_topn(const Case& c) {
  const Tensor& q = c.input("q");               // [B, Hq, D]
  const Tensor& k = c.input("k_cache");         // [B, Hkv, S, D]
  const Tensor& seq_lens = c.input("seq_lens");  // [B] int32
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  const int64_t n = static_cast<int64_t>(c.scalar("n"));
  const bool group_select = c.scalar("group_select") != 0;
  const int sms = static_cast<int>(c.scalar("sms"));
  Tensor scores = make_tensor(DType::kF32, {B, Hq, n}, 0xff);   // [B, Hq, N], NaN
  Tensor indices = make_tensor(DType::kI32, {B, Hq, n}, 0x7f);  // [B, Hq, N]
  Tensor lse = make_tensor(DType::kF32, {B, Hq}, 0xff);         // [B, Hq], NaN
  if (B == 0 || Hq == 0) return {{"scores", scores}, {"indices", indices}, {"lse", lse}};
  const int64_t g = Hq / Hkv;
  dispatch_group_slice(g, [&](auto gs_tag) {
    constexpr int GS = decltype(gs_tag)::value;
    const int slices = static_cast<int>(ceil_div<int64_t>(g, GS));
    const int chunk = score_chunk(S, B * Hkv * slices, sms);
    const int num_chunks = static_cast<int>(ceil_div<int64_t>(S, chunk));
    const int64_t score_stride = ceil_div<int64_t>(S, 4) * 4;
    Tensor scratch = make_tensor(DType::kF32, {B, Hq, score_stride}, 0xff);  // [B, Hq, stride]
    Tensor partials = make_tensor(DType::kF32, {B, Hq, num_chunks, 2}, 0xff);  // (max, sumexp)
    if (num_chunks > 0) {
      dispatch_dtype(q.dtype, [&](auto type_tag) {
        using T = std::remove_pointer_t<decltype(type_tag)>;
        dispatch_head_dim(D, [&](auto d_tag) {
          constexpr int kD = decltype(d_tag)::value;
          kcache_ops::QkScoresParams p{
              q.data(), q.stride(0), q.stride(1), k.data(), k.stride(0), k.stride(1), k.stride(2),
              static_cast<const int32_t*>(seq_lens.data()), seq_lens.stride(0),
              static_cast<float*>(scratch.data()),
              static_cast<kcache_ops::MaxSum*>(partials.data()), score_stride,
              static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(S), chunk, num_chunks,
              slices, static_cast<float>(c.scalar("scale"))};
          const dim3 grid(num_chunks, static_cast<unsigned>(Hkv * slices), static_cast<unsigned>(B));
          launch(grid, dim3(kcache_ops::kScoreThreads), "qk_scores_kernel",
                 [&] { kcache_ops::qk_scores_kernel<T, kD, GS>(p); });
        });
      });
    }
    kcache_ops::QkSelectParams sp{
        static_cast<const float*>(scratch.data()),
        static_cast<const kcache_ops::MaxSum*>(partials.data()), score_stride,
        static_cast<const int32_t*>(seq_lens.data()), seq_lens.stride(0),
        static_cast<float*>(scores.data()), static_cast<int32_t*>(indices.data()),
        static_cast<float*>(lse.data()), static_cast<int>(Hq), static_cast<int>(Hkv),
        static_cast<int>(S), static_cast<int>(n), num_chunks, group_select};
    const dim3 grid(static_cast<unsigned>(group_select ? Hkv : Hq), static_cast<unsigned>(B));
    launch(grid, dim3(kcache_ops::kSelectThreads), "qk_select_kernel",
           [&] { kcache_ops::qk_select_kernel(sp); });
  });
  return {{"scores", scores}, {"indices", indices}, {"lse", lse}};
}

Outputs run_sparse_attn_v(const Case& c) {
  const Tensor& scores = c.input("scores");    // [B, Hq, N] float32
  const Tensor& indices = c.input("indices");  // [B, Hq, N] int32
  const Tensor& v = c.input("v_cache");        // [B, Hkv, S, D]
  const bool renormalize = c.scalar("renormalize") != 0;
  const int64_t B = scores.size(0), Hq = scores.size(1), N = scores.size(2);
  const int64_t Hkv = v.size(1), S = v.size(2), D = v.size(3);
  Tensor out = make_tensor(v.dtype, {B, Hq, D}, 0xff);  // [B, Hq, D], NaN
  if (out.numel() == 0) return {{"out", out}};
  const Tensor* lse = c.has_input("lse") ? &c.input("lse") : nullptr;  // [B, Hq] float32
  if (!renormalize && !lse) throw std::runtime_error("lse is required when renormalize=False");
  const float* lse_ptr = renormalize ? nullptr : static_cast<const float*>(lse->data());
  const int64_t lse_sb = renormalize ? 0 : lse->stride(0), lse_sh = renormalize ? 0 : lse->stride(1);
  const int64_t g = Hq / Hkv;
  dispatch_group_slice(g, [&](auto gs_tag) {
    constexpr int GS = decltype(gs_tag)::value;
    const int slices = static_cast<int>(ceil_div<int64_t>(g, GS));
    dispatch_dtype(v.dtype, [&](auto type_tag) {
      using T = std::remove_pointer_t<decltype(type_tag)>;
      dispatch_head_dim(D, [&](auto d_tag) {
        constexpr int kD = decltype(d_tag)::value;
        kcache_ops::SparseAttnParams p{
            static_cast<const float*>(scores.data()), scores.stride(0), scores.stride(1),
            scores.stride(2), static_cast<const int32_t*>(indices.data()), indices.stride(0),
            indices.stride(1), indices.stride(2), v.data(), v.stride(0), v.stride(1), v.stride(2),
            lse_ptr, lse_sb, lse_sh, out.data(), static_cast<int>(Hq), static_cast<int>(Hkv),
            static_cast<int>(S), static_cast<int>(N), slices, renormalize};
        const dim3 grid(static_cast<unsigned>(Hkv * slices), static_cast<unsigned>(B));
        launch(grid, dim3(kcache_ops::kAttnThreads), "sparse_attn_v_kernel",
               [&] { kcache_ops::sparse_attn_v_kernel<T, kD, GS>(p); });
      });
    });
  });
  return {{"out", out}};
}

Outputs run_gather_rows(const Case& c) {
  const Tensor& src = c.input("src");          // [B, Hs, S, D]
  const Tensor& indices = c.input("indices");  // [B, H, N] int32
  const int64_t B = indices.size(0), H = indices.size(1), N = indices.size(2);
  const int64_t Hs = src.size(1), S = src.size(2), D = src.size(3);
  Tensor dst = make_tensor(src.dtype, {B, H, N, D}, 0xff);  // [B, H, N, D]
  if (dst.numel() == 0) return {{"dst", dst}};
  const int64_t esize = static_cast<int64_t>(dtype_size(src.dtype));
  kcache_ops::GatherParams p{
      static_cast<const char*>(src.data()), src.stride(0) * esize, src.stride(1) * esize,
      src.stride(2) * esize, static_cast<const int32_t*>(indices.data()), indices.stride(0),
      indices.stride(1), indices.stride(2), static_cast<uint4*>(dst.data()),
      dst.numel() * esize / 16, static_cast<int>(H), static_cast<int>(N),
      static_cast<int>(H / Hs), static_cast<int>(S), static_cast<int>(D * esize / 16)};
  const int64_t blocks =
      ceil_div<int64_t>(p.total, kcache_ops::kGatherThreads * kcache_ops::kGatherUnroll);
  launch(dim3(static_cast<unsigned>(blocks)), dim3(kcache_ops::kGatherThreads),
         "gather_rows_kernel", [&] { kcache_ops::gather_rows_kernel(p); });
  return {{"dst", dst}};
}

// The emulator's own checks (selftest_kernels.cuh), by name.
Outputs run_selftest(const Case& c) {
  const std::pair<const char*, void (*)(int*)> kKernels[] = {
      {"clean", emu_selftest::clean},
      {"partial_warp", emu_selftest::partial_warp},
      {"barrier_after_exit", emu_selftest::barrier_after_exit},
      {"divergent_barrier", emu_selftest::divergent_barrier},
      {"missing_barrier", emu_selftest::missing_barrier},
      {"stale_shared", emu_selftest::stale_shared}};
  const auto& [name, kernel] = kKernels[static_cast<int>(c.scalar("kernel"))];
  Tensor out = make_tensor(DType::kI32, {2, 64}, 0x7f);  // [blocks, threads]
  int* o = static_cast<int*>(out.data());
  launch(dim3(2), dim3(64), name, [&] { kernel(o); });
  return {{"out", out}};
}

}  // namespace

Outputs run_case(const Case& c) {
  if (c.op == "selftest") return run_selftest(c);
  if (c.op == "qk_topn") return run_qk_topn(c);
  if (c.op == "sparse_attn_v") return run_sparse_attn_v(c);
  if (c.op == "gather_rows") return run_gather_rows(c);
  throw std::runtime_error("unknown op " + c.op);
}

}  // namespace emu
