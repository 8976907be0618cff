"""The oracle: every margin loss in plain PyTorch, literal and unoptimized, for the tests.

Never the default path: the ops run the chunked engine (:mod:`magloss.chunked`) or the
fused CUDA engine, and the tests compare both with this module. Nothing in the library
imports it; it imports the library's shared pieces (the margins, the row helpers of
:mod:`magloss.rows`, the input checks of :mod:`magloss.checks`), so a change here can
never change what the engines compute.

It follows docs/math.md §1 literally: full B×C cosine matrix, the label column
replaced by s·ψ, log-sum-exp, per-row cross-entropy. All math runs in float32 for
fp16/bf16/fp32 inputs and in float64 for float64 inputs (so tests can gradcheck it).

Gradients come from autograd through standard PyTorch ops; only the margin's local
derivatives ∂ψ/∂c and ∂ψ/∂a are supplied by hand (from :mod:`magloss.margins`), as
the first-order term ψ + ∂ψ/∂c·(c − c₀) + ∂ψ/∂a·(a − a₀) evaluated at c = c₀, a = a₀.
That keeps the value exactly ψ, makes the gradient exactly the documented one
(including the ε guard and straight-through), and avoids acos' infinite slope at ±1.
:func:`margin_ce_backward` instead writes the gradient formulas of docs/math.md §2 out
(the oracle of the engines' backward kernels).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .checks import check_extras, check_values, num_classes_of
from .margins import NORM_EPS, MarginSpec, margin_terms, regularizer
from .rows import class_cosines, compute_dtype, curricular, saturating_cast, weight_operand

__all__ = ["margin_ce_rows", "margin_ce_forward", "margin_ce_backward", "side_outputs"]


def _linearized(value: Tensor, slope: Tensor, x: Tensor) -> Tensor:
    """value + slope·(x − x.detach()): equals ``value``, with gradient ``slope`` w.r.t. x."""
    return value + slope * (x - x.detach())


def _label_index(labels: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    has = labels != ignore_index
    return has, torch.where(has, labels, torch.zeros_like(labels)).long().unsqueeze(1)


def _cosines(x: Tensor, w: Tensor, product_dtype: Optional[torch.dtype] = None):
    """Row and column stages shared by forward and backward: a_i, x̂_i, ‖w_j‖, r_j and the
    cosine matrix c [B, rows of W] (x̂ = x/max(a, ε), as F.normalize).
    ``product_dtype`` runs the one B×C product x̂·Wᵀ in that dtype (an eager baseline in
    fp16/bf16); everything else stays in x's dtype."""
    a = x.norm(dim=1)
    x_hat = x / a.clamp_min(NORM_EPS).unsqueeze(1)
    w_norm = w.norm(dim=1)
    r = 1.0 / w_norm.clamp_min(NORM_EPS)
    if product_dtype is None:
        cos = (x_hat @ w.t()) * r
    else:
        cos = (x_hat.to(product_dtype) @ w.to(product_dtype).t()).to(x.dtype) * r
    return a, x_hat, w_norm, r, cos


def margin_ce_rows(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    spec: MarginSpec,
    ignore_index: int = -1,
    sphere_lambda: Optional[Tensor] = None,
    row_margins: Optional[Tensor] = None,
    neg_threshold: Optional[Tensor] = None,
    neg_t: Optional[Tensor] = None,
    *,
    product_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row softmax statistics with the margin, differentiable by autograd.

    Args:
        embeddings: [B, D] float (fp16, bf16, fp32 or fp64), not normalized.
        weight: [K·C, D], same dtype and device; or float32 with fp16/bf16 embeddings
            (autocast), then rounded to their dtype (:func:`magloss.rows.weight_operand`). K =
            ``spec.subcenters`` (1: one row per class); row j·K + k is sub-center k of
            class j, and the class cosine is c_ij = max_k c_{i, jK+k} (ties: the lowest k).
        labels: [B] integer class indices in [0, C). A row whose label equals
            ``ignore_index`` has no label column here: its logits are all those of
            non-label columns (it is ignored by the loss, or, in a class-sharded head, its
            class lives on another shard).
        spec: the margin family and hyperparameters.
        sphere_lambda: 0-d tensor, SphereFace's annealing weight λ (SPHERE only).
        row_margins: None or [B, 2] in the compute dtype: per-row (m2_i, m3_i) replacing
            the spec's m2, m3 (COMBINED only; AdaFace, ElasticFace). No gradient.
        neg_threshold, neg_t: None, or [B] τ_i and 0-d t (CurricularFace): every non-label
            column with c_ij > τ_i has the logit scale_i·c_ij·(t + c_ij). No gradient.
        product_dtype: run the cosine product in this dtype instead (default: the compute
            dtype). Only for building same-precision eager baselines in tests/benchmarks.

    Returns, all [B] in :func:`magloss.rows.compute_dtype` of the input dtype:
        lse: logsumexp_j z_ij.
        zy: the label logit z_iy = scale_i·ψ_i (0 for rows without a label column).
        reg: MagFace's g(ã_i) (0 for families without a regularizer).
        norms: a_i = ‖x_i‖.

    The per-row cross-entropy is CE_i = lse_i − zy_i.
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    num_classes_of(weight, spec.subcenters)
    ct = compute_dtype(embeddings.dtype)
    x = embeddings.to(ct)
    w = weight_operand(embeddings, weight).to(ct)
    has, idx = _label_index(labels, ignore_index)
    a, x_hat, _, r, cos = _cosines(x, w, product_dtype)
    cos = class_cosines(cos, spec.subcenters, x_hat, w, r)[0]
    c_y = cos.gather(1, idx).squeeze(1)
    base = curricular(cos, neg_threshold, neg_t)[0]

    psi, dpsi_dc, dpsi_da = margin_terms(c_y.detach(), a.detach(), spec, sphere_lambda, row_margins)
    psi = _linearized(_linearized(psi, dpsi_dc, c_y), dpsi_da, a)
    psi = torch.where(has, psi, base.gather(1, idx).squeeze(1))

    scale = a if spec.scale_by_norm else torch.full_like(a, spec.scale)
    zy = scale * psi
    logits = (scale.unsqueeze(1) * base).scatter(1, idx, zy.unsqueeze(1))
    lse = torch.logsumexp(logits, dim=1)
    zy = torch.where(has, zy, torch.zeros_like(zy))

    if spec.has_regularizer:
        g, dg = regularizer(a.detach(), spec.l_a, spec.u_a)
        reg = _linearized(g, dg, a)
    else:
        reg = torch.zeros_like(a)
    return lse, zy, reg, a


def margin_ce_forward(embeddings, weight, labels, spec, ignore_index=-1, sphere_lambda=None, row_margins=None,
                      neg_threshold=None, neg_t=None, side=False):
    """Checked, gradient-free forward (the oracle of ``magloss::margin_ce``).

    Same arguments and returns as :func:`margin_ce_rows`; ``side=True`` appends
    :func:`side_outputs`. Runs with autocast disabled so the fp32 math stays fp32.
    """
    weight = weight_operand(embeddings, weight)
    check_values(embeddings, weight, labels, ignore_index, num_classes_of(weight, spec.subcenters))
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        rows = margin_ce_rows(embeddings, weight, labels, spec, ignore_index, sphere_lambda, row_margins,
                              neg_threshold, neg_t)
        return rows + side_outputs(embeddings, weight, labels, spec.subcenters, ignore_index) if side else rows


def side_outputs(embeddings: Tensor, weight: Tensor, labels: Tensor, subcenters: int = 1,
                 ignore_index: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    """The side outputs of the forward ops (``side=True``), from the full class-cosine matrix
    c [B, C] (c_ij = max over class j's K = ``subcenters`` sub-centers; weight [K·C, D]):

    label_cosine c_iy (0 on rows labelled ``ignore_index``: no label column),
    nearest_negative_cosine max_{j≠y_i} c_ij, nearest_negative_class its j (int64, ties: the
    lowest j; over every class on ignored rows; −inf and −1 when no other class exists).
    All [B], the cosines in the compute dtype. No gradient."""
    ct = compute_dtype(embeddings.dtype)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        x = embeddings.to(ct)
        w = weight_operand(embeddings, weight).to(ct)
        _, x_hat, _, r, cos = _cosines(x, w)
        cos = class_cosines(cos, subcenters, x_hat, w, r)[0]
        has, idx = _label_index(labels, ignore_index)
        c_y = torch.where(has, cos.gather(1, idx).squeeze(1), torch.zeros_like(x[:, 0]))
        label_col = torch.zeros_like(cos, dtype=torch.bool).scatter(1, idx, has.unsqueeze(1))
        negatives = cos.masked_fill(label_col, -torch.inf)
        nn_cos, nn_class = negatives.max(dim=1)
        return c_y, nn_cos, torch.where(nn_cos == -torch.inf, torch.full_like(nn_class, -1), nn_class)


def margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels, lse, spec,
                       ignore_index=-1, sphere_lambda=None, row_margins=None, neg_threshold=None, neg_t=None):
    """Gradients of Σ_i (gl_i·lse_i + gz_i·zy_i + gr_i·reg_i + gn_i·norms_i), by the explicit
    formulas of docs/math.md §2 (no autograd: custom-op kernels run below it).

    ``lse`` is the forward's saved statistic: p_ij = exp(z_ij − lse_i). In a class-sharded
    head it is the global one, which makes the local gradient the exact share of the
    global gradient. With ∂L/∂z_ij = gl_i·p_ij + gz_i·[j = y_i] and scale_i = s (or a_i for
    feature-norm SphereFace):

    * G_ij = ∂L/∂c_ij = scale_i·∂L/∂z_ij·f'_ij off the label (f' = t + 2c_ij on
      CurricularFace's modulated columns, else 1), scale_i·∂L/∂z_iy·∂ψ/∂c at it; with K
      sub-centers, G of class j goes to its winning sub-center's row, 0 to the others;
    * ∂L/∂x̂_i = Σ_j G_ij r_j w_j;  ∂L/∂w_j = r_j Σ_i G_ij x̂_i − r_j² (Σ_i G_ij c_ij) w_j;
    * ∂L/∂a_i = scale_i·∂L/∂z_iy·∂ψ/∂a + gr_i·g'(a_i) + gn_i
      (+ Σ_j ∂L/∂z_ij·z_ij/a_i when scale_i = a_i);
    * ∂L/∂x_i = (∂L/∂x̂_i − x̂_i·Σ_j G_ij c_ij)/a_i + ∂L/∂a_i·x̂_i.

    grad_*: [B]. Returns (∂/∂embeddings [B, D], ∂/∂weight [K·C, D]) in the dtypes of
    embeddings and weight (for a float32 weight with half embeddings: the float32 gradient
    with respect to the rounded matrix of :func:`magloss.rows.weight_operand`, never rounded to half);
    half gradients saturate at the dtype's largest finite value (:func:`magloss.rows.saturating_cast`).
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    num_classes_of(weight, spec.subcenters)
    ct = compute_dtype(embeddings.dtype)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        x = embeddings.to(ct)
        w = weight_operand(embeddings, weight).to(ct)
        has, idx = _label_index(labels, ignore_index)
        a, x_hat, w_norm, r, cos_rows = _cosines(x, w)
        cos, winner = class_cosines(cos_rows, spec.subcenters, x_hat, w, r)
        c_y = cos.gather(1, idx).squeeze(1)
        base, slope = curricular(cos, neg_threshold, neg_t)
        inv_a = 1.0 / a.clamp_min(NORM_EPS)
        psi, dpsi_dc, dpsi_da = margin_terms(c_y, a, spec, sphere_lambda, row_margins)
        zero = torch.zeros_like(a)
        psi = torch.where(has, psi, base.gather(1, idx).squeeze(1))
        scale = a if spec.scale_by_norm else torch.full_like(a, spec.scale)
        logits = (scale.unsqueeze(1) * base).scatter(1, idx, (scale * psi).unsqueeze(1))
        dz = torch.exp(logits - lse.to(ct).unsqueeze(1)) * grad_lse.to(ct).unsqueeze(1)
        dz_y = dz.gather(1, idx).squeeze(1) + torch.where(has, grad_zy.to(ct), zero)
        dz = dz.scatter(1, idx, dz_y.unsqueeze(1))               # ∂L/∂z
        off_label = torch.ones_like(a) if slope is None else slope.gather(1, idx).squeeze(1)
        label_factor = torch.where(has, dpsi_dc, off_label)
        g = dz * scale.unsqueeze(1)
        if slope is not None:
            g = g * slope
        g = g.scatter(1, idx, (scale * dz_y * label_factor).unsqueeze(1))

        grad_a = torch.where(has, scale * dz_y * dpsi_da, zero) + grad_norms.to(ct)
        if spec.has_regularizer:
            grad_a = grad_a + grad_reg.to(ct) * regularizer(a, spec.l_a, spec.u_a)[1]
        if spec.scale_by_norm:
            grad_a = grad_a + (dz * logits).sum(1) * inv_a

        if winner is not None:                       # G of class j -> its winning sub-center
            g = torch.zeros_like(cos_rows).unflatten(1, (-1, spec.subcenters)).scatter(
                2, winner.unsqueeze(2), g.unsqueeze(2)).flatten(1)
        cos = cos_rows
        gr = g * r                                   # G_ij r_j
        g_xhat = gr @ w                              # ∂L/∂x̂  [B, D]
        gc_row = (g * cos).sum(1)                    # Σ_j G_ij c_ij
        unit = x / a.clamp_min(torch.finfo(ct).tiny).unsqueeze(1)
        # The ε branches test "< ε" so that a NaN norm keeps its (NaN) term.
        proj = torch.where((a < NORM_EPS).unsqueeze(1), torch.zeros_like(x), x_hat * gc_row.unsqueeze(1))
        gx = (g_xhat - proj) * inv_a.unsqueeze(1) + grad_a.unsqueeze(1) * unit

        gc_col = (g * cos).sum(0)                    # Σ_i G_ij c_ij
        col_proj = torch.where((w_norm < NORM_EPS).unsqueeze(1), torch.zeros_like(w),
                               (r * r * gc_col).unsqueeze(1) * w)
        gw = gr.t() @ x_hat - col_proj
    return saturating_cast(gx, embeddings.dtype), saturating_cast(gw, weight.dtype)
