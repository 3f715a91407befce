// Stand-in for CUDA's cuda_pipeline_primitives.h: the asynchronous global -> shared copies
// (cp.async) of the emulator (runtime.cpp): a copy is held in the issuing thread's queue, in the
// commit group that its next __pipeline_commit closes, and lands (is performed) when a
// __pipeline_wait_prior(n) of that thread waits for the group, i.e. for every committed group but
// the newest n. Until then its destination holds poison and, in the race-checking build, any
// access to it stops the run. A copy whose addresses are not aligned to its size stops it too
// (the GPU faults).
#pragma once

#include <cstddef>

#include "cuda_runtime.h"

// Copies size_and_align - zfill bytes from src_global and zero-fills the remaining zfill bytes of
// dst_shared; with zfill == size_and_align nothing is read.
__attribute__((always_inline)) inline void __pipeline_memcpy_async(void* dst_shared,
                                                                   const void* src_global,
                                                                   size_t size_and_align,
                                                                   size_t zfill = 0) {
  ::emu::async_copy(dst_shared, src_global, size_and_align, zfill);
}

// Closes the thread's current commit group (cp.async.commit_group).
__attribute__((always_inline)) inline void __pipeline_commit() { ::emu::async_commit(); }

// Waits until at most `prior` of the thread's newest committed groups are in flight
// (cp.async.wait_group): the copies of every older group have landed.
__attribute__((always_inline)) inline void __pipeline_wait_prior(size_t prior) {
  ::emu::async_wait_prior(prior);
}
