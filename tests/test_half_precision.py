"""Half precision under autocast: embeddings past fp16's range (an entry, or only the norm),
large softmax logits, zero embedding rows; the loss, the norms and the gradients against
float64 (fp16 operands only round the cosines), and rows within range cast unchanged."""

import pytest
import torch
import torch.nn.functional as F

import magloss
import magloss.functional as MF
from cases import LOSS_VARIANTS, NO_SPEC, loss_functional, make_inputs


def _cpu_fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


# every registered loss but softmax (its own tests below), and the variants where fp16's range matters
FAMILIES = [(n, loss_functional(n)) for n in LOSS_VARIANTS if n not in NO_SPEC] + [
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
