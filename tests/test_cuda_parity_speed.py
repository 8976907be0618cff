"""The fused engine's speed path (magloss::margin_ce_kept / margin_ce_backward_kept) against the reference.

The same backends, harness and tables as tests/test_cuda_parity.py (imported from it, never copied):
on a GPU the compiled extension, elsewhere the same sources under the CPU emulator, registered as the
ops' "cpu" kernels. Each parity test of the flat suite that concerns the math (families, features,
shapes, chunking, ignored rows, bad labels, fp16/bf16/TF32, the autocast pair, the plain-fp32 path)
is repeated here on the kept pair against the float64 oracle, with the flat suite's tolerances (the
bad-label rows' test is the flat suite's, parameterized over both paths).

Speed against flat on the fused engine (docs/cuda.md, "Two paths"): the forward's row statistics
are bit for bit the flat forward's (the kernels form every logit with the same expression; the
kept conversion is written after it). The gradients agree within fp32 rounding, not bit for bit:
on the plain path the backward's logit is kept_ij·r_j with kept_ij = scale_i·(x_i·w_j/‖x_i‖)
rounded once more than the flat backward's scale_i·((x_i·w_j/‖x_i‖)·r_j), so p_ij differs in the
last bits: a relative difference of about |z|·eps (tested with 4·(max lse + 4)·eps).
"""

from __future__ import annotations

import pytest
import torch

import magloss
import test_cuda_parity as flat
from _parity_common import (NO_EXTRAS, assert_fp32_parity, assert_rounded_fp32_parity, assert_within_eager,
                            eager_lowp, oracle, tf32)
from cases import FAMILIES, FEATURES, rel
from magloss import chunked, ops
from test_cuda_parity import (BACKEND, DEV, FEATURE_SHAPES, GPU, LOWP_CASES, SMALL_SHAPES, OP, OP_BWD,  # noqa: F401
                              _backend_routed, _no_pending_input_errors, feature_case, lam_tensor, make_case,
                              synchronize)

pytestmark = pytest.mark.gpu if GPU else []

OP_KEPT = torch.ops.magloss.margin_ce_kept
OP_BWD_KEPT = torch.ops.magloss.margin_ce_backward_kept


def fused_speed(x, w, y, spec, ii, lam, grads, extras=NO_EXTRAS):
    """The speed pair called directly: (rows, (gx, gw), (kept, kept_norms))."""
    out = OP_KEPT(x, w, y, lam, *extras, *spec.op_args(ii))
    rows, kept, kept_norms = out[:4], out[4], out[5]
    g32 = [g.float() for g in grads]
    gx, gw = OP_BWD_KEPT(*g32, x, w, y, rows[0], rows[3], kept, kept_norms, lam, *extras, *spec.op_args(ii))
    return rows, (gx, gw), (kept, kept_norms)


def check_fp32(x, w, y, spec, ii, lam, grads, what="", extras=NO_EXTRAS):
    with tf32(False):
        rows, gr, _ = fused_speed(x.float(), w.float(), y, spec, ii, lam, grads, extras)
    ref_rows, ref_grads = oracle(x, w, y, spec, ii, lam, grads, extras)
    assert_fp32_parity(rows, gr, ref_rows, ref_grads, what)
    return rows


# ---- the flat suite's tables on the speed pair ------------------------------------------------------
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "B%d-C%d-D%d" % s)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_speed_fp32_parity(family, shape):
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(*shape, ignored=(1, 5, 77))
    check_fp32(x, w, y, spec, -1, lam_tensor(lam), grads, f"speed {family} {shape}")


@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "B%d-C%d-D%d" % s)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_speed_feature_fp32_parity(feature, shape):
    x, w, y, grads, spec, lam, extras = feature_case(feature, *shape, seed=51, ignored=(4, 9))
    check_fp32(x, w, y, spec, -1, lam, grads, f"speed {feature} {shape}", extras)


# Several chunks, a ragged last one, one column or one class a chunk: the kept blocks' row pitch is
# K·C, not the chunk's width.
@pytest.mark.parametrize("chunk,C", [(256, 1000), (999, 1000), (1, 7), (300, 4099)])
@pytest.mark.parametrize("family", ["arcface", "sphereface", "magface"])
def test_speed_chunking(monkeypatch, family, chunk, C):
    monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(37, C, 100, seed=2, ignored=(3,))
    check_fp32(x, w, y, spec, -1, lam_tensor(lam), grads, f"speed {family} chunk={chunk} C={C}")


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("feature", ["curricular", "subcenter_arc", "subcenter_adaface_curricular"])
def test_speed_feature_chunking(monkeypatch, feature, chunk):
    monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))
    x, w, y, grads, spec, lam, extras = feature_case(feature, 9, 51, 40, seed=52, ignored=(3,))
    check_fp32(x, w, y, spec, -1, lam, grads, f"speed {feature} chunk={chunk}", extras)


@pytest.mark.parametrize("ignore_index,ignored", [(-1, (0, 2)), (-100, (1,)), (0, ()), (-1, tuple(range(8)))])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_speed_ignored_rows(ignore_index, ignored, label_dtype):
    spec, _ = FAMILIES["magface"]
    x, w, y, grads = make_case(8, 1000, 64, seed=3, ignored=ignored, ignore_index=ignore_index,
                               label_dtype=label_dtype)
    rows = check_fp32(x, w, y, spec, ignore_index, None, grads, f"speed ignore_index={ignore_index}")
    assert torch.all(rows[1][y == ignore_index] == 0)


def _lowp(x64, w64, y, spec, lam, grads, precision, extras=NO_EXTRAS):
    dt = flat._parity_common.PRECISION_DTYPES[precision]
    x64, w64 = x64.to(dt).double(), w64.to(dt).double()   # the oracle sees the rounded inputs
    ref_rows, ref_grads = oracle(x64, w64, y, spec, -1, lam, grads, extras)
    eager_rows, eager_grads = eager_lowp(x64, w64, y, spec, -1, lam, grads, precision, extras)
    with tf32(precision == "tf32"):
        rows, gr, (kept, kept_norms) = fused_speed(x64.to(dt), w64.to(dt), y, spec, -1, lam, grads, extras)
    assert gr[0].dtype == dt and gr[1].dtype == dt
    assert kept.dtype == torch.float32 and kept_norms.dtype == torch.float32   # the compute dtype
    assert_within_eager([
        ("loss", rows[0] - rows[1], eager_rows[0] - eager_rows[1], ref_rows[0] - ref_rows[1]),
        ("grad_embeddings", gr[0], eager_grads[0], ref_grads[0]),
        ("grad_weight", gr[1], eager_grads[1], ref_grads[1]),
    ], f"speed {precision}")


@pytest.mark.parametrize("family,shape", LOWP_CASES, ids=lambda v: v if isinstance(v, str) else "B%d-C%d-D%d" % v)
@pytest.mark.parametrize("precision", ["tf32", "fp16", "bf16"])
def test_speed_low_precision_vs_eager(precision, family, shape):
    spec, lam = FAMILIES[family]
    x64, w64, y, grads = make_case(*shape, seed=8, ignored=(1,))
    _lowp(x64, w64, y, spec, lam_tensor(lam), grads, precision)


@pytest.mark.parametrize("feature", ["adaface_clip", "curricular", "subcenter_adaface_curricular"])
@pytest.mark.parametrize("precision", ["tf32", "fp16", "bf16"])
def test_speed_feature_low_precision_vs_eager(precision, feature):
    x64, w64, y, grads, spec, lam, extras = feature_case(feature, 37, 200, 72, seed=53, ignored=(1,))
    _lowp(x64, w64, y, spec, lam, grads, precision, extras)


def family_or_feature_case(case, B, C, C_feature, D, *, seed, ignored):
    """(x, w, y, grads, spec, lam, extras) of a FAMILIES case with C classes, or of a FEATURES case
    with C_feature classes (the feature cases carry K sub-centers per class), on this suite's device."""
    if case in FAMILIES:
        spec, lam = FAMILIES[case]
        x, w, y, grads = make_case(B, C, D, seed=seed, ignored=ignored)
        return x, w, y, grads, spec, lam_tensor(lam), NO_EXTRAS
    return feature_case(case, B, C_feature, D, seed=seed, ignored=ignored)


@pytest.mark.parametrize("simt", [False, True], ids=["tensor-core", "simt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["arcface", "sphereface", "subcenter_adaface_curricular"])
def test_speed_fp32_weight_with_half_embeddings(monkeypatch, case, dtype, simt):
    """The autocast pair on the speed path: (half x, fp32 W) is (half x, W rounded to x's dtype):
    rows, kept, kept_norms and dx bit for bit, dW in fp32 and at most one rounding from the half
    path's dW; on the plain-fp32 (SIMT) products, fp32 math on the rounded inputs."""
    if simt:
        monkeypatch.setenv("MAGLOSS_FORCE_SIMT", "1")
    monkeypatch.setenv("MAGLOSS_CHUNK", "256")
    x64, w64, y, grads, spec, lam, extras = family_or_feature_case(case, 37, 700, 300, 100, seed=21, ignored=(3,))
    x, w = x64.to(dtype), w64.float()
    rows_m, (gx_m, gw_m), kept_m = fused_speed(x, w, y, spec, -1, lam, grads, extras)
    rows_h, (gx_h, gw_h), kept_h = fused_speed(x, w.to(dtype), y, spec, -1, lam, grads, extras)
    assert gw_m.dtype == torch.float32 and gx_m.dtype == dtype
    for u, v in zip(rows_m + (gx_m,) + kept_m, rows_h + (gx_h,) + kept_h):
        assert torch.equal(u, v)
    assert rel(gw_m.to(dtype), gw_h) <= torch.finfo(dtype).eps
    if simt:
        ref_rows, ref_grads = oracle(x.double(), w.to(dtype).double(), y, spec, -1, lam, grads, extras)
        assert_rounded_fp32_parity(rows_h, (gx_h, gw_h), ref_rows, ref_grads, dtype)


# ---- speed against flat, and what is kept -------------------------------------------------------------
SPEED_VS_FLAT = ["arcface", "cosface", "sphereface", "magface", "arcface_easy"] + list(FEATURES)


@pytest.mark.parametrize("case", SPEED_VS_FLAT)
def test_speed_matches_flat_and_keeps_the_chunked_quantities(monkeypatch, case):
    """Rows bit for bit the flat op's; gradients within fp32 rounding of the flat op's (module
    docstring); kept and kept_norms what the chunked engine keeps (scale_i·x̂_i·w_j, or the
    sub-center cosines; ‖w_j‖), to fp32 rounding. Three chunks, a ragged one."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "24")
    x, w, y, grads, spec, lam, extras = family_or_feature_case(case, 11, 61, 23, 40, seed=31, ignored=(2,))
    x, w = x.float(), w.float()
    with tf32(False):
        rows_s, (gx_s, gw_s), (kept, kept_norms) = fused_speed(x, w, y, spec, -1, lam, grads, extras)
        rows_f = OP(x, w, y, lam, *extras, *spec.op_args(-1))
        gx_f, gw_f = OP_BWD(*[g.float() for g in grads], x, w, y, rows_f[0], rows_f[3], lam, *extras,
                            *spec.op_args(-1))
    for u, v in zip(rows_s, rows_f):
        assert torch.equal(u, v)
    # A logit z differs by about one rounding (|z|·eps) between the two backwards, so p = exp(z − lse)
    # by a relative |z|·eps; |z| ≤ max lse + a few nats here.
    bound = 4 * (rows_f[0].abs().max().item() + 4) * torch.finfo(torch.float32).eps
    assert rel(gx_s, gx_f) <= bound and rel(gw_s, gw_f) <= bound
    with BACKEND.default_cpu_kernels():   # the chunked engine on the same inputs
        ck = chunked.margin_ce_forward(x.cpu(), w.cpu(), y.cpu(), spec, -1, None if lam is None else lam.cpu(),
                                       *[None if t is None else t.cpu() for t in extras], keep=True)
    assert kept.shape == ck[4].shape and kept_norms.shape == ck[5].shape
    assert rel(kept.cpu(), ck[4]) <= 1e-6 and rel(kept_norms.cpu(), ck[5]) <= 1e-6


def test_kept_is_read_only_and_a_retained_graph_backs_twice():
    """The backward never writes the kept matrix (its epilogue writes T into its own buffer): a
    second backward through a retained graph gives the same gradients, bit for bit."""
    spec, _ = FAMILIES["cosface"]
    x, w, y, grads = make_case(9, 50, 40, seed=32, ignored=(1,))
    x, w = x.float(), w.float()
    for feature in (False, True):
        extras = NO_EXTRAS
        if feature:
            x, w, y, grads, spec, _, extras = feature_case("subcenter_adaface_curricular", 9, 17, 40, seed=32)
            x, w = x.float(), w.float()
        out = OP_KEPT(x, w, y, None, *extras, *spec.op_args(-1))
        before = out[4].clone()
        g32 = [g.float() for g in grads]
        args = (*g32, x, w, y, out[0], out[3], out[4], out[5], None, *extras, *spec.op_args(-1))
        first = OP_BWD_KEPT(*args)
        assert torch.equal(out[4], before)
        second = OP_BWD_KEPT(*args)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("path", ["speed", "flat"])
def test_losses_follow_the_path_policy_on_the_fused_engine(monkeypatch, path):
    """ops.margin_ce_rows on the fused device takes the pair the policy picks (MAGLOSS_PATH), and
    the loss and gradients agree with the float64 reference either way."""
    monkeypatch.setenv("MAGLOSS_PATH", path)
    x64, w64, y, _ = make_case(13, 90, 40, seed=33, ignored=(4,))
    xr, wr = x64.cpu().clone().requires_grad_(), w64.cpu().clone().requires_grad_()
    ref = magloss.functional.arcface_loss(xr, wr, y.cpu())    # float64: the chunked engine
    ref.backward()
    calls = []
    for name in ("margin_ce", "margin_ce_kept"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    xs, ws = x64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    with tf32(False):
        loss = magloss.functional.arcface_loss(xs, ws, y)
    loss.backward()
    assert calls == ["margin_ce_kept" if path == "speed" else "margin_ce"]
    assert rel(loss.detach().cpu(), ref.detach()) <= 1e-5
    assert rel(xs.grad.cpu(), xr.grad) <= 1e-4 and rel(ws.grad.cpu(), wr.grad) <= 1e-4


# ---- bad labels, wrong kept buffers, empty batch, opcheck -----------------------------------------
def test_wrong_kept_buffers_are_value_errors_naming_them():
    spec, _ = FAMILIES["arcface"]
    x, w, y, grads = make_case(6, 10, 64, seed=34)
    x, w = x.float(), w.float()
    out = OP_KEPT(x, w, y, None, None, None, None, *spec.op_args(-1))
    g32 = [g.float() for g in grads]
    bad = {"kept": (out[4][:, :9], out[5]), "kept_norms": (out[4], out[5].double())}
    for name, (kept, kept_norms) in bad.items():
        with pytest.raises(ValueError, match=f"^{name}: expected the forward's kept"):
            OP_BWD_KEPT(*g32, x, w, y, out[0], out[3], kept, kept_norms, None, None, None, None, *spec.op_args(-1))


def test_speed_empty_batch():
    spec, _ = FAMILIES["arcface"]
    x = torch.zeros(0, 64, device=DEV)
    w = torch.randn(10, 64, device=DEV)
    y = torch.zeros(0, dtype=torch.long, device=DEV)
    out = OP_KEPT(x, w, y, None, None, None, None, *spec.op_args(-1))
    assert all(r.shape == (0,) for r in out[:4]) and out[4].shape == (0, 10)
    torch.testing.assert_close(out[5].double(), w.double().norm(dim=1), rtol=1e-6, atol=0)
    z = torch.zeros(0, device=DEV)
    gx, gw = OP_BWD_KEPT(z, z, z, z, x, w, y, out[0], out[3], out[4], out[5], None, None, None, None,
                         *spec.op_args(-1))
    assert gx.shape == (0, 64) and gw.shape == (10, 64) and torch.all(gw == 0)


@pytest.mark.parametrize("case", ["arcface", "sphereface", "magface", "subcenter_adaface_curricular"])
def test_opcheck_kept_ops(case):
    x, w, y, grads, spec, lam, extras = family_or_feature_case(case, 8, 40, 13, 64, seed=14, ignored=(2,))
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    torch.library.opcheck(OP_KEPT, (x, w, y, lam, *extras, *spec.op_args(-1)))
    out = OP_KEPT(x.detach(), w.detach(), y, lam, *extras, *spec.op_args(-1))
    torch.library.opcheck(OP_BWD_KEPT, (*[g.float() for g in grads], x.detach(), w.detach(), y, out[0], out[3],
                                        out[4], out[5], lam, *extras, *spec.op_args(-1)))


# ---- sub-centers: the kept cosines' tie rule and NaN --------------------------------------------------
def test_speed_duplicate_subcenters_tie_to_the_first():
    """K = 3 identical copies of every class row: each kept class cosine is a 3-way tie, won by k = 0,
    so the speed path gives the K = 1 loss and only sub-center 0 of each class gets gradient
    (exact zeros elsewhere), curricular modulation included."""
    spec1, _ = FAMILIES["arcface"]
    x, w, y, grads = make_case(21, 40, 40, seed=60, ignored=(3,))
    x, w = x.float(), w.float()
    extras = (None, torch.linspace(-0.2, 0.3, 21, device=DEV), torch.tensor(0.2, device=DEV))
    r1, (gx1, gw1), _ = fused_speed(x, w, y, spec1, -1, None, grads, extras)
    r3, (gx3, gw3), _ = fused_speed(x, w.repeat_interleave(3, dim=0), y, spec1.with_subcenters(3), -1, None, grads,
                                    extras)
    gw3 = gw3.view(40, 3, 40)
    assert torch.all(gw3[:, 1:] == 0) and gw3[:, 0].abs().max() > 0
    for u, v in zip(r3 + (gx3, gw3[:, 0]), r1 + (gx1, gw1)):
        assert rel(u, v) <= 1e-6


def test_speed_nan_subcenter_row_reaches_every_row(monkeypatch):
    """A NaN in a non-winning sub-center row of class 5: the kept cosines' max keeps the NaN, so
    every lse is NaN (as the oracle), and the backward's gradients of every row are NaN too."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, w, y, grads, spec, lam, extras = feature_case("subcenter_adaface_curricular", 13, 20, 40, seed=61,
                                                     ignored=(4,))
    y[6] = 5
    w[5 * 3 + 2, 7] = float("nan")
    rows, (gx, _), _ = fused_speed(x.float(), w.float(), y, spec, -1, lam, grads, extras)
    ref_rows, _ = oracle(x, w, y, spec, -1, lam, grads, extras)
    assert torch.isnan(rows[0]).all() and torch.isnan(ref_rows[0]).all()
    assert torch.equal(torch.isnan(rows[1]), torch.isnan(ref_rows[1]))
    assert torch.isnan(gx).any(1).all()


# ---- memory: the flat path's bound plus the kept matrix -------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_speed_memory_is_flat_plus_the_kept_products(monkeypatch, precision):
    """The speed path's extra peak memory over the flat path's, at the flat suite's memory shape:
    the kept B×C fp32 products and C fp32 norms (docs/cuda.md, "Two paths"), give or take the
    B×N tiles the speed path does not allocate and 256 KiB of small allocations."""
    B, D, (_, C), chunk = flat.MEMORY_CASE
    if chunk:
        monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))
    N = flat._ext.fused_chunk_columns(B, C, DEV.type)
    peaks = {}
    for path in ("flat", "speed"):
        monkeypatch.setenv("MAGLOSS_PATH", path)
        peaks[path] = flat._extra_peak_bytes(B, C, D, precision)
    kept = B * C * 4 + C * 4
    more = peaks["speed"] - peaks["flat"]
    assert kept - 2 * B * N * 4 - 2 ** 18 <= more <= kept + 2 ** 18, (peaks, kept)
