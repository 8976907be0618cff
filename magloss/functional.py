"""Functional forms of every loss: ``loss(embeddings, weight, labels, ...)``.

Common arguments (all functions):

* ``embeddings``: [B, D] float16/bfloat16/float32/float64, **not** normalized (the
  magnitude ‖x_i‖ is an input of MagFace and SphereFace).
* ``weight``: [C, D], the class centres in nn.Linear layout, same dtype and device.
  Under ``torch.autocast`` both are cast to the autocast dtype first, as ``F.linear``
  would; otherwise a dtype mismatch is an error.
* ``labels``: [B] int64/int32 class indices; rows equal to ``ignore_index`` (default
  −1) add nothing to the loss or to any gradient.
* ``reduction``: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` ([B], 0 on
  ignored rows). A mean over zero rows (empty batch, or every row ignored) is 0 with
  zero gradients, where ``F.cross_entropy`` would return NaN.
* ``return_parts``: return a :class:`LossParts` (loss, ce, reg, norms, reg_weighted, and
  for the margin and one-vs-all losses the side outputs label_cosine, nearest_negative_cosine,
  nearest_negative_class, predicted_class from the same pass) instead of the loss tensor.
  Every loss has it; without it no side output is computed.
* ``sample_weight``: optional [B] float tensor w_i ≥ 0 (finite) on the embeddings' device,
  a constant (no gradient flows into it). Row i's loss (CE_i, and λ_g·g(ã_i) for MagFace) is
  multiplied by w_i; ``"mean"`` is the weighted average Σ_i w_i·L_i / Σ_i w_i over the
  non-ignored rows (0 when that sum is 0), ``"sum"`` is Σ_i w_i·L_i, ``"none"`` gives
  w_i·L_i. Every loss has it (:func:`check_sample_weight`).
* ``class_margins`` (ArcFace, Sub-center ArcFace, CosFace, the combined margin): optional
  per-class margins looked up by label, replacing the scalar margin: [C] in radians (ArcFace,
  Sub-center ArcFace), [C] in cosine units (CosFace), [C, 2] of (m2_c, m3_c) (combined);
  :func:`magloss.margins.class_count_margins` builds one from class counts. No gradient.

Errors are raised in the caller's words: TypeError/ValueError naming the argument (a
weight in the [D, C] layout is named as transposed; ArcFace's and CosFace's ``margin``
is named ``margin``, in radians). An ``ignore_index`` inside [0, C) warns.

The margin, softmax and reductions run in float32 (float64 for float64 inputs); the
returned loss has that dtype. Logits: z_ij = s·c_ij, z_iy = s·ψ(c_iy, a_i), with
c_ij = x̂_i·ŵ_j; CE_i = logsumexp_j z_ij − z_iy (docs/math.md §1).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .adaptive import (adaface_args, adaface_row_margins, curricular_threshold, elastic_args, elastic_draws,
                       elastic_row_margins, label_cosines)
from .checks import check_inputs, check_types, check_values, num_classes_of
from .margins import (CLASS_M2, CLASS_M3, CLIP, NONE, NORM_EPS, MarginSpec, check_class_margins, check_float_table,
                      class_row_margins, sphere_lambda as _sphere_lambda_schedule)
from .rows import autocasting, compute_dtype
from .validation import check_ignore_index, check_int, check_non_negative, check_reduction

__all__ = [
    "LossParts",
    "MagFaceOutput",
    "accuracy",
    "check_sample_weight",
    "cosine_argmax",
    "parts_accuracy",
    "side_parts",
    "margin_loss",
    "softmax_loss",
    "normface_loss",
    "cosface_loss",
    "arcface_loss",
    "combined_margin_loss",
    "sphereface_loss",
    "magface_loss",
    "magcosface_loss",
    "subcenter_arcface_loss",
    "adaface_loss",
    "curricular_face_loss",
    "elastic_arcface_loss",
    "elastic_cosface_loss",
]


class LossParts(NamedTuple):
    """What every loss returns with ``return_parts=True``, from the same pass.

    * ``loss``: the total, ``ce + reg_weighted`` (reduced as asked; what you backpropagate);
    * ``ce``: the reduced cross-entropy term;
    * ``reg``: the reduced regularizer g(ã), **unweighted** (as the MagFace code logs
      ``loss_g``); 0 for losses without one;
    * ``norms``: [B] the magnitudes a_i = ‖x_i‖ of the embeddings as given (float32, float64
      for float64 input; detach before logging);
    * ``reg_weighted``: λ_g·reg, the regularizer as it enters ``loss`` (0 without one).

    The side outputs, each [B], from the same forward pass (no extra product; the margin
    and one-vs-all losses, single-process and sharded; None for the softmax baseline). c_ij is the plain cosine of row i and class j, no margin, no scale; with K
    sub-centers a class's cosine is the max over its K (docs/math.md, "Side outputs"):

    * ``label_cosine``: c_iy (CR-FIQA's CCS), float32 (float64 for float64 input); NaN on
      rows labelled ``ignore_index``;
    * ``nearest_negative_cosine``: max_{j≠y_i} c_ij (CR-FIQA's NNCCS), same dtype; on an ignored
      row the max over every class; −inf when the row has no other class (C = 1);
    * ``nearest_negative_class``: int64, the j of that max (ties: the lowest index; −1 when none);
    * ``predicted_class``: int64, arg-max_j c_ij over all classes (ties: the lowest index),
      what a deployed model predicts: y_i where c_iy > NNCCS, or where they are equal and
      y_i is the lower index; else the nearest negative class (on ignored rows too).

    The first four fields are those of ``MagFaceOutput``, in its order (an alias).
    """

    loss: Tensor
    ce: Tensor
    reg: Tensor
    norms: Tensor
    reg_weighted: Tensor
    label_cosine: Optional[Tensor] = None
    nearest_negative_cosine: Optional[Tensor] = None
    nearest_negative_class: Optional[Tensor] = None
    predicted_class: Optional[Tensor] = None


#: Another name of :class:`LossParts` (the MagFace losses' name for it); same class.
MagFaceOutput = LossParts


#: Under float16 autocast, rows with ‖x_i‖ above this are scaled down by a power of two
#: before the cast (:func:`autocast_inputs`); after scaling their magnitude lies in (2^14, 2^15].
HALF_ROW_LIMIT = 2.0 ** 15


def autocast_inputs(embeddings: Tensor, weight: Tensor, spec: Optional[MarginSpec] = None, *,
                    bound_factor: Optional[Tensor] = None, limit: float = HALF_ROW_LIMIT):
    """Under autocast (on the embeddings' device), cast the embeddings to the autocast
    dtype, as ``F.linear`` would, before the dtype check. A float32 weight is passed on
    as is: the op rounds it to the embeddings' dtype chunk by chunk and returns its
    gradient in float32 (see :mod:`magloss.ops`), so no C×D half copy of W is made or
    kept for the backward. Other weight dtypes are cast too. float64 is never cast.

    float16 has a range of ±65504: a finite float32 embedding with a larger entry (or a
    larger norm) would become Inf in the cast. So under float16 autocast each row's
    magnitude a_i is computed in float32 first, and a row with a_i > 2^15 is divided by
    a power of two u_i (exact: no rounding changes) so that its magnitude lies in
    (2^14, 2^15]; rows within range are cast unchanged (u_i = 1). Cosines do not depend
    on the scale; the op's ``norms`` are multiplied back by u_i by the caller, and the
    gradient flows through the exact scaling. The magnitude-dependent terms see the
    scaled magnitude, which changes nothing where they are clamped: MagFace's m(a) and
    g(a) clamp at u_a, so this is exact when u_a ≤ 2^14. Where the magnitude itself
    scales the logits (SphereFace with ``scale=None``), or MagFace's u_a > 2^14, the
    embeddings stay float32 under float16 autocast and the op runs its float32 path.

    ``bound_factor`` (a float32 scalar tensor) and ``limit`` change the rule to "scale row
    i when ‖x_i‖·bound_factor > limit" (the softmax baseline bounds its logits this way).

    Returns (embeddings, weight, u): u is the [B] float32 tensor of row scales, or None
    when nothing was scaled.
    """
    if not (isinstance(embeddings, Tensor) and isinstance(weight, Tensor)) or not autocasting(embeddings):
        return embeddings, weight, None    # check_inputs names the culprit
    dt = torch.get_autocast_dtype(embeddings.device.type)
    up = None
    keep = dt == torch.float16 and spec is not None and (
        spec.scale_by_norm or (spec.has_regularizer and spec.u_a > HALF_ROW_LIMIT / 2))
    if embeddings.is_floating_point() and embeddings.dtype not in (torch.float64, dt) and not keep:
        if dt == torch.float16:
            with torch.no_grad():
                bound = embeddings.detach().float().norm(dim=1)
                up = half_safe_rows(bound if bound_factor is None else bound * bound_factor, limit)
            embeddings = embeddings * (1.0 / up).to(embeddings.dtype).unsqueeze(1)
        embeddings = embeddings.to(dt)
    if weight.is_floating_point() and weight.dtype not in (torch.float64, torch.float32):
        weight = weight.to(torch.float32 if embeddings.dtype == torch.float32 else dt)
    return embeddings, weight, up


def _reduce(rows: Tensor, valid: Tensor, reduction: str, sample_weight: Optional[Tensor] = None) -> Tensor:
    """rows [B], already 0 where not ``valid``; with ``sample_weight`` [B] each row is weighted
    and "mean" divides by the valid rows' total weight instead of their count."""
    if sample_weight is not None:
        rows = rows * sample_weight
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if sample_weight is None:
        return total / valid.sum().clamp_min(1).to(rows.dtype)
    den = torch.where(valid, sample_weight, torch.zeros_like(sample_weight)).sum()
    return total / torch.where(den > 0, den, torch.ones_like(den))   # all weights 0: total is 0


def check_sample_weight(sample_weight: Optional[Tensor], embeddings: Tensor) -> Optional[Tensor]:
    """``sample_weight`` as the losses use it: None, or a [B] floating tensor on the embeddings'
    device with finite values ≥ 0, returned detached in the compute dtype (float32; float64 for
    float64 embeddings). TypeError/ValueError naming ``sample_weight`` otherwise; the value check
    is one host synchronization (:func:`magloss.margins.check_float_table`)."""
    if sample_weight is None:
        return None
    check_float_table("sample_weight", sample_weight, (embeddings.shape[0],), device=embeddings.device)
    return sample_weight.detach().to(compute_dtype(embeddings.dtype))


def margin_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    spec: MarginSpec,
    *,
    ignore_index: int = -1,
    reduction: str = "mean",
    lambda_g: float = 0.0,
    sphere_lambda: Optional[Tensor] = None,
    return_parts: bool = False,
    row_margins: Optional[Tensor] = None,
    neg_threshold: Optional[Tensor] = None,
    neg_t: Optional[Tensor] = None,
    class_margins: Optional[Tensor] = None,
    class_margin_column: Optional[int] = None,
    sample_weight: Optional[Tensor] = None,
):
    """The generic margin loss: reduce_i(CE_i) + λ_g·reduce_i(g(ã_i)) for a :class:`MarginSpec`.

    Every named loss below is this with a particular spec. ``lambda_g`` weighs MagFace's
    regularizer (ignored by families without one). ``sphere_lambda`` is SphereFace's
    annealing weight λ (a float, computed in the compute dtype, or a 0-d tensor). With
    ``return_parts=True`` returns a :class:`LossParts` instead of the loss tensor.
    ``weight`` has K·C rows for ``spec.subcenters`` = K. The engine's optional inputs
    (:mod:`magloss.ops`): ``row_margins`` [B, 2] per-row (m2_i, m3_i), ``neg_threshold`` [B]
    and ``neg_t`` 0-d (CurricularFace), all in the compute dtype, without gradient.

    ``class_margins``: per-class margins of the COMBINED family, looked up by label into the
    per-row margins (:func:`magloss.margins.check_class_margins`): a [C, 2] table of (m2_c, m3_c),
    or with ``class_margin_column`` (:data:`magloss.margins.CLASS_M2` = 0: m2_c, an angle in
    radians; ``CLASS_M3`` = 1: m3_c, a cosine) a [C] table. It replaces the spec's m2 and m3 and
    excludes ``row_margins``. ``sample_weight``: see the module docstring.
    """
    ops.functorch_unsupported("magloss.functional.margin_loss", embeddings, weight)
    embeddings, weight, up = autocast_inputs(embeddings, weight, spec)
    check_inputs(embeddings, weight, labels)
    check_reduction(reduction)
    check_ignore_index(ignore_index, weight.shape[0] // spec.subcenters, stacklevel=4)
    sample_weight = check_sample_weight(sample_weight, embeddings)
    if class_margins is not None:
        if row_margins is not None:
            raise ValueError("class_margins, row_margins: expected one source of per-row margins, got both")
        check_class_margins(spec, class_margins, weight.shape[0] // spec.subcenters, class_margin_column,
                            embeddings.device)
        row_margins = class_row_margins(class_margins, labels, ignore_index, class_margin_column,
                                        compute_dtype(embeddings.dtype))
    if sphere_lambda is not None and not isinstance(sphere_lambda, Tensor):
        sphere_lambda = torch.tensor(float(sphere_lambda), dtype=compute_dtype(embeddings.dtype),
                                     device=embeddings.device)
    lse, zy, reg_rows, norms, *side = ops.margin_ce_rows(embeddings, weight, labels, sphere_lambda, row_margins,
                                                         neg_threshold, neg_t, *spec.op_args(ignore_index),
                                                         side=return_parts)
    if up is not None:
        norms = norms * up.to(norms.dtype)
    valid = labels != ignore_index
    return reduce_rows(lse - zy, reg_rows, norms, valid, spec, reduction, lambda_g, return_parts, sample_weight,
                       side=side_parts(labels, valid, *side) if side else None)


def reduce_rows(ce_rows: Tensor, reg_rows: Tensor, norms: Tensor, valid: Tensor, spec: Optional[MarginSpec],
                reduction: str, lambda_g: float, return_parts: bool, sample_weight: Optional[Tensor] = None,
                side: Optional[tuple] = None):
    """Mask rows that are not ``valid`` to zero (value and gradient), reduce, and add λ_g·reg.

    ce_rows, reg_rows, norms, valid: [B]; ``spec=None`` means no regularizer (softmax).
    ``sample_weight``: None or the checked [B] weights (:func:`check_sample_weight`), applied to
    CE and the regularizer alike (a weight scales the row's whole loss). ``side``: the four side
    fields of :class:`LossParts` (:func:`side_parts`) or None. Shared by the single-process and
    sharded heads. Returns the loss, or a :class:`LossParts` with ``return_parts``.
    """
    zero = torch.zeros_like(ce_rows)
    ce = _reduce(torch.where(valid, ce_rows, zero), valid, reduction, sample_weight)
    if spec is not None and spec.has_regularizer:
        reg = _reduce(torch.where(valid, reg_rows, zero), valid, reduction, sample_weight)
        reg_weighted = lambda_g * reg
        loss = ce + reg_weighted
    else:
        reg, loss = torch.zeros_like(ce), ce
        reg_weighted = reg
    if return_parts:
        return LossParts(loss, ce, reg, norms, reg_weighted, *(side or ()))
    return loss


def side_parts(labels: Tensor, valid: Tensor, label_cosine: Tensor, nearest_cosine: Tensor,
               nearest_class: Tensor) -> tuple:
    """The four side fields of :class:`LossParts` from an engine's three side outputs (the ops'
    convention, :mod:`magloss.ops`): label_cosine (NaN where not ``valid``), the nearest negative's
    cosine and class as given, and the predicted class, arg-max_j c_ij with ties to the lowest
    index, decided from c_iy against the nearest negative: y_i when c_iy > NNCCS, or when equal
    and y_i < its class, or when the row has no negative class (−1); else the nearest negative.
    labels, valid [B]; shared by the single-process and sharded heads."""
    lab = labels.long()
    own = valid & ((label_cosine > nearest_cosine) | ((label_cosine == nearest_cosine) & (lab < nearest_class))
                   | (nearest_class < 0))
    label_cosine = torch.where(valid, label_cosine, torch.full_like(label_cosine, math.nan))
    return label_cosine, nearest_cosine, nearest_class, torch.where(own, lab, nearest_class)


def parts_accuracy(parts: LossParts, labels: Tensor, ignore_index: int = -1) -> Tensor:
    """Training accuracy from a loss call's own side outputs (``return_parts=True``), at no
    extra cost: the share of rows not labelled ``ignore_index`` whose ``predicted_class`` is
    the label, as :func:`accuracy` (0-d, the cosines' dtype; 0 without such rows; NaN when a
    counted row's cosines are not finite). Equals :func:`accuracy` on the loss's inputs
    (the classes the forward saw: with Partial FC, the sampled ones).

    Raises:
        ValueError: ``parts`` has no side outputs (a loss that computes none).
    """
    if parts.predicted_class is None:
        raise ValueError("parts: expected the side outputs of a loss called with return_parts=True "
                         "(predicted_class is None: this loss computes none)")
    valid = labels != ignore_index
    best = torch.maximum(torch.where(valid, parts.label_cosine, parts.nearest_negative_cosine),
                         parts.nearest_negative_cosine)
    return hit_rate(parts.predicted_class, best, labels, valid)


def softmax_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, *,
                 ignore_index: int = -1, reduction: str = "mean", return_parts: bool = False,
                 sample_weight: Optional[Tensor] = None):
    """Plain softmax cross-entropy, the unnormalized baseline: z = x·Wᵀ + b.

    bias: optional [C]. Runs on PyTorch's own F.linear/F.cross_entropy (no custom op,
    no fused kernel); the softmax is float32. Same checks and reduction rules as the
    margin losses (mean over zero rows is 0, not NaN). Under float16 autocast, rows whose
    logits could pass fp16's range (abs(z_ij) ≤ ‖x_i‖·max_j ‖w_j‖ > 2^14) are scaled down by a
    power of two for the half product and scaled back in float32, so large logits give
    the fp32 answer instead of Inf/NaN (:func:`half_safe_rows`). ``return_parts=True``
    returns a :class:`LossParts` (reg = 0).
    """
    bound_factor = None             # |z_ij| ≤ ‖x_i‖·max_j ‖w_j‖
    if isinstance(embeddings, Tensor) and isinstance(weight, Tensor) and autocasting(embeddings) \
            and weight.dim() == 2 and weight.numel():
        with torch.no_grad():
            bound_factor = weight.detach().float().norm(dim=1).amax()
    raw = embeddings
    embeddings, weight, up = autocast_inputs(embeddings, weight, bound_factor=bound_factor, limit=2.0 ** 14)
    check_inputs(embeddings, weight, labels)
    check_reduction(reduction)
    check_ignore_index(ignore_index, weight.shape[0], stacklevel=3)
    labels = ops.checked_labels(embeddings, weight, labels, ignore_index, weight.shape[0])   # int64
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    ct = compute_dtype(embeddings.dtype)
    if up is None:
        logits = F.linear(embeddings, weight, None if bias is None else bias.to(weight.dtype))
    else:                           # the half product of the scaled rows, scaled back in float32
        with torch.autocast(embeddings.device.type, enabled=False):
            logits = F.linear(embeddings, weight.to(embeddings.dtype)).to(ct) * up.to(ct).unsqueeze(1)
        if bias is not None:
            logits = logits + bias.to(ct)
    rows = F.cross_entropy(logits.to(ct), labels, ignore_index=ignore_index, reduction="none")
    valid = labels != ignore_index
    sample_weight = check_sample_weight(sample_weight, embeddings)
    if not return_parts:
        return _reduce(rows, valid, reduction, sample_weight)
    norms = raw.detach().to(ct).norm(dim=1)
    return reduce_rows(rows, torch.zeros_like(rows), norms, valid, None, reduction, 0.0, True, sample_weight)


def half_safe_rows(bound: Tensor, limit: float) -> Tensor:
    """Per-row powers of two u_i ≥ 1 with bound_i / u_i ≤ ``limit``: dividing row i by u_i
    before a float16 cast (and multiplying the result back in float32) keeps values below
    ``limit`` without changing any rounding (scaling by 2^k is exact). Rows already within
    the limit get u_i = 1, i.e. are left bit for bit as they were. bound: [B] float32."""
    e = torch.ceil(torch.log2(bound.clamp_min(limit) / limit))
    return torch.exp2(e.nan_to_num(0.0, posinf=0.0))


def normface_loss(embeddings, weight, labels, scale: float = 64.0, *, ignore_index: int = -1,
                  reduction: str = "mean", return_parts: bool = False, sample_weight: Optional[Tensor] = None):
    """NormFace / normalized softmax: ψ(c) = c, z = s·c. Default s = 64."""
    spec = MarginSpec.combined(scale, 1.0, 0.0, 0.0)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, sample_weight=sample_weight)


def cosface_loss(embeddings, weight, labels, scale: float = 64.0, margin: float = 0.35, *,
                 straight_through: bool = False, ignore_index: int = -1, reduction: str = "mean",
                 return_parts: bool = False,
                 class_margins: Optional[Tensor] = None, sample_weight: Optional[Tensor] = None):
    """CosFace (LMCL): ψ(c) = c − m. Defaults s = 64, m = 0.35."""
    spec = MarginSpec.cosface(scale, margin, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, sample_weight=sample_weight,
                       class_margins=class_margins, class_margin_column=CLASS_M3)


def arcface_loss(embeddings, weight, labels, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, *, straight_through: bool = False, ignore_index: int = -1,
                 reduction: str = "mean", return_parts: bool = False,
                 class_margins: Optional[Tensor] = None, sample_weight: Optional[Tensor] = None):
    """ArcFace: ψ(c) = cos(θ + m), threshold form c − m·sin m past θ = π − m (or
    ``easy_margin``: margin only where c > 0). Defaults s = 64, m = 0.5.
    ``straight_through=True`` reproduces insightface's no_grad margin (∂ψ/∂c = 1)."""
    spec = MarginSpec.arcface(scale, margin, easy_margin, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, sample_weight=sample_weight,
                       class_margins=class_margins, class_margin_column=CLASS_M2)


def combined_margin_loss(embeddings, weight, labels, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                         m3: float = 0.0, easy_margin: bool = False, *, straight_through: bool = False,
                         ignore_index: int = -1, reduction: str = "mean",
                         return_parts: bool = False,
                         class_margins: Optional[Tensor] = None, sample_weight: Optional[Tensor] = None):
    """Combined margin: ψ(c) = cos(m1·θ + m2) − m3 (all three applied), with the boundary
    policy of :mod:`magloss.margins`. Defaults s = 64, (m1, m2, m3) = (1, 0.5, 0)."""
    spec = MarginSpec.combined(scale, m1, m2, m3, easy_margin, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, sample_weight=sample_weight,
                       class_margins=class_margins, class_margin_column=None)


def sphereface_loss(embeddings, weight, labels, margin: int = 4, scale: Optional[float] = None,
                    lambda_=0.0, *, iteration=None, straight_through: bool = False, ignore_index: int = -1,
                    reduction: str = "mean", return_parts: bool = False, sample_weight: Optional[Tensor] = None):
    """SphereFace (A-Softmax): ψ = (λ·c + (−1)^k cos(mθ) − 2k)/(1 + λ), θ ∈ [kπ/m, (k+1)π/m].

    ``margin``: integer m (default 4). ``scale=None`` scales every logit of row i by ‖x_i‖
    (original SphereFace); a float uses a fixed s. ``lambda_``: the annealing weight λ
    (float or 0-d tensor; 0 = pure A-Softmax target). If ``iteration`` (int or 0-d tensor)
    is given, λ follows the original schedule max(5, 1000·(1 + 0.12·iter)^−1) instead, with
    ``iter`` the counter as the original code holds it when it computes λ: it advances the
    counter first, so its first forward uses iter = 1 (λ = 1000/1.12 = 892.857...), as
    :class:`magloss.SphereFaceLoss` does. λ is computed in the compute dtype (float64 for
    float64 inputs).
    """
    spec = MarginSpec.sphere(margin, scale, straight_through)
    if iteration is not None:
        lambda_ = _sphere_lambda_schedule(torch.as_tensor(iteration, device=embeddings.device),
                                          dtype=compute_dtype(embeddings.dtype))
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       sphere_lambda=lambda_, return_parts=return_parts, sample_weight=sample_weight)


def magface_loss(embeddings, weight, labels, scale: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, easy_margin: bool = True, *,
                 straight_through: bool = False, ignore_index: int = -1, reduction: str = "mean",
                 return_parts: bool = False, sample_weight: Optional[Tensor] = None):
    """MagFace: ψ = cos(θ + m(a)), loss = reduce(CE) + λ_g·reduce(g(ã)).

    m(a) = l_m + (u_m − l_m)(ã − l_a)/(u_a − l_a), g(ã) = ã/u_a² + 1/ã, ã = clamp(a, l_a, u_a).
    Defaults from the paper: s = 64, l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35,
    easy_margin = True (as the MagFace code). ``return_parts=True`` returns a
    :class:`MagFaceOutput` (loss, ce, reg, norms).
    """
    spec = MarginSpec.magface(scale, l_a, u_a, l_m, u_m, easy_margin, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       lambda_g=check_non_negative("lambda_g", lambda_g, "weight"), return_parts=return_parts,
                       sample_weight=sample_weight)


def magcosface_loss(embeddings, weight, labels, scale: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                    l_m: float = 0.35, u_m: float = 0.8, lambda_g: float = 150.0, *,
                    straight_through: bool = False, ignore_index: int = -1, reduction: str = "mean",
                    return_parts: bool = False, sample_weight: Optional[Tensor] = None):
    """Mag-CosFace: ψ = c − m(a), loss = reduce(CE) + λ_g·reduce(g(ã)).
    Defaults s = 64, l_a = 10, u_a = 110, l_m = 0.35, u_m = 0.8, λ_g = 150."""
    spec = MarginSpec.magcos(scale, l_a, u_a, l_m, u_m, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       lambda_g=check_non_negative("lambda_g", lambda_g, "weight"), return_parts=return_parts,
                       sample_weight=sample_weight)


def subcenter_arcface_loss(embeddings, weight, labels, subcenters: int = 3, scale: float = 64.0,
                           margin: float = 0.5, easy_margin: bool = False, *, straight_through: bool = False,
                           ignore_index: int = -1, reduction: str = "mean", return_parts: bool = False,
                           class_margins: Optional[Tensor] = None, sample_weight: Optional[Tensor] = None):
    """Sub-center ArcFace (Deng et al., ECCV 2020): ArcFace on c_ij = max_k cos θ_{i, jK+k}.

    ``weight``: [K·C, D], row j·K + k is sub-center k of class j (insightface's layout);
    labels index classes in [0, C). The margin (cos(θ + m), threshold form past π − m, or
    ``easy_margin``) applies to the label class's best sub-center; the gradient of every
    class cosine flows to its winning sub-center only (ties: the lowest k). Defaults from
    the paper and insightface: K = 3, s = 64, m = 0.5 (radians).
    """
    spec = MarginSpec.arcface(scale, margin, easy_margin, straight_through).with_subcenters(subcenters)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, sample_weight=sample_weight,
                       class_margins=class_margins, class_margin_column=CLASS_M2)


def adaface_loss(embeddings, weight, labels, batch_mean, batch_std, scale: float = 64.0, margin: float = 0.4,
                 h: float = 0.333, *, ignore_index: int = -1, reduction: str = "mean", return_parts: bool = False,
                 sample_weight: Optional[Tensor] = None):
    """AdaFace (Kim et al., CVPR 2022) with given norm statistics μ = ``batch_mean``,
    σ = ``batch_std`` (floats or 0-d tensors; :class:`magloss.AdaFaceLoss` keeps them as
    running averages and updates them before this call, as upstream).

    ẑ_i = clip((a_i − μ)/(σ + 0.001)·h, −1, 1) with a_i = clip(‖x_i‖, 0.001, 100), detached;
    label logit s·(cos(clip(θ_i − m·ẑ_i, ε, π − ε)) − (m·ẑ_i + m)), θ_i = acos(clip(c_iy, −1 + ε,
    1 − ε)), ε = 0.001 (the CLIP boundary; no gradient through ẑ). Other logits s·c_ij.
    Defaults m = 0.4 (radians), h = 0.333, s = 64 (paper and mk-minchul/AdaFace).
    """
    spec = MarginSpec.combined(scale, 1.0, 0.0, 0.0, boundary=CLIP)
    margin, h = adaface_args(margin, h)
    check_types(embeddings=embeddings, weight=weight, labels=labels)
    ct = compute_dtype(embeddings.dtype)
    stats = [torch.as_tensor(v, dtype=ct, device=embeddings.device) for v in (batch_mean, batch_std)]
    with torch.no_grad():
        rm = adaface_row_margins(embeddings.detach().to(ct).norm(dim=1), *stats, margin, h)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, sample_weight=sample_weight, row_margins=rm)


def curricular_face_loss(embeddings, weight, labels, t, scale: float = 64.0, margin: float = 0.5, *,
                         ignore_index: int = -1, reduction: str = "mean", return_parts: bool = False,
                         sample_weight: Optional[Tensor] = None):
    """CurricularFace (Huang et al., CVPR 2020) with a given t (float or 0-d tensor;
    :class:`magloss.CurricularFaceLoss` keeps it as a running average of the label cosines
    and updates it before this call, as upstream).

    Label logit: ArcFace's s·cos(θ + m), threshold form c − m·sin m past π − m. Other
    columns: s·c_ij·(t + c_ij) where c_ij > τ_i = cos(θ_iy + m) (a "hard" negative), else
    s·c_ij; the gradient there is s·(t + 2·c_ij); τ and t carry none. Defaults m = 0.5
    (radians), s = 64 (paper and HuangYG123/CurricularFace).
    """
    spec = MarginSpec.arcface(scale, margin)
    check_types(embeddings=embeddings, weight=weight, labels=labels)
    ct = compute_dtype(embeddings.dtype)
    valid = labels != ignore_index
    tau = curricular_threshold(label_cosines(embeddings, weight, labels, ignore_index), valid, spec.m2)
    t = torch.as_tensor(t, dtype=ct, device=embeddings.device).detach().reshape(()).contiguous()
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, sample_weight=sample_weight, neg_threshold=tau, neg_t=t)


def _elastic(angular: bool, embeddings, weight, labels, scale, margin, std, plus, generator, ignore_index,
             reduction, return_parts, sample_weight=None):
    spec = MarginSpec.combined(scale, 1.0, 0.0, 0.0, boundary=NONE)
    margin, std, plus = elastic_args(angular, margin, std, plus)
    check_types(embeddings=embeddings, weight=weight, labels=labels)
    valid = labels != ignore_index
    c_y = label_cosines(embeddings, weight, labels, ignore_index) if plus else None
    rm = elastic_row_margins(elastic_draws(labels.shape[0], margin, std, generator), valid, angular,
                             compute_dtype(embeddings.dtype), c_y)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       return_parts=return_parts, row_margins=rm, sample_weight=sample_weight)


def elastic_arcface_loss(embeddings, weight, labels, scale: float = 64.0, margin: float = 0.5,
                         std: Optional[float] = None, plus: bool = False, *,
                         generator: Optional[torch.Generator] = None, ignore_index: int = -1,
                         reduction: str = "mean", return_parts: bool = False,
                         sample_weight: Optional[Tensor] = None):
    """ElasticFace-Arc (Boutros et al., CVPRW 2022): label logit s·cos(θ_i + m_i), one
    m_i ~ N(margin, std²) per row, drawn (float64, CPU) from ``generator`` (a CPU
    torch.Generator; None: torch's global one). No fallback past π (as upstream).
    ``plus=True`` (ElasticFace-Arc+): the draws are sorted and the largest goes to the row
    with the lowest label cosine. Defaults s = 64, m = 0.5 (radians), σ = 0.05 (0.0175 for
    "+"), from the upstream configs.
    """
    return _elastic(True, embeddings, weight, labels, scale, margin, std, plus, generator, ignore_index,
                    reduction, return_parts, sample_weight)


def elastic_cosface_loss(embeddings, weight, labels, scale: float = 64.0, margin: float = 0.35,
                         std: Optional[float] = None, plus: bool = False, *,
                         generator: Optional[torch.Generator] = None, ignore_index: int = -1,
                         reduction: str = "mean", return_parts: bool = False,
                         sample_weight: Optional[Tensor] = None):
    """ElasticFace-Cos (Boutros et al., CVPRW 2022): label logit s·(c_iy − m_i), one
    m_i ~ N(margin, std²) per row from ``generator``, as :func:`elastic_arcface_loss`.
    Defaults s = 64, m = 0.35, σ = 0.05 (0.02 for "+").
    """
    return _elastic(False, embeddings, weight, labels, scale, margin, std, plus, generator, ignore_index,
                    reduction, return_parts, sample_weight)


#: Classes per chunk of :func:`cosine_argmax` (B × this many cosines in memory at once).
ACCURACY_CHUNK_ELEMENTS = 1 << 22


def cosine_argmax(embeddings: Tensor, weight: Tensor, *, bias: Optional[Tensor] = None, normalize: bool = True,
                  chunk_classes: Optional[int] = None):
    """Row-wise max and arg-max over classes of the plain logits, without a B×C matrix.

    With ``normalize=True`` the logits are the cosines c_ij = x̂_i·ŵ_j (no margin, no
    scale); otherwise z_ij = x_i·w_j (+ bias_j), the softmax baseline's. Classes are
    processed in chunks of ``chunk_classes`` (default: about 4M cosines per chunk), in
    float32 (float64 for float64 inputs) with autocast off, under no_grad. Ties go to
    the lowest class index.

    embeddings [B, D], weight [C, D]. Returns (values [B] float, indices [B] int64).
    """
    check_types(embeddings=embeddings, weight=weight)
    ct = compute_dtype(embeddings.dtype)
    B, C = embeddings.shape[0], weight.shape[0]
    if chunk_classes is None:
        step = max(1, ACCURACY_CHUNK_ELEMENTS // max(B, 1))
    else:
        step = check_int("chunk_classes", chunk_classes, 1)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        x = embeddings.to(ct)
        if normalize:
            x = F.normalize(x, dim=1, eps=NORM_EPS)
        best = torch.full((B,), -float("inf"), dtype=ct, device=x.device)
        arg = torch.zeros(B, dtype=torch.int64, device=x.device)
        for start in range(0, C, step):
            w = weight[start:start + step].to(ct)
            if normalize:
                w = F.normalize(w, dim=1, eps=NORM_EPS)
            z = x @ w.t()
            if bias is not None:
                z = z + bias[start:start + step].to(ct)
            v, i = z.max(dim=1)
            better = v > best
            best = torch.where(better, v, best)
            arg = torch.where(better, i + start, arg)
    return best, arg


def accuracy(embeddings: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -1,
             bias: Optional[Tensor] = None, normalize: bool = True, chunk_classes: Optional[int] = None,
             subcenters: int = 1) -> Tensor:
    """Training accuracy as users log it: the share of non-ignored rows whose arg-max over
    the plain cosine logits (no margin) is the label, from :func:`cosine_argmax` (chunked
    over classes: no B×C matrix). ``normalize=False`` and ``bias`` give the softmax
    baseline's logits x·Wᵀ + b instead. With K = ``subcenters`` (weight [K·C, D]) the
    prediction is the class of the best sub-center (a class's cosine is its max).

    Returns a 0-d float32 tensor (float64 for float64 inputs) on the embeddings' device;
    0 when every row is ignored (as the loss). Bad input is an error as in the loss: a label
    outside [0, C) other than ``ignore_index`` and a non-finite embedding or weight row are a
    ValueError naming ``labels``/``embeddings``/``weight`` (:func:`magloss.checks.check_values`:
    one host synchronization). With ``MAGLOSS_CHECK_INPUTS=off`` the NaN/Inf check is skipped
    and a non-finite score on a counted row makes the accuracy NaN (NaN in, NaN out), never a
    number of hits.
    """
    check_inputs(embeddings, weight, labels)
    check_values(embeddings, weight, labels, ignore_index, num_classes_of(weight, subcenters))
    best, pred = cosine_argmax(embeddings, weight, bias=bias, normalize=normalize, chunk_classes=chunk_classes)
    return hit_rate(pred // subcenters, best, labels, labels != ignore_index)


def hit_rate(pred: Tensor, best: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Share of the ``valid`` rows whose prediction ``pred`` [B] (class indices) equals
    ``labels`` [B], in ``best``'s dtype; 0 without valid rows; NaN when the winning score
    ``best`` [B] of a valid row is not finite (a NaN row would otherwise count as class 0).
    Shared by :func:`accuracy` and the sharded heads' ``accuracy``."""
    ct = best.dtype
    hit = (pred == labels.long()) & valid
    acc = hit.sum().to(ct) / valid.sum().clamp_min(1).to(ct)
    broken = (valid & ~torch.isfinite(best)).any()
    return torch.where(broken, torch.full_like(acc, math.nan), acc)
