// Host memory for V: free bytes as the machine reports them, and (CUDA builds) pinned,
// device-mapped allocations.
#pragma once

#include <cstdint>
#include <string>

#include <torch/types.h>

namespace kcache_ops {

// MemAvailable from /proc/meminfo in bytes, or -1 where it cannot be read.
int64_t host_bytes_available();
// "the machine reports N bytes available", or that it does not report them: for error messages.
std::string host_bytes_available_text();
// Refuses `bytes` of host memory for `what` (named in the error) past MemAvailable: Linux hands
// out memory lazily, so the allocation would succeed and the process be killed on writing it.
void check_host_bytes(const std::string& what, int64_t bytes);

// Bytes of a tensor of `sizes` (each >= 0; a braced list too) with `elem_bytes` an element: 0 where
// a size is 0, else INT64_MAX where the product overflows.
int64_t bytes_of(at::IntArrayRef sizes, int64_t elem_bytes);

// From this many bytes on, an op's CPU output or scratch is checked against MemAvailable: below it
// reading /proc/meminfo would cost more than the call, and the memory is there if the process is.
constexpr int64_t kHostCheckFromBytes = int64_t{64} << 20;

// check_host_bytes(describe(), bytes) for an op's CPU output or scratch of `bytes` from
// kHostCheckFromBytes on: an output can be larger than the inputs (gather_rows' rows per index, an
// n past S, inputs expanded with stride 0). `describe` makes the name only where it is checked.
template <class Describe>
void check_host_output(int64_t bytes, const Describe& describe) {
  if (bytes >= kHostCheckFromBytes) check_host_bytes(describe(), bytes);
}

#ifdef KCACHE_OPS_WITH_CUDA
// True when at least one CUDA device is visible.
bool cuda_device_present();
// cudaHostAlloc(mapped | portable; KCACHE_OPS_HOST_ALLOC_WC=1 adds write-combined) of `bytes`
// (shape's size in dtype, checked by alloc_host) as a CPU tensor whose deleter frees it
// (csrc/cuda/host_alloc.cu).
at::Tensor alloc_pinned_mapped(at::IntArrayRef shape, at::ScalarType dtype, int64_t bytes);
#endif

}  // namespace kcache_ops
