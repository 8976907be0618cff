"""The reference engine: every margin loss in plain PyTorch, the CPU path and the test oracle.

It follows docs/math.md §1 literally: full B×C cosine matrix, the label column
replaced by s·ψ, log-sum-exp, per-row cross-entropy. All math runs in float32 for
fp16/bf16/fp32 inputs and in float64 for float64 inputs (so tests can gradcheck it).

Gradients come from autograd through standard PyTorch ops; only the margin's local
derivatives ∂ψ/∂c and ∂ψ/∂a are supplied by hand (from :mod:`magloss.margins`), as
the first-order term ψ + ∂ψ/∂c·(c − c₀) + ∂ψ/∂a·(a − a₀) evaluated at c = c₀, a = a₀.
That keeps the value exactly ψ, makes the gradient exactly the documented one
(including the ε guard and straight-through), and avoids acos' infinite slope at ±1.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .margins import BOUNDARIES, COMBINED, EASY, NORM_EPS, MarginSpec, margin_terms, regularizer

__all__ = [
    "compute_dtype", "first_true", "bad_labels", "is_autocast_pair", "input_check_mode", "check_values",
    "check_extras", "num_classes_of", "class_cosines", "curricular",
    "weight_operand", "margin_ce_rows", "margin_ce_forward", "margin_ce_backward", "saturating_cast",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the margin, softmax and reductions run in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_true(mask: Tensor) -> Tensor:
    """Index of the first True of a 1-D bool ``mask`` as a 0-d int64 tensor on the mask's
    device, or ``len(mask)`` when there is none. No host synchronization."""
    n = mask.shape[0]
    idx = torch.arange(n, device=mask.device)
    return torch.where(mask, idx, n).amin() if n else idx.new_zeros(())


def bad_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """[B] bool: labels that are neither in [0, num_classes) nor ``ignore_index``."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def is_autocast_pair(embeddings_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """float16/bfloat16 embeddings with a float32 weight: the one mixed pair the ops accept."""
    return weight_dtype == torch.float32 and embeddings_dtype in (torch.float16, torch.bfloat16)


def input_check_mode() -> str:
    """``MAGLOSS_CHECK_INPUTS``, read at each call and parsed as the fused engine parses it:
    'async' (unset, '', 'async' or '1'), 'sync', or 'off' ('off' or '0'). Raises ValueError
    for anything else. The reference always checks synchronously; only 'off' changes it
    (:func:`check_values`)."""
    v = os.environ.get("MAGLOSS_CHECK_INPUTS", "")
    if v in ("", "async", "1"):
        return "async"
    if v in ("sync", "off"):
        return v
    if v == "0":
        return "off"
    raise ValueError(f"MAGLOSS_CHECK_INPUTS: expected 'async' (default), 'sync' or 'off', got '{v}'")


def num_classes_of(weight: Tensor, spec: MarginSpec) -> int:
    """C = weight.shape[0] / K for K = ``spec.subcenters`` sub-centers per class.

    Raises ValueError when the class matrix's rows are not a multiple of K."""
    k = spec.subcenters
    if weight.shape[0] % k:
        raise ValueError(f"weight: expected K*C rows for subcenters K={k} (row j*K + k is sub-center k of "
                         f"class j), got {weight.shape[0]} rows, not a multiple of {k}")
    return weight.shape[0] // k


def check_extras(embeddings: Tensor, spec: MarginSpec, row_margins: Optional[Tensor],
                 neg_threshold: Optional[Tensor], neg_t: Optional[Tensor]) -> None:
    """Shape, dtype and family checks of the optional op inputs (every engine runs them).

    * row_margins: None or [B, 2] contiguous, in the compute dtype, on the embeddings'
      device, only with the COMBINED family: per-row (m2_i, m3_i).
    * neg_threshold, neg_t: both None or both given (CurricularFace): [B] and 0-d, compute
      dtype, same device.
    * boundary CLIP or NONE only with COMBINED.

    * boundary one of THRESHOLD, EASY, CLIP, NONE; subcenters K >= 1 (the op's integers
      come unvalidated from C++/torch.library callers).

    Raises ValueError naming the argument.
    """
    if spec.boundary not in range(len(BOUNDARIES)):
        raise ValueError(f"boundary: expected one of {list(range(len(BOUNDARIES)))} "
                         f"({', '.join(BOUNDARIES)}), got {spec.boundary}")
    if spec.subcenters < 1:
        raise ValueError(f"subcenters: expected K >= 1 sub-centers per class, got {spec.subcenters}")
    if spec.boundary > EASY and spec.kind != COMBINED:
        raise ValueError(f"boundary: {BOUNDARIES[spec.boundary].upper()} needs the COMBINED margin family "
                         f"(kind 0), got kind {spec.kind}")
    ct = compute_dtype(embeddings.dtype)
    b = embeddings.shape[0]

    def expect(name: str, t: Tensor, shape: Tuple[int, ...]) -> None:
        if tuple(t.shape) != shape or t.dtype != ct or t.device != embeddings.device or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {list(shape)} {ct} tensor on {embeddings.device}, "
                             f"got {'a non-contiguous ' if not t.is_contiguous() else ''}{list(t.shape)} "
                             f"{t.dtype} on {t.device}")

    if row_margins is not None:
        if spec.kind != COMBINED:
            raise ValueError(f"row_margins: per-row margins need the COMBINED margin family (kind 0), "
                             f"got kind {spec.kind}")
        expect("row_margins", row_margins, (b, 2))
    if (neg_threshold is None) != (neg_t is None):
        raise ValueError("neg_threshold, neg_t: expected both (CurricularFace's per-row threshold and t) or "
                         f"neither, got {'neg_threshold' if neg_t is None else 'neg_t'} alone")
    if neg_threshold is not None:
        expect("neg_threshold", neg_threshold, (b,))
        expect("neg_t", neg_t, ())


def class_cosines(cos: Tensor, subcenters: int, x_hat: Optional[Tensor] = None, w: Optional[Tensor] = None,
                  r: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Sub-center cosines [B, K·C] -> class cosines [B, C], c_ij = c_{i, jK+k*}, and the
    winning k* [B, C] int64 (None for K = 1, where ``cos`` is returned as is). Autograd sends
    the gradient of c_ij to the winner only.

    k* is the sub-center of largest cosine; ties go to the lowest k. A matrix product rounds
    a column's dot product in a way that depends on the column's position, so two
    bitwise-identical sub-centers can get cosines one rounding step apart, and which copy
    "wins" would depend on the chunking. Given the operands of ``cos`` (x_hat [B, D] unit
    rows, w [K·C, D], r [K·C] = 1/‖w‖), the tie is settled on position-independent values:
    where several sub-centers lie within the product's rounding bound (D + 2)·eps of the
    largest, their cosines are recomputed by one gather-dot each (the same summation order
    for every k) and the lowest k among the largest of those wins. So identical sub-centers
    always send the gradient to the lowest k, on the reference and the chunked engine alike."""
    if subcenters == 1:
        return cos, None
    tiles = cos.unflatten(1, (-1, subcenters))
    best, win = tiles.detach().max(dim=2)
    if x_hat is not None:
        win = _settle_ties(tiles.detach(), best, win, x_hat.detach(), w.detach(), r.detach(), subcenters)
    return tiles.gather(2, win.unsqueeze(2)).squeeze(2), win


def _settle_ties(tiles: Tensor, best: Tensor, win: Tensor, x_hat: Tensor, w: Tensor, r: Tensor, k: int) -> Tensor:
    """The winners of :func:`class_cosines` with near-ties decided on gather-dot cosines."""
    tol = (x_hat.shape[1] + 2) * torch.finfo(tiles.dtype).eps
    near = tiles >= (best - tol).unsqueeze(2)                       # [B, n, K]; NaN rows: none near
    rows, cls = (near.sum(2) > 1).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return win
    wk = w.to(x_hat.dtype).view(-1, k, w.shape[1]).index_select(0, cls)      # [N, K, D]
    exact = (x_hat.index_select(0, rows).unsqueeze(1) * wk).sum(2) * r.to(x_hat.dtype).view(-1, k).index_select(0, cls)
    exact = torch.where(near[rows, cls], exact, torch.full_like(exact, -torch.inf))
    win = win.clone()
    win[rows, cls] = exact.argmax(1)
    return win


def label_subcenters(x_hat: Tensor, weight: Tensor, lab: Tensor, subcenters: int,
                     x_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The K rows of each row's label class (row lab_i·K + k of ``weight``) as the math sees
    them: w [B, K, D] in x_hat's dtype (first rounded to ``x_dtype``: the autocast pair), their
    norms ‖w‖ [B, K], r = 1/max(‖w‖, ε) [B, K] and the cosines x̂_i·w·r [B, K]. A gather-dot,
    O(B·K·D). x_hat [B, D] unit rows, lab [B] int64 in [0, C)."""
    rows = (lab.unsqueeze(1) * subcenters + torch.arange(subcenters, device=lab.device)).flatten()
    w = weight.index_select(0, rows)
    w = (w if x_dtype is None else w.to(x_dtype)).to(x_hat.dtype).view(lab.shape[0], subcenters, weight.shape[1])
    wn = w.norm(dim=2)
    r = 1.0 / wn.clamp_min(NORM_EPS)
    return w, wn, r, (x_hat.unsqueeze(1) * w).sum(2) * r


def curricular(cos: Tensor, neg_threshold: Optional[Tensor], neg_t: Optional[Tensor]):
    """CurricularFace's function of the non-label columns: f(c_ij) = c_ij·(t + c_ij) where
    c_ij > τ_i, else c_ij; and f' = t + 2·c_ij there, else 1. cos: [B, N], neg_threshold
    [B] (τ), neg_t 0-d (t). Returns (f, f'), or (cos, None) without the modulation."""
    if neg_threshold is None:
        return cos, None
    hard = cos > neg_threshold.unsqueeze(1)
    t = neg_t.to(cos.dtype)
    return torch.where(hard, cos * (t + cos), cos), torch.where(hard, t + 2.0 * cos, torch.ones_like(cos))


def check_values(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                 num_classes: Optional[int] = None) -> None:
    """Value checks that need the data: label range and finiteness. Raises ValueError.

    The first bad label row, embedding row and class row are found on the device and read
    back together: one host synchronization per call. The reference pays that; the fused
    CUDA path checks on the device without waiting (docs/cuda.md).

    With ``MAGLOSS_CHECK_INPUTS=off`` (:func:`input_check_mode`) the NaN/Inf check is skipped,
    as in the fused engine: a NaN then gives NaN row statistics (NaN in, NaN out). The label
    check always runs, since the reference indexes with the labels.
    """
    num_classes = weight.shape[0] if num_classes is None else num_classes
    firsts = [first_true(bad_labels(labels, num_classes, ignore_index))]
    if input_check_mode() != "off":
        firsts += [first_true(~torch.isfinite(embeddings).all(dim=1)), first_true(~torch.isfinite(weight).all(dim=1))]
    i, *rows = torch.stack(firsts).tolist()
    if i < labels.shape[0]:
        raise ValueError(
            f"labels: expected class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got {int(labels[i])} at row {i}"
        )
    for name, t, j in zip(("embeddings", "weight"), (embeddings, weight), rows):
        if j < t.shape[0]:
            raise ValueError(f"{name}: contains NaN or Inf (row {j})")


def weight_operand(embeddings: Tensor, weight: Tensor) -> Tensor:
    """The class matrix the math uses: ``weight`` itself, or for a float32 weight with
    float16/bfloat16 embeddings (the autocast case) ``weight`` rounded to the embeddings'
    dtype. Any other dtype pair raises TypeError."""
    if weight.dtype == embeddings.dtype:
        return weight
    if is_autocast_pair(embeddings.dtype, weight.dtype):
        return weight.to(embeddings.dtype)
    raise TypeError(f"embeddings, weight: expected the same dtype (or a float32 weight with float16/bfloat16 "
                    f"embeddings), got {embeddings.dtype} and {weight.dtype}")


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
            (autocast), then rounded to their dtype (:func:`weight_operand`). K =
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

    Returns, all [B] in :func:`compute_dtype` of the input dtype:
        lse: logsumexp_j z_ij.
        zy: the label logit z_iy = scale_i·ψ_i (0 for rows without a label column).
        reg: MagFace's g(ã_i) (0 for families without a regularizer).
        norms: a_i = ‖x_i‖.
    The per-row cross-entropy is CE_i = lse_i − zy_i.
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    num_classes_of(weight, spec)
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
                      neg_threshold=None, neg_t=None):
    """Checked, gradient-free forward (the oracle of ``magloss::margin_ce``).

    Same arguments and returns as :func:`margin_ce_rows`. Runs with autocast disabled so
    the fp32 math stays fp32.
    """
    weight = weight_operand(embeddings, weight)
    check_values(embeddings, weight, labels, ignore_index, num_classes_of(weight, spec))
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        return margin_ce_rows(embeddings, weight, labels, spec, ignore_index, sphere_lambda, row_margins,
                              neg_threshold, neg_t)


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
    with respect to the rounded matrix of :func:`weight_operand`, never rounded to half);
    half gradients saturate at the dtype's largest finite value (:func:`saturating_cast`).
    """
    check_extras(embeddings, spec, row_margins, neg_threshold, neg_t)
    num_classes_of(weight, spec)
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


def saturating_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, with values beyond a float16/bfloat16 range clamped to its largest
    finite value instead of becoming ±Inf (NaN stays NaN). A zero embedding row's gradient
    is F.normalize's (∂L/∂x̂)/1e-12, finite in float32 but past float16's 65504."""
    if dtype in (torch.float16, torch.bfloat16) and t.dtype != dtype:
        big = torch.finfo(dtype).max
        t = t.clamp(-big, big)
    return t.to(dtype)
