"""Hand-derived values of every margin function at chosen angles, and its derivatives
against central finite differences."""

import math

import pytest
import torch

from magloss.margins import MarginSpec, magface_lambda_g_bound, margin_terms, regularizer, sphere_lambda

from cases import ALL, FAMILIES

pi = math.pi


def _psi(spec, theta, a=50.0, lam=None):
    c = torch.tensor([math.cos(theta)], dtype=torch.float64)
    at = torch.tensor([a], dtype=torch.float64)
    lam_t = None if lam is None else torch.tensor(lam, dtype=torch.float64)
    return float(margin_terms(c, at, spec, lam_t)[0])


def _k(a):  # MagFace's default slope
    return 0.45 + (0.8 - 0.45) * (min(max(a, 10.0), 110.0) - 10.0) / 100.0


# (spec, θ, a, λ, hand-derived ψ)
HAND = [
    ("normface", MarginSpec.combined(64, 1, 0, 0), 1.0, 50, None, math.cos(1.0)),
    ("cosface", MarginSpec.combined(64, 1, 0, 0.35), 1.0, 50, None, math.cos(1.0) - 0.35),
    ("cosface at pi", MarginSpec.combined(64, 1, 0, 0.35), pi, 50, None, -1.0 - 0.35),
    ("arcface pi/3", MarginSpec.combined(64, 1, 0.5, 0), pi / 3, 50, None, math.cos(pi / 3 + 0.5)),
    ("arcface threshold", MarginSpec.combined(64, 1, 0.5, 0), 3.0, 50, None, math.cos(3.0) - 0.5 * math.sin(0.5)),
    ("arcface just below threshold", MarginSpec.combined(64, 1, 0.5, 0), pi - 0.5 - 1e-3, 50, None,
     math.cos(pi - 1e-3)),
    ("arcface easy, c>0", MarginSpec.combined(64, 1, 0.5, 0, easy_margin=True), 1.2, 50, None, math.cos(1.7)),
    ("arcface easy, c<0", MarginSpec.combined(64, 1, 0.5, 0, easy_margin=True), 2.0, 50, None, math.cos(2.0)),
    ("combined (1,.3,.2)", MarginSpec.combined(64, 1, 0.3, 0.2), 1.0, 50, None, math.cos(1.3) - 0.2),
    ("combined (.9,.4,.15)", MarginSpec.combined(64, 0.9, 0.4, 0.15), 1.2, 50, None, math.cos(0.9 * 1.2 + 0.4) - 0.15),
    # past θ_t = (π − 0.4)/0.9: c − m3 − max((π − θ_t)·sin θ_t, 1 + cos θ_t)
    ("combined (.9,.4,.15) threshold", MarginSpec.combined(64, 0.9, 0.4, 0.15), 3.1, 50, None,
     math.cos(3.1) - 0.15 - max((pi - (pi - 0.4) / 0.9) * math.sin((pi - 0.4) / 0.9), 1 + math.cos((pi - 0.4) / 0.9))),
    ("combined m1=2", MarginSpec.combined(64, 2.0, 0.0, 0.0), 0.7, 50, None, math.cos(1.4)),
    ("sphere m=4 k=0", MarginSpec.sphere(4), pi / 6, 50, 0.0, math.cos(4 * pi / 6)),
    ("sphere m=4 k=1", MarginSpec.sphere(4), pi / 3, 50, 0.0, -math.cos(4 * pi / 3) - 2.0),
    ("sphere m=4 k=3", MarginSpec.sphere(4), 2.9, 50, 0.0, -math.cos(4 * 2.9) - 6.0),
    ("sphere m=4 k=2 lambda=5", MarginSpec.sphere(4), 1.8, 50, 5.0,
     (5 * math.cos(1.8) + math.cos(4 * 1.8) - 4.0) / 6.0),
    ("sphere m=2 k=1", MarginSpec.sphere(2), 2.0, 50, 0.0, -math.cos(4.0) - 2.0),
    ("magface a=60", MarginSpec.magface(), 1.0, 60.0, None, math.cos(1.0 + _k(60.0))),
    ("magface a=5 (clamped)", MarginSpec.magface(), 1.0, 5.0, None, math.cos(1.0 + 0.45)),
    ("magface a=200 (clamped)", MarginSpec.magface(), 1.0, 200.0, None, math.cos(1.0 + 0.8)),
    ("magface easy, c<0", MarginSpec.magface(), 2.0, 60.0, None, math.cos(2.0)),
    ("magface threshold", MarginSpec.magface(easy_margin=False), 3.0, 60.0, None,
     math.cos(3.0) - _k(60.0) * math.sin(_k(60.0))),
    ("magcos a=60", MarginSpec.magcos(), 1.0, 60.0, None, math.cos(1.0) - (0.35 + 0.45 * 0.5)),
]


@pytest.mark.parametrize("name,spec,theta,a,lam,expected", HAND, ids=[h[0] for h in HAND])
def test_hand_values(name, spec, theta, a, lam, expected):
    assert _psi(spec, theta, a, lam) == pytest.approx(expected, abs=1e-12)


# every plain margin family (tests/cases.py) but the straight-through ones (by design not the derivative),
# and m1 > 1 with both other margins non-zero
SMOOTH = [(name, *FAMILIES[name]) for name in ALL if not FAMILIES[name].spec.straight_through] + [
    ("combined m1=1.5", MarginSpec.combined(64, 1.5, 0.2, 0.1), None),
]


@pytest.mark.parametrize("name,spec,lam", SMOOTH, ids=[s[0] for s in SMOOTH])
def test_derivatives_match_finite_differences(name, spec, lam):
    g = torch.Generator().manual_seed(1)
    theta = 0.05 + (pi - 0.1) * torch.rand(200, generator=g, dtype=torch.float64)
    c = torch.cos(theta)
    a = 12.0 + 95.0 * torch.rand(200, generator=g, dtype=torch.float64)
    lam_t = None if lam is None else torch.tensor(lam, dtype=torch.float64)
    psi, dc, da = margin_terms(c, a, spec, lam_t)
    h = 1e-6
    num_dc = (margin_terms(c + h, a, spec, lam_t)[0] - margin_terms(c - h, a, spec, lam_t)[0]) / (2 * h)
    num_da = (margin_terms(c, a + h, spec, lam_t)[0] - margin_terms(c, a - h, spec, lam_t)[0]) / (2 * h)
    # skip points within 1e-4 of a kink (policy switches, piece boundaries)
    near_kink = (num_dc - dc).abs() > 1e-3 * (1 + dc.abs())
    assert near_kink.float().mean() < 0.03, "too many points disagree to be kinks"
    ok = ~near_kink
    torch.testing.assert_close(dc[ok], num_dc[ok], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(da, num_da, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec", [MarginSpec.combined(64, 1, 0.5, 0), MarginSpec.combined(64, 0.9, 0.4, 0.15),
                                  MarginSpec.combined(64, 1.2, 0.1, 0.0), MarginSpec.combined(64, 4.0, 0.0, 0.0),
                                  MarginSpec.magface(easy_margin=False), MarginSpec.sphere(4)])
def test_threshold_policy_keeps_psi_a_penalty_and_non_increasing(spec):
    theta = torch.linspace(0, pi, 20001, dtype=torch.float64)
    c = torch.cos(theta)
    psi = margin_terms(c, torch.full_like(c, 60.0), spec, torch.tensor(0.0, dtype=torch.float64))[0]
    assert bool((psi <= c + 1e-12).all()), "psi must not exceed c"
    assert bool((psi[1:] <= psi[:-1] + 1e-12).all()), "psi must be non-increasing in theta"


def test_straight_through_derivative_is_one_and_keeps_magnitude_term():
    c = torch.tensor([0.3, 0.8], dtype=torch.float64)
    a = torch.tensor([40.0, 70.0], dtype=torch.float64)
    exact = margin_terms(c, a, MarginSpec.magface())
    st = margin_terms(c, a, MarginSpec.magface(straight_through=True))
    torch.testing.assert_close(st[0], exact[0])
    torch.testing.assert_close(st[1], torch.ones_like(c))
    torch.testing.assert_close(st[2], exact[2])


def test_cosine_is_clamped_and_derivative_passes_through():
    spec = MarginSpec.combined(64, 1, 0.5, 0)
    c = torch.tensor([1.0 + 1e-7, -1.0 - 1e-7], dtype=torch.float64)
    psi, dc, _ = margin_terms(c, torch.ones_like(c), spec)
    assert psi[0].item() == pytest.approx(math.cos(0.5), abs=1e-12)
    assert torch.isfinite(dc).all()


def test_regularizer_and_bound_by_hand():
    a = torch.tensor([5.0, 50.0, 200.0], dtype=torch.float64)
    g, dg = regularizer(a, 10.0, 110.0)
    assert g.tolist() == pytest.approx([10 / 110 ** 2 + 1 / 10, 50 / 110 ** 2 + 1 / 50, 110 / 110 ** 2 + 1 / 110])
    assert dg.tolist() == pytest.approx([0.0, 1 / 110 ** 2 - 1 / 50 ** 2, 0.0])
    # docs/math.md: 22.6 for the defaults
    assert magface_lambda_g_bound(64, 10, 110, 0.45, 0.8) == pytest.approx(64 * 0.0035 * 110 ** 2 * 100 / (110 ** 2 - 100))
    assert round(magface_lambda_g_bound(64, 10, 110, 0.45, 0.8), 1) == 22.6


@pytest.mark.parametrize("it,expected", [(0, 1000.0), (1, 1000 / 1.12), (100, 1000 / 13.0), (10_000, 5.0)])
def test_sphere_lambda_schedule(it, expected):
    assert float(sphere_lambda(torch.tensor(it))) == pytest.approx(expected, rel=1e-6)
