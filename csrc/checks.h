// Argument checks whose messages name the argument, what was expected and what came.
#pragma once

#include <charconv>
#include <initializer_list>
#include <string>
#include <utility>

#include <torch/library.h>
#include <torch/types.h>

namespace kcache_ops {

// A dtype as Python spells it (float32, int64, ...), for the messages below: c10 prints a
// ScalarType by its C++ name (Float, Long), which a Python caller does not write.
inline const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(dtype);  // the rarer ones by c10's name
  }
}

// A double as the shortest text that reads back as it: a stream's 6 digits print a refused top_p
// of 1.0000001 as "1", which reads as allowed.
inline std::string exact_text(double x) {
  char buf[32];
  return std::string(buf, std::to_chars(buf, buf + sizeof(buf), x).ptr);
}

}  // namespace kcache_ops

// An op's schema takes Python's None for a required tensor as an undefined one (its dim 1, its
// sizes [0], its dtype UNKNOWN_SCALAR): the two checks below say what came first.
#define KC_CHECK_DEFINED(x) TORCH_CHECK((x).defined(), #x " must be a tensor, got None")

#define KC_CHECK_DIM(x, d)                                                                 \
  do {                                                                                     \
    KC_CHECK_DEFINED(x);                                                                   \
    TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dims, got shape ", (x).sizes()); \
  } while (false)

#define KC_CHECK_DTYPE(x, dt)                                                                \
  do {                                                                                       \
    KC_CHECK_DEFINED(x);                                                                     \
    TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", ::kcache_ops::dtype_name(dt),    \
                ", got ", ::kcache_ops::dtype_name((x).scalar_type()));                      \
  } while (false)

#define KC_CHECK_SAME_DTYPE(x, y)                                                           \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same " \
              "dtype, got ", ::kcache_ops::dtype_name((x).scalar_type()), " and ",          \
              ::kcache_ops::dtype_name((y).scalar_type()))

#define KC_CHECK_FLOATING(x)                                                                    \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||             \
                  (x).scalar_type() == at::kBFloat16,                                           \
              #x " must be float32, float16 or bfloat16, got ",                                 \
              ::kcache_ops::dtype_name((x).scalar_type()))

#define KC_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())

#define KC_CHECK_LAST_CONTIGUOUS(x)                                                       \
  TORCH_CHECK((x).size(-1) <= 1 || (x).stride(-1) == 1, #x " must be contiguous in its " \
              "last dim, got strides ", (x).strides())

#define KC_CHECK_HEAD_DIM(x, d)                                                           \
  TORCH_CHECK((d) == 64 || (d) == 128, #x ": head dim must be 64 or 128, got ", (d))

#define KC_CHECK_GQA(hq, hkv, qname, kname)                                                 \
  TORCH_CHECK((hkv) > 0 && (hq) % (hkv) == 0, qname " heads (", (hq), ") must be a multiple " \
              "of " kname " heads (", (hkv), ")")

namespace kcache_ops {

// Whether x and y may share memory: overlapping byte spans (each from its first element to its
// last, so two interleaved views count as overlapping), whatever storages hold them (two tensors
// from one NumPy array have two). Addresses are unique across host and devices (CUDA's unified
// addressing), so tensors on different devices never overlap.
inline bool may_overlap(const at::Tensor& x, const at::Tensor& y) {
  if (x.numel() == 0 || y.numel() == 0) return false;
  const auto span = [](const at::Tensor& t) {  // [first byte, one past the last)
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* first = static_cast<const char*>(t.const_data_ptr());
    return std::make_pair(first, first + (last + 1) * t.element_size());
  };
  const auto [x0, x1] = span(x);
  const auto [y0, y1] = span(y);
  return x0 < y1 && y0 < x1;
}

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// No tensor of `written` (updated in place) shares memory with another of them or one of `read`.
inline void check_no_overlap(std::initializer_list<NamedTensor> written,
                             std::initializer_list<NamedTensor> read) {
  const auto check = [](const NamedTensor& w, const NamedTensor& other) {
    TORCH_CHECK(!may_overlap(*w.second, *other.second), w.first, " and ", other.first,
                " must not share memory (", w.first, " is updated in place), got views of the "
                "same memory");
  };
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto other = w + 1; other != written.end(); ++other) check(*w, *other);
    for (const NamedTensor& other : read) check(*w, other);
  }
}

}  // namespace kcache_ops
