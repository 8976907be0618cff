"""Face-recognition backbones: a compact iresnet ("improved ResNet", the ArcFace paper's
network), written here from the architecture's description.

Layout of :class:`IResNet` for an input ``[B, 3, H, W]`` (``H`` and ``W`` multiples of 16):

* stem: 3×3 conv (stride 1) to ``widths[0]`` channels, BatchNorm, PReLU;
* four stages; stage ``k`` has ``depths[k]`` IR blocks of ``widths[k]`` channels and its
  first block halves the resolution (stride 2), so the map leaving the body is
  ``[B, widths[3], H/16, W/16]`` (7×7 for the usual 112×112 faces);
* IR block: ``BN → conv3×3 → BN → PReLU → conv3×3 (stride s) → BN``, plus the shortcut
  (identity, or ``conv1×1 (stride s) → BN`` when the shape changes), no activation after
  the sum;
* output ("option E" of the ArcFace paper): ``BN2d → dropout → flatten → FC →
  BatchNorm1d`` to the embedding ``[B, embedding_size]``. The last BatchNorm's scale is
  fixed at 1 (not trained), as in insightface's iresnet: the embedding is *not*
  normalized, its magnitude is what MagFace reads.

Sources: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition"
(CVPR 2019), the "improved residual unit" (IR block) and output layer E; stage depths as
insightface's ``arcface_torch/backbones/iresnet.py`` (r18 … r200).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["IResNet", "ARCHITECTURES", "build_backbone"]

#: name -> (blocks per stage, channels per stage). r18 … r200 as insightface; "tiny" for tests
#: and smoke runs (about 30k parameters at 16×16 input, D = 64).
ARCHITECTURES: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "tiny": ((1, 1, 1, 1), (8, 16, 16, 32)),
    "r18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "r34": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "r50": ((3, 4, 14, 3), (64, 128, 256, 512)),
    "r100": ((3, 13, 30, 3), (64, 128, 256, 512)),
    "r200": ((6, 26, 60, 6), (64, 128, 256, 512)),
}

_BN_EPS = 1e-5


class IRBlock(nn.Module):
    """``BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN`` + shortcut; ``[B, C_in, h, w]`` →
    ``[B, C_out, h/stride, w/stride]``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in, eps=_BN_EPS),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out, eps=_BN_EPS),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out, eps=_BN_EPS),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out, eps=_BN_EPS))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """iresnet backbone (see the module docstring for the layout and sources).

    Args:
        depths: IR blocks per stage (4 ints ≥ 1). widths: channels per stage (4 ints ≥ 1).
        embedding_size: D, the width of the output embedding (default 512).
        input_size: ``(H, W)`` of the input images, both multiples of 16 (default
            ``(112, 112)``); fixes the FC layer's input ``widths[3]·H/16·W/16``.
        dropout: dropout probability before the FC layer (default 0, as insightface).

    forward(x ``[B, 3, H, W]`` float, normalized to about ``[-1, 1]``) → ``[B, D]``, the
    dtype of the FC layer (float32 under autocast too: the FC layer and the last
    BatchNorm run in float32, as insightface's, so the magnitudes keep their precision).

    Raises:
        ValueError: a bad depth/width list, or an input size not a multiple of 16
        (at construction); an input of another size (at forward, naming both sizes).
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], embedding_size: int = 512,
                 input_size: Tuple[int, int] = (112, 112), dropout: float = 0.0) -> None:
        super().__init__()
        depths, widths = tuple(int(d) for d in depths), tuple(int(w) for w in widths)
        if len(depths) != 4 or len(widths) != 4 or min(depths + widths) < 1:
            raise ValueError(f"depths, widths: expected 4 positive ints each, got {depths}, {widths}")
        h, w = (int(v) for v in input_size)
        if h < 16 or w < 16 or h % 16 or w % 16:
            raise ValueError(f"input_size: expected height and width that are multiples of 16 (4 stride-2 "
                             f"stages), got {h}x{w}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.input_size = (h, w)
        self.embedding_size = int(embedding_size)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0], eps=_BN_EPS), nn.PReLU(widths[0]))
        stages, c_in = [], widths[0]
        for n, c in zip(depths, widths):
            blocks = [IRBlock(c_in, c, 2)] + [IRBlock(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c_in, eps=_BN_EPS)
        self.dropout = nn.Dropout(float(dropout))
        self.fc = nn.Linear(c_in * (h // 16) * (w // 16), self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=_BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, *self.input_size):
            raise ValueError(f"x: expected [B, 3, {self.input_size[0]}, {self.input_size[1]}] images "
                             f"(the backbone's input_size), got {tuple(x.shape)}")
        x = self.bn(self.stages(self.stem(x)))
        x = self.dropout(torch.flatten(x, 1))
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


def build_backbone(name: str, embedding_size: int = 512, input_size: Tuple[int, int] = (112, 112),
                   dropout: float = 0.0) -> IResNet:
    """The :class:`IResNet` called ``name`` (a key of :data:`ARCHITECTURES`: tiny, r18, r34,
    r50, r100, r200). Raises ValueError for an unknown name, listing the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"network: unknown backbone {name!r}; known: {', '.join(ARCHITECTURES)}")
    depths, widths = ARCHITECTURES[name]
    return IResNet(depths, widths, embedding_size, input_size, dropout)
