// Device helpers shared by the kernel files (engine.cu, onevsall.cu): the launch constants,
// the element conversions, the fixed-order warp/block sums and the side outputs' arg-max.
// Torch-free, device code only.
//
// Conversions use the explicit intrinsics only: the torch extension build compiles the kernels
// with -D__CUDA_NO_HALF_CONVERSIONS__ etc. (CMakeLists.txt MAGLOSS_TORCH_LIKE_DEFS does the same).
// The helpers live in an unnamed namespace, as they did inside each .cu file: every kernel file
// gets its own copy, so block_sum2's __shared__ arrays stay private to the file's kernels (the
// CPU emulator, tests/emu, builds the two files as separate units and keeps one static per copy).
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace magloss {
namespace engine {
namespace {

// Block-per-row and warp-per-row kernels launch 256 threads: 8 warps of 32 lanes.
constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element conversions (explicit intrinsics only) ---------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// fp32 to the stored type, round to nearest even.
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- reductions --------------------------------------------------------------------------------
// Butterfly sum over the full warp: every lane must call it (full mask) and every lane gets the
// same total, summed in the same order.
__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;  // every lane holds the (same-order) total
}

// Block-wide sum of two values (a kThreads-thread block). Every thread of the block must call it
// (it contains __syncthreads); the result is valid in thread 0, in a fixed order. It ends with a
// barrier after warp 0's last read of its shared arrays, so a block may call it any number of
// times in a row (the next call's writes cannot overtake this call's reads).
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[kWarpsPerBlock], sb[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarpsPerBlock ? sa[lane] : 0.0f;
    b = lane < kWarpsPerBlock ? sb[lane] : 0.0f;
    a = warp_sum(a);
    b = warp_sum(b);
  }
  __syncthreads();  // sa/sb are read: safe to reuse
}

// ---- the side outputs' arg-max (docs/math.md, "Side outputs") --------------------------------------
// The forward epilogues that track it (engine.cu: the margin losses; onevsall.cu: the one-vs-all
// losses) use these: the order on (value, class) candidates and its warp and block reductions.

// Does (v2, i2) beat (v1, i1)? Index -1 is "nothing seen" and never wins; a NaN value beats every
// number (NaN in, NaN out); equal values go to the lower index. A total order on the candidates,
// so the reductions below give one answer in any visiting order.
__device__ __forceinline__ bool argmax_beats(float v2, int64_t i2, float v1, int64_t i1) {
  if (i2 < 0) return false;
  if (i1 < 0) return true;
  const bool n1 = v1 != v1, n2 = v2 != v2;
  if (n1 || n2) return n2 && (!n1 || i2 < i1);
  return v2 > v1 || (v2 == v1 && i2 < i1);
}

// Keeps (v, idx) in the running candidate (bv, bi) if it beats it.
__device__ __forceinline__ void argmax_take(float v, int64_t idx, float& bv, int64_t& bi) {
  if (argmax_beats(v, idx, bv, bi)) {
    bv = v;
    bi = idx;
  }
}

// Butterfly arg-max over the full warp: every lane must call it; every lane gets the winner.
__device__ __forceinline__ void warp_argmax(float& v, int64_t& idx) {
  #pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float v2 = __shfl_xor_sync(kFullMask, v, off);
    const int64_t i2 = __shfl_xor_sync(kFullMask, idx, off);
    argmax_take(v2, i2, v, idx);
  }
}

// Block-wide arg-max (a kThreads-thread block), valid in thread 0. Every thread of the block must
// call it (it contains __syncthreads); it ends with a barrier after warp 0's last read of its
// shared arrays, as block_sum2.
__device__ __forceinline__ void block_argmax(float& v, int64_t& idx) {
  __shared__ float sv[kWarpsPerBlock];
  __shared__ int64_t si[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_argmax(v, idx);
  if (lane == 0) { sv[warp] = v; si[warp] = idx; }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarpsPerBlock ? sv[lane] : -INFINITY;
    idx = lane < kWarpsPerBlock ? si[lane] : -1;
    warp_argmax(v, idx);
  }
  __syncthreads();  // sv/si are read: safe to reuse
}

}  // namespace
}  // namespace engine
}  // namespace magloss
