"""The reference engine's three general features, all float64:

* per-row margins (``row_margins``: m2_i, m3_i) with the CLIP (AdaFace) and NONE (ElasticFace)
  boundary policies;
* CurricularFace's function of the non-label columns (``neg_threshold`` τ_i, ``neg_t`` t);
* K sub-centers per class (``spec.subcenters``).

Hand-derived values at chosen angles, gradcheck of margin_ce_rows, and the explicit backward
against autograd of margin_ce_rows."""

import math

import pytest
import torch

from magloss import reference
from magloss.margins import CLIP, EASY, NONE, THRESHOLD, MarginSpec, margin_terms
from cases import FEATURES, feature_case, make_inputs

pi = math.pi
EPS = 1e-3   # AdaFace's ε


def _terms(spec, theta, m2=None, m3=None):
    c = torch.tensor([math.cos(theta)], dtype=torch.float64)
    rm = None if m2 is None else torch.tensor([[m2, m3]], dtype=torch.float64)
    psi, dc, da = margin_terms(c, torch.tensor([30.0], dtype=torch.float64), spec, None, rm)
    return float(psi), float(dc), float(da)


ARC = MarginSpec.combined(64, 1, 0.5, 0)
CLIPPED = MarginSpec.combined(64, 1, 0, 0, boundary=CLIP)
UNBOUNDED = MarginSpec.combined(64, 1, 0, 0, boundary=NONE)

# (name, spec, θ, m2_i, m3_i, hand ψ, hand ∂ψ/∂c)
HAND = [
    ("clip inside", CLIPPED, 1.0, -0.2, 0.3, math.cos(0.8) - 0.3, math.sin(0.8) / math.sin(1.0)),
    ("clip positive m2", CLIPPED, 1.0, 0.25, 0.1, math.cos(1.25) - 0.1, math.sin(1.25) / math.sin(1.0)),
    # m2 < 0 pulls the angle below ε: the angle clamp holds it at ε, derivative 0
    ("clip angle at eps", CLIPPED, 0.1, -0.2, 0.0, math.cos(EPS), 0.0),
    # past π − ε
    ("clip angle at pi-eps", CLIPPED, 3.0, 0.5, 0.2, math.cos(pi - EPS) - 0.2, 0.0),
    # the cosine clamp: c = cos(0.01) > 1 − ε, so θ = acos(1 − ε)
    ("clip cosine at 1-eps", CLIPPED, 0.01, 0.3, 0.0, math.cos(math.acos(1 - EPS) + 0.3), 0.0),
    ("none inside", UNBOUNDED, 1.0, 0.5, 0.0, math.cos(1.5), math.sin(1.5) / math.sin(1.0)),
    # no fallback past π: ψ = cos(3.5) (larger than cos(3.0) − 0.5·sin 0.5), slope of the formula
    ("none past pi", UNBOUNDED, 3.0, 0.5, 0.0, math.cos(3.5), math.sin(3.5) / math.sin(3.0)),
    ("none cosface", UNBOUNDED, 2.0, 0.0, 0.35, math.cos(2.0) - 0.35, 1.0),
    # THRESHOLD and EASY with each row's own margins: ArcFace's formulas with m = m2_i
    ("threshold row m2", ARC, 3.0, 0.3, 0.0, math.cos(3.0) - 0.3 * math.sin(0.3), 1.0),
    ("threshold row m2 inside", ARC, 1.0, 0.3, 0.1, math.cos(1.3) - 0.1, math.sin(1.3) / math.sin(1.0)),
    ("easy row m2, c<0", MarginSpec.combined(64, 1, 0.5, 0, easy_margin=True), 2.0, 0.3, 0.0, math.cos(2.0), 1.0),
]


@pytest.mark.parametrize("name,spec,theta,m2,m3,psi,dpsi", HAND, ids=[h[0] for h in HAND])
def test_hand_values(name, spec, theta, m2, m3, psi, dpsi):
    got = _terms(spec, theta, m2, m3)
    assert got[0] == pytest.approx(psi, abs=1e-12)
    assert got[1] == pytest.approx(dpsi, abs=1e-12)
    assert got[2] == 0.0


def test_row_margins_equal_to_the_scalars_give_the_scalar_result():
    c = torch.linspace(-1, 1, 41, dtype=torch.float64)
    a = torch.full_like(c, 30.0)
    for boundary in (THRESHOLD, EASY, CLIP, NONE):
        spec = MarginSpec.combined(64, 1, 0.4, 0.1, boundary=boundary)
        rm = torch.tensor([[0.4, 0.1]], dtype=torch.float64).expand(41, 2)
        for want, got in zip(margin_terms(c, a, spec), margin_terms(c, a, spec, None, rm)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_clip_derivative_is_autograd_of_the_upstream_formula():
    c = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    m2 = torch.linspace(-0.4, 0.4, 2001, dtype=torch.float64)
    m3 = 0.4 + m2
    cc = c.clone().requires_grad_()
    theta = torch.acos(cc.clamp(-1 + EPS, 1 - EPS))           # AdaFace's head.py, written out
    upstream = torch.cos(torch.clip(theta + m2, min=EPS, max=pi - EPS)) - m3
    upstream.sum().backward()
    psi, dc, _ = margin_terms(c, torch.ones_like(c), CLIPPED, None, torch.stack([m2, m3], 1))
    torch.testing.assert_close(psi, upstream.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(dc, cc.grad, rtol=0, atol=1e-9)


def _unit(theta):
    return torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)


def test_hand_curricular_row():
    # x at angle 0 (norm 3), classes at angles 0.9 (label), 0.3, 1.2, 2.5 (norm 2): c_j = cos θ_j.
    s, m, t = 10.0, 0.5, 0.3
    angles = [0.9, 0.3, 1.2, 2.5]
    x = 3.0 * _unit(0.0).unsqueeze(0)
    w = torch.stack([2.0 * _unit(th) for th in angles])
    y = torch.tensor([0])
    tau = math.cos(0.9 + m)
    spec = MarginSpec.combined(s, 1, m, 0)
    lse, zy, _, _ = reference.margin_ce_rows(x, w, y, spec, -1, None, None,
                                            torch.tensor([tau], dtype=torch.float64),
                                            torch.tensor(t, dtype=torch.float64))
    z = [s * math.cos(0.9 + m)]
    for th in angles[1:]:
        c = math.cos(th)
        z.append(s * c * (t + c) if c > tau else s * c)   # 0.3 and 1.2 are "hard" (c > cos 1.4), 2.5 is not
    assert float(zy) == pytest.approx(z[0], abs=1e-12)
    assert float(lse) == pytest.approx(math.log(sum(math.exp(v) for v in z)), abs=1e-12)


def test_hand_subcenter_row():
    # 2 classes x 3 sub-centers; x at angle 0. Class 0's sub-centers at 1.0, 0.4, 0.4 (tie: k = 1
    # wins), class 1's at 2.0, 0.7, 3.0. Class cosines cos 0.4 (label) and cos 0.7.
    s, m = 8.0, 0.5
    angles = [1.0, 0.4, 0.4, 2.0, 0.7, 3.0]
    x = _unit(0.0).unsqueeze(0).requires_grad_()
    w = torch.stack([(1.0 + k) * _unit(th) for k, th in enumerate(angles)]).requires_grad_()
    spec = MarginSpec.combined(s, 1, m, 0).with_subcenters(3)
    lse, zy, _, _ = reference.margin_ce_rows(x, w, torch.tensor([0]), spec)
    z = [s * math.cos(0.4 + m), s * math.cos(0.7)]
    assert float(zy.detach()) == pytest.approx(z[0], abs=1e-12)
    assert float(lse.detach()) == pytest.approx(math.log(sum(math.exp(v) for v in z)), abs=1e-12)
    (lse - zy).sum().backward()
    nonzero = (w.grad.abs().sum(1) > 0).tolist()
    assert nonzero == [False, True, False, False, True, False]   # only the winners (lowest k on the tie)


@pytest.mark.parametrize("name", list(FEATURES))
def test_gradcheck_rows(name):
    x, w, y, spec, lam, rm, nt, t = feature_case(name, 6, 5, 4, seed=0)
    coef = torch.randn(4, x.shape[0], dtype=torch.float64)

    def f(x, w):
        rows = reference.margin_ce_rows(x, w, y, spec, -1, lam, rm, nt, t)
        return sum((c * r).sum() for c, r in zip(coef, rows))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_()), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(FEATURES))
def test_explicit_backward_is_autograd(name):
    x, w, y, spec, lam, rm, nt, t = feature_case(name, 9, 7, 5, seed=3)
    grads = torch.randn(4, x.shape[0], dtype=torch.float64)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    rows = reference.margin_ce_rows(xa, wa, y, spec, -1, lam, rm, nt, t)
    sum((g * r).sum() for g, r in zip(grads, rows)).backward()
    fwd = reference.margin_ce_forward(x, w, y, spec, -1, lam, rm, nt, t)
    for got, want in zip(fwd, rows):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    gx, gw = reference.margin_ce_backward(*grads, x, w, y, fwd[0], spec, -1, lam, rm, nt, t)
    torch.testing.assert_close(gx, xa.grad, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(gw, wa.grad, rtol=1e-10, atol=1e-11)


def test_curricular_without_label_modulates_every_column():
    # A row without a label column (its class on another shard) has every column modulated.
    x, w, _ = make_inputs(3, 6, 4)
    y = torch.tensor([-1, -1, -1])
    tau = torch.full((3,), -0.2, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    lse = reference.margin_ce_rows(x, w, y, MarginSpec.combined(16, 1, 0.5, 0), -1, None, None, tau, t)[0]
    c = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    z = 16 * torch.where(c > -0.2, c * (0.4 + c), c)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), rtol=1e-13, atol=1e-13)


F64 = torch.float64
BAD = [
    ("row_margins shape", lambda b: dict(row_margins=torch.zeros(b, 3, dtype=F64)), "row_margins"),
    ("row_margins dtype", lambda b: dict(row_margins=torch.zeros(b, 2)), "row_margins"),
    ("row_margins non-contiguous", lambda b: dict(row_margins=torch.zeros(2, b, dtype=F64).t()), "row_margins"),
    ("row_margins with magface", lambda b: dict(row_margins=torch.zeros(b, 2, dtype=F64),
                                                spec=MarginSpec.magface()), "row_margins"),
    ("neg_threshold alone", lambda b: dict(neg_threshold=torch.zeros(b, dtype=F64)), "neg_threshold, neg_t"),
    ("neg_t shape", lambda b: dict(neg_threshold=torch.zeros(b, dtype=F64), neg_t=torch.zeros(1, dtype=F64)),
     "neg_t"),
    ("clip with magface", lambda b: dict(spec=MarginSpec(1, 64.0, 1.0, 0, 0, 10, 110, .45, .8, CLIP)), "boundary"),
    ("subcenters not dividing", lambda b: dict(spec=MarginSpec.combined().with_subcenters(4)), "weight"),
]


@pytest.mark.parametrize("name,kw,word", BAD, ids=[b[0] for b in BAD])
def test_bad_extras(name, kw, word):
    x, w, y = make_inputs(4, 6, 3)
    args = dict(spec=MarginSpec.combined(), row_margins=None, neg_threshold=None, neg_t=None)
    args.update(kw(4))
    for fn in (reference.margin_ce_forward, reference.margin_ce_rows):
        with pytest.raises(ValueError, match=word):
            fn(x, w, y, args["spec"], -1, None, args["row_margins"], args["neg_threshold"], args["neg_t"])


@pytest.mark.parametrize("bad", [-1, 0, 1.5, True])
def test_bad_subcenters(bad):
    with pytest.raises(ValueError, match="subcenters"):
        MarginSpec.combined().with_subcenters(bad)


def test_bad_boundary():
    with pytest.raises(ValueError, match="boundary"):
        MarginSpec.combined(boundary=7)
    with pytest.raises(ValueError, match="easy_margin, boundary"):
        MarginSpec.combined(easy_margin=True, boundary=CLIP)
