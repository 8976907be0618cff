"""Margin functions ψ(c, a) of every loss family, with their exact derivatives.

Every margin loss in magloss differs from plain normalized softmax only in the
label column: z_iy = s·ψ(c_iy, a_i) instead of s·c_iy (see docs/math.md §1).
This module holds the per-row margin math in one place, in PyTorch, for the
chunked engine and the oracle; the CUDA engine has one device function per family
that must agree with these to float rounding.

A margin is described by a :class:`MarginSpec` (validated on construction) and
evaluated by :func:`margin_terms`, which returns ψ and its first derivatives
∂ψ/∂c and ∂ψ/∂a for one cosine per row.

Families (``MarginSpec.kind``):

* ``COMBINED``: ψ = cos(m1·θ + m2) − m3. NormFace is (1, 0, 0), CosFace (1, 0, m),
  ArcFace (1, m, 0).
* ``MAGFACE``: ψ = cos(θ + m(a)), m(a) = l_m + (u_m − l_m)(ã − l_a)/(u_a − l_a),
  ã = clamp(a, l_a, u_a).
* ``MAGCOS``: ψ = c − m(a) (Mag-CosFace).
* ``SPHERE``: A-Softmax, ψ = (λ·c + (−1)^k cos(mθ) − 2k) / (1 + λ) for
  θ ∈ [kπ/m, (k+1)π/m], integer m; λ is the annealing weight.

Boundary policies (``MarginSpec.boundary``: where the angle plus margin passes π and the
margin would stop being a penalty), for the COMBINED and MAGFACE families:

* ``THRESHOLD`` (0, default, ``easy_margin=False``): with θ_t = (π − m2)/m1, for θ ≥ θ_t
  use ψ = c − m3 − mm, mm = max((π − θ_t)·sin θ_t, 1 + cos θ_t). For ArcFace
  (m1 = 1) this is the classic c − m·sin m of insightface and the MagFace code;
  the max() only matters for large m1·θ_t and keeps ψ non-increasing in θ.
* ``EASY`` (1, ``easy_margin=True``): apply the margin only where c > 0 (and
  m1·θ + m2 < π); elsewhere ψ = c.
* ``CLIP`` (2, AdaFace's code; COMBINED only): θ = acos(clamp(c, −1 + ε, 1 − ε)),
  ψ = cos(clamp(m1·θ + m2, ε, π − ε)) − m3 with ε = :data:`CLIP_EPS` = 1e-3; ∂ψ/∂c = 0
  where either clamp is active (the autograd of the upstream formula).
* ``NONE`` (3, ElasticFace's code; COMBINED only): ψ = cos(m1·θ + m2) − m3 for every θ,
  no fallback.

With per-row margins (the ``row_margins`` op input: AdaFace, ElasticFace) m2 and m3 are
[B] tensors, and every policy uses each row's own m2_i, m3_i in its formula. Per-class margins
(``class_margins`` of ArcFace, CosFace, the combined margin and Sub-center ArcFace) are a table
looked up by label into those per-row margins (:func:`check_class_margins`,
:func:`class_row_margins`); :func:`class_count_margins` builds the usual table from class sizes.

Numerics (docs/math.md §1): ψ is evaluated at clamp(c, −1, 1), and ∂ψ/∂c is passed
through that clamp unchanged (a cosine of 1 + 1e-7 is rounding, not geometry).
sin θ = sqrt(max(1 − c², 0)) in values and sqrt(max(1 − c², SIN_EPS)) wherever
it divides. ``straight_through=True`` replaces ∂ψ/∂c by 1 (insightface's ArcFace,
which applies the margin under no_grad); ∂ψ/∂a is kept, since MagFace needs it.

NaN in, NaN out: a NaN cosine (or magnitude, where it is used) gives NaN ψ and NaN
derivatives. torch.clamp keeps NaN, and every branch chosen by a comparison sends a
NaN to the formula, never to a constant branch (``c > cos θ_t`` is False for NaN, so
the test is written ``~(c <= cos θ_t)``). The constants of the definitions stay:
∂ψ/∂c = 1 under ``straight_through`` and for MAGCOS, ∂ψ/∂a = 0 without a magnitude term.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
from torch import Tensor

from .validation import check_angle, check_bool, check_finite, check_non_negative, check_subcenters

__all__ = [
    "COMBINED",
    "MAGFACE",
    "MAGCOS",
    "SPHERE",
    "THRESHOLD",
    "EASY",
    "CLIP",
    "NONE",
    "BOUNDARIES",
    "SIN_EPS",
    "CLIP_EPS",
    "NORM_EPS",
    "MarginSpec",
    "margin_terms",
    "magnitude_margin",
    "regularizer",
    "sphere_lambda",
    "magface_lambda_g_bound",
    "check_boundary",
    "check_row_margins_family",
    "CLASS_M2",
    "CLASS_M3",
    "check_float_table",
    "check_class_margins",
    "class_row_margins",
    "class_count_margins",
]

COMBINED = 0
MAGFACE = 1
MAGCOS = 2
SPHERE = 3

#: Boundary policies (``MarginSpec.boundary``; the same integers in csrc/margins.cuh).
THRESHOLD = 0
EASY = 1
CLIP = 2
NONE = 3
#: Their names, by value.
BOUNDARIES = ("threshold", "easy", "clip", "none")

#: ε of the CLIP boundary (AdaFace's code): cosines clamped to [−1 + ε, 1 − ε], angles to [ε, π − ε].
CLIP_EPS = 1e-3
#: Lower bound of 1 − c² wherever sin θ divides (docs/math.md §1).
SIN_EPS = 1e-12
#: The largest finite float32: a scale above it overflows the float32 logits.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Lower bound of ‖x_i‖ and ‖w_j‖ when normalizing, as F.normalize.
NORM_EPS = 1e-12


def check_boundary(boundary) -> int:
    """``boundary`` as an int when it is one of the policies THRESHOLD=0, EASY=1, CLIP=2,
    NONE=3 (not a bool); ValueError naming ``boundary`` otherwise."""
    if isinstance(boundary, bool) or boundary not in range(len(BOUNDARIES)):
        names = ", ".join(f"{n.upper()}={i}" for i, n in enumerate(BOUNDARIES))
        raise ValueError(f"boundary: expected one of {names}, got {boundary!r}")
    return int(boundary)


@dataclass(frozen=True)
class MarginSpec:
    """Validated hyperparameters of one margin family.

    Build it with the named constructors (:meth:`combined`, :meth:`arcface`, :meth:`cosface`,
    :meth:`magface`, :meth:`magcos`, :meth:`sphere`), which check every argument with
    :mod:`magloss.validation` and raise ``ValueError``/``TypeError`` naming the offending one.
    Fields:

    * ``kind``: COMBINED, MAGFACE, MAGCOS or SPHERE.
    * ``scale``: s (> 0). For SPHERE, 0.0 means "scale by the feature norm a_i"
      (original SphereFace).
    * ``m1``, ``m2``, ``m3``: the combined-margin parameters (m1 = integer m for
      SPHERE; unused by MAGFACE/MAGCOS, where m(a) takes the place of m2/m3).
    * ``l_a``, ``u_a``, ``l_m``, ``u_m``: MagFace's magnitude bounds and margin range.
    * ``boundary``: the boundary policy, THRESHOLD, EASY, CLIP or NONE (see the module
      docstring); ``easy_margin`` is ``boundary == EASY``.
    * ``straight_through``: ∂ψ/∂c := 1.
    * ``subcenters``: K ≥ 1 sub-centers per class (Sub-center ArcFace): the class matrix has
      K·C rows, row j·K + k is sub-center k of class j, and a class's cosine is the maximum
      over its K (:meth:`with_subcenters`).
    """

    kind: int
    scale: float
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    l_a: float = 0.0
    u_a: float = 0.0
    l_m: float = 0.0
    u_m: float = 0.0
    boundary: int = THRESHOLD
    straight_through: bool = False
    subcenters: int = 1

    # -- constructors --------------------------------------------------------------
    @staticmethod
    def _scale(scale: float) -> float:
        scale = check_finite("scale", scale)
        if scale <= 0 or scale > _FLOAT32_MAX:
            raise ValueError(f"scale: expected a positive number at most {_FLOAT32_MAX:.4g} (the logits are "
                             f"float32), got {scale}")
        return scale

    @classmethod
    def combined(
        cls,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        easy_margin: bool = False,
        straight_through: bool = False,
        boundary: Optional[int] = None,
    ) -> "MarginSpec":
        """ψ = cos(m1·θ + m2) − m3; NormFace, CosFace and ArcFace are special cases.

        Requires m1 > 0, m2 ≥ 0, m3 ≥ 0 and m2 ≥ (1 − m1)·π, which together make
        the margin a penalty (ψ ≤ c) for every θ ∈ [0, π]. ``boundary`` (THRESHOLD, EASY,
        CLIP or NONE) takes precedence over ``easy_margin`` (which means EASY); the
        default is THRESHOLD.
        """
        boundary = cls._boundary(boundary, check_bool("easy_margin", easy_margin))
        m1 = check_finite("m1", m1)
        m2 = check_finite("m2", m2)
        m3 = check_finite("m3", m3)
        if m1 <= 0:
            raise ValueError(f"m1: expected a positive number, got {m1}")
        check_angle("m2", m2, math.pi, upper_text="pi")
        if m3 < 0:
            raise ValueError(f"m3: expected a non-negative number, got {m3}")
        if m2 < (1.0 - m1) * math.pi - 1e-12:
            raise ValueError(
                f"m1, m2: with m1={m1} < 1 the margin is a penalty on all of [0, pi] only if "
                f"m2 >= (1 - m1)*pi = {(1.0 - m1) * math.pi:.4f}, got m2={m2}"
            )
        return cls(COMBINED, cls._scale(scale), m1, m2, m3,
                   boundary=boundary, straight_through=check_bool("straight_through", straight_through))

    @classmethod
    def arcface(cls, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False,
                straight_through: bool = False) -> "MarginSpec":
        """ArcFace: ψ = cos(θ + m), :meth:`combined` with (m1, m2, m3) = (1, ``margin``, 0).
        Its errors name ``margin`` (the caller's word) where :meth:`combined` says m2."""
        return _renamed({"m2": "margin"}, cls.combined, scale, 1.0, margin, 0.0, easy_margin, straight_through)

    @classmethod
    def cosface(cls, scale: float = 64.0, margin: float = 0.35, straight_through: bool = False) -> "MarginSpec":
        """CosFace: ψ = cos θ − m, :meth:`combined` with (m1, m2, m3) = (1, 0, ``margin``).
        Its errors name ``margin`` where :meth:`combined` says m3."""
        return _renamed({"m3": "margin"}, cls.combined, scale, 1.0, 0.0, margin, straight_through=straight_through)

    @staticmethod
    def _boundary(boundary: Optional[int], easy_margin: bool) -> int:
        if boundary is None:
            return EASY if easy_margin else THRESHOLD
        boundary = check_boundary(boundary)
        if easy_margin and boundary != EASY:
            raise ValueError(f"easy_margin, boundary: easy_margin=True asks for boundary EASY, got "
                             f"boundary={BOUNDARIES[boundary].upper()}")
        return boundary

    def with_subcenters(self, subcenters: int) -> "MarginSpec":
        """This spec with K = ``subcenters`` sub-centers per class (an integer ≥ 1).

        Raises ValueError naming ``subcenters`` otherwise."""
        return replace(self, subcenters=check_subcenters(subcenters))

    @property
    def easy_margin(self) -> bool:
        """True for the EASY boundary policy (margin only where c > 0)."""
        return self.boundary == EASY

    @staticmethod
    def _magnitude_args(l_a: float, u_a: float, l_m: float, u_m: float):
        l_a, u_a = check_finite("l_a", l_a), check_finite("u_a", u_a)
        l_m, u_m = check_finite("l_m", l_m), check_finite("u_m", u_m)
        if l_a <= 0:
            raise ValueError(f"l_a: expected a positive magnitude, got {l_a}")
        if l_a >= u_a:
            raise ValueError(f"l_a, u_a: expected l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if l_m < 0:
            raise ValueError(f"l_m: expected a non-negative margin, got {l_m}")
        if l_m > u_m:
            raise ValueError(f"l_m, u_m: expected l_m <= u_m, got l_m={l_m}, u_m={u_m}")
        return l_a, u_a, l_m, u_m

    @classmethod
    def magface(
        cls,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        easy_margin: bool = True,
        straight_through: bool = False,
    ) -> "MarginSpec":
        """MagFace: ψ = cos(θ + m(a)). Requires 0 < l_a < u_a, 0 ≤ l_m ≤ u_m < π/2."""
        check_bool("easy_margin", easy_margin)
        l_a, u_a, l_m, u_m = cls._magnitude_args(l_a, u_a, l_m, u_m)
        check_angle("u_m", u_m, math.pi / 2, upper_text="pi/2")
        return cls(MAGFACE, cls._scale(scale), 1.0, 0.0, 0.0, l_a, u_a, l_m, u_m,
                   EASY if easy_margin else THRESHOLD, check_bool("straight_through", straight_through))

    @classmethod
    def magcos(
        cls,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.35,
        u_m: float = 0.8,
        straight_through: bool = False,
    ) -> "MarginSpec":
        """Mag-CosFace: ψ = c − m(a). Requires 0 < l_a < u_a, 0 ≤ l_m ≤ u_m."""
        l_a, u_a, l_m, u_m = cls._magnitude_args(l_a, u_a, l_m, u_m)
        return cls(MAGCOS, cls._scale(scale), 1.0, 0.0, 0.0, l_a, u_a, l_m, u_m,
                   THRESHOLD, check_bool("straight_through", straight_through))

    @classmethod
    def sphere(cls, margin: int = 4, scale: Optional[float] = None,
               straight_through: bool = False) -> "MarginSpec":
        """A-Softmax with integer margin ``margin`` ≥ 1; ``scale=None`` scales by ‖x_i‖."""
        if (isinstance(margin, bool) or not isinstance(margin, (numbers.Integral, float))
                or not math.isfinite(margin) or margin != int(margin) or int(margin) < 1):
            raise ValueError(f"margin: SphereFace needs an integer margin >= 1, got {margin!r}")
        s = 0.0 if scale is None else cls._scale(scale)
        return cls(SPHERE, s, float(int(margin)), straight_through=check_bool("straight_through", straight_through))

    # -- helpers ---------------------------------------------------------------------
    @property
    def scale_by_norm(self) -> bool:
        """True when the logits are scaled by ‖x_i‖ instead of s (original SphereFace)."""
        return self.kind == SPHERE and self.scale == 0.0

    @property
    def has_regularizer(self) -> bool:
        """True for MagFace and Mag-CosFace, whose loss adds λ_g·g(a)."""
        return self.kind in (MAGFACE, MAGCOS)

    def op_args(self, ignore_index: int) -> Tuple:
        """The spec and ``ignore_index`` as the positional scalar arguments of
        ``torch.ops.magloss.margin_ce`` (after its tensors): (kind, scale, m1, m2, m3,
        l_a, u_a, l_m, u_m, boundary, straight_through, ignore_index, subcenters)."""
        return (self.kind, self.scale, self.m1, self.m2, self.m3, self.l_a, self.u_a,
                self.l_m, self.u_m, self.boundary, self.straight_through, int(ignore_index), self.subcenters)

    @staticmethod
    def from_op_args(params: Tuple) -> Tuple["MarginSpec", int]:
        """Inverse of :meth:`op_args`: (spec, ignore_index). The arguments were produced by a
        validated spec, so they are not validated again."""
        (kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary, straight_through, ignore_index,
         subcenters) = params
        return MarginSpec(kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary, straight_through,
                          subcenters), ignore_index


def check_row_margins_family(spec: MarginSpec, row_margins) -> None:
    """Per-row margins (``row_margins`` not None) only with the COMBINED family, the one whose
    m2, m3 they replace; ValueError naming ``row_margins`` otherwise."""
    if row_margins is not None and spec.kind != COMBINED:
        raise ValueError(f"row_margins: per-row margins need the COMBINED margin family (kind {COMBINED}), "
                         f"got kind {spec.kind}")


def _renamed(names, build, *args, **kwargs) -> MarginSpec:
    """``build(*args, **kwargs)``, with a ValueError about one of the spec's own parameters
    re-worded in the caller's names (``names``, e.g. ``{"m2": "margin"}`` for ArcFace)."""
    try:
        return build(*args, **kwargs)
    except ValueError as exc:
        msg = str(exc)
        for spec_name, caller_name in names.items():
            if msg.startswith(spec_name + ":"):
                raise ValueError(caller_name + msg[len(spec_name):]) from None
        raise


# -- magnitude terms --------------------------------------------------------------------
def magnitude_margin(a: Tensor, l_a: float, u_a: float, l_m: float, u_m: float) -> Tuple[Tensor, Tensor]:
    """MagFace's margin m(a) and dm/da.

    m(a) = l_m + k·(ã − l_a), k = (u_m − l_m)/(u_a − l_a), ã = clamp(a, l_a, u_a);
    dm/da = k inside [l_a, u_a] and 0 outside (the clamp's gradient, as upstream); both
    NaN where a is NaN. a: [B] float. Returns two [B] tensors of a's dtype.
    """
    k = (u_m - l_m) / (u_a - l_a)
    a_c = a.clamp(l_a, u_a)
    outside = (a < l_a) | (a > u_a)
    return l_m + k * (a_c - l_a), torch.where(outside, torch.zeros_like(a), k + 0.0 * a)  # 0·a: NaN for NaN a


def regularizer(a: Tensor, l_a: float, u_a: float) -> Tuple[Tensor, Tensor]:
    """MagFace's regularizer g(ã) = ã/u_a² + 1/ã and dg/da (0 outside [l_a, u_a]; both
    NaN where a is NaN).

    a: [B] float. Returns two [B] tensors of a's dtype.
    """
    a_c = a.clamp(l_a, u_a)
    outside = (a < l_a) | (a > u_a)
    g = a_c / (u_a * u_a) + 1.0 / a_c
    dg = torch.where(outside, torch.zeros_like(a), 1.0 / (u_a * u_a) - 1.0 / (a_c * a_c))
    return g, dg


def magface_lambda_g_bound(scale: float, l_a: float, u_a: float, l_m: float, u_m: float) -> float:
    """The smallest λ_g for which the MagFace paper's convergence guarantee holds:
    s·k·u_a²·l_a²/(u_a² − l_a²), k = (u_m − l_m)/(u_a − l_a) (22.6 for the defaults)."""
    k = (u_m - l_m) / (u_a - l_a)
    return scale * k * u_a * u_a * l_a * l_a / (u_a * u_a - l_a * l_a)


def sphere_lambda(iteration: Tensor, base: float = 1000.0, gamma: float = 0.12,
                  power: float = 1.0, lambda_min: float = 5.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """SphereFace's annealing weight λ = max(lambda_min, base·(1 + gamma·iter)^(−power)).

    iteration: 0-d integer tensor (the original code advances its counter before
    computing λ, so its first forward uses iter = 1). Returns a 0-d tensor of ``dtype``
    (the loss's compute dtype: float64 for float64 inputs) on the same device.
    """
    lam = base * (1.0 + gamma * iteration.to(dtype)).pow(-power)
    return lam.clamp_min(lambda_min)


# -- ψ and its derivatives ----------------------------------------------------------------
def _combined_terms(c: Tensor, m1: float, m2, m3, boundary: int):
    """ψ = cos(m1θ + m2) − m3 with the boundary policy; m2, m3 are floats or [B] tensors,
    c is already clamped to [−1, 1].

    Returns ψ, ∂ψ/∂c, ∂ψ/∂m2 (∂ψ/∂m3 is −1 in the margin branch and 0 or −1 in the
    fallback; it is returned too).
    """
    m2 = torch.as_tensor(m2, dtype=c.dtype, device=c.device)
    m3 = torch.as_tensor(m3, dtype=c.dtype, device=c.device)
    if boundary == CLIP:
        return _clipped_terms(c, m1, m2, m3)
    one_minus_c2 = 1.0 - c * c
    sin_t = one_minus_c2.clamp_min(0.0).sqrt()
    sin_div = one_minus_c2.clamp_min(SIN_EPS).sqrt()
    if m1 == 1.0:
        cos_m2, sin_m2 = torch.cos(m2), torch.sin(m2)
        body = c * cos_m2 - sin_t * sin_m2          # cos(θ + m2)
        sin_body = sin_t * cos_m2 + c * sin_m2      # sin(θ + m2)
    else:
        arg = m1 * torch.acos(c) + m2
        body, sin_body = torch.cos(arg), torch.sin(arg)
    psi = body - m3
    dpsi_dc = m1 * sin_body / sin_div
    dpsi_dm2 = -sin_body
    dpsi_dm3 = torch.full_like(c, -1.0)
    if boundary == NONE:
        return psi, dpsi_dc, dpsi_dm2, dpsi_dm3

    # θ_t = (π − m2)/m1 ≤ π by MarginSpec's validation; the margin branch is θ < θ_t.
    theta_t = (math.pi - m2) / m1
    cos_t, sin_tt = torch.cos(theta_t), torch.sin(theta_t)
    in_margin = ~(c <= cos_t)                   # a NaN c takes the margin branch (its formula keeps NaN)
    one = torch.ones_like(c)
    zero = torch.zeros_like(c)
    if boundary == EASY:
        keep = in_margin & ~(c <= 0)
        return (torch.where(keep, psi, c), torch.where(keep, dpsi_dc, one),
                torch.where(keep, dpsi_dm2, zero), torch.where(keep, dpsi_dm3, zero))
    a_term = (math.pi - theta_t) * sin_tt
    b_term = 1.0 + cos_t
    use_a = a_term >= b_term
    mm = torch.where(use_a, a_term, b_term)
    # d mm / d m2 = d mm / d θ_t · (−1/m1)
    dmm_dtheta = torch.where(use_a, -sin_tt + (math.pi - theta_t) * cos_t, -sin_tt)
    dmm_dm2 = -dmm_dtheta / m1
    return (torch.where(in_margin, psi, c - m3 - mm), torch.where(in_margin, dpsi_dc, one),
            torch.where(in_margin, dpsi_dm2, -dmm_dm2 * one), dpsi_dm3)


def _clipped_terms(c: Tensor, m1: float, m2: Tensor, m3: Tensor):
    """The CLIP boundary (AdaFace's code): θ = acos(clamp(c, −1 + ε, 1 − ε)),
    ψ = cos(clamp(m1·θ + m2, ε, π − ε)) − m3, with the derivatives of that formula (0 where
    a clamp is active; a NaN c fails every comparison and keeps its NaN derivative)."""
    eps = CLIP_EPS
    c_in = c.clamp(-1.0 + eps, 1.0 - eps)
    arg = m1 * torch.acos(c_in) + m2
    arg_in = arg.clamp(eps, math.pi - eps)
    sin_arg = torch.sin(arg_in)
    clamped = (c < -1.0 + eps) | (c > 1.0 - eps) | (arg < eps) | (arg > math.pi - eps)
    zero = torch.zeros_like(c)
    dpsi_dc = torch.where(clamped, zero, m1 * sin_arg / (1.0 - c_in * c_in).sqrt())
    dpsi_dm2 = torch.where((arg < eps) | (arg > math.pi - eps), zero, -sin_arg)
    return torch.cos(arg_in) - m3, dpsi_dc, dpsi_dm2, torch.full_like(c, -1.0)


def _chebyshev(c: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """T_m(c) = cos(m·acos c) and its derivative m·U_{m−1}(c), by recurrence."""
    t_prev, t = torch.ones_like(c), c
    u_prev, u = torch.zeros_like(c), torch.ones_like(c)   # U_{-1}, U_0
    if m == 0:
        return t_prev, torch.zeros_like(c)
    for _ in range(m - 1):
        t_prev, t = t, 2 * c * t - t_prev
        u_prev, u = u, 2 * c * u - u_prev
    return t, m * u


def margin_terms(c: Tensor, a: Tensor, spec: MarginSpec, lam: Optional[Tensor] = None,
                 row_margins: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """ψ(c, a), ∂ψ/∂c and ∂ψ/∂a for one label cosine per row.

    c: [B] label cosines (any float dtype; clamped to [−1, 1] here), a: [B] magnitudes
    ‖x_i‖ of the same dtype, lam: SphereFace's 0-d annealing weight λ (required for
    SPHERE), row_margins: None or [B, 2] per-row (m2_i, m3_i) of the COMBINED family
    (AdaFace, ElasticFace; treated as constants: no derivative). Returns three [B] tensors
    of c's dtype. Derivatives are exact (almost everywhere) unless ``spec.straight_through``.
    """
    c = c.clamp(-1.0, 1.0)
    zero = torch.zeros_like(c)
    check_row_margins_family(spec, row_margins)
    if spec.kind == COMBINED:
        m2, m3 = (spec.m2, spec.m3) if row_margins is None else (row_margins[:, 0].to(c.dtype),
                                                                 row_margins[:, 1].to(c.dtype))
        psi, dc, _, _ = _combined_terms(c, spec.m1, m2, m3, spec.boundary)
        da = zero
    elif spec.kind == MAGFACE:
        m, dm = magnitude_margin(a, spec.l_a, spec.u_a, spec.l_m, spec.u_m)
        psi, dc, dm2, _ = _combined_terms(c, 1.0, m, 0.0, spec.boundary)
        da = dm2 * dm
    elif spec.kind == MAGCOS:
        m, dm = magnitude_margin(a, spec.l_a, spec.u_a, spec.l_m, spec.u_m)
        psi, dc, da = c - m, torch.ones_like(c), -dm
    elif spec.kind == SPHERE:
        if lam is None:
            raise ValueError("sphere_lambda: SphereFace needs the annealing weight lambda")
        mi = int(spec.m1)
        t, dt = _chebyshev(c, mi)
        k = torch.floor(mi * torch.acos(c) / math.pi).clamp(0, mi - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        lam = lam.to(c.dtype)
        psi = (lam * c + sign * t - 2.0 * k) / (1.0 + lam)
        dc = (lam + sign * dt) / (1.0 + lam)
        da = zero
    else:
        raise ValueError(f"kind: unknown margin family {spec.kind}")
    if spec.straight_through:
        dc = torch.ones_like(c)
    return psi, dc, da


# -- per-class margins ------------------------------------------------------------------------------
def check_float_table(name: str, table, shape: Tuple[int, ...], *, device=None, what: str = "row",
                      upper: Optional[float] = None, upper_text: str = "", values: bool = True) -> Tensor:
    """``table`` when it is a floating tensor of ``shape`` (on ``device`` when given) whose values
    are finite and ≥ 0 (and < ``upper`` when given); TypeError/ValueError naming ``name``
    otherwise. The value check reads one flag back (a host synchronization); it is skipped with
    ``MAGLOSS_CHECK_INPUTS=off`` and under ``torch.compile`` (a read-back would break the graph).
    ``what`` names the first index in the message ("row", "class"); ``values=False`` checks the
    metadata only (no read-back). Shared by ``sample_weight`` and ``class_margins``."""
    from .checks import input_check_mode       # checks imports this module

    if not isinstance(table, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(table).__name__}")
    if not table.is_floating_point():
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {table.dtype}")
    if tuple(table.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(table.shape)}")
    if device is not None and table.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device} (the embeddings' device), got {table.device}")
    if not values or torch.compiler.is_compiling() or input_check_mode() == "off" or table.device.type == "meta":
        return table
    t = table.detach()
    bad = ~torch.isfinite(t) | (t < 0)
    if upper is not None:
        bad = bad | (t >= upper)
    if bool(bad.any()):
        flat = int(bad.flatten().nonzero()[0])
        index = flat if t.dim() < 2 else f"{flat // t.shape[1]}, column {flat % t.shape[1]}"
        rng = f"in [0, {upper_text or upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name}: expected finite values {rng}, got {t.flatten()[flat].item()} at {what} {index}")
    return table


#: Which margin a [C] table of per-class margins sets: m2 (an angle, radians) or m3 (a cosine).
CLASS_M2, CLASS_M3 = 0, 1


def check_class_margins(spec: MarginSpec, class_margins, num_classes: int, column: Optional[int],
                        device=None) -> Tensor:
    """Validate a per-class margin table for ``spec`` (ValueError/TypeError naming
    ``class_margins``) and return it.

    Per-class margins replace m2 and/or m3 of the COMBINED family row by row (the engine's
    per-row margins), so ``spec.kind`` must be COMBINED. ``column`` CLASS_M2: a [C] table of
    additive angular margins m2_c in radians (ArcFace, Sub-center ArcFace); CLASS_M3: a [C]
    table of cosine margins m3_c (CosFace); None: a [C, 2] table of (m2_c, m3_c) (combined
    margin). Every value finite and ≥ 0, angles below π and, for m1 < 1, at least (1 − m1)·π
    (the rule of :meth:`MarginSpec.combined` that keeps ψ a penalty)."""
    if spec.kind != COMBINED:
        raise ValueError(f"class_margins: per-class margins replace m2/m3 of the COMBINED margin family "
                         f"(kind {COMBINED}: ArcFace, CosFace, combined, Sub-center ArcFace), got kind {spec.kind}")
    pair = column is None
    table = check_float_table("class_margins", class_margins, (num_classes, 2) if pair else (num_classes,),
                              device=device, what="class")
    if column == CLASS_M2 or pair:
        check_float_table("class_margins" + ("[:, 0] (m2)" if pair else ""), table[:, 0] if pair else table,
                          (num_classes,), what="class", upper=math.pi, upper_text="pi")
        low = (1.0 - spec.m1) * math.pi
        if low > 0 and not torch.compiler.is_compiling() and table.device.type != "meta":
            m2 = (table[:, 0] if pair else table).detach()
            if bool((m2 < low - 1e-12).any()):
                j = int((m2 < low - 1e-12).nonzero()[0])
                raise ValueError(f"class_margins: with m1={spec.m1} < 1 the margin is a penalty on all of [0, pi] "
                                 f"only if m2 >= (1 - m1)*pi = {low:.4f}, got {m2[j].item()} at class {j}")
    return table


def class_row_margins(class_margins: Tensor, labels: Tensor, ignore_index: int, column: Optional[int],
                      dtype: torch.dtype) -> Tensor:
    """The engine's per-row margins [B, 2] = (m2_i, m3_i) of a validated per-class table
    (:func:`check_class_margins`) looked up by label: row i gets its class's margins (the other
    column 0 for a [C] table); rows labelled ``ignore_index`` get 0 (unused). ``dtype``: the
    compute dtype; contiguous, no gradient. A label outside [0, C) is clamped here (the engine
    raises the error). No host synchronization."""
    with torch.no_grad():
        valid = labels != ignore_index
        lab = torch.where(valid, labels, torch.zeros_like(labels)).long().clamp(0, class_margins.shape[0] - 1)
        m = class_margins.detach().to(device=labels.device, dtype=dtype).index_select(0, lab)
        if column is None:
            return torch.where(valid.unsqueeze(1), m, torch.zeros_like(m)).contiguous()
        m = torch.where(valid, m, torch.zeros_like(m))
        zero = torch.zeros_like(m)
        return torch.stack([m, zero] if column == CLASS_M2 else [zero, m], dim=1).contiguous()


def class_count_margins(counts, a: float = 0.45, lam: float = 0.25, b: float = 0.05, *, normalize: bool = True,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-class margins from class sizes, larger for rarer classes ("adaptive margins").

    With r_c = n_c^(−λ):

    * ``normalize=True`` (default): m_c = a·(r_c − min_k r_k)/(max_k r_k − min_k r_k) + b, so the
      margins span [b, a + b], b for the largest class and a + b for the smallest. This is the
      formula of Ha et al., "Google Landmark Recognition 2020 Competition Third Place Solution"
      (arXiv:2010.05350), whose code computes n^(−1/4) from the class counts and min-max scales it
      with a = 0.45, b = 0.05 (the defaults here; λ = 1/4). When every class has the same count,
      every margin is b.
    * ``normalize=False``: m_c = a·n_c^(−λ) + b, the raw power law.

    counts: [C] class sizes n_c (a tensor or a sequence; integers or positive reals, e.g. effective
    numbers of samples), each > 0. a, b ≥ 0, λ ≥ 0, finite. Returns a [C] tensor of ``dtype``
    (float32 by default) on the counts' device, computed in float64. The unit is the caller's: pass
    it as ``class_margins`` of ArcFace (radians; keep a + b below π) or CosFace (cosine units).
    Recompute it when the counts change and hand it to ``set_class_margins``.

    Raises ValueError naming ``counts`` (not 1-D, empty, a count that is not finite, negative or
    zero: n^(−λ) is infinite there; drop classes without samples or count them as 1) or ``a``,
    ``lam``, ``b``.
    """
    a = check_non_negative("a", a)
    lam = check_non_negative("lam", lam, "exponent")
    b = check_non_negative("b", b)
    check_bool("normalize", normalize)
    if not isinstance(counts, Tensor):
        try:
            counts = torch.as_tensor(counts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"counts: expected a 1-D tensor or sequence of class sizes, got "
                            f"{type(counts).__name__}") from None
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"counts: expected integer or real class sizes, got {counts.dtype}")
    if counts.dim() != 1 or counts.shape[0] == 0:
        raise ValueError(f"counts: expected a non-empty 1-D [C] tensor of class sizes, got shape {list(counts.shape)}")
    n = counts.detach().to(torch.float64)
    bad = ~torch.isfinite(n) | (n <= 0)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise ValueError(f"counts: expected finite positive class sizes, got {n[j].item():g} at class {j}"
                         + (" (n^(-lam) is infinite for an empty class: drop it or count it as 1)"
                            if n[j].item() == 0 else ""))
    r = n.pow(-lam)
    if normalize:
        lo, hi = r.min(), r.max()
        span = hi - lo
        r = torch.where(span > 0, (r - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(r))
    return (a * r + b).to(dtype)
