// The side outputs' arg-max (docs/math.md, "Side outputs"), shared by the kernel files that track
// it in their forward epilogue (engine.cu: the margin losses; onevsall.cu: the one-vs-all losses):
// the order on (value, class) candidates and its warp and block reductions. Torch-free, device
// code only. In an unnamed namespace, as the other block reductions: each kernel file gets its own
// copy of block_argmax's __shared__ arrays.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

namespace magloss {
namespace engine {
namespace {

constexpr int kArgmaxWarp = 32;
constexpr unsigned kArgmaxMask = 0xffffffffu;

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

// Keeps (v, idx) if it beats the running candidate (bv, bi).
__device__ __forceinline__ void argmax_take(float v, int64_t idx, float& bv, int64_t& bi) {
  if (argmax_beats(v, idx, bv, bi)) {
    bv = v;
    bi = idx;
  }
}

// Butterfly arg-max over the full warp: every lane must call it; every lane gets the winner.
__device__ __forceinline__ void warp_argmax(float& v, int64_t& idx) {
  #pragma unroll
  for (int off = kArgmaxWarp / 2; off > 0; off >>= 1) {
    const float v2 = __shfl_xor_sync(kArgmaxMask, v, off);
    const int64_t i2 = __shfl_xor_sync(kArgmaxMask, idx, off);
    argmax_take(v2, i2, v, idx);
  }
}

// Block-wide arg-max of a kThreads-thread block, valid in thread 0. Every thread of the block must
// call it (it contains __syncthreads); it ends with a barrier after warp 0's last read of its
// shared arrays, so a block may call it again right away.
template <int kThreads>
__device__ __forceinline__ void block_argmax(float& v, int64_t& idx) {
  constexpr int kWarps = kThreads / kArgmaxWarp;
  __shared__ float sv[kWarps];
  __shared__ int64_t si[kWarps];
  const int lane = threadIdx.x % kArgmaxWarp, warp = threadIdx.x / kArgmaxWarp;
  warp_argmax(v, idx);
  if (lane == 0) { sv[warp] = v; si[warp] = idx; }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sv[lane] : -INFINITY;
    idx = lane < kWarps ? si[lane] : -1;
    warp_argmax(v, idx);
  }
  __syncthreads();  // sv/si are read: safe to reuse
}

}  // namespace
}  // namespace engine
}  // namespace magloss
