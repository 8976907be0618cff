"""Drop-in ``nn.Module`` losses. Each holds the class matrix as ``weight`` [C, D].

Usage (any of the classes below)::

    criterion = magloss.ArcFaceLoss(embedding_size=512, num_classes=85742).cuda()
    optimizer = torch.optim.SGD([*backbone.parameters(), *criterion.parameters()], lr=0.1)
    loss = criterion(backbone(images), labels)   # embeddings [B, D] (not normalized), labels [B]

Every constructor validates its arguments (ValueError naming the argument) and takes
``ignore_index`` (default −1), ``reduction`` ('mean' | 'sum' | 'none') and the factory
kwargs ``device``/``dtype``. The forward semantics are those of
:mod:`magloss.functional`; on CUDA tensors the fused engine runs when it is built.

Initialisation: ``weight`` rows are drawn from N(0, 1) and scaled to unit norm. The
loss only sees directions, but the gradient on w_j scales as 1/‖w_j‖, so unit rows give
a learning rate that means the same for every class at the start.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as MF
from . import onevsall as OVA
from . import ops
from .adaptive import AdaFaceState, CurricularState, ElasticState, _KeptState, label_cosines, state_dtype
from .checks import check_inputs
from .margins import (CLASS_M2, CLASS_M3, CLIP, COMBINED, NONE, MarginSpec, check_class_margins,
                      class_row_margins, magface_lambda_g_bound, sphere_lambda)
from .rows import compute_dtype
from .subcenter import dominant_subcenters, dominant_weight, far_from_class, subcenter_counts
from .validation import (check_bool, check_finite, check_ignore_index, check_int, check_non_negative,
                         check_positive, check_reduction)

__all__ = [
    "MarginLoss",
    "SoftmaxLoss",
    "NormFaceLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "SphereFaceLoss",
    "MagFaceLoss",
    "MagCosFaceLoss",
    "SubCenterArcFaceLoss",
    "AdaFaceLoss",
    "CurricularFaceLoss",
    "ElasticArcFaceLoss",
    "ElasticCosFaceLoss",
    "OneVsAllLoss",
    "SFaceLoss",
    "UniFaceLoss",
    "SphereFace2Loss",
    "P2SGradLoss",
]


def _init_common(module: nn.Module, embedding_size, num_classes, ignore_index, reduction) -> None:
    """Validate and store the arguments every loss module shares."""
    module.embedding_size = check_int("embedding_size", embedding_size, 1)
    module.num_classes = check_int("num_classes", num_classes, 1)
    module.ignore_index = check_ignore_index(ignore_index, module.num_classes, stacklevel=4)
    module.reduction = check_reduction(reduction)


def check_embedding_size(module: nn.Module, embeddings) -> None:
    """Raise ValueError when ``embeddings`` is not [B, module.embedding_size]; when its width
    is ``num_classes`` instead, say that the module was probably built with the arguments
    in pytorch-metric-learning's order (num_classes, embedding_size). Raise RuntimeError
    naming the loss under a ``torch.func`` transform (:func:`magloss.ops.functorch_unsupported`)."""
    ops.functorch_unsupported(type(module).__name__, embeddings, module.weight)
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] == module.embedding_size:
        return                              # type and rank errors: the functional checks word them
    hint = ""
    if embeddings.shape[1] == module.num_classes:
        hint = (f"; this module was built with embedding_size={module.embedding_size}, "
                f"num_classes={module.num_classes}: the arguments are (embedding_size, num_classes), "
                "pytorch-metric-learning's order is (num_classes, embedding_size)")
    raise ValueError(f"embeddings: expected shape [B, {module.embedding_size}] (embedding_size), "
                     f"got {tuple(embeddings.shape)}{hint}")


class MarginLoss(_KeptState, nn.Module):
    """Base class: a class matrix ``weight`` [num_classes, embedding_size] (K·num_classes rows
    for K = ``spec.subcenters`` sub-centers per class) and a :class:`MarginSpec`.

    forward(embeddings [B, D], labels [B], return_parts=False, sample_weight=None (keyword-only)) -> loss
    (0-d, or [B] for reduction='none'), float32 (float64 for float64 inputs); with
    ``return_parts=True`` a :class:`magloss.functional.LossParts` (loss, ce, reg, norms,
    reg_weighted) from the same pass. ``sample_weight``: [B] per-row weights
    (:mod:`magloss.functional`: a weighted average for 'mean'). :meth:`accuracy` gives the
    training accuracy to log.

    ``class_margins`` (ArcFace, CosFace, combined margin, Sub-center ArcFace and a base
    MarginLoss of the COMBINED family): per-class margins looked up by label, replacing the
    loss's margin. A [num_classes] tensor (ArcFace, Sub-center ArcFace: angles in radians;
    CosFace: cosine margins) or [num_classes, 2] (m2_c, m3_c) for the combined margin, e.g.
    :func:`magloss.margins.class_count_margins`. It is held in the buffer ``class_margins``
    (None without: moves with ``.to()``, saved in the state_dict, float32 — float64 in a
    float64 module — whatever the module's dtype); change it between steps with
    :meth:`set_class_margins`, which validates it once (the forward only looks it up: no host
    synchronization; an in-place change of the buffer is not checked). The other families
    refuse it (ValueError saying why).
    """

    _float_state = ("class_margins",)
    #: The margin a [C] class-margin table sets (CLASS_M2, CLASS_M3), None for a [C, 2] table.
    _class_margin_column: Optional[int] = None
    #: Why this family takes no per-class margins ("" when it does).
    _no_class_margins = ""

    def __init__(self, embedding_size: int, num_classes: int, spec: MarginSpec, *, ignore_index: int = -1,
                 reduction: str = "mean", class_margins: Optional[Tensor] = None, device=None, dtype=None) -> None:
        super().__init__()
        _init_common(self, embedding_size, num_classes, ignore_index, reduction)
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(self.num_classes * spec.subcenters, self.embedding_size,
                                               device=device, dtype=dtype))
        self.register_buffer("class_margins", None)
        if class_margins is not None:
            self.set_class_margins(class_margins)
        self.reset_parameters()

    def set_class_margins(self, class_margins: Optional[Tensor]) -> None:
        """Validate ``class_margins`` (see the class docstring; None removes the table) and store
        a copy in the buffer ``class_margins`` on the weight's device, in float32 (float64 for a
        float64 module). Raises ValueError/TypeError naming ``class_margins`` (wrong shape or
        dtype, a value that is negative, NaN/Inf, an angle ≥ π, or a family without per-class
        margins); the module is unchanged then."""
        if class_margins is None:
            self.class_margins = None
            return
        if self._no_class_margins or self.spec.kind != COMBINED:
            raise ValueError(f"class_margins: {type(self).__name__} takes no per-class margins: "
                             f"{self._no_class_margins or 'they replace m2/m3 of the COMBINED margin family'}")
        check_class_margins(self.spec, class_margins, self.num_classes, self._class_margin_column)
        self.class_margins = class_margins.detach().to(device=self.weight.device,
                                                       dtype=state_dtype(self.weight.dtype)).clone()

    def reset_parameters(self) -> None:
        """Rows of ``weight`` ~ N(0, I), scaled to unit norm."""
        with torch.no_grad():
            self.weight.normal_()
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def _loss(self, embeddings: Tensor, labels: Tensor, **kw):
        check_embedding_size(self, embeddings)
        if self.class_margins is not None:     # validated by set_class_margins: a lookup, no read-back
            check_inputs(embeddings, self.weight, labels)
            kw["row_margins"] = class_row_margins(self.class_margins, labels, self.ignore_index,
                                                  self._class_margin_column, compute_dtype(embeddings.dtype))
        return MF.margin_loss(embeddings, self.weight, labels, self.spec, ignore_index=self.ignore_index,
                              reduction=self.reduction, **kw)

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        return self._loss(embeddings, labels, return_parts=return_parts, sample_weight=sample_weight)

    def accuracy(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Share of non-ignored rows whose arg-max over the plain cosine logits (no margin)
        is the label: :func:`magloss.functional.accuracy` (chunked over classes, no B×C
        matrix). 0-d float tensor. A label outside [0, C) or a NaN/Inf embedding is the
        loss's ValueError (NaN out with ``MAGLOSS_CHECK_INPUTS=off``)."""
        check_embedding_size(self, embeddings)
        return MF.accuracy(embeddings, self.weight, labels, ignore_index=self.ignore_index,
                           subcenters=self.spec.subcenters)

    def extra_repr(self) -> str:
        s = self.spec
        hp = {"scale": s.scale, "m1": s.m1, "m2": s.m2, "m3": s.m3, "easy_margin": s.easy_margin,
              "straight_through": s.straight_through}
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                + ", ".join(f"{k}={v}" for k, v in hp.items())
                + f", ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class NormFaceLoss(MarginLoss):
    """NormFace / normalized softmax: z_ij = s·cos θ_ij. Default scale s = 64."""

    _no_class_margins = "NormFace has no margin (CosFaceLoss and ArcFaceLoss take class_margins)"

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, **kw) -> None:
        super().__init__(embedding_size, num_classes, MarginSpec.combined(scale, 1.0, 0.0, 0.0), **kw)


class CosFaceLoss(MarginLoss):
    """CosFace (Wang et al. 2018): ψ = cos θ − m. Defaults s = 64, m = 0.35."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.35,
                 straight_through: bool = False, **kw) -> None:
        super().__init__(embedding_size, num_classes, MarginSpec.cosface(scale, margin, straight_through), **kw)

    _class_margin_column = CLASS_M3


class ArcFaceLoss(MarginLoss):
    """ArcFace (Deng et al. 2019): ψ = cos(θ + m). Defaults s = 64, m = 0.5.

    Past θ = π − m the threshold form c − m·sin m keeps ψ a penalty; ``easy_margin=True``
    applies the margin only where cos θ > 0. ``straight_through=True`` is insightface's
    current behaviour (margin applied under no_grad, ∂ψ/∂c = 1); the default is exact.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, straight_through: bool = False, **kw) -> None:
        super().__init__(embedding_size, num_classes,
                         MarginSpec.arcface(scale, margin, easy_margin, straight_through), **kw)

    _class_margin_column = CLASS_M2


class CombinedMarginLoss(MarginLoss):
    """Combined margin (ArcFace paper §3.3): ψ = cos(m1·θ + m2) − m3, all three applied.

    Defaults s = 64, (m1, m2, m3) = (1, 0.5, 0); the paper also reports (1, 0.3, 0.2) and
    (0.9, 0.4, 0.15). Boundary policy as ArcFace, generalized in :mod:`magloss.margins`.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, easy_margin: bool = False, straight_through: bool = False,
                 **kw) -> None:
        super().__init__(embedding_size, num_classes,
                         MarginSpec.combined(scale, m1, m2, m3, easy_margin, straight_through), **kw)


class SphereFaceLoss(MarginLoss):
    """SphereFace / A-Softmax (Liu et al. 2017) with the original annealing.

    ψ = (λ·c + (−1)^k cos(mθ) − 2k)/(1 + λ) for θ ∈ [kπ/m, (k+1)π/m], integer m (default 4).
    ``scale=None`` (default) scales row i's logits by ‖x_i‖ as the original; a float
    uses a fixed s instead. λ = max(lambda_min, lambda_base·(1 + lambda_gamma·it)^−lambda_power)
    with defaults (1000, 0.12, 1, 5); ``it`` counts the training-mode forwards including
    the current one, as upstream (which advances its counter before computing λ): the
    first training forward uses λ(1) = 892.857. The buffer ``iteration`` (saved in the
    state dict) holds the number of training forwards done; it advances only after a
    successful forward. λ is computed in the compute dtype (float64 for float64 inputs).
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: int = 4, scale: Optional[float] = None,
                 lambda_base: float = 1000.0, lambda_gamma: float = 0.12, lambda_power: float = 1.0,
                 lambda_min: float = 5.0, straight_through: bool = False, **kw) -> None:
        spec = MarginSpec.sphere(margin, scale, straight_through)
        schedule = tuple(check_non_negative(name, v) for name, v in (
            ("lambda_base", lambda_base), ("lambda_gamma", lambda_gamma), ("lambda_power", lambda_power),
            ("lambda_min", lambda_min)))
        super().__init__(embedding_size, num_classes, spec, **kw)
        self.schedule = schedule
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=kw.get("device")))

    @property
    def margin(self) -> int:
        return int(self.spec.m1)

    def current_lambda(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """λ as :meth:`forward` uses it now (0-d tensor of ``dtype``).

        As the original code (Caffe layer, face.evoLVe, the PyTorch port), a training-mode
        forward advances the counter *before* computing λ: the n-th training forward uses
        λ(n), so the first uses λ(1) = 1000/1.12. In eval mode λ(iteration) is used, the λ
        of the last training forward (λ(0) = lambda_base before any)."""
        it = self.iteration + 1 if self.training else self.iteration
        return sphere_lambda(it, *self.schedule, dtype=dtype)

    _no_class_margins = "SphereFace's margin is the integer multiplier m of the angle, not an additive margin"

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        dtype = compute_dtype(embeddings.dtype) if isinstance(embeddings, Tensor) else torch.float32
        out = self._loss(embeddings, labels, sphere_lambda=self.current_lambda(dtype), return_parts=return_parts,
                         sample_weight=sample_weight)
        if self.training:
            self.iteration.add_(1)
        return out


class MagFaceLoss(MarginLoss):
    """MagFace (Meng et al. 2021): ψ = cos(θ + m(a)), loss = reduce(CE) + λ_g·reduce(g(ã)).

    m(a) = l_m + (u_m − l_m)(ã − l_a)/(u_a − l_a), g(ã) = ã/u_a² + 1/ã, ã = clamp(‖x‖, l_a, u_a).
    Defaults: s = 64, l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35, easy_margin = True
    (as the MagFace code). Warns when λ_g is below s·k·u_a²·l_a²/(u_a² − l_a²), the bound of
    the paper's convergence guarantee (22.6 for the defaults).

    ``forward(embeddings, labels, return_parts=False)``; with ``return_parts=True`` returns a
    :class:`magloss.functional.LossParts` (loss, ce, reg, norms, reg_weighted) from the same
    pass: ``reg`` is g(ã) unweighted (the MagFace code's ``loss_g``), ``reg_weighted`` =
    λ_g·reg, and ``loss = ce + reg_weighted``.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0,
                 easy_margin: bool = True, straight_through: bool = False, **kw) -> None:
        spec = self._make_spec(scale, l_a, u_a, l_m, u_m, easy_margin, straight_through)
        self.lambda_g = check_non_negative("lambda_g", lambda_g, "weight")
        bound = magface_lambda_g_bound(spec.scale, spec.l_a, spec.u_a, spec.l_m, spec.u_m)
        if self.lambda_g < bound:
            warnings.warn(
                f"lambda_g={self.lambda_g} is below s*k*u_a^2*l_a^2/(u_a^2-l_a^2) = {bound:.4g}: the MagFace "
                "convergence guarantee (unique optimal magnitude) does not hold", UserWarning, stacklevel=2)
        super().__init__(embedding_size, num_classes, spec, **kw)

    @staticmethod
    def _make_spec(scale, l_a, u_a, l_m, u_m, easy_margin, straight_through) -> MarginSpec:
        return MarginSpec.magface(scale, l_a, u_a, l_m, u_m, easy_margin, straight_through)

    l_a = property(lambda self: self.spec.l_a)
    u_a = property(lambda self: self.spec.u_a)
    l_m = property(lambda self: self.spec.l_m)
    u_m = property(lambda self: self.spec.u_m)
    scale = property(lambda self: self.spec.scale)

    _no_class_margins = "MagFace's margin m(a) is a function of the feature magnitude"

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        return self._loss(embeddings, labels, lambda_g=self.lambda_g, return_parts=return_parts,
                          sample_weight=sample_weight)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={s.scale}, "
                f"l_a={s.l_a}, u_a={s.u_a}, l_m={s.l_m}, u_m={s.u_m}, lambda_g={self.lambda_g}, "
                f"easy_margin={s.easy_margin}, ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class MagCosFaceLoss(MagFaceLoss):
    """Mag-CosFace: ψ = cos θ − m(a), loss = reduce(CE) + λ_g·reduce(g(ã)).

    Defaults: s = 64, l_a = 10, u_a = 110, l_m = 0.35, u_m = 0.8, λ_g = 150. Same
    ``return_parts`` and λ_g warning as :class:`MagFaceLoss`.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.35, u_m: float = 0.8, lambda_g: float = 150.0,
                 straight_through: bool = False, **kw) -> None:
        super().__init__(embedding_size, num_classes, scale, l_a, u_a, l_m, u_m, lambda_g,
                         False, straight_through, **kw)

    @staticmethod
    def _make_spec(scale, l_a, u_a, l_m, u_m, easy_margin, straight_through) -> MarginSpec:
        return MarginSpec.magcos(scale, l_a, u_a, l_m, u_m, straight_through)


class SubCenterArcFaceLoss(MarginLoss):
    """Sub-center ArcFace (Deng et al., ECCV 2020): K sub-centers per class, ArcFace on the best.

    ``weight`` is [K·num_classes, embedding_size], row j·K + k is sub-center k of class j
    (insightface's layout). c_ij = max_k cos θ_{i, jK+k}; ψ = cos(θ_iy + m) on the label
    class's best sub-center (threshold form past π − m, or ``easy_margin``); the gradient of
    each class cosine flows to its winning sub-center only (ties: the lowest k). Defaults
    K = 3, s = 64, m = 0.5 (radians), as the paper and insightface.

    After training, as upstream: :meth:`subcenter_counts` over the training set (summed
    over batches), then :meth:`drop_subcenters` keeps each class's dominant sub-center (an
    :class:`ArcFaceLoss` to retrain with), and :meth:`far_from_class` flags the samples
    more than 75° from it as likely label noise (:mod:`magloss.subcenter`).
    """

    def __init__(self, embedding_size: int, num_classes: int, subcenters: int = 3, scale: float = 64.0,
                 margin: float = 0.5, easy_margin: bool = False, straight_through: bool = False, **kw) -> None:
        spec = MarginSpec.arcface(scale, margin, easy_margin, straight_through).with_subcenters(subcenters)
        super().__init__(embedding_size, num_classes, spec, **kw)

    _class_margin_column = CLASS_M2

    @property
    def subcenters(self) -> int:
        return self.spec.subcenters

    def subcenter_counts(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """[num_classes, K] int64: how many rows of each class pick each sub-center
        (:func:`magloss.subcenter.subcenter_counts`); add the counts of several batches."""
        return subcenter_counts(embeddings, self.weight, labels, self.subcenters, self.ignore_index)

    def _dominant(self, counts: Tensor) -> Tensor:
        return dominant_subcenters(counts, self.num_classes, self.subcenters)

    def drop_subcenters(self, counts: Tensor) -> "ArcFaceLoss":
        """An :class:`ArcFaceLoss` (same scale, margin, boundary, ignore_index, reduction) whose
        ``weight`` [num_classes, D] holds each class's dominant sub-center (most rows in
        ``counts``; ties and empty classes: the lowest k)."""
        s = self.spec
        out = ArcFaceLoss(self.embedding_size, self.num_classes, s.scale, s.m2, s.easy_margin, s.straight_through,
                          ignore_index=self.ignore_index, reduction=self.reduction, device=self.weight.device,
                          dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(dominant_weight(self.weight, self._dominant(counts), self.subcenters))
        return out

    def far_from_class(self, embeddings: Tensor, labels: Tensor, counts: Tensor,
                       threshold: float = math.radians(75.0)) -> Tensor:
        """[B] bool: rows more than ``threshold`` radians (default 75°, as upstream) from their
        class's dominant sub-center (likely label noise); False on ignored rows."""
        class_weight = dominant_weight(self.weight, self._dominant(counts), self.subcenters)
        return far_from_class(embeddings, class_weight, labels, threshold, self.ignore_index)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", subcenters={self.subcenters}"


class _StatefulMarginLoss(MarginLoss):
    """A margin loss whose engine inputs come from a running state (AdaFace, CurricularFace,
    ElasticFace; the state mixins of :mod:`magloss.adaptive`): the state gives the op's
    ``row_margins``/``neg_threshold``/``neg_t`` for the batch and is committed only after the
    loss has been computed (training mode only)."""

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        check_embedding_size(self, embeddings)
        check_inputs(embeddings, self.weight, labels)
        valid = labels != self.ignore_index
        rm, nt, t, commit = self._extras(
            embeddings, valid,
            lambda: label_cosines(embeddings, self.weight, labels, self.ignore_index, self.spec.subcenters))
        out = self._loss(embeddings, labels, return_parts=return_parts, row_margins=rm, neg_threshold=nt, neg_t=t,
                         sample_weight=sample_weight)
        if commit is not None:
            commit()
        return out


class AdaFaceLoss(AdaFaceState, _StatefulMarginLoss):
    """AdaFace (Kim et al., CVPR 2022): a margin adapted to image quality through the feature norm.

    ẑ_i = clip((a_i − μ)/(σ + 0.001)·h, −1, 1), a_i = clip(‖x_i‖, 0.001, 100) (detached);
    label logit s·(cos(clip(θ_i − m·ẑ_i, ε, π − ε)) − (m·ẑ_i + m)), θ_i = acos(clip(c_iy,
    −1 + ε, 1 − ε)), ε = 0.001; other logits s·c_ij. μ, σ: buffers ``batch_mean`` (20 at
    start) and ``batch_std`` (100), running averages of the batch's norm mean and (unbiased)
    std with ``momentum`` 0.01, updated before use in each training forward, frozen in eval
    mode. Defaults m = 0.4 (radians), h = 0.333, s = 64 (paper and mk-minchul/AdaFace).
    See :func:`magloss.functional.adaface_loss` and docs/adaptive_losses.md.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.4,
                 h: float = 0.333, momentum: float = 0.01, **kw) -> None:
        super().__init__(embedding_size, num_classes, MarginSpec.combined(scale, 1.0, 0.0, 0.0, boundary=CLIP), **kw)
        self._init_state(margin, h, momentum, device=kw.get("device"), dtype=kw.get("dtype"))

    _no_class_margins = "AdaFace computes each row's margin from its feature norm"

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={self.spec.scale}, "
                f"margin={self.margin}, h={self.h}, momentum={self.momentum}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")


class CurricularFaceLoss(CurricularState, _StatefulMarginLoss):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace on the label, hard negatives re-weighted.

    Label logit s·cos(θ + m) (threshold form c − m·sin m past π − m); a non-label column with
    c_ij > τ_i = cos(θ_iy + m) has the logit s·c_ij·(t + c_ij) (gradient s·(t + 2c_ij)),
    others s·c_ij. t: buffer ``t`` (0 at start), t ← momentum·mean_i(c_iy) + (1 − momentum)·t
    before use in each training forward (momentum 0.01), frozen in eval mode. Defaults
    m = 0.5 (radians), s = 64 (paper and HuangYG123/CurricularFace).
    See :func:`magloss.functional.curricular_face_loss`.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 momentum: float = 0.01, **kw) -> None:
        super().__init__(embedding_size, num_classes, MarginSpec.arcface(scale, margin), **kw)
        self._init_state(momentum, device=kw.get("device"), dtype=kw.get("dtype"))

    _no_class_margins = "CurricularFace's negative threshold cos(theta + m) uses its one margin m"

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={self.spec.scale}, "
                f"margin={self.spec.m2}, momentum={self.momentum}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")


class _ElasticLoss(ElasticState, _StatefulMarginLoss):
    _angular = True
    _no_class_margins = "ElasticFace draws each row's margin at random"

    def __init__(self, embedding_size: int, num_classes: int, scale: float, margin: float, std: Optional[float],
                 plus: bool, seed: Optional[int], **kw) -> None:
        super().__init__(embedding_size, num_classes, MarginSpec.combined(scale, 1.0, 0.0, 0.0, boundary=NONE), **kw)
        self._init_state(self._angular, margin, std, plus, seed)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={self.spec.scale}, "
                f"margin={self.margin}, std={self.std}, plus={self.plus}, seed={self.seed}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class ElasticArcFaceLoss(_ElasticLoss):
    """ElasticFace-Arc (Boutros et al., CVPRW 2022): ArcFace with a random margin per row.

    Label logit s·cos(θ_i + m_i), m_i ~ N(margin, std²) drawn per row in each training
    forward from ``generator`` (CPU, seeded by ``seed``; None: a seed from torch's global
    generator at construction); no fallback past π, as upstream. ``plus=True``
    (ElasticFace-Arc+): the sorted draws go to the rows by label cosine, the largest to
    the row farthest from its class centre. Eval mode uses m_i = margin. Defaults s = 64,
    m = 0.5 (radians), std = 0.05 (0.0175 with ``plus``), from the upstream configs.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 std: Optional[float] = None, plus: bool = False, seed: Optional[int] = None, **kw) -> None:
        super().__init__(embedding_size, num_classes, scale, margin, std, plus, seed, **kw)


class ElasticCosFaceLoss(_ElasticLoss):
    """ElasticFace-Cos (Boutros et al., CVPRW 2022): CosFace with a random margin per row.

    Label logit s·(c_iy − m_i), m_i ~ N(margin, std²) as :class:`ElasticArcFaceLoss`.
    Defaults s = 64, m = 0.35, std = 0.05 (0.02 with ``plus``).
    """

    _angular = False

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.35,
                 std: Optional[float] = None, plus: bool = False, seed: Optional[int] = None, **kw) -> None:
        super().__init__(embedding_size, num_classes, scale, margin, std, plus, seed, **kw)


class SoftmaxLoss(nn.Module):
    """Plain softmax cross-entropy with a linear layer (the unnormalized baseline).

    z = x·Wᵀ + b; ``weight`` [num_classes, embedding_size] and, if ``bias=True``, ``bias``
    [num_classes], initialised as nn.Linear. Runs on PyTorch's own kernels.
    """

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = True, *, ignore_index: int = -1,
                 reduction: str = "mean", device=None, dtype=None) -> None:
        super().__init__()
        _init_common(self, embedding_size, num_classes, ignore_index, reduction)
        lin = nn.Linear(self.embedding_size, self.num_classes, bias=check_bool("bias", bias), device=device,
                        dtype=dtype)
        self.weight = lin.weight
        self.bias = lin.bias

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        check_embedding_size(self, embeddings)
        return MF.softmax_loss(embeddings, self.weight, labels, self.bias, ignore_index=self.ignore_index,
                               reduction=self.reduction, return_parts=return_parts, sample_weight=sample_weight)

    def accuracy(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Share of non-ignored rows whose arg-max over this loss's logits x·Wᵀ + b is the
        label (chunked over classes; :func:`magloss.functional.accuracy`). 0-d float tensor."""
        check_embedding_size(self, embeddings)
        return MF.accuracy(embeddings, self.weight, labels, ignore_index=self.ignore_index, bias=self.bias,
                           normalize=False)


class OneVsAllLoss(nn.Module):
    """Base of the one-vs-all losses (:mod:`magloss.onevsall`): L_i = Σ_j ℓ(c_ij, [j = y_i]).

    ``weight`` [num_classes, embedding_size] (rows ~ N(0, I) scaled to unit norm, as
    :class:`MarginLoss`); UniFace and SphereFace2 also hold the learnable ``bias`` [1]
    (their upstream shape). forward(embeddings [B, D], labels [B], return_parts=False) ->
    loss (0-d, or [B] for reduction='none'), float32 (float64 for float64 inputs), or a
    :class:`magloss.functional.LossParts` (ce = loss, reg = 0). :meth:`accuracy` as
    :class:`MarginLoss` (the arg-max of the cosines; a shared bias does not change it).
    On CUDA with the compiled extension, float32/float16/bfloat16 run the fused kernels (docs/cuda.md).
    """

    _kind = -1

    def __init__(self, embedding_size: int, num_classes: int, params, bias_init: Optional[float] = None, *,
                 ignore_index: int = -1, reduction: str = "mean", device=None, dtype=None) -> None:
        super().__init__()
        _init_common(self, embedding_size, num_classes, ignore_index, reduction)
        self.params = tuple(float(p) for p in params)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size, device=device, dtype=dtype))
        self.bias = None
        self.bias_init = None
        if bias_init is not None:
            self.bias_init = check_finite("bias_init", bias_init)
            self.bias = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows of ``weight`` ~ N(0, I) scaled to unit norm; ``bias`` = its initial value."""
        MarginLoss.reset_parameters(self)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.fill_(self.bias_init)

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        check_embedding_size(self, embeddings)
        return OVA.one_vs_all_loss(embeddings, self.weight, labels, self._kind, self.params, self.bias,
                                   ignore_index=self.ignore_index, reduction=self.reduction, return_parts=return_parts,
                                   sample_weight=sample_weight)

    def accuracy(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Share of non-ignored rows whose arg-max cosine is the label (:func:`magloss.functional.accuracy`)."""
        check_embedding_size(self, embeddings)
        return MF.accuracy(embeddings, self.weight, labels, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        names = inspect.signature(type(self)).parameters
        hp = ", ".join(f"{k}={getattr(self, k)!r}" for k in names if hasattr(self, k)
                       and k not in ("embedding_size", "num_classes", "ignore_index", "reduction", "kw"))
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, {hp + ', ' if hp else ''}"
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class SFaceLoss(OneVsAllLoss):
    """SFace (Zhong et al., TIP 2021; zhongyy/SFace): sigmoid-constrained hypersphere loss.

    L_i = −s·σ(k(θ_iy − a))·c_iy + Σ_{j≠y} s·σ(−k(θ_ij − b))·c_ij, θ = arccos c (radians),
    the sigmoid weights without gradient (upstream's no_grad). Defaults s = 64, k = 80,
    a = 0.80, b = 1.23 (the upstream code's defaults). See docs/one_vs_all.md.
    """

    _kind = OVA.SFACE

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, k: float = 80.0, a: float = 0.8,
                 b: float = 1.23, **kw) -> None:
        params = OVA.sface_params(scale, k, a, b)
        self.scale, self.k, self.a, self.b = params
        super().__init__(embedding_size, num_classes, params, **kw)


class UniFaceLoss(OneVsAllLoss):
    """UniFace's unified cross-entropy (Zhou et al., ICCV 2023; CVI-SZU/UniFace).

    L_i = softplus(−[s(c_iy − m) − b]) + λ·Σ_{j≠y} softplus(s·c_ij − b), each logit clamped
    to [−s, s] as upstream (no gradient outside). ``bias`` b is learnable, initialised to
    log(10·r·C) (upstream, r = ``bias_r``) unless ``bias_init`` is given. Defaults s = 64,
    m = 0.4, λ = ``neg_weight`` = 1, r = 1.
    """

    _kind = OVA.UNIFACE

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.4,
                 neg_weight: float = 1.0, bias_r: float = 1.0, bias_init: Optional[float] = None, **kw) -> None:
        params = OVA.uniface_params(scale, margin, neg_weight)
        self.scale, self.margin, self.neg_weight = params
        self.bias_r = check_positive("bias_r", bias_r)
        if bias_init is None:
            bias_init = OVA.uniface_bias_init(check_int("num_classes", num_classes, 1), self.bias_r)
        super().__init__(embedding_size, num_classes, params, bias_init, **kw)


class SphereFace2Loss(OneVsAllLoss):
    """SphereFace2 (Wen et al., ICLR 2022; ydwen/opensphere): binary classification per class.

    z_ij = r·(c_ij + sg[g(c_ij) ∓ m − c_ij]) + b (``margin_type`` 'C'; 'A': θ + m at the label,
    'M': θ·m), g(c) = 2((c + 1)/2)^t − 1; L_i = (lw/r)·[α·softplus(−z_iy) + (1 − α)·Σ_{j≠y}
    softplus(z_ij)] (opensphere's weighted BCE mean over B·C times lw·C/r, per row). ``bias`` b
    is learnable, initialised by opensphere's closed form
    (:func:`magloss.onevsall.sphereface2_bias_init`) unless ``bias_init`` is given. Defaults
    r = ``scale`` = 40, m = 0.4, t = 3, α = 0.7, lw = ``loss_weight`` = 50, 'C'.
    """

    _kind = OVA.SPHEREFACE2

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 40.0, margin: float = 0.4,
                 t: float = 3.0, alpha: float = 0.7, loss_weight: float = 50.0, margin_type: str = "C",
                 bias_init: Optional[float] = None, **kw) -> None:
        params = OVA.sphereface2_params(scale, margin, t, alpha, loss_weight, margin_type)
        self.scale, self.margin, self.t, self.alpha, self.loss_weight, _ = params
        self.margin_type = margin_type
        if bias_init is None:
            bias_init = OVA.sphereface2_bias_init(check_int("num_classes", num_classes, 1), self.alpha, self.scale,
                                                  self.margin, self.t, margin_type)
        super().__init__(embedding_size, num_classes, params, bias_init, **kw)


class P2SGradLoss(OneVsAllLoss):
    """P2SGrad (Zhang et al., CVPR 2019) as pytorch-metric-learning's P2SGradLoss:
    L_i = (1/C)·Σ_j (clamp(c_ij, −1, 1) − [j = y_i])², so 'mean' is the MSE over B·C. No
    hyperparameters."""

    _kind = OVA.P2SGRAD

    def __init__(self, embedding_size: int, num_classes: int, **kw) -> None:
        super().__init__(embedding_size, num_classes, (1.0 / check_int("num_classes", num_classes, 1),), **kw)
