"""Every loss's parts (loss = ce + λ_g·reg, the norms) and the training accuracy (the arg-max of
the plain cosines, never the full B×C matrix at once). Expected values: g(ã) and the arg-max
computed by hand in float64."""

import pytest
import torch
import torch.nn.functional as F

import magloss
import magloss.functional as MF
from cases import LOSS_VARIANTS, build_loss, loss_functional, loss_kwargs, make_inputs


#: λ_g of the losses with a magnitude regularizer: the MagFace trainer's (35) and MagCosFace's (150)
#: defaults, written out; every other loss has reg = 0.
LAMBDA_G = {"magface": 35.0, "magcosface": 150.0}


@pytest.mark.parametrize("name", LOSS_VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_loss_returns_its_parts(name, reduction):
    crit = build_loss(name, 12, 7, dtype=torch.float64, reduction=reduction, **loss_kwargs(name)).eval()
    by_norm = getattr(crit, "spec", None) is not None and crit.spec.scale_by_norm     # SphereFace's ‖x‖ scale
    x, _, y = make_inputs(5, 7, 12, ignored=(3,), norm_range=(2.0, 4.0) if by_norm else (20.0, 90.0))
    lambda_g = LAMBDA_G.get(name, 0.0)
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
    for fn in map(loss_functional, LOSS_VARIANTS):
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
