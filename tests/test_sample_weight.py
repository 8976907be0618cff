"""Per-sample weights (``sample_weight``) on every loss: the weighted reductions against float64
formulas over independently computed rows, gradients, every dtype, ignored rows, irregular sizes,
the bad-input errors, and what the weights must not change (AdaFace's and CurricularFace's
running state). The sharded heads and the emulated fused engine are in tests/test_class_margins.py
(one spawn and one emulator run for both features).

The semantics under test (docs/math.md, "Per-sample weights"): row i's loss L_i (CE_i, plus
λ_g·g(ã_i) for MagFace) is multiplied by w_i; 'mean' = Σ w_i·L_i / Σ w_i over the non-ignored
rows (0 when that sum is 0), 'sum' = Σ w_i·L_i, 'none' = w_i·L_i.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import magloss
import magloss.functional as MF
from cases import (ALL, FP64_TOL, LOSS_VARIANTS, build_loss, family, loss_functional, make_inputs)
from magloss import reference

IGNORED = (1, 4)


def weights(B, seed=7, dtype=torch.float64, huge=1e6):
    """w_i in [0, 2] with one exact 0 (a row that counts for nothing), ``huge`` on the ignored rows
    (which must still add nothing)."""
    g = torch.Generator().manual_seed(seed)
    w = 2 * torch.rand(B, generator=g, dtype=torch.float64)
    if B > 2:
        w[2] = 0.0
    for i in IGNORED:
        if i < B:
            w[i] = huge
    return w.to(dtype)


def expected(rows, w, valid, reduction):
    """The float64 weighted reduction of the per-row losses ``rows`` (0 on ignored rows)."""
    rows, w = rows.double(), w.double()
    wv = torch.where(valid, w, torch.zeros_like(w))
    if reduction == "none":
        return rows * w
    if reduction == "sum":
        return (rows * wv).sum()
    den = wv.sum()
    return (rows * wv).sum() / den if den > 0 else torch.zeros((), dtype=torch.float64)


def _module(name, D, C, dtype, reduction):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_loss(name, D, C, reduction=reduction).to(dtype).eval()


@pytest.mark.parametrize("B,C,D", [(1, 3, 5), (7, 11, 5), (13, 4, 17)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", LOSS_VARIANTS)
def test_every_loss_weights_its_rows(name, reduction, B, C, D):
    """Each registered loss (and variant), float64: the weighted loss and its gradients equal the
    float64 weighting of the same module's unweighted per-row losses (eval mode: a stateful loss
    gives the same rows twice)."""
    x, _, y = make_inputs(B, C, D, ignored=IGNORED, seed=B + C)
    w = weights(B)
    valid = y != -1
    m = _module(name, D, C, torch.float64, "none")
    xr = x.clone().requires_grad_(True)
    rows = m(xr, y)
    want = expected(rows, w, valid, reduction)
    gx_want, gw_want = torch.autograd.grad(want.sum(), (xr, m.weight))
    m.reduction = reduction
    xg = x.clone().requires_grad_(True)
    got = m(xg, y, sample_weight=w)
    gx, gw = torch.autograd.grad(got.sum(), (xg, m.weight))
    torch.testing.assert_close(got, want, **FP64_TOL)
    torch.testing.assert_close(gx, gx_want, **FP64_TOL)
    torch.testing.assert_close(gw, gw_want, **FP64_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fam", ALL)
def test_margin_families_against_the_reference_rows(fam, reduction):
    """The functional forms against the oracle's rows computed independently in float64:
    Σ w_i·(lse_i − zy_i + λ_g·g(ã_i)) / Σ w_i."""
    B, C, D = 9, 7, 6
    x, wt, y = make_inputs(B, C, D, ignored=IGNORED, norm_range=(5.0, 120.0), seed=3)
    spec, lam = family(fam)
    lam_t = None if lam is None else torch.tensor(lam, dtype=torch.float64)
    lse, zy, reg, _ = reference.margin_ce_rows(x, wt, y, spec, -1, lam_t)
    kw = {}
    if spec.has_regularizer:
        kw["lambda_g"] = 7.0
    rows = torch.where(y != -1, lse - zy + (kw.get("lambda_g", 0.0) * reg if spec.has_regularizer else 0), 0)
    w = weights(B, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = loss_functional(fam)(x, wt, y, reduction=reduction, sample_weight=w, **kw)
    torch.testing.assert_close(got, expected(rows, w, y != -1, reduction), **FP64_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["arcface", "magface", "softmax", "sface", "adaface", "subcenter_arcface"])
def test_low_precision_inputs(name, dtype):
    """float32/bfloat16/float16 modules: the weighting is float32 arithmetic on the float32 rows,
    so the weighted loss equals the float64 weighting of the same rows to float32 rounding, and the
    embedding gradient that of the weighted rows to one rounding of the dtype."""
    B, C, D = 11, 9, 8
    x, _, y = make_inputs(B, C, D, ignored=IGNORED, seed=5)
    w = weights(B, seed=2, huge=1e4)    # float16 has a range of 65504
    m = _module(name, D, C, dtype, "none")
    xr = x.to(dtype).requires_grad_(True)
    rows = m(xr, y)
    assert rows.dtype == torch.float32
    want = expected(rows, w.to(dtype), y != -1, "mean")
    (gx_want,) = torch.autograd.grad(want, xr)
    m.reduction = "mean"
    xg = x.to(dtype).requires_grad_(True)
    got = m(xg, y, sample_weight=w.to(dtype))
    (gx,) = torch.autograd.grad(got, xg)
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=1e-6)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(gx, gx_want, rtol=2 * eps, atol=2 * eps * gx_want.abs().max().item())


def test_autocast():
    """bfloat16 autocast of float32 modules: the weighted loss is the weighting of the autocast rows."""
    B, C, D = 9, 7, 8
    x, _, y = make_inputs(B, C, D, dtype=torch.float32, ignored=IGNORED, seed=6)
    w = weights(B, dtype=torch.float32)
    for name in ("arcface", "magface", "softmax", "uniface"):
        m = _module(name, D, C, torch.float32, "none")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows = m(x, y)
            m.reduction = "mean"
            got = m(x, y, sample_weight=w)
        torch.testing.assert_close(got.double(), expected(rows, w, y != -1, "mean"), rtol=2e-6, atol=1e-6)


def test_return_parts_weights_ce_and_the_regularizer():
    """MagFace: ce and reg are each the weighted average, loss = ce + λ_g·reg."""
    B, C, D = 8, 5, 6
    x, wt, y = make_inputs(B, C, D, ignored=IGNORED, norm_range=(5.0, 120.0), seed=9)
    spec = magloss.MarginSpec.magface()
    lse, zy, reg, _ = reference.margin_ce_rows(x, wt, y, spec, -1)
    valid = y != -1
    w = weights(B, seed=4)
    parts = MF.magface_loss(x, wt, y, sample_weight=w, return_parts=True)
    ce_want = expected(torch.where(valid, lse - zy, 0), w, valid, "mean")
    reg_want = expected(torch.where(valid, reg, 0), w, valid, "mean")
    torch.testing.assert_close(parts.ce, ce_want, **FP64_TOL)
    torch.testing.assert_close(parts.reg, reg_want, **FP64_TOL)
    torch.testing.assert_close(parts.loss, ce_want + 35.0 * reg_want, **FP64_TOL)


def test_equal_weights_are_the_unweighted_mean_and_scale_free():
    x, wt, y = make_inputs(10, 6, 5, ignored=IGNORED, seed=1)
    plain = MF.arcface_loss(x, wt, y)
    torch.testing.assert_close(MF.arcface_loss(x, wt, y, sample_weight=torch.full((10,), 3.5, dtype=x.dtype)), plain,
                               **FP64_TOL)
    w = weights(10)
    torch.testing.assert_close(MF.cosface_loss(x, wt, y, sample_weight=5 * w), MF.cosface_loss(x, wt, y, sample_weight=w),
                               **FP64_TOL)


@pytest.mark.parametrize("name", ["arcface", "softmax", "p2sgrad"])
def test_zero_total_weight_is_zero_with_zero_gradients(name):
    """As a mean over zero rows: 0, not NaN, and no gradient."""
    B, C, D = 6, 4, 5
    x, _, y = make_inputs(B, C, D, ignored=IGNORED, seed=2)
    m = _module(name, D, C, torch.float64, "mean")
    xg = x.clone().requires_grad_(True)
    loss = m(xg, y, sample_weight=torch.zeros(B, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(xg.grad) == 0 and torch.count_nonzero(m.weight.grad) == 0


def test_weights_carry_no_gradient():
    x, wt, y = make_inputs(5, 4, 3, seed=3)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    loss = MF.arcface_loss(x, wt, y, sample_weight=w)
    assert not loss.requires_grad


BAD = [
    ("not a tensor", lambda B: [1.0] * B, TypeError, r"sample_weight: expected a torch.Tensor, got list"),
    ("int dtype", lambda B: torch.ones(B, dtype=torch.int64), TypeError, r"sample_weight: expected a float16.*int64"),
    ("short", lambda B: torch.ones(B - 1, dtype=torch.float64), ValueError, r"sample_weight: expected shape \[6\]"),
    ("2-D", lambda B: torch.ones(B, 1, dtype=torch.float64), ValueError, r"sample_weight: expected shape \[6\]"),
    ("device", lambda B: torch.ones(B, device="meta"), ValueError, r"sample_weight: expected a tensor on cpu"),
    ("negative", lambda B: torch.tensor([1.0, 1, 1, -0.5, 1, 1]), ValueError,
     r"sample_weight: expected finite values >= 0, got -0.5 at row 3"),
    ("nan", lambda B: torch.tensor([1.0, float("nan"), 1, 1, 1, 1]), ValueError, r"got nan at row 1"),
    ("inf", lambda B: torch.tensor([1.0, 1, 1, 1, 1, float("inf")]), ValueError, r"got inf at row 5"),
]


@pytest.mark.parametrize("name", ["arcface", "softmax", "uniface", "magface", "curricularface"])
@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_sample_weight_is_named(name, case):
    _, make, exc, msg = case
    B, C, D = 6, 4, 5
    x, _, y = make_inputs(B, C, D, dtype=torch.float32, seed=2)
    m = _module(name, D, C, torch.float32, "mean")
    with pytest.raises(exc, match=msg):
        m(x, y, sample_weight=make(B))


def test_bad_weight_value_check_is_skipped_when_checks_are_off(monkeypatch):
    """MAGLOSS_CHECK_INPUTS=off: no read-back; a NaN weight gives a NaN loss (NaN in, NaN out)."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, wt, y = make_inputs(6, 4, 5, seed=2)
    assert torch.isnan(MF.arcface_loss(x, wt, y, sample_weight=torch.full((6,), float("nan"), dtype=x.dtype)))


def test_adaface_and_curricular_state_ignore_the_weights():
    """The running statistics are those of the batch's rows, unweighted (documented decision)."""
    B, C, D = 10, 6, 8
    x, _, y = make_inputs(B, C, D, dtype=torch.float32, ignored=IGNORED, seed=8)
    for name, bufs in (("adaface", ("batch_mean", "batch_std")), ("curricularface", ("t",))):
        a, b = build_loss(name, D, C), build_loss(name, D, C)
        a(x, y)
        b(x, y, sample_weight=weights(B, dtype=torch.float32))
        for buf in bufs:
            assert torch.equal(getattr(a, buf), getattr(b, buf)), (name, buf)
        assert not torch.equal(getattr(a, bufs[0]), getattr(build_loss(name, D, C), bufs[0]))   # it did move
