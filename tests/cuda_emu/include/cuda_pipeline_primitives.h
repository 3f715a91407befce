// Stand-in for CUDA's cuda_pipeline_primitives.h: the asynchronous global -> shared copies
// (cp.async) complete at once here, so commit and wait have nothing to do. A kernel that reads a
// slot before waiting for its copy is not caught (a limit of the emulator, README.md).
#pragma once

#include <cstddef>

#include "cuda_runtime.h"

// Copies size_and_align - zfill bytes from src_global and zero-fills the remaining zfill bytes of
// dst_shared; with zfill == size_and_align nothing is read.
inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global,
                                    size_t size_and_align, size_t zfill = 0) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
    ::emu::fail("__pipeline_memcpy_async copies 4, 8 or 16 bytes", __FILE__, __LINE__);
  auto* dst = static_cast<unsigned char*>(dst_shared);
  const auto* src = static_cast<const unsigned char*>(src_global);
  for (size_t i = 0; i < size_and_align; ++i) dst[i] = i < size_and_align - zfill ? src[i] : 0;
}

inline void __pipeline_commit() {}

inline void __pipeline_wait_prior(size_t) {}
