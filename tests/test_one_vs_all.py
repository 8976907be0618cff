"""One-vs-all losses (SFace, UniFace, SphereFace2, P2SGrad) against float64 re-implementations of
the upstream heads, written here from the upstream code's formulas (full B×C matrices, autograd,
the detach placements and clamps of each upstream file), not from magloss's element functions.

Where magloss follows a documented decision instead of the upstream code (docs/one_vs_all.md), the
oracle does too, and a separate test checks the decision's effect against the literal upstream
behaviour: the weight normalization (opensphere and pytorch-metric-learning renormalize the
parameter in place and take the gradient w.r.t. the unit rows; magloss differentiates through the
normalization, so on unit rows its ∂W is the upstream gradient's tangential part).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq

import magloss
from cases import make_inputs
from magloss import onevsall as OVA

NAMES = ("sface", "uniface", "sphereface2", "p2sgrad")


# -- the upstream heads, re-implemented (float64, one B×C matrix, autograd) -------------------------------
def _cos(x, w):
    return F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()


def sface_upstream(x, w, y, s=64.0, k=80.0, a=0.8, b=1.23):
    """zhongyy/SFace SFaceLoss.forward: intra −σ(k(θ_y − a))·s·c_y, inter Σ σ(k(b − θ_j))·s·c_j over the
    zero-hot columns, weights under no_grad; loss = intra.mean() + inter.mean()."""
    out = _cos(x, w) * s
    one_hot = F.one_hot(y, w.shape[0]).to(x.dtype)
    wyx = (one_hot * out).sum(1)
    with torch.no_grad():
        wy = 1.0 / (1.0 + torch.exp(-k * (torch.acos(wyx / s) - a)))
    wj_out = (1.0 - one_hot) * out
    with torch.no_grad():
        wj = 1.0 / (1.0 + torch.exp(k * (torch.acos(wj_out / s) - b)))
    return -(wy * wyx), (wj * wj_out).sum(1)


def uniface_upstream(x, w, y, bias, s=64.0, m=0.4, lam=1.0):
    """CVI-SZU/UniFace Unified_Cross_Entropy_Loss.forward (all classes: partial_index = arange(C))."""
    c = _cos(x, w)
    p = s * (c - m) - bias
    n = s * c - bias
    p_loss = torch.log(1 + torch.exp(-p.clamp(min=-s, max=s)))
    n_loss = torch.log(1 + torch.exp(n.clamp(min=-s, max=s))) * lam
    one_hot = F.one_hot(y, w.shape[0]).bool()
    return (one_hot * p_loss + (~one_hot) * n_loss).sum(1)


def sphereface2_upstream(x, w, y, bias, r=40.0, m=0.4, t=3.0, alpha=0.7, lw=50.0, mtype="C"):
    """opensphere SphereFace2.forward, per row: its BCE mean over B·C times B is the row sum here."""
    cos = _cos(x, w)
    C = w.shape[0]
    one_hot = F.one_hot(y, C).to(x.dtype)
    with torch.no_grad():
        if mtype == "C":
            g = 2.0 * ((cos + 1.0) / 2.0).pow(t) - 1.0 - m * (2.0 * one_hot - 1.0)
        else:
            th = torch.acos(cos.clamp(-1 + 1e-5, 1 - 1e-5))
            th = th + m * one_hot if mtype == "A" else th * torch.where(one_hot.bool(), m, 1.0)
            g = 2.0 * ((torch.cos(th.clamp(1e-5, 3.14159)) + 1.0) / 2.0).pow(t) - 1.0
        d = g - cos
    logits = r * (cos + d) + bias
    weight = (alpha * one_hot + (1.0 - alpha) * (1.0 - one_hot)) * lw * C / r
    # F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight), written as the identical
    # log(1 + exp((1 − 2y)·z)) for y in {0, 1}: torch's kernel loses the tiny terms of large negative logits
    bce = weight * torch.logaddexp((1.0 - 2.0 * one_hot) * logits, torch.zeros_like(logits))
    return bce.mean(1)             # mean over C of the C-scaled weights: the row's share of B·mean


def p2sgrad_upstream(x, w, y):
    """pytorch-metric-learning P2SGradLoss: MSE of clamp(cos, −1, 1) against the one-hot, per row."""
    cos = _cos(x, w).clamp(-1, 1)
    return F.mse_loss(cos, F.one_hot(y, w.shape[0]).to(x.dtype), reduction="none").mean(1)


def _upstream_rows(name, x, w, y, bias, kw):
    if name == "sface":
        intra, inter = sface_upstream(x, w, y, **kw)
        return intra + inter
    if name == "uniface":
        return uniface_upstream(x, w, y, bias, **kw)
    if name == "sphereface2":
        return sphereface2_upstream(x, w, y, bias, **kw)
    return p2sgrad_upstream(x, w, y)


#: (name, module kwargs, upstream kwargs): defaults, and non-default values of each hyperparameter.
CASES = [
    ("sface", {}, {}),
    ("sface", dict(scale=30.0, k=10.0, a=0.9, b=1.1), dict(s=30.0, k=10.0, a=0.9, b=1.1)),
    ("uniface", {}, {}),
    ("uniface", dict(scale=8.0, margin=0.3, neg_weight=0.5, bias_init=2.0), dict(s=8.0, m=0.3, lam=0.5)),
    ("sphereface2", {}, {}),
    ("sphereface2", dict(margin_type="A", scale=20.0, margin=0.3, t=2.0, alpha=0.6, loss_weight=10.0),
     dict(mtype="A", r=20.0, m=0.3, t=2.0, alpha=0.6, lw=10.0)),
    ("sphereface2", dict(margin_type="M", margin=1.5), dict(mtype="M", m=1.5)),
    ("p2sgrad", {}, {}),
]
IDS = [f"{n}-{i}" for i, (n, *_) in enumerate(CASES)]


def _module(name, D, C, dtype=torch.float64, **kw):
    torch.manual_seed(1)
    return magloss.registry.LOSSES[name](D, C, dtype=dtype, **kw)


def _oracle(name, m, x, y, ukw, reduction="mean"):
    """Upstream loss on the non-ignored rows, with ∂x (zero on ignored rows), ∂W and ∂b."""
    x = x.detach().double().requires_grad_()
    w = m.weight.detach().double().requires_grad_()
    b = None if m.bias is None else m.bias.detach().double().requires_grad_()
    keep = y != m.ignore_index
    rows = _upstream_rows(name, x[keep], w, y[keep], b, ukw)
    loss = rows.mean() if reduction == "mean" else rows.sum()
    grads = torch.autograd.grad(loss, [t for t in (x, w, b) if t is not None], allow_unused=True)
    return loss.detach(), grads


@pytest.mark.parametrize("name,mkw,ukw", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_upstream_float64(name, mkw, ukw, reduction, one_thread):
    B, C, D = 11, 13, 7
    x, _, y = make_inputs(B, C, D, ignored=(2, 9), seed=3)
    m = _module(name, D, C, reduction=reduction, **mkw)
    xg = x.clone().requires_grad_()
    loss = m(xg, y)
    loss.backward()
    want, grads = _oracle(name, m, x, y, ukw, reduction)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xg.grad, grads[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.weight.grad, grads[1], rtol=1e-9, atol=1e-11)
    if m.bias is not None:
        torch.testing.assert_close(m.bias.grad, grads[2].reshape(1), rtol=1e-9, atol=1e-11)
    assert not xg.grad[2].any() and not xg.grad[9].any()


def test_sface_parts_are_upstreams_intra_and_inter():
    """The row loss is intra + inter; the upstream head returns their batch means separately."""
    x, w, y = make_inputs(6, 9, 5, seed=5)
    intra, inter = sface_upstream(x, w, y)
    got = OVA.sface_loss(x, w, y, reduction="none")
    torch.testing.assert_close(got, intra + inter, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(OVA.sface_loss(x, w, y), intra.mean() + inter.mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,mkw,ukw", [c for c in CASES if c[0] in ("uniface", "sphereface2")],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] in ("uniface", "sphereface2")])
def test_training_steps_with_the_learnable_bias(name, mkw, ukw, one_thread):
    """Five SGD steps of (embeddings as parameters, W, b) on magloss and on the upstream head."""
    B, C, D = 9, 7, 5
    x0, _, y = make_inputs(B, C, D, ignored=(4,), seed=8)
    m = _module(name, D, C, **mkw)
    xs = x0.clone().requires_grad_()
    ours = torch.optim.SGD([xs, *m.parameters()], lr=0.05)
    xo = x0.clone().requires_grad_()
    wo = m.weight.detach().clone().requires_grad_()
    bo = m.bias.detach().clone().requires_grad_()
    theirs = torch.optim.SGD([xo, wo, bo], lr=0.05)
    keep = y != -1
    for _ in range(5):
        ours.zero_grad()
        m(xs, y).backward()
        ours.step()
        theirs.zero_grad()
        _upstream_rows(name, xo[keep], wo, y[keep], bo, ukw).mean().backward()
        theirs.step()
    torch.testing.assert_close(m.bias.detach(), bo.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(m.weight.detach(), wo.detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(xs.detach(), xo.detach(), rtol=1e-9, atol=1e-11)
    assert not torch.equal(m.bias.detach(), torch.tensor([m.bias_init], dtype=torch.float64))


@pytest.mark.parametrize("name", ["sphereface2", "p2sgrad"])
def test_unit_rows_get_the_tangential_part_of_the_upstream_weight_gradient(name):
    """opensphere and pytorch-metric-learning renormalize W in place and differentiate w.r.t. the unit
    rows; magloss differentiates through the normalization: on unit rows its ∂w_j is the upstream
    ∂w_j minus its component along w_j (the part the next renormalization would undo)."""
    x, w, y = make_inputs(8, 6, 5, seed=11)
    m = _module(name, 5, 6)
    with torch.no_grad():
        m.weight.copy_(F.normalize(w, dim=1))
    m(x, y).backward()
    wu = m.weight.detach().clone().requires_grad_()
    b = None if m.bias is None else m.bias.detach()
    cos = F.normalize(x, dim=1) @ wu.t()       # the upstream product with the unit rows themselves
    one_hot = F.one_hot(y, 6).to(x.dtype)
    if name == "p2sgrad":
        loss = F.mse_loss(cos.clamp(-1, 1), one_hot)
    else:
        with torch.no_grad():
            d = 2.0 * ((cos + 1.0) / 2.0).pow(3.0) - 1.0 - 0.4 * (2.0 * one_hot - 1.0) - cos
        wt = (0.7 * one_hot + 0.3 * (1 - one_hot)) * 50.0 * 6 / 40.0
        loss = F.binary_cross_entropy_with_logits(40.0 * (cos + d) + b, one_hot, weight=wt)
    (g,) = torch.autograd.grad(loss, wu)
    tangential = g - (g * wu).sum(1, keepdim=True) * wu
    torch.testing.assert_close(m.weight.grad, tangential, rtol=1e-9, atol=1e-12)
    assert (g * wu).sum(1).abs().max() > 1e-3       # the radial part is not zero: the decision matters


@pytest.mark.parametrize("chunk", ["1", "4", "13", "100"])
@pytest.mark.parametrize("name", NAMES)
def test_chunk_width_changes_nothing(name, chunk, monkeypatch, one_thread):
    B, C, D = 10, 13, 6
    x, _, y = make_inputs(B, C, D, ignored=(0,), seed=4)
    m = _module(name, D, C, reduction="none")
    want, grads = _oracle(name, m, x, y, {}, reduction="sum")
    monkeypatch.setenv("MAGLOSS_CHUNK", chunk)
    xg = x.clone().requires_grad_()
    rows = m(xg, y)
    rows.sum().backward()
    torch.testing.assert_close(rows.sum(), want, rtol=1e-10, atol=1e-10)
    assert rows[0] == 0
    torch.testing.assert_close(m.weight.grad, grads[1], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(xg.grad, grads[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name,mkw,ukw", CASES, ids=IDS)
def test_float32_and_bf16_autocast_against_float64(name, mkw, ukw, one_thread):
    B, C, D = 12, 9, 16
    x, _, y = make_inputs(B, C, D, ignored=(5,), seed=6)
    m = _module(name, D, C, dtype=torch.float32, **mkw)
    # float32: the same math in float32
    xg = x.float().requires_grad_()
    loss = m(xg, y)
    loss.backward()
    want, grads = _oracle(name, m, x.float(), y, ukw)
    assert loss.dtype == torch.float32
    scale = grads[1].abs().max()
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5 * max(1.0, abs(want.item())))
    torch.testing.assert_close(m.weight.grad.double(), grads[1], rtol=1e-3, atol=1e-4 * scale)
    # bf16 autocast: the operands rounded to bf16, the arithmetic in float32 (the oracle: float64 on
    # the rounded operands); the weight's gradient comes back float32
    m.weight.grad = None
    xb = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(xb, y)
    loss.backward()
    assert loss.dtype == torch.float32 and m.weight.grad.dtype == torch.float32 and xb.grad.dtype == torch.float32
    mr = _module(name, D, C, **mkw)
    with torch.no_grad():
        mr.weight.copy_(m.weight.bfloat16().double())
        if mr.bias is not None:
            mr.bias.copy_(m.bias.double())
    want, grads = _oracle(name, mr, x.bfloat16().double(), y, ukw)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5 * max(1.0, abs(want.item())))
    torch.testing.assert_close(m.weight.grad.double(), grads[1], rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("name,kw", [("uniface", dict(scale=4.0, bias_init=0.5)),
                                     ("sphereface2", dict(t=1.0, scale=3.0)),          # t = 1: g(c) − c = ∓m, exact
                                     ("p2sgrad", {})])
def test_gradcheck_float64(name, kw):
    """Where the upstream gradient is the exact derivative (UniFace inside its clamp, P2SGrad inside
    [−1, 1], SphereFace2 with t = 1), finite differences check ∂x, ∂W and ∂b."""
    B, C, D = 5, 4, 3
    x, w, y = make_inputs(B, C, D, norm_range=(1.0, 3.0), ignored=(1,), seed=2)
    m = _module(name, D, C, **kw)
    kind, params = m._kind, m.params

    def f(xx, ww, *bb):
        return OVA.one_vs_all_loss(xx, ww, y, kind, params, bb[0] if bb else None, reduction="none")

    inputs = [x.requires_grad_(), w.requires_grad_()] + ([m.bias.detach().clone().requires_grad_()] if m.bias is not None else [])
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name):
    x, w, y = make_inputs(6, 5, 4, ignored=(3,), seed=1)
    m = _module(name, 4, 5)
    bias = None if m.bias is None else m.bias.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.magloss.one_vs_all.default,
                          (x.requires_grad_(), w.requires_grad_(), y, bias, m._kind, list(m.params), -1))


def test_uniface_clamp_stops_the_gradient():
    """A negative logit s·c − b beyond ±s: upstream's clamp passes no gradient there."""
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    loss = OVA.uniface_loss(x, w, torch.tensor([2]), bias, scale=8.0, margin=0.0)
    loss.backward()
    assert not w.grad[0].any() and not w.grad[1].any()      # 8·c + 10 ≈ 18 > 8: clamped, no gradient
    # the loss value uses the clamped logits: 2·softplus(8) + softplus(−(0 + 10)·... clamped to 8)
    want = 2 * math.log1p(math.exp(8.0)) + math.log1p(math.exp(-8.0))
    assert abs(loss.item() - want) < 1e-12


def test_bias_initialisations():
    """UniFace: log(10·C). SphereFace2: b makes ∂L/∂b zero when every cosine is 0 (the paper's
    initialisation), found here by a root search on that stationarity condition."""
    assert magloss.UniFaceLoss(4, 1000).bias.item() == pytest.approx(math.log(10_000.0), rel=1e-7)
    for C, mtype, m in ((10, "C", 0.4), (1000, "C", 0.4), (50, "A", 0.3), (50, "M", 1.5)):
        head = magloss.SphereFace2Loss(4, C, margin=m, margin_type=mtype, dtype=torch.float64)
        zero = torch.zeros(1, 2, dtype=torch.float64)
        ay = 40.0 * (OVA._sphereface2_g(zero, torch.tensor([[True, False]]), m, 3.0,
                                         "CAM".index(mtype))).squeeze(0)
        ay, ai = ay.tolist()

        def dldb(b):
            sig = lambda z: 1.0 / (1.0 + math.exp(-z))   # noqa: E731
            return 0.7 * (sig(ay + b) - 1.0) + 0.3 * (C - 1) * sig(ai + b)

        assert head.bias.item() == pytest.approx(brentq(dldb, -200.0, 200.0), abs=1e-9)


def test_return_parts_accuracy_and_none_reduction():
    x, _, y = make_inputs(7, 5, 4, ignored=(6,), seed=9)
    m = _module("uniface", 4, 5)
    parts = m(x, y, return_parts=True)
    torch.testing.assert_close(parts.loss, m(x, y))
    assert parts.ce is parts.loss or torch.equal(parts.ce, parts.loss)
    assert parts.reg == 0 and parts.reg_weighted == 0
    torch.testing.assert_close(parts.norms, x.norm(dim=1))
    m.reduction = "none"
    rows = m(x, y)
    assert rows.shape == (7,) and rows[6] == 0
    torch.testing.assert_close(rows[:6].mean(), parts.loss)
    pred = _cos(x, m.weight.detach()).argmax(1)
    assert m.accuracy(x, y).item() == pytest.approx((pred[:6] == y[:6]).double().mean().item())


@pytest.mark.parametrize("cls,kw,match", [
    (magloss.SFaceLoss, dict(k=-1.0), r"^k: "),
    (magloss.SFaceLoss, dict(a=4.0), r"^a: .*radians"),
    (magloss.UniFaceLoss, dict(neg_weight=-0.5), r"^neg_weight: "),
    (magloss.UniFaceLoss, dict(bias_init=math.inf), r"^bias_init: "),
    (magloss.SphereFace2Loss, dict(alpha=1.0), r"^alpha: .*\(0, 1\)"),
    (magloss.SphereFace2Loss, dict(margin_type="B"), r"^margin_type: .*'C', 'A', 'M'"),
    (magloss.SphereFace2Loss, dict(t=0.0), r"^t: "),
])
def test_constructor_errors_name_the_argument(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(4, 5, **kw)


def test_op_argument_errors():
    x, w, y = make_inputs(3, 4, 2)
    with pytest.raises(ValueError, match=r"^bias: UniFace needs a learnable bias"):
        OVA.one_vs_all_loss(x, w, y, OVA.UNIFACE, (64.0, 0.4, 1.0), None)
    with pytest.raises(ValueError, match=r"^bias: SFace takes no bias"):
        OVA.one_vs_all_loss(x, w, y, OVA.SFACE, (64.0, 80.0, 0.8, 1.23), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^params: SphereFace2 expects 6"):
        OVA.one_vs_all_loss(x, w, y, OVA.SPHEREFACE2, (1.0,), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^kind: "):
        OVA.one_vs_all_loss(x, w, y, 9, ())
    with pytest.raises(ValueError, match=r"^bias: expected a one-element"):
        OVA.uniface_loss(x, w, y, torch.zeros(2, dtype=torch.float64))
    x[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"^embeddings: contains NaN"):
        OVA.p2sgrad_loss(x, w, y)


@pytest.mark.parametrize("name", NAMES)
def test_nan_in_nan_out_with_checks_off(name, monkeypatch):
    """The project's rule (tests/test_nan.py): with MAGLOSS_CHECK_INPUTS=off a NaN embedding row makes its
    row's loss NaN and, through the products, every entry of ∂W; a NaN in an ignored row leaves the
    reduced loss what it is without it (its 'none' entry 0); the other rows keep their values."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, _, y = make_inputs(6, 5, 4, ignored=(4,), seed=13)
    m = _module(name, 4, 5)
    clean = m(x, y).detach()
    m.reduction = "none"
    clean_rows = m(x, y).detach()
    for row, counted in ((1, True), (4, False)):
        xn = x.clone()
        xn[row, 2] = math.nan
        rows = m(xn, y)
        others = [i for i in range(6) if i != row]
        torch.testing.assert_close(rows[others], clean_rows[others], rtol=1e-12, atol=1e-12)
        assert torch.isnan(rows[row]) if counted else rows[row] == 0
        m.reduction = "mean"
        xg = xn.clone().requires_grad_()
        m.weight.grad = None
        loss = m(xg, y)
        assert torch.isnan(loss) if counted else loss.item() == pytest.approx(clean.item(), rel=1e-12)
        loss.backward()
        assert torch.isnan(m.weight.grad).all() and torch.isnan(xg.grad[row]).all()
        assert torch.isfinite(xg.grad[others]).all()
        m.reduction = "none"


def test_functional_forms_validate_like_the_modules():
    x, w, y = make_inputs(3, 4, 2)
    b = torch.zeros(1, dtype=torch.float64)
    for call, err, match in (
            (lambda: OVA.sphereface2_loss(x, w, y, b, margin_type="B"), ValueError, r"^margin_type: "),
            (lambda: OVA.sphereface2_loss(x, w, y, b, alpha=0.0), ValueError, r"^alpha: "),
            (lambda: OVA.sface_loss(x, w, y, scale=math.nan), ValueError, r"^scale: "),
            (lambda: OVA.sface_loss(x, w, y, b=3.5), ValueError, r"^b: .*radians"),
            (lambda: OVA.uniface_loss(x, w, y, b, margin=-0.1), ValueError, r"^margin: "),
            (lambda: OVA.p2sgrad_loss(x, w, y, ignore_index=-1.0), TypeError, r"^ignore_index: "),
            (lambda: OVA.p2sgrad_loss(x, w, y, reduction="avg"), ValueError, r"^reduction: "),
            (lambda: OVA.p2sgrad_loss(x, w, y.float()), TypeError, r"^labels: ")):
        with pytest.raises(err, match=match):
            call()


def test_a_float_bias_is_a_fixed_bias():
    x, w, y = make_inputs(5, 4, 3, ignored=(0,), seed=17)
    for fn in (OVA.uniface_loss, OVA.sphereface2_loss):
        xg = x.clone().requires_grad_()
        got = fn(xg, w, y, 1.5)
        got.backward()
        xt = x.clone().requires_grad_()
        want = fn(xt, w, y, torch.tensor([1.5], dtype=torch.float64))
        want.backward()
        assert got.item() == want.item() and torch.equal(xg.grad, xt.grad)


@pytest.mark.parametrize("name", NAMES)
def test_nan_class_row_with_checks_off(name, monkeypatch):
    """A NaN in class row j: every row's sum sees column j, so every loss row and every ∂x row is NaN,
    as is ∂w_j; the other classes' gradients stay finite, since a sum over classes (unlike a softmax)
    has no normalizer through which column j reaches them (what autograd of the upstream heads gives)."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, _, y = make_inputs(6, 5, 4, ignored=(4,), seed=13)
    m = _module(name, 4, 5)
    with torch.no_grad():
        m.weight[2, 1] = math.nan
    xg = x.clone().requires_grad_()
    m.reduction = "none"
    rows = m(xg, y)
    assert torch.isnan(rows[[0, 1, 2, 3, 5]]).all() and rows[4] == 0
    rows.sum().backward()
    assert torch.isnan(xg.grad[[0, 1, 2, 3, 5]]).all() and torch.isnan(m.weight.grad[2]).all()
    assert torch.isfinite(m.weight.grad[[0, 1, 3, 4]]).all()
