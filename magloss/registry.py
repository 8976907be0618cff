"""The one list of magloss's losses: name → module class, and each class's sharded twin.

Everything that offers "any loss by name" reads this table: the training command
(``python -m magloss.train --loss NAME``), the demo, the examples and the tests that iterate
over every loss. A new loss is one entry here (plus its margin function and its docs).

Names are lower-case, as the training command's ``--loss`` takes them. Each entry is the
single-process :class:`torch.nn.Module`; :func:`sharded` gives its class-sharded twin from
:mod:`magloss.distributed` (``None`` for :class:`magloss.SoftmaxLoss`, which has none).
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from . import losses

__all__ = ["LOSSES", "loss_class", "sharded"]

LOSSES: Dict[str, type] = {
    "softmax": losses.SoftmaxLoss,
    "normface": losses.NormFaceLoss,
    "cosface": losses.CosFaceLoss,
    "arcface": losses.ArcFaceLoss,
    "combined": losses.CombinedMarginLoss,
    "sphereface": losses.SphereFaceLoss,
    "magface": losses.MagFaceLoss,
    "magcosface": losses.MagCosFaceLoss,
    "adaface": losses.AdaFaceLoss,
    "curricularface": losses.CurricularFaceLoss,
    "subcenter_arcface": losses.SubCenterArcFaceLoss,
    "elastic_arcface": losses.ElasticArcFaceLoss,
    "elastic_cosface": losses.ElasticCosFaceLoss,
    "sface": losses.SFaceLoss,
    "uniface": losses.UniFaceLoss,
    "sphereface2": losses.SphereFace2Loss,
    "p2sgrad": losses.P2SGradLoss,
}


def loss_class(name: str) -> type:
    """The module class registered as ``name``; ``ValueError`` naming the known losses otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}") from None


def sharded(name_or_class) -> Optional[type]:
    """The class-sharded twin (:mod:`magloss.distributed`) of a registered loss, given its name
    or its single-process class; ``None`` where there is none (``softmax``)."""
    from .distributed import loss as dloss   # distributed imports losses: resolve at call time

    cls = loss_class(name_or_class) if isinstance(name_or_class, str) else name_or_class
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"sharded: expected a loss name or a loss class, got {name_or_class!r}")
    return dloss._SHARDED.get(cls)
