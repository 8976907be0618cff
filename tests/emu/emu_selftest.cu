// Self-test of the CUDA emulator (cuda_emu.h), built by build.py like engine.cu and driven by
// tests/test_engine_emulated.py: well-defined kernels whose results are checked, and one kernel per
// kind of error the emulator must report (undefined behaviour of the collectives, data races,
// out-of-bounds accesses, uninitialized shared memory). Every entry point launches one kernel on
// at most 2 blocks of at most 64 threads and touches only out[0..63] (the test tracks that buffer,
// with guard bands, as emulated device memory), except the out-of-bounds case.
#include <cstdint>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// out[t] = sum of t over the warp, then (down) lane+1's value, then any(lane == 5), then the block
// sum through shared memory.
__global__ void good_kernel(float* out) {
  __shared__ float part[2];
  const unsigned lane = threadIdx.x % 32;
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  const float down = __shfl_down_sync(kFull, static_cast<float>(threadIdx.x), 1);
  const int any = __any_sync(kFull, lane == 5);
  if (lane == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  out[threadIdx.x] = v + 1000.0f * down + 1e6f * static_cast<float>(any) + 1e7f * (part[0] + part[1]);
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x % 32 == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, 1.0f, 1);
}

__global__ void partial_barrier_kernel(float* out) {
  if (threadIdx.x < 40) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_sites_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(kFull, v, 1);
  } else {
    v = __shfl_xor_sync(kFull, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 1.0f, 1);
  } else {
    __syncthreads();
  }
}

__global__ void outside_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

__global__ void uninitialized_shared_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x > 0) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];  // thread 63 reads s[0], never written
}

// ---- the race and bounds detector: one kernel per kind of bug it must report, and legal twins ---
// Shared memory rewritten and read by other threads with no barrier between (the first writes are
// ordered by the barrier, so every read is of initialized memory: only the race is wrong).
__global__ void shared_race_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  s[threadIdx.x] = 2.0f * static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// A block reduction called twice without a barrier at its end: the second call's writes race with
// the first call's reads (engine.cu's block reductions before they ended with a barrier).
__device__ float block_sum_no_tail_barrier(float v) {
  __shared__ float part[2];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  return part[0] + part[1];
}
__global__ void reduction_reuse_race_kernel(float* out) {
  const float a = block_sum_no_tail_barrier(1.0f);
  const float b = block_sum_no_tail_barrier(2.0f);
  out[threadIdx.x] = a + b;
}
__device__ float block_sum_tail_barrier(float v) {
  __shared__ float part[2];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  const float total = part[0] + part[1];
  __syncthreads();
  return total;
}
__global__ void reduction_reuse_ok_kernel(float* out) {
  const float a = block_sum_tail_barrier(1.0f);
  const float b = block_sum_tail_barrier(2.0f);
  out[threadIdx.x] = a + b;
}

// Every block stores into one global element: a race between blocks (needs atomics).
__global__ void cross_block_store_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = static_cast<float>(blockIdx.x);
}
// The same with an atomic: legal.
__global__ void cross_block_atomic_kernel(float* out) {
  if (threadIdx.x == 0) atomicAdd(&out[0], 1.0f);
}
// Every thread of the block overwrites one accumulator (instead of one thread adding to it).
__global__ void same_block_store_kernel(float* out) { out[0] = static_cast<float>(threadIdx.x); }
// A read-modify-write of one global element by thread 0 of each block after all blocks read it.
__global__ void read_then_write_kernel(float* out) {
  const float v = out[5];
  __syncthreads();
  if (threadIdx.x == 0 && blockIdx.x == 1) out[5] = v + 1.0f;
}
// One element past the end of the 64-float buffer.
__global__ void out_of_bounds_kernel(float* out) { out[threadIdx.x + 1] = 1.0f; }
// Every block reads the same inputs, exchanges values through shared memory after a barrier and
// writes its own outputs: legal.
__global__ void disjoint_kernel(float* out) {
  __shared__ float s[16];
  s[threadIdx.x] = out[threadIdx.x % 8];
  __syncthreads();
  out[8 + blockIdx.x * 16 + threadIdx.x] = s[15 - threadIdx.x];
}

// engine.cu's own block reductions (this file is compiled after engine.cu, in one translation
// unit), each called twice in a row by the block: safe only because each ends with a barrier.
__global__ void engine_reductions_twice_kernel(float* out) {
  using namespace magloss::engine;
  const float t = static_cast<float>(threadIdx.x);
  float a = 1.0f, b = t, a2 = 2.0f, b2 = 1.0f;
  block_sum2(a, b);
  block_sum2(a2, b2);
  float m = 0.5f * t, l = 1.0f, m2 = -t, l2 = 2.0f;
  block_softmax_merge(m, l);
  block_softmax_merge(m2, l2);
  if (threadIdx.x == 0) {
    out[0] = a; out[1] = b; out[2] = a2; out[3] = b2;
    out[4] = m; out[5] = l; out[6] = m2; out[7] = l2;
  }
}

}  // namespace

extern "C" {
void selftest_engine_reductions_twice(float* out) { engine_reductions_twice_kernel<<<1, 256>>>(out); }
void selftest_shared_race(float* out) { shared_race_kernel<<<1, 64>>>(out); }
void selftest_reduction_reuse_race(float* out) { reduction_reuse_race_kernel<<<1, 64>>>(out); }
void selftest_reduction_reuse_ok(float* out) { reduction_reuse_ok_kernel<<<1, 64>>>(out); }
void selftest_cross_block_store(float* out) { cross_block_store_kernel<<<2, 64>>>(out); }
void selftest_cross_block_atomic(float* out) { cross_block_atomic_kernel<<<3, 64>>>(out); }
void selftest_same_block_store(float* out) { same_block_store_kernel<<<1, 64>>>(out); }
void selftest_read_then_write(float* out) { read_then_write_kernel<<<2, 64>>>(out); }
void selftest_out_of_bounds(float* out) { out_of_bounds_kernel<<<1, 64>>>(out); }
void selftest_disjoint(float* out) { disjoint_kernel<<<2, 16>>>(out); }
void selftest_good(float* out) { good_kernel<<<1, 64>>>(out); }
void selftest_exited_lane(float* out) { exited_lane_kernel<<<1, 64>>>(out); }
void selftest_partial_barrier(float* out) { partial_barrier_kernel<<<1, 64>>>(out); }
void selftest_barrier_after_exit(float* out) { barrier_after_exit_kernel<<<1, 64>>>(out); }
void selftest_divergent_sites(float* out) { divergent_sites_kernel<<<1, 64>>>(out); }
void selftest_deadlock(float* out) { deadlock_kernel<<<1, 64>>>(out); }
void selftest_outside_mask(float* out) { outside_mask_kernel<<<1, 64>>>(out); }
void selftest_uninitialized_shared(float* out) { uninitialized_shared_kernel<<<1, 64>>>(out); }
void selftest_empty_grid(float* out) { good_kernel<<<0, 64>>>(out); }
void selftest_huge_block(float* out) { good_kernel<<<1, 2048>>>(out); }
}
