// An op's implementation as it is registered: the errors it raises start with the op's name
// ("qk_topn: k_cache must have 4 dims, got shape [2, 10, 64]"), as the Python wrappers' and the
// fake implementations' messages do, whichever helper raised them and however the op was called
// (kcache_ops.qk_topn, torch.ops.kcache_ops.qk_topn, a compiled graph); all but a CUDA runtime
// error (rethrow_named):
//
//   constexpr char kOp[] = "qk_topn";
//   m.impl(kOp, &NamedOp<kOp, &qk_topn_cpu>::call);
#pragma once

#include <string>
#include <typeinfo>
#include <utility>

#include <c10/util/Exception.h>

namespace kcache_ops {

// `msg` with "op: " in front, unless it names the op first already ("op: ..." or, naming a part
// of it, "op (select): ...").
inline std::string named_message(const char* op, const std::string& msg) {
  const std::string name(op);
  const bool named = msg.compare(0, name.size(), name) == 0 &&
                     (msg.compare(name.size(), 2, ": ") == 0 ||
                      msg.compare(name.size(), 2, " (") == 0);
  return named ? msg : name + ": " + msg;
}

// Throws `e` again, its message named by named_message, if it is an E (not a type derived from
// it); the caller must be inside the handler that caught `e`.
template <class E>
void rethrow_named_as(const char* op, const c10::Error& e) {
  if (typeid(e) != typeid(E)) return;
  E named(named_message(op, e.msg()), e.backtrace(), e.caller());
  for (const std::string& context : e.context()) named.add_context(context);
  throw named;
}

// An op's checks raise c10::Error (Python's RuntimeError); torch's calls inside it may raise the
// others, each kept as the Python exception it maps to: an allocation on a full GPU stays
// torch.OutOfMemoryError, which callers catch to back off. A type with fields of its own (a CUDA
// runtime error, torch.AcceleratorError, with its code) passes as it came, unnamed.
[[noreturn]] inline void rethrow_named(const char* op, const c10::Error& e) {
  rethrow_named_as<c10::Error>(op, e);
  rethrow_named_as<c10::OutOfMemoryError>(op, e);
  rethrow_named_as<c10::IndexError>(op, e);
  rethrow_named_as<c10::ValueError>(op, e);
  rethrow_named_as<c10::TypeError>(op, e);
  rethrow_named_as<c10::NotImplementedError>(op, e);
  rethrow_named_as<c10::LinAlgError>(op, e);
  throw;
}

template <const char* Op, auto Fn>
struct NamedOp;

template <const char* Op, typename R, typename... Args, R (*Fn)(Args...)>
struct NamedOp<Op, Fn> {
  static R call(Args... args) {
    try {
      return Fn(std::forward<Args>(args)...);
    } catch (const c10::Error& e) {
      rethrow_named(Op, e);
    }
  }
};

}  // namespace kcache_ops
