// cuda_emu.h: a small emulation of the CUDA execution model, so that g++ (C++20) can compile a
// .cu file as host code and run its kernels on the CPU (tests/emu/build.py; tests/test_engine_emulated.py).
//
// Include this first; the .cu file's `kernel<<<grid, block, shmem, stream>>>(args)` launches must
// have been rewritten to `::cuda_emu::launch("kernel", ::cuda_emu::config(grid, block, shmem, stream),
// kernel, args)` (build.py does that mechanically). The real toolkit headers come first, so __half /
// __nv_bfloat16 and their host conversion functions are NVIDIA's own (true rounding).
//
// Execution model: blocks run one at a time (in an order set by the schedule); the threads of a
// block are cooperative fibers on ONE OS thread that switch only at __syncthreads, at warp
// collectives (__shfl*_sync, __any/__all/__ballot_sync, __syncwarp) and at exit. __shared__ is
// `static` (valid since blocks never overlap), placed in one linker section that is filled with
// 0xff bytes (NaN for floats) before each block, as uninitialized shared memory.
//
// Undefined behaviour is reported, never allowed to "work": a warp collective whose mask names a
// lane that has exited or does not exist, a lane outside the mask calling it, lanes of one
// collective disagreeing on the operation, the mask, the width or the call site, a shuffle
// reading a lane outside the mask, __syncthreads with some thread of the block exited or never
// arriving, any deadlock, and invalid launch configurations. The first error is sticky (like a
// CUDA sticky error): it abandons the block, every later launch is skipped, and the message is
// returned by cuda_emu::error() until clear_error().
//
// Limits: no dynamic shared memory, no launches from device code, no race detector (races show up
// as results that change with the schedule, and unwritten shared memory as NaN); math functions
// are glibc's and g++ contracts no a*b+c into an FMA (nvcc does), so results differ from a GPU's in
// the last bits. The context switch is a few lines of x86-64 assembly; elsewhere, or with
// -DCUDA_EMU_UCONTEXT, it is ucontext's swapcontext (correct, several times slower).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <math.h>  // the global isfinite / isnan of device code
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__) || defined(CUDA_EMU_UCONTEXT)
#include <ucontext.h>
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("cuda_emu_shared")))
#define __constant__ static

extern "C" {
extern char __start_cuda_emu_shared[] __attribute__((weak));
extern char __stop_cuda_emu_shared[] __attribute__((weak));
}

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 128 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

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
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
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
inline void switch_context(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- state -----------------------------------------------------------------------------------
enum class State { Runnable, AtWarp, AtBlock, Done };
enum class Op { ShflIdx, ShflXor, ShflUp, ShflDown, Any, All, Ballot, SyncWarp };

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
  Fiber* cur = nullptr;
  Context sched;
  uint3 block_idx{};
  dim3 block_dim, grid_dim;
  unsigned nthreads = 0, at_block = 0, exited = 0;
  std::vector<unsigned> warp_waiting, warp_exited;  // per warp of the block: lane bitmasks
  void (*body)(void*) = nullptr;    // runs the kernel for the current fiber
  void* body_arg = nullptr;
  const char* kernel = "";
  bool failed = false;
  std::string error;
  int schedule = 0;                 // 0 ascending, 1 descending, 2 pseudo-random orders
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  uint64_t launches = 0;
};
inline Emu g;

inline std::string where(const Fiber* f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s: block (%u,%u,%u) thread (%u,%u,%u)", g.kernel, g.block_idx.x, g.block_idx.y,
                g.block_idx.z, f->tid.x, f->tid.y, f->tid.z);
  return buf;
}
inline std::string site_str(const Site& s) {
  return std::string(s.file) + ":" + std::to_string(s.line) + ":" + std::to_string(s.column);
}

inline void fail(const std::string& msg) {
  if (!g.failed) {
    g.failed = true;
    g.error = "cuda_emu: " + msg;
  }
}

// Back to the scheduler; returns when this fiber is resumed.
inline void yield() {
  switch_context(g.cur->ctx, g.sched);
}

// Reports `msg` and abandons the block: the fiber is never resumed.
[[noreturn]] inline void fail_here(const std::string& msg) {
  fail(msg);
  yield();
  std::abort();  // unreachable: a failed block is never resumed
}

inline uint64_t next_random() {
  g.rng ^= g.rng << 13;
  g.rng ^= g.rng >> 7;
  g.rng ^= g.rng << 17;
  return g.rng;
}

// The order in which the scheduler visits n items (threads of a block, or blocks).
inline void visit_order(std::vector<unsigned>& order, unsigned n) {
  order.resize(n);
  for (unsigned k = 0; k < n; ++k) order[k] = g.schedule == 1 ? n - 1 - k : k;
  if (g.schedule == 2) {
    for (unsigned k = n; k > 1; --k) std::swap(order[k - 1], order[next_random() % k]);
  }
}

// ---- warp collectives ------------------------------------------------------------------------
inline unsigned warp_base(const Fiber* f) { return f->linear / kWarpSize * kWarpSize; }

// Lanes [0, n) of f's warp exist (the last warp of a block may be partial).
inline unsigned warp_lanes(const Fiber* f) {
  const unsigned n = g.nthreads - warp_base(f);
  return n < kWarpSize ? n : kWarpSize;
}

inline uint64_t collective_result(const Fiber& f, const Fiber* lanes, unsigned mask) {
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

inline uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width, const std::source_location& loc) {
  Fiber* f = g.cur;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->site = Site{loc.file_name(), loc.line(), loc.column()};
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

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "cuda_emu: shuffles move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <class T>
T shuffle(Op op, unsigned mask, T v, int arg, int width, const std::source_location& loc) {
  return from_bits<T>(collective(op, mask, to_bits(v), arg, width, loc));
}

// ---- block barrier and thread exit -----------------------------------------------------------
inline void syncthreads(const std::source_location& loc) {
  Fiber* f = g.cur;
  if (g.exited > 0)
    fail_here("__syncthreads at " + std::string(loc.file_name()) + ":" + std::to_string(loc.line()) + " after " +
              std::to_string(g.exited) + " thread(s) of the block exited: not every thread reaches it (" + where(f) + ")");
  f->state = State::AtBlock;
  if (++g.at_block < g.nthreads) {
    yield();
    return;
  }
  g.at_block = 0;
  for (unsigned t = 0; t < g.nthreads; ++t) g.fibers[t].state = State::Runnable;
}

inline void on_exit(Fiber* f) {
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

inline void fiber_main() {
  Fiber* f = g.cur;
  g.body(g.body_arg);
  on_exit(f);
  yield();
  std::abort();  // unreachable: a finished fiber is never resumed
}

inline char* stack_of(unsigned t) {
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
inline void run_block() {
  if (__start_cuda_emu_shared != nullptr)
    std::memset(__start_cuda_emu_shared, 0xff, static_cast<size_t>(__stop_cuda_emu_shared - __start_cuda_emu_shared));
  g.at_block = g.exited = 0;
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

// ---- launch ----------------------------------------------------------------------------------
struct LaunchConfig {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
};
inline LaunchConfig config(dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t stream = nullptr) {
  return LaunchConfig{grid, block, shmem, stream};
}

template <class Tuple, class K>
struct Body {
  K kernel;
  Tuple args;
  static void run(void* self) {
    auto* b = static_cast<Body*>(self);
    std::apply(b->kernel, b->args);  // each thread gets its own copy of the by-value parameters
  }
};

template <class... P, class... A>
void launch(const char* name, const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cuda_emu: wrong number of kernel arguments");
  std::lock_guard<std::mutex> lock(g.mutex);
  if (g.failed) return;  // sticky error: later launches do nothing
  ++g.launches;
  g.kernel = name;
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
  Body<std::tuple<std::decay_t<P>...>, void (*)(P...)> body{kernel, {std::forward<A>(args)...}};
  g.body = &decltype(body)::run;
  g.body_arg = &body;
  g.grid_dim = gr;
  g.block_dim = bl;
  g.nthreads = static_cast<unsigned>(threads);
  if (g.fibers.size() < g.nthreads) g.fibers.resize(g.nthreads);
  const uint64_t nblocks = uint64_t{gr.x} * gr.y * gr.z;
  std::vector<unsigned> order;
  visit_order(order, static_cast<unsigned>(nblocks));
  for (unsigned b : order) {
    g.block_idx = uint3{b % gr.x, b / gr.x % gr.y, b / (gr.x * gr.y)};
    run_block();
    if (g.failed) return;
  }
}

inline const char* error() { return g.failed ? g.error.c_str() : nullptr; }
inline void clear_error() {
  g.failed = false;
  g.error.clear();
}

inline const uint3& thread_idx() { return g.cur->tid; }

}  // namespace cuda_emu

// The emulator's controls, exported by every library built with it (one translation unit each).
extern "C" {
const char* emu_error() { return cuda_emu::error(); }
void emu_clear_error() { cuda_emu::clear_error(); }
// 0: threads and blocks in ascending order; 1: descending; 2: pseudo-random orders from `seed`.
void emu_set_schedule(int mode, uint64_t seed) {
  cuda_emu::g.schedule = mode;
  cuda_emu::g.rng = seed | 1;
}
uint64_t emu_launches() { return cuda_emu::g.launches; }
}

// ---- the device-side names -----------------------------------------------------------------------
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (static_cast<const uint3&>(::cuda_emu::g.block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emu::g.block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::g.grid_dim))
#define warpSize (::cuda_emu::kWarpSize)

inline void __syncthreads(std::source_location loc = std::source_location::current()) { cuda_emu::syncthreads(loc); }
inline void __syncwarp(unsigned mask = cuda_emu::kFullMask, std::source_location loc = std::source_location::current()) {
  cuda_emu::collective(cuda_emu::Op::SyncWarp, mask, 0, 0, cuda_emu::kWarpSize, loc);
}

#define CUDA_EMU_SHUFFLE(NAME, OP, ARG)                                                                     \
  template <class T>                                                                                       \
  T NAME(unsigned mask, T var, ARG arg, int width = cuda_emu::kWarpSize,                                   \
         std::source_location loc = std::source_location::current()) {                                    \
    return cuda_emu::shuffle(cuda_emu::Op::OP, mask, var, static_cast<int>(arg), width, loc);              \
  }
CUDA_EMU_SHUFFLE(__shfl_sync, ShflIdx, int)
CUDA_EMU_SHUFFLE(__shfl_xor_sync, ShflXor, int)
CUDA_EMU_SHUFFLE(__shfl_up_sync, ShflUp, unsigned)
CUDA_EMU_SHUFFLE(__shfl_down_sync, ShflDown, unsigned)
#undef CUDA_EMU_SHUFFLE

#define CUDA_EMU_VOTE(NAME, OP, RET)                                                                         \
  inline RET NAME(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {     \
    return static_cast<RET>(cuda_emu::collective(cuda_emu::Op::OP, mask, pred != 0, 0, cuda_emu::kWarpSize, loc)); \
  }
CUDA_EMU_VOTE(__any_sync, Any, int)
CUDA_EMU_VOTE(__all_sync, All, int)
CUDA_EMU_VOTE(__ballot_sync, Ballot, unsigned)
#undef CUDA_EMU_VOTE

// Atomics (std::atomic_ref; no atomic is a switch point, and fibers share one OS thread anyway).
template <class T>
T atomicMin(T* addr, T val) {
  std::atomic_ref<T> a(*addr);
  T old = a.load();
  while (val < old && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <class T>
T atomicMax(T* addr, T val) {
  std::atomic_ref<T> a(*addr);
  T old = a.load();
  while (val > old && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <class T>
T atomicAdd(T* addr, T val) {
  return std::atomic_ref<T>(*addr).fetch_add(val);
}
