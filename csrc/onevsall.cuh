// The one-vs-all sum engine on the GPU: torch-free kernel launchers (implemented in onevsall.cu)
// for SFace, UniFace, SphereFace2 and P2SGrad (magloss/onevsall.py, docs/one_vs_all.md).
//
// A one-vs-all loss sums an elementwise loss over the classes instead of a log-sum-exp:
//   L_i = sum_j l(c_ij, [j = y_i]; b),   c_ij = (x_i . w_j) * inv_a_i * r_j
// (notation of engine.cuh). The torch boundary (one_vs_all.inc) reuses the margin engine's stages
// around these epilogues: col_norms (r_j, ||w_j||, the weight check), the row stage (a_i, inv_a_i,
// label codes, the label and embedding checks), the class-chunked cuBLAS products, the column
// correction, the row chain and normalize_rows. Each launcher enqueues exactly ONE kernel on
// `stream` and does not check for launch errors (the caller runs C10_CUDA_KERNEL_LAUNCH_CHECK()).
//
// As in the margin engine, no atomics are used on float data: every sum (over a chunk's
// columns, over the chunks, over the rows for the bias gradient) has a fixed order, so the
// results are bitwise repeatable for a given shape, chunk size and GPU.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "engine.cuh"

namespace magloss {
namespace engine {

/// The op's `kind` (magloss.onevsall.KINDS) and its parameters `p`, in the op's order:
///   OVA_SFACE        [s, k, a, b]          a, b in radians
///   OVA_UNIFACE      [s, m, lambda]
///   OVA_SPHEREFACE2  [r, m, t, alpha, lw, margin type (0 'C', 1 'A', 2 'M')]
///   OVA_P2SGRAD      [1/C]
/// w_pos, w_neg: SphereFace2's element weights alpha*lw/r and (1 - alpha)*lw/r (the boundary
/// forms them in double); unused otherwise.
enum OvaKind : int { OVA_SFACE = 0, OVA_UNIFACE = 1, OVA_SPHEREFACE2 = 2, OVA_P2SGRAD = 3 };
struct OvaParams {
  int kind;
  float p[6];
  float w_pos, w_neg;
};

/// Per-row state of the one-vs-all epilogues; every pointer is a device array of B elements
/// unless said otherwise. inv_a and lab come from the margin engine's row stage.
struct OvaRows {
  const float* inv_a;
  const int64_t* lab;    // label column, LAB_NONE (ignored row: every class a negative) or LAB_BAD
  const float* bias;     // [1]: the learnable bias b (UniFace, SphereFace2), nullptr otherwise
  // forward only:
  float* loss;           // L_i, zero-initialized, accumulated chunk by chunk; NaN for LAB_BAD rows
  // forward, side outputs only (nullptr without them): the running max of the row's non-label
  // class cosines and its class, initialized to -inf and -1 (by the row stage), merged chunk by
  // chunk (ties: the lowest class), as engine.cuh's RowState::nn_val/nn_idx
  float* nn_val;
  int64_t* nn_idx;
  // backward only:
  const float* grad_rows;  // g_i = dL/dL_i
  float* gc_row;           // sum_j G_ij c_ij, zero-initialized, accumulated per chunk (G_ij = g_i dl/dc)
  float* db_row;           // sum_j g_i dl/db, zero-initialized, accumulated per chunk
};

/// Forward chunk epilogue (one block per row): loss_i += sum over the chunk's columns of
/// l(c_ij). tile: [B, n] fp32 raw dots S_ij = x_i . w_{j0+j}. With the side outputs (rows.nn_val
/// set) also the chunk's largest non-label cosine and its class (a fixed-order block arg-max, ties
/// to the lowest class, reduce.cuh) merged into nn_val/nn_idx.
void launch_ova_forward_epilogue(const float* tile, int64_t B, int64_t n, int64_t j0, const float* r,
                                 const OvaParams& params, OvaRows rows, cudaStream_t stream);

/// Backward chunk epilogue (one block per row): G_ij = g_i * dl/dc_ij (0 for LAB_BAD rows),
/// writes T_ij = G_ij * r_j into `out` ([B, n], element type out_dtype; may alias `tile` when
/// out_dtype is F32), accumulates gc_row_i += sum_j G_ij c_ij and db_row_i += sum_j g_i dl/db_ij.
void launch_ova_backward_epilogue(const float* tile, void* out, DType out_dtype, int64_t B, int64_t n, int64_t j0,
                                  const float* r, const OvaParams& params, OvaRows rows, cudaStream_t stream);

/// grad_bias[0] = sum_i db_row[i] in a fixed order (one block).
void launch_ova_bias_sum(const float* db_row, int64_t B, float* grad_bias, cudaStream_t stream);

}  // namespace engine
}  // namespace magloss
