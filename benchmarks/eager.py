"""The "eager" baseline: each loss written the way the upstream training code writes it.

This is what a user of insightface's arcface_torch or of the MagFace repository runs
today, in plain PyTorch and independent of magloss' internals:

    cos    = F.linear(F.normalize(x), F.normalize(W))      # full [B, C] cosine matrix
    cos    = cos.clamp(-1, 1)                               # upstream clamps the matrix
    c_y    = cos[i, y_i]                                    # label column
    psi    = margin(c_y, |x_i|)                             # cos(θ+m) by the identity
    logits = s * cos with the label column replaced by s * psi
    loss   = F.cross_entropy(logits, y) (+ λ_g · mean g(|x|) for MagFace)

Everything after the matrix product runs in float32 (float64 for float64 inputs), as
the margin needs; under ``torch.autocast`` only the F.linear runs in the low precision.
The margin is applied to the label column only (gather, then an out-of-place scatter),
which is the cheapest plain-PyTorch form and so the strongest eager baseline. The
literal upstream form, which evaluates cos(θ + m) over the whole matrix and mixes with
a one-hot mask (MagFace's ``MagLinear``, the classic ``ArcMarginProduct``), is
available with ``full_matrix=True`` (benchmark provider ``eager-fullmatrix``).

Gradients are autograd's, i.e. the exact derivatives (not insightface's no_grad
"straight-through" margin), which is also magloss' default: tests/test_benchmarks.py
checks loss and gradients against :mod:`magloss.reference` in float64.

Boundary policies, as upstream and as docs/math.md §1:
* ArcFace: threshold form, ψ = c − m·sin m where θ + m > π (c ≤ cos(π − m)).
* MagFace: easy margin, ψ = c where c ≤ 0.
* CosFace: ψ = c − m everywhere.

The single deviation from the upstream code: sin θ = sqrt(max(1 − c², 1e-12)) instead of
sqrt(1 − c²), so that a cosine of exactly ±1 gives a finite gradient (upstream gives NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "arcface", "cosface", "magface", "eager_loss"]

#: sin θ guard, the same ε as magloss.margins.SIN_EPS
_SIN_EPS = 1e-12


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cosines(x: Tensor, weight: Tensor) -> Tensor:
    """Full [B, C] cosine matrix in the compute dtype, clamped to [-1, 1] as upstream."""
    cos = F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))
    return cos.to(_compute_dtype(x)).clamp(-1.0, 1.0)


def _sin(c: Tensor) -> Tensor:
    return (1.0 - c * c).clamp_min(_SIN_EPS).sqrt()


def _finish(cos: Tensor, labels: Tensor, psi_col: Tensor, scale: float, full_matrix: bool) -> Tensor:
    """s·cos with the label column replaced by s·ψ, then mean cross-entropy."""
    idx = labels.long().unsqueeze(1)
    if full_matrix:
        one_hot = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, idx, True)
        logits = scale * torch.where(one_hot, psi_col, cos)
    else:
        logits = scale * cos.scatter(1, idx, psi_col)
    return F.cross_entropy(logits, labels.long())


def arcface(x: Tensor, weight: Tensor, labels: Tensor, scale: float = 64.0, margin: float = 0.5,
            full_matrix: bool = False) -> Tensor:
    """ArcFace, ψ = cos(θ + m) with the threshold form past θ = π − m (insightface defaults)."""
    cos = _cosines(x, weight)
    c = cos if full_matrix else cos.gather(1, labels.long().unsqueeze(1))
    phi = c * math.cos(margin) - _sin(c) * math.sin(margin)
    th, mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    phi = torch.where(c > th, phi, c - mm)
    return _finish(cos, labels, phi, scale, full_matrix)


def cosface(x: Tensor, weight: Tensor, labels: Tensor, scale: float = 64.0, margin: float = 0.35,
            full_matrix: bool = False) -> Tensor:
    """CosFace, ψ = cos θ − m."""
    cos = _cosines(x, weight)
    c = cos if full_matrix else cos.gather(1, labels.long().unsqueeze(1))
    return _finish(cos, labels, c - margin, scale, full_matrix)


def magface(x: Tensor, weight: Tensor, labels: Tensor, scale: float = 64.0, l_a: float = 10.0,
            u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0,
            full_matrix: bool = False) -> Tensor:
    """MagFace as the MagFace repository: magnitude-aware margin m(a), easy margin, and
    loss = CE + λ_g·mean(g(a)) with g(a) = a/u_a² + 1/a, a = clamp(‖x‖, l_a, u_a)."""
    x_norm = x.to(_compute_dtype(x)).norm(dim=1, keepdim=True).clamp(l_a, u_a)      # [B, 1]
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos = _cosines(x, weight)
    c = cos if full_matrix else cos.gather(1, labels.long().unsqueeze(1))
    phi = c * cos_m - _sin(c) * sin_m
    phi = torch.where(c > 0, phi, c)                                                  # easy margin
    loss_id = _finish(cos, labels, phi, scale, full_matrix)
    g = x_norm / (u_a * u_a) + 1.0 / x_norm
    return loss_id + lambda_g * g.mean()


LOSSES = {"arcface": arcface, "magface": magface, "cosface": cosface}


def eager_loss(name: str, full_matrix: bool = False):
    """The eager loss function ``f(x, W, labels) -> scalar`` for ``name`` (defaults of the papers)."""
    fn = LOSSES[name]
    if not full_matrix:
        return fn

    def full(x, weight, labels):
        return fn(x, weight, labels, full_matrix=True)

    full.__name__ = f"{name}_fullmatrix"
    return full
