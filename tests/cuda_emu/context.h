// Switching between fibers. On x86-64 a few instructions that save the callee-saved registers and
// the floating-point control words (glibc's swapcontext also saves the signal mask with a system
// call, which made it two thirds of the emulator's run time); elsewhere ucontext.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__)

namespace emu {

struct Context {
  void* sp = nullptr;
};

extern "C" void emu_context_switch(void** save_sp, void* load_sp);

asm(R"(
  .text
  .globl emu_context_switch
  .type emu_context_switch, @function
emu_context_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_context_switch, .-emu_context_switch
)");

// A context that starts entry() (which must never return) on the given stack.
inline void context_start(Context& c, char* stack, size_t size, void (*entry)()) {
  const uintptr_t top_addr = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* top = reinterpret_cast<uint64_t*>(top_addr);
  *--top = 0;                                   // entry's return address: none
  *--top = reinterpret_cast<uint64_t>(entry);   // popped by ret
  for (int i = 0; i < 6; ++i) *--top = 0;       // rbp rbx r12 r13 r14 r15
  *--top = 0x037f00001f80ull;                   // mxcsr 0x1f80, x87 control word 0x037f
  c.sp = top;
}

inline void context_switch(Context& from, Context& to) { emu_context_switch(&from.sp, to.sp); }

}  // namespace emu

#else

#include <ucontext.h>

namespace emu {

struct Context {
  ucontext_t uc;
};

inline void context_start(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace emu

#endif
