// kcache_ops::alloc_host — pinned, device-mapped host memory where a GPU is present, an ordinary
// CPU tensor otherwise — and kcache_ops::host_bytes_available, the host RAM free for it. Registered
// for every backend: neither op takes a tensor to dispatch on.
#include <algorithm>
#include <fstream>
#include <limits>
#include <string>

#include <c10/util/safe_numerics.h>

#include "checks.h"
#include "host_memory.h"
#include "named_op.h"

namespace kcache_ops {

int64_t host_bytes_available() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return -1;
}

std::string host_bytes_available_text() {
  const int64_t available = host_bytes_available();
  if (available < 0) return "the machine does not report its available memory (no MemAvailable)";
  return "the machine reports " + std::to_string(available) + " bytes available";
}

void check_host_bytes(const std::string& what, int64_t bytes) {
  const int64_t available = host_bytes_available();
  TORCH_CHECK(available < 0 || bytes <= available, what, " needs ", bytes, " bytes of host "
              "memory, more than the ", available, " bytes the machine reports available "
              "(MemAvailable)");
}

int64_t bytes_of(at::IntArrayRef sizes, int64_t elem_bytes) {
  int64_t bytes = elem_bytes;
  for (int64_t s : sizes) {
    if (s == 0) return 0;
    if (c10::mul_overflows(bytes, s, &bytes)) bytes = std::numeric_limits<int64_t>::max();
  }
  return bytes;
}

namespace {

constexpr char kOp[] = "alloc_host";  // first in each error the op raises (named_op.h)

at::Tensor alloc_host(at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(!c10::isQIntType(dtype) && !c10::isBitsType(dtype),
              "dtype must be a plain (not quantized, not bits) dtype, got ",
              dtype_name(dtype));
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "shape must have no negative size, got ", shape);
  }
  const int64_t bytes = bytes_of(shape, static_cast<int64_t>(c10::elementSize(dtype)));
  TORCH_CHECK(bytes < std::numeric_limits<int64_t>::max(), "shape ", shape, " of ",
              dtype_name(dtype), " needs more than ", std::numeric_limits<int64_t>::max(),
              " bytes (its size overflows int64)");
  // An empty tensor holds no bytes, but torch still multiplies its sizes in order (unsigned: a
  // product past 2^64 before the 0 is refused) and its contiguous strides, the sizes after the
  // first with a 0 counting 1.
  uint64_t elements = 1;
  bool elements_overflow = false;
  for (int64_t s : shape) {
    elements_overflow =
        c10::mul_overflows(elements, static_cast<uint64_t>(s), &elements) || elements_overflow;
  }
  int64_t stride = 1;
  bool stride_overflow = false;
  for (size_t i = 1; i < shape.size(); ++i) {
    stride_overflow =
        c10::mul_overflows(stride, std::max<int64_t>(shape[i], 1), &stride) || stride_overflow;
  }
  TORCH_CHECK(!elements_overflow && !stride_overflow, "shape ", shape,
              " has sizes or strides whose product overflows (as torch computes them)");
  check_host_bytes(c10::str("shape ", shape, " of ", dtype_name(dtype)), bytes);
#ifdef KCACHE_OPS_WITH_CUDA
  if (cuda_device_present()) return alloc_pinned_mapped(shape, dtype, bytes);
#endif
  try {
    return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kCPU));
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "could not allocate ", bytes, " bytes of host memory for shape ",
                shape, " ", dtype_name(dtype), "; ", host_bytes_available_text());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CompositeExplicitAutograd, m) {
  m.impl(kOp, &NamedOp<kOp, &alloc_host>::call);
  m.impl("host_bytes_available", &host_bytes_available);
}

}  // namespace kcache_ops
