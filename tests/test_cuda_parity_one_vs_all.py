"""Parity of the fused engine's one-vs-all kernels (csrc/onevsall.cu, csrc/one_vs_all.inc) with the
float64 re-implementations of the upstream heads (tests/test_one_vs_all.py).

One suite, two backends (tests/_backend.py), as tests/test_cuda_parity.py: ``gpu`` (magloss._C on a
CUDA device, marked ``gpu``) and ``emu`` (the same sources under the CPU emulator, registered as the
one-vs-all ops' "cpu" kernels for this module only; the emulator reports races, out-of-bounds
accesses and undefined warp collectives as errors). Every loss (SFace, UniFace, SphereFace2 with
its three margin types, P2SGrad) runs through its module (magloss.registry.LOSSES), so the
functional layer, the op and the registered kernel are all on the path.

Oracle: tests/test_one_vs_all.py's upstream heads in float64 on the same inputs (for fp16/bf16: on
the inputs rounded to that dtype), autograd for the gradients, the learnable bias's included.
Tolerances (tests/cases.py, docs/cuda.md): fp32 rows rel ≤ 1e-5, gradients rel ≤ 1e-4; fp16/bf16:
error ≤ 2 × an eager same-precision baseline's (the upstream math on a cosine matrix from a matmul
in that dtype) + a floor; the plain-fp32 (SIMT) products on half inputs: fp32 math on the rounded
inputs, gradients within 2 eps of the dtype.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism (repeatability test)

import magloss  # noqa: E402
import magloss.functional as MF  # noqa: E402
from magloss import _ext  # noqa: E402
from magloss import onevsall as OVA  # noqa: E402

import _backend  # noqa: E402

try:
    BACKEND = _backend.select()
except _backend.Unavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)
if not hasattr(BACKEND.engine, "one_vs_all"):
    pytest.skip("the compiled extension predates the one-vs-all kernels: rebuild it", allow_module_level=True)

import cases  # noqa: E402
import test_one_vs_all as TOVA  # noqa: E402  (the upstream heads, their hyperparameter table)
from _parity_common import tf32  # noqa: E402
from cases import FUSED_FP32_GRADS_REL, FUSED_FP32_ROWS_REL, LOWP_FACTOR, LOWP_FLOOR, ROUNDED_GRADS_EPS, rel  # noqa: E402

GPU = BACKEND.name == "gpu"
EMU = not GPU
DEV = BACKEND.device
pytestmark = pytest.mark.gpu if GPU else []
OPS = (OVA.one_vs_all, OVA._backward_op)
CASES, IDS = TOVA.CASES, TOVA.IDS

_disabled = None  # emu: the never-exited "off" state of the ops' emulated cpu kernels outside this module


def _kernels(enabled: bool) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for op in OPS:
        stack.enter_context(op.set_kernel_enabled("cpu", enabled))
    return stack


@pytest.fixture(scope="module", autouse=True)
def _routed():
    """emu: the one-vs-all ops' CPU kernels are the emulated engine within this module (gpu: they
    are magloss._C's for "cuda" since import)."""
    global _disabled
    if GPU:
        yield
        return
    # The margin ops' emulated kernels too, as tests/test_cuda_parity.py routes them: their registration
    # is what makes "cpu" a fused-engine device (magloss._ext._ENGINES), switched off outside.
    with BACKEND.routed():
        if _disabled is None:
            assert _ext.register_one_vs_all_kernels(*OPS, engine=BACKEND.engine, device_type="cpu")
            _disabled = _kernels(False)
        with _kernels(True):
            yield


@pytest.fixture(autouse=True)
def _clean_backend(request):
    """As tests/test_cuda_parity.py: a schedule from the test's name, one intra-op thread, and any
    late input-check failure or emulator error reported against this test."""
    threads = torch.get_num_threads()
    BACKEND.start_test(request.node.nodeid)
    if EMU:
        torch.set_num_threads(1)
    with tf32(False):   # strict fp32 products (a GPU's TF32 would be another precision path)
        yield
    torch.set_num_threads(threads)
    BACKEND.synchronize()
    magloss.flush_input_checks()
    assert BACKEND.kernel_error() is None, BACKEND.kernel_error()


# ---- the fused run and the oracle -----------------------------------------------------------------------
def _module(name, mkw, D, C, dtype=torch.float32):
    return TOVA._module(name, D, C, dtype=dtype, reduction="none", **mkw).to(DEV)


def fused_run(m, x, y, g, weight=None, autocast=None):
    """Rows [B] (reduction 'none') and (∂x, ∂W, ∂b or None) of Σ_i g_i·L_i through the module
    (under torch.autocast to the dtype ``autocast`` if given), on the module's device."""
    dev = m.weight.device
    xg = x.detach().clone().to(dev).requires_grad_()
    if weight is not None:
        with torch.no_grad():
            m.weight.copy_(weight)
    for p in m.parameters():
        p.grad = None
    with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
        rows = m(xg, y.to(dev))
    (rows * g.to(dev)).sum().backward()
    gb = None if m.bias is None else m.bias.grad
    return rows.detach(), (xg.grad, m.weight.grad, gb)


def oracle(name, ukw, x, w, b, y, g, ignore_index=-1):
    """float64 upstream rows on the kept rows (0 on ignored ones) and the gradients of Σ_i g_i·L_i."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    b64 = None if b is None else b.detach().double().cpu().requires_grad_()
    y, g = y.cpu(), g.double().cpu()
    keep = y != ignore_index
    up = TOVA._upstream_rows(name, x64[keep], w64, y[keep], b64, ukw)
    rows = torch.zeros(x.shape[0], dtype=torch.float64).masked_scatter(keep, up.detach())
    leaves = [t for t in (x64, w64, b64) if t is not None]
    grads = torch.autograd.grad((up * g[keep]).sum(), leaves)
    return rows, (grads[0], grads[1], grads[2] if b is not None else None)


def inputs(B, C, D, seed, ignored=()):
    x, w, y = cases.make_inputs(B, C, D, dtype=torch.float32, ignored=ignored, seed=seed)
    g = torch.rand(B, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    return x, w, y, g


def check_fp32(name, mkw, ukw, B, C, D, seed, ignored=()):
    x, w, y, g = inputs(B, C, D, seed, ignored)
    m = _module(name, mkw, D, C)
    rows, grads = fused_run(m, x, y, g, w)
    ref_rows, ref_grads = oracle(name, ukw, x, w, m.bias, y, g)
    assert rows.dtype == torch.float32
    e = rel(rows.cpu(), ref_rows)
    assert e <= FUSED_FP32_ROWS_REL, f"{name} rows: rel error {e:.3g}"
    for what, got, want in zip(("grad_embeddings", "grad_weight", "grad_bias"), grads, ref_grads):
        assert (got is None) == (want is None), what
        if want is not None:
            e = rel(got.cpu(), want.reshape(got.shape))
            assert e <= FUSED_FP32_GRADS_REL, f"{name} {what}: rel error {e:.3g}"
    return rows, grads


# ---- fp32: every loss, irregular shapes, ignored rows, several chunks ---------------------------------------
#: (B, C, D, MAGLOSS_CHUNK or None, ignored rows): one chunk; full chunks of more columns than threads
#: per block (a thread visits two) and a ragged last one; more rows than one block of the bias sum.
SHAPES = [(11, 13, 7, None, (2, 9)), (6, 700, 33, "300", (0,)), (261, 5, 3, None, (7, 100, 260))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d-C%d-D%d-chunk%s" % s[:4])
@pytest.mark.parametrize("name,mkw,ukw", CASES, ids=IDS)
def test_fp32_parity(monkeypatch, name, mkw, ukw, shape):
    B, C, D, chunk, ignored = shape
    if chunk is not None:
        monkeypatch.setenv("MAGLOSS_CHUNK", chunk)
    rows, grads = check_fp32(name, mkw, ukw, B, C, D, seed=B + C, ignored=ignored)
    assert not rows[list(ignored)].any() and not grads[0][list(ignored)].any()


def test_ops_run_the_fused_kernels():
    """The module path reaches the fused kernels (emu: a launch of each made to fail fails the call)."""
    if GPU:
        pytest.skip("the emulator's launch-failure control")
    ctl = BACKEND._emu.controls()
    x, w, y, g = inputs(4, 6, 5, seed=1)
    m = _module("uniface", {}, 5, 6)
    for kernel in ("ova_forward_kernel", "ova_backward_kernel<float>", "ova_bias_sum_kernel"):
        ctl.emu_fail_next_launch(kernel.encode())
        with pytest.raises(RuntimeError):
            fused_run(m, x, y, g, w)
        BACKEND._emu.reset()


def test_bitwise_repeatable_across_block_orders(monkeypatch):
    """Fixed-order sums: two block/thread visiting orders give the same bits (bias gradient included)."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "64")
    x, w, y, g = inputs(9, 150, 17, seed=4, ignored=(3,))
    m = _module("sphereface2", {}, 17, 150)
    out = []
    for seed in (1, 2):
        BACKEND.reorder(seed)
        out.append(fused_run(m, x, y, g, w))
    (r1, g1), (r2, g2) = out
    assert torch.equal(r1, r2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_float64_runs_the_chunked_engine():
    """float64 inputs are routed to the chunked engine by the registered kernel (as margin_ce's)."""
    name, mkw, ukw = CASES[2]
    x, w, y, g = inputs(7, 9, 5, seed=6, ignored=(1,))
    m = _module(name, mkw, 5, 9, dtype=torch.float64)
    rows, grads = fused_run(m, x.double(), y, g, w.double())
    ref_rows, ref_grads = oracle(name, ukw, x, w, m.bias, y, g)
    torch.testing.assert_close(rows.cpu(), ref_rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[2].cpu(), ref_grads[2].reshape(1), rtol=1e-9, atol=1e-12)


# ---- fp16 / bf16, the autocast pair, the SIMT products -----------------------------------------------------
def _lowp_cos(dt):
    def cos(x, w):   # the cosine matrix from a matmul in dt, the rest of the upstream math in fp32
        return (F.normalize(x.to(dt), dim=1) @ F.normalize(w.to(dt), dim=1).t()).float()
    return cos


def eager_lowp(monkeypatch, name, ukw, x, w, b, y, g, dt):
    """The eager same-precision baseline: rows and gradients (autograd) of the upstream head with
    the cosines from a dt matmul (leaves in dt: their gradients are rounded to dt, as the fused ones)."""
    monkeypatch.setattr(TOVA, "_cos", _lowp_cos(dt))
    xd = x.to(dt).float().requires_grad_()
    wd = w.to(dt).float().requires_grad_()
    bd = None if b is None else b.detach().float().cpu().requires_grad_()
    keep = y != -1
    up = TOVA._upstream_rows(name, xd[keep], wd, y[keep], bd, ukw)
    grads = torch.autograd.grad((up * g[keep]).sum(), [t for t in (xd, wd, bd) if t is not None])
    monkeypatch.undo()
    rows = torch.zeros(x.shape[0]).masked_scatter(keep, up.detach())
    return rows, (grads[0].to(dt), grads[1].to(dt), grads[2].to(b.dtype) if b is not None else None)


def assert_within_eager(pairs, what):
    for nm, got, base, ref in pairs:
        e_fused, e_eager = cases.abs_err(got, ref), cases.abs_err(base, ref)
        out_eps = torch.finfo(got.dtype).eps / 2 if got.dtype in (torch.float16, torch.bfloat16) else 0.0
        floor = max(LOWP_FLOOR, out_eps) * ref.abs().max().item()
        assert e_fused <= LOWP_FACTOR * e_eager + floor, (
            f"{what} {nm}: fused error {e_fused:.3g} > 2 x eager {e_eager:.3g} (+{floor:.2g})")


LOWP = [("fp16", torch.float16, torch.float16), ("bf16", torch.bfloat16, torch.bfloat16),
        ("fp16-fp32w", torch.float16, torch.float32), ("bf16-fp32w", torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("dtypes", LOWP, ids=[t[0] for t in LOWP])
@pytest.mark.parametrize("name,mkw,ukw", CASES, ids=IDS)
def test_half_precision_within_eager(monkeypatch, name, mkw, ukw, dtypes):
    """fp16/bf16 embeddings with a same-dtype W, and the autocast pair (a float32 W rounded to the
    embeddings' dtype by the engine, its gradient float32)."""
    _, dt, wdt = dtypes
    monkeypatch.setenv("MAGLOSS_CHUNK", "40")
    B, C, D = 13, 97, 24
    x, w, y, g = inputs(B, C, D, seed=7, ignored=(5,))
    xr, wr = x.to(dt).float(), w.to(dt).float()          # what the engine computes on
    m = _module(name, mkw, D, C, dtype=wdt)
    rows, grads = fused_run(m, x.to(dt), y, g, w.to(wdt), autocast=dt if wdt != dt else None)
    assert rows.dtype == torch.float32 and grads[0].dtype == dt and grads[1].dtype == wdt
    ref_rows, ref_grads = oracle(name, ukw, xr, wr, m.bias, y, g)
    base_rows, base_grads = eager_lowp(monkeypatch, name, ukw, xr, wr, m.bias, y, g, dt)
    pairs = [("rows", rows.cpu(), base_rows, ref_rows), ("grad_embeddings", grads[0].cpu(), base_grads[0], ref_grads[0]),
             ("grad_weight", grads[1].cpu().to(dt), base_grads[1], ref_grads[1])]
    if m.bias is not None:
        pairs.append(("grad_bias", grads[2].cpu(), base_grads[2], ref_grads[2].reshape(1)))
    assert_within_eager(pairs, f"{name} {dtypes[0]}")


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,mkw,ukw", [c for c in CASES if c[0] in ("uniface", "sphereface2")][:2])
def test_simt_products_are_fp32_math_on_rounded_inputs(monkeypatch, name, mkw, ukw, dt):
    """MAGLOSS_FORCE_SIMT (a GPU without tensor cores): fp32 products of the rounded inputs, so the
    rows as fp32 and the gradients within 2 eps of the dtype (one rounding on output)."""
    monkeypatch.setenv("MAGLOSS_FORCE_SIMT", "1")
    x, w, y, g = inputs(10, 23, 9, seed=9, ignored=(4,))
    xr, wr = x.to(dt).float(), w.to(dt).float()
    m = _module(name, mkw, 9, 23, dtype=dt)
    rows, grads = fused_run(m, x.to(dt), y, g, w.to(dt))
    ref_rows, ref_grads = oracle(name, ukw, xr, wr, m.bias, y, g)
    assert rel(rows.cpu(), ref_rows) <= FUSED_FP32_ROWS_REL
    eps = torch.finfo(dt).eps
    assert rel(grads[0].cpu(), ref_grads[0]) <= ROUNDED_GRADS_EPS * eps
    assert rel(grads[1].cpu(), ref_grads[1]) <= ROUNDED_GRADS_EPS * eps
    assert rel(grads[2].cpu(), ref_grads[2].reshape(1)) <= ROUNDED_GRADS_EPS * eps   # a bias parameter in dt


# ---- checks and the NaN policy: as the chunked op -------------------------------------------------------------
def _default(fn):
    """fn() on the ops' default (chunked) CPU kernel; gpu: on CPU copies."""
    if GPU:
        return fn("cpu")
    with _kernels(False):
        return fn(DEV)


BAD_ARGS = [
    ("kind", lambda x, w, y, b: (x, w, y, None, 7, [1.0], -1), "kind: expected one of"),
    ("params", lambda x, w, y, b: (x, w, y, None, OVA.SFACE, [64.0, 80.0], -1), "params: SFace expects 4"),
    ("bias-missing", lambda x, w, y, b: (x, w, y, None, OVA.UNIFACE, [64.0, 0.4, 1.0], -1), "bias: UniFace needs"),
    ("bias-extra", lambda x, w, y, b: (x, w, y, b, OVA.P2SGRAD, [0.1], -1), "bias: P2SGrad takes no bias"),
    ("bias-shape", lambda x, w, y, b: (x, w, y, b.repeat(2), OVA.UNIFACE, [64.0, 0.4, 1.0], -1), "bias: expected"),
]


@pytest.mark.parametrize("what,args,match", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_op_arguments_same_errors_as_the_chunked_op(what, args, match):
    x, w, y, _ = inputs(3, 4, 5, seed=2)
    b = torch.tensor([1.0])

    def call(dev):
        with pytest.raises(ValueError, match=match) as info:
            OVA.one_vs_all(*args(x.to(dev), w.to(dev), y.to(dev), b.to(dev)))
        return str(info.value)

    assert call(DEV) == _default(call)


@pytest.mark.parametrize("where", ["label", "embedding", "weight"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bad_values_same_error_as_the_chunked_op(monkeypatch, mode, where):
    """A label out of range, a NaN embedding, an Inf in W: the chunked op's ValueError (the fused one
    raised in the call with 'sync', by flush_input_checks with 'async', marked as reported late)."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", mode)
    x, w, y, _ = inputs(5, 6, 4, seed=3)
    if where == "label":
        y[3] = 6
    elif where == "embedding":
        x[2, 1] = float("nan")
    else:
        w[4, 0] = float("inf")
    m = _module("sface", {}, 4, 6)

    def call(dev):
        with pytest.raises(ValueError) as info:
            m.to(dev)
            with torch.no_grad():
                m.weight.copy_(w)
            m(x.to(dev), y.to(dev))
            magloss.flush_input_checks()
        return str(info.value)

    want = _default(call)
    got = call(DEV)
    assert want in got and {"label": "labels", "embedding": "embeddings", "weight": "weight"}[where] in got


@pytest.mark.parametrize("where", ["embedding", "weight"])
@pytest.mark.parametrize("name", TOVA.NAMES)
def test_nan_with_checks_off_as_the_chunked_op(monkeypatch, name, where):
    """MAGLOSS_CHECK_INPUTS=off: a NaN reaches the same rows and gradient entries as in the chunked op
    (tests/test_nan.py's rule: a NaN class j reaches every row and ∂x, but only ∂w_j)."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, w, y, g = inputs(6, 7, 5, seed=5, ignored=(1,))
    if where == "embedding":
        x[2, 3] = float("nan")
    else:
        w[4, 1] = float("nan")
    mkw = next(c[1] for c in CASES if c[0] == name)
    rows, grads = fused_run(_module(name, mkw, 5, 7), x, y, g, w)
    want_rows, want_grads = _default(lambda dev: fused_run(_module(name, mkw, 5, 7).to(dev), x, y, g, w))
    for got, want in zip((rows, *grads), (want_rows, *want_grads)):
        if want is None:
            continue
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want.cpu()))
        ok = ~torch.isnan(want.cpu())
        torch.testing.assert_close(got.cpu()[ok], want.cpu()[ok], rtol=1e-4, atol=1e-5)
    assert torch.isnan(rows[1]).logical_not() and rows[1] == 0


def test_bad_label_rows_are_nan_and_add_no_gradient(monkeypatch):
    """Checks off: a label out of range gives that row NaN (the margin engine's rule), reads and
    writes nothing out of bounds and adds nothing to any gradient, even with an incoming gradient."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, w, y, g = inputs(6, 7, 5, seed=8)
    ybad = y.clone()
    ybad[2] = 7
    ok = torch.arange(6) != 2
    b = torch.tensor([-3.0])
    args = (x.to(DEV), w.to(DEV), ybad.to(DEV), b.to(DEV), OVA.SPHEREFACE2, list(OVA.sphereface2_params(
        40.0, 0.4, 3.0, 0.7, 50.0, "C")), -1)
    rows = OVA.one_vs_all(*args)[0]
    gx, gw, gb = OVA._backward_op(g.to(DEV), *args)
    ref_rows, ref_grads = oracle("sphereface2", {}, x[ok], w, b, y[ok], g[ok])
    assert torch.isnan(rows[2]) and rel(rows[ok].cpu(), ref_rows) <= FUSED_FP32_ROWS_REL
    assert not gx[2].any()
    for got, want in ((gx[ok], ref_grads[0]), (gw, ref_grads[1]), (gb, ref_grads[2].reshape(1))):
        assert rel(got.cpu(), want) <= FUSED_FP32_GRADS_REL


# ---- shapes and layouts the boundary handles itself ---------------------------------------------------------
def test_empty_batch():
    m = _module("uniface", {}, 5, 6)
    x = torch.zeros(0, 5, device=DEV, requires_grad=True)
    rows = m(x, torch.zeros(0, dtype=torch.long, device=DEV))
    assert rows.shape == (0,)
    rows.sum().backward()
    assert x.grad.shape == (0, 5) and not m.weight.grad.any() and not m.bias.grad.any()


def test_non_contiguous_inputs_are_accepted():
    """Transposed views of x and W (the boundary copies them once) and int32 labels."""
    name, mkw, ukw = CASES[4]
    x, w, y, g = inputs(8, 19, 6, seed=12, ignored=(6,))
    xt = x.t().contiguous().to(DEV).t().requires_grad_()
    wt = w.t().contiguous().to(DEV).t().requires_grad_()
    b = torch.tensor([-2.5], device=DEV, requires_grad=True)
    params = list(OVA.sphereface2_params(40.0, 0.4, 3.0, 0.7, 50.0, "C"))
    assert not xt.is_contiguous() and not wt.is_contiguous()
    rows = OVA.one_vs_all(xt, wt, y.int().to(DEV), b, OVA.SPHEREFACE2, params, -1)[0]
    (rows * g.to(DEV) * (y != -1).to(DEV)).sum().backward()
    ref_rows, ref_grads = oracle(name, ukw, x, w, b, y, g)
    ok = y != -1
    assert rel(rows.detach().cpu()[ok], ref_rows[ok]) <= FUSED_FP32_ROWS_REL
    for got, want in zip((xt.grad, wt.grad, b.grad), ref_grads):
        assert rel(got.cpu(), want.reshape(got.shape)) <= FUSED_FP32_GRADS_REL


# ---- the side outputs: the block arg-max next to the row sum --------------------------------------------
def _side_check(m, x, w, y):
    """The op with and without ``side`` on the module's loss: the rows are the same bits, the side
    outputs those of the float64 cosine matrix (tests/test_side_outputs.py), the weight as the math
    sees it (rounded to the embeddings' dtype). Returns the side outputs."""
    from types import SimpleNamespace

    from test_side_outputs import assert_parts

    bias = None if m.bias is None else m.bias.detach()
    args = (x, w, y, bias, m._kind, list(m.params), -1)
    plain, outs = OVA.one_vs_all(*args), OVA.one_vs_all(*args, True)
    torch.testing.assert_close(plain[0], outs[0], rtol=0, atol=0)       # the flag leaves the sums alone
    assert all(t.numel() == 0 for t in plain[1:]) and all(t.shape == (x.shape[0],) for t in outs[1:])
    fields = magloss.LossParts._fields[5:]
    yc = y.cpu()
    parts = SimpleNamespace(**dict(zip(fields, MF.side_parts(yc, yc != -1, *(t.cpu() for t in outs[1:])))))
    assert_parts(parts, x.cpu(), w.to(x.dtype).cpu(), yc)
    return outs[1:]


@pytest.mark.parametrize("dtypes", [("fp32", torch.float32, torch.float32)] + LOWP, ids=lambda t: t[0])
@pytest.mark.parametrize("name,mkw,ukw", CASES, ids=IDS)
def test_fused_side_outputs_of_every_loss(monkeypatch, name, mkw, ukw, dtypes):
    monkeypatch.setenv("MAGLOSS_CHUNK", "16")                       # 37 classes: three chunks, the last short
    _, xdt, wdt = dtypes
    x, w, y, _ = inputs(9, 37, 8, seed=7, ignored=(2, 5))
    m = _module(name, mkw, 8, 37)
    _side_check(m, x.to(DEV, xdt), w.to(DEV, wdt), y.to(DEV))


@pytest.mark.parametrize("name", TOVA.NAMES)
def test_fused_side_ties_across_threads_warps_and_chunks(monkeypatch, name):
    """tests/test_side_outputs_cuda.py's exact case: 1200 classes in chunks of 512 (a block of 256
    threads visits a column every 256); row 0's maximum is tied at classes 900 (chunk 1), 200 (warp 6)
    and 33 (warp 1): 33; row 1's label 700 ties its negatives 1100 and 690: nearest 690, predicted
    690 (the lower); row 2's only maximum is the last class; row 3 (ignored) ties 1000 and 513: 513."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "512")
    C, D = 1200, 5
    basis = 2.0 * torch.eye(D)
    w = basis[4].repeat(C, 1)
    for cols, e in (([900, 200, 33], 0), ([700, 1100, 690], 1), ([1199], 2), ([1000, 513], 3)):
        w[cols] = basis[e]
    x = torch.eye(D)[:4] * 4.0
    y = torch.tensor([5, 700, 9, -1])
    side = _side_check(_module(name, {}, D, C), x.to(DEV), w.to(DEV), y.to(DEV))
    assert side[2].tolist() == [33, 690, 1199, 513]
    assert side[1].tolist() == [1.0, 1.0, 1.0, 1.0] and side[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert MF.side_parts(y, y != -1, *(t.cpu() for t in side))[3].tolist() == [33, 690, 1199, 513]


@pytest.mark.parametrize("chunk", ["3", "20"])
def test_fused_side_label_ties_and_exclusion(monkeypatch, chunk):
    """tests/test_side_outputs.py's exact case: the label column is never the nearest negative, even
    when it is the row's maximum (rows 1 and 2 tie their label); ties across chunks go to the lowest."""
    from test_side_outputs import _exact_case

    monkeypatch.setenv("MAGLOSS_CHUNK", chunk)
    x, w, y = _exact_case()
    side = _side_check(_module("uniface", {}, 5, 20), x.float().to(DEV), w.float().to(DEV), y.to(DEV))
    assert side[2].tolist() == [3, 9, 2, 19, 3]
    assert MF.side_parts(y, y != -1, *(t.cpu() for t in side))[3].tolist() == [3, 5, 2, 19, 3]


def test_fused_side_one_class_and_empty_batch():
    """C = 1: a labelled row has no negative class (−inf, −1), an ignored row's nearest is class 0;
    B = 0: empty side outputs."""
    x, w, _, _ = inputs(3, 1, 5, seed=5)
    y = torch.tensor([0, -1, 0])
    m = _module("p2sgrad", {}, 5, 1)
    side = _side_check(m, x.to(DEV), w.to(DEV), y.to(DEV))
    assert side[2].tolist() == [-1, 0, -1] and side[1][0] == -torch.inf == side[1][2]
    empty = OVA.one_vs_all(x[:0].to(DEV), w.to(DEV), y[:0].to(DEV), None, m._kind, list(m.params), -1, True)
    assert all(t.shape == (0,) for t in empty)


def test_fused_side_outputs_through_the_module():
    """return_parts on the fused engine: the same loss, the side fields, parts_accuracy = accuracy."""
    x, w, y, _ = inputs(10, 21, 8, seed=3, ignored=(4,))
    m = _module("sphereface2", {}, 8, 21)
    m.reduction = "mean"
    with torch.no_grad():
        m.weight.copy_(w)
    x, y = x.to(DEV), y.to(DEV)
    parts = m(x, y, return_parts=True)
    torch.testing.assert_close(parts.loss, m(x, y), rtol=0, atol=0)
    from test_side_outputs import assert_parts

    assert_parts(parts, x.cpu(), w, y.cpu())
    assert float(MF.parts_accuracy(parts, y)) == float(m.accuracy(x, y))


# ---- a sharded head: each rank runs the op on its shard (gloo, two spawned ranks) --------------------------
SHARD_B, SHARD_C, SHARD_D, SHARD_SPLIT = 9, 301, 7, (5, 4)


def _shard_data():
    x, w, y, g = inputs(SHARD_B, SHARD_C, SHARD_D, seed=31, ignored=(3,))
    return x, w, y


def _sharded_worker(rank, world, out_dir):
    """One UniFace step of the sharded head on this rank's rows, through the fused kernels."""
    import os

    x, w, y = _shard_data()
    routed = GPU
    if EMU:
        _ext.register_one_vs_all_kernels(*OPS, engine=BACKEND.engine, device_type="cpu")
        torch.set_num_threads(1)
        BACKEND._emu.controls().emu_fail_next_launch(b"ova_forward_kernel")   # proof that the op runs the kernel
        try:
            OVA.one_vs_all(x, w, y, None, OVA.P2SGRAD, [1.0], -1)
        except RuntimeError:
            routed = True
        BACKEND._emu.reset()
    single = TOVA._module("uniface", SHARD_D, SHARD_C, dtype=torch.float32).to(DEV)   # reduction 'mean'
    with torch.no_grad():
        single.weight.copy_(w)
    head = magloss.distributed.shard(single, ddp_backbone=False)
    lo = sum(SHARD_SPLIT[:rank])
    xr = x[lo:lo + SHARD_SPLIT[rank]].clone().to(DEV).requires_grad_()
    loss = head(xr, y[lo:lo + SHARD_SPLIT[rank]].to(DEV))
    loss.backward()
    magloss.flush_input_checks()
    err = BACKEND.kernel_error()
    torch.save(dict(loss=loss.detach().cpu(), gx=xr.grad.cpu(), gw=head.weight.grad.cpu(), gb=head.bias.grad.cpu(),
                    start=head.shard_start, end=head.shard_end, bias=single.bias.detach().cpu(), error=err,
                    routed=routed),
               os.path.join(out_dir, f"r{rank}.pt"))


@pytest.mark.skipif(GPU, reason="an emulated check: the gloo ranks run on CPU tensors")
def test_sharded_head_runs_the_fused_kernels_per_shard(tmp_path):
    from _dist_utils import spawn

    spawn(_sharded_worker, 2, tmp_path, str(tmp_path))
    got = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    x, w, y = _shard_data()
    keep = y != -1
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = got[0]["bias"].double().requires_grad_()
    loss = TOVA._upstream_rows("uniface", x64[keep], w64, y[keep], b64, {}).mean()
    gx, gw, gb = torch.autograd.grad(loss, (x64, w64, b64))
    assert got[0]["end"] == got[1]["start"] and got[1]["end"] == SHARD_C
    for r, out in enumerate(got):
        assert out["error"] is None, out["error"]
        assert out["routed"]
        lo = sum(SHARD_SPLIT[:r])
        assert rel(out["loss"], loss.detach()) <= FUSED_FP32_ROWS_REL
        assert rel(out["gx"], gx[lo:lo + SHARD_SPLIT[r]]) <= FUSED_FP32_GRADS_REL
        assert rel(out["gw"], gw[out["start"]:out["end"]]) <= FUSED_FP32_GRADS_REL
        assert rel(out["gb"], gb) <= FUSED_FP32_GRADS_REL
