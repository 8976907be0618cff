// The torch boundary of the fused engine: the CUDA kernels of magloss::margin_ce and
// magloss::margin_ce_backward (see magloss/ops.py for the schemas; the argument order and
// types here mirror them exactly). Implemented in margin_ce.cpp, bound in bindings.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace magloss {

/// (lse, zy, reg, norms), each [B] float32: see magloss.reference.margin_ce_rows.
/// embeddings [B, D] and weight [K*C, D]: CUDA, float32/float16/bfloat16, same dtype (or an fp32
/// weight with half embeddings); labels [B] int64/int32 in [0, C) or ignore_index;
/// sphere_lambda: 0-d float tensor (SphereFace only); row_margins: [B, 2] float32 (m2_i, m3_i),
/// COMBINED only; neg_threshold [B] and neg_t 0-d float32, both or neither (curricular modulation);
/// boundary: 0 THRESHOLD, 1 EASY, 2 CLIP, 3 NONE (2 and 3 with COMBINED only); subcenters: K >= 1.
/// Then the side outputs (docs/math.md, "Side outputs"): with `side`, label_cosine [B] float32 (the
/// row stage's c_iy, 0 without a label column), nearest_negative_cosine [B] float32 (the largest
/// non-label class cosine, from the tiles; -inf when there is none) and nearest_negative_class [B]
/// int64 (its class; ties: the lowest; -1 when none); without `side`, three empty tensors.
using Rows7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
Rows7 margin_ce_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters, bool side);

/// (grad_embeddings [B, D], grad_weight [K*C, D]) in the input dtypes: see
/// magloss.reference.margin_ce_backward. lse is the forward's saved statistic; the other
/// arguments as margin_ce_cuda.
std::tuple<at::Tensor, at::Tensor> margin_ce_backward_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_zy, const at::Tensor& grad_reg, const at::Tensor& grad_norms,
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& norms, const std::optional<at::Tensor>& sphere_lambda,
    const std::optional<at::Tensor>& row_margins, const std::optional<at::Tensor>& neg_threshold,
    const std::optional<at::Tensor>& neg_t, int64_t kind, double scale, double m1, double m2, double m3, double l_a,
    double u_a, double l_m, double u_m, int64_t boundary, bool straight_through, int64_t ignore_index,
    int64_t subcenters);

/// The speed path's forward (magloss::margin_ce_kept): margin_ce_cuda's four rows, then kept
/// [B, K*C] float32 (plain path: scale_i * xhat_i . w_j; sub-centers or curricular modulation: the
/// sub-center cosines, exactly what magloss.chunked keeps) and kept_norms [K*C] float32 (||w_j|| of
/// W rounded to the embeddings' dtype), then margin_ce_cuda's three side outputs. Same arguments
/// and checks as margin_ce_cuda.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
margin_ce_kept_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters, bool side);

/// The speed path's backward (magloss::margin_ce_backward_kept): margin_ce_backward_cuda's result from
/// the forward's kept products (read, never written: a retained graph's second backward reuses
/// them) instead of recomputing them. ValueError naming `kept` / `kept_norms` for a wrong shape or
/// dtype.
std::tuple<at::Tensor, at::Tensor> margin_ce_backward_kept_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_zy, const at::Tensor& grad_reg, const at::Tensor& grad_norms,
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& norms, const at::Tensor& kept, const at::Tensor& kept_norms,
    const std::optional<at::Tensor>& sphere_lambda, const std::optional<at::Tensor>& row_margins,
    const std::optional<at::Tensor>& neg_threshold, const std::optional<at::Tensor>& neg_t, int64_t kind,
    double scale, double m1, double m2, double m3, double l_a, double u_a, double l_m, double u_m, int64_t boundary,
    bool straight_through, int64_t ignore_index, int64_t subcenters);

/// The class-chunk width the engine would use for B rows and C classes (MAGLOSS_CHUNK or the
/// default bound of 2^22 fp32 tile elements), exposed for tests and benchmarks.
int64_t chunk_columns(int64_t B, int64_t C);

/// Classes per chunk with K sub-centers: chunk_columns(B, K*C) weight rows rounded down to whole
/// classes, at least one class (K = 1: chunk_columns(B, C)).
int64_t chunk_classes(int64_t B, int64_t C, int64_t K);

/// Whether the next call on `device_index` takes the plain-fp32 (SIMT) path.
bool simt_path(int64_t device_index);

}  // namespace magloss
