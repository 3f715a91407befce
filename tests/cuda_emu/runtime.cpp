// The emulator's runtime: every thread of a block is a fiber (context.h) with its own stack, blocks
// run one after another on one OS thread, and a seeded scheduler decides which runnable fiber runs
// next. A fiber gives up the CPU only at a block barrier, a warp exchange (shuffle), or, in the
// race-checking build, at a randomly chosen shared-memory access. Shared memory (the function-local
// statics of the kernels, gathered by shared.ld) is poisoned before every block, and in the
// race-checking build every access to it is checked against a per-byte shadow: a read or write of a
// byte that another thread wrote, or a write of a byte another thread read, with no __syncthreads
// in between, is a race; so is a read of a byte not yet written in this block. This file is
// compiled without instrumentation; harness.cpp (the kernels) is compiled with -fsanitize=thread
// for its instrumentation only, and the __tsan_* entry points below receive its memory accesses.
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "context.h"
#include "emu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

// 1 in the race-checking build (harness.cpp instrumented), 0 in the sanitizer build.
#ifndef EMU_SHADOW
#define EMU_SHADOW 1
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

extern "C" char __start_emu_shared[], __stop_emu_shared[];  // shared.ld

namespace emu {

// Set by main (case_io.cpp) from the command line: the barrier whose calls are skipped (a mutant).
std::string g_skip_file;
int g_skip_line = -1;
long g_skip_hits = 0;
// Cleared by --no-race-check: the shadow of shared memory is not consulted (a mutant caught then
// was caught by its wrong or schedule-dependent results alone).
bool g_race_check = true;

namespace {

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

// An asynchronous copy (cp.async, __pipeline_memcpy_async) issued and not yet waited for: the
// source bytes as read at issue (zeros for the zfill part), and the commit group it belongs to.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  uint32_t size;
  uint32_t read;  // size - zfill: the bytes read from src
  uint64_t group;
  const void* pc;  // the issuing call
  unsigned char data[16];
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's fake stack while switched out
  State state = State::kDone;
  uint3 tid{};
  int linear = 0;
  int priority = 0;
  // What it waits at.
  const char* file = nullptr;
  int line = 0;
  int site = -1;  // site_of: the call chain of the barrier / exchange
  const char* kind = nullptr;
  int pred = 0;
  unsigned mask = 0;
  int src = -1;
  uint64_t deposit = 0;
  uint64_t result = 0;
  // Its asynchronous copies in flight, in issue order, and the commit groups closed so far (an
  // uncommitted copy belongs to group `groups`).
  std::vector<AsyncCopy> copies;
  uint64_t groups = 0;
};

// One byte of shared memory: the last write and the last read(s) in the current epoch.
struct Shadow {
  uint32_t w_epoch;
  uint32_t r_epoch;
  uint16_t w_tid;
  uint16_t r_tid;
  uint8_t w_atomic;
  uint8_t r_multi;
  uint8_t inflight;  // asynchronous copies in flight into this byte (0 or 1: a second is an error)
};

constexpr size_t kStackBytes = EMU_ASAN ? (512u << 10) : (64u << 10);

// A warp exchange in progress: the lanes arrived so far and where they wait.
struct WarpWait {
  unsigned arrived;
  unsigned mask;
  const char* file;
  int line;
  const char* kind;
  int site;
};

struct Launch {
  const char* kernel = "";
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<WarpWait> warps;
  std::vector<int> runnable;
  int current = -1;
  int done = 0;
  // Block barrier in progress.
  int block_arrived = 0;
  const char* block_file = nullptr;
  int block_line = 0;
  int block_site = -1;
  // Epochs: one per barrier interval, global over the run so old shadow entries never match.
  uint32_t epoch = 1;
  uint32_t block_first_epoch = 1;
  const char* epoch_file = "block start";
  int epoch_line = 0;
  // Schedule.
  std::mt19937_64 rng{1};
  int mode = 0;          // 0: uniform random pick, 1: run-ahead (highest priority first)
  unsigned yield_per_2_16 = 0;  // chance (out of 65536) to yield at a shared-memory access
  int low_priority = 0;
  unsigned char poison = 0xff;
  uint64_t block_counter = 0;
  // Global-memory handoffs (race-checking build): per thread, the epoch, order and place of its
  // last write to global memory and the epoch and order of its last __threadfence; the epoch and
  // thread of the block's last ticket (an atomic on global memory), and the epoch of that
  // thread's __threadfence after it (0: none yet), which lets the block read what the blocks
  // before the ticket wrote.
  std::vector<uint32_t> gwrite_epoch, fence_epoch;
  std::vector<uint64_t> gwrite_seq, fence_seq;
  std::vector<const void*> gwrite_pc;
  uint64_t seq = 0;
  uint32_t ticket_epoch = 0;
  int ticket_tid = -1;
  uint32_t acquire_epoch = 0;
};

Launch g;
Context g_sched_ctx;
void* g_sched_fake_stack = nullptr;
const void* g_sched_stack_bottom = nullptr;
size_t g_sched_stack_size = 0;
char* g_stacks = nullptr;
size_t g_stack_count = 0;
std::vector<Shadow> g_shadow;

// An output buffer of the running launch and, per byte, its writer (writer_mark, 0: none yet).
struct Watched {
  uintptr_t lo = 0;
  size_t bytes = 0;
  const char* name = "";
  std::vector<uint32_t> writer;
};

// A byte's writer in a watched output: block * kMarkBlock + thread + 1 (threads of a block fewer
// than kMarkBlock).
constexpr uint32_t kMarkBlock = 1024;
uint32_t writer_mark(uint32_t block, int thread) {
  return block * kMarkBlock + static_cast<uint32_t>(thread) + 1u;
}
std::vector<Watched> g_watched;
uint32_t g_block_linear = 0;
uint64_t g_seed = 1;

uintptr_t shared_lo() { return reinterpret_cast<uintptr_t>(__start_emu_shared); }
size_t shared_size() { return static_cast<size_t>(__stop_emu_shared - __start_emu_shared); }

std::string run_tool(const std::string& cmd) {
  std::string out;
  if (FILE* f = popen(cmd.c_str(), "r")) {
    char buf[512];
    while (fgets(buf, sizeof buf, f)) out += buf;
    pclose(f);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// This executable's path (for the tools below; /proc/self/exe would name the tool itself).
std::string self_path() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, n) : std::string("/proc/self/exe");
}

// "function at file:line" of a code address in this executable (addr2line), or the bare offset.
std::string where_code(const void* pc) {
  Dl_info info{};
  if (!pc || !dladdr(pc, &info) || !info.dli_fbase) return "?";
  char off_hex[32];
  const uintptr_t off =
      reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  snprintf(off_hex, sizeof off_hex, "0x%lx", static_cast<unsigned long>(off));
  std::string s =
      run_tool("addr2line -C -f -i -p -e '" + self_path() + "' " + off_hex + " 2>/dev/null");
  return s.empty() ? std::string("pc offset ") + std::to_string(off) : s;
}

// "variable+offset" of a shared-memory address (nm over this executable).
std::string where_shared(uintptr_t addr) {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&where_shared), &info)) return "?";
  const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  const std::string table = run_tool("nm -C -n '" + self_path() + "' 2>/dev/null");
  std::string best = "?";
  uintptr_t best_addr = 0;
  size_t pos = 0;
  while (pos < table.size()) {
    size_t end = table.find('\n', pos);
    if (end == std::string::npos) end = table.size();
    const std::string row = table.substr(pos, end - pos);
    pos = end + 1;
    char* rest = nullptr;
    const unsigned long a = strtoul(row.c_str(), &rest, 16);
    if (rest == row.c_str() || row.size() < 20 || row.compare(19, 2, "__") == 0) continue;
    if (base + a <= addr && base + a >= best_addr) {
      best_addr = base + a;
      best = row.substr(19);
    }
  }
  return best + "+" + std::to_string(addr - best_addr);
}

[[noreturn]] void die(const char* fmt, ...) {
  fflush(stdout);
  fprintf(stderr, "EMU-ERROR %s block (%u,%u,%u) thread %d seed %llu: ", g.kernel, blockIdx.x,
          blockIdx.y, blockIdx.z, g.current >= 0 ? g.fibers[g.current].linear : -1,
          static_cast<unsigned long long>(g_seed));
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n");
  fflush(stderr);
  _exit(3);
}

const char* base_name(const char* path) {
  const char* s = strrchr(path, '/');
  return s ? s + 1 : path;
}

bool skipped(const char* file, int line) {
  if (line != g_skip_line || g_skip_file != base_name(file)) return false;
  ++g_skip_hits;
  return true;
}

// ---- call sites ---------------------------------------------------------------------------------
//
// The lanes of a warp meet at a shuffle, and the threads of a block at a __syncthreads, only when
// they are at the same call: the same line (the __FILE__:__LINE__ the macros pass) reached through
// the same chain of calls. Helpers such as warp_sum or block_scan hold the intrinsic on their own
// line, so the line alone would pair lanes that entered the helper from two different callers. A
// site is therefore the chain of source locations of the call into this runtime: the intrinsic's
// line and the call lines of every inlined function around it, read from the debug line tables
// (harness.cpp is built with -g1) by one addr2line process per run, once per distinct return
// address. Every __device__ function is inlined in this build (include/cuda_runtime.h), so that
// chain reaches the kernel; code the compiler duplicated keeps its source locations, so two copies
// of one call are one site.

struct Symbolizer {
  bool started = false;
  FILE* to = nullptr;    // addr2line's stdin
  FILE* from = nullptr;  // its stdout
};
Symbolizer g_symbolizer;
std::unordered_map<uintptr_t, int> g_site_by_pc;
std::unordered_map<std::string, int> g_site_by_chain;
std::vector<std::string> g_site_chain;  // site -> "file:line < file:line < ..." (innermost first)

void start_symbolizer() {
  Symbolizer& s = g_symbolizer;
  s.started = true;
  signal(SIGPIPE, SIG_IGN);  // an addr2line that died shows as a failed write, then end of file
  int in[2], out[2];
  if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) die("cannot make pipes");
  const std::string exe = self_path();
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  char* argv[] = {const_cast<char*>("addr2line"), const_cast<char*>("-a"),
                  const_cast<char*>("-i"), const_cast<char*>("-e"), const_cast<char*>(exe.c_str()),
                  nullptr};
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, "addr2line", &fa, nullptr, argv, ::environ);
  posix_spawn_file_actions_destroy(&fa);
  close(in[0]);
  close(out[1]);
  if (rc != 0)
    die("cannot start addr2line (binutils), which tells the call sites of barriers and shuffles "
        "apart: %s", strerror(rc));
  s.to = fdopen(in[1], "w");
  s.from = fdopen(out[0], "r");
}

// "file:line" with the directory and any "(discriminator N)" removed.
std::string short_location(const char* row) {
  std::string r(row);
  while (!r.empty() && (r.back() == '\n' || r.back() == ' ')) r.pop_back();
  const size_t disc = r.find(" (discriminator");
  if (disc != std::string::npos) r.erase(disc);
  const size_t slash = r.rfind('/');
  return slash == std::string::npos ? r : r.substr(slash + 1);
}

// The inlined call chain of the call whose return address is pc, innermost first; "" when the
// debug information does not cover it (then the address itself stands for the site, which may
// tell two copies of one call apart: a false "divergent" rather than a missed one).
std::string call_chain(const void* pc) {
  Dl_info info{};
  if (!pc || !dladdr(pc, &info) || !info.dli_fbase) return "";
  if (!g_symbolizer.started) start_symbolizer();
  Symbolizer& s = g_symbolizer;
  if (!s.to || !s.from) return "";
  const uintptr_t off =
      reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  // The address, then address 0 as an end marker: with -a every answer starts with its address.
  fprintf(s.to, "0x%lx\n0\n", static_cast<unsigned long>(off));
  fflush(s.to);
  char row[4096];
  std::string chain;
  bool first = true, known = false;
  while (fgets(row, sizeof row, s.from)) {
    if (row[0] == '0' && row[1] == 'x') {
      if (first) {
        first = false;
        continue;
      }
      if (!fgets(row, sizeof row, s.from)) break;  // the marker's "??:0"
      return known ? chain : "";
    }
    const std::string loc = short_location(row);
    known |= loc.compare(0, 2, "??") != 0;
    chain += (chain.empty() ? "" : " < ") + loc;
  }
  // addr2line ended: the following lookups fall back to addresses too
  fclose(s.to);
  fclose(s.from);
  s.to = s.from = nullptr;
  return "";
}

// The site of the runtime call whose return address is pc (see above).
int site_of(const void* pc) {
  const uintptr_t key = reinterpret_cast<uintptr_t>(pc);
  auto it = g_site_by_pc.find(key);
  if (it != g_site_by_pc.end()) return it->second;
  std::string chain = call_chain(pc);
  if (chain.empty()) {
    char buf[40];
    snprintf(buf, sizeof buf, "pc %p", pc);
    chain = buf;
  }
  auto [at, added] = g_site_by_chain.emplace(chain, static_cast<int>(g_site_chain.size()));
  if (added) g_site_chain.push_back(chain);
  g_site_by_pc.emplace(key, at->second);
  return at->second;
}

// A site for messages: its chain without the frames of the stand-in headers and of the harness
// around the kernel, e.g. "kernel_utils.cuh:261 < qk_topn_kernel.cuh:300".
std::string site_name(int site) {
  if (site < 0 || static_cast<size_t>(site) >= g_site_chain.size()) return "?";
  const std::string& chain = g_site_chain[site];
  std::string out;
  size_t pos = 0;
  while (pos <= chain.size()) {
    size_t end = chain.find(" < ", pos);
    if (end == std::string::npos) end = chain.size();
    const std::string loc = chain.substr(pos, end - pos);
    pos = end + 3;
    if (loc.rfind("harness.cpp:", 0) == 0 || loc.rfind("emu.h:", 0) == 0) break;
    if (loc.rfind("cuda_runtime.h:", 0) == 0 || loc.rfind("cuda_pipeline_primitives.h:", 0) == 0)
      continue;
    out += (out.empty() ? "" : " < ") + loc;
  }
  return out.empty() ? chain : out;
}

// ---- fibers -------------------------------------------------------------------------------------

void switch_to_scheduler(Fiber& f, bool finished) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, g_sched_stack_bottom,
                                 g_sched_stack_size);
#endif
  context_switch(f.ctx, g_sched_ctx);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
  (void)finished;
}

void fiber_entry() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
  g.body(g.ctx);
  Fiber& f = g.fibers[g.current];
  f.state = State::kDone;
  ++g.done;
  if (g.block_arrived > 0)
    die("exited while %d threads wait at __syncthreads (%s): every thread of the block must "
        "reach it", g.block_arrived, site_name(g.block_site).c_str());
  const WarpWait& w = g.warps[f.linear / 32];
  if (w.arrived != 0 && (w.mask >> (f.linear % 32) & 1u))
    die("exited while other lanes of its warp wait for it at %s (%s)", w.kind,
        site_name(w.site).c_str());
  switch_to_scheduler(f, true);
  die("a finished fiber was resumed");
}

// Suspends the running fiber (its state says why) and runs the scheduler.
void suspend() { switch_to_scheduler(g.fibers[g.current], false); }

void make_runnable(int t) {
  g.fibers[t].state = State::kRunnable;
  g.runnable.push_back(t);
}

int pick_next() {
  size_t k = 0;
  if (g.mode == 0) {
    k = std::uniform_int_distribution<size_t>(0, g.runnable.size() - 1)(g.rng);
  } else {
    for (size_t i = 1; i < g.runnable.size(); ++i)
      if (g.fibers[g.runnable[i]].priority > g.fibers[g.runnable[k]].priority) k = i;
  }
  const int t = g.runnable[k];
  g.runnable[k] = g.runnable.back();
  g.runnable.pop_back();
  return t;
}

std::string describe_waits() {
  std::string s;
  for (const Fiber& f : g.fibers) {
    if (f.state != State::kBlockBarrier && f.state != State::kWarpBarrier) continue;
    char buf[400];
    snprintf(buf, sizeof buf, "\n  thread %d at %s (%s)", f.linear,
             f.state == State::kBlockBarrier ? "__syncthreads" : f.kind,
             site_name(f.site).c_str());
    s += buf;
    if (s.size() > 2000) break;
  }
  return s;
}

void poison_shared() {
  char* lo = __start_emu_shared;
  const size_t n = shared_size();
#if EMU_ASAN
  // Skip the redzones the address sanitizer keeps between the variables.
  char* p = lo;
  while (p < lo + n) {
    char* bad = static_cast<char*>(__asan_region_is_poisoned(p, lo + n - p));
    char* stop = bad ? bad : lo + n;
    memset(p, g.poison, stop - p);
    if (!bad) break;
    p = bad;
    while (p < lo + n && __asan_address_is_poisoned(p)) ++p;
  }
#else
  memset(lo, g.poison, n);
#endif
}

void run_block() {
  g.runnable.clear();
  g.done = 0;
  g.block_arrived = 0;
  for (WarpWait& w : g.warps) w.arrived = 0;
  g.epoch += 1;
  g.block_first_epoch = g.epoch;
  g.epoch_file = "block start";
  g.epoch_line = 0;
  static const unsigned char kPoison[3] = {0xff, 0xab, 0x7f};  // NaN / -1, junk, huge
  g.poison = kPoison[(g.block_counter++ + g_seed) % 3];
  poison_shared();
  for (int t = 0; t < g.nthreads; ++t) {
    Fiber& f = g.fibers[t];
    f.tid = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.linear = t;
    f.priority = static_cast<int>(g.rng() % 1000000) + 1000000;
    f.fake_stack = nullptr;
    f.copies.clear();
    f.groups = 0;
#if EMU_ASAN
    // The previous block's frames on this stack never returned; clear their redzones.
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    context_start(f.ctx, f.stack, kStackBytes, fiber_entry);
    make_runnable(t);
  }
  g.low_priority = 1000000;
  while (g.done < g.nthreads) {
    if (g.runnable.empty())
      die("deadlock: no thread can run; %d of %d finished, the others wait at different "
          "barriers:%s", g.done, g.nthreads, describe_waits().c_str());
    const int t = pick_next();
    g.current = t;
    threadIdx = g.fibers[t].tid;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&g_sched_fake_stack, g.fibers[t].stack, kStackBytes);
#endif
    context_switch(g_sched_ctx, g.fibers[t].ctx);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(g_sched_fake_stack, nullptr, nullptr);
#endif
  }
  g.current = -1;
  // Copies a thread never waited for (it exited with them in flight) never land: their
  // destinations keep the poison, and until here any access to them was an error.
  for (Fiber& f : g.fibers) {
    if (EMU_SHADOW && !g_shadow.empty())
      for (const AsyncCopy& c : f.copies)
        for (uint32_t i = 0; i < c.size; ++i)
          g_shadow[reinterpret_cast<uintptr_t>(c.dst) - shared_lo() + i].inflight = 0;
    f.copies.clear();
  }
}

// ---- shared-memory shadow -----------------------------------------------------------------------

[[noreturn]] void race(const char* what, size_t off, int other, const void* pc) {
  die("%s on shared memory %s (byte %zu of the shared section) with thread %d, both after the "
      "barrier at %s:%d with no __syncthreads in between; access at %s", what,
      where_shared(shared_lo() + off).c_str(), off, other, base_name(g.epoch_file), g.epoch_line,
      where_code(pc).c_str());
}

void maybe_yield() {
  if (g.yield_per_2_16 == 0 || (g.rng() & 0xffff) >= g.yield_per_2_16) return;
  Fiber& f = g.fibers[g.current];
  if (g.mode == 1) f.priority = --g.low_priority;  // run-ahead: the yielding thread goes last
  make_runnable(g.current);
  suspend();
}

// The in-flight asynchronous copy (of any thread) that writes the shared byte at addr.
const AsyncCopy* copy_into(uintptr_t addr, int* owner) {
  for (const Fiber& f : g.fibers)
    for (const AsyncCopy& c : f.copies)
      if (addr - reinterpret_cast<uintptr_t>(c.dst) < c.size) {
        *owner = f.linear;
        return &c;
      }
  return nullptr;
}

[[noreturn]] void inflight_access(const char* what, uintptr_t addr, const void* pc) {
  int owner = -1;
  const AsyncCopy* c = copy_into(addr, &owner);
  die("%s shared memory %s while an asynchronous copy into it (__pipeline_memcpy_async by thread "
      "%d at %s) is in flight: its data is undefined until that thread's __pipeline_wait_prior "
      "has waited for the copy's commit group; access at %s", what, where_shared(addr).c_str(),
      owner, c ? where_code(c->pc).c_str() : "?", where_code(pc).c_str());
}

// kind: 0 read, 1 write, 2 atomic read-modify-write. may_yield: false for the runtime's own
// records (an asynchronous copy's writes).
void shared_access(uintptr_t addr, size_t size, int kind, const void* pc, bool may_yield = true) {
  const uintptr_t off = addr - shared_lo();
  if (!EMU_SHADOW || off >= shared_size() || g.current < 0) return;
  if (!g_race_check) {
    if (may_yield) maybe_yield();
    return;
  }
  const uint16_t me = static_cast<uint16_t>(g.fibers[g.current].linear);
  const uint32_t e = g.epoch;
  for (size_t i = 0; i < size && off + i < g_shadow.size(); ++i) {
    Shadow& s = g_shadow[off + i];
    if (s.inflight)
      inflight_access(kind == 0 ? "read of" : kind == 1 ? "write to" : "atomic on", addr + i, pc);
    const bool written_now = s.w_epoch == e && s.w_tid != me;
    const bool read_now = s.r_epoch == e && (s.r_tid != me || s.r_multi);
    if (kind != 1 && s.w_epoch < g.block_first_epoch)
      die("read of shared memory %s not written in this block (it holds the poison of the "
          "previous block); access at %s", where_shared(addr + i).c_str(), where_code(pc).c_str());
    if (kind == 0) {
      if (written_now) race("read-after-write race", off + i, s.w_tid, pc);
      if (s.r_epoch != e) {
        s.r_epoch = e;
        s.r_tid = me;
        s.r_multi = 0;
      } else if (s.r_tid != me) {
        s.r_multi = 1;
      }
    } else {
      if (written_now && !(kind == 2 && s.w_atomic))
        race(kind == 2 ? "atomic-after-write race" : "write-after-write race", off + i, s.w_tid,
             pc);
      if (read_now) race("write-after-read race", off + i, s.r_tid, pc);
      s.w_epoch = e;
      s.w_tid = me;
      s.w_atomic = kind == 2;
    }
  }
  if (may_yield) maybe_yield();
}

// Global memory a running kernel's thread touches: not shared memory, not a fiber's stack.
bool in_global(uintptr_t addr) {
  const uintptr_t stacks = reinterpret_cast<uintptr_t>(g_stacks);
  return g.current >= 0 && addr - shared_lo() >= shared_size() &&
         !(addr >= stacks && addr - stacks < g_stack_count * kStackBytes);
}

// A write to a launch's watched buffers (its outputs and scratch, the global memory a block can
// hand to another; race-checking build). Another block reads what a block hands over after that
// block's ticket, so no thread may write there in the epoch of a ticket another thread of the
// block took: that write is not ordered before the ticket.
void global_write(const void* pc) {
  const int me = g.fibers[g.current].linear;
  if (g.ticket_epoch == g.epoch && g.ticket_tid != me)
    die("write to global memory at %s after thread %d's ticket (an atomic on global memory) in "
        "the same barrier interval: the blocks that read it after the ticket may not see it (a "
        "__syncthreads must order every write of the block before the ticket)",
        where_code(pc).c_str(), g.ticket_tid);
  g.gwrite_epoch[me] = g.epoch;
  g.gwrite_seq[me] = ++g.seq;
  g.gwrite_pc[me] = pc;
}

// An atomic on global memory is taken for a ticket that hands the block's global writes to the
// block that takes the last one (the kernels have no other: qk_select_kernel's last_slice), as
// in a grid-wide sync: every other thread's writes ordered before it by a barrier, then a
// __threadfence by the ticket's thread, after its own writes, in the same barrier interval.
void global_ticket(const void* pc) {
  const int me = g.fibers[g.current].linear;
  for (int t = 0; t < g.nthreads; ++t) {
    if (t != me && g.gwrite_epoch[t] == g.epoch)
      die("ticket (an atomic on global memory) at %s in the barrier interval of thread %d's write "
          "to global memory at %s: that write is not ordered before the ticket (a __syncthreads "
          "must come between)", where_code(pc).c_str(), t, where_code(g.gwrite_pc[t]).c_str());
  }
  if (g.fence_epoch[me] != g.epoch || g.fence_seq[me] < g.gwrite_seq[me])
    die("ticket (an atomic on global memory) at %s without a __threadfence by its thread since "
        "the last barrier and its own last write: the block's writes are not made visible to the "
        "blocks that read them after the ticket", where_code(pc).c_str());
  g.ticket_epoch = g.epoch;
  g.ticket_tid = me;
  g.acquire_epoch = 0;
}

// A read of a watched output that another block wrote in this launch: blocks run in no order on
// a GPU, so the write is visible only through a ticket. This block must have taken one and its
// ticket's thread fenced after it (the acquiring half of the handoff: without it the reads may
// see the other blocks' memory from before their tickets), with a barrier between that fence and
// another thread's read.
void handed_over_read(const Watched& w, size_t byte, uint32_t writer, const void* pc) {
  const int me = g.fibers[g.current].linear;
  const bool ticket = g.ticket_epoch >= g.block_first_epoch;
  const bool fenced = ticket && g.acquire_epoch != 0 &&
                      (me == g.ticket_tid || g.acquire_epoch < g.epoch);
  if (!fenced)
    die("read of output %s byte %zu at %s, written by block %u in this launch, %s", w.name,
        byte, where_code(pc).c_str(), (writer - 1) / kMarkBlock,
        !ticket ? "without a ticket (an atomic on global memory) that hands it over"
        : g.acquire_epoch == 0 ? "after the block's ticket but without a __threadfence by the "
                                 "ticket's thread after it"
                               : "in the barrier interval of the ticket thread's __threadfence "
                                 "(a __syncthreads must come between)");
}

// A kernel that faults (an out-of-bounds shared or global access the address sanitizer does not
// watch in this build) is reported like the other errors, with its block and thread.
void on_fault(int sig) {
  char msg[256];
  const int n = snprintf(msg, sizeof msg,
                         "EMU-ERROR %s block (%u,%u,%u) thread %d seed %llu: signal %d (%s) in the "
                         "kernel\n", g.kernel, blockIdx.x, blockIdx.y, blockIdx.z,
                         g.current >= 0 ? g.fibers[g.current].linear : -1,
                         static_cast<unsigned long long>(g_seed), sig, strsignal(sig));
  if (n > 0) (void)!write(2, msg, static_cast<size_t>(n));
  _exit(3);
}

void install_fault_handler() {
  static bool done = false;
  if (done || EMU_ASAN) return;
  done = true;
  static char alt_stack[1 << 16];
  stack_t ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_handler = on_fault;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGFPE, &sa, nullptr);
}

// The watched output holding addr, or nullptr.
Watched* watched_at(uintptr_t addr) {
  for (Watched& w : g_watched)
    if (addr - w.lo < w.bytes) return &w;
  return nullptr;
}

// A write into a watched output: a byte another thread of the launch wrote already is an error
// (two threads, or two blocks, computing the same output element).
void output_write(uintptr_t addr, size_t size, const void* pc) {
  Watched* w = g.current < 0 ? nullptr : watched_at(addr);
  if (w == nullptr) return;
  if (g_race_check) global_write(pc);  // what another block may read after a ticket
  const uint32_t me = writer_mark(g_block_linear, g.fibers[g.current].linear);
  for (size_t i = addr - w->lo; i < addr - w->lo + size && i < w->bytes; ++i) {
    uint32_t& prev = w->writer[i];
    if (prev != 0 && prev != me)
      die("output %s byte %zu written twice in one launch: by block %u thread %u and by this "
          "thread; access at %s", w->name, i, (prev - 1) / kMarkBlock, (prev - 1) % kMarkBlock,
          where_code(pc).c_str());
    prev = me;
  }
}

// A read of a watched output: where another block of the launch wrote the byte, the read must be
// handed over by a ticket (handed_over_read); the race-checking build only.
void output_read(uintptr_t addr, size_t size, const void* pc) {
  const Watched* w = g.current < 0 || !g_race_check ? nullptr : watched_at(addr);
  if (w == nullptr) return;
  for (size_t i = addr - w->lo; i < addr - w->lo + size && i < w->bytes; ++i) {
    const uint32_t prev = w->writer[i];
    if (prev != 0 && (prev - 1) / kMarkBlock != g_block_linear) {
      handed_over_read(*w, i, prev, pc);
      return;
    }
  }
}

}  // namespace

// ---- the interface of emu.h ---------------------------------------------------------------------

void watch_output(void* p, size_t bytes, const char* name) {
  if (!EMU_SHADOW || bytes == 0) return;
  Watched w;
  w.lo = reinterpret_cast<uintptr_t>(p);
  w.bytes = bytes;
  w.name = name;
  w.writer.assign(bytes, 0u);
  g_watched.push_back(std::move(w));
}

void set_schedule(uint64_t seed) {
  g_seed = seed;
  g.rng.seed(seed * 0x9e3779b97f4a7c15ull + 12345);
  // Three schedules in turn: uniform random picks; random picks that also switch at 1 in 8
  // shared-memory accesses; run-ahead (one thread runs as far as it can before the next starts,
  // in a random order) with rare switches at shared-memory accesses.
  g.mode = seed % 3 == 2 ? 1 : 0;
  g.yield_per_2_16 = seed % 3 == 0 ? 0 : seed % 3 == 1 ? 8192 : 256;
}

void launch_raw(dim3 grid, dim3 block, const char* kernel, void (*body)(void*), void* ctx) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads < 1 || nthreads > 1024) die("block of %d threads", nthreads);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535)
    die("invalid grid (%u,%u,%u)", grid.x, grid.y, grid.z);
  install_fault_handler();
  if (EMU_SHADOW && g_shadow.size() != shared_size()) g_shadow.assign(shared_size(), Shadow{});
  if (g_stack_count < static_cast<size_t>(nthreads)) {
    if (g_stacks) munmap(g_stacks, g_stack_count * kStackBytes);
    g_stacks = static_cast<char*>(mmap(nullptr, nthreads * kStackBytes, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (g_stacks == MAP_FAILED) die("cannot map fiber stacks");
    g_stack_count = nthreads;
  }
  g.kernel = kernel;
  g.body = body;
  g.ctx = ctx;
  g.nthreads = nthreads;
  g.fibers.assign(nthreads, Fiber{});
  g.warps.assign((nthreads + 31) / 32, WarpWait{});
  g.gwrite_epoch.assign(nthreads, 0);
  g.fence_epoch.assign(nthreads, 0);
  g.gwrite_seq.assign(nthreads, 0);
  g.fence_seq.assign(nthreads, 0);
  g.gwrite_pc.assign(nthreads, nullptr);
  g.ticket_epoch = 0;
  for (int t = 0; t < nthreads; ++t) g.fibers[t].stack = g_stacks + t * kStackBytes;
  gridDim = grid;
  blockDim = block;
  // The blocks in a seeded random order, as a GPU promises none: a kernel whose blocks hand work
  // to each other (the select's last block of a row merges its slices) must not depend on which.
  std::vector<uint64_t> order(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), g.rng);
  for (const uint64_t linear : order) {
    blockIdx = {static_cast<unsigned>(linear % grid.x),
                static_cast<unsigned>(linear / grid.x % grid.y),
                static_cast<unsigned>(linear / grid.x / grid.y)};
    g_block_linear = static_cast<uint32_t>(linear);
    run_block();
  }
  g_watched.clear();
}

int sync_block(int pred, int mode, const char* file, int line) {
  if (g.current < 0) fail("__syncthreads outside a kernel", file, line);
  if (skipped(file, line)) return pred;
  const int site = site_of(__builtin_return_address(0));
  if (g.done > 0) {
    for (int t = 0; t < g.nthreads; ++t)
      if (g.fibers[t].state == State::kDone)
        die("reached __syncthreads (%s) after thread %d of the block exited",
            site_name(site).c_str(), t);
  }
  if (g.block_arrived == 0) {
    g.block_file = file;
    g.block_line = line;
    g.block_site = site;
  } else if (g.block_site != site || g.block_line != line ||
             (g.block_file != file && strcmp(g.block_file, file) != 0)) {
    die("divergent __syncthreads: this thread is at %s, others wait at %s",
        site_name(site).c_str(), site_name(g.block_site).c_str());
  }
  Fiber& f = g.fibers[g.current];
  f.state = State::kBlockBarrier;
  f.file = file;
  f.line = line;
  f.site = site;
  f.pred = pred;
  if (++g.block_arrived == g.nthreads) {
    int all = 1, any = 0, count = 0;
    for (const Fiber& o : g.fibers) {
      all &= o.pred != 0;
      any |= o.pred != 0;
      count += o.pred != 0;
    }
    const int result = mode == 1 ? all : mode == 2 ? any : count;
    g.block_arrived = 0;
    g.epoch += 1;
    g.epoch_file = file;
    g.epoch_line = line;
    // Every thread resumes in a random order (the runnable set is drawn from at random, or by
    // fresh random priorities in run-ahead mode).
    for (int t = 0; t < g.nthreads; ++t) {
      g.fibers[t].result = static_cast<uint64_t>(result);
      g.fibers[t].priority = static_cast<int>(g.rng() % 1000000) + 1000000;
      make_runnable(t);
    }
  }
  suspend();
  return static_cast<int>(g.fibers[g.current].result);
}

uint64_t shuffle(unsigned mask, uint64_t bits, int src, const char* kind, const char* file,
                 int line) {
  if (g.current < 0) fail("warp intrinsic outside a kernel", file, line);
  const int site = site_of(__builtin_return_address(0));
  Fiber& f = g.fibers[g.current];
  const int warp = f.linear / 32, lane = f.linear % 32;
  const int warp_size = std::min(32, g.nthreads - warp * 32);
  const unsigned live = warp_size == 32 ? 0xffffffffu : (1u << warp_size) - 1u;
  if (!(mask >> lane & 1u)) die("%s (%s:%d) with a mask 0x%08x that excludes the calling lane %d",
                                kind, base_name(file), line, mask, lane);
  if (mask & ~live) die("%s (%s:%d) with mask 0x%08x names lanes past the end of the block", kind,
                        base_name(file), line, mask);
  if (src >= 0 && !(mask >> src & 1u))
    die("%s (%s:%d) reads lane %d, which is not in the mask 0x%08x", kind, base_name(file), line,
        src, mask);
  f.state = State::kWarpBarrier;
  f.file = file;
  f.line = line;
  f.site = site;
  f.kind = kind;
  f.mask = mask;
  f.src = src;
  f.deposit = bits;
  WarpWait& w = g.warps[warp];
  if (w.arrived == 0) {
    w = {0u, mask, file, line, kind, site};
  } else if (w.site != site || w.line != line || w.mask != mask ||
             (w.file != file && strcmp(w.file, file) != 0)) {
    die("divergent warp: lane %d is at %s (%s, mask 0x%08x) while other lanes wait at %s "
        "(%s, mask 0x%08x)", lane, kind, site_name(site).c_str(), mask, w.kind,
        site_name(w.site).c_str(), w.mask);
  }
  if (g.done > 0) {
    for (int l = 0; l < warp_size; ++l)
      if ((mask >> l & 1u) && g.fibers[warp * 32 + l].state == State::kDone)
        die("%s (%s:%d): lane %d of the mask has exited; a shuffle must be reached by every lane "
            "of its mask", kind, base_name(file), line, l);
  }
  w.arrived |= 1u << lane;
  if (w.arrived == mask) {
    w.arrived = 0;
    for (int l = 0; l < warp_size; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& o = g.fibers[warp * 32 + l];
      o.result = o.src < 0 ? o.deposit : g.fibers[warp * 32 + o.src].deposit;
      make_runnable(warp * 32 + l);
    }
  }
  suspend();
  return g.fibers[g.current].result;
}

int lane_id() { return g.current < 0 ? 0 : g.fibers[g.current].linear % 32; }

void thread_fence() {
  if (!EMU_SHADOW || !g_race_check || g.current < 0) return;
  const int me = g.fibers[g.current].linear;
  g.fence_epoch[me] = g.epoch;
  g.fence_seq[me] = ++g.seq;
  if (g.ticket_epoch >= g.block_first_epoch && me == g.ticket_tid) g.acquire_epoch = g.epoch;
}

int atomic_add(int* p, int v) {
  shared_access(reinterpret_cast<uintptr_t>(p), sizeof(int), 2, __builtin_return_address(0));
  if (EMU_SHADOW && g_race_check && in_global(reinterpret_cast<uintptr_t>(p)))
    global_ticket(__builtin_return_address(0));
  const int old = *p;
  *p = old + v;
  return old;
}

unsigned atomic_or(unsigned* p, unsigned v) {
  shared_access(reinterpret_cast<uintptr_t>(p), sizeof(unsigned), 2, __builtin_return_address(0));
  const unsigned old = *p;
  *p = old | v;
  return old;
}

// ---- asynchronous copies (cp.async) -------------------------------------------------------------
//
// As on the GPU, a copy completes at an unknown time between its issue and the
// __pipeline_wait_prior that waits for its commit group: here it lands exactly at that wait, and
// until then its destination holds poison and is marked in flight, so that any access to it (by
// any thread) stops the run. The source is read at issue (the kernels copy from inputs that no
// thread writes during the launch; a source changed before the copy lands is reported).

void async_copy(void* dst, const void* src, size_t size, size_t zfill) {
  const void* pc = __builtin_return_address(0);
  if (g.current < 0) die("__pipeline_memcpy_async outside a kernel; at %s", where_code(pc).c_str());
  if (size != 4 && size != 8 && size != 16)
    die("__pipeline_memcpy_async copies 4, 8 or 16 bytes, not %zu; at %s", size,
        where_code(pc).c_str());
  if (zfill > size)
    die("__pipeline_memcpy_async zero-fills %zu of %zu bytes; at %s", zfill, size,
        where_code(pc).c_str());
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d % size != 0 || s % size != 0)
    die("misaligned __pipeline_memcpy_async (cp.async) of %zu bytes: destination %p (%s), source "
        "%p (%s); both must be aligned to the copy size (the GPU faults); at %s", size, dst,
        d % size ? "misaligned" : "aligned", src, s % size ? "misaligned" : "aligned",
        where_code(pc).c_str());
  if (d - shared_lo() >= shared_size() || d - shared_lo() + size > shared_size())
    die("__pipeline_memcpy_async destination %p is not shared memory; at %s", dst,
        where_code(pc).c_str());
  if (s - shared_lo() < shared_size())
    die("__pipeline_memcpy_async source %p is shared memory (cp.async reads global memory); at %s",
        src, where_code(pc).c_str());
  Fiber& f = g.fibers[g.current];
  AsyncCopy c{};
  c.dst = static_cast<unsigned char*>(dst);
  c.src = static_cast<const unsigned char*>(src);
  c.size = static_cast<uint32_t>(size);
  c.read = static_cast<uint32_t>(size - zfill);
  c.group = f.groups;
  c.pc = pc;
  memcpy(c.data, src, c.read);
  // The destination is written by this thread at an unknown time from now on: a write for the
  // race check, then poison and in flight until the copy lands.
  shared_access(d, size, 1, pc, false);
  memset(dst, g.poison, size);
  if (EMU_SHADOW && g_race_check)
    for (size_t i = 0; i < size; ++i) g_shadow[d - shared_lo() + i].inflight = 1;
  f.copies.push_back(c);
}

void async_commit() {
  const void* pc = __builtin_return_address(0);
  if (g.current < 0) die("__pipeline_commit outside a kernel; at %s", where_code(pc).c_str());
  ++g.fibers[g.current].groups;
}

void async_wait_prior(size_t n) {
  const void* pc = __builtin_return_address(0);
  if (g.current < 0) die("__pipeline_wait_prior outside a kernel; at %s", where_code(pc).c_str());
  Fiber& f = g.fibers[g.current];
  // All committed groups but the newest n; copies not committed yet are in no group and stay.
  const uint64_t limit = f.groups > n ? f.groups - n : 0;
  size_t landed = 0;
  for (; landed < f.copies.size() && f.copies[landed].group < limit; ++landed) {
    const AsyncCopy& c = f.copies[landed];
    if (memcmp(c.data, c.src, c.read) != 0)
      die("the source of an asynchronous copy (issued at %s) changed before the copy landed; at "
          "%s", where_code(c.pc).c_str(), where_code(pc).c_str());
    const uintptr_t d = reinterpret_cast<uintptr_t>(c.dst);
    if (EMU_SHADOW && g_race_check)
      for (uint32_t i = 0; i < c.size; ++i) g_shadow[d - shared_lo() + i].inflight = 0;
    memcpy(c.dst, c.data, c.read);
    memset(c.dst + c.read, 0, c.size - c.read);
    shared_access(d, c.size, 1, c.pc, false);  // the issuing thread's write, now
  }
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<std::ptrdiff_t>(landed));
}

void fail(const char* what, const char* file, int line) {
  die("%s (%s:%d)", what, base_name(file), line);
}

}  // namespace emu

// ---- entry points of GCC's -fsanitize=thread instrumentation (harness.cpp only) -----------------

// One entry point: __tsan_<kind><n>(p), a read (is_write 0) or write (1) of n bytes at p.
#define EMU_TSAN_ENTRY(kind, n, is_write)                                                         \
  void __tsan_##kind##n(void* p) {                                                                \
    emu::shared_access_hook(p, n, is_write, __builtin_return_address(0));                        \
  }
#define EMU_TSAN_ACCESS(n)                                                                        \
  EMU_TSAN_ENTRY(read, n, 0)                                                                      \
  EMU_TSAN_ENTRY(write, n, 1)                                                                     \
  EMU_TSAN_ENTRY(unaligned_read, n, 0)                                                            \
  EMU_TSAN_ENTRY(unaligned_write, n, 1)                                                           \
  EMU_TSAN_ENTRY(volatile_read, n, 0)                                                             \
  EMU_TSAN_ENTRY(volatile_write, n, 1)

namespace emu {
inline void shared_access_hook(void* p, size_t n, int kind, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - shared_lo() < shared_size()) {
    shared_access(a, n, kind, pc);
    return;
  }
  if (!g_watched.empty()) (kind == 1 ? output_write : output_read)(a, n, pc);
}
}  // namespace emu

extern "C" {
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)
void __tsan_read_range(void* p, size_t n) {
  emu::shared_access_hook(p, n, 0, __builtin_return_address(0));
}
void __tsan_write_range(void* p, size_t n) {
  emu::shared_access_hook(p, n, 1, __builtin_return_address(0));
}
// Atomics of the C++ library (shared_ptr reference counts) in harness.cpp; never shared memory.
int __tsan_atomic32_fetch_add(volatile int* p, int v, int) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
int __tsan_atomic32_load(const volatile int* p, int) {
  return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
