"""The demo's model: a small CNN whose last BatchNorm sets the feature magnitude freely, its
embeddings, and the loss head, any loss of :mod:`magloss.registry` by name."""

from __future__ import annotations

import inspect
import math
from typing import Dict, Optional

import torch
import torch.nn as nn

from magloss import registry


class SmallCNN(nn.Module):
    """A small backbone for ``[N, C, S, S]`` images, ``S`` divisible by 4.

    Two conv stages (each 2 × (3×3 conv, BN, PReLU), then 2×2 max-pool), then
    ``BN2d → dropout → flatten → Linear → BatchNorm1d``: the last BatchNorm (with a
    learnable scale) lets the network put the feature magnitude anywhere, as MagFace's
    iresnet ``features`` layer. Output: ``[N, embedding_size]`` float, NOT normalized.
    """

    def __init__(self, in_channels: int, image_size: int, embedding_size: int = 128, width: int = 32,
                 dropout: float = 0.0, init_magnitude: Optional[float] = None):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"--image-size must be divisible by 4, got {image_size}")

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]

        w = width
        self.body = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            nn.BatchNorm2d(2 * w), nn.Dropout(dropout), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * w * (image_size // 4) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        if init_magnitude is not None:
            # BN output has unit variance per dimension, so ||x|| starts near gamma * sqrt(D)
            nn.init.constant_(self.features.weight, float(init_magnitude) / math.sqrt(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.body(x)))


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Embeddings ``[N, D]`` (float32, CPU) of ``images`` in eval mode."""
    model.eval()
    out = [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


#: The demo's loss options: option (argparse dest) -> (constructor argument, the losses it goes to;
#: None: every chosen loss whose constructor takes that argument). A loss's other arguments keep
#: the loss's own defaults.
LOSS_OPTIONS = {
    "scale": ("scale", None),
    "l_a": ("l_a", ("magface",)),
    "u_a": ("u_a", ("magface",)),
    "l_m": ("l_m", ("magface",)),
    "u_m": ("u_m", ("magface",)),
    "lambda_g": ("lambda_g", ("magface",)),
    "arcface_margin": ("margin", ("arcface",)),
}


def loss_kwargs(name: str, args) -> Dict[str, object]:
    """The constructor arguments the demo gives the registered loss ``name`` (after
    ``embedding_size`` and ``num_classes``): ``--scale`` to every loss that takes a scale,
    ``--l-a/--u-a/--l-m/--u-m/--lambda-g`` to magface, ``--arcface-margin`` (radians) to arcface.

    Raises:
        ValueError: ``name`` is not in :data:`magloss.registry.LOSSES`.
    """
    params = inspect.signature(registry.loss_class(name).__init__).parameters
    return {arg: getattr(args, dest) for dest, (arg, losses) in LOSS_OPTIONS.items()
            if arg in params and (losses is None or name in losses)}


def make_loss(name: str, args, embedding_size: int, num_classes: int) -> nn.Module:
    """The loss head ``name`` (a :data:`magloss.registry.LOSSES` key) for ``[N, embedding_size]``
    embeddings and ``num_classes`` classes, with :func:`loss_kwargs`; the loss's own checks
    raise ``ValueError``/``TypeError`` in its words."""
    return registry.loss_class(name)(embedding_size, num_classes, **loss_kwargs(name, args))
