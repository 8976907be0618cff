"""Row-stage helpers shared by the engines: the chunked engine (the default) and the oracle.

What both :mod:`magloss.chunked` and :mod:`magloss.reference` compute the same way, so
that they cannot drift apart and so that the oracle can change without changing the
engine: the compute dtype, the operand rules of the autocast pair, the sub-center class
cosines and their tie rule, the label class's sub-center rows, CurricularFace's function of
the non-label columns, and the saturating cast of half-precision gradients. The adaptive
losses (:mod:`magloss.adaptive`) and the sub-center tools (:mod:`magloss.subcenter`) use
the same helpers for their label cosines.

Every function here is plain PyTorch, differentiable where it says so, and never forms a
B×C matrix beyond the tile it is given.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .margins import NORM_EPS

__all__ = [
    "compute_dtype", "is_autocast_pair", "autocasting", "weight_operand", "saturating_cast",
    "class_cosines", "label_subcenters", "curricular",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the margin, softmax and reductions run in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_autocast_pair(embeddings_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """float16/bfloat16 embeddings with a float32 weight: the one mixed pair the ops accept."""
    return weight_dtype == torch.float32 and embeddings_dtype in (torch.float16, torch.bfloat16)


def autocasting(t: Tensor) -> bool:
    """True when ``torch.autocast`` is enabled on ``t``'s device type (CUDA or CPU)."""
    dev = t.device.type
    return dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)


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


def saturating_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, with values beyond a float16/bfloat16 range clamped to its largest
    finite value instead of becoming ±Inf (NaN stays NaN). A zero embedding row's gradient
    is F.normalize's (∂L/∂x̂)/1e-12, finite in float32 but past float16's 65504."""
    if dtype in (torch.float16, torch.bfloat16) and t.dtype != dtype:
        big = torch.finfo(dtype).max
        t = t.clamp(-big, big)
    return t.to(dtype)


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
