// Kernels of the one-vs-all sum engine (torch-free; see onevsall.cuh for the contract).
//
// Launch shapes: the chunk epilogues are block-per-row (256 threads stride over the chunk's n
// columns, then a fixed-order block reduction: warp shuffles, then warp 0 over the 8 warp
// results), as the margin engine's epilogues; the bias sum is one block over the B rows. No
// atomics on floats: bitwise repeatable. All arithmetic is fp32 (the chunked engine's compute
// dtype for fp32/fp16/bf16 inputs); every max, min and clamp keeps a NaN operand (margins.cuh),
// so a NaN cosine gives a NaN loss and NaN derivatives, as torch does in the chunked engine.
// Compiled by the torch extension build (nvcc with -D__CUDA_NO_HALF_CONVERSIONS__ etc.: only
// explicit conversion intrinsics) and by CMakeLists.txt without torch.

#include "onevsall.cuh"
#include "reduce.cuh"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace magloss {
namespace engine {
namespace {

// kThreads, kWarpsPerBlock, from_f, warp_sum, block_sum2: reduce.cuh (shared with engine.cu).

// ---- the elementwise losses (magloss.onevsall.elements, in fp32) -----------------------------------
__device__ __forceinline__ float sigmoid_(float x) { return 1.0f / (1.0f + expf(-x)); }
// log(1 + e^u) to full precision.
__device__ __forceinline__ float softplus_(float u) { return maximum(u, 0.0f) + log1pf(expf(-fabsf(u))); }

// opensphere's clamps of the cosine and the angle in SphereFace2-A/M (the Python constants, in float).
constexpr float kAcosLo = static_cast<float>(-1.0 + 1e-5), kAcosHi = static_cast<float>(1.0 - 1e-5);
constexpr float kThetaLo = 1e-5f, kThetaHi = 3.14159f;

// SphereFace2's g(c) with its margin: C: 2((c+1)/2)^t - 1 -+ m; A/M: 2((cos(theta')+1)/2)^t - 1 with
// theta' = theta + m (A) or theta * m (M) at the label, each theta clamped as opensphere does.
__device__ __forceinline__ float sphereface2_g(float c, bool label, float m, float t, int mtype) {
  if (mtype == 0) {
    const float base = powf((clampf_(c, -1.0f, 1.0f) + 1.0f) / 2.0f, t);
    return 2.0f * base - 1.0f - (label ? m : -m);
  }
  float theta = acosf(clampf_(c, kAcosLo, kAcosHi));
  if (label) theta = mtype == 1 ? theta + m : theta * m;
  theta = clampf_(theta, kThetaLo, kThetaHi);
  return 2.0f * powf((cosf(theta) + 1.0f) / 2.0f, t) - 1.0f;
}

// l(c) (kGrad = false: *loss) or its derivatives dl/dc, dl/db (kGrad = true: *dc, *db), the upstream
// definitions: SFace's sigmoid weights and SphereFace2's g(c) - c carry no gradient; UniFace's clamp
// passes none outside [-s, s] (a multiplication by 0/1, so a NaN stays NaN), nor P2SGrad's outside [-1, 1].
template <bool kGrad>
__device__ __forceinline__ void ova_element(const OvaParams& p, float c, bool label, float b, float* loss, float* dc,
                                            float* db) {
  const float y = label ? 1.0f : 0.0f;
  switch (p.kind) {
    case OVA_SFACE: {
      const float s = p.p[0], k = p.p[1], a = p.p[2], bb = p.p[3];
      const float theta = acosf(clampf_(c, -1.0f, 1.0f));
      const float coef = label ? -s * sigmoid_(k * (theta - a)) : s * sigmoid_(-k * (theta - bb));
      if constexpr (kGrad) {
        *dc = coef;
        *db = 0.0f;
      } else {
        *loss = coef * c;
      }
      return;
    }
    case OVA_UNIFACE: {
      const float s = p.p[0], m = p.p[1], lam = p.p[2];
      const float z = (label ? s * (c - m) : s * c) - b;
      const float zc = clampf_(z, -s, s);
      if constexpr (kGrad) {
        const float inside = (z >= -s && z <= s) ? 1.0f : 0.0f;
        const float dz = (label ? -sigmoid_(-zc) : lam * sigmoid_(zc)) * inside;
        *dc = s * dz;
        *db = -dz;
      } else {
        *loss = label ? softplus_(-zc) : lam * softplus_(zc);
      }
      return;
    }
    case OVA_SPHEREFACE2: {
      const float r = p.p[0];
      const float z = r * sphereface2_g(c, label, p.p[1], p.p[2], static_cast<int>(p.p[5])) + b;
      const float w = label ? p.w_pos : p.w_neg;
      if constexpr (kGrad) {
        const float dz = w * (sigmoid_(z) - y);
        *dc = r * dz;
        *db = dz;
      } else {
        *loss = w * softplus_(label ? -z : z);
      }
      return;
    }
    default: {  // OVA_P2SGRAD
      const float inv_c = p.p[0];
      const float d = clampf_(c, -1.0f, 1.0f) - y;
      if constexpr (kGrad) {
        *dc = 2.0f * inv_c * d * ((c >= -1.0f && c <= 1.0f) ? 1.0f : 0.0f);
        *db = 0.0f;
      } else {
        *loss = inv_c * d * d;
      }
      return;
    }
  }
}

// ---- kernels -------------------------------------------------------------------------------------------

// loss_i += sum_j l(c_ij) over the chunk; one block per row. With the side outputs, the arg-max of
// the non-label cosines next to the sum (engine.cu's forward epilogue does the same).
__global__ void __launch_bounds__(kThreads) ova_forward_kernel(const float* __restrict__ tile, int64_t n, int64_t j0,
                                                               const float* __restrict__ r, OvaParams p,
                                                               OvaRows rows) {
  const int64_t i = blockIdx.x;
  const float inv_a = rows.inv_a[i];
  const int64_t lab = rows.lab[i];
  const float b = rows.bias != nullptr ? *rows.bias : 0.0f;
  const bool side = rows.nn_val != nullptr;  // uniform over the launch
  float bv = -INFINITY;                      // this thread's best non-label cosine, its class
  int64_t bi = -1;
  float acc = 0.0f, none = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const int64_t col = j0 + j;
    const float c = tile[i * n + j] * inv_a * r[col];
    float l;
    ova_element<false>(p, c, col == lab, b, &l, nullptr, nullptr);
    acc += l;
    if (side && col != lab) argmax_take(c, col, bv, bi);
  }
  block_sum2(acc, none);
  if (side) block_argmax(bv, bi);  // (uniform: every thread of the block calls it)
  if (threadIdx.x == 0) {
    rows.loss[i] = lab == LAB_BAD ? NAN : rows.loss[i] + acc;
    if (side) argmax_take(bv, bi, rows.nn_val[i], rows.nn_idx[i]);
  }
}

// T_ij = G_ij r_j and the row accumulators; one block per row. `out` may alias `tile` (TO = float):
// each element is read and then written by the same thread.
template <typename TO>
__global__ void __launch_bounds__(kThreads) ova_backward_kernel(const float* tile, TO* out, int64_t n, int64_t j0,
                                                                const float* __restrict__ r, OvaParams p,
                                                                OvaRows rows) {
  const int64_t i = blockIdx.x;
  const float inv_a = rows.inv_a[i];
  const int64_t lab = rows.lab[i];
  const float b = rows.bias != nullptr ? *rows.bias : 0.0f;
  const bool bad = lab == LAB_BAD;  // a bad-label row adds no gradient
  const float g = rows.grad_rows[i];
  float acc_gc = 0.0f, acc_db = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const int64_t col = j0 + j;
    const float rj = r[col];
    const float c = tile[i * n + j] * inv_a * rj;
    float dc, db;
    ova_element<true>(p, c, col == lab, b, nullptr, &dc, &db);
    const float G = bad ? 0.0f : g * dc;
    out[i * n + j] = from_f<TO>(G * rj);
    acc_gc += G * c;
    acc_db += bad ? 0.0f : g * db;
  }
  block_sum2(acc_gc, acc_db);
  if (threadIdx.x == 0) {
    rows.gc_row[i] += acc_gc;
    rows.db_row[i] += acc_db;
  }
}

// grad_bias[0] = sum_i db_row[i]; one block.
__global__ void __launch_bounds__(kThreads) ova_bias_sum_kernel(const float* __restrict__ db_row, int64_t B,
                                                                float* __restrict__ grad_bias) {
  float acc = 0.0f, none = 0.0f;
  for (int64_t i = threadIdx.x; i < B; i += kThreads) acc += db_row[i];
  block_sum2(acc, none);
  if (threadIdx.x == 0) grad_bias[0] = acc;
}

}  // namespace

void launch_ova_forward_epilogue(const float* tile, int64_t B, int64_t n, int64_t j0, const float* r,
                                 const OvaParams& params, OvaRows rows, cudaStream_t stream) {
  if (B <= 0 || n <= 0) return;
  ova_forward_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(tile, n, j0, r, params, rows);
}

void launch_ova_backward_epilogue(const float* tile, void* out, DType out_dtype, int64_t B, int64_t n, int64_t j0,
                                  const float* r, const OvaParams& params, OvaRows rows, cudaStream_t stream) {
  if (B <= 0 || n <= 0) return;
  switch (out_dtype) {
    case DType::F32:
      ova_backward_kernel<float><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          tile, static_cast<float*>(out), n, j0, r, params, rows);
      break;
    case DType::F16:
      ova_backward_kernel<__half><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          tile, static_cast<__half*>(out), n, j0, r, params, rows);
      break;
    case DType::BF16:
      ova_backward_kernel<__nv_bfloat16><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          tile, static_cast<__nv_bfloat16*>(out), n, j0, r, params, rows);
      break;
  }
}

void launch_ova_bias_sum(const float* db_row, int64_t B, float* grad_bias, cudaStream_t stream) {
  ova_bias_sum_kernel<<<1, kThreads, 0, stream>>>(db_row, B, grad_bias);
}

}  // namespace engine
}  // namespace magloss
