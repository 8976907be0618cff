"""The side outputs (label cosine, nearest negative cosine and class, predicted class) where the
fused engine runs the forward: on a GPU (the compiled extension), else under the CPU emulator
(tests/emu, the same sources registered as the ops' "cpu" kernels; tests/_backend.py).

The fused kernels do not compute the side outputs themselves: with ``side`` on, the registered
wrapper (magloss._ext) takes them from the chunked engine's forward on the same inputs (docs/cuda.md,
"Side outputs"). So the op must return (a) the fused engine's own row statistics, unchanged by the
flag, and (b) side outputs equal to the float64 cosine matrix's (tests/test_side_outputs.py's
expectation), for every family and feature, fp32/fp16/bf16 and the autocast pair, ignored rows,
several chunks and ties.
"""

from __future__ import annotations

import pytest
import torch

import _backend
import magloss.functional as MF
from cases import FAMILIES, FEATURES, feature_inputs, make_case, make_feature_case
from test_side_outputs import _exact_case, assert_parts

try:
    BACKEND = _backend.select()
except _backend.Unavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)
pytestmark = pytest.mark.gpu if BACKEND.name == "gpu" else []
DEV = BACKEND.device
OP = torch.ops.magloss.margin_ce
SIDE_NAMES = ("label_cosine", "nearest_negative_cosine", "nearest_negative_class", "predicted_class")


@pytest.fixture(scope="module", autouse=True)
def _routed():
    with BACKEND.routed():
        yield


def _parts(y, side):
    from types import SimpleNamespace

    return SimpleNamespace(**dict(zip(SIDE_NAMES, MF.side_parts(y, y != -1, *side))))


def _check(x, w, y, spec, lam, extras, K=1):
    args = (x, w, y, lam, *extras, *spec.op_args(-1))
    plain = OP(*args)
    outs = OP(*args, True)
    for a, b in zip(plain[:4], outs[:4]):             # the flag leaves the fused statistics alone
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(t.numel() == 0 for t in plain[4:])
    # the math's weight: rounded to the embeddings' dtype for the autocast pair
    assert_parts(_parts(y.cpu(), [t.cpu() for t in outs[4:]]), x.cpu(), w.to(x.dtype).cpu(), y.cpu(), K)
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_op_side_outputs_of_every_family(name, dtype, monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHUNK", "16")                       # 37 classes: three chunks
    spec, lam = FAMILIES[name]
    x, w, y, _ = make_case(9, 37, 8, seed=7, ignored=(2,), device=DEV)
    lam = None if lam is None else torch.tensor(float(lam), device=DEV)
    _check(x.to(dtype), w.to(dtype), y, spec, lam, (None, None, None))


@pytest.mark.parametrize("name", list(FEATURES))
def test_fused_op_side_outputs_of_every_feature(name, monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHUNK", "12")
    x, w, y, _, spec, lam, extras = feature_inputs(name, 9, 13, 8, seed=2, ignored=(1,), device=DEV)
    _check(x.float(), w.float(), y, spec, lam, extras, spec.subcenters)


def test_fused_op_autocast_pair_and_ties(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHUNK", "3")
    x, w, y = _exact_case()
    spec = FAMILIES["arcface"].spec
    outs = _check(x.to(DEV, torch.bfloat16), w.to(DEV, torch.float32), y.to(DEV), spec, None, (None, None, None))
    assert outs[6].tolist() == [3, 9, 2, 19, 3]
    x, w, y, _ = make_feature_case(7, 11, 8, 2, seed=9, ignored=(0,), device=DEV)
    _check(x.half(), w.float(), y, spec.with_subcenters(2), None, (None, None, None), 2)


def test_loss_parts_through_the_fused_engine():
    x, w, y, _ = make_case(10, 21, 8, seed=3, ignored=(4,), device=DEV)
    x, w = x.float(), w.float()
    parts = MF.arcface_loss(x, w, y, return_parts=True)
    torch.testing.assert_close(parts.loss, MF.arcface_loss(x, w, y), rtol=0, atol=0)
    assert_parts(parts, x.cpu(), w.cpu(), y.cpu())
    assert float(MF.parts_accuracy(parts, y)) == float(MF.accuracy(x, w, y))
