"""What the fused engine's parity suites share: the margin families, the float64 oracle, the
same-precision eager baseline and the tolerances (docs/cuda.md).

Used by tests/test_cuda_parity.py (the compiled extension on a GPU) and by
tests/test_engine_emulated.py (the same kernels under the CPU emulator, tests/emu). No device
is assumed here: tensors are created on ``device`` (CPU by default).

"rel" error = max |fused − oracle| / max |oracle| over the whole tensor.
* fp32, TF32 off: per-row loss and row statistics rel ≤ 1e-5, gradients rel ≤ 1e-4;
* TF32, fp16, bf16: error vs float64 ≤ 2 × the error of an eager same-precision baseline
  (+ a tiny floor), the baseline being the reference math with the cosine matrix computed
  by a matmul in that precision and the margin/softmax in fp32, differentiated by autograd;
* the plain-fp32 (SIMT) products on fp16/bf16 inputs: fp32 math on the rounded inputs, so the
  loss as fp32 and the gradients within 2 eps of the dtype (one rounding on output).
"""

from __future__ import annotations

import contextlib
import math

import torch

from _feature_cases import row_margins
from magloss import reference
from magloss.margins import MarginSpec

# name -> (spec, sphere lambda or None)
FAMILIES = {
    "normface": (MarginSpec.combined(64.0, 1.0, 0.0, 0.0), None),
    "cosface": (MarginSpec.combined(64.0, 1.0, 0.0, 0.35), None),
    "arcface": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0), None),
    "arcface_easy": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0, easy_margin=True), None),
    "arcface_st": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0, straight_through=True), None),
    "combined": (MarginSpec.combined(64.0, 0.9, 0.4, 0.15), None),
    "combined_m1_gt1": (MarginSpec.combined(32.0, 1.35, 0.0, 0.0), None),
    "sphereface": (MarginSpec.sphere(4), 5.0),             # logits scaled by ||x_i||
    "sphereface_s": (MarginSpec.sphere(3, scale=30.0), 0.0),
    "magface": (MarginSpec.magface(), None),
    "magface_threshold": (MarginSpec.magface(easy_margin=False), None),
    "magcos": (MarginSpec.magcos(), None),
}
ALL = list(FAMILIES)
PRECISION_DTYPES = {"tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    return err / scale if scale > 0 else err


def abs_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref.double()).abs().max().item()


def make_case(B, C, D, *, seed=0, ignored=(), ignore_index=-1, norm_range=(5.0, 120.0), label_dtype=torch.int64,
              device="cpu"):
    """float64 inputs: magnitudes in norm_range (both sides of MagFace's [10, 110]),
    weight rows of varied norm, half the rows pulled towards their class centre (so the label
    cosine covers the margin branch, not only c ≈ 0), some rows ignored."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    pull = (torch.rand(B, generator=g) < 0.5).double() * (0.3 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64))
    x = x + pull.unsqueeze(1) * w[y] / w[y].norm(dim=1, keepdim=True)
    lo, hi = norm_range
    mags = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * mags.unsqueeze(1)
    for i in ignored:
        if i < B:
            y[i] = ignore_index
    grads = [torch.randn(B, generator=g, dtype=torch.float64) for _ in range(4)]
    return x.to(device), w.to(device), y.to(label_dtype).to(device), [t.to(device) for t in grads]


def lam_tensor(lam, device="cpu"):
    return None if lam is None else torch.tensor(float(lam), device=device)


NO_EXTRAS = (None, None, None)


def as_dtype(extras, dtype):
    """The optional op tensors (row_margins, neg_threshold, neg_t) in ``dtype`` (None stays None)."""
    return tuple(None if t is None else t.to(dtype) for t in extras)


def oracle(x, w, y, spec, ii, lam, grads, extras=NO_EXTRAS):
    """float64 reference statistics and gradients. extras: (row_margins, neg_threshold, neg_t),
    given in float32 (what the fused op sees) and passed to the oracle exactly, in float64."""
    lam64 = None if lam is None else lam.double()
    x64, w64 = x.double(), w.double()
    ex64 = as_dtype(extras, torch.float64)
    lse, zy, reg, norms = reference.margin_ce_rows(x64, w64, y, spec, ii, lam64, *ex64)
    gx, gw = reference.margin_ce_backward(*grads, x64, w64, y, lse, spec, ii, lam64, *ex64)
    return (lse, zy, reg, norms), (gx, gw)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for cuBLAS fp32 matmuls on/off. Uses the legacy flag, whose setter keeps torch's
    legacy and new (fp32_precision) settings consistent."""
    m = torch.backends.cuda.matmul
    old = m.allow_tf32
    m.allow_tf32 = enabled
    try:
        yield
    finally:
        m.allow_tf32 = old


def assert_fp32_parity(rows, grads, ref_rows, ref_grads, what=""):
    lse, zy, reg, norms = rows
    rlse, rzy, rreg, rnorms = ref_rows
    assert rows[0].dtype == torch.float32
    errs = {
        "loss": rel(lse - zy, rlse - rzy),
        "lse": rel(lse, rlse),
        "zy": rel(zy, rzy) if rzy.abs().max() > 0 else abs_err(zy, rzy),
        "reg": rel(reg, rreg) if rreg.abs().max() > 0 else abs_err(reg, rreg),
        "norms": rel(norms, rnorms),
    }
    for k, e in errs.items():
        assert e <= 1e-5, f"{what} {k}: rel error {e:.3g} > 1e-5 ({errs})"
    for name, g, r in (("grad_embeddings", grads[0], ref_grads[0]), ("grad_weight", grads[1], ref_grads[1])):
        e = rel(g, r)
        assert e <= 1e-4, f"{what} {name}: rel error {e:.3g} > 1e-4"


def eager_lowp(x, w, y, spec, ii, lam, grads, precision, extras=NO_EXTRAS):
    """Eager baseline in `precision` ('tf32', 'fp16', 'bf16'): the reference math with the cosine
    matrix from a matmul in that precision, margin/softmax in fp32; gradients by autograd."""
    dt = PRECISION_DTYPES[precision]
    xd = x.to(dt).detach().requires_grad_()
    wd = w.to(dt).detach().requires_grad_()
    with tf32(precision == "tf32"):
        rows = reference.margin_ce_rows(xd, wd, y, spec, ii, lam, *as_dtype(extras, torch.float32), product_dtype=dt)
        total = sum((gg.float() * t).sum() for gg, t in zip(grads, rows))
        gx, gw = torch.autograd.grad(total, (xd, wd))
    return tuple(t.detach() for t in rows), (gx, gw)


def assert_within_eager(pairs, what=""):
    """pairs: (name, fused, eager baseline, float64 oracle). Fused error ≤ 2 × eager error + floor."""
    for name, got, base, ref in pairs:
        e_fused, e_eager = abs_err(got, ref), abs_err(base, ref)
        # Floor: fp32 noise, or half an ulp of the output dtype (gradients are returned in fp16/bf16,
        # so one rounding of the result is irreducible even when the eager error happens to be 0).
        out_eps = torch.finfo(got.dtype).eps / 2 if got.dtype in (torch.float16, torch.bfloat16) else 0.0
        floor = max(1e-5, out_eps) * ref.abs().max().item()
        assert e_fused <= 2 * e_eager + floor, (
            f"{what} {name}: fused error {e_fused:.3g} > 2 x eager {e_eager:.3g} (+{floor:.2g})")


def assert_rounded_fp32_parity(rows, grads, ref_rows, ref_grads, dtype):
    """fp32 math on fp16/bf16-rounded inputs (the SIMT products): the loss as fp32, the
    gradients only rounded on output."""
    assert rel(rows[0] - rows[1], ref_rows[0] - ref_rows[1]) <= 1e-5
    eps = torch.finfo(dtype).eps
    assert rel(grads[0], ref_grads[0]) <= 2 * eps
    assert rel(grads[1], ref_grads[1]) <= 2 * eps


# ---- the engine's general features: per-row margins with the CLIP/NONE policies,
# the curricular modulation of the non-label columns, sub-centers, and their combinations ----------
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
    y = y_rows // K
    for i in ignored:
        if i < B:
            y[i] = ignore_index
    return x.to(device), w.to(device), y.to(device), grads


def label_cosines(x, w, y, K, ignore_index=-1):
    """float64 class cosine of each row's label (the max over its K sub-centers); 0 where ignored."""
    x, w = x.double().cpu(), w.double().cpu()
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    cos = cos.view(x.shape[0], -1, K).amax(dim=2)
    yc = y.cpu().clamp_min(0)
    return torch.where(y.cpu() == ignore_index, torch.zeros(()), cos.gather(1, yc[:, None])[:, 0].double())


def _row_margins(kind, B, g):
    """The per-row (m2_i, m3_i) of tests/_feature_cases.py (AdaFace's, ElasticFace's); for AdaFace
    ẑ = −1 on row 1 and ẑ = 1 on row 3, so CLIP's angle clamp is active on both sides (row 1 has
    θ near π, row 3 θ = 0.2: see make_feature_case)."""
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


def _arc(boundary=0):
    return MarginSpec.combined(64.0, 1.0, 0.5, 0.0, boundary=boundary)


# name -> (spec, sphere lambda or None, K, kind of row margins (tests/_feature_cases.py) or None, curricular on/off)
FEATURES = {
    "adaface_clip": (MarginSpec.combined(64.0, 1.0, 0.0, 0.0, boundary=2), None, 1, "adaface", False),
    "elastic_arc_none": (MarginSpec.combined(64.0, 1.0, 0.5, 0.0, boundary=3), None, 1, "elastic_arc", False),
    "elastic_cos_none": (MarginSpec.combined(64.0, 1.0, 0.0, 0.35, boundary=3), None, 1, "elastic_cos", False),
    "rowm_threshold": (_arc(0), None, 1, "elastic_arc", False),
    "rowm_easy_m1": (MarginSpec.combined(32.0, 0.9, 0.4, 0.1, boundary=1), None, 1, "elastic_arc", False),
    "curricular": (_arc(0), None, 1, None, True),
    "sphere_curricular": (MarginSpec.sphere(4), 5.0, 1, None, True),
    "subcenter_arc": (_arc(0).with_subcenters(3), None, 3, None, False),
    "subcenter_magface": (MarginSpec.magface().with_subcenters(3), None, 3, None, False),
    "subcenter_sphere_curricular": (MarginSpec.sphere(3).with_subcenters(2), 5.0, 2, None, True),
    "subcenter_adaface_curricular": (MarginSpec.combined(64.0, 1.0, 0.0, 0.0, boundary=2).with_subcenters(3), None, 3,
                                     "adaface", True),
}


def feature_inputs(name, B, C, D, *, seed=0, ignored=(), ignore_index=-1, device="cpu"):
    """(x, w, y, grads, spec, lam, extras) of a FEATURES row; extras = (row_margins, neg_threshold,
    neg_t) in float32 (the fused engine's compute dtype; :func:`oracle` widens them exactly)."""
    spec, lam, K, margins, curr = FEATURES[name]
    x, w, y, grads = make_feature_case(B, C, D, K, seed=seed, ignored=ignored, ignore_index=ignore_index,
                                       device=device)
    g = torch.Generator().manual_seed(seed + 2000)
    rm = None if margins is None else _row_margins(margins, B, g).float().to(device)
    tau = t = None
    if curr:
        tau, t = _curricular_inputs(x, w, y, K, ignore_index)
        tau, t = tau.float().to(device), t.float().to(device)
    return x, w, y, grads, spec, lam_tensor(lam, device), (rm, tau, t)
