// The runtime of the CUDA emulator (see cuda_emu.h): scheduler, warp collectives, barrier, atomics,
// the race / bounds detector fed by the kernels' -fsanitize=thread instrumentation hooks, the parts
// of the CUDA runtime API the torch boundary calls, and the emulator's C controls (emu_*).
//
// Not instrumented itself, and torch-free: linked into the emulated extension (with
// torch_shims.cpp) and into the emulator's self-test library.
//
// Execution model. Blocks of a launch run one at a time, in an order set by the schedule; the
// threads of a block are cooperative fibers on ONE OS thread that switch at __syncthreads, at warp
// collectives and at exit. Concurrency is not needed to see races: the detector checks every pair
// of accesses the CUDA model leaves unordered, whatever order they ran in here.
//
// Race detector. Per 2-byte granule of a tracked allocation (and of the __shared__ section) it
// keeps the last write and the reads since it: who (block, thread) and when (the block's barrier
// phase: how many __syncthreads the block has completed). Two accesses are ordered iff they come
// from one block and either one thread or different phases; __syncwarp and the warp collectives
// are not treated as memory ordering. Atomic read-modify-writes do not race with each other.
// Global shadow state lives for one launch (launches on the stream are ordered), shared shadow
// state for one block. Granules are 2 bytes: two threads writing the two bytes of one 2-byte
// granule would be reported although they do not race (the kernels store nothing narrower).
#include <cuda_runtime_api.h>

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__) || defined(CUDA_EMU_UCONTEXT)
#include <ucontext.h>
#endif

extern "C" {
extern char __start_cuda_emu_shared[] __attribute__((weak));
extern char __stop_cuda_emu_shared[] __attribute__((weak));
}

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 128 * 1024;

// ---- context switch --------------------------------------------------------------------------
#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save and continues on `next` (System V ABI: nothing else is preserved).
extern "C" void cuda_emu_switch(void** save, void* next);
asm(R"(
  .pushsection .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw 12(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw 12(%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
  .popsection
)");
struct Context {
  void* sp = nullptr;
};
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top);
  slot[-2] = reinterpret_cast<uint64_t>(entry);  // `ret` target; rsp = top - 8 on entry, as after a call
  for (int k = 3; k <= 8; ++k) slot[-k] = 0;     // rbp, rbx, r12-r15
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
  auto* fp = reinterpret_cast<unsigned char*>(&slot[-10]);
  std::memcpy(fp + 8, &mxcsr, 4);
  std::memcpy(fp + 12, &fpcw, 2);
  c.sp = fp;
}
void switch_context(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- state -----------------------------------------------------------------------------------
enum class State { Runnable, AtWarp, AtBlock, Done };

struct Site {
  const char* file = "";
  unsigned line = 0, column = 0;
  bool operator==(const Site& o) const { return line == o.line && column == o.column && std::strcmp(file, o.file) == 0; }
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  uint3 tid{};
  unsigned linear = 0;
  State state = State::Done;
  Op op{};
  unsigned mask = 0;
  int arg = 0, width = 0;
  uint64_t value = 0, result = 0;
  Site site;
};

struct Emu {
  std::mutex mutex;                 // one launch at a time (the static __shared__ arrays are global)
  std::vector<Fiber> fibers;        // one per thread of the running block
  Fiber* cur = nullptr;             // the running fiber; null outside kernels
  Context sched;
  uint3 block_idx{};
  unsigned block_linear = 0;
  dim3 block_dim, grid_dim;
  unsigned nthreads = 0, at_block = 0, exited = 0;
  uint32_t phase = 0;               // __syncthreads completed by the running block
  std::vector<unsigned> warp_waiting, warp_exited;  // per warp of the block: lane bitmasks
  void (*body)(void*) = nullptr;    // runs the kernel for the current fiber
  void* body_arg = nullptr;
  const char* kernel = "";
  bool failed = false;
  std::string error;
  int schedule = 0;                 // 0 ascending, 1 descending, 2 pseudo-random orders
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  uint32_t launch_epoch = 0, block_epoch = 0;
  // CUDA runtime emulation
  cudaError_t last_error = cudaSuccess;
  int event_delay = 0;              // an event reports "not ready" to this many queries
  uint64_t host_waits = 0;          // cudaEventSynchronize calls
  int cc_major = 9, cc_minor = 0;   // the emulated device's compute capability
  bool capturing = false;           // emulated CUDA-graph capture of the current stream
  std::string inject;               // emu_fail_next_launch: the next launch fails with this message
};
Emu g;

std::string where(const Fiber* f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s: block (%u,%u,%u) thread (%u,%u,%u)", g.kernel, g.block_idx.x, g.block_idx.y,
                g.block_idx.z, f->tid.x, f->tid.y, f->tid.z);
  return buf;
}
std::string site_str(const Site& s) {
  return std::string(s.file) + ":" + std::to_string(s.line) + ":" + std::to_string(s.column);
}

void fail(const std::string& msg) {
  if (!g.failed) {
    g.failed = true;
    g.error = "cuda_emu: " + msg;
    g.last_error = cudaErrorLaunchFailure;
  }
}

// Back to the scheduler; returns when this fiber is resumed.
void yield() { switch_context(g.cur->ctx, g.sched); }

// Reports `msg` and abandons the block: the fiber is never resumed.
[[noreturn]] void fail_here(const std::string& msg) {
  fail(msg);
  yield();
  std::abort();  // unreachable: a failed block is never resumed
}

uint64_t next_random() {
  g.rng ^= g.rng << 13;
  g.rng ^= g.rng >> 7;
  g.rng ^= g.rng << 17;
  return g.rng;
}

// The order in which the scheduler visits n items (threads of a block, or blocks).
void visit_order(std::vector<unsigned>& order, unsigned n) {
  order.resize(n);
  for (unsigned k = 0; k < n; ++k) order[k] = g.schedule == 1 ? n - 1 - k : k;
  if (g.schedule == 2) {
    for (unsigned k = n; k > 1; --k) std::swap(order[k - 1], order[next_random() % k]);
  }
}

// ---- race and bounds detector ------------------------------------------------------------------
struct Who {
  uint32_t block = 0, phase = 0;
  uint32_t thread = 0;
};

struct Shadow {
  uint32_t epoch = 0;  // valid only when equal to the current launch (global) or block (shared) epoch
  uint8_t w_valid = 0, w_atomic = 0, r_valid = 0, r_multi = 0, r_cross = 0, r_atomic = 0;
  Who w, r;
};

struct Region {
  uintptr_t glo = 0, ghi = 0;  // with guard bands
  uintptr_t lo = 0, hi = 0;    // the caller's bytes
  std::vector<Shadow> shadow;  // lazily, one per 2-byte granule of [lo, hi)
};

std::mutex regions_mu;
std::map<uintptr_t, std::unique_ptr<Region>> regions;  // by glo
constexpr unsigned kCache = 8;
Region* recent[kCache] = {};  // the regions found last (kernels alternate between a few buffers)
unsigned recent_next = 0;
std::vector<Shadow> shared_shadow;

uintptr_t untracked_pages[kCache] = {};  // pages with no tracked byte (host data, kernel arguments)
unsigned untracked_next = 0;

void forget_cached() {
  std::fill(std::begin(recent), std::end(recent), nullptr);
  std::fill(std::begin(untracked_pages), std::end(untracked_pages), 0);
}

Region* find_region(uintptr_t a) {
  for (Region* r : recent)
    if (r != nullptr && a >= r->glo && a < r->ghi) return r;
  const uintptr_t page = (a >> 12) + 1;
  for (uintptr_t p : untracked_pages)
    if (p == page) return nullptr;
  const std::lock_guard<std::mutex> lock(regions_mu);
  auto it = regions.lower_bound((page - 1) << 12);  // first region starting on or after the page
  const bool page_untracked = (it == regions.end() || it->first >= (page << 12)) &&
                              (it == regions.begin() || std::prev(it)->second->ghi <= ((page - 1) << 12));
  if (page_untracked) {
    untracked_pages[untracked_next++ % kCache] = page;
    return nullptr;
  }
  it = regions.upper_bound(a);
  if (it == regions.begin()) return nullptr;
  --it;
  Region* r = it->second.get();
  if (a >= r->ghi) return nullptr;
  recent[recent_next++ % kCache] = r;
  return r;
}

bool ordered(const Who& a, const Who& b) { return a.block == b.block && (a.thread == b.thread || a.phase != b.phase); }

// "function (file:line)" of a code address in a kernel, by addr2line on the library's debug
// information (the kernels are compiled with -g; their symbols are local); "lib+0xoffset" without it.
std::string demangled(void* pc) {
  Dl_info info{};
  if (pc == nullptr || dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return "?";
  const auto off = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  char hex[32];
  std::snprintf(hex, sizeof hex, "0x%zx", static_cast<size_t>(off));
  const std::string fallback = std::string(info.dli_fname) + "+" + hex;
  const std::string cmd = std::string("addr2line -f -C -e '") + info.dli_fname + "' " + hex + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return fallback;
  char fn[512] = {0}, loc[512] = {0};
  const bool ok = std::fgets(fn, sizeof fn, p) != nullptr && std::fgets(loc, sizeof loc, p) != nullptr;
  pclose(p);
  if (!ok || fn[0] == '?') return fallback;
  std::string f(fn), l(loc);
  while (!f.empty() && f.back() == '\n') f.pop_back();
  while (!l.empty() && l.back() == '\n') l.pop_back();
  for (size_t at; (at = f.find("(anonymous namespace)::")) != std::string::npos;) f.erase(at, 23);
  const size_t paren = f.find('(');  // drop the parameter list
  if (paren != std::string::npos) f = f.substr(0, paren);
  return f + " (" + l + ")";
}

std::string who_str(const Who& w) {
  const unsigned gx = g.grid_dim.x, gy = g.grid_dim.y;
  const unsigned bx = g.block_dim.x, by = g.block_dim.y;
  char buf[128];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", w.block % gx, w.block / gx % gy,
                w.block / (gx * gy), w.thread % bx, w.thread / bx % by, w.thread / (bx * by));
  return buf;
}

void report_race(const char* space, bool write, bool prev_write, const Who& prev, const Who& now, size_t offset,
                 size_t bytes, void* pc) {
  const bool same_block = prev.block == now.block;
  fail(std::string("data race in ") + g.kernel + " on " + space + " memory (byte " + std::to_string(offset) + " of " +
       std::to_string(bytes) + "): " + (write ? "write" : "read") + " by " + who_str(now) + " in " + demangled(pc) +
       " and an earlier " + (prev_write ? "write" : "read") + " by " + who_str(prev) +
       (same_block ? ", with no __syncthreads between them" : ", another block of the same launch"));
}

// One access of `size` bytes at byte `off` of an object tracked by `shadow` (2-byte granules).
void track(std::vector<Shadow>& shadow, uint32_t epoch, const char* space, size_t off, size_t bytes, size_t size,
           bool write, bool atomic, bool check_init, void* pc) {
  const Who now{g.block_linear, g.phase, g.cur->linear};
  for (size_t k = off / 2; k <= (off + size - 1) / 2 && k < shadow.size(); ++k) {
    Shadow& s = shadow[k];
    if (s.epoch != epoch) {
      if (check_init && !write) {
        fail(std::string("read of uninitialized shared memory in ") + g.kernel + " (byte " + std::to_string(k * 2) +
             " of the __shared__ section) by " + who_str(now) + " in " + demangled(pc) +
             ": no thread of this block has written it");
        return;
      }
      s = Shadow{};
      s.epoch = epoch;
    }
    if (s.w_valid && !ordered(s.w, now) && !(atomic && s.w_atomic)) {
      report_race(space, write, true, s.w, now, k * 2, bytes, pc);
      return;
    }
    if (write) {
      if (s.r_valid && !(atomic && s.r_atomic)) {
        const bool clash = s.r_multi ? (s.r_cross || s.r.block != now.block || s.r.phase == now.phase)
                                     : !ordered(s.r, now);
        if (clash) {
          report_race(space, true, false, s.r, now, k * 2, bytes, pc);
          return;
        }
      }
      s.w_valid = 1;
      s.w_atomic = atomic;
      s.w = now;
      s.r_valid = 0;  // every read before an ordered write is ordered before the next access too
    } else if (!s.r_valid || ordered(s.r, now)) {
      s.r_valid = 1;
      s.r_multi = s.r_cross = 0;
      s.r_atomic = atomic;
      s.r = now;
    } else if (s.r.thread != now.thread || s.r.block != now.block) {
      s.r_multi = 1;
      s.r_cross |= s.r.block != now.block;
      s.r_atomic &= atomic;
      s.r = now;
    }
  }
}

void on_access(void* addr, size_t size, bool write, bool atomic, void* pc) {
  Fiber* f = g.cur;
  if (f == nullptr || g.failed) return;  // host code, or the launch is already abandoned
  const auto a = reinterpret_cast<uintptr_t>(addr);
  if (a - reinterpret_cast<uintptr_t>(f->stack) < kStackBytes) return;  // the thread's own stack
  const auto slo = reinterpret_cast<uintptr_t>(__start_cuda_emu_shared);
  const auto shi = reinterpret_cast<uintptr_t>(__stop_cuda_emu_shared);
  if (a >= slo && a < shi) {
    track(shared_shadow, g.block_epoch, "shared", a - slo, shi - slo, size, write, atomic, /*check_init=*/true, pc);
    return;
  }
  Region* r = find_region(a);
  if (r == nullptr) return;  // memory the emulator does not track (host data, untracked allocations)
  if (a < r->lo || a + size > r->hi) {
    const bool before = a < r->lo;
    const size_t dist = before ? r->lo - a : a + size - r->hi;
    fail(std::string("out-of-bounds ") + (write ? "write" : "read") + " in " + g.kernel + " by " + where(f) + " in " +
         demangled(pc) + ": " + std::to_string(size) + " bytes at " + std::to_string(dist) + " byte(s) " +
         (before ? "before the start" : "past the end") + " of a " + std::to_string(r->hi - r->lo) + "-byte allocation");
    return;
  }
  if (r->shadow.empty()) r->shadow.resize((r->hi - r->lo + 1) / 2);
  track(r->shadow, g.launch_epoch, "global", a - r->lo, r->hi - r->lo, size, write, atomic, false, pc);
}

// ---- warp collectives ------------------------------------------------------------------------
unsigned warp_base(const Fiber* f) { return f->linear / kWarpSize * kWarpSize; }

// Lanes [0, n) of f's warp exist (the last warp of a block may be partial).
unsigned warp_lanes(const Fiber* f) {
  const unsigned n = g.nthreads - warp_base(f);
  return n < kWarpSize ? n : kWarpSize;
}

uint64_t collective_result(const Fiber& f, const Fiber* lanes, unsigned mask) {
  const unsigned lane = f.linear % kWarpSize;
  if (f.op == Op::Any || f.op == Op::All || f.op == Op::Ballot) {
    unsigned ballot = 0;
    for (unsigned l = 0; l < kWarpSize; ++l)
      if ((mask >> l & 1u) && lanes[l].value != 0) ballot |= 1u << l;
    if (f.op == Op::Ballot) return ballot;
    return f.op == Op::Any ? ballot != 0 : ballot == mask;
  }
  if (f.op == Op::SyncWarp) return 0;
  const unsigned w = static_cast<unsigned>(f.width);
  const unsigned group = lane & ~(w - 1);
  int src = static_cast<int>(lane);
  switch (f.op) {
    case Op::ShflIdx: src = static_cast<int>(group + (static_cast<unsigned>(f.arg) & (w - 1))); break;
    case Op::ShflXor: src = static_cast<int>(lane ^ static_cast<unsigned>(f.arg)); break;
    case Op::ShflUp: src = static_cast<int>(lane) - f.arg; break;
    case Op::ShflDown: src = static_cast<int>(lane) + f.arg; break;
    default: break;
  }
  const bool outside = src < static_cast<int>(group) || src >= static_cast<int>(group + w);
  // xor / idx reach earlier groups; up / down / out-of-group xor return the caller's own value.
  if (outside && !(f.op == Op::ShflXor && src < static_cast<int>(group))) return f.value;
  if (!(mask >> src & 1u))
    fail("shuffle at " + site_str(f.site) + " reads lane " + std::to_string(src) + ", which is not in the mask (" +
         where(&f) + "): undefined value");
  return lanes[src].value;
}

void on_exit(Fiber* f) {
  f->state = State::Done;
  ++g.exited;
  if (g.at_block > 0)
    fail("thread exits while " + std::to_string(g.at_block) +
         " thread(s) of its block wait at __syncthreads: not every thread reaches it (" + where(f) + ")");
  const unsigned lane = f->linear % kWarpSize, warp = f->linear / kWarpSize;
  g.warp_exited[warp] |= 1u << lane;
  const Fiber* lanes = f - lane;
  for (unsigned l = 0; l < warp_lanes(f); ++l)
    if (lanes[l].state == State::AtWarp && (lanes[l].mask >> lane & 1u))
      fail("lane " + std::to_string(lane) + " exits while lane " + std::to_string(l) +
           " waits at the warp collective at " + site_str(lanes[l].site) + " whose mask names it (" + where(f) + ")");
}

void fiber_main() {
  Fiber* f = g.cur;
  g.body(g.body_arg);
  on_exit(f);
  yield();
  std::abort();  // unreachable: a finished fiber is never resumed
}

char* stack_of(unsigned t) {
  static std::vector<char*> stacks;
  while (stacks.size() <= t) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults
    stacks.push_back(static_cast<char*>(p) + page);
  }
  return stacks[t];
}

// Runs the block g.block_idx to completion (or to the first error).
void run_block() {
  const size_t shared_bytes = static_cast<size_t>(__stop_cuda_emu_shared - __start_cuda_emu_shared);
  if (__start_cuda_emu_shared != nullptr) std::memset(__start_cuda_emu_shared, 0xff, shared_bytes);
  if (shared_shadow.size() < (shared_bytes + 1) / 2) shared_shadow.resize((shared_bytes + 1) / 2);
  ++g.block_epoch;
  g.at_block = g.exited = 0;
  g.phase = 0;
  g.warp_waiting.assign((g.nthreads + kWarpSize - 1) / kWarpSize, 0u);
  g.warp_exited.assign(g.warp_waiting.size(), 0u);
  for (unsigned t = 0; t < g.nthreads; ++t) {
    Fiber& f = g.fibers[t];
    f.linear = t;
    f.tid = uint3{t % g.block_dim.x, t / g.block_dim.x % g.block_dim.y, t / (g.block_dim.x * g.block_dim.y)};
    f.state = State::Runnable;
    f.stack = stack_of(t);
    make_context(f.ctx, f.stack, kStackBytes, fiber_main);
  }
  std::vector<unsigned> order;
  for (;;) {
    visit_order(order, g.nthreads);
    bool ran = false, done = true;
    for (unsigned t : order) {
      Fiber& f = g.fibers[t];
      if (f.state == State::Runnable) {
        g.cur = &f;
        switch_context(g.sched, f.ctx);
        g.cur = nullptr;
        ran = true;
        if (g.failed) return;
      }
      done = done && f.state == State::Done;
    }
    if (done) return;
    if (!ran) {
      unsigned at_warp = 0, first = 0;
      for (unsigned t = g.nthreads; t-- > 0;)
        if (g.fibers[t].state == State::AtWarp) ++at_warp, first = t;
      fail("deadlock in " + std::string(g.kernel) + " block (" + std::to_string(g.block_idx.x) + "," +
           std::to_string(g.block_idx.y) + "," + std::to_string(g.block_idx.z) + "): " + std::to_string(g.at_block) +
           " thread(s) wait at __syncthreads, " + std::to_string(at_warp) + " at warp collectives" +
           (at_warp ? " (thread " + std::to_string(first) + " at " + site_str(g.fibers[first].site) + ")" : ""));
      return;
    }
  }
}

template <class T, class F>
T atomic_rmw(T* addr, void* pc, F&& op) {
  on_access(addr, sizeof(T), /*write=*/true, /*atomic=*/true, pc);
  const T old = *addr;
  *addr = op(old);
  return old;
}

}  // namespace

// ---- kernel-side entry points -------------------------------------------------------------------
void run_launch(const char* name, const LaunchConfig& cfg, void (*body)(void*), void* arg) {
  std::lock_guard<std::mutex> lock(g.mutex);
  if (g.failed) return;  // sticky error: later launches do nothing
  ++g.launch_epoch;
  g.kernel = name;
  if (!g.inject.empty()) {
    fail(g.inject + " in " + name);
    g.inject.clear();
    return;
  }
  const dim3 gr = cfg.grid, bl = cfg.block;
  const uint64_t threads = uint64_t{bl.x} * bl.y * bl.z;
  if (gr.x == 0 || gr.y == 0 || gr.z == 0 || gr.x > 0x7fffffffu || gr.y > 65535 || gr.z > 65535 || threads == 0 ||
      threads > 1024 || bl.x > 1024 || bl.y > 1024 || bl.z > 64) {
    fail(std::string(name) + ": invalid configuration argument (grid " + std::to_string(gr.x) + "x" +
         std::to_string(gr.y) + "x" + std::to_string(gr.z) + ", block " + std::to_string(bl.x) + "x" +
         std::to_string(bl.y) + "x" + std::to_string(bl.z) + ")");
    return;
  }
  if (uint64_t{gr.x} * gr.y * gr.z > 0xffffffffu) {
    fail(std::string(name) + ": grid too large to emulate");
    return;
  }
  if (cfg.shmem != 0) {
    fail(std::string(name) + ": dynamic shared memory is not emulated");
    return;
  }
  g.body = body;
  g.body_arg = arg;
  g.grid_dim = gr;
  g.block_dim = bl;
  g.nthreads = static_cast<unsigned>(threads);
  if (g.fibers.size() < g.nthreads) g.fibers.resize(g.nthreads);
  const uint64_t nblocks = uint64_t{gr.x} * gr.y * gr.z;
  std::vector<unsigned> order;
  visit_order(order, static_cast<unsigned>(nblocks));
  for (unsigned b : order) {
    g.block_linear = b;
    g.block_idx = uint3{b % gr.x, b / gr.x % gr.y, b / (gr.x * gr.y)};
    run_block();
    if (g.failed) return;
  }
}

uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file, unsigned line,
                    unsigned column) {
  Fiber* f = g.cur;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->site = Site{file, line, column};
  const unsigned lane = f->linear % kWarpSize, nl = warp_lanes(f), warp = f->linear / kWarpSize;
  auto at = [&] { return site_str(f->site) + " (" + where(f) + ")"; };
  if (!(mask >> lane & 1u)) fail_here("warp collective at " + at() + " called with a mask that excludes the caller");
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
    fail_here("shuffle width " + std::to_string(width) + " is not a power of 2 <= 32 at " + at());
  if (nl < kWarpSize && (mask >> nl) != 0) fail_here("mask names lanes beyond the block's last thread at " + at());
  if (const unsigned gone = g.warp_exited[warp] & mask)
    fail_here("warp collective at " + at() + " with a mask naming lane " + std::to_string(__builtin_ctz(gone)) +
              ", which has already exited");
  unsigned& waiting = g.warp_waiting[warp];
  waiting |= 1u << lane;
  f->state = State::AtWarp;
  if ((waiting & mask) != mask) {
    yield();  // the last lane to arrive completes the collective
    return f->result;
  }
  Fiber* lanes = f - lane;
  for (unsigned l = 0; l < nl; ++l) {
    const Fiber& o = lanes[l];
    if ((mask >> l & 1u) && (o.op != op || o.mask != mask || o.width != width || !(o.site == f->site)))
      fail_here("lanes " + std::to_string(lane) + " and " + std::to_string(l) + " meet at different warp collectives (" +
                site_str(f->site) + " vs " + site_str(o.site) + ", or another op/mask/width) (" + where(f) + ")");
  }
  for (unsigned l = 0; l < nl; ++l)
    if (mask >> l & 1u) lanes[l].result = collective_result(lanes[l], lanes, mask);
  for (unsigned l = 0; l < nl; ++l)
    if (mask >> l & 1u) lanes[l].state = State::Runnable;
  waiting &= ~mask;
  if (g.failed) yield();
  return f->result;  // the completing lane continues without a switch
}

void syncthreads(const char* file, unsigned line) {
  Fiber* f = g.cur;
  if (g.exited > 0)
    fail_here("__syncthreads at " + std::string(file) + ":" + std::to_string(line) + " after " +
              std::to_string(g.exited) + " thread(s) of the block exited: not every thread reaches it (" + where(f) + ")");
  f->state = State::AtBlock;
  if (++g.at_block < g.nthreads) {
    yield();
    return;
  }
  g.at_block = 0;
  ++g.phase;  // every access after this barrier is ordered after every access before it
  for (unsigned t = 0; t < g.nthreads; ++t) g.fibers[t].state = State::Runnable;
}

uint3 thread_idx() { return g.cur->tid; }
uint3 block_idx() { return g.block_idx; }
dim3 block_dim() { return g.block_dim; }
dim3 grid_dim() { return g.grid_dim; }

int32_t atomic_min_i32(int32_t* a, int32_t v) { return atomic_rmw(a, __builtin_return_address(0), [v](int32_t o) { return std::min(o, v); }); }
int32_t atomic_max_i32(int32_t* a, int32_t v) { return atomic_rmw(a, __builtin_return_address(0), [v](int32_t o) { return std::max(o, v); }); }
int32_t atomic_add_i32(int32_t* a, int32_t v) {
  return atomic_rmw(a, __builtin_return_address(0), [v](int32_t o) { return static_cast<int32_t>(static_cast<uint32_t>(o) + static_cast<uint32_t>(v)); });
}
uint32_t atomic_add_u32(uint32_t* a, uint32_t v) { return atomic_rmw(a, __builtin_return_address(0), [v](uint32_t o) { return o + v; }); }
unsigned long long atomic_add_u64(unsigned long long* a, unsigned long long v) {
  return atomic_rmw(a, __builtin_return_address(0), [v](unsigned long long o) { return o + v; });
}
float atomic_add_f32(float* a, float v) { return atomic_rmw(a, __builtin_return_address(0), [v](float o) { return o + v; }); }
int32_t atomic_cas_i32(int32_t* a, int32_t compare, int32_t v) {
  return atomic_rmw(a, __builtin_return_address(0), [compare, v](int32_t o) { return o == compare ? v : o; });
}

const char* error() { return g.failed ? g.error.c_str() : nullptr; }
void clear_error() {
  g.failed = false;
  g.error.clear();
  g.last_error = cudaSuccess;
}

// Tracking of allocations (the emulated device memory): [base, base + guard_lo) and the guard_hi
// bytes after the caller's `bytes` are guard bands; an access there is out of bounds.
void track_allocation(void* base, size_t guard_lo, size_t bytes, size_t guard_hi) {
  auto r = std::make_unique<Region>();
  r->glo = reinterpret_cast<uintptr_t>(base);
  r->lo = r->glo + guard_lo;
  r->hi = r->lo + bytes;
  r->ghi = r->hi + guard_hi;
  const std::lock_guard<std::mutex> lock(regions_mu);
  forget_cached();
  regions[r->glo] = std::move(r);
}
void untrack_allocation(void* base) {
  const std::lock_guard<std::mutex> lock(regions_mu);
  auto it = regions.find(reinterpret_cast<uintptr_t>(base));
  if (it == regions.end()) return;
  forget_cached();
  regions.erase(it);
}
bool capturing() { return g.capturing; }

}  // namespace cuda_emu

// ---- ThreadSanitizer instrumentation hooks (the kernel TU is compiled with -fsanitize=thread) ----
extern "C" {
#define CUDA_EMU_TSAN_RW(N)                                                                            \
  void __tsan_read##N(void* a) { cuda_emu::on_access(a, N, false, false, __builtin_return_address(0)); } \
  void __tsan_write##N(void* a) { cuda_emu::on_access(a, N, true, false, __builtin_return_address(0)); } \
  void __tsan_unaligned_read##N(void* a) { cuda_emu::on_access(a, N, false, false, __builtin_return_address(0)); } \
  void __tsan_unaligned_write##N(void* a) { cuda_emu::on_access(a, N, true, false, __builtin_return_address(0)); } \
  void __tsan_volatile_read##N(void* a) { cuda_emu::on_access(a, N, false, false, __builtin_return_address(0)); } \
  void __tsan_volatile_write##N(void* a) { cuda_emu::on_access(a, N, true, false, __builtin_return_address(0)); }
CUDA_EMU_TSAN_RW(1)
CUDA_EMU_TSAN_RW(2)
CUDA_EMU_TSAN_RW(4)
CUDA_EMU_TSAN_RW(8)
CUDA_EMU_TSAN_RW(16)
#undef CUDA_EMU_TSAN_RW
void __tsan_read_range(void* a, unsigned long n) {
  if (n > 0) cuda_emu::on_access(a, n, false, false, __builtin_return_address(0));
}
void __tsan_write_range(void* a, unsigned long n) {
  if (n > 0) cuda_emu::on_access(a, n, true, false, __builtin_return_address(0));
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_atomic_thread_fence(int) {}
void __tsan_atomic_signal_fence(int) {}
}

// ---- the CUDA runtime API calls the boundary makes (input_checks.cpp, margin_ce.cpp) --------------
// The emulated stream runs every launch to completion when it is enqueued; an event reports "not
// ready" to emu_set_event_delay(k) queries after its record, so the boundary's non-blocking polling
// is exercised; cudaEventSynchronize is a host wait, counted (emu_host_waits).
struct CUevent_st {
  int not_ready = 0;
};

extern "C" {
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = new CUevent_st();
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  event->not_ready = cuda_emu::g.event_delay;
  return cuda_emu::g.failed ? cudaErrorLaunchFailure : cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  if (event->not_ready > 0) {
    --event->not_ready;
    cuda_emu::g.last_error = cuda_emu::g.failed ? cuda_emu::g.last_error : cudaErrorNotReady;
    return cudaErrorNotReady;
  }
  return cuda_emu::g.failed ? cudaErrorLaunchFailure : cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  ++cuda_emu::g.host_waits;
  event->not_ready = 0;
  return cuda_emu::g.failed ? cudaErrorLaunchFailure : cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g.last_error;
  if (!cuda_emu::g.failed) cuda_emu::g.last_error = cudaSuccess;  // a kernel failure is sticky
  return e;
}
const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (e == cudaErrorNotReady) return "device not ready";
  if (cuda_emu::g.failed) return cuda_emu::g.error.c_str();
  return "unspecified launch failure";
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrComputeCapabilityMajor) {
    *value = cuda_emu::g.cc_major;
  } else if (attr == cudaDevAttrComputeCapabilityMinor) {
    *value = cuda_emu::g.cc_minor;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// ---- the emulator's controls (ctypes) --------------------------------------------------------------
const char* emu_error() { return cuda_emu::error(); }
void emu_clear_error() { cuda_emu::clear_error(); }
// 0: threads and blocks in ascending order; 1: descending; 2: pseudo-random orders from `seed`.
void emu_set_schedule(int mode, uint64_t seed) {
  cuda_emu::g.schedule = mode;
  cuda_emu::g.rng = seed | 1;
}
void emu_set_event_delay(int queries) { cuda_emu::g.event_delay = queries; }
uint64_t emu_host_waits() { return cuda_emu::g.host_waits; }
void emu_set_compute_capability(int major, int minor) {
  cuda_emu::g.cc_major = major;
  cuda_emu::g.cc_minor = minor;
}
void emu_set_capturing(int on) { cuda_emu::g.capturing = on != 0; }
void emu_fail_next_launch(const char* message) { cuda_emu::g.inject = message; }
void emu_track_guarded(void* base, uint64_t guard_lo, uint64_t bytes, uint64_t guard_hi) {
  cuda_emu::track_allocation(base, guard_lo, bytes, guard_hi);
}
void emu_untrack(void* base) { cuda_emu::untrack_allocation(base); }
}
