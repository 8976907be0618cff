"""Data for the demo (:mod:`magloss.demo`): built-in digits, image folders, class splits
and graded degradations. Private module: the names here may change.

Images are float32 tensors ``[N, C, H, W]`` in ``[0, 1]``; labels are int64 ``[N]``.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
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
