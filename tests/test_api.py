"""The public API: modules, functional forms, custom ops (opcheck), torch.compile, autocast."""

import functools

import pytest
import torch
from torch.library import opcheck

import magloss
import magloss.functional as MF
from cases import ALL, FAMILIES, loss_functional, make_inputs


# every plain margin family (tests/cases.py): its module against its functional form; SphereFace's first
# training forward uses iteration 1, as upstream: λ = 1000/(1 + 0.12·1)
MODULES = [(FAMILIES[n].cls, FAMILIES[n].kwargs,
            loss_functional(n) if FAMILIES[n].lam is None else functools.partial(loss_functional(n), lambda_=1000.0 / 1.12))
           for n in ALL]


@pytest.mark.parametrize("cls,kw,fn", MODULES, ids=ALL)
def test_module_equals_functional_and_holds_weight(cls, kw, fn):
    crit = cls(16, 7, dtype=torch.float64, **kw)
    assert isinstance(crit.weight, torch.nn.Parameter) and crit.weight.shape == (7, 16)
    assert [n for n, _ in crit.named_parameters()] == ["weight"]
    torch.testing.assert_close(crit.weight.norm(dim=1), torch.ones(7, dtype=torch.float64))
    x, _, y = make_inputs(5, 7, 16, norm_range=(1.0, 3.0) if crit.spec.scale_by_norm else (20.0, 90.0))
    torch.testing.assert_close(crit(x, y), fn(x, crit.weight, y), rtol=1e-12, atol=1e-12)
    assert cls.__name__ in repr(crit)


def test_defaults_are_the_papers():
    assert magloss.ArcFaceLoss(4, 3).spec.m2 == 0.5 and magloss.ArcFaceLoss(4, 3).spec.scale == 64.0
    assert magloss.CosFaceLoss(4, 3).spec.m3 == 0.35
    m = magloss.MagFaceLoss(4, 3)
    assert (m.l_a, m.u_a, m.l_m, m.u_m, m.lambda_g, m.scale, m.spec.easy_margin) == (10, 110, 0.45, 0.8, 35, 64, True)
    c = magloss.MagCosFaceLoss(4, 3)
    assert (c.l_m, c.lambda_g) == (0.35, 150.0)
    s = magloss.SphereFaceLoss(4, 3)
    assert s.margin == 4 and s.spec.scale_by_norm
    assert magloss.ArcFaceLoss(4, 3).ignore_index == -1 and magloss.ArcFaceLoss(4, 3).reduction == "mean"


@pytest.mark.parametrize("cls", [magloss.MagFaceLoss, magloss.MagCosFaceLoss])
def test_magface_parts_from_one_pass(cls):
    crit = cls(16, 7, dtype=torch.float64)
    x, _, y = make_inputs(6, 7, 16, ignored=(2,))
    out = crit(x, y, return_parts=True)
    assert isinstance(out, magloss.MagFaceOutput)
    torch.testing.assert_close(out.loss, out.ce + crit.lambda_g * out.reg)
    torch.testing.assert_close(out.loss, crit(x, y))
    torch.testing.assert_close(out.norms, x.norm(dim=1))
    a = x.norm(dim=1)[y != -1].clamp(10, 110)
    torch.testing.assert_close(out.reg, (a / 110 ** 2 + 1 / a).mean())


def test_sphereface_anneals_with_its_counter():
    crit = magloss.SphereFaceLoss(8, 5)
    x, _, y = make_inputs(4, 5, 8, dtype=torch.float32, norm_range=(1.0, 2.0))
    # upstream advances the counter before computing λ: the first forward uses iteration 1
    assert float(crit.current_lambda()) == pytest.approx(1000.0 / 1.12)
    crit(x, y)
    crit(x, y)
    assert int(crit.iteration) == 2
    assert float(crit.current_lambda()) == pytest.approx(1000.0 / 1.36)   # the third forward's
    crit.eval()
    assert float(crit.current_lambda()) == pytest.approx(1000.0 / 1.24)   # the last training forward's
    crit(x, y)
    assert int(crit.iteration) == 2
    state = crit.state_dict()
    assert "iteration" in state
    other = magloss.SphereFaceLoss(8, 5)
    other.load_state_dict(state)
    assert int(other.iteration) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    x, w, y = make_inputs(6, 9, 16, dtype=dtype)
    xh, wh = x.clone().requires_grad_(), w.clone().requires_grad_()
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    lh = MF.magface_loss(xh, wh, y)
    lf = MF.magface_loss(xf, wf, y)
    assert lh.dtype == torch.float32
    torch.testing.assert_close(lh, lf, rtol=1e-6, atol=1e-6)
    lh.backward()
    lf.backward()
    assert xh.grad.dtype == dtype and wh.grad.dtype == dtype
    torch.testing.assert_close(xh.grad, xf.grad.to(dtype))
    torch.testing.assert_close(wh.grad, wf.grad.to(dtype))


def test_autocast_casts_both_operands():
    crit = magloss.ArcFaceLoss(16, 7)
    x, _, y = make_inputs(5, 7, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(x, y)
    expected = MF.arcface_loss(x.bfloat16(), crit.weight.detach().bfloat16(), y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert crit.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("crit", [magloss.MagFaceLoss(16, 7), magloss.SoftmaxLoss(16, 7)], ids=["margin", "softmax"])
def test_autocast_accepts_half_embeddings_with_a_float32_weight(crit):
    """The usual AMP case: the backbone emits bf16 under autocast, the head's weight is fp32."""
    x, _, y = make_inputs(5, 7, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(x.bfloat16(), y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(TypeError, match="same dtype"):
        crit(x.bfloat16(), y)          # outside autocast the mismatch is an error


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_weight_stays_float32_with_an_unrounded_gradient(half):
    """Under autocast an fp32 W reaches the op as is: the math uses W rounded to the
    embeddings' dtype, ∂W comes back in fp32 (not rounded to half), and no C×D half copy
    of W is saved for the backward."""
    crit = magloss.MagFaceLoss(16, 7)
    x, _, y = make_inputs(5, 7, 16, dtype=torch.float32, ignored=(2,))
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=half):
        loss = crit(x, y)
    loss.backward()
    w = crit.weight
    assert not [t for t in saved if t.shape == w.shape and t.data_ptr() != w.data_ptr()], "a copy of W was saved"
    # Oracle: float64 on the rounded operands, so only the inputs carry half rounding.
    x64 = x.detach().to(half).double().requires_grad_()
    w64 = w.detach().to(half).double().requires_grad_()
    ref = MF.magface_loss(x64, w64, y, lambda_g=crit.lambda_g)
    ref.backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    def rel(got, want):
        return float((got.double() - want).abs().max() / want.abs().max())

    assert rel(w.grad, w64.grad) < 1e-4, f"∂W error {rel(w.grad, w64.grad):.2e}: rounded to {half}?"
    assert rel(x.grad, x64.grad) < 2 * torch.finfo(half).eps   # ∂x is the half op output, as under F.linear


def test_op_weight_dtype_pairs():
    x, w, y = make_inputs(3, 4, 8, dtype=torch.float32)
    args = (None, None, None) + magloss.MarginSpec.combined(30.0, 1.0, 0.5, 0.0).op_args(-1)
    rows = torch.ops.magloss.margin_ce(x.bfloat16(), w, y, None, *args)
    want = torch.ops.magloss.margin_ce(x.bfloat16(), w.bfloat16(), y, None, *args)
    for got, ref in zip(rows, want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    w_big = w.clone()
    w_big[2, 5] = 1e5                  # finite in fp32, inf once rounded to fp16
    with pytest.raises(ValueError, match=r"weight: contains NaN or Inf \(row 2\)"):
        torch.ops.magloss.margin_ce(x.half(), w_big, y, None, *args)
    with pytest.raises(TypeError, match="embeddings, weight: expected the same dtype"):
        torch.ops.magloss.margin_ce(x.half(), w.bfloat16(), y, None, *args)
    with pytest.raises(TypeError, match="embeddings, weight: expected the same dtype"):
        torch.ops.magloss.margin_ce(x, w.bfloat16(), y, None, *args)


SPECS = [
    magloss.MarginSpec.combined(30.0, 1.0, 0.5, 0.0),
    magloss.MarginSpec.combined(30.0, 0.9, 0.4, 0.15, easy_margin=True),
    magloss.MarginSpec.magface(30.0),
    magloss.MarginSpec.magcos(30.0, straight_through=True),
    magloss.MarginSpec.sphere(4),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"kind{s.kind}")
def test_opcheck(spec):
    x, w, y = make_inputs(5, 6, 8, dtype=torch.float32, ignored=(1,), norm_range=(1.0, 3.0) if spec.kind == 3 else (20.0, 90.0))
    lam = torch.tensor(2.0) if spec.kind == 3 else None
    args = (x.requires_grad_(), w.requires_grad_(), y, lam, None, None, None, *spec.op_args(-1))
    opcheck(torch.ops.magloss.margin_ce.default, args)
    with torch.no_grad():
        lse, zy, reg, norms = torch.ops.magloss.margin_ce(*args)[:4]
    grads = [torch.randn(5) for _ in range(4)]
    bargs = (*grads, x.detach(), w.detach(), y, lse, norms, lam, None, None, None, *spec.op_args(-1))
    opcheck(torch.ops.magloss.margin_ce_backward.default, bargs)


def test_opcheck_half_embeddings_float32_weight():
    spec = magloss.MarginSpec.magface(30.0)
    x, w, y = make_inputs(5, 6, 8, dtype=torch.float32, ignored=(1,))
    args = (x.bfloat16().requires_grad_(), w.requires_grad_(), y, None, None, None, None, *spec.op_args(-1))
    opcheck(torch.ops.magloss.margin_ce.default, args)
    with torch.no_grad():
        lse, zy, reg, norms = torch.ops.magloss.margin_ce(*args)[:4]
    grads = [torch.randn(5) for _ in range(4)]
    gx, gw = torch.ops.magloss.margin_ce_backward(*grads, args[0].detach(), w.detach(), y, lse, norms, None,
                                                   None, None, None, *spec.op_args(-1))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32


@pytest.mark.parametrize("cls", [magloss.ArcFaceLoss, magloss.MagFaceLoss, magloss.SphereFaceLoss])
def test_torch_compile_fullgraph_training_step(cls):
    torch._dynamo.reset()
    backbone = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16))
    crit = cls(16, 9)
    params = [*backbone.parameters(), *crit.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(8, 12) * 3
    y = torch.randint(0, 9, (8,))

    def forward(x, y):
        return crit(backbone(x), y)

    eager_loss = forward(x, y)
    eager_loss.backward()
    eager_grad = crit.weight.grad.clone()
    opt.zero_grad()
    if cls is magloss.SphereFaceLoss:
        crit.iteration.zero_()
    compiled = torch.compile(forward, fullgraph=True)
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(crit.weight.grad, eager_grad, rtol=1e-4, atol=1e-5)
    if cls is magloss.SphereFaceLoss:
        assert int(crit.iteration) == 1      # the buffer update survives compilation
    opt.step()
    assert torch.isfinite(compiled(x, y))


def test_extension_status_reports_why():
    status = magloss.extension_status()
    assert set(status) == {"compiled", "cuda_available", "fused", "reason"}
    assert isinstance(status["reason"], str) and status["reason"]
    if not torch.cuda.is_available():
        assert status["fused"] is False
        assert magloss.flush_input_checks() is None  # nothing is ever pending without the fused engine


def test_load_magface_weight_layout_and_errors():
    crit = magloss.MagFaceLoss(4, 6)
    w_dc = torch.randn(4, 6)
    magloss.load_magface_weight(crit, w_dc)
    torch.testing.assert_close(crit.weight.detach(), w_dc.t())
    magloss.load_magface_weight(crit, {"state_dict": {"module.fc.weight": 2 * w_dc}})
    torch.testing.assert_close(crit.weight.detach(), 2 * w_dc.t())
    with pytest.raises(ValueError, match=r"\[D, C\]"):
        magloss.load_magface_weight(crit, torch.randn(6, 4))
    with pytest.raises(ValueError, match="fc.weight"):          # no entry has the shape [D, C]
        magloss.load_magface_weight(crit, {"a.fc.weight": torch.randn(6, 6)})


def test_softmax_baseline_matches_linear_cross_entropy():
    crit = magloss.SoftmaxLoss(8, 5, dtype=torch.float64)
    x, _, y = make_inputs(6, 5, 8, ignored=(3,))
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, crit.weight, crit.bias), y,
                                                 ignore_index=-1)
    torch.testing.assert_close(crit(x, y), expected)
    assert [n for n, _ in crit.named_parameters()] == ["weight", "bias"]


def test_functional_sphereface_follows_the_schedule_from_an_iteration():
    x, w, y = make_inputs(4, 5, 8, norm_range=(1.0, 2.0))
    from_iter = MF.sphereface_loss(x, w, y, 4, None, iteration=100)
    from_lambda = MF.sphereface_loss(x, w, y, 4, None, 1000.0 / 13.0)
    torch.testing.assert_close(from_iter, from_lambda, rtol=1e-6, atol=1e-6)
