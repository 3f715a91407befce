// Host-memory, alignment and value checks and the device queries (multiprocessors, resident
// blocks) shared by the CUDA launchers (declared in launch_utils.h).
#include "launch_utils.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include <ATen/ATen.h>
// torch's pinned allocator (the record_event below); its header's alignas of
// std::hardware_destructive_interference_size makes gcc 12 warn in every file that includes it
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
#include <ATen/core/CachingHostAllocator.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic pop
#endif
#include <c10/cuda/CUDAStream.h>

#include "../value_checks.h"
#include "utils.cuh"

namespace kcache_ops {

const void* host_mapped_device_ptr(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor in pinned, device-mapped "
              "host memory (allocate it with kcache_ops.alloc_host), got a tensor on ", t.device());
  if (t.numel() == 0) return nullptr;
  void* host = t.data_ptr();
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, host);
  if (err != cudaSuccess || attr.type != cudaMemoryTypeHost) {
    cudaGetLastError();  // an expected failure must not be blamed on the next launch
    TORCH_CHECK(false, name, " must be pinned, device-mapped host memory (allocate it "
                "with kcache_ops.alloc_host), got pageable CPU memory; the op never copies it");
  }
  // The address through which kernels reach `host` (an interior pointer maps to the interior
  // address); null when the pinned memory is not mapped into the device address space.
  TORCH_CHECK(attr.devicePointer != nullptr, name, " is pinned but not mapped into the "
              "device address space (allocate it with kcache_ops.alloc_host)");
  // Memory of torch's pinned allocator (Tensor.pin_memory()) goes back to its cache when the
  // tensor is freed, for the next pinned tensor to be written while the queued kernel may still
  // read it, unless the allocator knows the stream: the current one, as torch's non_blocking
  // copies tell it. alloc_host's memory is not the allocator's, which passes it over.
  const c10::DataPtr& storage = t.storage().data_ptr();
  at::getHostAllocator(at::kCUDA)->record_event(storage.get(), storage.get_context(),
                                                c10::cuda::getCurrentCUDAStream());
  return attr.devicePointer;
}

const void* readable_device_ptr(const at::Tensor& t, const at::Device& device, const char* name) {
  if (!t.is_cuda()) return host_mapped_device_ptr(t, name);
  TORCH_CHECK(t.device() == device, name, " must be pinned, device-mapped host memory "
              "or on ", device, ", got a tensor on ", t.device());
  return t.numel() == 0 ? nullptr : t.data_ptr();
}

void check_vec16_aligned(const at::Tensor& t, const char* name) {
  const int64_t esize = t.element_size();
  // the row bytes even where t is empty (gather_rows' output is not: it would be copied in
  // 16-byte pieces of rows that are not made of them); the addresses only where there is data
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 || t.numel() == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    ok = ok && (t.size(i) <= 1 || t.stride(i) * esize % 16 == 0);
  }
  ok = (ok || t.numel() == 0) && t.size(-1) * esize % 16 == 0;
  TORCH_CHECK(ok, name, " rows must be 16-byte aligned for vector "
              "loads (data pointer, row bytes and every stride a multiple of 16 bytes), got ",
              "sizes ", t.sizes(), ", strides ", t.strides(), ", ", t.element_size(),
              "-byte elements");
}

void check_element_aligned(std::initializer_list<NamedTensor> tensors) {
  for (const auto& [name, t] : tensors) {
    if (!t->defined() || t->numel() == 0) continue;
    const auto off = reinterpret_cast<uintptr_t>(t->const_data_ptr()) % t->element_size();
    TORCH_CHECK(off == 0, name, " must start at a multiple of its element size (",
                t->element_size(), " bytes), got an address ", off, off == 1 ? " byte" : " bytes",
                " past one (a view made at a byte offset into its storage)");
  }
}

bool should_validate_values(cudaStream_t stream) {
  const char* env = std::getenv("KCACHE_OPS_VALIDATE");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  KC_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status == cudaStreamCaptureStatusNone;
}

namespace {

// lo <= every element of t <= hi.
bool values_in_range(const at::Tensor& t, int64_t lo, int64_t hi) {
  if (t.numel() == 0) return true;
  auto [mn, mx] = at::aminmax(t);
  const at::Tensor both = at::stack({mn, mx}).to(at::kCPU, at::kLong);
  return both[0].item<int64_t>() >= lo && both[1].item<int64_t>() <= hi;
}

// t with each expanded dim (stride 0, size > 1) from `first_dim` on cut to its first element: the
// same values without the repeats, for a check to reduce and copy to the host (a copy of an
// expanded tensor is as large as its shape). The first bad element of the cut tensor is the first
// of t, at the same position.
at::Tensor without_repeats(const at::Tensor& t, int64_t first_dim = 0) {
  at::Tensor cut = t;
  for (int64_t d = first_dim; d < t.dim(); ++d)
    if (t.stride(d) == 0 && t.size(d) > 1) cut = cut.narrow(d, 0, 1);
  return cut;
}

}  // namespace

void check_seq_lens_on_device(const at::Tensor& seq_lens, int64_t S, const char* src_name) {
  if (!values_in_range(seq_lens, 0, S))
    check_seq_lens_values(seq_lens.cpu().contiguous(), S, src_name);
}

void check_indices_on_device(const at::Tensor& indices, int64_t S, const char* src_name,
                             const char* name, const char* minus_one) {
  const at::Tensor cut = without_repeats(indices);
  if (!values_in_range(cut, -1, S - 1)) check_index_values(cut.cpu(), S, src_name, name, minus_one);
}

void check_indices_below_lens_on_device(const at::Tensor& indices, const at::Tensor& seq_lens) {
  const at::Tensor cut = without_repeats(indices, 1);  // [B, H or 1, N or 1]: one bound per b
  if (cut.numel() == 0) return;
  if (cut.ge(seq_lens.reshape({-1, 1, 1})).any().item<bool>())  // vs [B, 1, 1]
    check_indices_below_lens(cut.cpu(), seq_lens.cpu());
}

int resident_blocks_per_sm(const void* kernel, int threads) {
  int device = 0;
  KC_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> known;  // (device, kernel) -> blocks per SM
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find({device, kernel});
  if (found != known.end()) return found->second;
  int blocks = 0;
  KC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
  blocks = std::max(blocks, 1);  // 0: the launch itself then reports why the kernel cannot run
  known.emplace(std::make_pair(device, kernel), blocks);
  return blocks;
}

int multiprocessor_count(int device) {
  int sms = 0;
  KC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

int host_read_sms(int device, bool reads_host, bool by_default) {
  const char* env = std::getenv("KCACHE_OPS_HOST_READ_SPREAD");
  const bool unset = env == nullptr || *env == '\0';
  TORCH_CHECK(unset || std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
              "KCACHE_OPS_HOST_READ_SPREAD must be 0, 1, empty or unset, got '", env, "'");
  const bool spread = unset ? by_default : env[0] == '1';
  return reads_host && spread ? multiprocessor_count(device) : 1;
}

}  // namespace kcache_ops
