"""The side outputs of the margin losses' forward (``return_parts=True``): each row's label cosine
(CR-FIQA's CCS), its largest non-label cosine (NNCCS) and that class, and the predicted class,
from the same pass as the loss, on the chunked engine's two paths, through the ops, the oracle,
torch.compile and the sharded heads.

Expected values: the float64 cosine matrix of the inputs (as the math sees them: rounded to the
input dtype first), built here with plain matrix algebra; a class's cosine is the max over its
sub-centers; ties go to the lowest class index. Where two classes' float64 cosines are closer
than the engine's float32 rounding, either index is right and the test says so row by row.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import magloss
import magloss.functional as MF
from cases import FAMILIES, FEATURES, feature_case, loss_functional, make_inputs
from magloss import chunked, ops, reference
from magloss.train.loop import Loop
from torch.library import opcheck

PATHS = ("speed", "flat")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: abs tolerance of a cosine computed in the compute dtype against float64
COS_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def expected(x, w, y, K=1, ignore_index=-1):
    """float64 (label_cosine (NaN where ignored), nearest_negative_cosine, nearest_negative_class,
    predicted_class, the class-cosine matrix) of x [B, D], w [K·C, D]."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    cos = cos.view(x.shape[0], -1, K).amax(dim=2)
    valid = y != ignore_index
    rows = torch.arange(x.shape[0])[valid]
    label = torch.full((x.shape[0],), math.nan, dtype=torch.float64)
    label[valid] = cos[rows, y[valid]]
    neg = cos.clone()
    neg[rows, y[valid]] = -math.inf
    nn_cos, nn_cls = neg.max(dim=1)
    nn_cls = torch.where(nn_cos == -math.inf, torch.full_like(nn_cls, -1), nn_cls)
    return label, nn_cos, nn_cls, cos.argmax(dim=1), cos


def assert_index(got, want, values, cos, tol, what):
    """got == want, except on rows where cos's value at ``got`` is within tol of the best (a near-tie)."""
    differ = (got != want).nonzero().flatten().tolist()
    for i in differ:
        assert got[i] >= 0 and abs(float(cos[i, got[i]]) - float(values[i])) <= tol, (
            f"{what} row {i}: got class {int(got[i])}, expected {int(want[i])} (cosines "
            f"{float(cos[i, got[i]]) if got[i] >= 0 else None} vs {float(values[i])})")


def assert_parts(parts, x, w, y, K=1, ignore_index=-1, tol=2e-6, classes=None):
    """The LossParts side fields against :func:`expected` (``classes``: the column subset the
    forward saw, global indices sorted)."""
    if classes is not None:
        rows = (classes.unsqueeze(1) * K + torch.arange(K)).flatten()
        w = w[rows]
        y = torch.where(y == ignore_index, y, torch.searchsorted(classes, y))
    label, nn_cos, nn_cls, pred, cos = expected(x, w, y, K, ignore_index)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, got in (("label_cosine", parts.label_cosine), ("nearest_negative_cosine", parts.nearest_negative_cosine)):
        assert got.dtype == ct and got.shape == (x.shape[0],), name
    torch.testing.assert_close(parts.label_cosine.double(), label, rtol=0, atol=tol, equal_nan=True)
    torch.testing.assert_close(parts.nearest_negative_cosine.double(), nn_cos, rtol=0, atol=tol)
    assert parts.nearest_negative_class.dtype == torch.int64 and parts.predicted_class.dtype == torch.int64
    # the cosine reported is that of the class reported (gather-dot vs matrix: same value)
    nn_got, pred_got = parts.nearest_negative_class, parts.predicted_class
    if classes is not None:
        nn_got = torch.where(nn_got < 0, nn_got, torch.searchsorted(classes, nn_got))
        pred_got = torch.searchsorted(classes, pred_got)
    assert_index(nn_got, nn_cls, nn_cos, cos, tol, "nearest_negative_class")
    assert_index(pred_got, pred, cos.max(dim=1).values, cos, tol, "predicted_class")


def _cast(x, w, dtype):
    return x.to(dtype), w.to(dtype)


# ---- every family, dtype and path, through the functional losses --------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_side_outputs_of_every_family(name, dtype, path, monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHUNK", "8")                 # 37 classes: 5 chunks, the last one short
    by_norm = FAMILIES[name].spec.scale_by_norm
    x, w, y = make_inputs(13, 37, 9, ignored=(2, 7), seed=len(name), norm_range=(1.0, 3.0) if by_norm else (20.0, 90.0))
    xd, wd = _cast(x, w, dtype)
    with chunked.use_path(path):
        parts = loss_functional(name)(xd, wd, y, return_parts=True)
        loss = loss_functional(name)(xd, wd, y)
    torch.testing.assert_close(parts.loss, loss, rtol=0, atol=0)      # the same pass, the same loss
    assert_parts(parts, xd, wd, y, tol=COS_TOL[dtype])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(FEATURES))
def test_side_outputs_of_every_feature(name, path):
    """Sub-centers (a class's cosine: the max over its K), CurricularFace's columns, per-row
    margins: the op's side outputs and the oracle's, against the float64 matrix."""
    x, w, y, spec, lam, rm, nt, t = feature_case(name, 11, 19, 7, seed=3, dtype=torch.float32, ignored=(1, 4))
    K = spec.subcenters
    args = (x, w, y, lam, rm, nt, t, *spec.op_args(-1))
    for chunk in ("1", "4", "64"):
        with pytest.MonkeyPatch.context() as mp, chunked.use_path(path):
            mp.setenv("MAGLOSS_CHUNK", str(int(chunk) * K))
            c_y, nn_cos, nn_cls = ops.margin_ce_rows(*args, side=True)[4:]
        valid = y != -1
        parts = SimpleNamespace(**dict(zip(("label_cosine", "nearest_negative_cosine", "nearest_negative_class",
                                            "predicted_class"), MF.side_parts(y, valid, c_y, nn_cos, nn_cls))))
        assert_parts(parts, x, w, y, K)
        assert bool((c_y[~valid] == 0).all())             # the op's convention: 0 without a label column
    ref = reference.margin_ce_forward(x.double(), w.double(), y, spec, -1, None if lam is None else lam.double(),
                                      *(None if e is None else e.double() for e in (rm, nt, t)), side=True)[4:]
    parts = SimpleNamespace(**dict(zip(("label_cosine", "nearest_negative_cosine", "nearest_negative_class",
                                        "predicted_class"), MF.side_parts(y, y != -1, *ref))))
    assert_parts(parts, x.double(), w.double(), y, K, tol=1e-12)


# ---- chunk boundaries and ties, on exact data ------------------------------------------------------------
def _exact_case(K=1):
    """Cosines exact in every dtype: x rows along basis vectors, class rows 2·basis vectors (norm
    2: r = 0.5 exactly), so ties are exact ties. C = 20 classes, D = 5, the other classes along
    e4 (cosine 0 with every row):
    row 0: label 6 (cos 0), the best negatives 3 and 17 tie at 1 (across chunks: 3 wins);
    row 1: label 5 ties with negative 9 at 1 (the label is the lower index: predicted 5);
    row 2: label 12 ties with negative 2 (predicted 2, the lower index);
    row 3: label 0 (cos 0), the only max is the last class, 19 (in the last chunk);
    row 4: ignored, its best tie 3 and 17 (nearest = predicted = 3)."""
    basis = 2.0 * torch.eye(5, dtype=torch.float64)
    cls = basis[4].repeat(20, 1)
    cls[[3, 17]] = basis[0]
    cls[[5, 9]] = basis[1]
    cls[[12, 2]] = basis[3]
    cls[19] = basis[2]
    x = torch.tensor([[3.0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0], [0, 0, 0, 7.0, 0], [0, 0, 9.0, 0, 0],
                      [1.0, 0, 0, 0, 0]], dtype=torch.float64) * 8.0
    y = torch.tensor([6, 5, 12, 0, -1])
    if K == 1:
        return x, cls, y
    w = cls.repeat_interleave(K, dim=0).clone()
    w[1::K] = 0.5 * w[1::K]                    # a second sub-center, same direction (a tie inside the class)
    return x, w, y


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk", [1, 3, 8, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_and_the_last_chunk(dtype, chunk, path, K, monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk * K))
    x, w, y = _exact_case(K)
    xd, wd = _cast(x, w, dtype)
    fn = MF.arcface_loss if K == 1 else MF.subcenter_arcface_loss
    kw = {} if K == 1 else {"subcenters": K}
    with chunked.use_path(path):
        parts = fn(xd, wd, y, return_parts=True, **kw)
    assert parts.nearest_negative_class.tolist() == [3, 9, 2, 19, 3]
    assert parts.predicted_class.tolist() == [3, 5, 2, 19, 3]
    assert parts.nearest_negative_cosine.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert parts.label_cosine[:4].tolist() == [0.0, 1.0, 1.0, 0.0] and math.isnan(parts.label_cosine[4])
    assert_parts(parts, xd, wd, y, K, tol=0.0)


@pytest.mark.parametrize("path", PATHS)
def test_one_class_and_empty_batch(path):
    """C = 1: a labelled row has no negative class (−inf, −1; predicted: its label); an ignored
    row's nearest is class 0. B = 0: empty fields."""
    x, w, _ = make_inputs(3, 1, 5)
    y = torch.tensor([0, -1, 0])
    with chunked.use_path(path):
        parts = MF.cosface_loss(x, w, y, return_parts=True)
        empty = MF.cosface_loss(x[:0], w, y[:0], return_parts=True)
    assert parts.nearest_negative_class.tolist() == [-1, 0, -1]
    assert parts.predicted_class.tolist() == [0, 0, 0]
    c = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    torch.testing.assert_close(parts.nearest_negative_cosine, torch.stack([-torch.tensor(math.inf, dtype=x.dtype),
                                                                          c[1, 0], -torch.tensor(math.inf,
                                                                                                 dtype=x.dtype)]))
    assert all(t.shape == (0,) for t in empty[5:])
    assert float(MF.parts_accuracy(parts, y)) == 1.0


# ---- nothing extra without return_parts; the ops' contract -------------------------------------------------
def test_no_side_work_without_return_parts(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("side outputs computed without return_parts")

    monkeypatch.setattr(chunked, "_Nearest", refuse)
    x, w, y = make_inputs(6, 9, 4)
    for path in PATHS:
        with chunked.use_path(path):
            MF.arcface_loss(x, w, y).item()
    spec = magloss.MarginSpec.arcface()
    outs = torch.ops.magloss.margin_ce(x, w, y, None, None, None, None, *spec.op_args(-1))
    assert len(outs) == 7 and all(t.numel() == 0 for t in outs[4:]) and outs[6].dtype == torch.int64
    outs = torch.ops.magloss.margin_ce_kept(x, w, y, None, None, None, None, *spec.op_args(-1))
    assert len(outs) == 9 and all(t.numel() == 0 for t in outs[6:])


@pytest.mark.parametrize("op", ["margin_ce", "margin_ce_kept"])
@pytest.mark.parametrize("side", [True, False])
def test_opcheck_with_side_outputs(op, side):
    x, w, y = make_inputs(5, 7, 6, dtype=torch.float32, ignored=(1,))
    spec = magloss.MarginSpec.arcface(30.0).with_subcenters(1)
    args = (x.requires_grad_(), w.requires_grad_(), y, None, None, None, None, *spec.op_args(-1), side)
    opcheck(getattr(torch.ops.magloss, op).default, args)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(FEATURES) + ["magface"])
def test_gradients_unchanged_by_side_outputs(name, path):
    """The side outputs read the tiles, never change them (the speed path's backward reuses the
    forward's kept tile): the gradients with and without them are the same bits."""
    if name in FEATURES:
        x, w, y, spec, lam, *extras = feature_case(name, 9, 11, 5, seed=4, dtype=torch.float32, ignored=(3,))
    else:
        (x, w, y), spec, lam, extras = make_inputs(9, 11, 5, ignored=(3,)), FAMILIES[name].spec, None, (None,) * 3
    grads = []
    for side in (False, True):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with chunked.use_path(path):
            lse, zy, reg, norms = ops.margin_ce_rows(xg, wg, y, lam, *extras, *spec.op_args(-1), side=side)[:4]
        (lse - zy + reg + norms).sum().backward()
        grads.append((xg.grad, wg.grad))
    assert all(bool(torch.isfinite(g).all()) for g in grads[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_compile_fullgraph_returns_the_side_outputs(path):
    torch._dynamo.reset()
    crit = magloss.SubCenterArcFaceLoss(6, 9, subcenters=2)
    x, _, y = make_inputs(8, 9, 6, dtype=torch.float32, ignored=(2,))
    with chunked.use_path(path):
        eager = crit(x, y, return_parts=True)
        compiled = torch.compile(lambda a, b: crit(a, b, return_parts=True), fullgraph=True, backend="aot_eager")(x, y)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert_parts(compiled, x, crit.weight.detach(), y, 2)


# ---- accuracy from the parts ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["arcface", "sphereface", "magface"])
def test_parts_accuracy_is_the_accuracy(name):
    x, w, y = make_inputs(40, 6, 3, ignored=(0, 5), seed=11)
    y[10:25] = (F.normalize(x) @ F.normalize(w).T).argmax(1)[10:25]        # some rows right
    parts = loss_functional(name)(x, w, y, return_parts=True)
    want = MF.accuracy(x, w, y)
    assert 0 < float(want) < 1
    assert float(MF.parts_accuracy(parts, y)) == float(want)
    # the training loop's accuracy on a logged step is the same number, from the parts
    crit = magloss.ArcFaceLoss(3, 6, dtype=torch.float64)
    crit.weight.data.copy_(w)
    loop = SimpleNamespace(head=crit)
    assert float(Loop._accuracy(loop, crit(x, y, return_parts=True), x, y)) == float(crit.accuracy(x, y))
    with pytest.raises(ValueError, match="parts: expected the side outputs"):
        MF.parts_accuracy(MF.softmax_loss(x, w, y, return_parts=True), y)


def test_parts_accuracy_nan_on_a_broken_row(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, w, y = make_inputs(4, 5, 3)
    x[1] = math.nan
    parts = MF.arcface_loss(x, w, y, return_parts=True)
    assert math.isnan(float(MF.parts_accuracy(parts, y)))


# ---- sharded heads: the same fields as one process on the whole batch -----------------------------------
SHARDED_B, SHARDED_C, SHARDED_D = 11, 13, 6
SHARDED_HEADS = {                  # name -> (sharded class, single-process class, kwargs, K)
    "arcface": ("ShardedArcFaceLoss", "ArcFaceLoss", {}, 1),
    "subcenter": ("ShardedSubCenterArcFaceLoss", "SubCenterArcFaceLoss", {"subcenters": 2}, 2),
    "curricular": ("ShardedCurricularFaceLoss", "CurricularFaceLoss", {}, 1),
    # the one-vs-all heads (tests/test_side_outputs_one_vs_all.py has their single-process tests)
    "sface": ("ShardedSFaceLoss", "SFaceLoss", {}, 1),
    "uniface": ("ShardedUniFaceLoss", "UniFaceLoss", {}, 1),
    "sphereface2": ("ShardedSphereFace2Loss", "SphereFace2Loss", {}, 1),
    "p2sgrad": ("ShardedP2SGradLoss", "P2SGradLoss", {}, 1),
}
WORLDS = (1, 2, 3)


def _sharded_case(K):
    x, w, y = make_inputs(SHARDED_B, SHARDED_C * K, SHARDED_D, ignored=(4,), seed=5, dtype=torch.float32)
    y = torch.where(y >= 0, y % SHARDED_C, y)
    w[7 * K] = w[2 * K]                       # classes 2 and 7 tie (on different shards with 2 or 3 ranks)
    x[0] = w[2 * K] * 3.0                     # row 0's best: the tie, 2 wins
    y[0] = 9
    return x, w, y


def _sharded_phase(rank, world, group, out_dir):
    from _dist_utils import split_sizes
    import magloss.distributed as mdist

    res = {}
    sizes = split_sizes(SHARDED_B, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for name, (cls, _, kw, K) in SHARDED_HEADS.items():
        x, w, y = _sharded_case(K)
        for rate in (1.0, 0.5):
            head = getattr(mdist, cls)(SHARDED_D, SHARDED_C, sample_rate=rate, group=group, **kw)
            head.weight.data.copy_(w[head.shard_start * K: head.shard_end * K])
            head.train(rate < 1.0)
            parts = head(x[lo:hi], y[lo:hi], return_parts=True)
            sample = None if head.last_sample is None else mdist.comm.gather_rows(
                head.last_sample, _sample_sizes(head, group), group)
            acc = float(Loop._accuracy(SimpleNamespace(head=head), parts, x[lo:hi], y[lo:hi]))
            res[(name, rate)] = ([t.detach() for t in parts[5:]], sample, acc,
                                 float(head.accuracy(x[lo:hi], y[lo:hi])))
    return res


def _sample_sizes(head, group):
    """Every rank's Partial FC sample size (one all-gather)."""
    from magloss.distributed.comm import all_gather_ints

    return [n for (n,) in all_gather_ints(torch.tensor([len(head.last_sample)]), group)]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    from _dist_utils import spawn_worlds

    return spawn_worlds(_sharded_phase, WORLDS, tmp_path_factory.mktemp("side"))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(SHARDED_HEADS))
def test_sharded_side_outputs_equal_one_process(sharded_results, name, world):
    _, single, kw, K = SHARDED_HEADS[name]
    x, w, y = _sharded_case(K)
    crit = getattr(magloss, single)(SHARDED_D, SHARDED_C, **kw)
    crit.weight.data.copy_(w)
    want = crit.eval()(x, y, return_parts=True)
    for rank in range(world):
        got, sample, acc, head_acc = sharded_results[(world, rank)][(name, 1.0)]
        assert sample is None
        for a, b in zip(got, want[5:]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, equal_nan=True)
        assert got[2][0] == 2 and got[3][0] == 2                          # the tie across shards: class 2
        assert acc == head_acc == float(crit.accuracy(x, y))           # the log's accuracy, from the parts
        assert_parts(SimpleNamespace(**dict(zip(want._fields[5:], got))), x, w, y, K)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(SHARDED_HEADS))
def test_sharded_partial_fc_side_outputs_cover_the_sampled_classes(sharded_results, name, world):
    K = SHARDED_HEADS[name][3]
    x, w, y = _sharded_case(K)
    for rank in range(world):
        got, sample, acc, head_acc = sharded_results[(world, rank)][(name, 0.5)]
        assert sample is not None and len(sample) < SHARDED_C and bool((sample[1:] > sample[:-1]).all())
        assert set(y[y >= 0].tolist()) <= set(sample.tolist())           # the positives are always kept
        parts = SimpleNamespace(**dict(zip(magloss.LossParts._fields[5:], got)))
        assert_parts(parts, x, w, y, K, classes=sample)
        assert acc == head_acc          # the log falls back to the head's full-class accuracy under Partial FC
