// The emulator's runtime interface: what the stand-in CUDA headers (include/) and the harness
// (harness.cpp) call. Implemented in runtime.cpp, which is compiled without instrumentation.
#pragma once

#include <cstddef>
#include <cstdint>

// CUDA's index and vector types (the real ones are declared in vector_types.h).
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// The running fiber's indices: the scheduler rewrites them on every switch (all fibers share one
// OS thread, and every switch happens inside a call into runtime.cpp, so compiled code re-reads
// them after it).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

namespace emu {

// Runs body(ctx) once per thread of every block of the grid: blocks one after another, the threads
// of a block as fibers under the schedule chosen by set_schedule. Errors (races, divergent
// barriers, partial warps) print a message and end the process with exit code 3.
void launch_raw(dim3 grid, dim3 block, const char* kernel, void (*body)(void*), void* ctx);

template <typename F>
void launch(dim3 grid, dim3 block, const char* kernel, F&& body) {
  launch_raw(grid, block, kernel, [](void* c) { (*static_cast<F*>(c))(); }, &body);
}

// Until the end of the next launch, [p, p + bytes) is an output of it that every byte of which must
// be written by at most one thread (race-checking build; `name` is for messages).
void watch_output(void* p, size_t bytes, const char* name);

// Seeded schedule of the following launches.
void set_schedule(uint64_t seed);

// __syncthreads (mode 0), __syncthreads_and (1), _or (2), _count (3); returns the reduction.
// The threads of a block meet only at the same site: file:line and the chain of inlined calls
// that led to it (the caller's return address, resolved by runtime.cpp's site_of), so a helper's
// barrier reached from two different callers is divergent.
int sync_block(int pred, int mode, const char* file, int line);

// A warp-synchronous exchange: every lane in mask deposits `bits` and receives the value of lane
// `src` (its own for src < 0). kind names the intrinsic in messages. Sites as for sync_block.
uint64_t shuffle(unsigned mask, uint64_t bits, int src, const char* kind, const char* file,
                 int line);

// Asynchronous global -> shared copies (cp.async, include/cuda_pipeline_primitives.h): a copy of
// size (4, 8, 16) bytes, both addresses aligned to it, the last zfill bytes zero-filled; it
// lands when a __pipeline_wait_prior of the issuing thread waits for its commit group, and until
// then its destination holds poison and any access to it is an error (race-checking build).
void async_copy(void* dst, const void* src, size_t size, size_t zfill);
void async_commit();
void async_wait_prior(size_t n);

// The caller's lane (threadIdx linearised, modulo 32).
int lane_id();

// atomicAdd on an int in shared or global memory (an atomic access for the race check; on global
// memory a ticket that hands the block's global writes over, checked as such).
int atomic_add(int* p, int v);

// atomicOr on an unsigned int in shared or global memory (an atomic access, as atomic_add).
unsigned atomic_or(unsigned* p, unsigned v);

// __threadfence: blocks run one after another, so there is nothing to order; the race-checking
// build records it for the check of a ticket on global memory (atomic_add).
void thread_fence();

// Fails the run with a message (shim misuse, unsupported feature).
[[noreturn]] void fail(const char* what, const char* file, int line);

}  // namespace emu
