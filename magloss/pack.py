"""Pack your own photos into insightface's training layout, and build ``.bin`` pair sets.

``python -m magloss.pack IMAGES OUT`` writes ``OUT/train.rec``, ``OUT/train.idx`` and
``OUT/property`` from either

* an image folder, one sub-folder per identity (listed exactly as
  :class:`magloss.data.ImageFolderDataset` lists it: identity folders sorted by name get
  labels ``0 .. K-1``, images found recursively in sorted path order), or
* a list file: one line ``path label`` per image (tab or spaces; the path may hold spaces), paths relative to the
  list file's folder, labels integers ``0 .. K-1`` (every label used at least once).

``python -m magloss.pack --pairs pairs.txt IMAGES OUT.bin`` builds a verification ``.bin``
(:func:`build_bin`) from an LFW-style ``pairs.txt``.

Layout written (what insightface's ``face2rec2.py`` writes through MXNet's
``MXIndexedRecordIO``; read back by :class:`magloss.data.RecordIODataset`, MXNet's
``recordio.unpack`` and insightface's ``MXFaceDataset``):

* images sorted by label (stable: a list file's order within a label) get keys
  ``1 .. N``; record ``k``: IRHeader ``(flag=0, label=float(label), id=k, id2=0)`` then
  the image bytes;
* then the header record, key 0: ``flag=2``, label ``[N+1, N+1+K]``, no image;
* then one record per identity, keys ``N+1 .. N+K``: ``flag=2``, label ``[first, end)``
  of its image keys, no image;
* ``train.idx``: ``key<TAB>offset`` in that write order; ``property``:
  ``K,height,width``.

The RecordIO framing is dmlc-core's (see :mod:`magloss.data`): magic ``0xced7230a``,
length word ``cflag << 29 | length``, payload zero-padded to 4 bytes, and a payload
split wherever the magic word sits at a 4-byte-aligned offset.

Images are stored as their original file bytes (JPEG, PNG, ...) unless a resize or an
alignment is asked for; then they are re-encoded (JPEG quality 95 by default, or PNG).
Every image is decoded once to check it (and to read its size): an unreadable image is
an error naming it, or with ``skip_bad`` it is left out and listed. Output is
deterministic: the same input gives the same bytes, whatever the number of workers.

Alignment (``landmarks`` file): a similarity transform (rotation, uniform scale,
translation; Umeyama's least-squares estimate, :func:`similarity_transform`) maps the
five landmarks onto the ArcFace reference points :data:`ARCFACE_LANDMARKS` of a
112×112 crop, and the image is warped bilinearly (Pillow), outside pixels black.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import pickle
import struct
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .data import RECORDIO_MAGIC, ImageFolderDataset, _pil_image

__all__ = [
    "ARCFACE_LANDMARKS",
    "similarity_transform",
    "align_face",
    "RecordWriter",
    "pack_record",
    "list_images",
    "read_landmarks",
    "pack",
    "read_lfw_pairs",
    "build_bin",
    "main",
]

#: ArcFace's five reference points (left eye, right eye, nose tip, left and right mouth
#: corner; x, y in pixels) of a 112×112 aligned face.
ARCFACE_LANDMARKS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

_MAGIC = struct.pack("<I", RECORDIO_MAGIC)
_MAX_LENGTH = (1 << 29) - 1
_IRHEADER = struct.Struct("<IfQQ")


class PackError(Exception):
    """Bad input to the pack command (the message names the file and what was expected)."""


# ----------------------------------------------------------------------------- alignment
def similarity_transform(src, dst) -> np.ndarray:
    """Least-squares similarity transform taking points ``src`` onto ``dst`` (Umeyama 1991).

    Finds scale ``s``, rotation ``R`` (det +1) and translation ``t`` minimizing
    ``sum_i ||dst_i - (s R src_i + t)||²``.

    Args:
        src, dst: ``[n, 2]`` float arrays (pixels, ``x, y``), ``n >= 2``, ``src`` not all one point.

    Returns:
        ``[2, 3]`` float64 matrix ``M = [s R | t]``: ``dst ≈ M @ [x, y, 1]``.

    Raises:
        ValueError: shapes differ or are not ``[n, 2]``, non-finite values, degenerate ``src``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"landmarks: expected two [n, 2] point sets of one shape (n >= 2), got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks: non-finite coordinates")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs ** 2).sum() / src.shape[0]
    if var_s <= 1e-12:
        raise ValueError("landmarks: the points coincide (no transform is defined)")
    cov = xd.T @ xs / src.shape[0]
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (d * sign).sum() / var_s
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image, landmarks, size: int = 112):
    """Warp a face so its five landmarks land on :data:`ARCFACE_LANDMARKS`.

    Args:
        image: a Pillow image (any mode; converted to RGB).
        landmarks: ``[5, 2]`` (or 10 values ``x1 y1 ... x5 y5``), pixels of ``image``.
        size: side of the square output (default 112; the reference points scale by ``size / 112``).

    Returns:
        Pillow RGB image ``size × size``: bilinear warp by :func:`similarity_transform`,
        pixels mapped from outside the source black.
    """
    Image = _pil_image()
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    m = similarity_transform(lm, ARCFACE_LANDMARKS * (size / 112.0))
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]  # Pillow maps output pixels to input
    # Pillow samples input point A(x + 0.5) + c and then subtracts 0.5 (pixel centres); the
    # transform is in pixel-index coordinates (as the landmarks and reference points are):
    # c = t - A·(0.5, 0.5) + 0.5 makes the sample point A·x + t.
    coeffs = (inv[0, 0], inv[0, 1], inv[0, 2] - 0.5 * (inv[0, 0] + inv[0, 1]) + 0.5,
              inv[1, 0], inv[1, 1], inv[1, 2] - 0.5 * (inv[1, 0] + inv[1, 1]) + 0.5)
    return image.convert("RGB").transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0))


# ------------------------------------------------------------------------------ RecordIO
def pack_record(label, image: bytes = b"", key: int = 0) -> bytes:
    """One image record payload: IRHeader ``'<IfQQ'`` then the image bytes.

    A number ``label`` is stored in the header (``flag = 0``); a sequence of ``n``
    numbers sets ``flag = n`` and follows the header as float32 (header label 0), as
    MXNet's ``recordio.pack`` does. ``id = key``, ``id2 = 0``.
    """
    if isinstance(label, (list, tuple, np.ndarray)):
        values = np.asarray(label, dtype="<f4").ravel()
        return _IRHEADER.pack(values.size, 0.0, key, 0) + values.tobytes() + image
    return _IRHEADER.pack(0, float(label), key, 0) + image


class RecordWriter:
    """Writes ``.rec`` + ``.idx`` (dmlc RecordIO framing, ``key<TAB>offset`` index lines).

    ``write(key, payload)`` appends one record; a payload holding the magic word at a
    4-byte-aligned offset is split there into continuation parts (cflag 1, 2.., 3), as
    dmlc-core's writer does. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, rec_path: str, idx_path: str) -> None:
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w")
        self._pos = 0

    def write(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{int(key)}\t{self._pos}\n")
        parts, start = [], 0
        view = np.frombuffer(payload[: len(payload) // 4 * 4], dtype="<u4")
        for i in np.flatnonzero(view == RECORDIO_MAGIC):
            parts.append(payload[start:4 * i])
            start = 4 * i + 4
        parts.append(payload[start:])
        for j, part in enumerate(parts):
            if len(part) > _MAX_LENGTH:
                raise ValueError(f"record {key}: a part of {len(part)} bytes exceeds RecordIO's 2^29 - 1")
            cflag = 0 if len(parts) == 1 else 1 if j == 0 else 3 if j == len(parts) - 1 else 2
            pad = -len(part) % 4
            self._rec.write(_MAGIC + struct.pack("<I", cflag << 29 | len(part)) + part + b"\0" * pad)
            self._pos += 8 + len(part) + pad

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -------------------------------------------------------------------------------- inputs
def _entries(path: str, fields: int):
    """``(line number, line, parts)`` of each entry of a text file (empty lines and lines starting
    with ``#`` skipped): ``parts`` are the last ``fields`` whitespace-separated fields and, first,
    the rest (a path may hold spaces)."""
    with open(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                yield lineno, line, line.strip().rsplit(None, fields)


def list_images(source: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``([(path, label), ...], names)`` of an image folder or a list file.

    Folder: :class:`magloss.data.ImageFolderDataset`'s listing, ``names[k]`` the folder of
    label ``k``. List file: lines ``path label`` (tab or spaces; empty lines and lines
    starting with ``#`` ignored), relative paths joined to the list file's folder,
    ``names[k] = str(k)``.

    Raises:
        PackError: a missing source, a malformed line (file and line number), labels that
        are not the integers ``0 .. K-1`` each used (the first missing one named).
    """
    if os.path.isdir(source):
        try:
            ds = ImageFolderDataset(source)
        except FileNotFoundError as exc:
            raise PackError(f"IMAGES: {exc}") from None
        return list(ds.samples), list(ds.classes)
    if not os.path.isfile(source):
        raise PackError(f"IMAGES: {source!r} is neither a folder nor a list file")
    base = os.path.dirname(os.path.abspath(source))
    samples = []
    for lineno, line, parts in _entries(source, 1):
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
            if label < 0:
                raise ValueError
        except ValueError:
            raise PackError(f"{source}: line {lineno}: expected 'path<TAB>label' with an integer label >= 0, "
                            f"got {line.rstrip()!r}") from None
        samples.append((os.path.join(base, parts[0].strip()), label))
    if not samples:
        raise PackError(f"{source}: the list holds no image (expected lines 'path<TAB>label')")
    k = max(lab for _, lab in samples) + 1
    used = np.zeros(k, dtype=bool)
    used[[lab for _, lab in samples]] = True
    if not used.all():
        raise PackError(f"{source}: labels must be 0 .. {k - 1} with each used; label {int(np.argmin(used))} has no image")
    return samples, [str(i) for i in range(k)]


def read_landmarks(path: str, base: str) -> Dict[str, np.ndarray]:
    """Five-point landmarks file: lines ``path x1 y1 x2 y2 ... x5 y5`` (tabs or spaces; the
    path may hold spaces).

    Relative paths are joined to ``base`` (the image folder, or the list file's folder).
    Returns ``{absolute path: [5, 2] float64}``. Raises PackError naming the line of a
    malformed entry.
    """
    out = {}
    for lineno, line, parts in _entries(path, 10):
        try:
            if len(parts) != 11:
                raise ValueError
            pts = np.array([float(v) for v in parts[1:]], dtype=np.float64).reshape(5, 2)
            if not np.isfinite(pts).all():
                raise ValueError
        except ValueError:
            raise PackError(f"{path}: line {lineno}: expected 'path x1 y1 ... x5 y5' (11 fields, finite numbers), "
                            f"got {line.rstrip()!r}") from None
        out[os.path.abspath(os.path.join(base, parts[0].strip()))] = pts
    return out


# -------------------------------------------------------------------------------- encode
def _encode(image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _prepare(job) -> Tuple[Optional[bytes], Optional[Tuple[int, int]], Optional[str]]:
    """Worker: ``(image bytes, (height, width), None)`` or ``(None, None, error text)``."""
    path, landmarks, resize, fmt, quality = job
    Image = _pil_image()
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if landmarks is not None:
                im = align_face(im, landmarks, 112 if resize is None else resize[0])
                return _encode(im, fmt, quality), (im.height, im.width), None
            if resize is not None:
                if (im.height, im.width) != tuple(resize):
                    im = im.convert("RGB").resize((resize[1], resize[0]), Image.BILINEAR)
                else:
                    im = im.convert("RGB")
                return _encode(im, fmt, quality), tuple(resize), None
            return data, (im.height, im.width), None
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        return None, None, f"{path}: cannot read the image: {exc}"


def _run_jobs(jobs: Sequence[tuple], workers: int, progress: bool, desc: str) -> Iterable[tuple]:
    """Results of :func:`_prepare` in job order (``workers`` processes when > 1)."""
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(jobs), desc=desc, unit="img", file=sys.stderr)
        except ImportError:
            bar = None
    try:
        if workers > 1 and len(jobs) > 1:
            ctx = multiprocessing.get_context("spawn" if sys.platform == "win32" else "fork")
            with ctx.Pool(workers) as pool:
                for r in pool.imap(_prepare, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers)))):
                    if bar is not None:
                        bar.update(1)
                    yield r
        else:
            for j in jobs:
                r = _prepare(j)
                if bar is not None:
                    bar.update(1)
                yield r
    finally:
        if bar is not None:
            bar.close()


def _check_size(resize) -> Optional[Tuple[int, int]]:
    if resize is None:
        return None
    if isinstance(resize, int):
        resize = (resize, resize)
    resize = tuple(int(v) for v in resize)
    if len(resize) != 2 or min(resize) < 1:
        raise PackError(f"resize: expected a size H or (H, W) of positive integers, got {resize}")
    return resize


def _options(workers, fmt, quality, landmarks=None, resize=None):
    if landmarks is not None and resize is not None and resize[0] != resize[1]:
        raise PackError(f"resize: alignment (landmarks) makes square faces; got {resize[0]}x{resize[1]}")
    if int(workers) < 1:
        raise PackError(f"workers: expected a positive integer, got {workers}")
    if fmt not in ("jpg", "png"):
        raise PackError(f"encoding: expected 'jpg' or 'png', got {fmt!r}")
    if not 1 <= int(quality) <= 100:
        raise PackError(f"quality: expected a JPEG quality in 1 .. 100, got {quality}")


def _jobs(paths, landmarks_file, base, resize, fmt, quality):
    lms = read_landmarks(landmarks_file, base) if landmarks_file else None
    jobs = []
    for p in paths:
        lm = None
        if lms is not None:
            lm = lms.get(os.path.abspath(p))
        jobs.append((p, lm, resize, fmt, quality))
    return jobs, lms


def _collect(jobs, lms, skip_bad, workers, progress, desc):
    """Run the jobs; ``(results, skipped)`` where bad images raise or are skipped."""
    results: List[Optional[tuple]] = []
    skipped: List[str] = []
    for job, (data, size, err) in zip(jobs, _run_jobs(jobs, workers, progress, desc)):
        if err is None and lms is not None and job[1] is None:
            err = f"{job[0]}: no landmarks for this image in the landmarks file"
        if err is not None:
            if not skip_bad:
                raise PackError(err + " (pass --skip-bad to leave such images out)")
            skipped.append(err)
            results.append(None)
        else:
            results.append((data, size))
    return results, skipped


def pack(source: str, out: str, *, landmarks: Optional[str] = None, resize=None, encoding: str = "jpg",
         quality: int = 95, workers: int = 1, skip_bad: bool = False, progress: bool = False) -> Dict:
    """Pack an image folder or list file into ``out/train.rec``, ``train.idx``, ``property``.

    Args:
        source: an image folder (one sub-folder per identity) or a list file (see
            :func:`list_images`).
        out: output folder (created). The three files are written under temporary names
            and renamed at the end: a failure leaves no partial output.
        landmarks: a five-point landmarks file (:func:`read_landmarks`); each image is then
            aligned (:func:`align_face`) to 112×112 (or a square ``resize``) and re-encoded.
        resize: ``H`` or ``(H, W)``: re-encode every image at that size (bilinear). Default
            None: images keep their original bytes.
        encoding: ``"jpg"`` (default) or ``"png"``, for re-encoded images. quality: JPEG quality
            (default 95).
        workers: processes that read and check the images (default 1). progress: a tqdm bar.
        skip_bad: leave unreadable images (and images without landmarks) out instead of failing.

    Returns:
        dict: ``images`` (N packed), ``classes`` (K), ``size`` ((H, W) written to property),
        ``skipped`` (list of ``"path: reason"``), ``mixed_sizes`` (a path whose size differs
        from the first image's, or None).

    Raises:
        PackError: bad source, list or landmarks file, an unreadable image (named) without
        ``skip_bad``, an identity left with no image, no image at all.
    """
    resize = _check_size(resize)
    _options(workers, encoding, quality, landmarks, resize)
    samples, names = list_images(source)
    order = sorted(range(len(samples)), key=lambda i: samples[i][1])  # stable: by label
    samples = [samples[i] for i in order]
    base = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    jobs, lms = _jobs([p for p, _ in samples], landmarks, base, resize, encoding, quality)
    results, skipped = _collect(jobs, lms, skip_bad, workers, progress, "pack")

    kept = [(s, r) for s, r in zip(samples, results) if r is not None]
    if not kept:
        raise PackError(f"IMAGES: {source!r}: no readable image to pack")
    present = {lab for (_, lab), _ in kept}
    empty = [names[k] for k in range(len(names)) if k not in present]
    if empty:
        raise PackError(f"IMAGES: identity {empty[0]!r} has no readable image left (labels must stay 0 .. "
                        f"{len(names) - 1}); remove it from the input")
    size = kept[0][1][1]
    mixed = next((p for (p, _), r in kept if r[1] != size), None)

    os.makedirs(out, exist_ok=True)
    final = [os.path.join(out, n) for n in ("train.rec", "train.idx", "property")]
    tmp = []
    try:
        for p in final:
            fd, t = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", dir=out)
            os.close(fd)
            tmp.append(t)
        n, k = len(kept), len(names)
        with RecordWriter(tmp[0], tmp[1]) as w:
            bounds = []
            for key, ((_, lab), (data, _)) in enumerate(kept, 1):
                if not bounds or bounds[-1][0] != lab:
                    bounds.append([lab, key, key + 1])
                bounds[-1][2] = key + 1
                w.write(key, pack_record(float(lab), data, key))
            w.write(0, pack_record([float(n + 1), float(n + 1 + k)], b"", 0))
            for j, (_, first, end) in enumerate(bounds):
                w.write(n + 1 + j, pack_record([float(first), float(end)], b"", n + 1 + j))
        with open(tmp[2], "w") as f:
            f.write(f"{k},{size[0]},{size[1]}")
        for t, p in zip(tmp, final):
            os.replace(t, p)
    finally:
        for t in tmp:
            if os.path.exists(t):
                os.remove(t)
    return {"images": n, "classes": k, "size": tuple(size), "skipped": skipped, "mixed_sizes": mixed}


# ------------------------------------------------------------------------------- .bin sets
def read_lfw_pairs(pairs_txt: str, root: str, ext: str = "jpg") -> Tuple[List[Tuple[str, str]], List[bool]]:
    """Pairs of an LFW-style ``pairs.txt``.

    Lines: ``name n1 n2`` (a genuine pair: ``root/name/name_000n1.ext`` and ``..._000n2``) or
    ``name1 n1 name2 n2`` (an impostor pair); tabs or spaces. A first line of one or two
    integers (LFW's ``10 300``: folds and pairs per fold) is skipped. Numbers are written
    with four digits, as LFW names its files.

    Returns ``([(path_a, path_b), ...], [issame, ...])``. Raises PackError naming the line.
    """
    pairs, same = [], []
    with open(pairs_txt, "r") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if lineno == 1 and len(parts) <= 2 and all(p.isdigit() for p in parts):
            continue
        try:
            if len(parts) == 3:
                a = (parts[0], int(parts[1]))
                b = (parts[0], int(parts[2]))
            elif len(parts) == 4:
                a = (parts[0], int(parts[1]))
                b = (parts[2], int(parts[3]))
            else:
                raise ValueError
        except ValueError:
            raise PackError(f"{pairs_txt}: line {lineno}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                            f"got {line.rstrip()!r}") from None
        pairs.append(tuple(os.path.join(root, nm, f"{nm}_{i:04d}.{ext}") for nm, i in (a, b)))
        same.append(len(parts) == 3)
    if not pairs:
        raise PackError(f"{pairs_txt}: no pair found")
    return pairs, same


def build_bin(pairs_txt: str, root: str, out: str, *, ext: str = "jpg", landmarks: Optional[str] = None,
              resize=None, encoding: str = "jpg", quality: int = 95, workers: int = 1, progress: bool = False) -> Dict:
    """Write a verification ``.bin``: the pickle ``(images, issame)`` insightface's sets hold.

    ``images`` is the list of ``2·P`` encoded images (pair ``k``: images ``2k``, ``2k+1``),
    ``issame`` the ``P`` booleans; pickled at protocol 4 (read back by
    :class:`magloss.data.VerificationBin` and by insightface's ``load_bin``). Images are
    prepared as by :func:`pack` (original bytes, or aligned / resized and re-encoded).
    Every image must read (a ``.bin`` cannot drop half a pair): an unreadable one is a
    PackError naming it. The file is written under a temporary name and renamed.
    """
    resize = _check_size(resize)
    _options(workers, encoding, quality, landmarks, resize)
    pairs, same = read_lfw_pairs(pairs_txt, root, ext)
    paths = [p for ab in pairs for p in ab]
    jobs, lms = _jobs(paths, landmarks, root, resize, encoding, quality)
    results, _ = _collect(jobs, lms, False, workers, progress, "bin")
    images = [data for data, _ in results]
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", dir=folder)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            pickle.dump((images, same), f, protocol=4)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"pairs": len(same), "genuine": int(sum(same))}


# ----------------------------------------------------------------------------------- CLI
def _size_arg(text: str) -> Tuple[int, int]:
    try:
        v = tuple(int(x) for x in text.replace("x", ",").split(","))
        if len(v) == 1:
            v = v * 2
        if len(v) != 2 or min(v) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive integers), got {text!r}") from None
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m magloss.pack",
        description="Pack an image folder (one sub-folder per identity) or a list file ('path<TAB>label' lines) "
                    "into insightface's train.rec / train.idx / property; with --pairs, build a verification .bin "
                    "from an LFW-style pairs.txt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", help="image folder or list file (with --pairs: the folder of <name>/<name>_NNNN.<ext>)")
    p.add_argument("out", help="output folder (with --pairs: the .bin file)")
    p.add_argument("--pairs", help="LFW-style pairs.txt: build a .bin instead of a RecordIO set")
    p.add_argument("--ext", default="jpg", help="image extension for --pairs")
    p.add_argument("--landmarks", help="five-point landmarks file ('path x1 y1 ... x5 y5'): align to 112x112")
    p.add_argument("--resize", type=_size_arg, help="re-encode every image at H or H,W")
    p.add_argument("--encoding", choices=("jpg", "png"), default="jpg", help="format of re-encoded images")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="worker processes")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (listed) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m magloss.pack``; exits with status 2 and
    ``python -m magloss.pack: error: ...`` on bad input."""
    parser = build_parser()
    a = parser.parse_args(argv)
    kw = dict(landmarks=a.landmarks, resize=a.resize, encoding=a.encoding, quality=a.quality,
              workers=a.workers, progress=not a.no_progress)
    try:
        if a.pairs:
            r = build_bin(a.pairs, a.images, a.out, ext=a.ext, **kw)
            print(f"wrote {a.out}: {r['pairs']} pairs ({r['genuine']} genuine)")
            return 0
        r = pack(a.images, a.out, skip_bad=a.skip_bad, **kw)
    except (PackError, OSError, ValueError) as exc:
        parser.error(str(exc))
    for s in r["skipped"]:
        print(f"skipped {s}", file=sys.stderr)
    print(f"wrote {a.out}: {r['images']} images, {r['classes']} identities, {r['size'][0]}x{r['size'][1]}"
          + (f", {len(r['skipped'])} skipped" if r["skipped"] else ""))
    if r["mixed_sizes"]:
        print(f"warning: {r['mixed_sizes']} differs in size from the first image; property says "
              f"{r['size'][0]}x{r['size'][1]} (pass --resize to make them one size)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
