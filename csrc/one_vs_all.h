// The torch boundary of the one-vs-all sum engine: the CUDA kernels of magloss::one_vs_all and
// magloss::one_vs_all_backward (see magloss/onevsall.py for the schemas; the argument order and
// types here mirror them exactly). Implemented in one_vs_all.inc (compiled inside margin_ce.cpp,
// whose boundary helpers it shares), bound in bindings.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace magloss {

/// (rows, label_cosine, nearest_negative_cosine, nearest_negative_class): the row losses
/// L_i = sum_j l(c_ij, [j = y_i]) [B] float32 (magloss.onevsall.one_vs_all_forward), then with
/// `side` the side outputs [B] (float32, float32, int64: c_iy or 0 without a label column, the
/// largest non-label cosine or -inf, its class or -1; ties to the lowest class), empty otherwise.
/// embeddings [B, D] and weight [C, D]: CUDA, float32/float16/bfloat16, same dtype (or an fp32
/// weight with half embeddings); labels [B] int64/int32 in [0, C) or ignore_index; bias: a
/// one-element float tensor (UniFace, SphereFace2) or none; kind 0 SFace, 1 UniFace,
/// 2 SphereFace2, 3 P2SGrad with params as magloss.onevsall.KINDS.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> one_vs_all_cuda(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t kind, const std::vector<double>& params, int64_t ignore_index,
    bool side);

/// (grad_embeddings [B, D], grad_weight [C, D]) in the input dtypes and grad_bias [1] float32
/// (zeros without a bias) of sum_i grad_rows_i L_i (magloss.onevsall.one_vs_all_backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> one_vs_all_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t kind, const std::vector<double>& params, int64_t ignore_index);

}  // namespace magloss
