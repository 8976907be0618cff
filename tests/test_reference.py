"""The reference losses against gradcheck, the upstream implementations, and the
invariances every correct implementation has. All float64."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

import magloss
import magloss.functional as MF
from magloss.margins import MAGCOS, MAGFACE
from cases import ALL, FAMILIES, FP64_TOL, loss_functional, make_inputs
import upstream


def _by_norm(name):
    """SphereFace with the feature-norm scale: logits scaled by ‖x_i‖, no s."""
    return name in FAMILIES and FAMILIES[name].spec.scale_by_norm


# every plain margin family (tests/cases.py) at s = 30, and softmax; the per-row-margin, curricular and
# sub-center losses are tests/test_reference_features.py's and tests/test_adaptive_losses.py's
LOSSES = {n: loss_functional(n) if _by_norm(n) else functools.partial(loss_functional(n), scale=30.0) for n in ALL}
LOSSES["softmax"] = loss_functional("softmax")


def _inputs(loss, B=6, C=5, D=8, **kw):
    # SphereFace with feature-norm scale needs small magnitudes to keep the softmax non-degenerate
    norm_range = (0.5, 3.0) if _by_norm(loss) else (15.0, 100.0)
    return make_inputs(B, C, D, norm_range=norm_range, **kw)


EXACT = sorted(set(LOSSES) - {"arcface_st"})   # straight-through is, by design, not the derivative


@pytest.mark.parametrize("loss", EXACT)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(loss, reduction):
    x, w, y = _inputs(loss, ignored=(2,))
    fn = LOSSES[loss]
    assert torch.autograd.gradcheck(lambda x, w: fn(x, w, y, reduction=reduction),
                                    (x.requires_grad_(), w.requires_grad_()), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_straight_through_is_not_the_exact_gradient():
    x, w, y = _inputs("arcface_st")
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x: LOSSES["arcface_st"](x, w, y), (x.requires_grad_(),), eps=1e-6,
                                 atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("B,C,D", [(1, 1, 3), (4, 7, 16), (9, 1000, 32)])
def test_matches_insightface_arcface(B, C, D):
    x, w, y = make_inputs(B, C, D, ignored=(0,) if B > 1 else ())
    for easy in (False, True):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        ours = MF.arcface_loss(xa, wa, y, 64.0, 0.5, easy)
        ref = upstream.insightface_arcface(xb, wb, y, 64.0, 0.5, easy)
        if B == 1 and int(y[0]) == -1:
            continue
        ours.backward()
        ref.backward()
        torch.testing.assert_close(ours, ref, **FP64_TOL)
        torch.testing.assert_close(xa.grad, xb.grad, **FP64_TOL)
        torch.testing.assert_close(wa.grad, wb.grad, **FP64_TOL)


def test_straight_through_matches_insightface_no_grad():
    x, w, y = make_inputs(8, 11, 16, ignored=(3,))
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    MF.arcface_loss(xa, wa, y, 64.0, 0.5, straight_through=True).backward()
    upstream.insightface_arcface_no_grad(xb, wb, y, 64.0, 0.5).backward()
    torch.testing.assert_close(xa.grad, xb.grad, **FP64_TOL)
    torch.testing.assert_close(wa.grad, wb.grad, **FP64_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cosface(reduction):
    x, w, y = make_inputs(7, 13, 16, ignored=(1, 4))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = MF.cosface_loss(xa, w, y, 64.0, 0.35, reduction=reduction)
    ref = upstream.cosface(xb, w, y, 64.0, 0.35, reduction=reduction)
    torch.testing.assert_close(ours, ref, **FP64_TOL)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **FP64_TOL)


@pytest.mark.parametrize("m", [(1.0, 0.3, 0.2), (0.9, 0.4, 0.15), (1.0, 0.5, 0.0), (1.2, 0.1, 0.05)])
def test_combined_margin_matches_mxnet_form_and_uses_all_three(m):
    # angles kept away from the boundary region so the unbounded upstream form is valid
    x, w, y = make_inputs(6, 9, 16)
    with torch.no_grad():
        w[y] = x / x.norm(dim=1, keepdim=True) + 0.5 * w[y] / w[y].norm(dim=1, keepdim=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = MF.combined_margin_loss(xa, w, y, 64.0, *m)
    ref = upstream.mxnet_combined(xb, w, y, 64.0, *m)
    torch.testing.assert_close(ours, ref, **FP64_TOL)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **FP64_TOL)
    # each margin matters: changing any one of them changes the loss
    for i in range(3):
        other = list(m)
        other[i] += 0.05
        assert abs(float(MF.combined_margin_loss(x, w, y, 64.0, *other)) - ours.item()) > 1e-6


@pytest.mark.parametrize("easy_margin", [True, False])
@pytest.mark.parametrize("norm_range", [(15.0, 100.0), (2.0, 150.0)])
def test_matches_official_magface(easy_margin, norm_range):
    x, w, y = make_inputs(10, 17, 32, norm_range=norm_range)
    w_dc = w.t().contiguous()
    crit = magloss.MagFaceLoss(32, 17, easy_margin=easy_margin, dtype=torch.float64)
    magloss.load_magface_weight(crit, {"module.fc.weight": w_dc})
    torch.testing.assert_close(crit.weight.detach(), w, rtol=0, atol=0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wb = w_dc.clone().requires_grad_()
    out = crit(xa, y, return_parts=True)
    loss, loss_id, loss_g = upstream.magface_official(xb, wb, y, easy_margin=easy_margin)
    torch.testing.assert_close(out.loss, loss, **FP64_TOL)
    torch.testing.assert_close(out.ce, loss_id, **FP64_TOL)
    torch.testing.assert_close(out.reg, loss_g, **FP64_TOL)
    torch.testing.assert_close(out.norms, x.norm(dim=1), **FP64_TOL)
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **FP64_TOL)
    torch.testing.assert_close(crit.weight.grad, wb.grad.t(), **FP64_TOL)


@pytest.mark.parametrize("m,lam", [(4, 0.0), (4, 5.0), (2, 100.0), (3, 1.5), (1, 0.0)])
def test_matches_asoftmax(m, lam):
    x, w, y = make_inputs(8, 10, 16, norm_range=(0.5, 4.0))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    ours = MF.sphereface_loss(xa, wa, y, m, None, lam)
    ref = upstream.sphereface_asoftmax(xb, wb, y, m, lam)
    torch.testing.assert_close(ours, ref, **FP64_TOL)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **FP64_TOL)
    torch.testing.assert_close(wa.grad, wb.grad, **FP64_TOL)


ZERO_MARGIN = [
    ("normface", lambda x, w, y: MF.normface_loss(x, w, y, 64.0), 64.0),
    ("cosface", lambda x, w, y: MF.cosface_loss(x, w, y, 64.0, 0.0), 64.0),
    ("arcface", lambda x, w, y: MF.arcface_loss(x, w, y, 64.0, 0.0), 64.0),
    ("arcface_easy", lambda x, w, y: MF.arcface_loss(x, w, y, 64.0, 0.0, easy_margin=True), 64.0),
    ("combined", lambda x, w, y: MF.combined_margin_loss(x, w, y, 64.0, 1.0, 0.0, 0.0), 64.0),
    ("magface", lambda x, w, y: MF.magface_loss(x, w, y, 64.0, l_m=0.0, u_m=0.0, lambda_g=0.0), 64.0),
    ("magcosface", lambda x, w, y: MF.magcosface_loss(x, w, y, 64.0, l_m=0.0, u_m=0.0, lambda_g=0.0), 64.0),
    ("sphereface m=1", lambda x, w, y: MF.sphereface_loss(x, w, y, 1, None, 0.0), None),
]


@pytest.mark.parametrize("name,fn,s", ZERO_MARGIN, ids=[z[0] for z in ZERO_MARGIN])
def test_zero_margin_is_cross_entropy_of_scaled_cosine(name, fn, s):
    x, w, y = make_inputs(9, 12, 16, ignored=(4,), norm_range=(0.5, 3.0) if s is None else (15.0, 100.0))
    cos = F.normalize(x) @ F.normalize(w).t()
    scale = x.norm(dim=1, keepdim=True) if s is None else s
    expected = F.cross_entropy(scale * cos, y, ignore_index=-1)
    torch.testing.assert_close(fn(x, w, y), expected, **FP64_TOL)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_permuting_classes_leaves_loss_unchanged(loss):
    x, w, y = _inputs(loss, B=7, C=9, ignored=(1,))
    perm = torch.randperm(9)
    inv = torch.argsort(perm)
    y2 = torch.where(y >= 0, inv[y.clamp_min(0)], y)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w[perm].clone().requires_grad_()
    la, lb = LOSSES[loss](xa, wa, y), LOSSES[loss](xb, wb, y2)
    torch.testing.assert_close(la, lb, **FP64_TOL)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **FP64_TOL)
    torch.testing.assert_close(wa.grad[perm], wb.grad, **FP64_TOL)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_rows_change_nothing(loss, reduction):
    x, w, y = _inputs(loss, B=5, C=6)
    extra_x, _, _ = _inputs(loss, B=3, C=6, seed=7)
    x_all = torch.cat([x[:2], extra_x, x[2:]])
    y_all = torch.cat([y[:2], torch.full((3,), -1), y[2:]])
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x_all.clone().requires_grad_(), w.clone().requires_grad_()
    la = LOSSES[loss](xa, wa, y, reduction=reduction)
    lb = LOSSES[loss](xb, wb, y_all, reduction=reduction)
    torch.testing.assert_close(la, lb, **FP64_TOL)
    la.backward()
    lb.backward()
    torch.testing.assert_close(wa.grad, wb.grad, **FP64_TOL)
    torch.testing.assert_close(xb.grad[2:5], torch.zeros_like(extra_x), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([xb.grad[:2], xb.grad[5:]]), xa.grad, **FP64_TOL)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_reductions(loss):
    x, w, y = _inputs(loss, B=6, C=5, ignored=(0, 3))
    rows = LOSSES[loss](x, w, y, reduction="none")
    assert rows.shape == (6,) and rows.dtype == torch.float64
    assert rows[0] == 0 and rows[3] == 0
    total = LOSSES[loss](x, w, y, reduction="sum")
    mean = LOSSES[loss](x, w, y, reduction="mean")
    torch.testing.assert_close(total, mean * 4, **FP64_TOL)
    if loss == "softmax" or FAMILIES[loss].spec.kind not in (MAGFACE, MAGCOS):   # their 'none' rows are CE only + λ_g·g
        torch.testing.assert_close(rows.sum(), total, **FP64_TOL)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_and_empty_batch(loss, reduction):
    x, w, y = _inputs(loss, B=4, C=5)
    y[:] = -1
    for xs, ys in ((x, y), (x[:0], y[:0])):
        xs = xs.clone().requires_grad_()
        wg = w.clone().requires_grad_()
        out = LOSSES[loss](xs, wg, ys, reduction=reduction)
        assert torch.isfinite(out).all()
        assert (out == 0).all()
        out.sum().backward()
        assert xs.grad is None or (xs.grad == 0).all()
        assert wg.grad is None or (wg.grad == 0).all()


# ---- MagFace: the paper's properties, checked numerically ----------------------------------------
def _magface_loss_vs_magnitude(theta, a_grid, lambda_g=35.0):
    """Loss of one sample whose direction is fixed at angle θ to its class centre (and at
    fixed angles to 9 other centres), as a function of its magnitude a."""
    D, C = 12, 10
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    w[0] = basis[0]
    x_hat = math.cos(theta) * basis[0] + math.sin(theta) * basis[1]
    x = a_grid.unsqueeze(1) * x_hat
    y = torch.zeros(len(a_grid), dtype=torch.long)
    return MF.magface_loss(x, w, y, 64.0, lambda_g=lambda_g, reduction="none", return_parts=True)


# The paper's theorem holds where the margin keeps the label cosine positive, θ + u_m < π/2:
# d²CE/dm² contains s·cos(θ + m), which turns negative past π/2 (checked: at θ = 1.0 the
# loss is concave near u_a). These angles are inside that domain.
PAPER_ANGLES = (0.7, 0.6, 0.5, 0.4, 0.3)


def test_magface_loss_is_strictly_convex_in_magnitude_with_one_minimizer():
    a = torch.linspace(10.0, 110.0, 2001, dtype=torch.float64)
    for theta in PAPER_ANGLES:
        out = _magface_loss_vs_magnitude(theta, a)
        total = out.loss + 35.0 * out.reg   # per-row total: CE + λ_g·g
        second = total[2:] - 2 * total[1:-1] + total[:-2]
        assert bool((second > 0).all()), f"not strictly convex at theta={theta}"
        i = int(torch.argmin(total))
        assert 0 < i < len(a) - 1, "the minimizer should be interior for these angles"


def test_magface_minimizer_grows_as_the_sample_gets_easier():
    a = torch.linspace(10.0, 110.0, 4001, dtype=torch.float64)
    minimizers = []
    for theta in PAPER_ANGLES:                        # decreasing angle: easier samples
        out = _magface_loss_vs_magnitude(theta, a)
        minimizers.append(float(a[torch.argmin(out.loss + 35.0 * out.reg)]))
    assert all(m2 > m1 for m1, m2 in zip(minimizers, minimizers[1:])), minimizers


@pytest.mark.parametrize("a,inside", [(5.0, False), (30.0, True), (80.0, True), (150.0, False)])
def test_magface_gradient_to_magnitude(a, inside):
    """With the direction fixed, the loss depends on a only through m(a) and g(a): the radial
    gradient equals dL/da by finite differences, and is zero outside [l_a, u_a]."""
    D, C = 8, 6
    x, w, y = make_inputs(1, C, D)
    x_hat = x / x.norm()
    xa = (a * x_hat).requires_grad_()
    loss = MF.magface_loss(xa, w, y, 64.0)
    loss.backward()
    radial = float(xa.grad @ x_hat.squeeze(0))
    h = 1e-5
    fd = (float(MF.magface_loss((a + h) * x_hat, w, y, 64.0)) - float(MF.magface_loss((a - h) * x_hat, w, y, 64.0))) / (2 * h)
    assert radial == pytest.approx(fd, rel=1e-5, abs=1e-9)
    if inside:
        assert abs(radial) > 1e-4
    else:
        assert abs(radial) < 1e-12   # zero up to the rounding of the tangential projection


def test_magface_margin_gradient_alone_reaches_the_magnitude():
    """λ_g = 0 isolates m(a): the radial gradient is still non-zero inside [l_a, u_a]."""
    x, w, y = make_inputs(1, 6, 8)
    x_hat = x / x.norm()
    xa = (50.0 * x_hat).requires_grad_()
    MF.magface_loss(xa, w, y, 64.0, lambda_g=0.0).backward()
    assert abs(float(xa.grad @ x_hat.squeeze(0))) > 1e-6
