"""magloss: margin-based softmax losses for face recognition (MagFace, ArcFace, CosFace,
SphereFace, combined margins, AdaFace, CurricularFace, Sub-center ArcFace, ElasticFace,
softmax baselines) with a fused CUDA engine and a chunked
PyTorch engine, the default wherever the fused kernels are not in use.

Quick start::

    import magloss
    criterion = magloss.MagFaceLoss(embedding_size=512, num_classes=85742)
    loss = criterion(embeddings, labels)

``magloss.extension_status()`` tells whether the fused CUDA kernels are in use.
"""

from . import adaptive, checkpoint, distributed, evaluation, functional, margins, onevsall, ops, quality, registry, subcenter  # noqa: F401  (ops registers the custom ops)
from ._ext import extension_status, flush_input_checks
from .functional import LossParts, MagFaceOutput
from .interop import load_magface_weight
from .losses import (
    AdaFaceLoss,
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    ElasticArcFaceLoss,
    ElasticCosFaceLoss,
    MagCosFaceLoss,
    MagFaceLoss,
    MarginLoss,
    NormFaceLoss,
    P2SGradLoss,
    SFaceLoss,
    SoftmaxLoss,
    SphereFace2Loss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
    UniFaceLoss,
)
from .margins import MarginSpec

__version__ = "0.1.0"

__all__ = [
    "AdaFaceLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "CurricularFaceLoss",
    "ElasticArcFaceLoss",
    "ElasticCosFaceLoss",
    "LossParts",
    "MagCosFaceLoss",
    "MagFaceLoss",
    "MagFaceOutput",
    "MarginLoss",
    "MarginSpec",
    "NormFaceLoss",
    "P2SGradLoss",
    "SFaceLoss",
    "SoftmaxLoss",
    "SphereFace2Loss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "UniFaceLoss",
    "adaptive",
    "checkpoint",
    "distributed",
    "evaluation",
    "extension_status",
    "flush_input_checks",
    "functional",
    "load_magface_weight",
    "margins",
    "onevsall",
    "quality",
    "registry",
    "subcenter",
]
