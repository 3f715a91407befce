// The kernels of csrc/cuda/*_kernel.cuh, compiled unmodified against the stand-in CUDA headers of
// include/, launched on the tensors of a case through the launchers' own arithmetic (grid and chunk
// sizing, parameter packing: csrc/cuda/*_launch.h), with the launchers' dispatch over dtype, head
// dim and group slice repeated here (launch_utils.h holds it next to torch). The only translation
// unit that holds kernel code: its static data is the kernels' __shared__ memory (shared.ld), and
// it is the one compiled with the access instrumentation that feeds the race check of runtime.cpp.
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "case.h"
#include "gather_rows_launch.h"
#include "lowbit_tail_launch.h"
#include "qk_topn_launch.h"
#include "quantize_rows_launch.h"
#include "reuse_rows_launch.h"
#include "selftest_kernels.cuh"
#include "sparse_attn_v_launch.h"

namespace emu {
namespace {

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
void dispatch_group_slice(int group_slice, F&& f) {
  if (group_slice == 4) return f(std::integral_constant<int, 4>{});
  if (group_slice == 8) return f(std::integral_constant<int, 8>{});
  throw std::runtime_error("group slice must be 4 or 8, got " + std::to_string(group_slice));
}

template <typename F>
void dispatch_code_bits(int64_t bits, F&& f) {
  if (bits == 2) return f(std::integral_constant<int, 2>{});
  if (bits == 4) return f(std::integral_constant<int, 4>{});
  throw std::runtime_error("bits must be 2 or 4, got " + std::to_string(bits));
}

// f(type_tag, d_tag, gs_tag) for a kernel templated on <T, D, GS>: the three dispatches above
// nested, as csrc/cuda/launch_utils.h's dispatch_kernel_instance does for the launchers.
template <typename F>
void dispatch_kernel_instance(DType dtype, int64_t d, int group_slice, F&& f) {
  dispatch_group_slice(group_slice, [&](auto gs_tag) {
    dispatch_dtype(dtype, [&](auto type_tag) {
      dispatch_head_dim(d, [&](auto d_tag) { f(type_tag, d_tag, gs_tag); });
    });
  });
}

dim3 to_dim3(const kcache_ops::GridSize& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

Outputs run_qk_topn(const Case& c) {
  const Tensor& q = c.input("q");               // [B, Hq, D]
  const Tensor& k = c.input("k_cache");         // [B, Hkv, S, D]
  const Tensor& seq_lens = c.input("seq_lens");  // [B] int32
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t n = static_cast<int64_t>(c.scalar("n"));
  Tensor scores = make_tensor(DType::kF32, {B, Hq, n}, 0xff);   // [B, Hq, N], NaN
  Tensor indices = make_tensor(DType::kI32, {B, Hq, n}, 0x7f);  // [B, Hq, N]
  Tensor lse = make_tensor(DType::kF32, {B, Hq}, 0xff);         // [B, Hq], NaN
  if (B == 0 || Hq == 0) return {{"scores", scores}, {"indices", indices}, {"lse", lse}};
  const kcache_ops::QkTopnArgs args = kcache_ops::qk_topn_args(
      q, k, seq_lens, scores, indices, lse, n, c.scalar("scale"), c.scalar("group_select") != 0,
      static_cast<int64_t>(c.scalar("skip_first", 0)),
      static_cast<int64_t>(c.scalar("skip_last", 0)), c.scalar("top_p", 1.0));
  const kcache_ops::QkTopnPlan plan =
      kcache_ops::plan_qk_topn(args, static_cast<int>(c.scalar("sms")));
  Tensor scratch = make_tensor(DType::kF32, {plan.scratch_floats}, 0xff);     // [B, Hq, stride]
  Tensor partials = make_tensor(DType::kF32, {plan.partial_count, 2}, 0xff);  // [B, Hq, chunks]
  auto* partials_ptr = static_cast<kcache_ops::MaxSum*>(partials.data());
  // [B, ranked rows] the select's counters, poisoned: the score kernel zeroes them
  Tensor slices_done = make_tensor(DType::kI32, {plan.select_rows}, 0x7f);
  auto* done_ptr = static_cast<int*>(slices_done.data());
  if (plan.num_chunks > 0) {
    const kcache_ops::QkScoresParams p = kcache_ops::qk_scores_params(
        args, plan, static_cast<float*>(scratch.data()), partials_ptr, done_ptr);
    dispatch_kernel_instance(q.dtype, D, plan.group_slice,
                             [&](auto type_tag, auto d_tag, auto gs_tag) {
      using T = std::remove_pointer_t<decltype(type_tag)>;
      watch_output(scratch.data(), scratch.bytes, "scores scratch");
      watch_output(partials.data(), partials.bytes, "partials");
      launch(to_dim3(plan.scores_grid), dim3(plan.scores_block), "qk_scores_kernel", [&] {
        kcache_ops::qk_scores_kernel<T, decltype(d_tag)::value, decltype(gs_tag)::value>(p);
      });
    });
  }
  Tensor mass_keys = make_tensor(DType::kI32, {plan.mass_keys}, 0xff);  // [B, Hkv, stride]
  Tensor picks = make_tensor(DType::kI32, {2 * plan.pick_count}, 0xff);  // [B, rows, slices, n]
  const kcache_ops::QkSelectParams sp = kcache_ops::qk_select_params(
      args, plan, static_cast<const float*>(scratch.data()), partials_ptr,
      static_cast<uint32_t*>(mass_keys.data()), static_cast<unsigned long long*>(picks.data()),
      done_ptr);
  auto watch_selection = [&] {
    watch_output(scores.data(), scores.bytes, "scores");
    watch_output(indices.data(), indices.bytes, "indices");
    watch_output(lse.data(), lse.bytes, "lse");
  };
  watch_output(mass_keys.data(), mass_keys.bytes, "group mass keys");
  watch_output(picks.data(), picks.bytes, "picks");
  watch_selection();  // by a row's only block, or the last of its slices
  launch(to_dim3(plan.select_grid), dim3(plan.select_block), "qk_select_kernel",
         [&] { kcache_ops::qk_select_kernel(sp); });
  // the plan's blocks per ranked row and whether their keys are staged, for the tests that ask
  Tensor slices = make_tensor(DType::kI32, {1}, 0);
  *static_cast<int32_t*>(slices.data()) = plan.select_slices;
  Tensor staged = make_tensor(DType::kI32, {1}, 0);
  *static_cast<int32_t*>(staged.data()) = plan.select_staged;
  // the score scratch [B, Hq, score_stride]: what the launcher returns as all_scores
  return {{"scores", scores}, {"indices", indices}, {"lse", lse}, {"scratch", scratch},
          {"select_slices", slices}, {"select_staged", staged}};
}

// Watches what a kernel that sums parts of a row writes: its partials when it splits, else out.
void watch_first_output(bool split, const Tensor& out, const Tensor& partials) {
  if (split) {
    watch_output(partials.data(), partials.bytes, "partials");
  } else {
    watch_output(out.data(), out.bytes, "out");
  }
}

// sum_partials_kernel<T> into out, as the launchers run it after a split kernel.
template <typename T>
void launch_sum_partials(const kcache_ops::SumPartialsPlan& sum, const Tensor& out) {
  watch_output(out.data(), out.bytes, "out");
  launch(to_dim3(sum.grid), dim3(sum.block), "sum_partials_kernel",
         [&] { kcache_ops::sum_partials_kernel<T>(sum.params); });
}

Outputs run_sparse_attn_v(const Case& c) {
  const Tensor& scores = c.input("scores");    // [B, Hq, N] float32
  const Tensor& indices = c.input("indices");  // [B, Hq, N] int32
  const Tensor& v = c.input("v_cache");        // [B, Hkv, S, D]
  const bool renormalize = c.scalar("renormalize") != 0;
  const int64_t B = scores.size(0), Hq = scores.size(1), D = v.size(3);
  Tensor out = make_tensor(v.dtype, {B, Hq, D}, 0xff);  // [B, Hq, D], NaN
  if (out.numel() == 0) return {{"out", out}};
  const Tensor* lse = c.has_input("lse") ? &c.input("lse") : nullptr;  // [B, Hq] float32
  if (!renormalize && !lse) throw std::runtime_error("lse is required when renormalize=False");
  // the mean tail: v_sum [B, Hkv, D] float32 and seq_lens [B] int32, both or neither
  const Tensor* v_sum = c.has_input("v_sum") ? &c.input("v_sum") : nullptr;
  const Tensor* seq_lens = c.has_input("seq_lens") ? &c.input("seq_lens") : nullptr;
  if (!v_sum != !seq_lens) throw std::runtime_error("v_sum and seq_lens must be given together");
  const kcache_ops::SparseAttnVArgs args =
      kcache_ops::sparse_attn_v_args(scores, indices, v.data(), v, lse, renormalize, v_sum,
                                     seq_lens, out);
  const kcache_ops::SparseAttnVPlan plan =
      kcache_ops::plan_sparse_attn_v(args, static_cast<int>(c.scalar("sms")));
  Tensor partials = make_tensor(DType::kF32, {plan.partial_floats}, 0xff);  // [B, Hq, parts, D]
  const kcache_ops::SparseAttnParams p =
      kcache_ops::sparse_attn_v_params(args, plan, static_cast<float*>(partials.data()));
  dispatch_kernel_instance(v.dtype, D, plan.group_slice,
                           [&](auto type_tag, auto d_tag, auto gs_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    watch_first_output(plan.parts > 1, out, partials);
    launch(to_dim3(plan.grid), dim3(plan.block), "sparse_attn_v_kernel", [&] {
      kcache_ops::sparse_attn_v_kernel<T, decltype(d_tag)::value, decltype(gs_tag)::value>(p);
    });
    if (plan.parts > 1) {
      launch_sum_partials<T>(kcache_ops::sparse_attn_v_sum_plan(
          args, plan, static_cast<const float*>(partials.data())), out);
    }
  });
  Tensor parts = make_tensor(DType::kI32, {1}, 0);  // the plan's parts of a slice's row list
  *static_cast<int32_t*>(parts.data()) = plan.parts;
  return {{"out", out}, {"parts", parts}};
}

Outputs run_gather_rows(const Case& c) {
  const Tensor& src = c.input("src");          // [B, Hs, S, D]
  const Tensor& indices = c.input("indices");  // [B, H, N] int32
  const int64_t B = indices.size(0), H = indices.size(1), N = indices.size(2), D = src.size(3);
  Tensor dst = make_tensor(src.dtype, {B, H, N, D}, 0xff);  // [B, H, N, D]
  if (dst.numel() == 0) return {{"dst", dst}};
  const kcache_ops::GatherRowsArgs args = kcache_ops::gather_rows_args(src.data(), src, indices,
                                                                       dst);
  const kcache_ops::GatherRowsPlan plan =
      kcache_ops::plan_gather_rows(args, static_cast<int>(c.scalar("sms")));
  watch_output(dst.data(), dst.bytes, "dst");
  launch(to_dim3(plan.grid), dim3(plan.block), "gather_rows_kernel",
         [&] { kcache_ops::gather_rows_kernel(plan.params); });
  Tensor per_thread = make_tensor(DType::kI32, {1}, 0);  // the plan's pieces per thread
  *static_cast<int32_t*>(per_thread.data()) = plan.params.per_thread;
  return {{"dst", dst}, {"per_thread", per_thread}};
}

// A contiguous copy of `t` (contiguous itself): a tensor an op updates in place.
Tensor updatable_copy(const Tensor& t) {
  Tensor copy = make_tensor(t.dtype, t.sizes, 0xff);
  if (copy.bytes) std::memcpy(copy.data(), t.data(), copy.bytes);
  return copy;
}

Outputs run_reuse_rows(const Case& c) {
  const Tensor& indices = c.input("indices");  // [B, Hq, N] int32
  const Tensor& v = c.input("v_host");         // [B, Hkv, S, D]
  const Tensor& new_pos = c.input("new_pos");  // [B] int32
  const Tensor& step = c.input("step");        // [1] int32
  // the pool, updated: rows [B, Hkv, C, D], held / used [B, Hkv, C] int32 (contiguous inputs)
  Tensor rows = updatable_copy(c.input("rows")), held = updatable_copy(c.input("held"));
  Tensor used = updatable_copy(c.input("used"));
  const int64_t B = indices.size(0), Hq = indices.size(1), N = indices.size(2), Hkv = v.size(1);
  Tensor pool_indices = make_tensor(DType::kI32, {B, Hq, N}, 0x7f);  // [B, Hq, N]
  Tensor counts = make_tensor(DType::kI32, {B, Hkv, 2}, 0x7f);       // [B, Hkv, 2]
  const Outputs outputs = {{"pool_indices", pool_indices}, {"counts", counts}, {"rows", rows},
                           {"held", held}, {"used", used}};
  if (N == 0 || B * Hkv == 0) return outputs;  // the launcher writes zero counts itself
  const kcache_ops::ReuseRowsPlan plan = kcache_ops::plan_reuse_rows(
      indices, v.data(), v, new_pos, rows, held, used, step, pool_indices, counts,
      c.scalar("group_select") != 0);
  for (const auto& [name, t] : outputs) watch_output(t.data(), t.bytes, name.c_str());
  launch(to_dim3(plan.grid), dim3(plan.block), "reuse_rows_kernel",
         [&] { kcache_ops::reuse_rows_kernel(plan.params); });
  return outputs;
}

Outputs run_lowbit_tail(const Case& c) {
  const Tensor& scores = c.input("scores");      // [B, Hq, S] float32
  const Tensor& seq_lens = c.input("seq_lens");  // [B] int32
  const Tensor& lse = c.input("lse");            // [B, Hq] float32
  const Tensor& indices = c.input("indices");    // [B, Hq, N] int32
  // [B, Hkv, S, D * bits / 32] int32: the uint8 codes [B, Hkv, S, D * bits / 8] seen as 4-byte
  // words, as tests/test_cuda_emu.py passes them (lowbit_tail_args takes byte strides from the
  // element size)
  const Tensor& codes = c.input("v_codes_words");
  const Tensor& meta = c.input("v_meta");        // [B, Hkv, S, 2] bfloat16
  const int64_t B = scores.size(0), Hq = scores.size(1);
  const int64_t bits = static_cast<int64_t>(c.scalar("bits"));
  const int64_t D = codes.size(3) * 32 / bits;
  Tensor out = make_tensor(DType::kF32, {B, Hq, D}, 0xff);  // [B, Hq, D], NaN
  if (out.numel() == 0) return {{"out", out}};
  // [B, Hkv, H, D] float32 / float16 / bfloat16, hot_pos [B, H]; or none
  const Tensor* hot_v = c.has_input("hot_v") ? &c.input("hot_v") : nullptr;
  const Tensor* hot_pos = hot_v ? &c.input("hot_pos") : nullptr;  // throws if hot_v comes alone
  const DType hot_type = hot_v ? hot_v->dtype : DType::kF32;
  const kcache_ops::LowbitTailArgs args = kcache_ops::lowbit_tail_args(
      scores, seq_lens, lse, indices, codes, meta, bits,
      static_cast<int64_t>(c.scalar("skip_first", 0)),
      static_cast<int64_t>(c.scalar("skip_last", 0)), out, hot_v, hot_pos,
      hot_type == DType::kF32 ? 0 : hot_type == DType::kF16 ? 1 : 2);
  const kcache_ops::LowbitTailPlan plan =
      kcache_ops::plan_lowbit_tail(args, static_cast<int>(c.scalar("sms")),
                                   kcache_ops::kTailBlocksPerSm);
  if (plan.num_chunks == 0) return {{"out", make_tensor(DType::kF32, {B, Hq, D}, 0)}};  // S = 0
  Tensor partials = make_tensor(DType::kF32, {plan.partial_floats}, 0xff);  // [B, Hq, chunks, D]
  const kcache_ops::LowbitTailParams p =
      kcache_ops::lowbit_tail_params(args, plan, static_cast<float*>(partials.data()));
  watch_first_output(plan.num_chunks > 1, out, partials);
  dispatch_head_dim(D, [&](auto d_tag) {
    dispatch_group_slice(plan.group_slice, [&](auto gs_tag) {
      dispatch_code_bits(bits, [&](auto bits_tag) {
        launch(to_dim3(plan.tail_grid), dim3(plan.tail_block), "lowbit_tail_kernel", [&] {
          kcache_ops::lowbit_tail_kernel<decltype(d_tag)::value, decltype(gs_tag)::value,
                                         decltype(bits_tag)::value>(p);
        });
      });
    });
  });
  if (plan.num_chunks > 1) {
    launch_sum_partials<float>(kcache_ops::lowbit_tail_sum_plan(
        args, plan, static_cast<const float*>(partials.data())), out);
  }
  return {{"out", out}};
}

Outputs run_quantize_rows(const Case& c) {
  const Tensor& v = c.input("v");  // [..., D]
  const int64_t bits = static_cast<int64_t>(c.scalar("bits"));
  std::vector<int64_t> codes_shape = v.sizes, meta_shape = v.sizes;
  codes_shape.back() = v.sizes.back() * bits / 8;
  meta_shape.back() = 2;
  Tensor codes = make_tensor(DType::kU8, codes_shape, 0x7f);  // [..., D * bits / 8]
  Tensor meta = make_tensor(DType::kBF16, meta_shape, 0xff);  // [..., 2], NaN
  if (meta.numel() == 0) return {{"codes", codes}, {"meta", meta}};
  const kcache_ops::QuantizeRowsPlan plan = kcache_ops::plan_quantize_rows({
      .v = v.data(),
      .sizes = v.sizes.data(),
      .strides = v.strides.data(),
      .ndim = static_cast<int64_t>(v.sizes.size()),
      .codes = static_cast<uint8_t*>(codes.data()),
      .meta = meta.data(),
      .bits = bits,
  });
  if (!plan.fits) throw std::runtime_error("v's leading dims do not merge into the kernel's 4 "
                                           "(the launcher copies such a v first)");
  dispatch_dtype(v.dtype, [&](auto type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    kcache_ops::dispatch_quant_bits(bits, [&](auto bits_tag) {
      watch_output(codes.data(), codes.bytes, "codes");
      watch_output(meta.data(), meta.bytes, "meta");
      launch(to_dim3(plan.grid), dim3(plan.block), "quantize_rows_kernel", [&] {
        kcache_ops::quantize_rows_kernel<T, decltype(bits_tag)::value>(plan.params);
      });
    });
  });
  return {{"codes", codes}, {"meta", meta}};
}

// The emulator's own checks (selftest_kernels.cuh), by name.
Outputs run_selftest(const Case& c) {
  const std::pair<const char*, void (*)(int*)> kKernels[] = {
      {"clean", emu_selftest::clean},
      {"partial_warp", emu_selftest::partial_warp},
      {"barrier_after_exit", emu_selftest::barrier_after_exit},
      {"divergent_barrier", emu_selftest::divergent_barrier},
      {"missing_barrier", emu_selftest::missing_barrier},
      {"stale_shared", emu_selftest::stale_shared},
      {"split_warp", emu_selftest::split_warp},
      {"double_write", emu_selftest::double_write},
      {"divergent_warp_sum", emu_selftest::divergent_warp_sum},
      {"divergent_block_scan", emu_selftest::divergent_block_scan},
      {"async_clean", emu_selftest::async_clean},
      {"async_read_before_wait", emu_selftest::async_read_before_wait},
      {"async_newest_group", emu_selftest::async_newest_group},
      {"async_uncommitted", emu_selftest::async_uncommitted},
      {"async_read_other", emu_selftest::async_read_other},
      {"async_misaligned_dst", emu_selftest::async_misaligned_dst},
      {"async_misaligned_src", emu_selftest::async_misaligned_src},
      {"ticket_clean", emu_selftest::ticket_clean},
      {"ticket_unordered", emu_selftest::ticket_unordered},
      {"ticket_unfenced", emu_selftest::ticket_unfenced},
      {"handoff_clean", emu_selftest::handoff_clean},
      {"handoff_unfenced", emu_selftest::handoff_unfenced}};
  const auto& [name, kernel] = kKernels[static_cast<int>(c.scalar("kernel"))];
  Tensor out = make_tensor(DType::kI32, {2, 64}, 0x7f);  // [blocks, threads]
  int* o = static_cast<int*>(out.data());
  watch_output(o, out.bytes, "out");
  launch(dim3(2), dim3(64), name, [&] { kernel(o); });
  return {{"out", out}};
}

// One warp's tensor-core product on the emulator's model (selftest_kernels.cuh's mma_tile): a
// [16, 8], b [8, 8], c [16, 8] float32, contiguous -> d [16, 8].
Outputs run_mma(const Case& c) {
  const Tensor& a = c.input("a");
  const Tensor& b = c.input("b");
  const Tensor& acc = c.input("c");
  Tensor d = make_tensor(DType::kF32, {16, 8}, 0xff);  // NaN
  float* out = static_cast<float*>(d.data());
  watch_output(out, d.bytes, "d");
  launch(dim3(1), dim3(32), "mma_tile", [&] {
    emu_selftest::mma_tile(static_cast<const float*>(a.data()), static_cast<const float*>(b.data()),
                           static_cast<const float*>(acc.data()), out);
  });
  return {{"d", d}};
}

// kernel_utils.cuh's block_bitonic_sort (selftest_kernels.cuh's bitonic_sort): keys [size, 2]
// int32 (64-bit keys as low and high words) -> out [2, size, 2], sorted descending, then ascending.
Outputs run_sort(const Case& c) {
  const Tensor& keys = c.input("keys");
  const int size = static_cast<int>(keys.sizes[0]);
  Tensor out = make_tensor(DType::kI32, {2, size, 2}, 0x7f);
  int* o = static_cast<int*>(out.data());
  watch_output(o, out.bytes, "out");
  launch(dim3(2), dim3(128), "bitonic_sort", [&] {
    emu_selftest::bitonic_sort(static_cast<const int*>(keys.data()), size, o);
  });
  return {{"out", out}};
}

}  // namespace

Outputs run_case(const Case& c) {
  if (c.op == "selftest") return run_selftest(c);
  if (c.op == "mma") return run_mma(c);
  if (c.op == "sort") return run_sort(c);
  if (c.op == "qk_topn") return run_qk_topn(c);
  if (c.op == "sparse_attn_v") return run_sparse_attn_v(c);
  if (c.op == "gather_rows") return run_gather_rows(c);
  if (c.op == "lowbit_tail") return run_lowbit_tail(c);
  if (c.op == "quantize_rows") return run_quantize_rows(c);
  if (c.op == "reuse_rows") return run_reuse_rows(c);
  throw std::runtime_error("unknown op " + c.op);
}

}  // namespace emu
