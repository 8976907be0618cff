"""Verification, identification and clustering metrics for embeddings.

* 1:1 verification: :func:`kfold_verification` (the LFW protocol: the threshold is
  chosen on 9 folds and tested on the tenth), :func:`roc` and :func:`tar_at_far`
  (scikit-learn), :func:`threshold_at_fmr`.
* 1:N identification: :func:`identification_topk` (torch by default, faiss when it is
  installed and asked for or ``backend="auto"``).
* Clustering: :func:`cluster_embeddings` and :func:`clustering_scores` (pairwise
  F-score and NMI, as in the MagFace paper; scikit-learn).
* Helpers: :func:`cosine_scores`, :func:`sample_pairs`.

Decision rule everywhere: a pair is declared "same identity" when ``score > threshold``.

Conventions shared by every function here and in :mod:`magloss.quality`:

* Inputs: tensors (any device), numpy arrays or sequences. NaN or Inf in any score,
  quality, magnitude or embedding is a ``ValueError`` naming the argument and the first
  bad index (a NaN score has no place in a sorted list, and would silently count as
  the best or the worst pair). Arguments that are lists of values (``fars``, ``topk``,
  ``reject_fractions``) also accept a single number.
* Counts derived from a fraction (the impostors allowed at an FMR, the pairs rejected
  at a reject fraction, Partial FC's sample size) are exact: the fraction is read as
  the decimal it prints as (``0.29`` is 29/100, not the binary double just below it),
  see :func:`fraction_count`.
* Precision: float16 and bfloat16 inputs (and integer embeddings) are computed in
  float32 and per-sample results come back in float32 (half precision overflows at
  65504 and rounds cosines at 2^-11); float64 inputs are computed and returned in
  float64.
* Labels and ids (``labels``, ``probe_labels``, ``gallery_labels``, ``labels_true``,
  ``labels_pred``, ``template_ids``) must have an integer dtype: float labels are a
  ``TypeError`` naming the argument (truncating them would merge 0.4 and 0.6 into one
  identity). Empty inputs are a ``ValueError`` naming the argument.
* Counts, sizes and seeds (``n_folds``, ``num_pairs``, ``topk``, batch sizes, ``n_clusters``,
  ``seed``) are checked by :func:`magloss.validation.check_int`, the rule of every magloss
  count: a Python or numpy int, not a bool and not a float (``10.0`` is refused), else a
  ``ValueError`` naming the argument.
* Returns: a scalar metric is a Python ``float`` computed in float64 from exact counts
  (no float32 rounding); several metrics come as a ``dict`` of such floats; curves
  (ROC) are numpy float64 arrays; per-sample values computed from embeddings
  (:func:`cosine_scores`, and the magnitudes and quality scores of
  :mod:`magloss.quality`) are torch tensors on the input's device.

Core functions need only torch and numpy; ROC, TAR@FAR and clustering need
scikit-learn (``pip install magloss[eval]``).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from .rows import compute_dtype
from .validation import check_int

__all__ = [
    "cosine_scores",
    "sample_pairs",
    "best_threshold",
    "kfold_verification",
    "threshold_at_fmr",
    "roc",
    "tar_at_far",
    "identification_topk",
    "cluster_embeddings",
    "clustering_scores",
    "fraction_count",
    "check_finite",
    "check_number",
    "float_tensor",
    "labels_array",
]


def fraction_count(fraction: float, n: int, rounding: str = "floor") -> int:
    """``floor(fraction·n)`` (or ``ceil``), computed exactly.

    The fraction is read as the shortest decimal that prints as it (``repr``), so
    ``fraction_count(0.29, 100) == 29`` and ``fraction_count(3e-4, 10000) == 3``, where
    ``math.floor(0.29 * 100)`` gives 28 because the double nearest 0.29 times 100 rounds
    to 28.999999999999996. Integer arithmetic on :class:`fractions.Fraction` from there.

    Args:
        fraction: a finite float (Python, numpy or 0-d tensor). n: a non-negative int.
        rounding: ``"floor"`` (default) or ``"ceil"``.

    Returns:
        int.

    Raises:
        ValueError: naming ``fraction`` (not a finite number; TypeError for a non-number) or ``n``
            (not an integer ≥ 0, 10.0 included, by the rule of :func:`magloss.validation.check_int`).
    """
    fraction = check_number(fraction, "fraction")
    if not math.isfinite(fraction):
        raise ValueError(f"fraction: expected a finite number, got {fraction}")
    f = Fraction(repr(fraction))
    q = f * check_int("n", n, 0)
    if rounding == "floor":
        return math.floor(q)
    if rounding == "ceil":
        return math.ceil(q)
    raise ValueError(f"rounding: expected 'floor' or 'ceil', got {rounding!r}")


def check_finite(values: Union[np.ndarray, torch.Tensor], name: str) -> None:
    """Raise ValueError naming ``name`` and the first index when ``values`` holds NaN or Inf."""
    if isinstance(values, torch.Tensor):
        bad = ~torch.isfinite(values.detach())
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}: expected finite values, got {values[idx].item()} at index "
                             f"{idx[0] if len(idx) == 1 else idx}")
        return
    bad = ~np.isfinite(values)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected finite values, got {values[idx]} at index "
                         f"{idx[0] if len(idx) == 1 else idx}")


def _as_list(values, name: str) -> list:
    """A single number or a sequence of numbers -> a list (``fars=1e-3`` == ``fars=[1e-3]``)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    elif isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        values = [values]
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"{name}: expected a number or a sequence of numbers, got {type(values).__name__}") from None
    if not out:
        raise ValueError(f"{name}: expected at least one value, got an empty sequence")
    return out


def check_number(value, name: str) -> float:
    """A real number (Python, numpy or 0-d tensor; not bool or str) as a Python float; TypeError naming ``name``."""
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None


def float_tensor(x, name: str, ndim: Optional[int] = None) -> torch.Tensor:
    """``x`` as a tensor to compute with: float64 stays float64, every other real dtype
    (float16, bfloat16, integers) becomes float32; on ``x``'s device when it is a tensor.

    Raises TypeError naming ``name`` for non-numeric or bool input, ValueError for a
    rank other than ``ndim`` or NaN/Inf (:func:`check_finite`).
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception:
            raise TypeError(f"{name}: expected a tensor or array of real numbers, got {type(x).__name__}") from None
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    t = t.to(compute_dtype(t.dtype))
    check_finite(t, name)
    return t


def labels_array(x, name: str) -> np.ndarray:
    """``[N]`` identity labels (or ids) as an int64 numpy array.

    Raises TypeError naming ``name`` when the dtype is not an integer one (float labels
    would be truncated: 0.4 and 0.6 would become one identity), ValueError when ``x`` is
    not 1-D or is empty.
    """
    if isinstance(x, torch.Tensor):
        dtype, integer = x.dtype, not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
        a = x.detach().cpu().numpy() if integer else x.detach().cpu()     # numpy has no bfloat16
    else:
        a = np.asarray(x)
        dtype, integer = a.dtype, np.issubdtype(a.dtype, np.integer)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one label, got none")
    if not integer:
        raise TypeError(f"{name}: expected integer labels, got dtype {dtype} (float labels would be truncated, "
                        "merging e.g. 0.4 and 0.6 into one identity: map them to integers first)")
    return a.astype(np.int64)


def _require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this function needs scikit-learn: pip install 'magloss[eval]' (or pip install scikit-learn)"
        ) from exc


def _np1d(x, name: str, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point():
            x = x.to(compute_dtype(x.dtype))    # numpy has no bfloat16
        x = x.cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if dtype is bool:
        if a.dtype != bool:
            if not np.issubdtype(a.dtype, np.number):
                raise TypeError(f"{name} must be bool or 0/1, got dtype {a.dtype}")
            if not np.isin(a, (0, 1)).all():
                raise ValueError(f"{name} must hold only 0/1 or True/False")
        return a.astype(bool)
    if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
        raise TypeError(f"{name} must be numeric, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        check_finite(a, name)
    return a.astype(dtype)


def _scores_labels(scores, is_same):
    s = _np1d(scores, "scores")
    y = _np1d(is_same, "is_same", dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and is_same must have one shape, got {s.shape} and {y.shape}")
    if s.size == 0:
        raise ValueError("scores must not be empty")
    return s, y


def cosine_scores(emb_a, emb_b, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of paired rows: ``s_k = <a_k, b_k> / (||a_k|| ||b_k||)``.

    Args:
        emb_a, emb_b: ``[P, D]`` real tensors or arrays (any scale; they are normalized
            here), ``D >= 1``.
        eps: floor on the norms (a zero row scores 0).

    Returns:
        ``[P]`` tensor in ``[-1, 1]``: float64 when either input is float64, else float32
        (float16/bfloat16 are computed in float32).

    Raises:
        ValueError: shapes that differ or are not ``[P, D]`` with ``D >= 1``; NaN/Inf
        (naming ``emb_a`` or ``emb_b``). TypeError: non-numeric input.
    """
    a = float_tensor(emb_a, "emb_a")
    b = float_tensor(emb_b, "emb_b")
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"emb_a and emb_b must both be [P, D] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] == 0:
        raise ValueError("emb_a and emb_b: expected at least one feature per row (D >= 1), got D = 0")
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(eps)
    b = b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp_min(eps)
    return (a * b).sum(dim=1)


def sample_pairs(labels, num_pairs: int, seed: int = 0):
    """Draw balanced verification pairs: half genuine (same label), half impostor.

    Pairs are drawn with replacement of pairs but never pair a sample with itself.
    The returned order is shuffled, so contiguous folds of it are random.

    Args:
        labels: ``[N]`` integer identity labels.
        num_pairs: total number of pairs (``num_pairs // 2`` genuine, the rest impostor).
        seed: seed of the numpy generator (an integer >= 0; deterministic).

    Returns:
        ``(idx_a, idx_b, is_same)``: two ``[num_pairs]`` int64 arrays and one bool array.
    """
    lab = labels_array(labels, "labels")
    num_pairs = check_int("num_pairs", num_pairs, 2)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    classes, counts = np.unique(lab, return_counts=True)
    multi = classes[counts >= 2]
    if multi.size == 0:
        raise ValueError("labels need a class with at least two samples to form genuine pairs")
    if classes.size < 2:
        raise ValueError("labels need at least two classes to form impostor pairs")
    by_class = {c: np.flatnonzero(lab == c) for c in classes}
    n_gen = int(num_pairs) // 2
    n_imp = int(num_pairs) - n_gen
    a, b = [], []
    for _ in range(n_gen):
        c = multi[rng.integers(multi.size)]
        i, j = rng.choice(by_class[c], size=2, replace=False)
        a.append(i)
        b.append(j)
    for _ in range(n_imp):
        c1, c2 = rng.choice(classes, size=2, replace=False)
        a.append(rng.choice(by_class[c1]))
        b.append(rng.choice(by_class[c2]))
    same = np.array([True] * n_gen + [False] * n_imp)
    perm = rng.permutation(int(num_pairs))
    return np.asarray(a, dtype=np.int64)[perm], np.asarray(b, dtype=np.int64)[perm], same[perm]


def best_threshold(scores, is_same) -> float:
    """Threshold that maximizes verification accuracy on the given pairs.

    Candidates: one below every score (``min - 1``: all pairs "same"), the midpoints
    between consecutive distinct scores, and the largest score (all pairs
    "different"). Accuracy at ``t`` is ``mean((s > t) == is_same)``; the first
    (lowest) best candidate wins.

    Args:
        scores: ``[P]`` float similarities. is_same: ``[P]`` bool.

    Returns:
        the threshold as a Python float.
    """
    s, y = _scores_labels(scores, is_same)
    u = np.unique(s)
    cand = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1]]])
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    tp = pos.size - np.searchsorted(pos, cand, side="right")  # positives with s > t
    tn = np.searchsorted(neg, cand, side="right")  # negatives with s <= t
    acc = (tp + tn) / s.size
    return float(cand[int(np.argmax(acc))])


def kfold_verification(scores, is_same, n_folds: int = 10, shuffle: bool = False, seed: int = 0) -> Dict:
    """K-fold verification accuracy, the LFW protocol.

    The pairs are split into ``n_folds`` folds (contiguous, as LFW's ``pairs.txt``;
    ``shuffle=True`` permutes first with ``seed``). For fold ``k`` the threshold
    ``t_k = best_threshold(pairs not in fold k)`` is chosen on the other folds only,
    and fold ``k``'s accuracy is ``mean((s > t_k) == is_same)`` over fold ``k``.

    Args:
        scores: ``[P]`` float similarities. is_same: ``[P]`` bool.
        n_folds: number of folds, an integer ``2 <= n_folds <= P``; default 10.
        shuffle, seed: permute the pairs before splitting.

    Raises:
        ValueError: fewer than ``n_folds`` pairs, ``n_folds < 2``, shapes that differ,
        NaN/Inf scores, ``is_same`` not 0/1, an ``n_folds`` or ``seed`` that is not an int
        (10.0 included: :func:`magloss.validation.check_int`).

    Returns:
        dict: ``accuracy_mean``, ``accuracy_std`` (population std over folds, as
        insightface reports), ``fold_accuracies`` (list), ``thresholds`` (list, one
        per fold), ``fold_indices`` (list of int lists, the test pairs of each fold).
    """
    s, y = _scores_labels(scores, is_same)
    n_folds = check_int("n_folds", n_folds, 2)
    if s.size < n_folds:
        raise ValueError(f"scores: need at least n_folds={n_folds} pairs (one per fold), got {s.size}")
    order = np.arange(s.size)
    if shuffle:
        order = np.random.default_rng(check_int("seed", seed, 0)).permutation(s.size)
    folds = np.array_split(order, n_folds)
    accs, thrs = [], []
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        t = best_threshold(s[train], y[train])
        accs.append(float(np.mean((s[test] > t) == y[test])))
        thrs.append(t)
    return {
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "fold_accuracies": accs,
        "thresholds": thrs,
        "fold_indices": [f.tolist() for f in folds],
    }


def threshold_at_fmr(impostor_scores, fmr: float) -> float:
    """Lowest threshold whose false-match rate on the impostor scores is at most ``fmr``.

    With the impostor scores sorted descending ``s_(1) >= s_(2) >= ...`` and
    ``k = floor(fmr · n)`` (exact: :func:`fraction_count`), the threshold is ``t = s_(k+1)``; pairs with ``score > t``
    match, so at most ``k`` impostors do (fewer under ties), and any lower threshold
    would let ``k + 1`` through.

    Args:
        impostor_scores: ``[n]`` finite float scores of different-identity pairs, ``n >= 1``.
        fmr: in ``(0, 1)``.

    Returns:
        the threshold as a Python float.

    Raises:
        ValueError: empty or non-finite ``impostor_scores``, ``fmr`` outside (0, 1).

    Warns:
        UserWarning when ``fmr < 1/n``: no impostor may pass, so the threshold is the
        largest impostor score and the FMR it achieves (0) says nothing about ``fmr``.
    """
    s = _np1d(impostor_scores, "impostor_scores")
    if s.size == 0:
        raise ValueError("impostor_scores must not be empty")
    fmr = _check_rate(fmr, "fmr", upper_open=True)
    k = fraction_count(fmr, s.size)
    if k == 0:
        _warn_unmeasurable("fmr", fmr, s.size)
    return float(np.sort(s)[::-1][k])


def _check_rate(value, name: str, upper_open: bool) -> float:
    """A rate in (0, 1) (or (0, 1] when not ``upper_open``), NaN rejected, as a float."""
    v = check_number(value, name)
    ok = 0.0 < v < 1.0 if upper_open else 0.0 < v <= 1.0
    if not ok:
        raise ValueError(f"{name}: expected a rate in (0, {'1)' if upper_open else '1]'}, got {value}")
    return v


def _warn_unmeasurable(name: str, rate: float, n_impostor: int) -> None:
    warnings.warn(
        f"{name}={rate:g} is below 1/{n_impostor} (one impostor pair of {n_impostor}): not measurable on this "
        f"set; the operating point used lets no impostor pass. Use at least {math.ceil(1 / rate)} impostor "
        "pairs to measure it", UserWarning, stacklevel=3)


def roc(scores, is_same) -> Dict:
    """ROC curve of a verification set (scikit-learn ``roc_curve`` and ``auc``).

    Args:
        scores: ``[P]`` float similarities. is_same: ``[P]`` bool; both classes needed.

    Returns:
        dict: ``fpr``, ``tpr``, ``thresholds`` (numpy arrays from
        ``sklearn.metrics.roc_curve(is_same, scores, drop_intermediate=False)``; there
        a pair is positive when ``score >= threshold``) and ``auc`` (float).
    """
    _require_sklearn()
    from sklearn.metrics import auc, roc_curve

    s, y = _scores_labels(scores, is_same)
    if y.all() or not y.any():
        raise ValueError("is_same must contain both genuine and impostor pairs")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr, "auc": float(auc(fpr, tpr))}


def tar_at_far(scores, is_same, fars: Union[float, Sequence[float]] = (1e-3, 1e-2, 1e-1)) -> Dict[float, float]:
    """True-accept rate at given false-accept rates, read off the scikit-learn ROC.

    ``TAR@FAR(f) = max { tpr_t : fp_t <= floor(f · n_impostor) }`` over the ROC
    operating points, with the false-positive count ``fp_t`` compared as an integer
    (:func:`fraction_count`; no float tolerance). The point ``fp = 0`` always exists.

    Args:
        scores: ``[P]`` float similarities. is_same: ``[P]`` bool.
        fars: one FAR or a sequence of FARs in ``(0, 1]``; default ``(1e-3, 1e-2, 1e-1)``.

    Returns:
        dict ``{far: tar}`` (float keys, in the given order), also for a single ``far``.

    Warns:
        UserWarning for each FAR below ``1/n_impostor``: not measurable with that few
        impostor pairs; the value returned is the TAR at zero false accepts.
    """
    fars = [_check_rate(f, "fars", upper_open=False) for f in _as_list(fars, "fars")]
    r = roc(scores, is_same)
    n_imp = int(np.count_nonzero(~_np1d(is_same, "is_same", dtype=bool)))
    fp = np.rint(r["fpr"] * n_imp).astype(np.int64)      # sklearn's fpr is fp / n_imp: exact back to counts
    out = {}
    for f in fars:
        allowed = fraction_count(f, n_imp)
        if allowed == 0:
            _warn_unmeasurable("fars", f, n_imp)
        out[f] = float(r["tpr"][fp <= allowed].max())
    return out


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _topk_chunked(p: torch.Tensor, g: torch.Tensor, k: int, probe_batch: int, gallery_batch: int) -> torch.Tensor:
    """Indices ``[Np, k]`` of each probe's ``k`` largest ``<p_i, g_j>``, best first, computed block by
    block: a ``[probe_batch, gallery_batch]`` block of products at a time, its top-k merged into the
    running top-k of the probes (top-k of the union of two candidate lists is the top-k of the union
    of their sources). Peak extra memory: one block plus ``O(probe_batch · k)``, whatever ``Ng``."""
    out = []
    for i in range(0, p.shape[0], probe_batch):
        q = p[i:i + probe_batch]
        best_v = q.new_empty((q.shape[0], 0))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=q.device)
        for j in range(0, g.shape[0], gallery_batch):
            block = g[j:j + gallery_batch]
            v, ix = (q @ block.T).topk(min(k, block.shape[0]), dim=1)
            v, ix = torch.cat([best_v, v], dim=1), torch.cat([best_i, ix + j], dim=1)
            best_v, pos = v.topk(min(k, v.shape[1]), dim=1)
            best_i = ix.gather(1, pos)
        out.append(best_i.cpu())
    return torch.cat(out)


def identification_topk(
    probe,
    probe_labels,
    gallery,
    gallery_labels,
    topk: Union[int, Sequence[int]] = (1, 5),
    backend: str = "auto",
    batch_size: int = 4096,
    gallery_batch_size: int = 8192,
) -> Dict[str, float]:
    """1:N identification: top-k accuracy of probes searched against a gallery.

    Similarity is the cosine (rows are L2-normalized here). A probe is correct at
    ``k`` when one of its ``k`` most similar gallery rows has the probe's label:
    ``acc@k = mean_p 1[ y_p ∈ { g_label[j] : j ∈ top_k(p) } ]``. With one gallery row
    per identity this is the rank-k identification rate. ``k`` larger than the gallery
    is clipped to the gallery size. Ties in similarity are broken in an unspecified order.

    Args:
        probe: ``[Np, D]`` real; probe_labels: ``[Np]`` integer.
        gallery: ``[Ng, D]`` real; gallery_labels: ``[Ng]`` integer.
            Computed in float64 when either embedding input is float64, else float32.
        topk: one ``k`` or a sequence of them (positive ints); default ``(1, 5)``.
        backend: ``"torch"`` (exact matrix products by blocks, see below), ``"faiss"``
            (``IndexFlatIP``, exact, float32; needs faiss), or ``"auto"`` (faiss when
            importable, else torch).
        batch_size, gallery_batch_size: the torch backend's block: ``batch_size`` probes
            against ``gallery_batch_size`` gallery rows at a time (positive ints; defaults
            4096 and 8192). Besides the normalized copies of probe and gallery, its peak
            memory is one block, ``batch_size · gallery_batch_size`` similarities (128 MB in
            float32 at the defaults), plus the running top-k of ``batch_size`` probes, whatever
            the gallery size.

    Returns:
        dict ``{"top{k}": accuracy}`` (exact hits / probes, a Python float), also for a
        single ``k``.

    Raises:
        ValueError: shapes, empty inputs, ``topk``/batch sizes that are not positive ints
        (2.0 included), NaN/Inf (each naming the argument). TypeError: non-integer labels.
    """
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    p = float_tensor(probe, "probe")
    g = float_tensor(gallery, "gallery")
    if p.dim() != 2 or g.dim() != 2 or p.shape[1] != g.shape[1] or p.shape[1] == 0:
        raise ValueError(f"probe and gallery must be [N, D] with one D >= 1, got {tuple(p.shape)} and {tuple(g.shape)}")
    pl = torch.as_tensor(labels_array(probe_labels, "probe_labels"))
    gl = torch.as_tensor(labels_array(gallery_labels, "gallery_labels"))
    if pl.numel() != p.shape[0]:
        raise ValueError(f"probe_labels must have {p.shape[0]} entries, got {pl.numel()}")
    if gl.numel() != g.shape[0]:
        raise ValueError(f"gallery_labels must have {g.shape[0]} entries, got {gl.numel()}")
    batch_size = check_int("batch_size", batch_size, 1)
    gallery_batch_size = check_int("gallery_batch_size", gallery_batch_size, 1)
    ks = [check_int("topk", k, 1) for k in _as_list(topk, "topk")]
    kmax = min(max(ks), g.shape[0])
    dtype = torch.promote_types(p.dtype, g.dtype)
    p = torch.nn.functional.normalize(p.to(dtype), dim=1)
    g = torch.nn.functional.normalize(g.to(dtype), dim=1)

    use_faiss = backend == "faiss" or (backend == "auto" and _faiss_available())
    if use_faiss:
        try:
            import faiss
        except ImportError as exc:
            raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
        index = faiss.IndexFlatIP(g.shape[1])
        index.add(np.ascontiguousarray(g.cpu().numpy(), dtype=np.float32))
        _, idx = index.search(np.ascontiguousarray(p.cpu().numpy(), dtype=np.float32), kmax)
        idx = torch.as_tensor(idx, dtype=torch.int64)
    else:
        idx = _topk_chunked(p, g.to(p.device), kmax, batch_size, gallery_batch_size)
    hit = gl[idx] == pl[:, None]  # [Np, kmax]
    n = hit.shape[0]
    return {f"top{k}": int(hit[:, : min(k, kmax)].any(dim=1).sum()) / n for k in ks}


def cluster_embeddings(features, n_clusters: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster L2-normalized embeddings with scikit-learn.

    Args:
        features: ``[N, D]`` float embeddings (normalized here, so clustering is by angle).
        n_clusters: number of clusters, ``1 <= n_clusters <= N``.
        method: ``"kmeans"`` (``KMeans(n_init=10, random_state=seed)``) or
            ``"agglomerative"`` (``AgglomerativeClustering`` with average linkage on
            the cosine distance).
        seed: random state for k-means.

    Returns:
        ``[N]`` int64 numpy array of cluster ids.
    """
    _require_sklearn()
    x = float_tensor(features, "features")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be [N, D] with N, D >= 1, got shape {tuple(x.shape)}")
    n_clusters = check_int("n_clusters", n_clusters, 1)
    if not (1 <= n_clusters <= x.shape[0]):
        raise ValueError(f"n_clusters must be in [1, {x.shape[0]}], got {n_clusters}")
    x = torch.nn.functional.normalize(x, dim=1).cpu().numpy()      # float32, or float64 for float64 input
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=n_clusters, n_init=10, random_state=check_int("seed", seed, 0)).fit_predict(x).astype(np.int64)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        return AgglomerativeClustering(n_clusters=n_clusters, metric="cosine", linkage="average").fit_predict(x).astype(np.int64)
    raise ValueError(f"method must be 'kmeans' or 'agglomerative', got {method!r}")


def clustering_scores(labels_true, labels_pred) -> Dict[str, float]:
    """Pairwise precision/recall/F-score and NMI of a clustering (MagFace paper, Sec. 4).

    Over all unordered sample pairs, a pair is positive when both samples share a
    cluster. With TP = pairs together in both truth and prediction, FP = together only
    in the prediction, FN = together only in the truth (scikit-learn
    ``pair_confusion_matrix``):
    ``precision = TP/(TP+FP)``, ``recall = TP/(TP+FN)``,
    ``F = 2·P·R/(P+R)`` (0 where undefined), and
    ``nmi = normalized_mutual_info_score(labels_true, labels_pred)``.

    Args:
        labels_true, labels_pred: ``[N]`` integer labels, ``N >= 1``.

    Returns:
        dict with ``precision``, ``recall``, ``f_score``, ``nmi`` (floats).

    Raises:
        ValueError: empty or differently shaped labels. TypeError: non-integer labels.
    """
    _require_sklearn()
    from sklearn.metrics import normalized_mutual_info_score
    from sklearn.metrics.cluster import pair_confusion_matrix

    t = labels_array(labels_true, "labels_true")
    p = labels_array(labels_pred, "labels_pred")
    if t.shape != p.shape:
        raise ValueError(f"labels_true and labels_pred must have one shape, got {t.shape} and {p.shape}")
    c = pair_confusion_matrix(t, p).astype(np.float64)  # ordered pairs: every count is doubled
    tp, fp, fn = c[1, 1], c[0, 1], c[1, 0]
    prec = tp / (tp + fp) if tp + fp > 0 else 0.0
    rec = tp / (tp + fn) if tp + fn > 0 else 0.0
    f = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {
        "precision": float(prec),
        "recall": float(rec),
        "f_score": float(f),
        "nmi": float(normalized_mutual_info_score(t, p)),
    }
