"""Bad input gets a clear error naming the argument; nothing is left half-changed."""

import math
import warnings

import pytest
import torch

import magloss
import magloss.functional as MF
from cases import make_inputs


def _base():
    x, w, y = make_inputs(4, 5, 8, dtype=torch.float32)
    return x, w, y


def _call(x, w, y, **kw):
    return MF.arcface_loss(x, w, y, **kw)


BAD = [
    # (name, mutate(x, w, y) -> (x, w, y), exception, words the message must contain)
    ("label too large", lambda x, w, y: (x, w, torch.tensor([0, 1, 5, 2])), ValueError, ["labels", "[0, 5)", "5"]),
    ("label negative", lambda x, w, y: (x, w, torch.tensor([0, -3, 1, 2])), ValueError, ["labels", "-3"]),
    ("float labels", lambda x, w, y: (x, w, y.float()), TypeError, ["labels", "int64"]),
    ("bool labels", lambda x, w, y: (x, w, y > 0), TypeError, ["labels"]),
    ("2-D labels", lambda x, w, y: (x, w, y.view(2, 2)), ValueError, ["labels", "[B]"]),
    ("label count", lambda x, w, y: (x, w, y[:3]), ValueError, ["labels", "4"]),
    ("wrong embedding size", lambda x, w, y: (x[:, :6], w, y), ValueError, ["embeddings", "D = 8", "6"]),
    ("1-D embeddings", lambda x, w, y: (x[0], w, y), ValueError, ["embeddings", "[B, D]"]),
    ("3-D weight", lambda x, w, y: (x, w.unsqueeze(0), y), ValueError, ["weight", "[C, D]"]),
    ("integer embeddings", lambda x, w, y: (x.long(), w, y), TypeError, ["embeddings", "float"]),
    ("dtype mismatch", lambda x, w, y: (x.double(), w, y), TypeError, ["embeddings", "weight", "dtype"]),
    ("device mismatch", lambda x, w, y: (x, w.to("meta"), y), ValueError, ["device"]),
    ("NaN embedding", lambda x, w, y: (x.index_fill(0, torch.tensor([2]), math.nan), w, y), ValueError,
     ["embeddings", "NaN or Inf", "row 2"]),
    ("Inf embedding", lambda x, w, y: (x.index_fill(0, torch.tensor([1]), math.inf), w, y), ValueError,
     ["embeddings", "NaN or Inf", "row 1"]),
    ("NaN weight", lambda x, w, y: (x, w.index_fill(0, torch.tensor([3]), math.nan), y), ValueError,
     ["weight", "NaN or Inf", "row 3"]),
    ("not a tensor", lambda x, w, y: (x.tolist(), w, y), TypeError, ["embeddings", "Tensor"]),
    ("no classes", lambda x, w, y: (x, w[:0], y), ValueError, ["weight", "C = 0"]),
]


@pytest.mark.parametrize("name,mutate,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(name, mutate, exc, words):
    x, w, y = mutate(*_base())
    with pytest.raises(exc) as info:
        _call(x, w, y)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("fn", [MF.normface_loss, MF.cosface_loss, MF.magface_loss, MF.softmax_loss,
                                lambda x, w, y: MF.sphereface_loss(x, w, y, 4, None, 1.0)])
def test_every_loss_checks_labels(fn):
    x, w, _ = _base()
    with pytest.raises(ValueError, match="labels"):
        fn(x, w, torch.tensor([0, 1, 2, 9]))


def test_empty_batch_returns_zero_without_nan():
    x, w, y = _base()
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        out = MF.magface_loss(x[:0].requires_grad_(), w, y[:0], reduction=reduction)
        assert out.shape == shape and not torch.isnan(out).any() and (out == 0).all()


def test_other_ignore_index_values():
    x, w, y = _base()
    y2 = y.clone()
    y2[1] = 100
    a = MF.arcface_loss(x, w, y2, ignore_index=100)
    y3 = y.clone()
    y3[1] = -1
    torch.testing.assert_close(a, MF.arcface_loss(x, w, y3))


HYPER = [
    (lambda: magloss.MagFaceLoss(8, 5, l_a=110.0, u_a=10.0), ["l_a", "u_a"]),
    (lambda: magloss.MagFaceLoss(8, 5, l_a=20.0, u_a=20.0), ["l_a", "u_a"]),
    (lambda: magloss.MagFaceLoss(8, 5, l_m=0.9, u_m=0.8), ["l_m", "u_m"]),
    (lambda: magloss.MagFaceLoss(8, 5, lambda_g=-1.0), ["lambda_g"]),
    (lambda: magloss.MagFaceLoss(8, 5, l_a=0.0), ["l_a"]),
    (lambda: magloss.MagFaceLoss(8, 5, u_m=2.0), ["u_m"]),
    (lambda: magloss.ArcFaceLoss(8, 5, scale=-64.0), ["scale"]),
    (lambda: magloss.ArcFaceLoss(8, 5, scale=float("nan")), ["scale"]),
    (lambda: magloss.ArcFaceLoss(8, 5, margin=-0.1), ["margin", "radians"]),   # the caller's name
    (lambda: magloss.CosFaceLoss(8, 5, margin=-0.1), ["margin"]),
    (lambda: magloss.CombinedMarginLoss(8, 5, m1=0.0), ["m1"]),
    (lambda: magloss.CombinedMarginLoss(8, 5, m1=0.5, m2=0.1), ["m1", "m2"]),
    (lambda: magloss.SphereFaceLoss(8, 5, margin=2.5), ["margin", "integer"]),
    (lambda: magloss.SphereFaceLoss(8, 5, margin=0), ["margin"]),
    (lambda: magloss.SphereFaceLoss(8, 5, lambda_min=-1.0), ["lambda_min"]),
    (lambda: magloss.ArcFaceLoss(0, 5), ["embedding_size"]),
    (lambda: magloss.ArcFaceLoss(8, 0), ["num_classes"]),
    (lambda: magloss.ArcFaceLoss(8, 5, reduction="avg"), ["reduction"]),
    (lambda: magloss.SoftmaxLoss(8, 5, reduction="avg"), ["reduction"]),
]


@pytest.mark.parametrize("make,words", HYPER)
def test_invalid_hyperparameter(make, words):
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value)


def test_ignore_index_must_be_int():
    with pytest.raises(TypeError, match="ignore_index"):
        magloss.ArcFaceLoss(8, 5, ignore_index=-1.0)


def test_magface_warns_below_the_lambda_g_bound():
    with pytest.warns(UserWarning, match="lambda_g"):
        magloss.MagFaceLoss(8, 5, lambda_g=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        magloss.MagFaceLoss(8, 5)          # the default 35 is above 22.6: no warning


def test_failed_forward_leaves_no_state_changed():
    crit = magloss.SphereFaceLoss(8, 5)
    x, _, y = _base()
    before = crit.weight.detach().clone()
    with pytest.raises(ValueError):
        crit(x, torch.tensor([0, 1, 2, 7]))
    assert int(crit.iteration) == 0
    assert torch.equal(crit.weight, before)
    crit(x, y)
    assert int(crit.iteration) == 1


# -- errors in the caller's words: radians, transposed weights, pytorch-metric-learning's argument order --
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


# -- ignore_index inside [0, C) warns ------------------------------------------------------------------
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
