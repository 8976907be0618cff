"""Sub-center ArcFace's clean-up helpers (Deng et al., ECCV 2020, §3.2; insightface's
SubCenter-ArcFace ``drop.py``): after training with K sub-centers per class, find each
class's dominant sub-center, keep it and drop the others, and flag the samples far from
their class as likely label noise, to retrain a plain ArcFace on the cleaned data.

Layout: ``weight`` [K·C, D], row j·K + k is sub-center k of class j. All functions run under
no_grad in float32 (float64 for float64 inputs) and never form a B×C matrix.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .checks import check_labels, check_types, num_classes_of
from .margins import NORM_EPS
from .rows import compute_dtype, label_subcenters
from .validation import check_angle

__all__ = ["subcenter_counts", "dominant_subcenters", "dominant_weight", "far_from_class"]


def _check_subcenters(weight: Tensor, subcenters: int) -> int:
    """C of a [K·C, D] ``weight`` with K = ``subcenters`` (ValueError naming the argument)."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [K*C, D], got {tuple(weight.shape)}")
    return num_classes_of(weight, subcenters)


def _valid_labels(labels: Tensor, num_classes: int, ignore_index: int, **tensors: Tensor) -> Tensor:
    check_types(labels=labels, **tensors)        # float labels: a TypeError naming labels
    return check_labels(labels, num_classes, ignore_index)


def _unit(t: Tensor, ct: torch.dtype) -> Tensor:
    t = t.detach().to(ct)
    return t / t.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def subcenter_counts(embeddings: Tensor, weight: Tensor, labels: Tensor, subcenters: int,
                     ignore_index: int = -1) -> Tensor:
    """[C, K] int64: for each class j and sub-center k, how many rows labelled j have k as
    their closest sub-center of class j (largest cosine; ties: the lowest k). Rows labelled
    ``ignore_index`` are not counted. Counts of several batches add up (a training-set pass).

    embeddings [B, D], weight [K·C, D], labels [B]. Raises ValueError for a weight whose rows
    are not a multiple of K or a label outside [0, C)."""
    num_classes = _check_subcenters(weight, subcenters)
    valid = _valid_labels(labels, num_classes, ignore_index, embeddings=embeddings, weight=weight)
    ct = compute_dtype(embeddings.dtype)
    with torch.no_grad():
        lab = labels[valid].long()
        x = _unit(embeddings[valid], ct)
        k = label_subcenters(x, weight.detach(), lab, subcenters)[3].argmax(1)
        counts = torch.zeros(num_classes * subcenters, dtype=torch.int64, device=weight.device)
        counts.index_add_(0, lab * subcenters + k, torch.ones_like(k))
    return counts.view(num_classes, subcenters)


def dominant_subcenters(counts: Tensor, num_classes: Optional[int] = None, subcenters: Optional[int] = None) -> Tensor:
    """[C] int64: the dominant sub-center of each class, the one most of its rows picked
    (``counts`` [C, K] from :func:`subcenter_counts`; ties and classes without rows: the lowest k).
    With ``num_classes``/``subcenters`` given, ``counts`` must be [num_classes, subcenters].
    Raises ValueError naming ``counts``."""
    if not isinstance(counts, Tensor):
        raise TypeError(f"counts: expected a [C, K] tensor of counts, got {type(counts).__name__}")
    want = (num_classes, subcenters)
    if counts.dim() != 2 or any(w is not None and n != w for n, w in zip(counts.shape, want)):
        shape = ", ".join("CK"[i] if w is None else str(w) for i, w in enumerate(want))
        raise ValueError(f"counts: expected [{shape}] (classes x sub-centers, from subcenter_counts), "
                         f"got {tuple(counts.shape)}")
    return counts.argmax(dim=1)


def dominant_weight(weight: Tensor, dominant: Tensor, subcenters: int) -> Tensor:
    """[C, D]: row j is sub-center ``dominant[j]`` of class j; the other K − 1 are dropped.
    A new tensor of weight's dtype and device (no gradient link)."""
    num_classes = _check_subcenters(weight, subcenters)
    if dominant.shape != (num_classes,):
        raise ValueError(f"dominant: expected [{num_classes}] sub-center indices, got {tuple(dominant.shape)}")
    rows = torch.arange(num_classes, device=weight.device) * subcenters + dominant.to(weight.device).long()
    return weight.detach().index_select(0, rows).clone()


def far_from_class(embeddings: Tensor, class_weight: Tensor, labels: Tensor, threshold: float = math.radians(75.0),
                   ignore_index: int = -1) -> Tensor:
    """[B] bool: rows whose angle to their class centre (``class_weight`` [C, D], e.g. the
    dominant sub-centers of :func:`dominant_weight`) exceeds ``threshold`` radians (default
    75°, the upstream drop rule): likely label noise. False for rows labelled ``ignore_index``."""
    threshold = check_angle("threshold", threshold, math.pi, positive=True, upper_text="pi")
    valid = _valid_labels(labels, class_weight.shape[0], ignore_index, embeddings=embeddings,
                          class_weight=class_weight)
    ct = compute_dtype(embeddings.dtype)
    with torch.no_grad():
        lab = torch.where(valid, labels, torch.zeros_like(labels)).long()
        c = (_unit(embeddings, ct) * _unit(class_weight.index_select(0, lab), ct)).sum(1)
        return valid & (c < math.cos(threshold))
