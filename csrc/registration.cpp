// The one schema block of the kcache_ops library. Implementations register per device, each
// through named_op.h's NamedOp (its errors name the op): csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu
// (CUDA), csrc/alloc_host.cpp (device-independent).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

// check_values=False: the CUDA implementations skip the range check of seq_lens / indices, a
// device->host read-back (a synchronisation) per call; their kernels clamp those values, so nothing
// is read out of bounds, but a bad value is not reported. The CPU implementations read the values
// on the host anyway and always check them.
TORCH_LIBRARY(kcache_ops, m) {
  // q [B, Hq, D], k_cache [B, Hkv, S, D], seq_lens [B] int32
  //   -> scores [B, Hq, n] float32, indices [B, Hq, n] int32, lse [B, Hq] float32,
  //      all_scores [B, Hq, S] float32 with return_scores (rows 16-byte aligned: a view of
  //      [B, Hq, S rounded up to 4]; only j < seq_lens[b] defined), else [0].
  // The top n among keys skip_first <= j < L_b - skip_last, lse over all j < L_b (L_b: seq_lens[b]
  // clamped to [0, S]); with top_p < 1 each head keeps the shortest prefix of its entries whose
  // mass sum exp(s - lse) reaches top_p, the rest padding.
  m.def(
      "qk_topn(Tensor q, Tensor k_cache, Tensor seq_lens, int n, float scale, "
      "bool group_select=False, bool check_values=True, bool return_scores=False, "
      "int skip_first=0, int skip_last=0, float top_p=1.0) "
      "-> (Tensor scores, Tensor indices, Tensor lse, Tensor all_scores)");
  // scores [B, Hq, N] float32, indices [B, Hq, N] int32, v_cache [B, Hkv, S, D],
  // lse [B, Hq] float32, the mean tail's v_sum [B, Hkv, D] float32 and seq_lens [B] int32
  //   -> out [B, Hq, D] (dtype of v_cache)
  m.def(
      "sparse_attn_v(Tensor scores, Tensor indices, Tensor v_cache, Tensor? lse=None, "
      "bool renormalize=True, bool check_values=True, Tensor? v_sum=None, "
      "Tensor? seq_lens=None) -> Tensor");
  // src [B, Hs, S, D], indices [B, H, N] int32 -> dst [B, H, N, D] on the device of indices
  m.def("gather_rows(Tensor src, Tensor indices, bool check_values=True) -> Tensor");
  // scores [B, Hq, S] float32 (qk_topn's all_scores), seq_lens [B] int32, lse [B, Hq] float32,
  // indices [B, Hq, N] int32, v_codes [B, Hkv, S, D * bits / 8] uint8 (bits 2 or 4),
  // v_meta [B, Hkv, S, 2] bfloat16 -> out [B, Hq, D] float32: the keys j < L_b that the head did
  // not select, leaving out j < skip_first and j >= L_b - skip_last as well (the hot rows); plus
  // the exact rows hot_v [B, Hkv, H, D] at positions hot_pos [B, H] int32 (those in [0, L_b))
  m.def(
      "lowbit_tail(Tensor scores, Tensor seq_lens, Tensor lse, Tensor indices, Tensor v_codes, "
      "Tensor v_meta, int bits, bool check_values=True, int skip_first=0, int skip_last=0, "
      "Tensor? hot_v=None, Tensor? hot_pos=None) -> Tensor");
  // KCache's pool of reused V rows (DESIGN.md §7), one decode step: indices [B, Hq, N] int32,
  // v_host [B, Hkv, S, D], new_pos [B] int32, the pool rows [B, Hkv, C, D] (dtype of v_host),
  // held [B, Hkv, C] int32, used [B, Hkv, C] int32, step [1] int32 (device)
  //   -> pool_indices [B, Hq, N] int32 (slots of rows), counts [B, Hkv, 2] int32 (distinct
  //      positions read, those found in the pool); rows, held and used updated in place.
  // The rows a step reads (per KV head the G heads' N entries one after another, or with
  // group_select the group's one list, the entry-wise max) in first-entry order: each found at the
  // first slot holding it, or read from v_host into the slots not read this step in ascending
  // (max(used, -1), slot) order; every read slot gets used = step, except new_pos's: read from
  // v_host, its slot has held and used -1 after the step (the pool must not hold new_pos before
  // it). An index outside [0, S) is padding. C must be at least E = G * N (N with group_select).
  m.def(
      "reuse_rows(Tensor indices, Tensor v_host, Tensor new_pos, Tensor(a!) rows, "
      "Tensor(b!) held, Tensor(c!) used, Tensor step, bool group_select, "
      "bool check_values=True) -> (Tensor pool_indices, Tensor counts)");
  // a pinned, device-mapped CPU tensor (an ordinary CPU tensor where no GPU is present)
  m.def("alloc_host(int[] shape, ScalarType dtype) -> Tensor");
  // MemAvailable of /proc/meminfo in bytes, -1 where it cannot be read
  m.def("host_bytes_available() -> int");
  // v [..., D] (D a multiple of 8 / bits), bits in {2, 4}
  //   -> codes [..., D * bits / 8] uint8, meta [..., 2] bfloat16 (scale, min), on the device of v
  m.def("quantize_rows(Tensor v, int bits) -> (Tensor codes, Tensor meta)");
}

namespace {

// f(name, tensor) for each argument of op on the stack that the op writes (schema Tensor(a!); a
// plain tensor, as reuse_rows' are, not an optional one or a list).
template <class F>
void for_each_written(const c10::OperatorHandle& op, const torch::jit::Stack& stack, const F& f) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    if (!args[i].alias_info() || !args[i].alias_info()->isWrite()) continue;
    const at::Tensor& t = stack[first + i].toTensor();
    if (t.defined()) f(args[i].name(), t);  // undefined (None): the op's own checks refuse it
  }
}

// reuse_rows writes rows, held and used in place and returns int32 tensors, nothing to
// differentiate. Autograd: a written tensor that requires grad is refused (a backward through it
// would give the overwritten slots the gradient of the values they held); the call passes on to
// ADInplaceOrView, which refuses an inference tensor (it has no version counter) outside
// torch.inference_mode before the op runs, and bumps the written tensors' version counters after
// it, as torch's own in-place ops do: a backward that saved one raises instead of using the new
// values. (torch's fallbacks for these keys bump only outputs that alias an input; reuse_rows
// returns new tensors.)
void reuse_rows_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  for_each_written(op, *stack, [](const std::string& name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(!(t.requires_grad() && at::GradMode::is_enabled()), "reuse_rows: ", name,
                      " must not require grad (the op writes it in place and is not ",
                      "differentiable), got requires_grad=True");
  });
  at::AutoDispatchBelowAutograd below;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void reuse_rows_inplace(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  std::vector<at::Tensor> written;  // kept: once the op has run, the stack holds its outputs
  for_each_written(op, *stack, [&](const std::string& name, const at::Tensor& t) {
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), "reuse_rows: ", name,
                " must not be an inference tensor outside torch.inference_mode (the op writes it ",
                "in place), got one made under it: make the pool outside inference_mode, or call ",
                "the op in it");
    written.push_back(t);
  });
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace

// No op is differentiable: a backward through an output raises that the derivative of
// kcache_ops::<op> is not implemented, instead of passing with no gradient (torch's default for an
// op without an autograd kernel only warns). reuse_rows' outputs are int32: see above.
TORCH_LIBRARY_IMPL(kcache_ops, Autograd, m) {
  for (const char* op : {"qk_topn", "sparse_attn_v", "gather_rows", "lowbit_tail", "quantize_rows"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  m.impl("reuse_rows", torch::CppFunction::makeFromBoxedFunction<&reuse_rows_autograd>());
}

TORCH_LIBRARY_IMPL(kcache_ops, ADInplaceOrView, m) {
  m.impl("reuse_rows", torch::CppFunction::makeFromBoxedFunction<&reuse_rows_inplace>());
}
