"""Faults found by replaying public bug reports and running upstream code side by side
(issue 13): SphereFace's λ step, half precision under autocast, MagFace checkpoints,
errors in the caller's words, parts and accuracy for every loss, ignore_index warnings.

Expected values: upstream behaviour re-implemented here in float64 (face.evoLVe's
SphereFace, the MagFace trainer's checkpoint layout), float64 formulas, hand counts.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import magloss
import magloss.functional as MF
from conftest import make_inputs


# -- 1. SphereFace: λ as face.evoLVe / the SphereFace port / the Caffe layer --------------------
class UpstreamSphereFace:
    """face.evoLVe's SphereFace forward, re-implemented in float64: the counter advances
    *before* λ is computed; piece index floor(m·θ/3.14159265) as the ports write it."""

    def __init__(self, weight, m=4):
        self.weight, self.m, self.iter = weight, m, 0

    def __call__(self, x, label):
        self.iter += 1
        lamb = max(5.0, 1000.0 * (1 + 0.12 * self.iter) ** -1)
        cos = F.linear(F.normalize(x), F.normalize(self.weight)).clamp(-1, 1)
        cos_m = 8 * cos ** 4 - 8 * cos ** 2 + 1                     # cos(4θ)
        theta = cos.acos()
        k = torch.floor(self.m * theta / 3.14159265)
        phi = (-1.0) ** k * cos_m - 2 * k
        one_hot = F.one_hot(label, cos.shape[1]).to(cos.dtype)
        out = (one_hot * (phi - cos) / (1 + lamb) + cos) * x.norm(dim=1, keepdim=True)
        return F.cross_entropy(out, label)


def test_sphereface_lambda_follows_upstream_step_by_step():
    x, w, y = make_inputs(7, 11, 9, norm_range=(1.0, 4.0), seed=3)
    crit = magloss.SphereFaceLoss(9, 11, dtype=torch.float64)
    crit.weight.data.copy_(w)
    up = UpstreamSphereFace(w)
    for step in range(1, 4):
        expected = up(x, y)
        assert float(crit.current_lambda(torch.float64)) == 1000.0 / (1 + 0.12 * step)
        # float64 end to end: a λ built in float32 leaves ~1e-10 here
        torch.testing.assert_close(crit(x, y), expected, rtol=1e-14, atol=1e-14)
        assert int(crit.iteration) == step


def test_sphereface_lambda_is_computed_in_the_compute_dtype():
    crit = magloss.SphereFaceLoss(4, 3, dtype=torch.float64)
    lam = crit.current_lambda(torch.float64)
    assert lam.dtype == torch.float64 and float(lam) == 1000.0 / 1.12
    x, w, y = make_inputs(5, 6, 8, norm_range=(1.0, 2.0))
    a = MF.sphereface_loss(x, w, y, iteration=1)
    b = MF.sphereface_loss(x, w, y, lambda_=1000.0 / 1.12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- 2. half precision under autocast ------------------------------------------------------------
def _cpu_fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


FAMILIES = [
    ("arcface", lambda x, w, y, **k: MF.arcface_loss(x, w, y, **k)),
    ("cosface", lambda x, w, y, **k: MF.cosface_loss(x, w, y, **k)),
    ("magface", lambda x, w, y, **k: MF.magface_loss(x, w, y, **k)),
    ("magcosface", lambda x, w, y, **k: MF.magcosface_loss(x, w, y, **k)),
    # u_a above 2^14: m(a) varies at the rescaled rows' magnitudes, so they must stay float32
    ("magface_large_u_a", lambda x, w, y, **k: MF.magface_loss(x, w, y, l_a=10.0, u_a=1e5, u_m=1.2, **k)),
    ("sphereface_fixed_scale", lambda x, w, y, **k: MF.sphereface_loss(x, w, y, 4, 30.0, 100.0, **k)),
    ("sphereface_norm_scale", lambda x, w, y, **k: MF.sphereface_loss(x, w, y, 4, None, 100.0, **k)),
]


@pytest.mark.parametrize("name,fn", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_fp32_embeddings_past_fp16_range_under_autocast(name, fn):
    x, w, y = make_inputs(6, 13, 24, dtype=torch.float32, seed=5)
    x[2, 3] = 7e4                               # one entry past fp16's 65504
    x[4] = x[4] / x[4].norm() * 9e4             # every entry in range, the norm not
    if name == "sphereface_norm_scale":
        x = x / 1e4                             # logits scale with ‖x‖: keep them sane
    xa = x.clone().requires_grad_()
    with _cpu_fp16_autocast():
        out = fn(xa, w, y, reduction="none", return_parts=True)
    out.loss.sum().backward()
    # expected: the float64 loss (fp16 operands only round the cosines: ~1e-3 of s)
    x64 = x.double().requires_grad_()
    ref = fn(x64, w.double(), y, reduction="none", return_parts=True)
    ref.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(xa.grad).all()
    torch.testing.assert_close(out.loss.double(), ref.loss.detach(), rtol=2e-2, atol=0.15)
    # the op measures the fp16-rounded rows (entries rounded to 2^-11 relative), scaled back exactly
    torch.testing.assert_close(out.norms.double(), x64.norm(dim=1).detach(), rtol=2 ** -11, atol=0)
    scale = x64.grad.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(xa.grad.double() / scale, x64.grad / scale, rtol=0, atol=3e-2)


def test_rows_within_fp16_range_are_cast_unchanged():
    # the scaling only touches rows past the limit: the others see exactly the old cast
    x, w, y = make_inputs(5, 7, 16, dtype=torch.float32, seed=2)
    big = x.clone()
    big[1] = big[1] / big[1].norm() * 1e5
    with _cpu_fp16_autocast():
        a = MF.arcface_loss(x, w, y, reduction="none")
        b = MF.arcface_loss(big, w, y, reduction="none")
    keep = torch.arange(5) != 1
    assert torch.equal(a[keep], b[keep])


def test_softmax_loss_fp16_autocast_large_logits():
    # logits ~1e5: past fp16's range; the label logit wins by ~1e4, so CE = 0 exactly
    torch.manual_seed(0)
    C, D = 5, 8
    w = torch.eye(C, D) * 300.0
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    x = (torch.eye(C, D)[y] * 340.0 + 0.1 * torch.randn(6, D)).requires_grad_()
    crit = magloss.SoftmaxLoss(D, C, bias=True)
    with torch.no_grad():
        crit.weight.copy_(w)
        crit.bias.fill_(0.5)
    with _cpu_fp16_autocast():
        loss = crit(x, y)
    loss.backward()
    ref64 = F.cross_entropy(F.linear(x.double(), w.double(), crit.bias.double()), y)
    assert float(ref64.detach()) == 0.0 and float(loss.detach()) == 0.0
    assert torch.isfinite(x.grad).all() and torch.isfinite(crit.weight.grad).all()
    assert float(x.grad.abs().max()) == 0.0


def test_softmax_loss_fp16_autocast_scaled_rows_match_float64():
    # moderate margins, logits bounded by 2.6e4 > 2^14: scaled rows, compared to float64
    x, w, y = make_inputs(6, 9, 16, dtype=torch.float32, norm_range=(150.0, 170.0), seed=4)
    w = F.normalize(w) * 160.0
    xa = x.clone().requires_grad_()
    with _cpu_fp16_autocast():
        loss = MF.softmax_loss(xa, w, y, reduction="none")
    ref = F.cross_entropy(F.linear(x.double(), w.double()), y, reduction="none")
    # fp16 operands: relative 2^-11 on each logit of size ~1e4 -> a few units of logit
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=0.02 * 160 * 170 * 2 ** -11 * 16 ** 0.5 * 4)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("mode", ["fp16", "autocast_fp16"])
def test_zero_embedding_row_gradient_is_finite_in_half(mode):
    x, w, y = make_inputs(4, 6, 16, dtype=torch.float32, seed=7)
    x[1] = 0.0
    x32 = x.clone().requires_grad_()
    MF.arcface_loss(x32, w, y).backward()          # fp32: F.normalize's (∂L/∂x̂)/1e-12, finite
    assert torch.isfinite(x32.grad).all() and float(x32.grad[1].abs().max()) > 1e6
    if mode == "fp16":
        xh, wh = x.half().requires_grad_(), w.half().requires_grad_()
        MF.arcface_loss(xh, wh, y).backward()
        g = xh.grad
    else:
        xh = x.clone().requires_grad_()
        with _cpu_fp16_autocast():
            MF.arcface_loss(xh, w, y).backward()
        g = xh.grad
    assert torch.isfinite(g).all()
    big = torch.finfo(torch.float16).max
    # the zero row saturates at fp16's largest value with the fp32 gradient's signs
    expected = x32.grad[1].clamp(-big, big)
    torch.testing.assert_close(g[1].float(), expected, rtol=2e-2, atol=1.0)
    # the other rows are unaffected
    keep = torch.arange(4) != 1
    torch.testing.assert_close(g[keep].float(), x32.grad[keep], rtol=2e-2, atol=2e-3)


# -- 3. MagFace checkpoints ------------------------------------------------------------------------
def magface_trainer_checkpoint(D, C, backbone_out=None):
    """The layout of the MagFace trainer's checkpoint: a DataParallel SoftmaxBuilder with an
    iresnet (its own ``fc``: [D, 512·7·7]) and a MagLinear head ([D, C])."""
    g = torch.Generator().manual_seed(0)
    state = {
        "module.features.conv1.weight": torch.randn(64, 3, 3, 3, generator=g),
        "module.features.fc.weight": torch.randn(D, backbone_out or 64 * 7 * 7, generator=g),
        "module.features.fc.bias": torch.randn(D, generator=g),
        "module.features.features.weight": torch.randn(D, generator=g),
        "module.fc.weight": torch.randn(D, C, generator=g),
    }
    return {"epoch": 25, "arch": "iresnet100", "state_dict": state, "optimizer": {"state": {}}}


def test_load_magface_weight_from_a_trainer_checkpoint():
    ck = magface_trainer_checkpoint(16, 37)
    crit = magloss.MagFaceLoss(16, 37)
    magloss.load_magface_weight(crit, ck)
    torch.testing.assert_close(crit.weight.detach(), ck["state_dict"]["module.fc.weight"].t())


def test_load_magface_weight_asks_for_key_only_when_ambiguous():
    ck = magface_trainer_checkpoint(16, 16, backbone_out=16)   # both fc layers [16, 16]
    crit = magloss.MagFaceLoss(16, 16)
    with pytest.raises(ValueError, match=r"key: several entries.*module.features.fc.weight.*module.fc.weight"):
        magloss.load_magface_weight(crit, ck)
    magloss.load_magface_weight(crit, ck, key="module.fc.weight")
    torch.testing.assert_close(crit.weight.detach(), ck["state_dict"]["module.fc.weight"].t())
    with pytest.raises(ValueError, match=r"no entry of shape \[D, C\] = \[16, 40\]"):
        magloss.load_magface_weight(magloss.MagFaceLoss(16, 40), ck)


# -- 8. errors in the caller's words -----------------------------------------------------------------
@pytest.mark.parametrize("make,pattern", [
    (lambda: magloss.ArcFaceLoss(8, 5, margin=28.6),
     r"^margin: expected an angle in radians in \[0, pi\), got 28.6 .*math.radians\(28.6\) = 0.4992"),
    (lambda: MF.arcface_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), margin=28.6),
     r"^margin: .*radians"),
    (lambda: magloss.CosFaceLoss(8, 5, margin=-0.35), r"^margin: expected a non-negative number"),
    (lambda: magloss.CombinedMarginLoss(8, 5, m2=28.6), r"^m2: .*radians"),
    (lambda: magloss.MagFaceLoss(8, 5, u_m=45.0), r"^u_m: .*radians.*math.radians\(45.0\)"),
])
def test_margin_errors_name_the_callers_argument(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_transposed_weight_is_named():
    x, y = torch.randn(3, 8), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"^weight: expected the layout \[C, D\].*looks transposed.*weight.t\(\)"):
        MF.arcface_loss(x, torch.randn(8, 20), y)


def test_argument_order_of_pytorch_metric_learning_is_named():
    crit = magloss.ArcFaceLoss(1000, 512)        # meant: 512-d embeddings, 1000 classes
    with pytest.raises(ValueError, match=r"^embeddings: expected shape \[B, 1000\].*\(embedding_size, num_classes\)"
                                         r".*pytorch-metric-learning's order is \(num_classes, embedding_size\)"):
        crit(torch.randn(4, 512), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"pytorch-metric-learning"):
        magloss.SoftmaxLoss(30, 12)(torch.randn(2, 12), torch.tensor([0, 1]))


# -- 9. parts and accuracy for every loss ----------------------------------------------------------
PART_MODULES = [
    (magloss.NormFaceLoss, {}, 0.0), (magloss.CosFaceLoss, {}, 0.0), (magloss.ArcFaceLoss, {}, 0.0),
    (magloss.CombinedMarginLoss, {"m1": 0.9, "m2": 0.4, "m3": 0.15}, 0.0), (magloss.SphereFaceLoss, {}, 0.0),
    (magloss.MagFaceLoss, {}, 35.0), (magloss.MagCosFaceLoss, {}, 150.0), (magloss.SoftmaxLoss, {}, 0.0),
]


@pytest.mark.parametrize("cls,kw,lambda_g", PART_MODULES, ids=[m[0].__name__ for m in PART_MODULES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_loss_returns_its_parts(cls, kw, lambda_g, reduction):
    crit = cls(12, 7, dtype=torch.float64, reduction=reduction, **kw).eval()
    x, _, y = make_inputs(5, 7, 12, ignored=(3,), norm_range=(2.0, 4.0) if cls is magloss.SphereFaceLoss
                          else (20.0, 90.0))
    out = crit(x, y, return_parts=True)
    assert isinstance(out, magloss.LossParts) and magloss.LossParts is magloss.MagFaceOutput
    torch.testing.assert_close(out.loss, crit(x, y), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.loss, out.ce + out.reg_weighted, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out.norms, x.norm(dim=1))
    valid = y != -1
    if lambda_g:
        a = x.norm(dim=1).clamp(10, 110)
        g = torch.where(valid, a / 110 ** 2 + 1 / a, torch.zeros_like(a))     # g(ã), by hand
        expected = {"mean": g.sum() / valid.sum(), "sum": g.sum(), "none": g}[reduction]
        torch.testing.assert_close(out.reg, expected)
        torch.testing.assert_close(out.reg_weighted, lambda_g * expected)
    else:
        assert float(out.reg.abs().sum()) == 0.0 and float(out.reg_weighted.abs().sum()) == 0.0


def test_sharded_style_parts_in_functional_forms():
    x, w, y = make_inputs(4, 6, 8)
    for fn in (MF.normface_loss, MF.cosface_loss, MF.arcface_loss, MF.combined_margin_loss, MF.magface_loss,
               MF.magcosface_loss, MF.softmax_loss):
        out = fn(x, w, y, return_parts=True)
        torch.testing.assert_close(out.loss, fn(x, w, y))


@pytest.mark.parametrize("B,C,D,chunk", [(7, 13, 5, 3), (9, 40, 6, None), (5, 11, 4, 1), (0, 3, 4, None)])
def test_accuracy_is_the_argmax_of_the_plain_cosines(B, C, D, chunk):
    x, w, y = make_inputs(B, C, D, ignored=(1,) if B > 1 else (), seed=B + C)
    y[:B // 2] = (F.normalize(x) @ F.normalize(w).T).argmax(1)[:B // 2]     # some rows right by construction
    if B > 1:
        y[1] = -1
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T     # float64, by hand
    valid = y != -1
    hits = ((cos.argmax(1) == y) & valid).sum().item()
    expected = hits / max(int(valid.sum()), 1)
    got = MF.accuracy(x, w, y, chunk_classes=chunk)
    assert got.dtype == torch.float64 and float(got) == expected
    crit = magloss.ArcFaceLoss(D, C, dtype=torch.float64)
    crit.weight.data.copy_(w)
    assert float(crit.accuracy(x, y)) == expected


def test_accuracy_never_builds_the_full_matrix(monkeypatch):
    # every product the helper makes is at most B x chunk
    x, w, y = make_inputs(8, 50, 6)
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    MF.accuracy(x, w, y, chunk_classes=16)
    monkeypatch.undo()
    assert seen and max(s[1] for s in seen) <= 16
    monkeypatch.setattr(MF, "ACCURACY_CHUNK_ELEMENTS", 8 * 10)
    seen.clear()
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    MF.accuracy(x, w, y)
    monkeypatch.undo()
    assert max(s[1] for s in seen) <= 10


def test_softmax_accuracy_uses_its_own_logits():
    crit = magloss.SoftmaxLoss(6, 9, dtype=torch.float64)
    x, _, y = make_inputs(10, 9, 6)
    z = x @ crit.weight.T + crit.bias
    y[:5] = z.argmax(1)[:5]
    assert float(crit.accuracy(x, y)) == float((z.argmax(1) == y).double().mean())


# -- 10. ignore_index inside [0, C) ------------------------------------------------------------------
def test_ignore_index_inside_the_classes_warns():
    with pytest.warns(UserWarning, match=r"ignore_index=3 is a class index in \[0, 7\)"):
        magloss.ArcFaceLoss(8, 7, ignore_index=3)
    x, w, y = make_inputs(4, 7, 8)
    with pytest.warns(UserWarning, match=r"ignore_index=0 is a class index in \[0, 7\)"):
        MF.cosface_loss(x, w, y, ignore_index=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        magloss.ArcFaceLoss(8, 7, ignore_index=-100)
        magloss.ArcFaceLoss(8, 7, ignore_index=7)
        MF.cosface_loss(x, w, y, ignore_index=-1)


# -- Partial FC's sample count: exact ceiling (item 5's rule) --------------------------------------
@pytest.mark.parametrize("num_local,rate,expected", [
    (70, 0.1, 7), (75, 0.1, 8), (100, 0.29, 29), (10, 0.57, 6), (100, 0.57, 57), (3, 1e-6, 1), (9, 1.0, 9),
])
def test_partial_fc_sample_count_is_an_exact_ceiling(num_local, rate, expected):
    from magloss.distributed.partial_fc import sample_count

    assert sample_count(num_local, rate) == expected                 # by hand: ceil of the decimal product
    assert sample_count(num_local, rate, num_positives=num_local) == num_local


# -- 12. license ----------------------------------------------------------------------------------------
def test_license_file_and_spdx_string():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"                       # PEP 639: an SPDX string, not a table
    text = (root / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert "LICENSE" in meta["project"]["license-files"]
