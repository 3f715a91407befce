// Helpers shared by the CPU implementations: kNegInf, the device check, float conversion of the
// storage dtypes, the dtype / head-dim dispatch (value checks: ../value_checks.h), data pointers
// of possibly empty tensors, the parallel loop, and scratch sizing.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../checks.h"
#include "../host_memory.h"

namespace kcache_ops::cpu {

// The score of padding, and the floor of a selection's threshold.
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#define KC_CHECK_CPU(x) \
  TORCH_CHECK((x).device().is_cpu(), #x " must be on cpu, got ", (x).device())

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// lowbit_tail's weight of a key from d = s - lse: exp(d) (<= 1 with qk_topn's lse), 0 for a NaN
// one, as in the reference, and for one that underflows (the key adds nothing); +inf the largest
// float.
inline float tail_weight(float d) {
  const float p = std::exp(d);
  return p > 0.f ? std::min(p, std::numeric_limits<float>::max()) : 0.f;
}

// Whether lowbit_tail's sums may take a row at weight 0: every value base + step * code (code <
// 2^kBits) at most 2^127 in magnitude however it is rounded, as |base| <= 2^126 and |step| *
// (2^kBits - 1) <= 2^126 (false for NaN). quantize_rows' copies are, but for values within a
// factor 2 of the float range; 0 times a row that overflows would be NaN.
constexpr float kTailRowLimit = 0x1p126f;
template <int64_t kBits>
bool tail_row_bounded(float step, float base) {
  return std::fabs(base) <= kTailRowLimit && std::fabs(step) * ((1 << kBits) - 1) <= kTailRowLimit;
}

// sb [n, 2] = the (step, base) of n rows, meta[i * m_stride + {0, 1}], as float32; whether every
// row is tail_row_bounded. A scalar loop (GenericIsa's, and Avx2Isa's for other strides).
template <int64_t kBits>
bool tail_meta_rows(const c10::BFloat16* meta, int64_t m_stride, int64_t n, float* sb) {
  bool all = true;
  for (int64_t i = 0; i < n; ++i) {
    sb[2 * i] = meta[i * m_stride];
    sb[2 * i + 1] = meta[i * m_stride + 1];
    all = all && tail_row_bounded<kBits>(sb[2 * i], sb[2 * i + 1]);
  }
  return all;
}

// Binds scalar_t to float, c10::Half or c10::BFloat16 (the storage dtypes of q/k/v).
#define KC_DISPATCH_FLOAT_HALF_BF16(type, name, ...)     \
  AT_DISPATCH_SWITCH(type, name,                         \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Calls body() with `constexpr int64_t kD` bound to the head dim (64 or 128, checked before).
#define KC_HEAD_DIM_SWITCH(d, ...)             \
  [&] {                                        \
    if ((d) == 64) {                           \
      constexpr int64_t kD = 64;               \
      return __VA_ARGS__();                    \
    }                                          \
    constexpr int64_t kD = 128;                \
    return __VA_ARGS__();                      \
  }()

// t's data from element `offset` on, or nullptr where t has no element: an empty tensor's data
// pointer may be null, and an offset from null is undefined even where nothing is read (an S or N
// of 0 leaves the other strides nonzero).
template <typename T>
T* data_from(const at::Tensor& t, int64_t offset) {
  return t.numel() == 0 ? nullptr : t.data_ptr<T>() + offset;
}

// The calling thread's floating-point mode, which torch.set_flush_denormal (and fesetround) set
// on the calling thread alone: MXCSR's flush-to-zero, denormals-are-zero and rounding bits on
// x86, FPCR's flush-to-zero and rounding bits on AArch64; elsewhere none.
#if defined(__x86_64__)
using FpModeBits = unsigned;
constexpr FpModeBits kFpModeBits = 0x8040 | 0x6000;  // FTZ (bit 15), DAZ (bit 6), RC (13-14)
inline FpModeBits fp_mode() { return _mm_getcsr() & kFpModeBits; }
inline void set_fp_mode(FpModeBits mode) { _mm_setcsr((_mm_getcsr() & ~kFpModeBits) | mode); }
#elif defined(__aarch64__)
using FpModeBits = uint64_t;
constexpr FpModeBits kFpModeBits = FpModeBits{7} << 22;  // FZ (bit 24), RMode (bits 22-23)
inline FpModeBits fpcr() {
  FpModeBits value;
  asm volatile("mrs %0, fpcr" : "=r"(value));
  return value;
}
inline FpModeBits fp_mode() { return fpcr() & kFpModeBits; }
inline void set_fp_mode(FpModeBits mode) {
  const FpModeBits value = (fpcr() & ~kFpModeBits) | mode;
  asm volatile("msr fpcr, %0" : : "r"(value));
}
#else
using FpModeBits = unsigned;
inline FpModeBits fp_mode() { return 0; }
inline void set_fp_mode(FpModeBits) {}
#endif

// The floating-point mode `mode` on this thread for the scope, its own after (a task that throws
// too).
class FpModeScope {
 public:
  explicit FpModeScope(FpModeBits mode) : own_(fp_mode()) { set_fp_mode(mode); }
  ~FpModeScope() { set_fp_mode(own_); }
  FpModeScope(const FpModeScope&) = delete;
  FpModeScope& operator=(const FpModeScope&) = delete;

 private:
  FpModeBits own_;
};

// at::parallel_for whose chunks run in the caller's floating-point mode: the pool's threads keep
// their own, so with denormals flushed a row of subnormal scores was ranked on a worker and tied
// at 0 on the calling thread, and with the caller rounding toward zero a worker's rows rounded to
// nearest: a result depended on the thread count.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const FpModeBits mode = fp_mode();
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    FpModeScope scope(mode);
    f(b, e);
  });
}

// buf.resize(n); where the host has not the memory, an error that names the buffer and the bytes
// asked for (std::bad_alloc says none of them, and Linux hands out a large buffer past
// MemAvailable lazily: the process is killed writing it).
template <class Vec>
void scratch_resize(Vec& buf, size_t n, const char* what) {
  if (n > buf.capacity()) {  // new memory: a buffer kept from an earlier call holds its own
    const int64_t bytes = bytes_of({static_cast<int64_t>(n)}, sizeof(typename Vec::value_type));
    check_host_output(bytes, [&] { return c10::str("its scratch ", what); });
  }
  try {
    buf.resize(n);
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, "out of host memory for its scratch ", what, ": tried to allocate ",
                n * sizeof(typename Vec::value_type), " bytes");
  }
}

}  // namespace kcache_ops::cpu
