"""The side outputs (label cosine, nearest negative cosine and class, predicted class) of the fused
engine: on a GPU (the compiled extension), else under the CPU emulator (tests/emu, the same sources
registered as the ops' "cpu" kernels; tests/_backend.py).

The forward epilogue tracks each row's largest non-label class cosine and its class (a fixed-order
block arg-max, merged across chunks; ties to the lowest class) and the boundary returns the row
stage's label cosine (docs/cuda.md, "Side outputs"). Checked here, on both forward ops (flat and
speed path): (a) the flag leaves the fused statistics (and the kept products) bit for bit as they
are, (b) the side outputs equal the float64 cosine matrix's (tests/test_side_outputs.py's
expectation) for every family and feature, fp32/fp16/bf16 and the autocast pair, ignored rows,
ties inside a warp, across warps and across chunks, a maximum in the last chunk.
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
OP_KEPT = torch.ops.magloss.margin_ce_kept
SIDE_NAMES = ("label_cosine", "nearest_negative_cosine", "nearest_negative_class", "predicted_class")


@pytest.fixture(scope="module", autouse=True)
def _routed():
    with BACKEND.routed():
        yield


def _parts(y, side):
    from types import SimpleNamespace

    return SimpleNamespace(**dict(zip(SIDE_NAMES, MF.side_parts(y, y != -1, *side))))


def _check(x, w, y, spec, lam, extras, K=1):
    """Both forward ops with and without ``side``; returns the flat op's side outputs."""
    args = (x, w, y, lam, *extras, *spec.op_args(-1))
    sides = []
    for op, rows in ((OP, 4), (OP_KEPT, 6)):
        plain = op(*args)
        outs = op(*args, True)
        for a, b in zip(plain[:rows], outs[:rows]):     # the flag leaves the fused statistics alone
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(outs) == rows + 3 and all(t.numel() == 0 for t in plain[rows:])
        # the math's weight: rounded to the embeddings' dtype for the autocast pair
        assert_parts(_parts(y.cpu(), [t.cpu() for t in outs[rows:]]), x.cpu(), w.to(x.dtype).cpu(), y.cpu(), K)
        sides.append(outs[rows:])
    for a, b in zip(*sides):                              # one arg-max on both paths
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return sides[0]


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
    side = _check(x.to(DEV, torch.bfloat16), w.to(DEV, torch.float32), y.to(DEV), spec, None, (None, None, None))
    assert side[2].tolist() == [3, 9, 2, 19, 3]
    x, w, y, _ = make_feature_case(7, 11, 8, 2, seed=9, ignored=(0,), device=DEV)
    _check(x.half(), w.float(), y, spec.with_subcenters(2), None, (None, None, None), 2)


def test_loss_parts_through_the_fused_engine():
    x, w, y, _ = make_case(10, 21, 8, seed=3, ignored=(4,), device=DEV)
    x, w = x.float(), w.float()
    parts = MF.arcface_loss(x, w, y, return_parts=True)
    torch.testing.assert_close(parts.loss, MF.arcface_loss(x, w, y), rtol=0, atol=0)
    assert_parts(parts, x.cpu(), w.cpu(), y.cpu())
    assert float(MF.parts_accuracy(parts, y)) == float(MF.accuracy(x, w, y))


@pytest.mark.parametrize("K", [1, 3])
def test_fused_ties_across_threads_warps_and_chunks(K, monkeypatch):
    """Exact cosines (basis directions; every other class along e4, cosine 0), 1200 classes in chunks
    of 512 (a block of 256 threads visits a column every 256): row 0's maximum is tied at classes 900
    (chunk 1), 200 (warp 6) and 33 (warp 1): 33; row 1's label 700 ties its negatives 1100 and 690:
    nearest 690, predicted 690 (the lower); row 2's only maximum is the last class; row 3 (ignored)
    ties 1000 and 513 (thread 1, chunk 1): 513. With K = 3, one sub-center of each class carries it."""
    monkeypatch.setenv("MAGLOSS_CHUNK", str(512 * K))
    C, D = 1200, 5
    basis = 2.0 * torch.eye(D)
    w = basis[4].repeat(C, 1)
    for cols, e in (([900, 200, 33], 0), ([700, 1100, 690], 1), ([1199], 2), ([1000, 513], 3)):
        w[cols] = basis[e]
    if K > 1:
        w = w.repeat_interleave(K, dim=0)
        w[0::K] = basis[4] * 0.5                  # sub-center 0: along e4; the class's direction at k = 1, 2
    x = torch.eye(D)[:4] * 4.0
    y = torch.tensor([5, 700, 9, -1])
    side = _check(x.to(DEV), w.to(DEV), y.to(DEV), FAMILIES["cosface"].spec.with_subcenters(K), None,
                  (None, None, None), K)
    assert side[2].tolist() == [33, 690, 1199, 513]
    assert side[1].tolist() == [1.0, 1.0, 1.0, 1.0] and side[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert MF.side_parts(y, y != -1, *(t.cpu() for t in side))[3].tolist() == [33, 690, 1199, 513]
