// What the CUDA launchers share: host-memory and alignment checks, the sync-free value-validation
// policy, and the dtype / head-dim / group-slice dispatch that turns runtime values into template
// constants.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/types.h>

#include "../checks.h"
#include "launch_grid.h"

namespace kcache_ops {

// The device address of a pinned, device-mapped CPU tensor (from kcache_ops.alloc_host), or an
// error naming `name` that says how to allocate it. Never copies. nullptr for an empty tensor.
// Memory of torch's pinned allocator is recorded as used by the current stream (call it under the
// op's device guard), so that freeing the tensor does not hand it out before the kernel has read.
const void* host_mapped_device_ptr(const at::Tensor& t, const char* name);

// The device address of `t` for a kernel on `device` that reads it: host_mapped_device_ptr for a
// CPU tensor, the data pointer of a CUDA tensor on `device` (V rows already in device memory, such
// as KCache's reused rows), an error naming `name` for a CUDA tensor on another device.
const void* readable_device_ptr(const at::Tensor& t, const at::Device& device, const char* name);

// Data pointer and the strides of every dim but the last are multiples of 16 bytes, so that rows
// can be read with 16-byte vector loads.
void check_vec16_aligned(const at::Tensor& t, const char* name);

// Each tensor (of those defined and not empty) starts at a multiple of its element size, as the
// kernels' one-element loads need: a view made at a byte offset into a storage (Tensor.set_ on a
// sliced untyped storage) does not, and its first load would fault, ending the CUDA context.
void check_element_aligned(std::initializer_list<NamedTensor> tensors);

// Values (seq_lens, indices) can only be checked against their range by reading them back, which
// needs a host synchronisation. They are checked unless the op's check_values argument is false
// (qk_topn, sparse_attn_v), the stream is being captured into a CUDA graph or KCACHE_OPS_VALIDATE
// is "0"; the kernels themselves clamp every such value, so bad input never reads out of bounds
// either way (see bench/NOTES.md).
bool should_validate_values(cudaStream_t stream);

// Error unless every seq_lens value lies in [0, S] / every index in [-1, S): one reduction and one
// device->host copy. A bad value copies the tensor to the host (an expanded dim's repeats left
// out) and fails with the message of csrc/value_checks.h, which names the first bad element.
void check_seq_lens_on_device(const at::Tensor& seq_lens, int64_t S,
                              const char* src_name = "k_cache");
void check_indices_on_device(const at::Tensor& indices, int64_t S, const char* src_name,
                             const char* name = "indices", const char* minus_one = "padding");
// Error unless every index of sequence b is below seq_lens[b] (the mean tail; both already in
// range): one comparison and one device->host copy; the message is csrc/value_checks.h's.
void check_indices_below_lens_on_device(const at::Tensor& indices, const at::Tensor& seq_lens);

// Multiprocessors of the device.
int multiprocessor_count(int device);

// The multiprocessors a plan spreads a read over (launch_grid.h, host reads per multiprocessor):
// the device's where the read is of host memory (`reads_host`) and spread, else 1. Spread by
// KCACHE_OPS_HOST_READ_SPREAD: unset or empty, where the op's spread paid when measured
// (`by_default`); 0, nowhere; 1, everywhere (the benchmarks time the plan other than the
// default beside it); another value is an error (checked where a launch is planned: not for an
// empty output).
int host_read_sms(int device, bool reads_host, bool by_default);

// Blocks of `threads` threads of `kernel` (a __global__ function, no dynamic shared memory)
// resident on one multiprocessor of the current device at once, as its registers and shared
// memory allow (at least 1, so that a plan never divides by 0); asked of the runtime once per
// kernel and device.
int resident_blocks_per_sm(const void* kernel, int threads);

// f(static_cast<T*>(nullptr)) with T the CUDA type of the dtype (float, __half, __nv_bfloat16).
template <typename F>
void dispatch_float_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default:
      TORCH_CHECK(false, "dtype must be float32, float16 or bfloat16, got ", dtype_name(dtype));
  }
}

// f(std::integral_constant<int, D>{}) for D in {64, 128}.
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  if (d == 64) return f(std::integral_constant<int, 64>{});
  if (d == 128) return f(std::integral_constant<int, 128>{});
  TORCH_CHECK(false, "head dim must be 64 or 128, got ", d);
}

// f(std::integral_constant<int, GS>{}) for a plan's group_slice GS (group_slice_width: 4 or 8).
template <typename F>
void dispatch_group_slice(int group_slice, F&& f) {
  if (group_slice == 4) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 8>{});
}

// f(type_tag, d_tag, gs_tag) for a kernel templated on <T, D, GS>: the three dispatches above,
// nested (T from `dtype`, D from `d`, GS from a plan's `group_slice`).
template <typename F>
void dispatch_kernel_instance(at::ScalarType dtype, int64_t d, int group_slice, F&& f) {
  dispatch_group_slice(group_slice, [&](auto gs_tag) {
    dispatch_float_dtype(dtype, [&](auto type_tag) {
      dispatch_head_dim(d, [&](auto d_tag) { f(type_tag, d_tag, gs_tag); });
    });
  });
}

// f(std::integral_constant<int, Bits>{}) for lowbit_tail's code width Bits in {2, 4}.
template <typename F>
void dispatch_code_bits(int64_t bits, F&& f) {
  if (bits == 2) return f(std::integral_constant<int, 2>{});
  if (bits == 4) return f(std::integral_constant<int, 4>{});
  TORCH_CHECK(false, "bits must be 2 or 4, got ", bits);
}

// f(d_tag, gs_tag, bits_tag) for lowbit_tail_kernel<D, GS, Bits> (its scores are float32 whatever
// the model's dtype): dispatch_head_dim, dispatch_group_slice and dispatch_code_bits, nested.
template <typename F>
void dispatch_tail_instance(int64_t d, int group_slice, int64_t bits, F&& f) {
  dispatch_group_slice(group_slice, [&](auto gs_tag) {
    dispatch_code_bits(bits, [&](auto bits_tag) {
      dispatch_head_dim(d, [&](auto d_tag) { f(d_tag, gs_tag, bits_tag); });
    });
  });
}

// A plan's grid as a dim3 (the launchers check the sizes against the CUDA limits first).
inline dim3 to_dim3(const GridSize& grid) {
  return dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y),
              static_cast<unsigned>(grid.z));
}

}  // namespace kcache_ops
