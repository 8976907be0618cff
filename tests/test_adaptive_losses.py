"""AdaFace, CurricularFace, Sub-center ArcFace and ElasticFace (Arc, Cos, "+") against
independent float64 re-implementations of the upstream code's formulas, written here:

* AdaFace: mk-minchul/AdaFace head.py (the head takes unit embeddings and their norms,
  kernel [D, C]);
* CurricularFace: HuangYG123/CurricularFace head/metrics.py;
* Sub-center ArcFace: insightface / pytorch-metric-learning (cosines [B, C, K], max over K,
  then ArcFace with the threshold fallback);
* ElasticFace: fdbtrs/ElasticFace utils/losses.py, with the draws given explicitly (the "+"
  assignment as the paper describes it, see docs/adaptive_losses.md).

Values and both gradients over several training steps (the running state evolving), the
state (buffers, generator) saved and restored, eval mode frozen, the sub-center helpers,
gradcheck of the functional forms, and bad arguments."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import magloss
import magloss.functional as MF
from magloss.subcenter import dominant_subcenters, dominant_weight, far_from_class, subcenter_counts

from cases import FAMILIES, FP64_TOL, LOSS_VARIANTS, NO_SPEC, loss_functional

TOL = FP64_TOL
D, C, B = 8, 11, 13


def _batch(step, b=B, c=C, d=D, seed=0):
    g = torch.Generator().manual_seed(1000 + 100 * seed + step)   # not 0: the global seed of the weights
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    x = x * (2.0 + 40.0 * torch.rand(b, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, c, (b,), generator=g)
    return x, y


# -- upstream formulas, float64, written from the papers' code -----------------------------------------
def up_adaface(emb_unit, norms, label, kernel, state, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    """mk-minchul/AdaFace AdaFace.forward; ``state`` = [batch_mean, batch_std] updated in place."""
    kernel_norm = kernel / kernel.norm(dim=0, keepdim=True)
    cosine = (emb_unit @ kernel_norm).clamp(-1 + eps, 1 - eps)
    safe = norms.clamp(0.001, 100).detach()
    with torch.no_grad():
        state[0] = safe.mean() * t_alpha + (1 - t_alpha) * state[0]
        state[1] = safe.std() * t_alpha + (1 - t_alpha) * state[1]
    scaler = ((safe - state[0]) / (state[1] + eps) * h).clip(-1, 1)
    onehot = torch.zeros_like(cosine).scatter(1, label.view(-1, 1), 1.0)
    theta_m = (cosine.acos() + onehot * (-m * scaler)).clip(eps, math.pi - eps)
    return (theta_m.cos() - onehot * (m + m * scaler)) * s


def up_curricular(emb, label, kernel, state, m=0.5, s=64.0):
    """HuangYG123/CurricularFace CurricularFace.forward; ``state`` = [t] updated in place."""
    cos_theta = (F.normalize(emb, dim=1) @ (kernel / kernel.norm(dim=0, keepdim=True))).clamp(-1, 1)
    target = cos_theta[torch.arange(emb.shape[0]), label].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - target ** 2)
    cos_theta_m = target * math.cos(m) - sin_theta * math.sin(m)
    mask = cos_theta > cos_theta_m
    final = torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)
    with torch.no_grad():
        state[0] = target.mean() * 0.01 + (1 - 0.01) * state[0]
    hard = cos_theta[mask]
    cos_theta = cos_theta.clone()
    cos_theta[mask] = hard * (state[0] + hard)
    cos_theta = cos_theta.scatter(1, label.view(-1, 1), final)
    return cos_theta * s


def up_subcenter_arcface(emb, label, weight, k, m=0.5, s=64.0):
    cos = (F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()).view(emb.shape[0], -1, k).amax(2)
    cos = cos.clamp(-1, 1)
    target = cos.gather(1, label.view(-1, 1))
    theta_m = torch.cos(torch.acos(target) + m)
    final = torch.where(target > math.cos(math.pi - m), theta_m, target - math.sin(math.pi - m) * m)
    return cos.scatter(1, label.view(-1, 1), final) * s


def up_elastic(emb, label, kernel, margins, arc, s=64.0):
    """fdbtrs/ElasticFace ElasticArcFace / ElasticCosFace.forward with the row margins given."""
    cos_theta = (F.normalize(emb, dim=1) @ (kernel / kernel.norm(dim=0, keepdim=True))).clamp(-1, 1)
    m_hot = torch.zeros_like(cos_theta).scatter(1, label.view(-1, 1), margins.view(-1, 1))
    if arc:
        return torch.cos(torch.acos(cos_theta) + m_hot) * s
    return (cos_theta - m_hot) * s


def paper_plus_assignment(draws, cos_y):
    """ElasticFace+: the i-th largest label cosine gets the i-th smallest draw (a loop, on purpose)."""
    ranked = sorted(range(len(cos_y)), key=lambda i: (-float(cos_y[i]), i))
    out = torch.empty_like(draws)
    for r, i in enumerate(ranked):
        out[i] = sorted(draws.tolist())[r]
    return out


def _compare(module, upstream_logits, steps=3, check_state=None, seed=0):
    """Run ``steps`` training steps of ``module`` and of the upstream formula on the same
    batches and weights; compare loss, ∂x and ∂W each step (and the state via check_state)."""
    w0 = module.weight.detach().clone()
    for step in range(steps):
        x, y = _batch(step, seed=seed)
        xa = x.clone().requires_grad_()
        loss = module(xa, y)
        module.zero_grad()
        loss.backward()
        xb, wb = x.clone().requires_grad_(), w0.clone().requires_grad_()
        ref = F.cross_entropy(upstream_logits(xb, y, wb, step), y)
        ref.backward()
        torch.testing.assert_close(loss, ref, **TOL, msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        torch.testing.assert_close(module.weight.grad, wb.grad, **TOL)
        if check_state is not None:
            check_state(module)
    return float((loss - ref).detach().abs())


def test_adaface_matches_upstream_over_steps():
    mod = magloss.AdaFaceLoss(D, C, dtype=torch.float64)
    state = [torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)]

    def logits(x, y, w, step):
        norms = x.norm(dim=1, keepdim=True)
        return up_adaface(x / norms, norms, y, w.t(), state)

    def check(m):
        torch.testing.assert_close(m.batch_mean, state[0].reshape(()), **TOL)
        torch.testing.assert_close(m.batch_std, state[1].reshape(()), **TOL)

    _compare(mod, logits, check_state=check)


def test_curricular_matches_upstream_over_steps():
    mod = magloss.CurricularFaceLoss(D, C, dtype=torch.float64)
    state = [torch.zeros((), dtype=torch.float64)]
    _compare(mod, lambda x, y, w, step: up_curricular(x, y, w.t(), state),
             check_state=lambda m: torch.testing.assert_close(m.t, state[0].reshape(()), **TOL))


@pytest.mark.parametrize("k", [1, 3])
def test_subcenter_arcface_matches_upstream(k):
    mod = magloss.SubCenterArcFaceLoss(D, C, subcenters=k, dtype=torch.float64)
    assert mod.weight.shape == (k * C, D)
    _compare(mod, lambda x, y, w, step: up_subcenter_arcface(x, y, w, k), steps=1)


@pytest.mark.parametrize("arc", [True, False])
@pytest.mark.parametrize("plus", [False, True])
def test_elastic_matches_upstream(arc, plus):
    cls = magloss.ElasticArcFaceLoss if arc else magloss.ElasticCosFaceLoss
    mod = cls(D, C, plus=plus, seed=7, dtype=torch.float64)
    mean, std = (0.5 if arc else 0.35), ({(True, False): 0.05, (False, False): 0.05, (True, True): 0.0175,
                                         (False, True): 0.02}[(arc, plus)])
    gen = torch.Generator().manual_seed(7)        # the documented draw: N(m, σ²), float64, one per row

    def logits(x, y, w, step):
        draws = torch.randn(x.shape[0], generator=gen, dtype=torch.float64) * std + mean
        if plus:
            cos_y = (F.normalize(x, dim=1) * F.normalize(w, dim=1)[y]).sum(1).detach()
            draws = paper_plus_assignment(draws, cos_y)
        return up_elastic(x, y, w.t(), draws, arc)

    _compare(mod, logits)


def test_elastic_plus_gives_the_largest_margin_to_the_farthest_row():
    x, y = _batch(0)
    w = torch.randn(C, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    rm = magloss.adaptive.elastic_row_margins(torch.randn(B, generator=g, dtype=torch.float64), y >= 0, True,
                                              torch.float64, magloss.adaptive.label_cosines(x, w, y))
    cos_y = (F.normalize(x, dim=1) * F.normalize(w, dim=1)[y]).sum(1)
    assert int(rm[:, 0].argmax()) == int(cos_y.argmin()) and int(rm[:, 0].argmin()) == int(cos_y.argmax())


def test_ignored_rows_and_eval_mode():
    """Ignored rows do not enter the statistics; eval mode leaves the state untouched and
    uses the mean margin for ElasticFace."""
    x, y = _batch(0)
    y[[1, 5]] = -1
    ada = magloss.AdaFaceLoss(D, C, dtype=torch.float64)
    ada(x, y)
    a = x.norm(dim=1).clamp(1e-3, 100)[y >= 0]
    torch.testing.assert_close(ada.batch_mean, 0.01 * a.mean() + 0.99 * 20.0, **TOL)
    torch.testing.assert_close(ada.batch_std, 0.01 * a.std() + 0.99 * 100.0, **TOL)
    cur = magloss.CurricularFaceLoss(D, C, dtype=torch.float64)
    cur(x, y)
    c = (F.normalize(x, dim=1) * F.normalize(cur.weight.detach(), dim=1)[y.clamp_min(0)]).sum(1)[y >= 0]
    torch.testing.assert_close(cur.t, 0.01 * c.mean(), **TOL)
    for mod in (ada, cur):
        before = {k: v.clone() for k, v in mod.state_dict().items()}
        mod.eval()
        mod(x, y)
        assert all(torch.equal(v, mod.state_dict()[k]) for k, v in before.items())
    el = magloss.ElasticArcFaceLoss(D, C, seed=1, dtype=torch.float64).eval()
    arc = magloss.ArcFaceLoss(D, C, margin=0.5, dtype=torch.float64)
    arc.load_state_dict({"weight": el.weight.detach()})
    xs = x[:4] / x[:4].norm(dim=1, keepdim=True) * 3   # angles well inside (0, π − m): ArcFace's formula
    torch.testing.assert_close(el(xs, y[:4].clamp_min(0)), arc(xs, y[:4].clamp_min(0)), **TOL)


@pytest.mark.parametrize("make", [
    lambda: magloss.AdaFaceLoss(D, C, dtype=torch.float64),
    lambda: magloss.CurricularFaceLoss(D, C, dtype=torch.float64),
    lambda: magloss.ElasticArcFaceLoss(D, C, seed=3, dtype=torch.float64),
    lambda: magloss.ElasticCosFaceLoss(D, C, plus=True, seed=3, dtype=torch.float64),
], ids=["adaface", "curricular", "elastic_arc", "elastic_cos_plus"])
def test_state_saved_and_restored(make):
    a = make()
    for step in range(2):
        a(*_batch(step))
    saved = a.state_dict()
    b = make()
    b.load_state_dict(saved)
    x, y = _batch(5)
    torch.testing.assert_close(a(x, y), b(x, y), rtol=0, atol=0)
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b.state_dict()[k]), k
    fresh = make()
    fresh.load_state_dict({"weight": a.weight.detach()}, strict=False)
    assert not torch.equal(fresh(x, y), a(x, y))     # the state matters: the test can fail


def test_failed_forward_changes_no_state():
    for mod in (magloss.AdaFaceLoss(D, C), magloss.CurricularFaceLoss(D, C), magloss.ElasticArcFaceLoss(D, C)):
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in mod.state_dict().items()}
        gen_state = getattr(mod, "generator", torch.Generator()).get_state()
        x, y = _batch(0)
        y[3] = C + 4
        with pytest.raises(ValueError, match="labels"):
            mod(x.float(), y)
        for k, v in before.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, mod.state_dict()[k]), k
        if hasattr(mod, "generator"):
            assert torch.equal(mod.generator.get_state(), gen_state)


# -- sub-center helpers ------------------------------------------------------------------------------------
def test_subcenter_helpers_match_a_loop():
    """Counts, dominant sub-center and the 75° rule against a per-class loop (as
    pytorch-metric-learning's get_outliers and insightface's drop.py)."""
    k, c, d = 3, 5, 6
    g = torch.Generator().manual_seed(4)
    w = torch.randn(k * c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (40,), generator=g)
    x = torch.randn(40, d, generator=g, dtype=torch.float64) * 0.7 + w[y * k + (torch.arange(40) % 2)]
    y[7] = -1
    counts = subcenter_counts(x, w, y, k)
    dom = dominant_subcenters(counts)
    flags = far_from_class(x, dominant_weight(w, dom, k), y)
    for j in range(c):
        rows = [i for i in range(40) if int(y[i]) == j]
        picks = [int(max(range(k), key=lambda q: float(F.cosine_similarity(x[i], w[j * k + q], dim=0))))
                 for i in rows]
        want = [picks.count(q) for q in range(k)]
        assert counts[j].tolist() == want
        assert int(dom[j]) == want.index(max(want))
        for i in rows:
            angle = math.degrees(math.acos(float(F.cosine_similarity(x[i], w[j * k + int(dom[j])], dim=0))))
            assert bool(flags[i]) == (angle > 75.0)
    assert not bool(flags[7])
    mod = magloss.SubCenterArcFaceLoss(d, c, subcenters=k, dtype=torch.float64)
    mod.load_state_dict({"weight": w})
    arc = mod.drop_subcenters(mod.subcenter_counts(x, y))
    assert isinstance(arc, magloss.ArcFaceLoss) and torch.equal(arc.weight.detach(), dominant_weight(w, dom, k))
    assert torch.equal(mod.far_from_class(x, y, counts), flags)


# -- functional forms: gradcheck through the engine ---------------------------------------------------------
# every registered loss (and variant) with per-row margins, curricular columns or sub-centers, at s = 8;
# AdaFace with σ tiny: ẑ has no gradient by design, and with σ tiny every ẑ is clipped to ±1, constant near x
FUNCTIONAL = {n: functools.partial(loss_functional(n), scale=8.0,
                                   **({"batch_mean": 30.0, "batch_std": 1e-6} if n == "adaface" else {}))
              for n in LOSS_VARIANTS if n not in NO_SPEC and n not in FAMILIES}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_gradcheck(name):
    x, y = _batch(0, b=5, c=4, d=4)
    y[2] = -1
    w = torch.randn(4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w: FUNCTIONAL[name](x, w, y), (x.requires_grad_(), w.requires_grad_()),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


# -- bad arguments -------------------------------------------------------------------------------------------
BAD = [
    (magloss.AdaFaceLoss, dict(margin=-0.1), "margin"),
    (magloss.AdaFaceLoss, dict(margin=23.0), "margin"),
    (magloss.AdaFaceLoss, dict(h=0.0), "h"),
    (magloss.AdaFaceLoss, dict(momentum=1.5), "momentum"),
    (magloss.AdaFaceLoss, dict(scale=-1.0), "scale"),
    (magloss.CurricularFaceLoss, dict(margin=30.0), "margin"),
    (magloss.CurricularFaceLoss, dict(momentum=0.0), "momentum"),
    (magloss.SubCenterArcFaceLoss, dict(subcenters=0), "subcenters"),
    (magloss.SubCenterArcFaceLoss, dict(subcenters=2.5), "subcenters"),
    (magloss.SubCenterArcFaceLoss, dict(margin=28.6), "margin"),
    (magloss.ElasticArcFaceLoss, dict(std=-0.1), "std"),
    (magloss.ElasticArcFaceLoss, dict(margin=float("nan")), "margin"),
    (magloss.ElasticCosFaceLoss, dict(seed="x"), "seed"),
    (magloss.ElasticCosFaceLoss, dict(plus=1), "plus"),
]


@pytest.mark.parametrize("cls,kw,word", BAD, ids=[f"{b[0].__name__}-{list(b[1])[0]}" for b in BAD])
def test_bad_arguments(cls, kw, word):
    with pytest.raises((ValueError, TypeError), match=rf"^{word}"):
        cls(D, C, **kw)


@pytest.mark.parametrize("engine", ["chunked", "reference"])
@pytest.mark.parametrize("chunk", ["7", "16", ""])
@pytest.mark.parametrize("k,b", [(2, 1), (3, 1), (3, 9)])
def test_identical_subcenters_send_the_gradient_to_the_lowest_k(engine, chunk, k, b, monkeypatch):
    """K bitwise-identical copies of each class row: a tie everywhere, which the docs give to the
    lowest k. Then the loss and the gradient of copy 0 are ArcFace's on the single rows, and the
    other copies get none, whatever the chunking (the matrix product rounds a column by its
    position in the chunk; B = 1 took the matrix-vector path, which sent it to k > 0)."""
    from magloss import reference

    monkeypatch.setenv("MAGLOSS_CHUNK", chunk)
    c, d = 257, 64
    g = torch.Generator().manual_seed(5)
    base = torch.randn(c, d, generator=g)
    x = torch.randn(b, d, generator=g) * 10
    y = torch.randint(0, c, (b,), generator=g)
    spec = magloss.MarginSpec.combined(16.0, 1.0, 0.5, 0.0)
    grads = []
    for kk, w in ((1, base.clone()), (k, base.repeat_interleave(k, 0))):
        w.requires_grad_()
        s = spec.with_subcenters(kk)
        if engine == "chunked":
            loss = MF.margin_loss(x, w, y, s, reduction="sum")
        else:
            lse, zy, _, _ = reference.margin_ce_rows(x, w, y, s)
            loss = (lse - zy).sum()
        loss.backward()
        grads.append((loss.detach(), w.grad.view(c, kk, d)))
    (l1, g1), (lk, gk) = grads
    assert torch.equal(gk[:, 1:], torch.zeros_like(gk[:, 1:]))
    torch.testing.assert_close(lk, l1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gk[:, 0], g1[:, 0], rtol=1e-5, atol=1e-7)
