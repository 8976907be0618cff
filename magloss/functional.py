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

The margin, softmax and reductions run in float32 (float64 for float64 inputs); the
returned loss has that dtype. Logits: z_ij = s·c_ij, z_iy = s·ψ(c_iy, a_i), with
c_ij = x̂_i·ŵ_j; CE_i = logsumexp_j z_ij − z_iy (shared/DESIGN.md §1).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .reference import check_values, is_autocast_pair
from .margins import MarginSpec, sphere_lambda as _sphere_lambda_schedule

__all__ = [
    "MagFaceOutput",
    "margin_loss",
    "softmax_loss",
    "normface_loss",
    "cosface_loss",
    "arcface_loss",
    "combined_margin_loss",
    "sphereface_loss",
    "magface_loss",
    "magcosface_loss",
]

REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int64, torch.int32)


class MagFaceOutput(NamedTuple):
    """What MagFace-style losses return with ``return_parts=True``.

    loss: the total, ce + λ_g·reg (reduced as asked).
    ce: the reduced cross-entropy term.
    reg: the reduced regularizer g(ã) (unweighted, as the MagFace code logs ``loss_g``).
    norms: [B] the magnitudes a_i = ‖x_i‖ (float32, float64 for float64 input).
    """

    loss: Tensor
    ce: Tensor
    reg: Tensor
    norms: Tensor


def check_reduction(reduction: str) -> str:
    """Raise ValueError unless ``reduction`` is 'mean', 'sum' or 'none'."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_ignore_index(ignore_index) -> int:
    """Raise TypeError unless ``ignore_index`` is an int."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_types(**tensors: Tensor) -> None:
    """Each keyword argument must be a tensor of its role's dtypes: ``labels`` int64/int32,
    anything else (``embeddings``, ``weight``) float16/bfloat16/float32/float64. Raises
    TypeError naming the argument; no data access."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if name == "labels":
            if t.dtype not in _INTS:
                raise TypeError(f"labels: expected an int64 or int32 tensor of class indices, got {t.dtype}")
        elif t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")


def check_inputs(embeddings: Tensor, weight: Tensor, labels: Tensor) -> None:
    """Metadata checks (no data access, no device sync). Raises TypeError/ValueError naming
    the argument. Value checks (label range, NaN/Inf) happen inside the op kernels.
    embeddings and weight must share a dtype, except a float32 weight with float16/bfloat16
    embeddings under autocast (what :func:`_autocast` passes on)."""
    check_types(embeddings=embeddings, weight=weight, labels=labels)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings: expected shape [B, D], got {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [C, D], got {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels: expected shape [B], got {tuple(labels.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one class, got C = 0")
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings: expected embedding size D = {weight.shape[1]} (weight is {tuple(weight.shape)}), "
            f"got {embeddings.shape[1]}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels: expected {embeddings.shape[0]} labels (one per embedding row), got {labels.shape[0]}")
    if embeddings.device != weight.device or labels.device != embeddings.device:
        raise ValueError(
            f"embeddings, weight, labels: expected one device, got {embeddings.device}, {weight.device}, {labels.device}"
        )
    mixed_ok = is_autocast_pair(embeddings.dtype, weight.dtype) and _autocasting(embeddings)
    if embeddings.dtype != weight.dtype and not mixed_ok:
        raise TypeError(
            f"embeddings, weight: expected the same dtype, got {embeddings.dtype} and {weight.dtype} "
            "(cast one, or run under torch.autocast)"
        )


def _autocasting(t: Tensor) -> bool:
    dev = t.device.type
    return dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)


def _autocast(embeddings: Tensor, weight: Tensor):
    """Under autocast (on the embeddings' device), cast the embeddings to the autocast
    dtype, as ``F.linear`` would, before the dtype check. A float32 weight is passed on
    as is: the op rounds it to the embeddings' dtype chunk by chunk and returns its
    gradient in float32 (see :mod:`magloss.ops`), so no C×D half copy of W is made or
    kept for the backward. Other weight dtypes are cast too. float64 is never cast."""
    if not (isinstance(embeddings, Tensor) and isinstance(weight, Tensor)) or not _autocasting(embeddings):
        return embeddings, weight          # check_inputs names the culprit
    dt = torch.get_autocast_dtype(embeddings.device.type)
    if embeddings.is_floating_point() and embeddings.dtype != torch.float64:
        embeddings = embeddings.to(dt)
    if weight.is_floating_point() and weight.dtype not in (torch.float64, torch.float32):
        weight = weight.to(dt)
    return embeddings, weight


def _reduce(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(rows.dtype)


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
):
    """The generic margin loss: reduce_i(CE_i) + λ_g·reduce_i(g(ã_i)) for a :class:`MarginSpec`.

    Every named loss below is this with a particular spec. ``lambda_g`` weighs MagFace's
    regularizer (ignored by families without one). ``sphere_lambda`` is SphereFace's
    annealing weight λ (a float or 0-d tensor). With ``return_parts=True`` returns a
    :class:`MagFaceOutput` instead of the loss tensor.
    """
    embeddings, weight = _autocast(embeddings, weight)
    check_inputs(embeddings, weight, labels)
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    if sphere_lambda is not None and not isinstance(sphere_lambda, Tensor):
        sphere_lambda = torch.tensor(float(sphere_lambda), device=embeddings.device)
    lse, zy, reg_rows, norms = ops.margin_ce(embeddings, weight, labels, sphere_lambda,
                                             *spec.op_args(), ignore_index)
    return reduce_rows(lse - zy, reg_rows, norms, labels != ignore_index, spec, reduction, lambda_g,
                       return_parts)


def reduce_rows(ce_rows: Tensor, reg_rows: Tensor, norms: Tensor, valid: Tensor, spec: MarginSpec,
                reduction: str, lambda_g: float, return_parts: bool):
    """Mask rows that are not ``valid`` to zero (value and gradient), reduce, and add λ_g·reg.

    ce_rows, reg_rows, norms, valid: [B]. Shared by the single-process and sharded heads.
    """
    zero = torch.zeros_like(ce_rows)
    ce = _reduce(torch.where(valid, ce_rows, zero), valid, reduction)
    if spec.has_regularizer:
        reg = _reduce(torch.where(valid, reg_rows, zero), valid, reduction)
        loss = ce + lambda_g * reg
    else:
        reg, loss = torch.zeros_like(ce), ce
    if return_parts:
        return MagFaceOutput(loss, ce, reg, norms)
    return loss


def softmax_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, *,
                 ignore_index: int = -1, reduction: str = "mean") -> Tensor:
    """Plain softmax cross-entropy, the unnormalized baseline: z = x·Wᵀ + b.

    bias: optional [C]. Runs on PyTorch's own F.linear/F.cross_entropy (no custom op,
    no fused kernel); the softmax is float32. Same checks and reduction rules as the
    margin losses (mean over zero rows is 0, not NaN).
    """
    embeddings, weight = _autocast(embeddings, weight)
    check_inputs(embeddings, weight, labels)
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    check_values(embeddings, weight, labels, ignore_index)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    logits = F.linear(embeddings, weight, None if bias is None else bias.to(weight.dtype))
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = F.cross_entropy(logits.to(ct), labels.long(), ignore_index=ignore_index, reduction="none")
    return _reduce(rows, labels != ignore_index, reduction)


def normface_loss(embeddings, weight, labels, scale: float = 64.0, *, ignore_index: int = -1,
                  reduction: str = "mean") -> Tensor:
    """NormFace / normalized softmax: ψ(c) = c, z = s·c. Default s = 64."""
    spec = MarginSpec.combined(scale, 1.0, 0.0, 0.0)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction)


def cosface_loss(embeddings, weight, labels, scale: float = 64.0, margin: float = 0.35, *,
                 straight_through: bool = False, ignore_index: int = -1, reduction: str = "mean") -> Tensor:
    """CosFace (LMCL): ψ(c) = c − m. Defaults s = 64, m = 0.35."""
    spec = MarginSpec.combined(scale, 1.0, 0.0, margin, straight_through=straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction)


def arcface_loss(embeddings, weight, labels, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, *, straight_through: bool = False, ignore_index: int = -1,
                 reduction: str = "mean") -> Tensor:
    """ArcFace: ψ(c) = cos(θ + m), threshold form c − m·sin m past θ = π − m (or
    ``easy_margin``: margin only where c > 0). Defaults s = 64, m = 0.5.
    ``straight_through=True`` reproduces insightface's no_grad margin (∂ψ/∂c = 1)."""
    spec = MarginSpec.combined(scale, 1.0, margin, 0.0, easy_margin, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction)


def combined_margin_loss(embeddings, weight, labels, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                         m3: float = 0.0, easy_margin: bool = False, *, straight_through: bool = False,
                         ignore_index: int = -1, reduction: str = "mean") -> Tensor:
    """Combined margin: ψ(c) = cos(m1·θ + m2) − m3 (all three applied), with the boundary
    policy of :mod:`magloss.margins`. Defaults s = 64, (m1, m2, m3) = (1, 0.5, 0)."""
    spec = MarginSpec.combined(scale, m1, m2, m3, easy_margin, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction)


def sphereface_loss(embeddings, weight, labels, margin: int = 4, scale: Optional[float] = None,
                    lambda_=0.0, *, iteration=None, straight_through: bool = False, ignore_index: int = -1,
                    reduction: str = "mean") -> Tensor:
    """SphereFace (A-Softmax): ψ = (λ·c + (−1)^k cos(mθ) − 2k)/(1 + λ), θ ∈ [kπ/m, (k+1)π/m].

    ``margin``: integer m (default 4). ``scale=None`` scales every logit of row i by ‖x_i‖
    (original SphereFace); a float uses a fixed s. ``lambda_``: the annealing weight λ
    (float or 0-d tensor; 0 = pure A-Softmax target). If ``iteration`` (int or 0-d tensor)
    is given, λ follows the original schedule max(5, 1000·(1 + 0.12·iter)^−1) instead.
    """
    spec = MarginSpec.sphere(margin, scale, straight_through)
    if iteration is not None:
        lambda_ = _sphere_lambda_schedule(torch.as_tensor(iteration, device=embeddings.device))
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       sphere_lambda=lambda_)


def magface_loss(embeddings, weight, labels, scale: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, easy_margin: bool = True, *,
                 straight_through: bool = False, ignore_index: int = -1, reduction: str = "mean",
                 return_parts: bool = False):
    """MagFace: ψ = cos(θ + m(a)), loss = reduce(CE) + λ_g·reduce(g(ã)).

    m(a) = l_m + (u_m − l_m)(ã − l_a)/(u_a − l_a), g(ã) = ã/u_a² + 1/ã, ã = clamp(a, l_a, u_a).
    Defaults from the paper: s = 64, l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35,
    easy_margin = True (as the MagFace code). ``return_parts=True`` returns a
    :class:`MagFaceOutput` (loss, ce, reg, norms).
    """
    spec = MarginSpec.magface(scale, l_a, u_a, l_m, u_m, easy_margin, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       lambda_g=_check_lambda_g(lambda_g), return_parts=return_parts)


def magcosface_loss(embeddings, weight, labels, scale: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                    l_m: float = 0.35, u_m: float = 0.8, lambda_g: float = 150.0, *,
                    straight_through: bool = False, ignore_index: int = -1, reduction: str = "mean",
                    return_parts: bool = False):
    """Mag-CosFace: ψ = c − m(a), loss = reduce(CE) + λ_g·reduce(g(ã)).
    Defaults s = 64, l_a = 10, u_a = 110, l_m = 0.35, u_m = 0.8, λ_g = 150."""
    spec = MarginSpec.magcos(scale, l_a, u_a, l_m, u_m, straight_through)
    return margin_loss(embeddings, weight, labels, spec, ignore_index=ignore_index, reduction=reduction,
                       lambda_g=_check_lambda_g(lambda_g), return_parts=return_parts)


def _check_lambda_g(lambda_g) -> float:
    lambda_g = float(lambda_g)
    if not lambda_g >= 0 or lambda_g == float("inf"):
        raise ValueError(f"lambda_g: expected a finite non-negative weight, got {lambda_g}")
    return lambda_g
