"""The chunked engine (magloss/chunked.py) against the reference engine, the float64 oracle.

* every margin family and option, float64, values and both gradients, at chunk widths that
  split the classes unevenly (C = 1, 7, 1000 with widths 1, 3, 256, 4096, ...), with ignored
  rows, a non-default ignore_index and int32 labels;
* issue 14's features (per-row margins, CurricularFace's columns, K sub-centers with chunks of
  whole classes, and their combinations), float64, values and both gradients, uneven chunks;
* rows whose logits all lie far below the scale (the shifted sum would underflow: the
  online-max pass takes over), in float32 against float64;
* NaN and bad input: the same outcome as the reference, and a NaN reaching the math never
  swallowed (by the shifted sum, the online max or the merge);
* bf16 / fp16 (autocast pair and same-dtype) within 2x a same-precision eager baseline;
* the ops: the default CPU kernel is the engine (not the reference), torch.library.opcheck
  and torch.compile(fullgraph=True) with several chunks;
* memory: no intermediate larger than a constant times max(B·N, N·D, B·D) (a B×C or C×D
  temporary would fail), recorded op by op.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import magloss
import magloss.functional as MF
from cases import FEATURES, FP64_TOL, feature_case
from _parity_common import (ALL, FAMILIES, assert_within_eager, eager_lowp, lam_tensor, make_case, oracle, rel)
from magloss import chunked, reference
from magloss.margins import MarginSpec

TIGHT = FP64_TOL


#: The engine's two paths: "flat" recomputes the forward's products in the backward, "speed"
#: keeps them (keep=True, then kept= in the backward). Every parity table runs both.
PATHS = ["flat", "speed"]


def run_engine(x, w, y, spec, ii, lam, extras, grads, chunk, path="flat"):
    """The engine's forward and backward on one path; returns (lse, zy, reg, norms), (∂x, ∂W)."""
    keep = path == "speed"
    out = chunked.margin_ce_forward(x, w, y, spec, ii, lam, *extras, chunk=chunk, keep=keep)
    rows, kept = out[:4], (out[4:] if keep else (None, None))
    if keep:     # the kept products use the chunk width of the forward; the backward reads any width
        assert kept[0].shape == (x.shape[0], w.shape[0]) and kept[1].shape == (w.shape[0],)
    g = chunked.margin_ce_backward(*grads, x, w, y, rows[0], spec, ii, lam, *extras, chunk=chunk,
                                   kept=kept[0], kept_norms=kept[1])
    return rows, g


def engine(x, w, y, spec, ii, lam, grads, chunk, path="flat"):
    return run_engine(x, w, y, spec, ii, lam, (), grads, chunk, path)


def assert_matches_oracle(rows, grads, ref_rows, ref_grads, **tol):
    for name, got, want in zip(("lse", "zy", "reg", "norms", "grad_embeddings", "grad_weight"),
                               (*rows, *grads), (*ref_rows, *ref_grads)):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


# ---- float64 parity: every family, uneven chunks --------------------------------------------------
# (B, C, D, chunk): C = 1 (one chunk of 1), C = 7 split 1+...+1, 3+3+1, one chunk of 7 (width 256
# clipped to C), C = 1000 split 3 (334 chunks), 256 (3 x 256 + 232), 999 + 1, and the default width.
SHAPES = [(3, 1, 5, 1), (4, 7, 16, 1), (9, 7, 16, 3), (5, 7, 33, 256), (11, 1000, 32, 3),
          (17, 1000, 24, 256), (2, 1000, 8, 999), (13, 1000, 40, None)]


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("B,C,D,chunk", SHAPES)
@pytest.mark.parametrize("path", PATHS)
def test_float64_matches_reference(family, B, C, D, chunk, path):
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(B, C, D, seed=B + C, ignored=(1, 4))
    lam_t = lam_tensor(lam)
    rows, g = engine(x, w, y, spec, -1, lam_t, grads, chunk, path)
    assert_matches_oracle(rows, g, *oracle(x, w, y, spec, -1, lam_t, grads), **TIGHT)


@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface", "combined_m1_gt1"])
@pytest.mark.parametrize("path", PATHS)
def test_float64_ignore_index_int32_labels_and_single_gradients(family, path):
    """A non-default ignore_index, int32 labels, several rows per class (two labels in one chunk,
    the same label twice), and each of the four output gradients alone."""
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(12, 50, 16, seed=3, ignored=(0, 7), ignore_index=-100, label_dtype=torch.int32)
    y[2], y[3], y[5] = 10, 10, 11            # a repeated label and a neighbour in the same chunk
    lam_t = lam_tensor(lam)
    for k in range(4):
        only = [gg if i == k else torch.zeros_like(gg) for i, gg in enumerate(grads)]
        rows, g = engine(x, w, y, spec, -100, lam_t, only, 8, path)
        assert_matches_oracle(rows, g, *oracle(x, w, y, spec, -100, lam_t, only), **TIGHT)


@pytest.mark.parametrize("path", PATHS)
def test_float64_degenerate_rows_and_columns(path):
    """A zero embedding row and a zero class row (the ε guards of x̂ and r), every row ignored
    in one call, and an empty batch."""
    spec, _ = FAMILIES["arcface"]
    x, w, y, grads = make_case(6, 9, 8, seed=1, ignored=(2,))
    x[1] = 0.0
    w[3] = 0.0
    y[0] = 3
    rows, g = engine(x, w, y, spec, -1, None, grads, 4, path)
    assert_matches_oracle(rows, g, *oracle(x, w, y, spec, -1, None, grads), **TIGHT)
    y_none = torch.full_like(y, -1)
    rows, g = engine(x, w, y_none, spec, -1, None, grads, 4, path)
    assert_matches_oracle(rows, g, *oracle(x, w, y_none, spec, -1, None, grads), **TIGHT)
    e = [t[:0] for t in grads]
    rows, g = engine(x[:0], w, y[:0], spec, -1, None, e, 4, path)
    assert [t.shape for t in rows] == [(0,)] * 4
    assert g[0].shape == (0, 8) and torch.equal(g[1], torch.zeros_like(w))


# ---- issue 14's features: per-row margins, CurricularFace's columns, sub-centers -------------------
# (B, C classes, D, chunk columns): with K sub-centers a chunk is chunk // K whole classes (at
# least one): C = 7 one class per chunk, all in one (K = 1) or 2+2+2+1 classes (K = 3), C = 100 split
# unevenly (7 columns: 7, 3 or 2 classes per chunk), plus the default width.
FEATURE_SHAPES = [(4, 7, 16, 1), (9, 7, 16, 7), (11, 100, 32, 7), (13, 100, 40, None)]


def feature_engine(x, w, y, spec, lam, extras, grads, chunk, path="flat"):
    return run_engine(x, w, y, spec, -1, lam, extras, grads, chunk, path)


def feature_oracle(x, w, y, spec, lam, extras, grads):
    rows = reference.margin_ce_forward(x, w, y, spec, -1, lam, *extras)
    return rows, reference.margin_ce_backward(*grads, x, w, y, rows[0], spec, -1, lam, *extras)


@pytest.mark.parametrize("name", list(FEATURES))
@pytest.mark.parametrize("B,C,D,chunk", FEATURE_SHAPES)
@pytest.mark.parametrize("path", PATHS)
def test_features_float64_match_reference(name, B, C, D, chunk, path):
    x, w, y, spec, lam, *extras = feature_case(name, B, C, D, seed=B + C, ignored=(1, 4))
    grads = list(torch.randn(4, B, dtype=torch.float64))
    rows, g = feature_engine(x, w, y, spec, lam, extras, grads, chunk, path)
    assert_matches_oracle(rows, g, *feature_oracle(x, w, y, spec, lam, extras, grads), **TIGHT)


@pytest.mark.parametrize("name", ["adaface_clip", "curricular", "subcenter_adaface_curricular"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("path", PATHS)
def test_features_low_precision_match_reference(name, dtype, path):
    """Half and float32 inputs: the engine and the reference both compute in float32 on the
    same rounded operands, so they agree to float32 rounding."""
    x, w, y, spec, lam, *extras = feature_case(name, 7, 30, 16, seed=4, dtype=dtype)
    grads = list(torch.randn(4, 7))
    rows, g = feature_engine(x, w, y, spec, lam, extras, grads, 8, path)
    ref_rows, ref_g = feature_oracle(x, w, y, spec, lam, extras, grads)
    for got, want in zip((*rows, *g), (*ref_rows, *ref_g)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", PATHS)
def test_features_rows_far_below_the_shift_use_the_online_max(path):
    """Sub-centers with CurricularFace's columns at a large scale, every class pointing away from
    rows 0..2: the shifted sum (shift scale·(1 + |t|)) underflows in float32 and those rows
    take the online max; all rows match the float64 reference."""
    x, w, y, spec, lam, rm, nt, t = feature_case("subcenter_adaface_curricular", 6, 5, 16, seed=2)
    spec = MarginSpec.combined(400.0, 1, 0, 0, boundary=spec.boundary).with_subcenters(3)
    w[:] = -x[0] / x[0].norm() + 0.05 * w / w.norm(dim=1, keepdim=True)
    x[1], x[2] = x[0] * 0.9, x[0] * 1.1
    grads = list(torch.randn(4, 6, dtype=torch.float64))
    f32 = [None if e is None else e.float() for e in (rm, nt, t)]
    rows, g = feature_engine(x.float(), w.float(), y, spec, None, f32, [gg.float() for gg in grads], 2, path)
    ref_rows, ref_g = feature_oracle(x.float().double(), w.float().double(), y, spec, None, (rm, nt, t), grads)
    shift = 400.0 * (1.0 + abs(float(t)))
    assert (ref_rows[0][:3] - shift < math.log(5 * torch.finfo(torch.float32).tiny
                                               / torch.finfo(torch.float32).eps)).all(), "must exercise the fallback"
    assert rel(rows[0], ref_rows[0]) <= 1e-6 and torch.isfinite(rows[0]).all()
    assert rel(g[0], ref_g[0]) <= 1e-4 and rel(g[1], ref_g[1]) <= 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_curricular_negative_t_logits_above_the_scale_do_not_overflow(path):
    """With t < 0, CurricularFace's c·(t + c) reaches 1 − t > 1 as c → −1: a shift of scale·max(1, 1 + t)
    would sit below such logits by scale·|t| (here 100·0.9 = 90, and exp(90) is Inf in float32).
    Every class points away from the rows (c ≈ −1) and every column is modulated (τ = −2)."""
    x, w, y, spec, lam, rm, nt, t = feature_case("curricular", 5, 6, 16, seed=3)
    spec = MarginSpec.combined(100.0, 1, 0.5, 0)
    w[:] = -x[0] / x[0].norm() + 0.01 * w / w.norm(dim=1, keepdim=True)
    x[:] = x[0] * torch.linspace(0.8, 1.2, 5, dtype=x.dtype).unsqueeze(1)
    nt, t = torch.full_like(nt, -2.0), torch.tensor(-0.9, dtype=nt.dtype)
    grads = list(torch.randn(4, 5, dtype=torch.float64))
    f32 = [None, nt.float(), t.float()]
    rows, g = feature_engine(x.float(), w.float(), y, spec, None, f32, [gg.float() for gg in grads], 4, path)
    ref_rows, ref_g = feature_oracle(x.float().double(), w.float().double(), y, spec, None, (None, nt, t), grads)
    assert (ref_rows[0] > 100.0 * 1.8).all(), "the logits must exceed the scale by far"
    assert torch.isfinite(rows[0]).all() and rel(rows[0], ref_rows[0]) <= 1e-6
    assert rel(g[0], ref_g[0]) <= 1e-4 and rel(g[1], ref_g[1]) <= 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_features_nan_row_stays_in_its_row(monkeypatch, path):
    monkeypatch.setattr(chunked, "check_values", lambda *a, **k: None)
    x, w, y, spec, lam, *extras = feature_case("subcenter_adaface_curricular", 7, 9, 8, seed=5)
    x[4, 1] = float("nan")
    grads = list(torch.ones(4, 7, dtype=torch.float64))
    rows, (gx, gw) = feature_engine(x, w, y, spec, lam, extras, grads, 6, path)
    assert torch.isnan(rows[0]).tolist() == [i == 4 for i in range(7)]
    assert torch.isnan(gx).any(1).tolist() == [i == 4 for i in range(7)]


def test_opcheck_with_features(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHUNK", "4")
    x, w, y, spec, lam, rm, nt, t = feature_case("subcenter_adaface_curricular", 5, 6, 6, seed=8,
                                                 dtype=torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), y, lam, rm, nt, t, *spec.op_args(-1))
    torch.library.opcheck(torch.ops.magloss.margin_ce.default, args)
    with torch.no_grad():
        lse, _, _, norms = torch.ops.magloss.margin_ce(*args)[:4]
    grads = list(torch.randn(4, 5))
    bargs = (*grads, x.detach(), w.detach(), y, lse, norms, lam, rm, nt, t, *spec.op_args(-1))
    torch.library.opcheck(torch.ops.magloss.margin_ce_backward.default, bargs)


# ---- the shifted sum's underflow fallback ----------------------------------------------------------
@pytest.mark.parametrize("family,far", [("arcface", 1.0), ("sphereface", 1.0), ("cosface", 0.6)])
@pytest.mark.parametrize("path", PATHS)
def test_rows_far_below_the_scale_use_the_online_max(family, far, path):
    """Rows whose every logit is far below scale_i: with a large scale, every class pointing away
    from the row (c ≈ −far), Σ exp(z − scale) underflows in float32. Those rows must still match
    the float64 reference; ordinary rows in the same batch too."""
    spec, lam = FAMILIES[family]
    if family == "arcface":
        spec = MarginSpec.combined(400.0, 1.0, 0.5, 0.0)
    x, w, y, grads = make_case(6, 5, 16, seed=2, norm_range=(40.0, 60.0) if family == "sphereface" else (5.0, 120.0))
    w[:] = -far * x[0] / x[0].norm() + 0.05 * w / w.norm(dim=1, keepdim=True)   # every class against row 0..2
    x[1], x[2] = x[0] * 0.9, x[0] * 1.1
    lam_t = lam_tensor(lam)
    x32, w32 = x.float(), w.float()
    shift = (x32.norm(dim=1) if spec.scale_by_norm else torch.full((6,), spec.scale))
    rows, g = engine(x32, w32, y, spec, -1, lam_t, [t.float() for t in grads], 2, path)
    ref_rows, ref_g = oracle(x32.double(), w32.double(), y, spec, -1, lam_t, grads)
    assert (ref_rows[0][:3].float() - shift[:3] < math.log(5 * torch.finfo(torch.float32).tiny
                                                             / torch.finfo(torch.float32).eps)).all(), \
        "test inputs must exercise the fallback"
    assert rel(rows[0], ref_rows[0]) <= 1e-6 and torch.isfinite(rows[0]).all()
    assert rel(g[0], ref_g[0]) <= 1e-4 and rel(g[1], ref_g[1]) <= 1e-4


# ---- NaN and bad input --------------------------------------------------------------------------------
def _outcome(fn):
    try:
        out = fn()
    except (ValueError, TypeError) as exc:
        return type(exc), str(exc)
    return None, [torch.isnan(t) for t in out]


@pytest.mark.parametrize("where", ["embedding", "weight", "label", "dtype"])
def test_bad_input_same_outcome_as_reference(where):
    """Whatever the reference does with a bad input (raise, or NaN in the affected rows), the
    engine does the same: the same exception and message, or NaN in the same places."""
    spec, _ = FAMILIES["magface"]
    x, w, y, _ = make_case(5, 40, 8, seed=4, ignored=(3,))
    x, w = x.float(), w.float()
    if where == "embedding":
        x[2, 5] = float("nan")
    elif where == "weight":
        w[17, 1] = float("inf")
    elif where == "label":
        y[1] = 40
    else:
        w = w.double()
    ref = _outcome(lambda: reference.margin_ce_forward(x, w, y, spec, -1, None))
    eng = _outcome(lambda: chunked.margin_ce_forward(x, w, y, spec, -1, None, chunk=6))
    assert eng[0] == ref[0] and (eng[0] is not None or all(torch.equal(a, b) for a, b in zip(eng[1], ref[1])))
    if ref[0] is not None:
        assert eng[1] == ref[1]


@pytest.mark.parametrize("family", ["arcface", "sphereface", "magface"])
@pytest.mark.parametrize("scale", [64.0, 1000.0])      # 1000: every row takes the online-max pass
@pytest.mark.parametrize("path", PATHS)
def test_nan_reaching_the_math_is_never_swallowed(monkeypatch, family, scale, path):
    """With the value checks switched off, a NaN in row i's embedding makes exactly row i's lse
    (and its gradient row) NaN; a NaN in any class row makes every lse NaN."""
    monkeypatch.setattr(chunked, "check_values", lambda *a, **k: None)
    spec, lam = FAMILIES[family]
    if spec.kind == magloss.margins.COMBINED:
        spec = MarginSpec.combined(scale, 1.0, 0.5, 0.0)
    x, w, y, grads = make_case(6, 20, 8, seed=5, ignored=(4,))
    lam_t = lam_tensor(lam)
    x[2, 3] = float("nan")
    rows, g = engine(x, w, y, spec, -1, lam_t, grads, 6, path)
    nan_rows = torch.tensor([i == 2 for i in range(6)])
    assert torch.equal(torch.isnan(rows[0]), nan_rows)
    assert torch.equal(torch.isnan(g[0]).any(1), nan_rows)
    x[2, 3] = 1.0
    w[13, 0] = float("nan")
    rows, _ = engine(x, w, y, spec, -1, lam_t, grads, 6, path)
    assert torch.isnan(rows[0]).all()


# ---- half precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface_s", "cosface"])
@pytest.mark.parametrize("dtype,weight32", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)])
@pytest.mark.parametrize("path", PATHS)
def test_half_within_twice_eager(family, dtype, weight32, path):
    """fp16/bf16 embeddings with a float32 weight (the autocast pair) or a same-dtype weight:
    error against float64 (on the rounded inputs) within 2x the error of an eager same-precision
    baseline; ∂W in the weight's dtype (float32 for the pair), ∂x in the embeddings'."""
    spec, lam = FAMILIES[family]
    x64, w64, y, grads = make_case(9, 300, 32, seed=6, ignored=(2,))
    x64, w64 = x64.to(dtype).double(), w64.to(dtype).double()
    lam_t = lam_tensor(lam)
    ref_rows, ref_g = oracle(x64, w64, y, spec, -1, lam_t, grads)
    x = x64.to(dtype)
    w = w64.float() if weight32 else w64.to(dtype)
    rows, g = engine(x, w, y, spec, -1, lam_t, [t.float() for t in grads], 64, path)
    assert rows[0].dtype == torch.float32 and g[0].dtype == dtype and g[1].dtype == w.dtype
    base_rows, base_g = eager_lowp(x64, w64, y, spec, -1, lam_t, grads, "bf16" if dtype == torch.bfloat16 else "fp16")
    assert_within_eager([("loss", rows[0] - rows[1], base_rows[0] - base_rows[1], ref_rows[0] - ref_rows[1]),
                         ("grad_embeddings", g[0], base_g[0], ref_g[0]),
                         ("grad_weight", g[1], base_g[1], ref_g[1])], what=f"{family} {dtype}")


def test_cpu_autocast_bf16_runs_the_engine_in_fp32():
    """A training step under CPU bf16 autocast goes through the engine with the float32 weight
    (no C×D bf16 copy), and matches the reference's autocast result (same arithmetic)."""
    x, w, y = (t for t in make_case(8, 70, 16, seed=7, ignored=(1,))[:3])
    xa, wa = x.float().requires_grad_(), w.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MF.arcface_loss(xa, wa, y)
    loss.backward()
    assert loss.dtype == torch.float32 and wa.grad.dtype == torch.float32
    xb, wb = x.float().bfloat16().double().requires_grad_(), w.float().bfloat16().double().requires_grad_()
    want = MF.arcface_loss(xb, wb, y)
    want.backward()
    assert rel(loss, want) <= 1e-5
    assert rel(wa.grad, wb.grad) <= 1e-4 and rel(xa.grad, xb.grad) <= 1e-2   # ∂x rounded to bf16 once


# ---- the ops --------------------------------------------------------------------------------------------
def test_default_cpu_kernel_is_the_engine_not_the_reference(monkeypatch):
    calls = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(chunked, "margin_ce_forward", spy("chunked.forward", chunked.margin_ce_forward))
    monkeypatch.setattr(chunked, "margin_ce_backward", spy("chunked.backward", chunked.margin_ce_backward))
    for name in ("margin_ce_forward", "margin_ce_backward", "margin_ce_rows"):
        monkeypatch.setattr(reference, name, spy("reference." + name, getattr(reference, name)))
    x, w, y, _ = make_case(4, 10, 8)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    MF.magface_loss(x, w, y).backward()
    assert calls == ["chunked.forward", "chunked.backward"]


@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface"])
def test_opcheck_with_several_chunks(monkeypatch, family):
    monkeypatch.setenv("MAGLOSS_CHUNK", "3")
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(5, 8, 6, seed=8, ignored=(1,), norm_range=(1.0, 3.0))
    x, w, lam_t = x.float(), w.float(), lam_tensor(lam)
    args = (x.requires_grad_(), w.requires_grad_(), y, lam_t, None, None, None, *spec.op_args(-1))
    torch.library.opcheck(torch.ops.magloss.margin_ce.default, args)
    with torch.no_grad():
        lse, _, _, norms = torch.ops.magloss.margin_ce(*args)[:4]
    bargs = (*[g.float() for g in grads], x.detach(), w.detach(), y, lse, norms, lam_t, None, None, None, *spec.op_args(-1))
    torch.library.opcheck(torch.ops.magloss.margin_ce_backward.default, bargs)


@pytest.mark.parametrize("path", PATHS)
def test_torch_compile_fullgraph_matches_the_reference(monkeypatch, path):
    monkeypatch.setenv("MAGLOSS_CHUNK", "5")
    monkeypatch.setenv("MAGLOSS_PATH", path)
    keeps, forward = [], chunked.margin_ce_forward
    monkeypatch.setattr(chunked, "margin_ce_forward", lambda *a, **k: keeps.append(k.get("keep", False))
                        or forward(*a, **k))
    torch._dynamo.reset()
    x, w, y, _ = make_case(6, 23, 8, seed=9, ignored=(2,))

    def step(x, w, y):
        return MF.magface_loss(x, w, y, lambda_g=35.0)

    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(xc, wc, y)
    loss.backward()
    assert keeps and set(keeps) == {path == "speed"}      # the op of the path ran inside the graph
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    lse, zy, reg, norms = reference.margin_ce_rows(xr, wr, y, MarginSpec.magface())
    want = MF.reduce_rows(lse - zy, reg, norms, y != -1, MarginSpec.magface(), "mean", 35.0, False)
    want.backward()
    torch.testing.assert_close(loss, want, **TIGHT)
    torch.testing.assert_close(xc.grad, xr.grad, **TIGHT)
    torch.testing.assert_close(wc.grad, wr.grad, **TIGHT)


# ---- chunk width and memory ----------------------------------------------------------------------------
def test_chunk_columns(monkeypatch):
    monkeypatch.delenv("MAGLOSS_CHUNK", raising=False)
    assert chunked.chunk_columns(64, 10) == 10                      # never wider than C
    n = chunked.chunk_columns(64, 10**6)
    assert n % 256 == 0 and chunked.MIN_CHUNK <= n <= chunked.MAX_CHUNK
    assert chunked.chunk_columns(1, 10**6) == chunked.MAX_CHUNK
    assert chunked.chunk_columns(10**6, 10**6) == chunked.MIN_CHUNK
    assert chunked.chunk_columns(8, 100, 7) == 7
    monkeypatch.setenv("MAGLOSS_CHUNK", "33")
    assert chunked.chunk_columns(8, 100) == 33
    for bad in ("0", "-3", "wide"):
        monkeypatch.setenv("MAGLOSS_CHUNK", bad)
        with pytest.raises(ValueError, match="MAGLOSS_CHUNK: expected a positive integer"):
            chunked.chunk_columns(8, 100)
    with pytest.raises(ValueError, match="chunk: expected a positive integer"):
        chunked.chunk_columns(8, 100, 0)


class _LargestIntermediate(TorchDispatchMode):
    """Records the element count of every tensor an aten op returns (views included)."""

    def __init__(self, skip_shape):
        super().__init__()
        self.skip_shape, self.largest = tuple(skip_shape), (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape) != self.skip_shape:
                if t.numel() > self.largest[0]:
                    self.largest = (t.numel(), (func, tuple(t.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_temporary_grows_with_the_classes(dtype):
    """Every 2-D intermediate of forward and backward is at most max(B·N, N·D, B·D) elements
    (the result ∂W excepted): a B×C or C×D temporary would be 37x or 8x larger here."""
    B, C, D, N = 16, 3000, 64, 80
    spec, _ = FAMILIES["magface"]
    x, w, y, grads = make_case(B, C, D, seed=10, ignored=(3,))
    x, w = x.to(dtype), w.float()
    with _LargestIntermediate((C, D)) as rec:
        engine(x, w, y, spec, -1, None, [t.float() for t in grads], N)
    assert rec.largest[0] <= max(B * N, N * D, B * D), rec.largest
