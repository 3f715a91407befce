// A torch extension for tests/test_cpu_isa.py: qk_topn's scoring of one (sequence, KV head) group,
// score_heads (csrc/cpu/isa.h), lowbit_tail's sums of one chunk, tail_rows, the exps of qk_topn's
// lse and group mass and of lowbit_tail's weights, and the scans of qk_topn's selection (max_of,
// first_above), through Avx512Isa with its intrinsics emulated (intrinsics.h) or through Avx2Isa,
// on whatever x86-64 CPU runs the tests.
#include <torch/extension.h>

#include "../../csrc/cpu/common.h"
#include "../../csrc/cpu/isa_generic.h"
#include "intrinsics.h"  // after every header that could use an AVX-512 intrinsic itself
#include "../../csrc/cpu/isa.h"

namespace {

// body.template operator()<Isa>() with Isa the loops `isa` names: "avx512" (Avx512Isa, its
// intrinsics emulated) or "avx2" (Avx2Isa).
template <class Body>
void with_isa(const std::string& isa, const Body& body) {
  TORCH_CHECK(isa == "avx512" || isa == "avx2", "isa must be avx512 or avx2");
  if (isa == "avx512") {
    body.template operator()<kcache_ops::cpu::Avx512Isa>();
  } else {
    body.template operator()<kcache_ops::cpu::Avx2Isa>();
  }
}

// q [G, D] float32 contiguous, k [L, D] float32/float16/bfloat16 with unit stride in D (D 64 or
// 128) -> s [G + 1, s_stride] float32 (s_stride >= L), NaN but for s[h, j] = scale * <q_h, k_j>
// (h < G, j < L): the keys scored in tiles of `tile` rows as qk_topn scores them, the last row a
// guard that a stray store would write.
torch::Tensor scores(const torch::Tensor& q, const torch::Tensor& k, double scale,
                     const std::string& isa, int64_t tile, int64_t s_stride) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: [G, D] f32");
  TORCH_CHECK(k.dim() == 2 && k.size(1) == q.size(1) && k.stride(1) == 1, "k: [L, D], unit stride");
  TORCH_CHECK(q.size(1) == 64 || q.size(1) == 128, "D must be 64 or 128");
  const int64_t G = q.size(0), L = k.size(0);
  TORCH_CHECK(tile >= 1 && s_stride >= L, "tile >= 1 and s_stride >= L");
  auto s = torch::full({G + 1, s_stride}, NAN, q.options());  // [G + 1, s_stride], poisoned
  KC_DISPATCH_FLOAT_HALF_BF16(k.scalar_type(), "scores", [&] {
    KC_HEAD_DIM_SWITCH(q.size(1), [&] {
      const auto* kp = static_cast<const scalar_t*>(k.data_ptr());
      with_isa(isa, [&]<class Isa>() {
        for (int64_t j = 0; j < L; j += tile) {
          for (int64_t h = 0; h < G;) {
            h += kcache_ops::cpu::score_heads<Isa, scalar_t, kD>(
                q.data_ptr<float>() + h * kD, G - h, kp + j * k.stride(0), k.stride(0),
                std::min(tile, L - j), static_cast<float>(scale),
                s.data_ptr<float>() + h * s_stride + j, s_stride);
          }
        }
      });
    });
  });
  return s;
}

// acc [G + 1, D] (a copy of acc_in) with rows h < G += sum over keys i < n of w[h, i] * (sb[i, 1]
// + sb[i, 0] * code) by Isa::tail_rows, row G a guard that a stray store would change: w [G, n]
// float32 contiguous, codes [n, >= D * bits / 8] uint8 with unit stride in a row (the codes of
// row i, `bits` bits each, low bits first), sb [n, 2] float32 contiguous (step, base); D 64 or
// 128, bits 2 or 4.
torch::Tensor tail_rows(const torch::Tensor& w, const torch::Tensor& codes, const torch::Tensor& sb,
                        const torch::Tensor& acc_in, int64_t bits, const std::string& isa) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w: [G, n] f32");
  const int64_t G = w.size(0), n = w.size(1);
  TORCH_CHECK(acc_in.dim() == 2 && acc_in.size(0) == G + 1 && acc_in.scalar_type() == at::kFloat,
              "acc: [G + 1, D] f32");
  const int64_t D = acc_in.size(1);
  TORCH_CHECK(D == 64 || D == 128, "D must be 64 or 128");
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4");
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == n && codes.size(1) >= D * bits / 8 &&
                  codes.stride(1) == 1 && codes.scalar_type() == at::kByte,
              "codes: [n, >= D * bits / 8] uint8, unit stride");
  TORCH_CHECK(sb.sizes() == at::IntArrayRef({n, 2}) && sb.is_contiguous() &&
                  sb.scalar_type() == at::kFloat, "sb: [n, 2] f32");
  torch::Tensor acc = acc_in.contiguous().clone();  // [G + 1, D]
  KC_HEAD_DIM_SWITCH(D, [&] {
    with_isa(isa, [&]<class Isa>() {
      const auto run = [&]<int64_t kBits>() {
        Isa::template tail_rows<kD, kBits>(w.data_ptr<float>(), n, G, n,
                                           codes.data_ptr<uint8_t>(), codes.stride(0),
                                           sb.data_ptr<float>(), acc.data_ptr<float>());
      };
      if (bits == 2) {
        run.template operator()<2>();
      } else {
        run.template operator()<4>();
      }
    });
  });
  return acc;
}

// Isa's exps of x [n] float32 minus shift, each with one guard element past n that a stray store
// would change: w [n + 1] = tail_weights of x written over NaN, w_x [n + 1] = tail_weights of x
// in place (x == w, as lowbit_tail calls it on scores it gathered), acc [n + 1] = add_exp of x
// onto a copy of acc_in [n + 1], and sum [1] = sum_exp of x.
std::vector<torch::Tensor> exps(const torch::Tensor& x, const torch::Tensor& acc_in, double shift,
                                const std::string& isa) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: [n] f32");
  const int64_t n = x.size(0);
  TORCH_CHECK(acc_in.sizes() == at::IntArrayRef({n + 1}) && acc_in.scalar_type() == at::kFloat,
              "acc: [n + 1] f32");
  torch::Tensor w = torch::cat({torch::full({n}, NAN, x.options()), acc_in.slice(0, n)});
  torch::Tensor w_x = torch::cat({x, acc_in.slice(0, n)});  // [n + 1]
  torch::Tensor acc = acc_in.contiguous().clone();          // [n + 1]
  torch::Tensor sum = torch::empty({1}, x.options());       // [1]
  with_isa(isa, [&]<class Isa>() {
    const float sh = static_cast<float>(shift);
    Isa::tail_weights(x.data_ptr<float>(), w.data_ptr<float>(), n, sh);
    Isa::tail_weights(w_x.data_ptr<float>(), w_x.data_ptr<float>(), n, sh);
    Isa::add_exp(acc.data_ptr<float>(), x.data_ptr<float>(), n, sh);
    sum.data_ptr<float>()[0] = Isa::sum_exp(x.data_ptr<float>(), n, sh);
  });
  return {w, acc, sum, w_x};
}

// Isa's scans of qk_topn's selection over x [>= n] float32: (max_of the first n, first_above thr
// in [begin, end)), n >= 1, 0 <= begin <= end <= x.size(0).
std::vector<double> scans(const torch::Tensor& x, int64_t n, int64_t begin, int64_t end, double thr,
                          const std::string& isa) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: [m] f32");
  TORCH_CHECK(n >= 1 && n <= x.size(0) && 0 <= begin && begin <= end && end <= x.size(0),
              "1 <= n <= m and 0 <= begin <= end <= m");
  std::vector<double> got;
  with_isa(isa, [&]<class Isa>() {
    got = {Isa::max_of(x.data_ptr<float>(), n),
           static_cast<double>(Isa::first_above(x.data_ptr<float>(), begin, end,
                                                static_cast<float>(thr)))};
  });
  return got;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores);
  m.def("tail_rows", &tail_rows);
  m.def("exps", &exps);
  m.def("scans", &scans);
}
