"""Feature-magnitude quality scores, template aggregation and error-versus-reject curves.

MagFace trains the magnitude ``a = ||x||`` of an un-normalized embedding ``x`` to grow
with the recognisability of the input, so the magnitude itself is a quality score
(Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
Assessment", CVPR 2021). This module turns magnitudes into quality scores, aggregates
several embeddings of one identity into a template, and measures how well a quality
score predicts recognition errors with the error-versus-reject curve (ERC).

Everything here needs only torch and numpy. Input and return conventions (NaN/Inf
rejected naming the argument, float16/bfloat16 computed and returned in float32, float64
kept, integer ids required, exact counts, scalars as Python floats, per-sample values as
tensors) are those of :mod:`magloss.evaluation`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .evaluation import _as_list, _np1d, check_number, float_tensor, fraction_count, labels_array

__all__ = [
    "feature_magnitude",
    "quality_score",
    "pair_quality",
    "aggregate_templates",
    "error_versus_reject",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def feature_magnitude(features: ArrayLike) -> torch.Tensor:
    """Raw quality score: the L2 norm of each un-normalized embedding.

    ``a_i = ||x_i||_2``.

    Args:
        features: ``[N, D]`` float tensor (or array) of embeddings, as the backbone
            outputs them (NOT normalized).

    Returns:
        ``[N]`` tensor of magnitudes: float64 for float64 ``features``, float32 otherwise
        (float16/bfloat16 are computed in float32: their squares overflow at 65504).
    """
    x = float_tensor(features, "features", ndim=2)
    return torch.linalg.vector_norm(x, dim=1)


def quality_score(
    features: Optional[ArrayLike] = None,
    *,
    magnitudes: Optional[ArrayLike] = None,
    l_a: Optional[float] = None,
    u_a: Optional[float] = None,
    loss: Optional[object] = None,
) -> torch.Tensor:
    """Quality score in ``[0, 1]`` from the feature magnitude and the loss's magnitude range.

    ``q_i = (clamp(a_i, l_a, u_a) - l_a) / (u_a - l_a)``, so ``q = 0`` at or below the
    lower bound ``l_a`` of MagFace's magnitude range and ``q = 1`` at or above ``u_a``.

    Give exactly one of ``features`` (``[N, D]``, magnitudes are computed) or
    ``magnitudes`` (``[N]``). Give the range either as ``l_a``/``u_a`` or as ``loss``:
    a loss instance with a magnitude range (``magloss.MagFaceLoss(...)``,
    ``MagCosFaceLoss(...)``, their sharded twins) or any object with numeric ``l_a`` and
    ``u_a`` attributes; explicit ``l_a``/``u_a`` win over ``loss``. Defaults when
    neither is given: none, the range is required.

    Returns:
        ``[N]`` tensor in ``[0, 1]`` (float64 for float64 input, else float32).

    Raises:
        ValueError: NaN or Inf in ``features`` or ``magnitudes`` (naming it), a missing
        or invalid range. TypeError: ``loss`` is a class rather than an instance, or a
        loss without a magnitude range (ArcFace, CosFace, ...).
    """
    if (features is None) == (magnitudes is None):
        raise ValueError("give exactly one of features or magnitudes")
    if features is not None:
        a = feature_magnitude(features)
    else:
        a = float_tensor(magnitudes, "magnitudes", ndim=1)
    if loss is not None and (l_a is None or u_a is None):
        loss_l_a, loss_u_a = _magnitude_range(loss)
        l_a = loss_l_a if l_a is None else l_a
        u_a = loss_u_a if u_a is None else u_a
    if l_a is None or u_a is None:
        raise ValueError("l_a and u_a are required (pass them or pass loss=<MagFaceLoss>)")
    l_a, u_a = check_number(l_a, "l_a"), check_number(u_a, "u_a")
    if not (math.isfinite(l_a) and math.isfinite(u_a)) or u_a <= l_a:
        raise ValueError(f"need finite l_a < u_a, got l_a={l_a}, u_a={u_a}")
    return (a.clamp(l_a, u_a) - l_a) / (u_a - l_a)


def _magnitude_range(loss):
    """``(l_a, u_a)`` of a loss instance with MagFace's magnitude range, else TypeError naming ``loss``."""
    from .margins import MAGCOS, MAGFACE

    name = loss.__name__ if isinstance(loss, type) else type(loss).__name__
    if isinstance(loss, type):
        raise TypeError(f"loss: expected a loss instance such as MagFaceLoss(...), got the class {name}")
    spec = getattr(loss, "spec", None)
    if spec is not None and getattr(spec, "kind", None) in (MAGFACE, MAGCOS):
        return spec.l_a, spec.u_a                  # single-process and sharded MagFace heads
    if spec is None and all(isinstance(getattr(loss, k, None), (int, float)) for k in ("l_a", "u_a")):
        return loss.l_a, loss.u_a
    raise TypeError(f"loss: {name} has no magnitude range (l_a, u_a); quality scores need a MagFace-type loss "
                    "(MagFaceLoss, MagCosFaceLoss) or explicit l_a and u_a")


def pair_quality(quality_a: ArrayLike, quality_b: ArrayLike) -> torch.Tensor:
    """Quality of a comparison pair: the smaller of its two image qualities.

    ``q_pair_k = min(q_a_k, q_b_k)``. A pair is only as good as its worse image.

    Args:
        quality_a, quality_b: ``[P]`` float tensors (or arrays) of per-image quality
            (raw magnitudes or ``quality_score`` output), one entry per pair.

    Returns:
        ``[P]`` tensor (float64 when either input is float64, else float32).
    """
    qa = float_tensor(quality_a, "quality_a", ndim=1)
    qb = float_tensor(quality_b, "quality_b", ndim=1)
    if qa.shape != qb.shape:
        raise ValueError(f"quality_a and quality_b must have the same shape, got {tuple(qa.shape)} and {tuple(qb.shape)}")
    dtype = torch.promote_types(qa.dtype, qb.dtype)
    return torch.minimum(qa.to(dtype), qb.to(dtype))


def aggregate_templates(
    features: ArrayLike,
    template_ids: Optional[ArrayLike] = None,
    method: str = "mean",
    normalize: bool = True,
    eps: float = 1e-12,
):
    """Aggregate several embeddings of one identity into one template feature.

    With ``x̂_i = x_i / ||x_i||`` and ``a_i = ||x_i||``, for each template ``T``:

    * ``method="mean"`` (plain average of normalized features):
      ``t = (1/|T|) Σ_{i∈T} x̂_i``
    * ``method="magnitude"`` (MagFace+, magnitude-weighted):
      ``t = Σ_{i∈T} a_i x̂_i / Σ_{i∈T} a_i``, which is the mean of the raw features
      divided by the mean magnitude; high-quality (large-magnitude) images dominate.

    With ``normalize=True`` (default) the template is returned as a unit vector
    ``t / ||t||``, which is what cosine comparison uses.

    Args:
        features: ``[N, D]`` float embeddings, NOT normalized (their magnitudes are
            the weights of the MagFace+ form).
        template_ids: ``[N]`` integer template (identity) id of each row, or ``None``
            to aggregate all rows into one template.
        method: ``"mean"`` or ``"magnitude"``.
        normalize: return unit-norm templates.
        eps: floor on norms before dividing.

    Returns:
        ``(templates, ids)``: ``templates`` is ``[T, D]`` (float64 for float64
        ``features``, else float32: float16/bfloat16 are computed in float32, where a
        zero row or magnitudes summing past 65504 would make the template NaN),
        one row per distinct id in ascending order; ``ids`` is the ``[T]`` int64 tensor
        of those ids (``tensor([0])`` when ``template_ids`` is ``None``).
    """
    x = float_tensor(features, "features", ndim=2)
    if method not in ("mean", "magnitude"):
        raise ValueError(f"method must be 'mean' or 'magnitude', got {method!r}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("features must have at least one row")
    if template_ids is None:
        ids = torch.zeros(n, dtype=torch.int64, device=x.device)
    else:
        ids = torch.as_tensor(labels_array(template_ids, "template_ids"), device=x.device)
        if ids.shape != (n,):
            raise ValueError(f"template_ids must have shape [{n}], got {tuple(ids.shape)}")
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    mags = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    unit = x / mags.clamp_min(eps)
    if method == "mean":
        w = torch.ones_like(mags)
    else:
        w = mags
    num = torch.zeros(uniq.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    num.index_add_(0, inverse, unit * w)
    den = torch.zeros(uniq.numel(), 1, dtype=x.dtype, device=x.device)
    den.index_add_(0, inverse, w)
    t = num / den.clamp_min(eps)
    if normalize:
        t = t / torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(eps)
    return t, uniq


def error_versus_reject(
    scores: ArrayLike,
    is_genuine: ArrayLike,
    quality: ArrayLike,
    fmr: float = 1e-3,
    reject_fractions: Optional[Sequence[float]] = None,
) -> dict:
    """Error-versus-reject curve: FNMR at a fixed FMR as the lowest-quality pairs are rejected.

    Protocol (Grother & Tabassi; as used to evaluate MagFace's quality):

    1. The decision threshold ``t`` is fixed once, on all pairs, as the threshold at
       which the impostor pairs reach false-match rate ``fmr``
       (:func:`magloss.evaluation.threshold_at_fmr`: a pair matches when
       ``score > t``).
    2. For each fraction ``r``, the ``floor(r·P)`` pairs of lowest ``quality`` are
       rejected (ties broken by pair order, stably); the count is exact
       (:func:`magloss.evaluation.fraction_count`: r = 0.29 of 100 pairs rejects 29).
    3. ``FNMR(r)`` = share of the remaining genuine pairs with ``score <= t``.

    A useful quality score makes the curve fall as ``r`` grows.

    Args:
        scores: ``[P]`` float similarity of each pair (higher = more similar).
        is_genuine: ``[P]`` bool/0-1, True for same-identity pairs.
        quality: ``[P]`` float pair quality (e.g. :func:`pair_quality` of the
            magnitudes).
        fmr: target false-match rate in ``(0, 1)``; default ``1e-3``.
        reject_fractions: one fraction or a sequence of fractions in ``[0, 1)``;
            default ``0, 0.05, ..., 0.5``.

    Returns:
        dict with ``reject_fraction`` (list of float), ``fnmr`` (list of float, NaN
        where no genuine pair is left), ``threshold`` (float), ``fmr`` (float, the
        target) and ``achieved_fmr`` (float, impostor rate above ``threshold`` before
        rejection).

    Raises:
        ValueError: NaN or Inf in ``scores`` or ``quality`` (naming it), shapes that
        differ, no genuine or no impostor pair, rates out of range.
    """
    from .evaluation import threshold_at_fmr

    s = float_tensor(scores, "scores", ndim=1).detach().cpu().double().numpy()
    q = float_tensor(quality, "quality", ndim=1).detach().cpu().double().numpy()
    g = _np1d(is_genuine, "is_genuine", dtype=bool)
    if not (s.shape == q.shape == g.shape):
        raise ValueError(f"scores, is_genuine and quality must have one shape, got {s.shape}, {g.shape}, {q.shape}")
    if g.all() or not g.any():
        raise ValueError("is_genuine must contain both genuine and impostor pairs")
    if reject_fractions is None:
        reject_fractions = [i / 20 for i in range(11)]
    fr = [check_number(r, "reject_fractions") for r in _as_list(reject_fractions, "reject_fractions")]
    if any(not (0.0 <= r < 1.0) for r in fr):
        raise ValueError(f"reject_fractions: expected fractions in [0, 1), got {fr}")

    thr = threshold_at_fmr(s[~g], fmr)
    achieved = float(np.mean(s[~g] > thr))
    order = np.argsort(q, kind="stable")  # ascending quality: the first ones go first
    P = s.shape[0]
    fnmr = []
    for r in fr:
        keep = order[fraction_count(r, P):]
        gk = g[keep]
        if not gk.any():
            fnmr.append(float("nan"))
        else:
            fnmr.append(float(np.mean(s[keep][gk] <= thr)))
    return {"reject_fraction": fr, "fnmr": fnmr, "threshold": float(thr), "fmr": float(fmr), "achieved_fmr": achieved}
