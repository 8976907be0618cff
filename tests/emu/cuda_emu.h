// cuda_emu.h: the kernel side of a small emulation of the CUDA execution model, so that g++ (C++20)
// compiles a .cu file as host code and runs its kernels on the CPU (tests/emu/build.py).
//
// Include this first; the .cu file's `kernel<<<grid, block, shmem, stream>>>(args)` launches must
// have been rewritten to `::cuda_emu::launch("kernel", ::cuda_emu::config(grid, block, shmem, stream),
// kernel, args)` (build.py does that mechanically). The real toolkit headers come first, so __half /
// __nv_bfloat16 and their host conversion functions are NVIDIA's own (true rounding).
//
// Everything with state lives in cuda_emu_runtime.cpp (not instrumented): the scheduler, the warp
// collectives, the barrier, the atomics and the race detector. The kernel translation unit is
// compiled with -fsanitize=thread but linked WITHOUT ThreadSanitizer's runtime: the compiler's
// __tsan_readN / __tsan_writeN hooks on every memory access of the kernels are served by the
// runtime's own detector, which knows the CUDA model (docs/cuda.md, "The CPU emulator"):
//   * a data race: two accesses to one address, at least one a write, not both atomic, that the
//     CUDA model does not order: from different blocks of one launch, or from different threads of
//     one block with no __syncthreads between them (shared and global memory alike);
//   * an access outside every live allocation's bounds (guard bands around each allocation);
//   * a read of shared memory that no thread of the block has written.
// Undefined behaviour of the collectives is an error too: a shuffle or vote whose mask names a lane
// that has exited or does not exist, a lane outside the mask calling it, lanes of one collective
// disagreeing on the operation, mask, width or call site, a partial __syncthreads, a deadlock, an
// invalid launch configuration. The first error is sticky (like a CUDA sticky error): it abandons
// the block, later launches do nothing, and cuda_emu::error() returns it until clear_error().
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <math.h>  // the global isfinite / isnan of device code
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

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
// One static copy per __shared__ variable, in a section the runtime finds by its linker symbols:
// blocks run one at a time, and the runtime fills the section with 0xff bytes (NaN) before each.
#define __shared__ static __attribute__((section("cuda_emu_shared")))
#define __constant__ static

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

enum class Op { ShflIdx, ShflXor, ShflUp, ShflDown, Any, All, Ballot, SyncWarp };

struct LaunchConfig {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
};
inline LaunchConfig config(dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t stream = nullptr) {
  return LaunchConfig{grid, block, shmem, stream};
}

// ---- runtime entry points (cuda_emu_runtime.cpp) ---------------------------------------------------
// Runs every block of one launch; body(arg) runs the kernel for the current thread.
void run_launch(const char* name, const LaunchConfig& cfg, void (*body)(void*), void* arg);
uint64_t collective(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file, unsigned line,
                    unsigned column);
void syncthreads(const char* file, unsigned line);
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
int32_t atomic_min_i32(int32_t* addr, int32_t v);
int32_t atomic_max_i32(int32_t* addr, int32_t v);
int32_t atomic_add_i32(int32_t* addr, int32_t v);
uint32_t atomic_add_u32(uint32_t* addr, uint32_t v);
unsigned long long atomic_add_u64(unsigned long long* addr, unsigned long long v);
float atomic_add_f32(float* addr, float v);
int32_t atomic_cas_i32(int32_t* addr, int32_t compare, int32_t v);
const char* error();
void clear_error();

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
  Body<std::tuple<std::decay_t<P>...>, void (*)(P...)> body{kernel, {std::forward<A>(args)...}};
  run_launch(name, cfg, &decltype(body)::run, &body);
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

}  // namespace cuda_emu

// ---- the device-side names -----------------------------------------------------------------------
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
#define warpSize (::cuda_emu::kWarpSize)

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  cuda_emu::syncthreads(loc.file_name(), loc.line());
}
inline void __syncwarp(unsigned mask = cuda_emu::kFullMask, std::source_location loc = std::source_location::current()) {
  cuda_emu::collective(cuda_emu::Op::SyncWarp, mask, 0, 0, cuda_emu::kWarpSize, loc.file_name(), loc.line(),
                       loc.column());
}

#define CUDA_EMU_SHUFFLE(NAME, OP, ARG)                                                                      \
  template <class T>                                                                                        \
  T NAME(unsigned mask, T var, ARG arg, int width = cuda_emu::kWarpSize,                                    \
         std::source_location loc = std::source_location::current()) {                                     \
    return cuda_emu::from_bits<T>(cuda_emu::collective(cuda_emu::Op::OP, mask, cuda_emu::to_bits(var),      \
                                                       static_cast<int>(arg), width, loc.file_name(),       \
                                                       loc.line(), loc.column()));                          \
  }
CUDA_EMU_SHUFFLE(__shfl_sync, ShflIdx, int)
CUDA_EMU_SHUFFLE(__shfl_xor_sync, ShflXor, int)
CUDA_EMU_SHUFFLE(__shfl_up_sync, ShflUp, unsigned)
CUDA_EMU_SHUFFLE(__shfl_down_sync, ShflDown, unsigned)
#undef CUDA_EMU_SHUFFLE

#define CUDA_EMU_VOTE(NAME, OP, RET)                                                                          \
  inline RET NAME(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {      \
    return static_cast<RET>(cuda_emu::collective(cuda_emu::Op::OP, mask, pred != 0, 0, cuda_emu::kWarpSize,   \
                                                 loc.file_name(), loc.line(), loc.column()));                 \
  }
CUDA_EMU_VOTE(__any_sync, Any, int)
CUDA_EMU_VOTE(__all_sync, All, int)
CUDA_EMU_VOTE(__ballot_sync, Ballot, unsigned)
#undef CUDA_EMU_VOTE

// Atomics: performed (and recorded as atomic accesses for the race detector) by the runtime.
inline int atomicMin(int* a, int v) { return cuda_emu::atomic_min_i32(a, v); }
inline int atomicMax(int* a, int v) { return cuda_emu::atomic_max_i32(a, v); }
inline int atomicAdd(int* a, int v) { return cuda_emu::atomic_add_i32(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return cuda_emu::atomic_add_u32(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return cuda_emu::atomic_add_u64(a, v); }
inline float atomicAdd(float* a, float v) { return cuda_emu::atomic_add_f32(a, v); }
inline int atomicCAS(int* a, int compare, int v) { return cuda_emu::atomic_cas_i32(a, compare, v); }
