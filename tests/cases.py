"""The test suite's cases, in one place: tolerances, the input factories, the margin families
(keyed by :data:`magloss.registry.LOSSES`) and the engine's feature cases.

A loss added to the registry is picked up by every table built from :data:`LOSS_NAMES`; a loss
with a margin spec must also be the ``loss`` of a :data:`FAMILIES` or :data:`FEATURES` row
(tests/test_registry.py fails until it is), and every op-level test parameterized over those
tables then covers it. Specs are not written out: each row names the registry loss and the
constructor arguments, and the spec is the one that module builds (:func:`module_spec`).

Factories (all seeded, float64-made, then cast; labels of the rows in ``ignored`` set to the
ignore index, rows past B skipped, so any batch size takes the same ``ignored``):

* :func:`make_inputs`: embeddings with magnitudes uniform in ``norm_range``, a weight with rows
  of varied norm, labels uniform: the reference and module tests' inputs;
* :func:`make_case`: the same, half the rows pulled towards their class centre (the label cosine
  covers the margin branch), magnitudes on both sides of MagFace's [10, 110], upstream gradients
  of the four row statistics; on ``device``: the engines' parity inputs;
* :func:`make_feature_case`: :func:`make_case` with K sub-centers and rows placed at the
  boundaries the per-row margins and the CLIP/NONE policies treat differently;
* :func:`feature_case` / :func:`feature_inputs`: a :data:`FEATURES` row's inputs and op
  extras, at the reference tests' scale (float64, s = 8) or the parity suites' (s as the
  module builds it, extras in float32).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from typing import Optional

import torch

import magloss.functional as MF
import magloss.onevsall as OVA
from magloss import registry
from magloss.margins import SPHERE, MarginSpec

# ---- tolerances ------------------------------------------------------------------------------------
#: The reference engine (and any float64 path) against independent float64 implementations,
#: and the class-sharded heads against the single-process loss in float64.
FP64_TOL = dict(rtol=1e-10, atol=1e-10)
#: The class-sharded heads against the single-process loss in float32 (the all-reduced lse and
#: the per-shard products add a few fp32 roundings; tests/test_distributed.py).
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
#: A float64 or float32 path against its own NaN-free call on the rows a NaN does not reach
#: (tests/test_nan.py): one rounding difference at most, from the changed reduction order.
SAME_ROWS_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}
#: The fused engine in fp32 (TF32 off) against the float64 oracle, as "rel" errors (max |got −
#: oracle| / max |oracle|): per-row loss and row statistics, gradients (docs/cuda.md).
FUSED_FP32_ROWS_REL, FUSED_FP32_GRADS_REL = 1e-5, 1e-4
#: TF32/fp16/bf16: the fused error ≤ LOWP_FACTOR × the eager same-precision baseline's error +
#: LOWP_FLOOR × max |oracle| (fp32 noise; docs/cuda.md).
LOWP_FACTOR, LOWP_FLOOR = 2, 1e-5
#: fp32 math on fp16/bf16-rounded inputs (the SIMT products): gradients within this many eps of
#: the dtype (one rounding on output).
ROUNDED_GRADS_EPS = 2
#: The chunked engine: float64 equals the reference to FP64_TOL; in fp32 the loss to this rel
#: error and the gradients to FUSED_FP32_GRADS_REL (tests/test_chunked.py).
CHUNKED_FP32_LOSS_REL = 1e-6


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref| in float64 (the absolute error where ref is all zero)."""
    ref = ref.double()
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    return err / scale if scale > 0 else err


def abs_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref.double()).abs().max().item()


# ---- factories ---------------------------------------------------------------------------------------
def _ignore(y, ignored, ignore_index):
    for i in ignored:
        if i < y.shape[0]:
            y[i] = ignore_index
    return y


def make_inputs(B, C, D, *, dtype=torch.float64, norm_range=(20.0, 90.0), ignored=(), seed=0, generator=None,
                device="cpu"):
    """x [B, D] with magnitudes uniform in ``norm_range``, w [C, D] with rows of varied norm (to
    exercise r_j), labels [B] int64 uniform in [0, C) with the rows ``ignored`` set to −1; made in
    float64 on the CPU from ``seed`` (the same numbers on every device), x and w cast to ``dtype``,
    all three moved to ``device``. ``generator``: draw from this CPU generator instead of a new one
    seeded ``seed`` (for a caller that draws more from the same stream)."""
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    lo, hi = norm_range
    mags = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * mags.unsqueeze(1)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    y = _ignore(torch.randint(0, C, (B,), generator=g), ignored, -1)
    return x.to(device, dtype), w.to(device, dtype), y.to(device)


def make_case(B, C, D, *, seed=0, ignored=(), ignore_index=-1, norm_range=(5.0, 120.0), label_dtype=torch.int64,
              device="cpu"):
    """float64 (x [B, D], w [C, D], y [B] in ``label_dtype``, four upstream gradients [B] of the
    row statistics (lse, zy, reg, norms)) on ``device``: magnitudes in norm_range (both sides of
    MagFace's [10, 110]), weight rows of varied norm, half the rows pulled towards their class
    centre (so the label cosine covers the margin branch, not only c ≈ 0), the rows ``ignored``
    set to ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    pull = (torch.rand(B, generator=g) < 0.5).double() * (0.3 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64))
    x = x + pull.unsqueeze(1) * w[y] / w[y].norm(dim=1, keepdim=True)
    lo, hi = norm_range
    mags = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * mags.unsqueeze(1)
    y = _ignore(y, ignored, ignore_index)
    grads = [torch.randn(B, generator=g, dtype=torch.float64) for _ in range(4)]
    return x.to(device), w.to(device), y.to(label_dtype).to(device), [t.to(device) for t in grads]


def make_feature_case(B, C, D, K=1, *, seed=0, ignored=(), ignore_index=-1, device="cpu"):
    """:func:`make_case` with K·C weight rows (row j·K + k = sub-center k of class j) and class
    labels in [0, C): half the rows (not row 0) pulled towards one sub-center of their class (a
    random k, so the winner varies), row 1 of every 4 turned away from it (θ_iy near π: past π − m2, where
    THRESHOLD falls back, NONE does not, CLIP clamps the angle), row 2 of every 8 put next to it
    (c = 0.9993 > 1 − 1e-3: CLIP's cosine clamp; not closer, where ∂ψ/∂c of the other policies,
    ∝ 1/sin θ, is ill-conditioned in fp32), row 3 of every 8 at θ = 0.2."""
    x, w, y_rows, grads = make_case(B, K * C, D, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1000)
    x, w, y_rows = x.cpu(), w.cpu(), y_rows.cpu()
    mags = x.norm(dim=1, keepdim=True)
    w_hat = w / w.norm(dim=1, keepdim=True)
    for i in range(B):
        if i == 0:  # never pulled: a lone row (B = 1) with a loss ≈ 0 would measure fp32's cancellation in lse − zy
            x[0] = torch.randn(D, generator=g, dtype=torch.float64)
            x[0] = x[0] / x[0].norm() * mags[0]
        elif i % 4 == 1:
            noise = 0.25 * torch.randn(D, generator=g, dtype=torch.float64) / D ** 0.5
            x[i] = (-w_hat[y_rows[i]] + noise) / (-w_hat[y_rows[i]] + noise).norm() * mags[i]
        elif i % 8 in (2, 3):
            # row 2: c_iy = 0.9993 (θ = 0.037): CLIP clamps the cosine, the others stay well-conditioned;
            # row 3: θ_iy = 0.2, where AdaFace's angle θ − 0.4·ẑ goes below ε for ẑ > 0.5
            c = 0.9993 if i % 8 == 2 else math.cos(0.2)
            u = torch.randn(D, generator=g, dtype=torch.float64)
            u = u - (u @ w_hat[y_rows[i]]) * w_hat[y_rows[i]]
            x[i] = (c * w_hat[y_rows[i]] + (1 - c * c) ** 0.5 * u / u.norm()) * mags[i]
    y = _ignore(y_rows // K, ignored, ignore_index)
    return x.to(device), w.to(device), y.to(device), grads


def lam_tensor(lam, device="cpu"):
    """SphereFace's λ as the op takes it: a 0-d float32 tensor, or None."""
    return None if lam is None else torch.tensor(float(lam), device=device)


# ---- the losses ---------------------------------------------------------------------------------------
#: Every registered loss, in the registry's order.
LOSS_NAMES = list(registry.LOSSES)
#: Options that change a loss's code path enough to be covered as loss variants of their own.
VARIANTS = {"elastic_arcface+": ("elastic_arcface", {"plus": True}),
            "elastic_cosface+": ("elastic_cosface", {"plus": True})}
#: The registered losses and their variants.
LOSS_VARIANTS = LOSS_NAMES + list(VARIANTS)


def build_loss(name, D, C, *, sharded=False, **kw):
    """The module of LOSS_VARIANTS ``name`` (its class-sharded twin with ``sharded``) for
    D-dimensional embeddings and C classes, built after ``torch.manual_seed(0)`` (the same initial
    weight every time), a seeded generator (3) for the losses that draw margins, ``kw`` passed on
    (over the variant's options: ``build_loss(name, D, C, **loss_kwargs(name))`` is fine)."""
    base, extra = VARIANTS.get(name, (name, {}))
    cls = registry.sharded(base) if sharded else registry.LOSSES[base]
    if "seed" in inspect.signature(cls).parameters:
        kw.setdefault("seed", 3)
    torch.manual_seed(0)
    return cls(D, C, **{**extra, **kw})


def _with(fn, **state):
    """fn(x, w, y, **kw) with the arguments a loss needs besides its hyperparameters (its
    batch statistics, its t, a fresh seeded generator) filled in unless given."""
    def call(x, w, y, **kw):
        extra = {k: (v() if callable(v) else v) for k, v in state.items() if k not in kw}
        return fn(x, w, y, **extra, **kw)
    call.__name__ = call.__qualname__ = fn.__name__
    return call


def _seeded():
    return torch.Generator().manual_seed(0)


#: Each registered loss's functional form, called as fn(x, w [C, D], y, **hyperparameters): the
#: per-call arguments that are no hyperparameter are filled in (AdaFace's μ = 20, σ = 100 (its
#: modules' starting statistics), CurricularFace's t = 0.3, a fresh generator seeded 0 for the
#: ElasticFace draws, and one sub-center, so that w is [C, D] as for every other loss; K > 1 is
#: the FEATURES rows' and tests/test_adaptive_losses.py's).
FUNCTIONAL = {
    "softmax": MF.softmax_loss,
    "normface": MF.normface_loss,
    "cosface": MF.cosface_loss,
    "arcface": MF.arcface_loss,
    "combined": MF.combined_margin_loss,
    "sphereface": MF.sphereface_loss,
    "magface": MF.magface_loss,
    "magcosface": MF.magcosface_loss,
    "adaface": _with(MF.adaface_loss, batch_mean=20.0, batch_std=100.0),
    "curricularface": _with(MF.curricular_face_loss, t=0.3),
    "subcenter_arcface": _with(MF.subcenter_arcface_loss, subcenters=1),
    "elastic_arcface": _with(MF.elastic_arcface_loss, generator=_seeded),
    "elastic_cosface": _with(MF.elastic_cosface_loss, generator=_seeded),
    "sface": OVA.sface_loss,
    "uniface": _with(OVA.uniface_loss, bias=2.0),
    "sphereface2": _with(OVA.sphereface2_loss, bias=-5.0),
    "p2sgrad": OVA.p2sgrad_loss,
}


def loss_kwargs(name) -> dict:
    """The tests' hyperparameters of a registered loss (or variant): its FAMILIES row's (module
    and functional forms take the same names), its VARIANTS options, or none (its defaults)."""
    if name in FAMILIES:
        return dict(FAMILIES[name].kwargs)
    return dict(VARIANTS.get(name, (name, {}))[1])


def loss_functional(name):
    """fn(x, w, y, **kw) for a FAMILIES key or a LOSS_VARIANTS name: its functional form with the
    row's hyperparameters (SphereFace's ``lambda_`` from the row's λ), ``kw`` on top."""
    f = FAMILIES.get(name)
    base = f.loss if f is not None else VARIANTS.get(name, (name, {}))[0]
    fixed = loss_kwargs(name)
    if f is not None and f.lam is not None:
        fixed["lambda_"] = f.lam
    fn = FUNCTIONAL[base]

    def call(x, w, y, **kw):
        return fn(x, w, y, **{**fixed, **kw})
    call.__name__ = call.__qualname__ = name
    return call


@functools.lru_cache(maxsize=None)
def _module_spec(name: str, kwargs: tuple) -> MarginSpec:
    with warnings.catch_warnings():            # MagFace's lambda_g bound warns on some scales
        warnings.simplefilter("ignore", UserWarning)
        return registry.LOSSES[name](4, 3, **dict(kwargs)).spec


def module_spec(name: str, **kwargs) -> MarginSpec:
    """The op-level :class:`MarginSpec` that the registry's module ``name`` builds with ``kwargs``."""
    return _module_spec(name, tuple(sorted(kwargs.items())))


@dataclasses.dataclass(frozen=True)
class Family:
    """A margin family at the op level: the registry's ``loss`` with constructor ``kwargs``
    (its spec: :func:`module_spec`) and SphereFace's λ (None for the others)."""

    loss: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    lam: Optional[float] = None

    @property
    def cls(self) -> type:
        return registry.LOSSES[self.loss]

    @property
    def spec(self) -> MarginSpec:
        return module_spec(self.loss, **self.kwargs)

    def __iter__(self):                        # unpacks as (spec, lam), as the op takes them
        return iter((self.spec, self.lam))


#: The plain margin families (no per-row margins, curricular columns or sub-centers), keyed by
#: registry name where the row is a loss at its defaults or the test's stated hyperparameters.
FAMILIES = {
    "normface": Family("normface"),
    "cosface": Family("cosface"),
    "arcface": Family("arcface"),
    "arcface_easy": Family("arcface", dict(easy_margin=True)),
    "arcface_st": Family("arcface", dict(straight_through=True)),
    "combined": Family("combined", dict(m1=0.9, m2=0.4, m3=0.15)),
    "combined_m1_gt1": Family("combined", dict(scale=32.0, m1=1.35, m2=0.0, m3=0.0)),
    "sphereface": Family("sphereface", lam=5.0),                        # logits scaled by ||x_i||
    "sphereface_s": Family("sphereface", dict(margin=3, scale=30.0), lam=0.0),
    "magface": Family("magface"),
    "magface_threshold": Family("magface", dict(easy_margin=False)),
    "magcosface": Family("magcosface"),
}
ALL = list(FAMILIES)


def family(name) -> Family:
    """FAMILIES[name], or the registry's loss ``name`` at its defaults (KeyError otherwise)."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name not in registry.LOSSES:
        raise KeyError(f"{name!r}: neither a FAMILIES row nor a registered loss")
    return Family(name)


@dataclasses.dataclass(frozen=True)
class Feature:
    """An engine feature case: a :class:`Family`, K sub-centers, the kind of per-row margins
    (``"adaface"``, ``"elastic_arc"``, ``"elastic_cos"`` or None: :func:`row_margins`) and
    whether CurricularFace modulates the non-label columns."""

    family: Family
    K: int = 1
    margins: Optional[str] = None
    curricular: bool = False

    @property
    def spec(self) -> MarginSpec:
        return self.family.spec.with_subcenters(self.K)


#: The engine's general features: per-row margins with the CLIP/NONE policies and with the
#: classic ones, CurricularFace's non-label columns, sub-centers, and their combinations.
FEATURES = {
    "adaface_clip": Feature(Family("adaface"), margins="adaface"),
    "elastic_arc_none": Feature(Family("elastic_arcface"), margins="elastic_arc"),     # m2, m3 per row only
    "elastic_cos_none": Feature(Family("elastic_cosface"), margins="elastic_cos"),
    "rowm_threshold": Feature(Family("arcface"), margins="elastic_arc"),
    "rowm_easy_m1": Feature(Family("combined", dict(scale=32.0, m1=0.9, m2=0.4, m3=0.1, easy_margin=True)),
                            margins="elastic_arc"),
    "curricular": Feature(Family("curricularface"), curricular=True),
    "sphere_curricular": Feature(Family("sphereface", lam=5.0), curricular=True),
    "subcenter_arc": Feature(Family("subcenter_arcface"), K=3),
    "subcenter_magface": Feature(Family("magface"), K=3),
    "subcenter_sphere_curricular": Feature(Family("sphereface", dict(margin=3), lam=5.0), K=2, curricular=True),
    "subcenter_adaface_curricular": Feature(Family("adaface"), K=3, margins="adaface", curricular=True),
}
#: The registry's losses with no margin spec (so no FAMILIES or FEATURES row).
NO_SPEC = {"softmax", "sface", "uniface", "sphereface2", "p2sgrad"}


def row_margins(kind, B, g, dtype=torch.float64):
    """[B, 2] per-row (m2_i, m3_i) as AdaFace (ẑ uniform in [−1, 1], m = 0.4) or ElasticFace
    (N(0.5, 0.05) angular / N(0.35, 0.05) additive) would pass them; None for kind None."""
    if kind is None:
        return None
    zero = torch.zeros(B, dtype=torch.float64)
    if kind == "adaface":
        zhat = torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1
        rm = torch.stack([-0.4 * zhat, 0.4 * zhat + 0.4], 1)
    elif kind == "elastic_arc":
        rm = torch.stack([0.5 + 0.05 * torch.randn(B, generator=g, dtype=torch.float64), zero], 1)
    else:
        rm = torch.stack([zero, 0.35 + 0.05 * torch.randn(B, generator=g, dtype=torch.float64)], 1)
    return rm.to(dtype).contiguous()


#: The reference tests' feature scale: float64 gradchecks stay well-conditioned at s = 8.
REFERENCE_FEATURE_SCALE = 8.0


def feature_case(name, B, C, D, *, seed=0, dtype=torch.float64, ignored=(2,)):
    """The reference tests' inputs for FEATURES[name], made in float64 and cast to ``dtype``:
    x [B, D] (:func:`make_inputs`), w [K·C, D], labels in [0, C) (rows ``ignored`` set to −1),
    the spec at s = 8 (SphereFace's feature-norm scale kept) with K sub-centers, SphereFace's λ,
    and the op's row_margins, neg_threshold (τ_i random in [−0.6, 0.6], +inf on the ignored
    rows, as CurricularFace's Python layer passes them), neg_t (0.35); extras in the compute
    dtype (float64 for float64, float32 otherwise)."""
    f = FEATURES[name]
    spec = f.spec
    if not spec.scale_by_norm:
        spec = dataclasses.replace(spec, scale=REFERENCE_FEATURE_SCALE)
    norm_range = (0.5, 3.0) if spec.scale_by_norm else (15.0, 60.0)
    x, w, y = make_inputs(B, C * f.K, D, norm_range=norm_range, ignored=ignored, seed=seed)
    y = torch.where(y >= 0, y % C, y)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 1)
    rm = row_margins(f.margins, B, g, ct)
    lam = None if spec.kind != SPHERE else torch.tensor(f.family.lam, dtype=ct)
    if f.curricular:
        tau = torch.rand(B, generator=g, dtype=torch.float64) * 1.2 - 0.6
        tau[y < 0] = math.inf
        nt, t = tau.to(ct), torch.tensor(0.35, dtype=ct)
    else:
        nt = t = None
    return x.to(dtype), w.to(dtype), y, spec, lam, rm, nt, t


def label_cosines(x, w, y, K, ignore_index=-1):
    """float64 class cosine of each row's label (the max over its K sub-centers); 0 where ignored."""
    x, w = x.double().cpu(), w.double().cpu()
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    cos = cos.view(x.shape[0], -1, K).amax(dim=2)
    yc = y.cpu().clamp_min(0)
    return torch.where(y.cpu() == ignore_index, torch.zeros(()), cos.gather(1, yc[:, None])[:, 0].double())


def _parity_row_margins(kind, B, g):
    """:func:`row_margins`; for AdaFace ẑ = −1 on row 1 and ẑ = 1 on row 3, so CLIP's angle
    clamp is active on both sides (row 1 has θ near π, row 3 θ = 0.2: see make_feature_case)."""
    rm = row_margins(kind, B, g)
    if kind == "adaface" and B > 3:
        rm[1] = torch.tensor([0.4, 0.0], dtype=rm.dtype)      # ẑ = −1: (−m·ẑ, m·ẑ + m)
        rm[3] = torch.tensor([-0.4, 0.8], dtype=rm.dtype)     # ẑ = 1
    return rm


def _curricular_inputs(x, w, y, K, ignore_index, m=0.5, t=0.25):
    """CurricularFace's τ_i = cos(θ_iy + m) from the label cosine (+inf on ignored rows) and t."""
    c = label_cosines(x, w, y, K, ignore_index)
    tau = torch.cos(torch.acos(c.clamp(-1, 1)) + m)
    tau = torch.where(y.cpu() == ignore_index, torch.full_like(tau, float("inf")), tau)
    return tau, torch.tensor(t, dtype=torch.float64)


def feature_inputs(name, B, C, D, *, seed=0, ignored=(), ignore_index=-1, device="cpu"):
    """The parity suites' inputs for FEATURES[name]: (x, w, y, grads, spec, lam, extras) from
    :func:`make_feature_case`, the spec as the module builds it; extras = (row_margins,
    neg_threshold, neg_t) in float32 (the fused engine's compute dtype; the oracle widens them
    exactly)."""
    f = FEATURES[name]
    x, w, y, grads = make_feature_case(B, C, D, f.K, seed=seed, ignored=ignored, ignore_index=ignore_index,
                                       device=device)
    g = torch.Generator().manual_seed(seed + 2000)
    rm = None if f.margins is None else _parity_row_margins(f.margins, B, g).float().to(device)
    tau = t = None
    if f.curricular:
        tau, t = _curricular_inputs(x, w, y, f.K, ignore_index)
        tau, t = tau.float().to(device), t.float().to(device)
    return x, w, y, grads, f.spec, lam_tensor(f.family.lam, device), (rm, tau, t)
