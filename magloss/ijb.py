"""IJB-B / IJB-C template evaluation: 1:1 verification and 1:N identification.

``python -m magloss.ijb ROOT --target IJBC (--model OUTPUT/model.pt | --features feats.npy)``
reads insightface's layout of the IJB release (``ROOT`` is e.g. ``IJB_release/IJBC``):

* ``meta/ijbc_face_tid_mid.txt``: one line per face ``image_name template_id media_id``;
* ``meta/ijbc_template_pair_label.txt``: ``template_1 template_2 label`` (1 genuine, 0 impostor);
* ``meta/ijbc_name_5pts_score.txt``: ``image_name x1 y1 ... x5 y5 detector_score``, line ``i``
  describing the same face as line ``i`` of ``face_tid_mid``;
* ``loose_crop/<image_name>``: the loosely cropped face images;
* 1:N: ``meta/ijbc_1N_gallery_G1.csv``, ``..._G2.csv`` (IJB-B: ``ijbb_1N_gallery_S1.csv``,
  ``..._S2.csv``) and ``meta/ijbc_1N_probe_mixed.csv``: CSV with a header line, columns
  ``TEMPLATE_ID,SUBJECT_ID,FILENAME,...`` (one line per image; the first two are read).

Pipeline (:func:`evaluate`):

1. Face features ``f_i`` (``[N, D]``): from ``--features`` (an ``.npy`` in the order of
   ``face_tid_mid``), or computed (:func:`embed_faces`): each loose crop aligned to the
   backbone's input by the five points (:func:`magloss.pack.align_face`), pixels
   ``(p - 127.5) / 127.5``, flip fusion ``f = net(x) + net(mirror(x))``.
2. Weights: ``u_i = f_i / ||f_i||`` scaled by ``w_i`` = the detector score (``detector``),
   the feature magnitude ``||f_i||`` (``magnitude``, MagFace's quality), their product
   (``both``, the default: insightface's ``use_norm_score`` and ``use_detector_score``) or 1 (``none``).
3. Media pooling then template pooling (:func:`template_features`): the mean of
   ``w_i u_i`` over the faces of one (template, media), summed over the template's media,
   L2-normalized. Computed as one pass over the faces with per-face coefficient
   ``1 / |faces of its (template, media)|``, in chunks: memory ``O(templates × D)``.
4. 1:1: cosine of the two template features per pair, in chunks (:func:`pair_scores`);
   TAR at FAR ``1e-6 … 1e-1`` (:func:`magloss.evaluation.tar_at_far`) and the ROC
   (:func:`magloss.evaluation.roc`).
5. 1:N (:func:`identification`), per gallery (G1, G2 for IJB-C; S1, S2 for IJB-B) and their
   mean: the mixed probe templates are searched in each gallery separately; a probe is
   *mated* when its subject has a template in that gallery, *non-mated* otherwise.
   Rank of a mated search: ``1 +`` the number of non-mate gallery templates scoring at
   least the best mate (a tie counts against the probe). TPIR at rank r: mated searches
   of rank ``<= r`` / mated searches. FPIR(t): non-mated searches whose best score is
   ``> t`` / non-mated searches; the threshold at FPIR ``f`` is
   :func:`magloss.evaluation.threshold_at_fmr` of the non-mated best scores. TPIR at FPIR
   ``f``: mated searches of rank 1 whose mate scores ``> t`` / mated searches.

The differences from insightface's ``ijb_11.py`` / ``ijb_1n.py`` are listed in ``docs/ijb.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .evaluation import roc, tar_at_far, threshold_at_fmr

__all__ = [
    "FARS",
    "FPIRS",
    "RANKS",
    "IJBLayout",
    "read_face_tid_mid",
    "read_template_pairs",
    "read_name_5pts_score",
    "read_template_subjects",
    "embed_faces",
    "face_weights",
    "template_features",
    "pair_scores",
    "identification",
    "evaluate",
    "main",
]

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)
WEIGHTS = ("both", "detector", "magnitude", "none")


class IJBError(Exception):
    """Bad IJB input: names the file (and line) or option and what was expected."""


# ---------------------------------------------------------------------------- meta files
def _columns(path: str, n_min: int, what: str, skip_header: bool = False) -> List[List[str]]:
    if not os.path.isfile(path):
        raise IJBError(f"{path}: not found ({what})")
    rows = []
    with open(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            if skip_header and lineno == 1:
                continue
            if not line.strip():
                continue
            parts = line.strip().split("," if skip_header else None)
            if len(parts) < n_min:
                raise IJBError(f"{path}: line {lineno}: expected {what}, got {line.rstrip()!r}")
            rows.append(parts)
    if not rows:
        raise IJBError(f"{path}: empty (expected {what})")
    return rows


def _ints(rows, cols, path, what, skip_header=False) -> List[np.ndarray]:
    out = []
    for c in cols:
        try:
            out.append(np.array([int(r[c]) for r in rows], dtype=np.int64))
        except ValueError:
            bad = next(i for i, r in enumerate(rows) if not r[c].strip().lstrip("-").isdigit())
            raise IJBError(f"{path}: line {bad + 1 + int(skip_header)}: expected {what}, column {c + 1} "
                           f"{rows[bad][c]!r} is not an integer") from None
    return out


def read_face_tid_mid(path: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``(image names, template ids [N] int64, media ids [N] int64)`` of ``*_face_tid_mid.txt``."""
    what = "'image_name template_id media_id'"
    rows = _columns(path, 3, what)
    t, m = _ints(rows, (1, 2), path, what)
    return [r[0] for r in rows], t, m


def read_template_pairs(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(template_1, template_2, label)`` int64 arrays of ``*_template_pair_label.txt``.

    numpy's C parser reads the file (IJB-C: 15.7M lines); the line-by-line reader runs only
    to name the first bad line.
    """
    what = "'template_1 template_2 label'"
    table = None
    if os.path.isfile(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty file: reported by the line reader
                table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
            if table.shape[0] == 0 or table.shape[1] != 3:
                table = None
        except ValueError:
            table = None
    if table is not None:
        t1, t2, lab = (np.ascontiguousarray(table[:, c]) for c in range(3))
    else:
        rows = _columns(path, 3, what)
        t1, t2, lab = _ints(rows, (0, 1, 2), path, what)
    if not np.isin(lab, (0, 1)).all():
        raise IJBError(f"{path}: line {int(np.flatnonzero(~np.isin(lab, (0, 1)))[0]) + 1}: label must be 0 or 1")
    return t1, t2, lab


def read_name_5pts_score(path: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """``(image names, landmarks [N, 5, 2] float32, detector scores [N] float32)`` of ``*_name_5pts_score.txt``."""
    what = "'image_name x1 y1 ... x5 y5 score' (12 fields)"
    rows = _columns(path, 12, what)
    try:
        vals = np.array([[float(v) for v in r[1:12]] for r in rows], dtype=np.float32)
    except ValueError:
        raise IJBError(f"{path}: expected {what} with numbers after the name") from None
    if not np.isfinite(vals).all():
        raise IJBError(f"{path}: line {int(np.flatnonzero(~np.isfinite(vals).all(1))[0]) + 1}: non-finite value")
    return [r[0] for r in rows], vals[:, :10].reshape(-1, 5, 2), vals[:, 10].copy()


def read_template_subjects(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Unique ``(template ids, subject ids)`` of a 1:N gallery or probe CSV (header line, then
    ``TEMPLATE_ID,SUBJECT_ID,...`` per image). A template listed with two subjects is an error."""
    what = "'TEMPLATE_ID,SUBJECT_ID,...'"
    rows = _columns(path, 2, what, skip_header=True)
    t, s = _ints(rows, (0, 1), path, what, skip_header=True)
    ut, first = np.unique(t, return_index=True)
    if np.unique(np.stack([t, s], 1), axis=0).shape[0] != ut.size:
        raise IJBError(f"{path}: a template is listed with two different subjects")
    return ut, s[first]


class IJBLayout:
    """Paths of insightface's IJB layout under ``root`` for ``target`` (``"IJBB"`` or ``"IJBC"``)."""

    def __init__(self, root: str, target: str) -> None:
        t = target.lower()
        if t not in ("ijbb", "ijbc"):
            raise IJBError(f"target: expected IJBB or IJBC, got {target!r}")
        if not os.path.isdir(root):
            raise IJBError(f"ROOT: {root!r} is not a folder (expected the folder holding meta/ and loose_crop/)")
        meta = os.path.join(root, "meta")
        self.root, self.target = root, t.upper()
        self.face_tid_mid = os.path.join(meta, f"{t}_face_tid_mid.txt")
        self.pairs = os.path.join(meta, f"{t}_template_pair_label.txt")
        self.landmarks = os.path.join(meta, f"{t}_name_5pts_score.txt")
        self.images = os.path.join(root, "loose_crop")
        g = ("G1", "G2") if t == "ijbc" else ("S1", "S2")
        self.galleries = {name: os.path.join(meta, f"{t}_1N_gallery_{name}.csv") for name in g}
        self.probes = os.path.join(meta, f"{t}_1N_probe_mixed.csv")


# ------------------------------------------------------------------------------ features
def embed_faces(images_dir: str, names: Sequence[str], landmarks: np.ndarray, model: torch.nn.Module,
                flip: bool = True, batch_size: int = 64, device=None, progress: bool = False) -> np.ndarray:
    """Features ``[N, D]`` float32 of the loose crops ``images_dir/<name>``.

    Each crop is aligned by its five points to the model's ``input_size`` (square; ArcFace
    reference points scaled), converted to ``(p - 127.5) / 127.5`` RGB, and embedded;
    with ``flip`` the feature is ``model(x) + model(mirror(x))``. Runs under ``torch.no_grad()``.

    Raises:
        IJBError: an image that cannot be read (named), a non-square model input.
    """
    from PIL import Image

    from .pack import align_face

    h, w = tuple(getattr(model, "input_size", (112, 112)))
    if h != w:
        raise IJBError(f"model: IJB alignment makes square faces; the model takes {h}x{w}")
    if int(batch_size) < 1:
        raise IJBError(f"batch_size: expected a positive integer, got {batch_size}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="embed", unit="img", file=sys.stderr)
    out = []
    with torch.no_grad():
        for s in range(0, len(names), int(batch_size)):
            batch = []
            for i in range(s, min(s + int(batch_size), len(names))):
                path = os.path.join(images_dir, names[i])
                try:
                    with Image.open(path) as im:
                        face = align_face(im, landmarks[i], h)
                except (OSError, ValueError) as exc:
                    raise IJBError(f"{path}: cannot read or align the face: {exc}") from None
                batch.append(torch.from_numpy(np.asarray(face, dtype=np.uint8).copy()))
            x = (torch.stack(batch).permute(0, 3, 1, 2).float().to(dev) - 127.5) / 127.5
            e = model(x).float()
            if flip:
                e = e + model(torch.flip(x, dims=[3])).float()
            out.append(e.cpu().numpy())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return np.concatenate(out).astype(np.float32, copy=False)


def face_weights(features: np.ndarray, scores: Optional[np.ndarray], weight: str, chunk: int = 65536) -> Tuple[np.ndarray, np.ndarray]:
    """``(norms [N] float32, w [N] float64)``: feature magnitudes and the pooling weights of ``weight``.

    ``weight``: ``"both"`` (score × magnitude), ``"detector"`` (score), ``"magnitude"``, ``"none"`` (1).
    ``features`` may be a memory-mapped ``.npy``: read in chunks of ``chunk`` rows.
    """
    if weight not in WEIGHTS:
        raise IJBError(f"weight: expected one of {', '.join(WEIGHTS)}, got {weight!r}")
    n = features.shape[0]
    norms = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk):
        block = np.asarray(features[s:s + chunk], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = s + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
            raise IJBError(f"features: row {bad} holds NaN or Inf")
        norms[s:s + chunk] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float32))
    w = np.ones(n, dtype=np.float64)
    if weight in ("both", "detector"):
        if scores is None:
            raise IJBError(f"weight={weight!r} needs the detector scores (the last column of *_name_5pts_score.txt)")
        w *= np.asarray(scores, dtype=np.float64)
    if weight in ("both", "magnitude"):
        w *= norms
    return norms, w


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray, weights: np.ndarray,
                      norms: np.ndarray, chunk: int = 65536) -> Tuple[np.ndarray, np.ndarray]:
    """Media then template pooling: ``(template ids [M] sorted, unit features [M, D] float32)``.

    ``T_t = normalize( sum_media mean_{i in (t, media)} w_i f_i / ||f_i|| )``, accumulated in
    float32 one chunk of faces at a time (``features`` may be memory-mapped). A face of zero
    norm contributes nothing; a template whose pooled feature is zero stays zero.
    """
    n = features.shape[0]
    if not (templates.shape[0] == medias.shape[0] == weights.shape[0] == n):
        raise IJBError(f"features: {n} rows, the face list has {templates.shape[0]} faces (one row per face expected)")
    uniq_t, t_idx = np.unique(templates, return_inverse=True)
    key = t_idx.astype(np.int64) * (int(medias.max()) - int(medias.min()) + 1) + (medias - medias.min())
    _, combo, counts = np.unique(key, return_inverse=True, return_counts=True)
    coef = (weights / counts[combo] / np.maximum(norms.astype(np.float64), 1e-30)).astype(np.float32)
    coef[norms == 0] = 0.0
    acc = torch.zeros(uniq_t.size, features.shape[1], dtype=torch.float32)
    for s in range(0, n, chunk):
        block = torch.from_numpy(np.asarray(features[s:s + chunk], dtype=np.float32))
        block = block * torch.from_numpy(coef[s:s + chunk])[:, None]
        acc.index_add_(0, torch.from_numpy(t_idx[s:s + chunk].astype(np.int64)), block)
    norm = torch.linalg.vector_norm(acc, dim=1, keepdim=True)
    return uniq_t, (acc / norm.clamp_min(1e-30)).numpy()


def _rows_of(ids: np.ndarray, uniq: np.ndarray, what: str) -> np.ndarray:
    pos = np.searchsorted(uniq, ids)
    pos = np.minimum(pos, uniq.size - 1)
    missing = uniq[pos] != ids
    if missing.any():
        raise IJBError(f"{what}: template {int(ids[np.flatnonzero(missing)[0]])} has no face in face_tid_mid")
    return pos


def pair_scores(feats: np.ndarray, uniq_t: np.ndarray, t1: np.ndarray, t2: np.ndarray, block_bytes: int = 1 << 27,
                method: str = "auto", what: str = "pairs") -> np.ndarray:
    """Cosine ``[P]`` float32 of template pairs (unit template features ``[M, D]``), in bounded memory.

    The pairs are grouped by their first template into blocks of ``R = block_bytes / (4 M)``
    templates. A block with many pairs takes one matrix product ``F[block] @ F.T`` (``R × M``
    floats, at most ``block_bytes``) and reads its pairs' entries; a block with few pairs
    gathers both rows of each pair (at most ``block_bytes`` per side at a time) and takes the
    dot products. ``method``: ``"auto"`` (the product when ``256 · pairs >= R · M``: IJB-C's
    15.7M pairs over 23k templates), ``"matmul"`` or ``"gather"``. Float32 accumulation.
    """
    if method not in ("auto", "matmul", "gather"):
        raise IJBError(f"method: expected auto, matmul or gather, got {method!r}")
    r1, r2 = _rows_of(t1, uniq_t, what), _rows_of(t2, uniq_t, what)
    f = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    m, d = f.shape
    rows = max(1, int(block_bytes) // (4 * m))
    per_gather = max(1, int(block_bytes) // (4 * d))
    order = np.argsort(r1, kind="stable")
    bounds = np.searchsorted(r1[order], np.arange(0, m + rows, rows))
    out = np.empty(t1.size, dtype=np.float32)
    for i in range(bounds.size - 1):
        a, b = int(bounds[i]), int(bounds[i + 1])
        if a == b:
            continue
        lo, idx = i * rows, order[a:b]
        n_rows = min(rows, m - lo)
        if method == "matmul" or (method == "auto" and 256 * (b - a) >= n_rows * m):
            sim = f[lo:lo + n_rows] @ f.T
            out[idx] = sim[torch.from_numpy(r1[idx] - lo), torch.from_numpy(r2[idx])].numpy()
            continue
        for s in range(0, idx.size, per_gather):
            part = idx[s:s + per_gather]
            out[part] = torch.einsum("nd,nd->n", f[torch.from_numpy(r1[part])], f[torch.from_numpy(r2[part])]).numpy()
    return out


# ------------------------------------------------------------------------------ 1:N search
def identification(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
                   gallery_subjects: np.ndarray, ranks: Sequence[int] = RANKS, fpirs: Sequence[float] = FPIRS,
                   chunk: int = 4096) -> Dict:
    """Open-set 1:N search of unit probe features in one gallery (rules in the module docstring).

    Args:
        probe_feats: ``[Q, D]`` unit float32 features.
        gallery_feats: ``[G, D]`` unit float32 features.
        probe_subjects: ``[Q]`` int subject ids.
        gallery_subjects: ``[G]`` int subject ids.
        ranks: CMC ranks.
        fpirs: FPIRs in (0, 1).

    Returns:
        dict: ``rank{r}`` (TPIR at rank r), ``tpir@fpir={f}`` and ``threshold@fpir={f}`` (None when no
        probe is non-mated), ``mated``, ``non_mated`` (search counts).
    """
    gal = torch.from_numpy(np.ascontiguousarray(gallery_feats, dtype=np.float32))
    g_sub = np.asarray(gallery_subjects)
    mated = np.isin(probe_subjects, g_sub)
    rank = np.zeros(probe_feats.shape[0], dtype=np.int64)
    mate_score = np.full(probe_feats.shape[0], -np.inf)
    best = np.empty(probe_feats.shape[0], dtype=np.float64)
    for s in range(0, probe_feats.shape[0], chunk):
        q = torch.from_numpy(np.ascontiguousarray(probe_feats[s:s + chunk], dtype=np.float32))
        sim = (q @ gal.T).numpy().astype(np.float64)
        best[s:s + chunk] = sim.max(1)
        is_mate = probe_subjects[s:s + chunk, None] == g_sub[None, :]
        m = np.where(is_mate, sim, -np.inf).max(1)
        mate_score[s:s + chunk] = m
        rank[s:s + chunk] = 1 + (np.where(is_mate, -np.inf, sim) >= m[:, None]).sum(1)
    n_m, n_n = int(mated.sum()), int((~mated).sum())
    if n_m == 0:
        raise IJBError("identification: no probe subject has a template in the gallery")
    out: Dict = {"mated": n_m, "non_mated": n_n}
    for r in ranks:
        out[f"rank{r}"] = float(np.count_nonzero(mated & (rank <= r)) / n_m)
    for f in fpirs:
        if n_n == 0:
            out[f"tpir@fpir={f:g}"] = out[f"threshold@fpir={f:g}"] = None
            continue
        with warnings.catch_warnings(record=True) as caught:  # reworded below in the 1:N terms
            warnings.simplefilter("always")
            t = threshold_at_fmr(best[~mated], f)
        if caught:
            warnings.warn(f"fpirs={f:g} is below 1/{n_n} (one non-mated search of {n_n}): not measurable; the "
                          "threshold used lets no non-mated search through", UserWarning, stacklevel=2)
        out[f"threshold@fpir={f:g}"] = t
        out[f"tpir@fpir={f:g}"] = float(np.count_nonzero(mated & (rank == 1) & (mate_score > t)) / n_m)
    return out


# ----------------------------------------------------------------------------- the driver
def _roc_points(r: Dict, n: int = 400) -> Dict[str, list]:
    """The ROC thinned to at most ``n`` points, log-spaced in FPR (for the JSON)."""
    fpr, tpr = r["fpr"], r["tpr"]
    positive = fpr[fpr > 0]
    if positive.size == 0:
        return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    grid = np.geomspace(max(positive.min(), 1e-9), 1.0, n)
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1))
    return {"fpr": fpr[idx].tolist(), "tpr": tpr[idx].tolist()}


def evaluate(root: str, target: str = "IJBC", *, features: Optional[np.ndarray] = None,
             model: Optional[torch.nn.Module] = None, flip: bool = True, weight: str = "both",
             fars: Sequence[float] = FARS, fpirs: Sequence[float] = FPIRS, ranks: Sequence[int] = RANKS,
             one_to_n: bool = True, batch_size: int = 64, device=None, progress: bool = False,
             log: Callable[[str], None] = lambda s: None) -> Dict:
    """Evaluate face features (or a model) on an IJB-B/C folder; see the module docstring.

    Args:
        root, target: the folder holding ``meta/`` and ``loose_crop/``; ``"IJBB"`` or ``"IJBC"``.
        features: ``[N, D]`` per-face features in ``face_tid_mid`` order (numpy, may be memory-mapped;
            flip fusion already applied). model: a backbone (``[B, 3, H, W]`` → ``[B, D]``), used
            when ``features`` is None. flip: flip fusion when embedding with ``model``.
        weight: ``"both"`` (default), ``"detector"``, ``"magnitude"`` or ``"none"``.
        fars, fpirs, ranks: operating points. one_to_n: run the 1:N protocol (needs the CSVs).

    Returns:
        dict: ``target``, ``weight``, ``faces``, ``templates``, ``pairs``, ``verification``
        (``{"TAR@FAR=1e-06": ..., "auc": ...}``), ``roc`` (thinned ``fpr``, ``tpr`` lists),
        ``identification`` (``{gallery: identification(...), "mean": ...}``) when ``one_to_n``,
        ``seconds`` (per stage).
    """
    lay = IJBLayout(root, target)
    times = {}
    t0 = time.perf_counter()
    names, templates, medias = read_face_tid_mid(lay.face_tid_mid)
    scores = landmarks = None
    if os.path.isfile(lay.landmarks):
        lm_names, landmarks, scores = read_name_5pts_score(lay.landmarks)
        if len(lm_names) != len(names):
            raise IJBError(f"{lay.landmarks}: {len(lm_names)} lines, {lay.face_tid_mid} has {len(names)} "
                           "(line i of both describes face i)")
        bad = next((i for i, (a, b) in enumerate(zip(lm_names, names)) if a != b), None)
        if bad is not None:
            raise IJBError(f"{lay.landmarks}: line {bad + 1}: image {lm_names[bad]!r}, but line {bad + 1} of "
                           f"{lay.face_tid_mid} is {names[bad]!r} (line i of both describes face i)")
    if features is None:
        if model is None:
            raise IJBError("give features (an .npy of per-face features) or a model")
        if landmarks is None:
            raise IJBError(f"{lay.landmarks}: not found (the five points to align the faces)")
        log(f"embedding {len(names)} faces")
        features = embed_faces(lay.images, names, landmarks, model, flip, batch_size, device, progress)
    if features.ndim != 2 or features.shape[0] != len(names):
        raise IJBError(f"features: expected [{len(names)}, D] (one row per line of {lay.face_tid_mid}), "
                       f"got {tuple(features.shape)}")
    times["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    norms, w = face_weights(features, scores, weight)
    uniq_t, tfeat = template_features(features, templates, medias, w, norms)
    times["pooling"] = time.perf_counter() - t0
    log(f"{len(names)} faces pooled into {uniq_t.size} templates ({weight} weighting)")

    t0 = time.perf_counter()
    t1, t2, label = read_template_pairs(lay.pairs)
    s = pair_scores(tfeat, uniq_t, t1, t2, what=lay.pairs)
    times["pair_scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    verification = {f"TAR@FAR={f:g}": v for f, v in tar_at_far(s, label.astype(bool), list(fars)).items()}
    r = roc(s, label.astype(bool))
    verification["auc"] = r["auc"]
    times["verification"] = time.perf_counter() - t0
    result = {"target": lay.target, "weight": weight, "faces": len(names), "templates": int(uniq_t.size),
              "pairs": int(t1.size), "genuine": int(label.sum()), "verification": verification,
              "roc": _roc_points(r)}
    del r
    if one_to_n:
        t0 = time.perf_counter()
        pt, ps = read_template_subjects(lay.probes)
        pfeat = tfeat[_rows_of(pt, uniq_t, lay.probes)]
        ident = {}
        for name, path in lay.galleries.items():
            gt, gs = read_template_subjects(path)
            ident[name] = identification(pfeat, ps, tfeat[_rows_of(gt, uniq_t, path)], gs, ranks, fpirs)
        keys = [k for k in next(iter(ident.values())) if k.startswith(("rank", "tpir"))]
        ident["mean"] = {k: (None if any(g[k] is None for g in ident.values()) else
                             float(np.mean([g[k] for g in ident.values()]))) for k in keys}
        result["identification"] = ident
        times["identification"] = time.perf_counter() - t0
    result["seconds"] = times
    return result


def format_table(result: Dict) -> str:
    """The 1:1 and 1:N figures of :func:`evaluate` as a text table (percent)."""
    v = result["verification"]
    heads = [k for k in v if k.startswith("TAR")]
    lines = [f"{result['target']} 1:1 verification ({result['templates']} templates, {result['pairs']} pairs, "
             f"weight={result['weight']})",
             "  " + " | ".join(h.replace("TAR@FAR=", "FAR ") for h in heads),
             "  " + " | ".join(f"{100 * v[h]:.2f}".rjust(len(h.replace('TAR@FAR=', 'FAR '))) for h in heads)]
    if "identification" in result:
        ident = result["identification"]
        cols = [k for k in ident["mean"]]
        lines.append(f"{result['target']} 1:N identification (mixed probes; TPIR, %)")
        lines.append("  gallery | " + " | ".join(cols))
        for g, row in ident.items():
            lines.append(f"  {g:7s} | " + " | ".join(("-" if row[c] is None else f"{100 * row[c]:.2f}").rjust(len(c))
                                                    for c in cols))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m magloss.ijb``: prints the table, writes the JSON (``--out``);
    exit status 2 with a one-line error on bad input."""
    p = argparse.ArgumentParser(prog="python -m magloss.ijb", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="IJB-B / IJB-C 1:1 verification and 1:N identification of a magloss model "
                                            "or of per-face features, on insightface's meta files.")
    p.add_argument("root", help="folder holding meta/ and loose_crop/ (e.g. IJB_release/IJBC)")
    p.add_argument("--target", default="IJBC", choices=("IJBB", "IJBC"), type=str.upper)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="OUTPUT/model.pt of python -m magloss.train")
    src.add_argument("--features", help=".npy of per-face features [N, D] in face_tid_mid order")
    p.add_argument("--weight", choices=WEIGHTS, default="both", help="pooling weight of each face")
    p.add_argument("--no-flip", action="store_true", help="no flip fusion when embedding with --model")
    p.add_argument("--no-1n", action="store_true", help="1:1 only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="torch device for --model (default: cpu)")
    p.add_argument("--save-features", help="write the computed per-face features to this .npy")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    try:
        feats = model = None
        if a.features:
            if not os.path.isfile(a.features):
                raise IJBError(f"--features: {a.features!r} not found")
            try:
                feats = np.load(a.features, mmap_mode="r")
            except ValueError as exc:
                raise IJBError(f"--features: {a.features!r} is not an .npy array: {exc}") from None
        else:
            from .export import ExportError, load_backbone
            try:
                model = load_backbone(a.model, "--model")
            except ExportError as exc:
                raise IJBError(str(exc)) from None
            if a.device:
                model = model.to(a.device)
            feats = None
        say = lambda s: print(s, file=sys.stderr)  # noqa: E731
        if model is not None and a.save_features:
            lay = IJBLayout(a.root, a.target)
            names, _, _ = read_face_tid_mid(lay.face_tid_mid)
            _, lms, _ = read_name_5pts_score(lay.landmarks)
            feats = embed_faces(lay.images, names, lms, model, not a.no_flip, a.batch_size, a.device, True)
            np.save(a.save_features, feats)
        result = evaluate(a.root, a.target, features=feats, model=model, flip=not a.no_flip, weight=a.weight,
                          one_to_n=not a.no_1n, batch_size=a.batch_size, device=a.device, progress=True, log=say)
    except IJBError as exc:
        p.error(str(exc))
    print(format_table(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
