// Kernels of the fused margin-softmax engine (torch-free; see engine.cuh for the contract).
//
// Launch shapes:
//   warp-per-row kernels (col_norms, row_stage, column_correction, row_chain): 256 threads =
//     8 rows per block, lanes stride over D. The whole warp leaves together when its row is
//     past the end, so the full-mask shuffles never see an exited lane.
//   block-per-row kernels (forward/backward epilogue): 256 threads stride over the chunk's
//     n columns, then a fixed-order block reduction (warp shuffles, then warp 0 over the 8
//     warp results). No atomics on floats anywhere: bitwise repeatable.
// All arithmetic is fp32; half inputs are widened on load and outputs rounded on store.
// This file is compiled by the torch extension build (nvcc with torch's
// -D__CUDA_NO_HALF_CONVERSIONS__ etc.: only explicit conversion intrinsics are used) and by
// CMakeLists.txt without torch.

#include "engine.cuh"
#include "reduce.cuh"

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace magloss {
namespace engine {
namespace {

// kThreads, kWarp, kWarpsPerBlock, kFullMask, to_f, from_f, warp_sum, block_sum2: reduce.cuh.

// A gradient as stored: fp16/bf16 values past the type's range saturate to its largest finite
// value instead of becoming Inf (a zero embedding row's gradient is (dL/dxhat)/1e-12, as with
// F.normalize), NaN stays NaN. The Python engines do the same (magloss.rows.saturating_cast).
template <typename T>
__device__ __forceinline__ T store_grad(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    constexpr float big = std::is_same_v<T, __half> ? 65504.0f : 3.38953139e38f;
    return from_f<T>(clampf_(v, -big, big));
  }
}

// One element of W as the math sees it: stored as TW, rounded to the embeddings' type T when
// TW is wider (fp32 W with half embeddings, see engine.cuh), then widened to fp32.
template <typename T, typename TW>
__device__ __forceinline__ float load_w(const TW* p) {
  if constexpr (std::is_same_v<T, TW>) {
    return to_f(*p);
  } else {
    return to_f(from_f<T>(to_f(*p)));
  }
}

// ---- reductions --------------------------------------------------------------------------------
// Online-softmax state merge: (m, l) represents sum exp(z - m) = l over a set of logits.
// An empty set is (-inf, 0); merging two empty sets stays (-inf, 0) (no inf - inf).
// NaN in, NaN out: a NaN logit leaves its thread's state as (m, NaN) (m = -inf when every
// logit it saw was NaN), and the merge keeps a NaN in either state: the max keeps a NaN m,
// two states with max -inf add their sums (0 + NaN), and a NaN sum times exp(-inf) = 0 stays NaN.
__device__ __forceinline__ void softmax_merge(float& m, float& l, float m2, float l2) {
  const float mx = maximum(m, m2);
  if (mx == -INFINITY) {
    l = l + l2;  // 0, or NaN
    return;      // m is already -inf
  }
  l = l * expf(m - mx) + l2 * expf(m2 - mx);
  m = mx;
}

__device__ __forceinline__ void warp_softmax_merge(float& m, float& l) {
  #pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, off);
    const float l2 = __shfl_xor_sync(kFullMask, l, off);
    softmax_merge(m, l, m2, l2);
  }
}

// Block reductions: every thread of the block must call them (they contain __syncthreads);
// the result is valid in thread 0, in a fixed order. Each ends with a barrier after warp 0's
// last read of its shared arrays, so a block may call them any number of times in a row (the
// next call's writes cannot overtake this call's reads).

// Block-wide online-softmax merge.
__device__ __forceinline__ void block_softmax_merge(float& m, float& l) {
  __shared__ float sm[kWarpsPerBlock], sl[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_softmax_merge(m, l);
  if (lane == 0) { sm[warp] = m; sl[warp] = l; }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarpsPerBlock ? sm[lane] : -INFINITY;
    l = lane < kWarpsPerBlock ? sl[lane] : 0.0f;
    warp_softmax_merge(m, l);
  }
  __syncthreads();  // sm/sl are read: safe to reuse
}

inline unsigned warp_grid(int64_t rows) { return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

// ---- kernels -------------------------------------------------------------------------------------

// r_j = 1/max(||w_j||, eps), wnorm_j = ||w_j||; flags[FLAG_WEIGHT] = min j with a non-finite entry.
template <typename T, typename TW>
__global__ void __launch_bounds__(kThreads) col_norms_kernel(const TW* __restrict__ w, int64_t C, int64_t D,
                                                             float* __restrict__ r, float* __restrict__ wnorm,
                                                             int32_t* __restrict__ flags) {
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (j >= C) return;  // whole warp
  const TW* row = w + j * D;
  float ss = 0.0f;
  bool bad = false;
  for (int64_t k = lane; k < D; k += kWarp) {
    const float v = load_w<T>(row + k);
    bad |= !isfinite(v);
    ss += v * v;
  }
  ss = warp_sum(ss);
  bad = __any_sync(kFullMask, bad);
  if (lane == 0) {
    const float n = sqrtf(ss);
    wnorm[j] = n;
    r[j] = 1.0f / maximum(n, NORM_EPS);  // NaN for a NaN row
    if (bad) atomicMin(&flags[FLAG_WEIGHT], static_cast<int32_t>(j));
  }
}

// Row stage: see engine.cuh launch_row_stage. One warp per row.
template <typename T, typename TW, typename L>
__global__ void __launch_bounds__(kThreads) row_stage_kernel(const T* __restrict__ x, const TW* __restrict__ w,
                                                             const L* __restrict__ labels, int64_t B, int64_t C,
                                                             int64_t K, int64_t D, int64_t ignore_index,
                                                             MarginParams params, const float* __restrict__ lam_ptr,
                                                             const float* __restrict__ r, RowState rows,
                                                             bool backward, int32_t* __restrict__ flags) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (i >= B) return;  // whole warp
  const int64_t raw = static_cast<int64_t>(labels[i]);
  int64_t lab;
  if (raw == ignore_index) {
    lab = LAB_NONE;
  } else if (raw >= 0 && raw < C) {
    lab = raw;
  } else {
    lab = LAB_BAD;  // never dereferenced: treated as "no label column"
  }
  const T* xrow = x + i * D;
  const TW* wrow = w + (lab >= 0 ? lab * K : 0) * D;  // only read when lab >= 0 (sub-center 0 of the class)
  float ss = 0.0f, dot = 0.0f;
  bool bad = false;
  for (int64_t k = lane; k < D; k += kWarp) {
    const float xv = to_f(xrow[k]);
    bad |= !isfinite(xv);
    ss += xv * xv;
    if (lab >= 0) dot += xv * load_w<T>(wrow + k);
  }
  ss = warp_sum(ss);
  dot = warp_sum(dot);
  bad = __any_sync(kFullMask, bad);
  // Sub-centers: the label class's cosine is the max over its K weight rows (ties: the lowest k);
  // `dot` becomes the winner's raw dot, so cy below is bitwise the winning cosine.
  int32_t ksub = 0;
  if (K > 1 && lab >= 0) {  // uniform over the warp (one row)
    const float inv_a_w = 1.0f / maximum(sqrtf(ss), NORM_EPS);
    float best = dot * inv_a_w * r[lab * K];
    for (int32_t sk = 1; sk < K; ++sk) {
      const TW* wk = w + (lab * K + sk) * D;
      float d = 0.0f;
      for (int64_t k = lane; k < D; k += kWarp) d += to_f(xrow[k]) * load_w<T>(wk + k);
      d = warp_sum(d);
      const float ck = d * inv_a_w * r[lab * K + sk];
      if (replaces_max(ck, best)) {
        best = ck;
        dot = d;
        ksub = sk;
      }
    }
  }
  if (lane != 0) return;

  if (bad) atomicMin(&flags[FLAG_EMBEDDINGS], static_cast<int32_t>(i));
  if (lab == LAB_BAD) atomicMin(&flags[FLAG_LABEL], static_cast<int32_t>(i));
  const float a = sqrtf(ss);
  const float inv_a = 1.0f / maximum(a, NORM_EPS);  // NaN for a NaN row
  const bool sbn = scale_by_norm(params);
  const float scale = sbn ? a : params.scale;
  const float lam = lam_ptr != nullptr ? *lam_ptr : 0.0f;
  MarginParams p = params;
  if (rows.row_margins != nullptr) {  // per-row (m2_i, m3_i), COMBINED only
    p.m2 = rows.row_margins[2 * i];
    p.m3 = rows.row_margins[2 * i + 1];
  }
  float cy = 0.0f, zl = 0.0f, dc = 1.0f, da = 0.0f;
  if (lab >= 0) {
    cy = dot * inv_a * r[lab * K + ksub];
    const MarginTerms t = margin_terms(cy, a, p, lam);
    zl = scale * t.psi;
    dc = t.dc;
    da = t.da;
  }
  rows.a[i] = a;
  rows.inv_a[i] = inv_a;
  rows.scale[i] = scale;
  rows.cy[i] = cy;
  rows.zlab[i] = zl;
  rows.dpsi_dc[i] = dc;
  rows.dpsi_da[i] = da;
  rows.lab[i] = lab;
  if (rows.label_sub != nullptr) rows.label_sub[i] = ksub;
  float dg = 0.0f, g = 0.0f;
  if (has_regularizer(params)) g = regularizer(a, params.l_a, params.u_a, &dg);
  if (!backward) {
    rows.zy[i] = lab >= 0 ? zl : 0.0f;
    rows.reg[i] = g;
    rows.run_max[i] = -INFINITY;
    rows.run_sum[i] = 0.0f;
    if (rows.nn_val != nullptr) {
      rows.nn_val[i] = -INFINITY;
      rows.nn_idx[i] = -1;
    }
  } else {
    float dzy = 0.0f, gy = 0.0f, ga = rows.grad_norms[i];
    if (lab >= 0) {
      dzy = rows.grad_lse[i] * expf(zl - rows.lse[i]) + rows.grad_zy[i];
      gy = scale * dzy * dc;
      ga += scale * dzy * da;
    }
    if (has_regularizer(params)) ga += rows.grad_reg[i] * dg;
    rows.dz_y[i] = dzy;
    rows.g_y[i] = gy;
    rows.grad_a[i] = ga;
    rows.gc_row[i] = 0.0f;
    rows.sph[i] = 0.0f;
  }
}

// The cosine of class `cls` for one row from the raw dots s[0..K) of its K weight rows: the max
// over the sub-centers (ties: the lowest k; a NaN wins), *kbest = the winner. K = 1: s[0]*inv_a*r[cls].
__device__ __forceinline__ float class_cosine(const float* s, int64_t cls, int64_t K, float inv_a,
                                              const float* __restrict__ r, int32_t* kbest, bool cosines = false) {
  if (cosines) {  // the speed path's kept tile: s already holds the sub-center cosines
    float best = s[0];
    int32_t kb = 0;
    for (int32_t k = 1; k < K; ++k) {
      if (replaces_max(s[k], best)) {
        best = s[k];
        kb = k;
      }
    }
    *kbest = kb;
    return best;
  }
  float best = s[0] * inv_a * r[cls * K];
  int32_t kb = 0;
  for (int32_t k = 1; k < K; ++k) {
    const float ck = s[k] * inv_a * r[cls * K + k];
    if (replaces_max(ck, best)) {
      best = ck;
      kb = k;
    }
  }
  *kbest = kb;
  return best;
}

// The curricular modulation of row i, if any (uniform over the block).
struct Curricular {
  bool on;
  float tau, t;
  __device__ __forceinline__ Curricular(const RowState& rows, int64_t i, bool enabled)
      : on(enabled && rows.neg_t != nullptr), tau(on ? rows.neg_threshold[i] : 0.0f), t(on ? *rows.neg_t : 0.0f) {}
  // z / scale_i of a non-label cosine and its derivative d(z / scale_i)/dc.
  __device__ __forceinline__ float apply(float c, float* df) const {
    if (!on) {
      *df = 1.0f;
      return c;
    }
    return curricular(c, tau, t, df);
  }
};

// Forward chunk epilogue: one block per row i, merges the chunk's softmax state into the running one.
// kGeneral = false: the plain losses' kernel (K = 1, no modulation); true: sub-centers (the tile holds
// K columns per class, chunk = classes [j0, j0 + n)) and/or the curricular modulation off the label.
// ld: the tile's row pitch (n*K for the scratch tile, K*C for a block of the speed path's kept matrix).
// keep (speed path): each element is converted in place, after its logit is formed, to what the op
// keeps: scale_i xhat_i.w_j on the plain path, the sub-center cosines on the general one (each thread
// reads and writes only its own columns).
template <bool kGeneral>
__global__ void __launch_bounds__(kThreads) forward_epilogue_kernel(float* tile, int64_t ld, bool keep, int64_t n,
                                                                    int64_t j0, int64_t K,
                                                                    const float* __restrict__ r, RowState rows) {
  const int64_t i = blockIdx.x;
  float* srow = tile + i * ld;
  const float inv_a = rows.inv_a[i], s = rows.scale[i], zl = rows.zlab[i];
  const int64_t lab = rows.lab[i];
  float m = -INFINITY, l = 0.0f;
  const bool side = rows.nn_val != nullptr;  // uniform over the launch
  float bv = -INFINITY;                      // this thread's best non-label class cosine, its class
  int64_t bi = -1;
  const Curricular cur(rows, i, kGeneral);  // off (and never read) in the plain kernel
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const int64_t col = j0 + j;
    float z;
    if constexpr (!kGeneral) {
      if (col == lab) {
        z = zl;
      } else {
        const float c = srow[j] * inv_a * r[col];
        z = s * c;
        if (side) argmax_take(c, col, bv, bi);
      }
      if (keep) srow[j] = s * (srow[j] * inv_a);
    } else {
      if (keep) {  // the same products class_cosine forms from the raw dots: the same bits
        for (int64_t k = 0; k < K; ++k) srow[j * K + k] = srow[j * K + k] * inv_a * r[col * K + k];
      }
      if (col == lab) {
        z = zl;
      } else {
        int32_t kb;
        float df;
        const float c = class_cosine(srow + j * K, col, K, inv_a, r, &kb, keep);
        z = s * cur.apply(c, &df);
        if (side) argmax_take(c, col, bv, bi);
      }
    }
    if (z > m) {
      l = l * expf(m - z) + 1.0f;
      m = z;
    } else {
      l += expf(z - m);  // a NaN z lands here: l becomes NaN and stays NaN (softmax_merge)
    }
  }
  block_softmax_merge(m, l);
  if (side) block_argmax(bv, bi);  // (uniform: every thread of the block calls it)
  if (threadIdx.x == 0) {
    float rm = rows.run_max[i], rl = rows.run_sum[i];
    softmax_merge(rm, rl, m, l);
    rows.run_max[i] = rm;
    rows.run_sum[i] = rl;
    if (side) argmax_take(bv, bi, rows.nn_val[i], rows.nn_idx[i]);
  }
}

// lse may alias rows.run_max (the boundary reuses the output as the running max).
__global__ void forward_finalize_kernel(int64_t B, RowState rows, float* lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  lse[i] = rows.lab[i] == LAB_BAD ? NAN : rows.run_max[i] + logf(rows.run_sum[i]);
}

// Backward chunk epilogue: one block per row. `out` may alias `tile` (TO = float): each element
// is read and then written by the same thread (with sub-centers: the K columns of one class).
// kGeneral as in the forward epilogue. ld: the tile's row pitch (out's is n*K). kept (speed path):
// the tile is a block of the forward's kept matrix (scale_i xhat_i.w_j, or the sub-center cosines),
// read only; then g c = dz z on the plain path (c itself is not formed).
template <typename TO, bool kGeneral>
__global__ void __launch_bounds__(kThreads) backward_epilogue_kernel(const float* tile, int64_t ld, bool kept,
                                                                     TO* out, int64_t n,
                                                                     int64_t j0, int64_t K,
                                                                     const float* __restrict__ r, RowState rows,
                                                                     bool sbn) {
  const int64_t i = blockIdx.x;
  const float inv_a = rows.inv_a[i], s = rows.scale[i];
  const float lse = rows.lse[i], gl = rows.grad_lse[i];
  const float zl = rows.zlab[i], dzy = rows.dz_y[i], gy = rows.g_y[i], cy = rows.cy[i];
  const int64_t lab = rows.lab[i];
  float acc_gc = 0.0f, acc_sph = 0.0f;
  if constexpr (!kGeneral) {
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const int64_t col = j0 + j;
      const float rj = r[col];
      float c, z, dz, g;
      if (col == lab) {
        c = cy;
        z = zl;
        dz = dzy;
        g = gy;
      } else {
        c = kept ? 0.0f : tile[i * ld + j] * inv_a * rj;
        z = kept ? tile[i * ld + j] * rj : s * c;
        dz = lab == LAB_BAD ? 0.0f : gl * expf(z - lse);  // a bad-label row (lse = NaN) adds no gradient
        g = s * dz;
      }
      out[i * n + j] = from_f<TO>(g * rj);
      acc_gc += (kept && col != lab) ? dz * z : g * c;
      if (sbn) acc_sph += dz * z;
    }
  } else {
    const Curricular cur(rows, i, true);
    const int32_t ksub = (K > 1 && lab >= 0) ? rows.label_sub[i] : 0;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const int64_t col = j0 + j;
      const int64_t e = (i * n + j) * K;  // the class's first column in out
      float c, z, dz, g;
      int32_t kb;
      if (col == lab) {
        c = cy;
        z = zl;
        dz = dzy;
        g = gy;
        kb = ksub;
      } else {
        c = class_cosine(tile + i * ld + j * K, col, K, inv_a, r, &kb, kept);
        float df;
        z = s * cur.apply(c, &df);
        dz = lab == LAB_BAD ? 0.0f : gl * expf(z - lse);
        g = s * dz * df;  // dL/dc_ij: (t + 2c) on the modulated columns
      }
      for (int32_t k = 0; k < K; ++k) {  // the gradient reaches the winning sub-center only
        out[e + k] = from_f<TO>(k == kb ? g * r[col * K + k] : 0.0f);
      }
      acc_gc += g * c;
      if (sbn) acc_sph += dz * z;
    }
  }
  block_sum2(acc_gc, acc_sph);
  if (threadIdx.x == 0) {
    rows.gc_row[i] += acc_gc;
    if (sbn) rows.sph[i] += acc_sph;
  }
}

// dL/dw_j = P_j - r_j^2 (w_j . P_j) w_j for the chunk's classes; one warp per class.
template <typename T, typename TW>
__global__ void __launch_bounds__(kThreads) column_correction_kernel(const float* p, const TW* __restrict__ w,
                                                                     const float* __restrict__ r,
                                                                     const float* __restrict__ wnorm, int64_t n,
                                                                     int64_t j0, int64_t D, TW* grad_w) {
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (j >= n) return;  // whole warp
  const int64_t col = j0 + j;
  const float* prow = p + j * D;
  const TW* wrow = w + col * D;
  float dot = 0.0f;
  for (int64_t k = lane; k < D; k += kWarp) dot += load_w<T>(wrow + k) * prow[k];
  dot = warp_sum(dot);  // all lanes finished reading prow before any lane writes below
  const float rc = r[col];
  const float coef = wnorm[col] < NORM_EPS ? 0.0f : rc * rc * dot;  // a NaN norm keeps the term
  TW* grow = grad_w + col * D;
  for (int64_t k = lane; k < D; k += kWarp) grow[k] = store_grad<TW>(prow[k] - coef * load_w<T>(wrow + k));
}

// dL/dx_i; one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_chain_kernel(const T* __restrict__ x,
                                                             const float* __restrict__ g_xhat, int64_t B,
                                                             int64_t D, RowState rows, bool sbn,
                                                             T* __restrict__ grad_x) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (i >= B) return;
  const float a = rows.a[i], inv_a = rows.inv_a[i];
  const float ga = rows.grad_a[i] + (sbn ? rows.sph[i] * inv_a : 0.0f);
  const float proj = a < NORM_EPS ? 0.0f : rows.gc_row[i];  // a NaN norm keeps the term
  const float a_tiny = maximum(a, FLT_MIN);
  for (int64_t k = lane; k < D; k += kWarp) {
    const float xv = to_f(x[i * D + k]);
    const float gx = (g_xhat[i * D + k] - (xv * inv_a) * proj) * inv_a + ga * (xv / a_tiny);
    grad_x[i * D + k] = store_grad<T>(gx);
  }
}

template <typename T, typename TO>
__global__ void normalize_rows_kernel(const T* __restrict__ x, int64_t B, int64_t D,
                                      const float* __restrict__ inv_a, TO* __restrict__ out) {
  const int64_t total = B * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = from_f<TO>(to_f(x[e]) * inv_a[e / D]);
  }
}

}  // namespace

#define MAGLOSS_DISPATCH_DTYPE(DT, T, ...)      \
  switch (DT) {                                 \
    case DType::F32: {                          \
      using T = float;                          \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
    case DType::F16: {                          \
      using T = __half;                         \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
    case DType::BF16: {                         \
      using T = __nv_bfloat16;                  \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
  }

// T = the embeddings' type (dtype); TW = W's storage type: T, or float for the autocast pair.
#define MAGLOSS_DISPATCH_W(DT, WDT, T, TW, ...) \
  MAGLOSS_DISPATCH_DTYPE(DT, T, {               \
    if ((WDT) == (DT)) {                        \
      using TW = T;                             \
      __VA_ARGS__;                              \
    } else {                                    \
      using TW = float;                         \
      __VA_ARGS__;                              \
    }                                           \
  })

void launch_col_norms(DType dtype, DType w_dtype, const void* w, int64_t C, int64_t D, float* r, float* wnorm,
                      int32_t* flags, cudaStream_t stream) {
  if (C <= 0) return;
  MAGLOSS_DISPATCH_W(dtype, w_dtype, T, TW,
      col_norms_kernel<T, TW><<<warp_grid(C), kThreads, 0, stream>>>(static_cast<const TW*>(w), C, D, r, wnorm,
                                                                     flags));
}

void launch_row_stage(DType dtype, DType w_dtype, const void* x, const void* w, const void* labels, bool labels64,
                      int64_t B, int64_t C, int64_t K, int64_t D, int64_t ignore_index, const MarginParams& params,
                      const float* lam, const float* r, RowState rows, bool backward, int32_t* flags,
                      cudaStream_t stream) {
  if (B <= 0) return;
  MAGLOSS_DISPATCH_W(dtype, w_dtype, T, TW, {
    if (labels64) {
      row_stage_kernel<T, TW, int64_t><<<warp_grid(B), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const TW*>(w), static_cast<const int64_t*>(labels), B, C, K, D,
          ignore_index, params, lam, r, rows, backward, flags);
    } else {
      row_stage_kernel<T, TW, int32_t><<<warp_grid(B), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const TW*>(w), static_cast<const int32_t*>(labels), B, C, K, D,
          ignore_index, params, lam, r, rows, backward, flags);
    }
  });
}

// The general epilogues serve sub-centers and the curricular modulation; every other loss runs
// the plain kernels (kGeneral = false), which the general path leaves bit for bit as they are.
static bool general_epilogue(int64_t K, const RowState& rows) { return K > 1 || rows.neg_t != nullptr; }

void launch_forward_epilogue(float* tile, int64_t ld, bool keep, int64_t B, int64_t n, int64_t j0, int64_t K,
                             const float* r, RowState rows, cudaStream_t stream) {
  if (B <= 0 || n <= 0) return;
  if (general_epilogue(K, rows)) {
    forward_epilogue_kernel<true><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(tile, ld, keep, n, j0, K, r,
                                                                                     rows);
  } else {
    forward_epilogue_kernel<false><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(tile, ld, keep, n, j0, 1, r,
                                                                                      rows);
  }
}

void launch_forward_finalize(int64_t B, RowState rows, float* lse, cudaStream_t stream) {
  if (B <= 0) return;
  forward_finalize_kernel<<<static_cast<unsigned>((B + kThreads - 1) / kThreads), kThreads, 0, stream>>>(B, rows,
                                                                                                         lse);
}

void launch_backward_epilogue(const float* tile, int64_t ld, bool kept, void* out, DType out_dtype, int64_t B, int64_t n, int64_t j0, int64_t K,
                              const float* r, RowState rows, bool scale_by_norm, cudaStream_t stream) {
  if (B <= 0 || n <= 0) return;
  const bool general = general_epilogue(K, rows);
  MAGLOSS_DISPATCH_DTYPE(out_dtype, TO, {
    if (general) {
      backward_epilogue_kernel<TO, true><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          tile, ld, kept, static_cast<TO*>(out), n, j0, K, r, rows, scale_by_norm);
    } else {
      backward_epilogue_kernel<TO, false><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          tile, ld, kept, static_cast<TO*>(out), n, j0, 1, r, rows, scale_by_norm);
    }
  });
}

void launch_column_correction(DType dtype, DType w_dtype, const float* p, const void* w, const float* r,
                              const float* wnorm, int64_t n, int64_t j0, int64_t D, void* grad_w,
                              cudaStream_t stream) {
  if (n <= 0) return;
  MAGLOSS_DISPATCH_W(dtype, w_dtype, T, TW,
      column_correction_kernel<T, TW><<<warp_grid(n), kThreads, 0, stream>>>(
          p, static_cast<const TW*>(w), r, wnorm, n, j0, D, static_cast<TW*>(grad_w)));
}

void launch_row_chain(DType dtype, const void* x, const float* g_xhat, int64_t B, int64_t D, RowState rows,
                      bool scale_by_norm, void* grad_x, cudaStream_t stream) {
  if (B <= 0) return;
  MAGLOSS_DISPATCH_DTYPE(dtype, T,
      row_chain_kernel<T><<<warp_grid(B), kThreads, 0, stream>>>(static_cast<const T*>(x), g_xhat, B, D, rows,
                                                                   scale_by_norm, static_cast<T*>(grad_x)));
}

void launch_normalize_rows(DType dtype, const void* x, int64_t B, int64_t D, const float* inv_a, DType out_dtype,
                           void* xhat, cudaStream_t stream) {
  const int64_t total = B * D;
  if (total <= 0) return;
  const int64_t want = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  MAGLOSS_DISPATCH_DTYPE(dtype, T, {
    if (out_dtype == DType::F32) {
      normalize_rows_kernel<T, float><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), B, D, inv_a,
                                                                       static_cast<float*>(xhat));
    } else {
      normalize_rows_kernel<T, T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), B, D, inv_a,
                                                                   static_cast<T*>(xhat));
    }
  });
}

#undef MAGLOSS_DISPATCH_W
#undef MAGLOSS_DISPATCH_DTYPE

}  // namespace engine
}  // namespace magloss
