"""Per-row margin inputs and running state of AdaFace, CurricularFace and ElasticFace.

These losses feed the engine (``magloss::margin_ce``) tensors computed from the batch and
from a running state: per-row margins ``row_margins`` [B, 2] = (m2_i, m3_i) of
ψ_i = cos(θ_i + m2_i) − m3_i (AdaFace, ElasticFace), and CurricularFace's per-row threshold
τ_i and scalar t (``neg_threshold``, ``neg_t``). This module computes them, in the compute
dtype, without gradient, and holds the state logic shared by the single-process losses
(:mod:`magloss.losses`) and their class-sharded twins (:mod:`magloss.distributed`) as
mixins: the state lives in module buffers (saved in the ``state_dict``), is updated only
in training mode, and only after the loss was computed without error (no half-changed
state); in eval mode it is frozen.

AdaFace (Kim et al., CVPR 2022; mk-minchul/AdaFace ``head.py``). With the detached norms
a_i = clip(‖x_i‖, 0.001, 100) of the non-ignored rows, training mode first updates
μ ← α·mean(a) + (1 − α)·μ and σ ← α·std(a) + (1 − α)·σ (unbiased std, as torch.std;
α = 0.01; μ₀ = 20, σ₀ = 100), then ẑ_i = clip((a_i − μ)/(σ + ε)·h, −1, 1) (ε = 1e-3,
h = 0.333), m2_i = −m·ẑ_i, m3_i = m·ẑ_i + m (m = 0.4), with the CLIP boundary.

CurricularFace (Huang et al., CVPR 2020; HuangYG123/CurricularFace ``head/metrics.py``).
With the label cosines c_i (clamped to [−1, 1]): training mode first updates
t ← α·mean_i(c_i) + (1 − α)·t (α = 0.01, t₀ = 0), then τ_i = cos(θ_i + m) =
c_i·cos m − sqrt(1 − c_i²)·sin m (m = 0.5; +∞ for ignored rows: no modulation).

ElasticFace (Boutros et al., CVPRW 2022; fdbtrs/ElasticFace ``utils/losses.py``). In
training mode one margin per batch row (ignored rows' unused) is drawn from N(m, σ²) with
the module's ``torch.Generator`` (CPU, float64, so every device and rank draws the same numbers);
ElasticArcFace uses it as m2_i (m3_i = 0), ElasticCosFace as m3_i (m2_i = 0), with the
NONE boundary (no fallback past π, as upstream). "+" (plus): the draws are sorted and
given out by the label cosine, the largest margin to the row farthest from its class
(lowest c_i), the smallest to the closest, as the paper describes. In eval mode every
row gets m.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .margins import NORM_EPS
from .rows import compute_dtype, label_subcenters
from .validation import check_angle, check_bool, check_int_type, check_interval, check_non_negative, check_positive

__all__ = [
    "ADAFACE_EPS",
    "ADAFACE_NORM_CLIP",
    "label_cosines",
    "adaface_args",
    "adaface_statistics",
    "adaface_row_margins",
    "curricular_t",
    "curricular_threshold",
    "elastic_args",
    "elastic_draws",
    "elastic_row_margins",
    "ELASTIC_STD",
    "state_dtype",
    "AdaFaceState",
    "CurricularState",
    "ElasticState",
]

#: AdaFace's ε: added to σ in ẑ (the CLIP boundary's ε is magloss.margins.CLIP_EPS, the same 1e-3).
ADAFACE_EPS = 1e-3
#: AdaFace's "safe norms": ‖x_i‖ clipped to this range before the statistics and ẑ.
ADAFACE_NORM_CLIP = (1e-3, 100.0)

#: (row_margins, neg_threshold, neg_t, commit): what a loss's state gives the engine for one
#: forward; commit() stores the new state once the loss has been computed.
Extras = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Callable[[], None]]]


def adaface_args(margin, h) -> Tuple[float, float]:
    """AdaFace's validated (m, h): m an angle in radians in [0, π/2), h > 0 (ValueError
    naming ``margin`` or ``h``). Shared by :class:`AdaFaceState` and
    :func:`magloss.functional.adaface_loss`."""
    return check_angle("margin", margin, math.pi / 2, upper_text="pi/2"), check_positive("h", h)


def elastic_args(angular: bool, margin, std, plus) -> Tuple[float, float, bool]:
    """ElasticFace's validated (m, σ, plus): m an angle in radians in [0, π) for the angular
    variant (ElasticArcFace), a cosine margin in [0, 2) for ElasticCosFace; σ ≥ 0, finite,
    None giving the upstream default :data:`ELASTIC_STD` of (angular, plus); ``plus`` a bool.
    ValueError/TypeError naming the argument. Shared by :class:`ElasticState` and
    :func:`magloss.functional.elastic_arcface_loss`/``elastic_cosface_loss``."""
    if angular:
        margin = check_angle("margin", margin, math.pi, upper_text="pi")
    else:
        margin = check_interval("margin", margin, 2.0, what="a cosine margin")
    plus = check_bool("plus", plus)
    std = ELASTIC_STD[(bool(angular), plus)] if std is None else check_non_negative("std", std, "standard deviation")
    return margin, std, plus


def label_cosines(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -1,
                  subcenters: int = 1) -> Tensor:
    """c_i = cos θ_{i, y_i} = x̂_i·ŵ_{y_i} for every row (max over the label class's K
    sub-centers), detached, in the compute dtype; 0 for rows labelled ``ignore_index``.

    embeddings [B, D], weight [K·C, D], labels [B]. A gather-dot, O(B·K·D): no B×C matrix.
    Out-of-range labels are clamped here (the engine raises the error)."""
    ct = compute_dtype(embeddings.dtype)
    with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
        has = labels != ignore_index
        num_classes = max(weight.shape[0] // subcenters, 1)
        lab = torch.where(has, labels, torch.zeros_like(labels)).long().clamp(0, num_classes - 1)
        x = embeddings.detach().to(ct)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        c = label_subcenters(x, weight.detach(), lab, subcenters, embeddings.dtype)[3].amax(1)
        return torch.where(has, c, torch.zeros_like(c))


# -- AdaFace --------------------------------------------------------------------------------------------
def _safe_norms(norms: Tensor) -> Tensor:
    return norms.clamp(*ADAFACE_NORM_CLIP)


def _masked_moments(values: Tensor, valid: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(n, mean, unbiased std) of ``values`` over the ``valid`` rows, in ``dtype``, as
    ``values[valid].mean()`` and ``.std()`` would give them but without the boolean index
    (no data-dependent shape: ``torch.compile(fullgraph=True)`` traces it). mean and std are
    0 where undefined (n < 1, n < 2); the callers keep their state there."""
    v = torch.where(valid, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))
    n = valid.sum().to(dtype)
    mean = v.sum() / n.clamp_min(1)
    dev = torch.where(valid, v - mean, torch.zeros_like(v))
    std = ((dev * dev).sum() / (n - 1).clamp_min(1)).sqrt()
    return n, mean, std


def adaface_statistics(norms: Tensor, valid: Tensor, batch_mean: Tensor, batch_std: Tensor,
                       momentum: float) -> Tuple[Tensor, Tensor]:
    """The running (μ, σ) after one training batch: μ ← α·mean(a) + (1 − α)·μ,
    σ ← α·std(a) + (1 − α)·σ over the non-ignored rows' clipped norms a (unbiased std).
    μ is kept when no row is valid, σ when fewer than two are (a one-row std is undefined).
    norms, valid: [B]; batch_mean, batch_std: 0-d. Returns new 0-d tensors of their dtype."""
    n, mean, std = _masked_moments(_safe_norms(norms.detach()), valid, batch_mean.dtype)
    mean = torch.where(n >= 1, momentum * mean + (1 - momentum) * batch_mean, batch_mean)
    std = torch.where(n >= 2, momentum * std.to(batch_std.dtype) + (1 - momentum) * batch_std, batch_std)
    return mean, std


def adaface_row_margins(norms: Tensor, batch_mean: Tensor, batch_std: Tensor, margin: float, h: float) -> Tensor:
    """[B, 2] (m2_i, m3_i) = (−m·ẑ_i, m·ẑ_i + m), ẑ_i = clip((a_i − μ)/(σ + ε)·h, −1, 1),
    a_i = clip(norms_i, 0.001, 100); in norms' dtype, contiguous, no gradient."""
    a = _safe_norms(norms.detach())
    z = ((a - batch_mean.to(a.dtype)) / (batch_std.to(a.dtype) + ADAFACE_EPS) * h).clamp(-1.0, 1.0)
    return torch.stack([-margin * z, margin * z + margin], dim=1).contiguous()


# -- CurricularFace ---------------------------------------------------------------------------------------
def curricular_t(c_y: Tensor, valid: Tensor, t: Tensor, momentum: float) -> Tensor:
    """t after one training batch: α·mean(c_i over valid rows) + (1 − α)·t (kept when no row
    is valid). c_y, valid: [B]; t: 0-d. Returns a new 0-d tensor of t's dtype."""
    n, mean, _ = _masked_moments(c_y.detach().clamp(-1.0, 1.0), valid, t.dtype)
    return torch.where(n >= 1, momentum * mean + (1 - momentum) * t, t)


def curricular_threshold(c_y: Tensor, valid: Tensor, margin: float) -> Tensor:
    """τ_i = cos(θ_i + m) = c_i·cos m − sqrt(1 − c_i²)·sin m (c clamped to [−1, 1]), as
    CurricularFace's ``cos_theta_m``; +∞ for rows that are not ``valid``. [B], c_y's dtype."""
    c = c_y.detach().clamp(-1.0, 1.0)
    tau = c * math.cos(margin) - (1.0 - c * c).sqrt() * math.sin(margin)
    return torch.where(valid, tau, torch.full_like(tau, math.inf)).contiguous()


# -- ElasticFace --------------------------------------------------------------------------------------------
def elastic_draws(count: int, mean: float, std: float, generator: Optional[torch.Generator]) -> Tensor:
    """``count`` draws of N(mean, std²): float64 on the CPU from ``generator`` (None: torch's
    global CPU generator), so that the numbers do not depend on the device. One draw per
    batch row (ignored rows included, their draw unused): no host synchronization."""
    return torch.randn(count, generator=generator, dtype=torch.float64) * std + mean


def elastic_row_margins(draws: Tensor, valid: Tensor, angular: bool, dtype: torch.dtype,
                        c_y: Optional[Tensor] = None) -> Tensor:
    """[B, 2] row margins from the rows' draws [B]: (m_i, 0) for ElasticArcFace
    (``angular``), (0, m_i) for ElasticCosFace; 0 on rows that are not ``valid``.

    With ``c_y`` (the "+" variant) the valid rows' draws are sorted ascending and handed out
    by the label cosines in descending order (ties: the earlier row first): the row closest
    to its class centre gets the smallest margin, the farthest the largest."""
    m = draws.to(dtype=dtype, device=valid.device)
    if c_y is not None:
        # Without a boolean index (no data-dependent shape, for torch.compile): the valid rows
        # come first in both sorts, the n valid draws ascending meet the rows by descending
        # cosine; the ignored rows' slots (last) receive +inf and are zeroed below.
        c = torch.where(valid, c_y.detach().to(torch.float64), torch.full_like(c_y, -math.inf, dtype=torch.float64))
        order = torch.sort(c, descending=True, stable=True).indices
        ranked = torch.sort(torch.where(valid, m, torch.full_like(m, math.inf))).values
        m = m.scatter(0, order, ranked)
    col = torch.where(valid, m, torch.zeros_like(m))
    zero = torch.zeros_like(col)
    return torch.stack([col, zero] if angular else [zero, col], dim=1).contiguous()


# -- the state of the losses: mixins of the single-process and sharded modules --------------------------
#: The floating dtypes a loss's running state never takes: an update of α·(x − μ) with α = 0.01
#: is below half a unit in the last place of bfloat16/float16 and would round away.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(dtype) -> torch.dtype:
    """The dtype of a loss's running state for a module of ``dtype``: float64 for float64,
    float32 for anything else (float32, float16, bfloat16, None)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _KeptState:
    """Keeps the buffers named in ``_float_state`` in float32 (float64 in a float64 module)
    through ``.half()``, ``.bfloat16()`` and ``.to(dtype)``, and the buffers named in
    ``_cpu_state`` on the CPU through ``.to(device)``/``.cuda()``: both override
    :meth:`torch.nn.Module._apply`, which all of those go through. A state buffer converted to
    a low-precision dtype is replaced by its previous value in float32 (no rounding through
    the low-precision dtype). The state_dict round trip is unchanged (loading copies into
    the existing buffer, whatever the checkpoint's dtype)."""

    _float_state: Tuple[str, ...] = ()
    _cpu_state: Tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        names = self._float_state + self._cpu_state
        old = {n: self._buffers[n] for n in names if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for n, before in old.items():
            now = self._buffers[n]
            if n in self._cpu_state and now.device.type != "cpu":
                self._buffers[n] = before
            elif n in self._float_state and now.dtype in _LOW_PRECISION:
                self._buffers[n] = before.to(device=now.device, dtype=torch.float32)
        return out


class AdaFaceState(_KeptState):
    """AdaFace's running norm statistics: buffers ``batch_mean`` (μ, starts at 20) and
    ``batch_std`` (σ, starts at 100), 0-d, float32 (float64 in a float64 module) whatever
    the module's dtype (:class:`_KeptState`)."""

    _float_state = ("batch_mean", "batch_std")

    def _init_state(self, margin: float = 0.4, h: float = 0.333, momentum: float = 0.01, *, device=None,
                    dtype=None) -> None:
        self.margin, self.h = adaface_args(margin, h)
        self.momentum = check_positive("momentum", momentum, 1.0, inclusive=True)
        bdt = state_dtype(dtype)
        self.register_buffer("batch_mean", torch.full((), 20.0, dtype=bdt, device=device))
        self.register_buffer("batch_std", torch.full((), 100.0, dtype=bdt, device=device))

    def _state_kwargs(self) -> dict:
        return dict(margin=self.margin, h=self.h, momentum=self.momentum)

    def _extras(self, embeddings: Tensor, valid: Tensor, label_cosine: Callable[[], Tensor]) -> Extras:
        ct = compute_dtype(embeddings.dtype)
        with torch.no_grad():
            norms = embeddings.detach().to(ct).norm(dim=1)
            mean, std, commit = self.batch_mean, self.batch_std, None
            if self.training:
                mean, std = adaface_statistics(norms, valid, mean, std, self.momentum)

                def commit():
                    self.batch_mean.copy_(mean)
                    self.batch_std.copy_(std)
            return adaface_row_margins(norms, mean, std, self.margin, self.h), None, None, commit


class CurricularState(_KeptState):
    """CurricularFace's running t: buffer ``t`` (0-d, starts at 0), float32 (float64 in a
    float64 module) whatever the module's dtype (:class:`_KeptState`)."""

    _float_state = ("t",)

    def _init_state(self, momentum: float = 0.01, *, device=None, dtype=None) -> None:
        self.momentum = check_positive("momentum", momentum, 1.0, inclusive=True)
        self.register_buffer("t", torch.zeros((), dtype=state_dtype(dtype), device=device))

    def _state_kwargs(self) -> dict:
        return dict(momentum=self.momentum)

    def _extras(self, embeddings: Tensor, valid: Tensor, label_cosine: Callable[[], Tensor]) -> Extras:
        ct = compute_dtype(embeddings.dtype)
        with torch.no_grad():
            c = label_cosine()
            t, commit = self.t, None
            if self.training:
                t = curricular_t(c, valid, t, self.momentum)

                def commit():
                    self.t.copy_(t)
            tau = curricular_threshold(c, valid, self.spec.m2)
            return None, tau, t.to(device=embeddings.device, dtype=ct).reshape(()).contiguous(), commit


class ElasticState(_KeptState):
    """ElasticFace's margin source: the state of a CPU ``torch.Generator`` (seeded with ``seed``
    or, when None, from torch's global generator at construction), held in the non-persistent
    uint8 buffer ``rng_state`` (kept on the CPU) and saved in the state_dict through
    ``get_extra_state``, so a resumed run draws the margins it would have drawn. The draws go
    through the op ``magloss::normal_draws`` (traceable by torch.compile). ``generator`` is a
    snapshot: a new Generator in the current state (setting its state changes nothing here;
    use ``load_state_dict`` or ``rng_state.copy_``)."""

    _cpu_state = ("rng_state",)

    def _init_state(self, angular: bool = True, margin: float = 0.5, std: Optional[float] = None,
                    plus: bool = False, seed: Optional[int] = None, *, device=None, dtype=None) -> None:
        self.angular = bool(angular)
        self.margin, self.std, self.plus = elastic_args(self.angular, margin, std, plus)
        check_int_type("seed", seed, optional=True)
        self.seed = int(torch.randint(0, 2 ** 62, ())) if seed is None else seed
        self.register_buffer("rng_state", torch.Generator().manual_seed(self.seed).get_state(), persistent=False)

    @property
    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.set_state(self.rng_state.cpu())
        return g

    def _state_kwargs(self) -> dict:
        return dict(angular=self.angular, margin=self.margin, std=self.std, plus=self.plus, seed=self.seed)

    def get_extra_state(self):
        return {"generator": self.rng_state.clone()}

    def set_extra_state(self, state) -> None:
        self.rng_state.copy_(state["generator"])

    def _extras(self, embeddings: Tensor, valid: Tensor, label_cosine: Callable[[], Tensor]) -> Extras:
        ct = compute_dtype(embeddings.dtype)
        with torch.no_grad():
            b = valid.shape[0]
            if not self.training:       # eval: every row gets the mean margin
                return elastic_row_margins(torch.full((b,), self.margin, dtype=torch.float64), valid,
                                           self.angular, ct), None, None, None
            draws, after = ops.normal_draws(self.rng_state, b, self.margin, self.std)
            rm = elastic_row_margins(draws, valid, self.angular, ct, label_cosine() if self.plus else None)
            return rm, None, None, lambda: self.rng_state.copy_(after)


#: ElasticFace's σ by (angular, plus), from the upstream configs (config/config.py):
#: Arc 0.05, Cos 0.05, Arc+ 0.0175, Cos+ 0.02.
ELASTIC_STD = {(True, False): 0.05, (False, False): 0.05, (True, True): 0.0175, (False, True): 0.02}
