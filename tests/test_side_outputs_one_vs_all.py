"""The side outputs of the one-vs-all losses (SFace, UniFace, SphereFace2, P2SGrad) with
``return_parts=True``: label cosine, nearest negative (cosine and class) and predicted class from
the same forward as the row sums, on the chunked engine, through the op, torch.compile, the
training loop's accuracy; the sharded heads (Partial FC included) are rows of
tests/test_side_outputs.py's sharded table (SHARDED_HEADS), against one process on the whole batch.

Expected values: tests/test_side_outputs.py's float64 cosine matrix built with plain matrix
algebra (:func:`test_side_outputs.expected`, the margin losses' tests' oracle and tie rule),
and its exact-tie case (classes along basis vectors: ties are exact in every dtype).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.library import opcheck

import magloss
import magloss.functional as MF
import magloss.onevsall as OVA
from cases import FUNCTIONAL, make_inputs
from magloss import reference
from magloss.train.loop import Loop
from test_side_outputs import COS_TOL, DTYPES, _exact_case, assert_parts, expected

NAMES = ("sface", "uniface", "sphereface2", "p2sgrad")
MODULES = {"sface": "SFaceLoss", "uniface": "UniFaceLoss", "sphereface2": "SphereFace2Loss", "p2sgrad": "P2SGradLoss"}


def _op_args(name, x):
    """(bias, kind, params) of a default-hyperparameter head of this loss, for the raw op."""
    m = getattr(magloss, MODULES[name])(x.shape[1], 3, dtype=x.dtype)
    bias = None if m.bias is None else m.bias.detach().clone()
    return bias, m._kind, list(m.params)


# ---- every loss and dtype, with chunk boundaries and ignored rows ------------------------------------------
@pytest.mark.parametrize("chunk", [8, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_side_outputs_of_every_loss(name, dtype, chunk, monkeypatch, one_thread):
    monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))          # 37 classes: 5 chunks (the last one short), or one
    x, w, y = make_inputs(13, 37, 9, ignored=(2, 7), seed=len(name))
    xd, wd = x.to(dtype), w.to(dtype)
    parts = FUNCTIONAL[name](xd, wd, y, return_parts=True)
    torch.testing.assert_close(parts.loss, FUNCTIONAL[name](xd, wd, y), rtol=0, atol=0)   # the same pass
    assert_parts(parts, xd, wd, y, tol=COS_TOL[dtype])
    assert math.isnan(parts.label_cosine[2]) and math.isnan(parts.label_cosine[7])


@pytest.mark.parametrize("name", NAMES)
def test_op_side_outputs_are_the_oracles(name, one_thread):
    """The op's raw side outputs (0 label cosine without a label column) against
    :func:`magloss.reference.side_outputs` in float64, and against the independent matrix."""
    x, w, y = make_inputs(9, 23, 6, ignored=(0, 5), seed=2)
    bias, kind, params = _op_args(name, x)
    rows, *side = OVA.one_vs_all(x, w, y, bias, kind, params, -1, True)
    ref = reference.side_outputs(x, w, y)
    for got, want in zip(side, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    label, nn_cos, nn_cls, _, _ = expected(x, w, y)
    torch.testing.assert_close(side[0], torch.nan_to_num(label, nan=0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(side[1], nn_cos, rtol=0, atol=1e-12)
    assert torch.equal(side[2], nn_cls)
    torch.testing.assert_close(rows, OVA.one_vs_all(x, w, y, bias, kind, params, -1)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [1, 3, 8, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_and_the_last_chunk(dtype, chunk, name, monkeypatch):
    """Exact ties across and inside chunks go to the lowest class; the label wins a tie only as
    the lower index; the only maximum in the last chunk is found (test_side_outputs._exact_case)."""
    monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))
    x, w, y = _exact_case()
    xd, wd = x.to(dtype), w.to(dtype)
    parts = FUNCTIONAL[name](xd, wd, y, return_parts=True)
    assert parts.nearest_negative_class.tolist() == [3, 9, 2, 19, 3]
    assert parts.predicted_class.tolist() == [3, 5, 2, 19, 3]
    assert parts.nearest_negative_cosine.tolist() == [1.0] * 5
    assert parts.label_cosine[:4].tolist() == [0.0, 1.0, 1.0, 0.0] and math.isnan(parts.label_cosine[4])
    assert_parts(parts, xd, wd, y, tol=0.0)


def test_one_class_and_empty_batch():
    """C = 1: a labelled row has no negative (−inf, −1; predicted: its label), an ignored row's
    nearest is class 0. B = 0: empty fields."""
    x, w, _ = make_inputs(3, 1, 5)
    y = torch.tensor([0, -1, 0])
    parts = OVA.sface_loss(x, w, y, return_parts=True)
    empty = OVA.sface_loss(x[:0], w, y[:0], return_parts=True)
    assert parts.nearest_negative_class.tolist() == [-1, 0, -1]
    assert parts.predicted_class.tolist() == [0, 0, 0]
    c10 = float(torch.nn.functional.normalize(x[1], dim=0) @ torch.nn.functional.normalize(w[0], dim=0))
    assert parts.nearest_negative_cosine[0] == -math.inf == parts.nearest_negative_cosine[2]
    assert parts.nearest_negative_cosine[1].item() == pytest.approx(c10, abs=1e-12)
    assert all(t.shape == (0,) for t in empty[5:])
    assert float(MF.parts_accuracy(parts, y)) == 1.0


# ---- nothing extra without return_parts; the op's contract -------------------------------------------------
def _refuse(what):
    """A stand-in that fails the test when called: ``what`` says what must not have happened."""
    def call(*a, **k):
        raise AssertionError(what)
    return call


def test_no_side_work_without_return_parts(monkeypatch):
    monkeypatch.setattr(OVA, "_Nearest", _refuse("side outputs computed without return_parts"))
    x, w, y = make_inputs(6, 9, 4)
    for name in NAMES:
        parts = FUNCTIONAL[name](x, w, y, reduction="none")
        assert parts.shape == (6,)
        bias, kind, params = _op_args(name, x)
        outs = torch.ops.magloss.one_vs_all(x, w, y, bias, kind, params, -1)
        assert len(outs) == 4 and all(t.numel() == 0 for t in outs[1:]) and outs[3].dtype == torch.int64


@pytest.mark.parametrize("side", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_opcheck_with_side_outputs(name, side):
    x, w, y = make_inputs(5, 7, 6, dtype=torch.float32, ignored=(1,))
    bias, kind, params = _op_args(name, x)
    bias = None if bias is None else bias.requires_grad_()
    opcheck(torch.ops.magloss.one_vs_all.default, (x.requires_grad_(), w.requires_grad_(), y, bias, kind, params, -1,
                                                   side))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_unchanged_by_side_outputs(name):
    x, w, y = make_inputs(9, 11, 5, ignored=(3,), dtype=torch.float32)
    grads = []
    for parts in (False, True):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = FUNCTIONAL[name](xg, wg, y, return_parts=parts)
        (out.loss if parts else out).backward()
        grads.append((xg.grad, wg.grad))
    assert all(bool(torch.isfinite(g).all()) for g in grads[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_returns_the_side_outputs(name):
    torch._dynamo.reset()
    crit = getattr(magloss, MODULES[name])(6, 9)
    x, _, y = make_inputs(8, 9, 6, dtype=torch.float32, ignored=(2,))
    eager = crit(x, y, return_parts=True)
    compiled = torch.compile(lambda a, b: crit(a, b, return_parts=True), fullgraph=True, backend="aot_eager")(x, y)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert_parts(compiled, x, crit.weight.detach(), y)


# ---- accuracy from the parts: the training loop's too -----------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_parts_accuracy_is_the_accuracy_and_the_loop_uses_it(name):
    x, w, y = make_inputs(40, 6, 3, ignored=(0, 5), seed=11)
    y[10:25] = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T).argmax(1)[10:25]
    crit = getattr(magloss, MODULES[name])(3, 6, dtype=torch.float64)
    crit.weight.data.copy_(w)
    parts = crit(x, y, return_parts=True)
    want = crit.accuracy(x, y)
    assert 0 < float(want) < 1
    assert float(MF.parts_accuracy(parts, y)) == float(want)
    refuse = _refuse("the loop recomputed the accuracy instead of reading the side outputs")
    loop = SimpleNamespace(head=SimpleNamespace(accuracy=refuse, ignore_index=-1, last_sample=None))
    assert float(Loop._accuracy(loop, parts, x, y)) == float(want)
