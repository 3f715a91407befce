// Pinned, device-mapped host memory for V (zero-copy reads from GPU kernels).
#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>

#include <c10/core/CPUAllocator.h>
#include <ATen/ATen.h>

#include "../checks.h"
#include "../host_memory.h"
#include "utils.cuh"

namespace kcache_ops {

bool cuda_device_present() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

at::Tensor alloc_pinned_mapped(at::IntArrayRef shape, at::ScalarType dtype, int64_t bytes) {
  // Mapped: kernels read it through its device pointer. Portable: every device sees it.
  // KCACHE_OPS_HOST_ALLOC_WC=1 adds write-combining (bench/gpu_gather.py compares the two for GPU
  // reads; WC memory is very slow for the CPU to read, so it is not the default).
  const char* wc = std::getenv("KCACHE_OPS_HOST_ALLOC_WC");
  const bool write_combined = wc != nullptr && std::strcmp(wc, "1") == 0;
  const unsigned flags = cudaHostAllocMapped | cudaHostAllocPortable |
                         (write_combined ? cudaHostAllocWriteCombined : 0u);
  // torch's CUDA state first: torch reports no pointer as pinned (Tensor.is_pinned()) until it has
  // initialised the device itself, which our own cudaHostAlloc does not do.
  at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);
  // An empty tensor still gets a (1-byte) pinned block: torch's is_pinned() is false for a null
  // data pointer.
  void* ptr = nullptr;
  cudaError_t err = cudaHostAlloc(&ptr, bytes > 0 ? static_cast<size_t>(bytes) : 1, flags);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls are not blamed for it
    TORCH_CHECK(false, "could not allocate ", bytes, " bytes of pinned host memory ",
                "for shape ", shape, " ", dtype_name(dtype),
                " (cudaHostAlloc: ", cudaGetErrorString(err), "); ", host_bytes_available_text());
  }
  auto deleter = [](void* p) {  // a deleter cannot throw: a failed free (under a graph capture,
    // at exit) is cleared, so that the next launch's check does not report it as its own
    if (cudaFreeHost(p) != cudaSuccess) cudaGetLastError();
  };
  return at::from_blob(ptr, shape, deleter, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

}  // namespace kcache_ops
