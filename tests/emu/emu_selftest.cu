// Self-test of the CUDA emulator (cuda_emu.h), built by build.py like engine.cu and driven by
// tests/test_engine_emulated.py: well-defined collectives whose results are checked, and one
// kernel per kind of undefined behaviour that the emulator must report as an error.
// Every entry point launches one kernel on 64 threads (2 warps) and writes out[0..63].
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

}  // namespace

extern "C" {
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
