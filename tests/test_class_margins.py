"""Per-class margins (``class_margins``) and the class-count helper, on every engine and in the
sharded heads, with per-sample weights where they meet.

Expected values come from a float64 re-implementation of the combined margin
ψ = cos(m1·θ + m2_c) − m3_c with the THRESHOLD and EASY boundaries written from docs/math.md
(its gradients by autograd through it), from the per-row equivalence "a per-class table is the
scalar-margin loss of each row's class", from hand-derived numbers (the helper) and gradcheck.
The engines: the reference (its per-row margins input), both chunked paths, the fused engine
under the CPU emulator (tests/emu), torch.compile(fullgraph=True), and the class-sharded heads
on gloo against the single-process loss (with sample weights, tests/test_sample_weight.py's
other half).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from unittest import mock

import pytest
import torch

import magloss
import magloss.distributed as mdist
import magloss.functional as MF
from _dist_utils import spawn_worlds
from cases import (CHUNKED_FP32_LOSS_REL, FP32_TOL, FP64_TOL, FUSED_FP32_GRADS_REL, LOSS_NAMES, build_loss,
                   make_feature_case, make_inputs, rel)
from magloss import chunked, reference
from magloss.margins import (CLASS_M2, CLASS_M3, EASY, THRESHOLD, MarginSpec, class_count_margins,
                             class_row_margins)

IGNORED = (2, 5)


# ---- the float64 oracle ----------------------------------------------------------------------------------
def psi64(c, m1, m2, m3, boundary):
    """ψ of the combined margin with per-row m2, m3 ([B] float64), from docs/math.md §1."""
    c = c.clamp(-1.0, 1.0)
    th = torch.acos(c)
    arg = m1 * th + m2
    if boundary == EASY:                     # margin only where c > 0 and m1·θ + m2 < π
        return torch.where((c > 0) & (arg < math.pi), torch.cos(arg) - m3, c)
    th_t = (math.pi - m2) / m1
    mm = torch.maximum((math.pi - th_t) * torch.sin(th_t), 1 + torch.cos(th_t))
    return torch.where(th < th_t, torch.cos(arg) - m3, c - m3 - mm)


def oracle(x, w, y, s, m1, m2, m3, boundary, reduction, sw=None):
    """float64 loss of the combined margin with per-row (m2_i, m3_i), differentiable in x and w."""
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    valid = y != -1
    yc = y.clamp_min(0)
    cy = cos.gather(1, yc[:, None])[:, 0]
    psi = psi64(cy, m1, m2, m3, boundary)
    z = (s * cos).scatter(1, yc[:, None], (s * psi)[:, None])
    ce = torch.where(valid, torch.logsumexp(z, dim=1) - s * psi, torch.zeros_like(psi))
    wv = torch.ones_like(ce) if sw is None else sw.double()
    if reduction == "none":
        return ce * wv
    if reduction == "sum":
        return (ce * wv).sum()
    den = torch.where(valid, wv, torch.zeros_like(wv)).sum()
    return (ce * wv).sum() / den.clamp_min(1e-300) if den > 0 else (ce * 0).sum()


def table(C, lo, hi, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(C, generator=g, dtype=torch.float64)).to(dtype)


def sample_weights(B, seed=5):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(B, generator=g, dtype=torch.float64)


# family: (functional call(x, w, y, tab, **kw), spec args (s, m1, boundary), table maker, row margins of the table)
S = 16.0
FAMS = {
    "arcface": (lambda x, w, y, t, **kw: MF.arcface_loss(x, w, y, scale=S, class_margins=t, **kw),
                (1.0, THRESHOLD), lambda C: table(C, 0.1, 0.8), lambda t, y: (t[y], 0 * t[y])),
    "arcface_easy": (lambda x, w, y, t, **kw: MF.arcface_loss(x, w, y, scale=S, easy_margin=True, class_margins=t,
                                                              **kw),
                     (1.0, EASY), lambda C: table(C, 0.1, 0.8, seed=1), lambda t, y: (t[y], 0 * t[y])),
    "cosface": (lambda x, w, y, t, **kw: MF.cosface_loss(x, w, y, scale=S, class_margins=t, **kw),
                (1.0, THRESHOLD), lambda C: table(C, 0.05, 0.6, seed=2), lambda t, y: (0 * t[y], t[y])),
    "combined": (lambda x, w, y, t, **kw: MF.combined_margin_loss(x, w, y, scale=S, m1=0.9, class_margins=t, **kw),
                 (0.9, THRESHOLD), lambda C: torch.stack([table(C, 0.33, 0.6, seed=3), table(C, 0.0, 0.2, seed=4)], 1),
                 lambda t, y: (t[y, 0], t[y, 1])),
}


def _oracle_for(fam, x, w, y, tab, reduction, sw=None):
    _, (m1, boundary), _, rows = FAMS[fam]
    m2, m3 = rows(tab.double(), y.clamp_min(0))
    return oracle(x, w, y, S, m1, m2, m3, boundary, reduction, sw)


# ---- the helper ------------------------------------------------------------------------------------------
def test_class_count_margins_hand_values():
    """counts 1, 16, 81, 256 with λ = 1/4: r = 1, 1/2, 1/3, 1/4; min-max scaled 1, 1/3, 1/9, 0;
    0.45·that + 0.05 = 0.5, 0.2, 0.1, 0.05. Raw: 0.45·r + 0.05."""
    got = class_count_margins(torch.tensor([1, 16, 81, 256]), dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.2, 0.1, 0.05], dtype=torch.float64), **FP64_TOL)
    raw = class_count_margins([1, 16, 81, 256], normalize=False, dtype=torch.float64)
    torch.testing.assert_close(raw, torch.tensor([0.5, 0.275, 0.2, 0.1625], dtype=torch.float64), **FP64_TOL)
    custom = class_count_margins([4.0, 1.0], a=0.3, lam=0.5, b=0.1, normalize=False, dtype=torch.float64)
    torch.testing.assert_close(custom, torch.tensor([0.25, 0.4], dtype=torch.float64), **FP64_TOL)
    assert class_count_margins([7, 7, 7]).tolist() == pytest.approx([0.05] * 3)    # one count: all b
    assert class_count_margins([3, 9]).dtype == torch.float32


BAD_COUNTS = [
    (torch.tensor([3, 0, 2]), ValueError, r"counts: .*got 0 at class 1 \(n\^\(-lam\) is infinite"),
    ([3, -1], ValueError, r"counts: expected finite positive class sizes, got -1 at class 1"),
    ([3.0, float("nan")], ValueError, r"counts: .*got nan at class 1"),
    (torch.ones(2, 2), ValueError, r"counts: expected a non-empty 1-D"),
    ([], ValueError, r"counts: expected a non-empty 1-D"),
    (torch.tensor([True, False]), TypeError, r"counts: expected integer or real class sizes"),
    ("abc", TypeError, r"counts: expected a 1-D tensor or sequence"),
]


@pytest.mark.parametrize("counts,exc,msg", BAD_COUNTS)
def test_class_count_margins_errors(counts, exc, msg):
    with pytest.raises(exc, match=msg):
        class_count_margins(counts)


@pytest.mark.parametrize("kw,msg", [(dict(a=-0.1), r"^a: "), (dict(lam=float("nan")), r"^lam: "),
                                    (dict(b=float("inf")), r"^b: ")])
def test_class_count_margins_parameter_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        class_count_margins([1, 2], **kw)


# ---- values and gradients against the oracle ------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,C,D", [(1, 3, 4), (9, 7, 6), (16, 11, 5)])
@pytest.mark.parametrize("fam", list(FAMS))
def test_functional_against_the_float64_oracle(fam, B, C, D, reduction, weighted):
    """Rows at every branch (make_feature_case: θ near π past θ_t, near 0, at 0.2), ignored rows."""
    call, _, make_table, _ = FAMS[fam]
    x, w, y, _ = make_feature_case(B, C, D, seed=B + C, ignored=IGNORED)
    tab = make_table(C)
    sw = sample_weights(B) if weighted else None
    xo, wo = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = _oracle_for(fam, xo, wo, y, tab, reduction, sw)
    gxo, gwo = torch.autograd.grad(want.sum(), (xo, wo))
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = call(xg, wg, y, tab, reduction=reduction, sample_weight=sw)
    gx, gw = torch.autograd.grad(got.sum(), (xg, wg))
    torch.testing.assert_close(got, want, **FP64_TOL)
    torch.testing.assert_close(gx, gxo, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gw, gwo, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,K", [("arcface", 1), ("cosface", 1), ("subcenter_arcface", 3)])
def test_a_class_table_is_each_rows_scalar_margin(name, K, dtype):
    """Row i of the per-class loss equals the scalar-margin loss of row i alone with margin
    table[y_i] (value and gradient), for ArcFace, CosFace and Sub-center ArcFace (K = 3)."""
    B, C, D = 9, 6, 7
    x, w, y, _ = make_feature_case(B, C, D, K, seed=4, ignored=IGNORED)
    x, w = x.to(dtype), w.to(dtype)
    tab = table(C, 0.1, 0.7, seed=6, dtype=dtype)
    fn = {"arcface": MF.arcface_loss, "cosface": MF.cosface_loss,
          "subcenter_arcface": lambda *a, **k: MF.subcenter_arcface_loss(*a, subcenters=K, **k)}[name]
    xg = x.clone().requires_grad_(True)
    got = fn(xg, w, y, scale=S, class_margins=tab, reduction="none")
    (gx,) = torch.autograd.grad(got.sum(), xg)
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    for i in range(B):
        xi = x[i:i + 1].clone().requires_grad_(True)
        margin = float(tab[y[i]]) if y[i] >= 0 else 0.3
        want = fn(xi, w, y[i:i + 1], scale=S, margin=margin, reduction="none")
        (gi,) = torch.autograd.grad(want.sum(), xi)
        torch.testing.assert_close(got[i:i + 1], want, **tol)
        torch.testing.assert_close(gx[i:i + 1], gi, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["speed", "flat"])
def test_chunked_engine_paths(path, dtype, monkeypatch):
    """Both chunked paths (several class chunks), every dtype: float64 to 1e-10; float32 to the
    chunked engine's tolerances; bfloat16/float16 inputs against the oracle on the rounded inputs."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "4")
    B, C, D = 10, 13, 8
    x, w, y, _ = make_feature_case(B, C, D, seed=12, ignored=IGNORED)
    x, w = x.to(dtype), w.to(dtype)
    tab = table(C, 0.1, 0.8)
    sw = sample_weights(B)
    xo, wo = x.double().requires_grad_(True), w.double().requires_grad_(True)
    want = _oracle_for("arcface", xo, wo, y, tab, "mean", sw)
    gxo, gwo = torch.autograd.grad(want, (xo, wo))
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with chunked.use_path(path):
        got = MF.arcface_loss(xg, wg, y, scale=S, class_margins=tab.to(dtype), sample_weight=sw.to(dtype))
    gx, gw = torch.autograd.grad(got, (xg, wg))
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, **FP64_TOL)
        torch.testing.assert_close(gx, gxo, rtol=1e-9, atol=1e-9)
        return
    if dtype == torch.float32:
        assert rel(got, want) <= CHUNKED_FP32_LOSS_REL
        assert rel(gx, gxo) <= FUSED_FP32_GRADS_REL and rel(gw, gwo) <= FUSED_FP32_GRADS_REL
        return
    # half inputs: the table and weights rounded to the dtype too; fp32 math on the rounded values
    want = _oracle_for("arcface", x.double(), w.double(), y, tab.to(dtype).double(), "mean", sw.to(dtype).double())
    assert rel(got, want) <= 1e-5


def test_reference_engine_with_the_looked_up_rows():
    """The oracle engine's per-row margins input fed by class_row_margins gives the oracle's rows."""
    B, C, D = 8, 5, 6
    x, w, y, _ = make_feature_case(B, C, D, seed=21, ignored=IGNORED)
    tab = FAMS["combined"][2](C)
    spec = MarginSpec.combined(S, 0.9, 0.5, 0.0)
    rm = class_row_margins(tab, y, -1, None, torch.float64)
    assert rm.shape == (B, 2) and torch.all(rm[list(IGNORED)] == 0)
    lse, zy, _, _ = reference.margin_ce_rows(x, w, y, spec, -1, None, rm)
    rows = torch.where(y != -1, lse - zy, 0)
    torch.testing.assert_close(rows, _oracle_for("combined", x, w, y, tab, "none"), **FP64_TOL)


def test_gradcheck_float64():
    B, C, D = 5, 4, 3
    x, w, y = make_inputs(B, C, D, norm_range=(1.0, 3.0), ignored=(1,), seed=3)
    tab = table(C, 0.1, 0.6)
    sw = sample_weights(B)
    fn = lambda xx, ww: MF.arcface_loss(xx, ww, y, scale=4.0, class_margins=tab, sample_weight=sw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), w.requires_grad_(True)))
    fn2 = lambda xx, ww: MF.combined_margin_loss(xx, ww, y, scale=4.0, m1=0.9,  # noqa: E731
                                                   class_margins=FAMS["combined"][2](C), reduction="sum")
    assert torch.autograd.gradcheck(fn2, (x, w))


# ---- modules -----------------------------------------------------------------------------------------------
def test_module_buffer_follows_the_module_and_the_state_dict():
    D, C = 6, 5
    tab = table(C, 0.1, 0.6)
    m = magloss.ArcFaceLoss(D, C, scale=S, class_margins=tab)
    assert m.class_margins.dtype == torch.float32 and "class_margins" in m.state_dict()
    torch.testing.assert_close(m.class_margins, tab.float())
    assert m.double().class_margins.dtype == torch.float64
    assert m.half().class_margins.dtype == torch.float32        # never rounded to half
    m.double()
    x, _, y = make_inputs(7, C, D, ignored=IGNORED, seed=2)
    torch.testing.assert_close(m(x, y), MF.arcface_loss(x, m.weight, y, scale=S, class_margins=tab.float().double()),
                               **FP64_TOL)
    other = magloss.ArcFaceLoss(D, C, scale=S, class_margins=torch.zeros(C)).double()
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(other(x, y), m(x, y), **FP64_TOL)
    new = table(C, 0.2, 0.3, seed=9)
    m.set_class_margins(new)                                     # updated between steps
    torch.testing.assert_close(m(x, y), MF.arcface_loss(x, m.weight, y, scale=S, class_margins=new), **FP64_TOL)
    m.set_class_margins(None)
    torch.testing.assert_close(m(x, y), MF.arcface_loss(x, m.weight, y, scale=S), **FP64_TOL)
    assert "class_margins" not in m.state_dict()


def test_module_forward_reads_nothing_back(monkeypatch):
    """The table was validated by set_class_margins: the forward only looks it up."""
    m = magloss.ArcFaceLoss(5, 4, class_margins=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x, _, y = make_inputs(6, 4, 5, dtype=torch.float32, seed=1)
    want = m(x, y)

    def no_check(*a, **k):
        raise AssertionError("class_margins checked again in the forward")
    monkeypatch.setattr(MF, "check_class_margins", no_check)
    torch.testing.assert_close(m(x, y), want)
    with pytest.raises(AssertionError):                       # the functional form does check
        MF.arcface_loss(x, m.weight, y, class_margins=m.class_margins)


def test_a_bad_update_leaves_the_table_unchanged():
    m = magloss.CosFaceLoss(4, 3, class_margins=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="class_margins"):
        m.set_class_margins(torch.tensor([0.1, -0.2, 0.3]))
    assert m.class_margins.tolist() == pytest.approx([0.1, 0.2, 0.3])


ACCEPTING = {"cosface", "arcface", "combined", "subcenter_arcface"}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_other_family_refuses_class_margins(name):
    """Margin families whose margin is not an m2/m3 constant say why; the losses without a
    softmax margin (softmax, one-vs-all) have no such argument."""
    C = 4
    tab = torch.full((C, 2), 0.3) if name == "combined" else torch.full((C,), 0.3)
    if name in ACCEPTING:
        assert build_loss(name, 5, C, class_margins=tab).class_margins is not None
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if name in ("softmax", "sface", "uniface", "sphereface2", "p2sgrad"):
            with pytest.raises(TypeError, match="class_margins"):
                build_loss(name, 5, C, class_margins=tab)
            return
        with pytest.raises(ValueError, match=r"class_margins: \w+Loss takes no per-class margins: \w"):
            build_loss(name, 5, C, class_margins=tab)


BAD_TABLES = [
    ("arcface", torch.full((5,), 0.3), ValueError, r"class_margins: expected shape \[4\], got \[5\]"),
    ("arcface", torch.full((4, 2), 0.3), ValueError, r"class_margins: expected shape \[4\], got \[4, 2\]"),
    ("combined", torch.full((4,), 0.3), ValueError, r"class_margins: expected shape \[4, 2\]"),
    ("arcface", torch.tensor([1, 2, 3, 0]), TypeError, r"class_margins: expected a float16.*int64"),
    ("arcface", [0.1] * 4, TypeError, r"class_margins: expected a torch.Tensor"),
    ("arcface", torch.tensor([0.1, 0.2, -0.1, 0.3]), ValueError, r"got -0.1\d* at class 2"),
    ("cosface", torch.tensor([0.1, float("nan"), 0.1, 0.3]), ValueError, r"got nan at class 1"),
    ("arcface", torch.tensor([0.1, 0.2, 0.3, 3.2]), ValueError, r"class_margins: expected finite values in \[0, pi\)"),
    ("combined", torch.tensor([[0.4, 0.0], [0.1, 0.0], [0.4, 0.0], [0.4, 0.0]]), ValueError,
     r"m2 >= \(1 - m1\)\*pi = 0.3142, got 0.1\d* at class 1"),
    ("combined", torch.tensor([[0.4, 0.0], [0.4, -1.0], [0.4, 0.0], [0.4, 0.0]]), ValueError,
     r"got -1.0 at class 1, column 1"),
]


@pytest.mark.parametrize("name,tab,exc,msg", BAD_TABLES)
def test_bad_tables_are_named(name, tab, exc, msg):
    kw = dict(m1=0.9, m2=0.4) if name == "combined" else {}
    with pytest.raises(exc, match=msg):
        build_loss(name, 5, 4, class_margins=tab, **kw)
    x, w, y = make_inputs(6, 4, 5, dtype=torch.float32, seed=1)
    fn = {"arcface": MF.arcface_loss, "cosface": MF.cosface_loss,
          "combined": lambda *a, **k: MF.combined_margin_loss(*a, m1=0.9, m2=0.4, **k)}[name]
    with pytest.raises(exc, match=msg):
        fn(x, w, y, class_margins=tab)


def test_functional_errors():
    x, w, y = make_inputs(6, 4, 5, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"class_margins: expected a tensor on cpu"):
        MF.arcface_loss(x, w, y, class_margins=torch.zeros(4, device="meta"))
    spec = MarginSpec.arcface()
    with pytest.raises(ValueError, match=r"class_margins, row_margins: expected one source"):
        MF.margin_loss(x, w, y, spec, class_margins=torch.zeros(4, 2), row_margins=torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"class_margins: per-class margins replace m2/m3 of the COMBINED"):
        MF.margin_loss(x, w, y, MarginSpec.magface(), class_margins=torch.zeros(4, 2))
    got = MF.margin_loss(x, w, y, spec, class_margins=torch.stack([torch.full((4,), 0.5), torch.zeros(4)], 1))
    torch.testing.assert_close(got, MF.arcface_loss(x, w, y))     # a generic [C, 2] table of the spec's own margins


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    D, C, B = 8, 6, 7
    crit = magloss.CombinedMarginLoss(D, C, scale=S, m1=0.9, class_margins=FAMS["combined"][2](C))
    x, _, y = make_inputs(B, C, D, dtype=torch.float32, ignored=IGNORED, seed=3)
    sw = sample_weights(B).float()

    def step(x, y, sw):
        return crit(x, y, sample_weight=sw)

    eager = step(x, y, sw)
    eager.backward()
    grad = crit.weight.grad.clone()
    crit.weight.grad = None
    loss = torch.compile(step, fullgraph=True)(x, y, sw)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(crit.weight.grad, grad, rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def _chunked_engine_refused():
    """Within: a call of the chunked engine's forward or backward raises (the fused kernels must serve)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the chunked engine ran where the emulated fused kernels should")
    with mock.patch.object(chunked, "margin_ce_forward", refuse), \
            mock.patch.object(chunked, "margin_ce_backward", refuse):
        yield


# ---- the fused engine under the CPU emulator ------------------------------------------------------------
@pytest.mark.parametrize("fam", ["combined"])      # slow (about 40 s): one family, the [C, 2] table with m1 < 1
def test_emulated_fused_engine(fam):
    """The CUDA kernels (CPU emulator, tests/emu): float32 against the float64 oracle, with
    sample weights, at the fused engine's tolerances (docs/cuda.md)."""
    from emu import build
    from emu import engine as emu_engine
    try:
        emu_engine.module()
    except build.EmulatorUnavailable as exc:
        pytest.skip(f"CUDA emulator unavailable: {exc}")
    B, C, D = 9, 7, 16
    x, w, y, _ = make_feature_case(B, C, D, seed=17, ignored=IGNORED)
    call, _, make_table, _ = FAMS[fam]
    tab = make_table(C)
    sw = sample_weights(B)
    xo, wo = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = _oracle_for(fam, xo, wo, y, tab, "mean", sw)
    gxo, gwo = torch.autograd.grad(want, (xo, wo))
    emu_engine.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the emulated kernels, not the chunked engine: calling the latter fails the test
        with emu_engine.routed(), _chunked_engine_refused():
            xg, wg = x.float().requires_grad_(True), w.float().requires_grad_(True)
            got = call(xg, wg, y, tab.float(), sample_weight=sw.float())
            gx, gw = torch.autograd.grad(got, (xg, wg))
    finally:
        torch.set_num_threads(threads)
        emu_engine.reset()
        magloss.flush_input_checks()
    assert emu_engine.error() is None
    assert rel(got, want) <= 1e-5
    assert rel(gx, gxo) <= FUSED_FP32_GRADS_REL and rel(gw, gwo) <= FUSED_FP32_GRADS_REL


# ---- class-sharded heads: class margins and sample weights on gloo -----------------------------------------
D_SH, C_SH = 6, 17
PFC = {"arcface_cm_pfc": 0.5}                     # case -> Partial FC sample_rate
SHARDED = [   # name, class, kwargs, dtype, table maker (None: no class margins), weighted, reduction
    ("arcface_cm", "ArcFaceLoss", dict(scale=S), torch.float64, lambda: table(C_SH, 0.1, 0.8), True, "mean"),
    ("cosface_cm_sum", "CosFaceLoss", dict(scale=S), torch.float64, lambda: table(C_SH, 0.1, 0.5), False, "sum"),
    ("combined_cm_none", "CombinedMarginLoss", dict(scale=S, m1=0.9), torch.float64,
     lambda: FAMS["combined"][2](C_SH), True, "none"),
    ("subcenter_cm", "SubCenterArcFaceLoss", dict(scale=S, subcenters=2), torch.float64,
     lambda: table(C_SH, 0.1, 0.8, seed=3), True, "mean"),
    ("arcface_cm_f32", "ArcFaceLoss", dict(scale=S), torch.float32, lambda: table(C_SH, 0.1, 0.8), True, "mean"),
    ("arcface_cm_pfc", "ArcFaceLoss", dict(scale=S), torch.float64, lambda: table(C_SH, 0.1, 0.8, seed=8), True,
     "mean"),                                     # Partial FC, sample_rate 0.5 (PFC below)
    ("magface_w", "MagFaceLoss", dict(), torch.float64, None, True, "mean"),
    ("adaface_w", "AdaFaceLoss", dict(), torch.float64, None, True, "mean"),
    ("sface_w", "SFaceLoss", dict(), torch.float64, None, True, "mean"),
    ("uniface_w_sum", "UniFaceLoss", dict(), torch.float64, None, True, "sum"),
    # sample weights on the other registered losses' sharded twins
    ("normface_w", "NormFaceLoss", dict(scale=S), torch.float64, None, True, "mean"),
    ("sphereface_w", "SphereFaceLoss", dict(margin=3), torch.float64, None, True, "mean"),
    ("magcos_w_none", "MagCosFaceLoss", dict(), torch.float64, None, True, "none"),
    ("curricular_w", "CurricularFaceLoss", dict(scale=S), torch.float64, None, True, "mean"),
    ("elastic_arc_w", "ElasticArcFaceLoss", dict(scale=S, seed=3), torch.float64, None, True, "mean"),
    ("elastic_cos_plus_w", "ElasticCosFaceLoss", dict(scale=S, seed=4, plus=True), torch.float64, None, True,
     "sum"),
    ("sphereface2_w", "SphereFace2Loss", dict(), torch.float64, None, True, "mean"),
    ("p2sgrad_w", "P2SGradLoss", dict(), torch.float64, None, True, "mean"),
]


def _sharded_inputs(case):
    name, cls, kwargs, dtype, make_table, weighted, _ = case
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    B = 11
    x, w, y = make_inputs(B, C_SH * kwargs.get("subcenters", 1), D_SH, norm_range=(5.0, 120.0), generator=g)
    y = y % C_SH
    y[[1, 8]] = -1
    sw = 2 * torch.rand(B, generator=g, dtype=torch.float64) if weighted else None
    return x.to(dtype), w.to(dtype), y, sw, (None if make_table is None else make_table())


def _single(case):
    name, cls, kwargs, dtype, _, _, reduction = case
    x, w, y, sw, tab = _sharded_inputs(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = getattr(magloss, cls)(D_SH, C_SH, reduction=reduction, dtype=dtype, **kwargs)
    if tab is not None:
        m.set_class_margins(tab)
    with torch.no_grad():
        m.weight.copy_(w)
        if getattr(m, "bias", None) is not None:
            m.bias.fill_(1.5)
    return m, x, y, sw


def _split(n, world):
    q, e = divmod(n, world)
    sizes = [q + (1 if r < e else 0) for r in range(world)]
    return sizes


def _sharded_phase(rank, world, group, out_dir):
    res = {}
    for case in SHARDED:
        name, cls, _, dtype, _, _, reduction = case
        m, x, y, sw = _single(case)
        sh = mdist.shard(m, group=group, ddp_backbone=False, sample_rate=PFC.get(name, 1.0))
        sizes = _split(x.shape[0], world)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        xr = x[lo:hi].clone().requires_grad_(True)
        out = sh(xr, y[lo:hi], sample_weight=None if sw is None else sw[lo:hi].to(dtype))
        scalar = out.sum() if reduction == "none" else out
        scalar.backward()
        res[name] = (out.detach(), xr.grad, sh.weight.grad, sh.shard_start, sh.shard_end, sh.last_sample)
    # errors on every rank: weights on one rank only, a bad weight on the last rank
    m, x, y, sw = _single(SHARDED[0])
    sh = mdist.shard(m, group=group, ddp_backbone=False)
    sizes = _split(x.shape[0], world)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    errs = {}
    for key, w_r in (("one_rank", sw[lo:hi] if rank == 0 else None),
                     ("bad", torch.where(torch.arange(hi - lo) == 0, -1.0, 1.0).double() if rank == world - 1
                      else sw[lo:hi])):
        try:
            sh(x[lo:hi], y[lo:hi], sample_weight=w_r)
            errs[key] = None
        except ValueError as exc:
            errs[key] = str(exc)
    res["errors"] = errs
    return res


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    return spawn_worlds(_sharded_phase, (2, 3), tmp_path_factory.mktemp("class_margins_dist"))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", SHARDED, ids=[c[0] for c in SHARDED])
def test_sharded_equals_single_process(sharded_results, world, case):
    """The sharded loss and gradients equal the single-process loss on the concatenated batch; with
    Partial FC, the single-process loss over the classes the shards kept (labels, weight rows and
    class margins restricted to them)."""
    name, _, kwargs, dtype, _, _, reduction = case
    m, x, y, sw = _single(case)
    kept = None
    if name in PFC:
        kept = torch.cat([sharded_results[(world, r)][name][5] for r in range(world)])
        assert 0 < kept.numel() < C_SH and torch.isin(y[y >= 0], kept).all()
        sub = magloss.ArcFaceLoss(D_SH, kept.numel(), reduction=reduction, dtype=dtype, **kwargs)
        with torch.no_grad():
            sub.weight.copy_(m.weight[kept])
        sub.set_class_margins(m.class_margins[kept])
        remap = torch.full((C_SH,), -1, dtype=torch.long)
        remap[kept] = torch.arange(kept.numel())
        m, y = sub, torch.where(y >= 0, remap[y.clamp_min(0)], y)
    xg = x.clone().requires_grad_(True)
    out = m(xg, y, sample_weight=None if sw is None else sw.to(dtype))
    (out.sum() if reduction == "none" else out).backward()
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    k = kwargs.get("subcenters", 1)
    sizes = _split(x.shape[0], world)
    for r in range(world):
        got, gx, gw, start, end, sample = sharded_results[(world, r)][name]
        torch.testing.assert_close(got, out.detach(), **tol)
        lo = sum(sizes[:r])
        torch.testing.assert_close(gx, xg.grad[lo:lo + sizes[r]], **tol)
        if kept is None:
            torch.testing.assert_close(gw, m.weight.grad[start * k:end * k], **tol)
        else:                                      # the kept rows of the shard get the restricted loss's gradient
            pos = torch.searchsorted(kept, sample)
            torch.testing.assert_close(gw[sample - start], m.weight.grad[pos], **tol)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_weight_errors_are_raised_on_every_rank(sharded_results, world):
    for r in range(world):
        errs = sharded_results[(world, r)]["errors"]
        assert errs["one_rank"] == f"sample_weight: expected on every rank or on none, got it on ranks [0] of {world}"
        first_of_last = sum(_split(11, world)[:-1])
        assert errs["bad"] == f"sample_weight: expected finite values >= 0, got a bad value at global row {first_of_last}"


def test_row_lookup_columns_and_the_generic_margin_loss():
    """class_row_margins puts a [C] table in m2 (CLASS_M2) or m3 (CLASS_M3), zero elsewhere and on
    ignored rows; margin_loss with a [C] table and its column is the named loss."""
    y = torch.tensor([2, -1, 0, 2])
    tab = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    want = torch.tensor([0.3, 0.0, 0.1, 0.3], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(class_row_margins(tab, y, -1, CLASS_M2, torch.float64), torch.stack([want, zero], 1))
    assert torch.equal(class_row_margins(tab, y, -1, CLASS_M3, torch.float64), torch.stack([zero, want], 1))
    x, w, y = make_inputs(6, 3, 5, ignored=IGNORED, seed=4)
    got = MF.margin_loss(x, w, y, MarginSpec.cosface(S), class_margins=tab, class_margin_column=CLASS_M3)
    torch.testing.assert_close(got, MF.cosface_loss(x, w, y, scale=S, class_margins=tab), **FP64_TOL)
