// The fused margin-softmax engine: torch-free kernel launchers (implemented in engine.cu).
//
// The torch boundary (margin_ce.cpp) owns allocation, streams, argument checks and the
// class-chunked GEMMs; these launchers run the O(B*D), O(C*D) and per-chunk O(B*n) stages
// around them. Each launcher enqueues exactly ONE kernel on `stream` and does not check
// for launch errors: the caller runs C10_CUDA_KERNEL_LAUNCH_CHECK() right after it.
//
// Notation (docs/math.md §1-2): x [B, D] embeddings of element type `dtype`, W [C, D] class
// matrix of element type `w_dtype` (both row-major contiguous). w_dtype is dtype, or F32 with
// a half dtype (the autocast pair): then every kernel rounds each W element to dtype on load,
// so the math sees exactly W rounded to dtype, and dL/dW is written as F32. a_i = ||x_i||, inv_a_i = 1/max(a_i, 1e-12),
// r_j = 1/max(||w_j||, 1e-12), c_ij = (x_i . w_j) * inv_a_i * r_j, scale_i = s (or a_i for
// feature-norm SphereFace), z_ij = scale_i * c_ij off the label, z_iy = scale_i * psi_i.
// A class chunk is the column range [j0, j0 + n); its raw-dot tile S [B, n] fp32 row-major
// holds S_ij = x_i . w_{j0+j} (computed by cuBLAS in the boundary).
//
// Label codes (RowState::lab): the label column index in [0, C); LAB_NONE for rows whose label
// equals ignore_index (no label column); LAB_BAD for rows whose label is out of range (also
// no label column, so nothing is ever read or written out of bounds; the forward marks their
// lse NaN and the backward gives them no softmax/margin gradient, while the boundary's input
// check raises the error, in the same call or a later one: input_checks.h).
//
// No atomics are used on float data anywhere: every reduction has a fixed order, so the
// results are bitwise repeatable for a given shape, chunk size and GPU.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "margins.cuh"

namespace magloss {
namespace engine {

/// Element type of embeddings / weight / their gradients.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

constexpr int64_t LAB_NONE = -1;
constexpr int64_t LAB_BAD = -2;

/// Error-flag slots (int32 each, initialized to FLAG_CLEAR by the boundary). A failing check
/// stores the smallest failing row (atomicMin: order-independent, so deterministic).
enum FlagSlot : int { FLAG_LABEL = 0, FLAG_EMBEDDINGS = 1, FLAG_WEIGHT = 2, NUM_FLAGS = 4 };
/// memset byte that initializes every flag to 0x7f7f7f7f ("no failure"); B, C < that.
constexpr int FLAG_CLEAR_BYTE = 0x7f;
constexpr int32_t FLAG_CLEAR = 0x7f7f7f7f;

/// Per-row state shared by the kernels; every pointer is a device array of B elements.
/// Written by the row stage unless said otherwise.
struct RowState {
  float* a;         // ||x_i|| (fp32 accumulation); also the op's `norms` output
  float* inv_a;     // 1 / max(a_i, NORM_EPS)
  float* scale;     // scale_i
  float* cy;        // label cosine c_iy (gather-dot with w_y); 0 without a label column
  float* zlab;      // z_iy = scale_i * psi_i (label rows)
  float* dpsi_dc;   // dpsi/dc at c_iy (1 without a label column)
  float* dpsi_da;   // dpsi/da
  int64_t* lab;     // label column, LAB_NONE or LAB_BAD
  // forward only (nullptr in the backward):
  float* zy;        // op output zy: zlab on label rows, 0 otherwise
  float* reg;       // op output reg: g(a~) for MagFace families, 0 otherwise
  float* run_max;   // online-softmax running max, initialized to -inf
  float* run_sum;   // online-softmax running sum of exp(z - run_max), initialized to 0
  // forward, side outputs only (nullptr without them): the running max of the row's non-label
  // class cosines and its class, initialized to -inf and -1, merged chunk by chunk (ties: the lowest class)
  float* nn_val;
  int64_t* nn_idx;
  // backward only (nullptr in the forward): inputs
  const float* grad_lse;
  const float* grad_zy;
  const float* grad_reg;
  const float* grad_norms;
  const float* lse;     // saved forward lse (global lse in a class-sharded head)
  // backward only: outputs
  float* dz_y;      // dL/dz_iy = gl_i * exp(z_iy - lse_i) + gz_i (label rows)
  float* g_y;       // G_iy = scale_i * dz_y * dpsi_dc (label rows)
  float* grad_a;    // dL/da_i without the feature-norm-scale term (added by the row chain)
  float* gc_row;    // sum_j G_ij c_ij, initialized to 0, accumulated per chunk
  float* sph;       // sum_j dL/dz_ij * z_ij (feature-norm SphereFace only), initialized to 0
  // Optional per-row features (AdaFace, ElasticFace, CurricularFace), no gradient; nullptr when unused:
  const float* row_margins;    // [B, 2]: (m2_i, m3_i) replacing the scalars m2, m3 (COMBINED only)
  const float* neg_threshold;  // [B]: tau_i of the curricular modulation (with neg_t)
  const float* neg_t;          // [1]: t of the curricular modulation (with neg_threshold)
  int32_t* label_sub;          // [B], with sub-centers (K > 1) only: the winning sub-center k of the
                               // label class (row stage), used by the backward epilogue
};

/// The launch-wide shape of the class matrix: K sub-centers per class (weight has K*C rows,
/// row j*K + k is sub-center k of class j); K = 1 is the plain class matrix.
/// With K > 1 a class's cosine is c_ij = max_k c_{i,jK+k} (ties: the lowest k), and only the
/// winning sub-center's weight row receives gradient (docs/cuda.md, "Sub-centers").
/// Curricular modulation (RowState::neg_threshold/neg_t set): every column j that is not the
/// row's label column has z_ij = scale_i * c_ij * (t + c_ij) where c_ij > tau_i, else scale_i * c_ij.


/// r_j and ||w_j|| for all C classes (one warp per class), plus the finiteness check of W
/// (flags[FLAG_WEIGHT] = first class with a NaN/Inf after the rounding). w: [C, D] of w_dtype.
void launch_col_norms(DType dtype, DType w_dtype, const void* w, int64_t C, int64_t D, float* r, float* wnorm,
                      int32_t* flags, cudaStream_t stream);

/// Row stage (one warp per row): a_i, inv_a_i, scale_i, the label cosine by a gather-dot
/// with w_y (the max over the K sub-centers of class y, winner into rows.label_sub), psi and
/// derivatives (with row i's (m2_i, m3_i) when rows.row_margins is set), label codes and the label/finiteness checks; in the
/// forward also zy, reg and the online-softmax init; in the backward dz_y, G_y, grad_a and the
/// accumulator init. `backward` selects which RowState outputs are written.
/// labels: [B] int64 (labels64) or int32, classes in [0, C); w: [K*C, D].
/// lam: device pointer to SphereFace's lambda or nullptr.
void launch_row_stage(DType dtype, DType w_dtype, const void* x, const void* w, const void* labels, bool labels64,
                      int64_t B, int64_t C, int64_t K, int64_t D, int64_t ignore_index, const MarginParams& params,
                      const float* lam, const float* r, RowState rows, bool backward, int32_t* flags,
                      cudaStream_t stream);

/// Forward chunk epilogue (one block per row): z_ij from the tile (label logit swapped in),
/// then the online-softmax merge of the chunk's (max, sum-exp) into run_max/run_sum; with the
/// side outputs (rows.nn_val set) also the chunk's largest non-label class cosine and its class
/// (a fixed-order block arg-max, ties to the lowest class) merged into nn_val/nn_idx.
/// tile: [B, n*K] fp32 raw dots of the weight rows of classes [j0, j0 + n) (whole classes), row i
/// at tile + i*ld (ld = n*K for a scratch tile, K*C for a column block of a [B, K*C] matrix).
/// keep (the speed path): each element is then overwritten with what the op keeps for the
/// backward: scale_i * xhat_i . w_j (plain), c_{i,jK+k} (general: sub-centers, curricular).
/// Plain losses (K = 1, no curricular modulation) take the plain kernel, untouched by the general path.
void launch_forward_epilogue(float* tile, int64_t ld, bool keep, int64_t B, int64_t n, int64_t j0, int64_t K,
                             const float* r, RowState rows, cudaStream_t stream);

/// lse_i = run_max_i + log(run_sum_i); NaN for LAB_BAD rows.
void launch_forward_finalize(int64_t B, RowState rows, float* lse, cudaStream_t stream);

/// Backward chunk epilogue (one block per row): recomputes p_ij = exp(z_ij - lse_i) from the
/// tile and the SAVED lse, forms G_ij and writes T_ij = G_ij * r_j into `out` ([B, n],
/// element type out_dtype; may alias `tile` when out_dtype is F32), and accumulates
/// gc_row += sum_j G_ij c_ij (and sph += sum_j dz_ij z_ij when scale_by_norm).
/// With K > 1, tile/out are [B, n*K] over classes [j0, j0 + n): T is G_ij * r at the winning
/// sub-center of class j and 0 at the others. Row i of the tile is at tile + i*ld (out: i*n*K).
/// kept (the speed path): the tile is a column block of the forward's kept matrix (what
/// launch_forward_epilogue wrote with keep), read only, and out must not alias it.
void launch_backward_epilogue(const float* tile, int64_t ld, bool kept, void* out, DType out_dtype, int64_t B,
                              int64_t n, int64_t j0, int64_t K, const float* r, RowState rows, bool scale_by_norm,
                              cudaStream_t stream);

/// Column correction of one chunk (one warp per class): with P_j = sum_i T_ij xhat_i
/// (p: [n, D] fp32, from the boundary's GEMM), dL/dw_j = P_j - r_j^2 (w_j . P_j) w_j, since
/// w_j . P_j = sum_i G_ij c_ij. Zero correction where ||w_j|| < NORM_EPS (as the reference).
/// Writes grad_w[j0 + j, :] (element type w_dtype; may alias p when w_dtype is F32).
/// w: the full [C, D] class matrix.
void launch_column_correction(DType dtype, DType w_dtype, const float* p, const void* w, const float* r,
                              const float* wnorm, int64_t n, int64_t j0, int64_t D, void* grad_w,
                              cudaStream_t stream);

/// Final row chain (one warp per row):
/// dL/dx_i = (g_xhat_i - [a_i >= eps] xhat_i * gc_row_i) * inv_a_i + dL/da_i * x_i / max(a_i, FLT_MIN),
/// dL/da_i = grad_a_i (+ sph_i * inv_a_i when scale_by_norm). g_xhat: [B, D] fp32.
/// Writes grad_x [B, D] in element type dtype.
void launch_row_chain(DType dtype, const void* x, const float* g_xhat, int64_t B, int64_t D, RowState rows,
                      bool scale_by_norm, void* grad_x, cudaStream_t stream);

/// xhat = x * inv_a as element type out_dtype (F32 or dtype): [B, D], for the dW product.
void launch_normalize_rows(DType dtype, const void* x, int64_t B, int64_t D, const float* inv_a, DType out_dtype,
                           void* xhat, cudaStream_t stream);

}  // namespace engine
}  // namespace magloss
