"""Parity of the fused engine (csrc/: the torch boundary and the CUDA kernels) with the reference.

One suite, two backends:

* ``gpu``: the compiled extension magloss._C on a CUDA device (every test is marked ``gpu``;
  tests/gpu_check.sh runs them);
* ``emu`` (wherever no GPU is visible, so in CI): the same sources, boundary included, built
  against the CPU build of torch with the kernels under the CPU emulator (tests/emu/build.py), and
  registered as the ops' "cpu" kernels through magloss._ext.register_kernels, as magloss._C is for
  "cuda". The emulator reports data races, out-of-bounds accesses and undefined behaviour of the
  warp collectives as errors (a RuntimeError from the op). Each test runs under one block/thread
  visiting order (ascending, descending or random), picked from a hash of its name: seeded and
  reproducible. The heaviest shapes are smaller on the emulator (LARGE, LOWP_CASES).

Skipped as a whole (never a collection error) only when neither backend can run: no GPU and no
g++ or CUDA headers for the emulator, or a GPU without the compiled extension.

Oracle: :func:`magloss.reference.margin_ce_rows` and :func:`magloss.reference.margin_ce_backward`
in float64 on the same inputs (for fp16/bf16: on the inputs rounded to that dtype).
"rel" error = max |fused − oracle| / max |oracle| over the whole tensor.

Tolerances (docs/cuda.md):
* fp32, TF32 off: per-row loss and row statistics rel ≤ 1e-5, gradients rel ≤ 1e-4;
* TF32, fp16, bf16: error vs float64 ≤ 2 × the error of an eager same-precision baseline
  (+ a tiny floor), the baseline being the reference math with the cosine matrix computed
  by a matmul in that precision and the margin/softmax in fp32, differentiated by autograd.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism (repeatability test)

import magloss  # noqa: E402
from magloss import _ext, reference  # noqa: E402
from magloss.margins import MarginSpec  # noqa: E402

# The device (tests/_backend.py): every device-specific call of this suite goes through BACKEND.
import _backend  # noqa: E402

try:
    BACKEND = _backend.select()
except _backend.Unavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)
GPU = BACKEND.name == "gpu"
EMU = not GPU
ENGINE = BACKEND.engine
pytestmark = pytest.mark.gpu if GPU else []

gpu_only = pytest.mark.skipif(EMU, reason="needs a real GPU (CUDA memory statistics, torch.cuda APIs)")

DEV = BACKEND.device
OP = torch.ops.magloss.margin_ce
OP_BWD = torch.ops.magloss.margin_ce_backward

# ---- families and inputs: tests/cases.py; oracle and assertions: tests/_parity_common.py -------------
import _parity_common  # noqa: E402
import cases  # noqa: E402
from cases import ALL, FAMILIES, rel  # noqa: E402
from _parity_common import (NO_EXTRAS, assert_fp32_parity, assert_rounded_fp32_parity,  # noqa: E402
                            assert_within_eager, eager_lowp, oracle, tf32)


def synchronize():
    """Wait for the device (the emulated stream has finished every launch when it returns)."""
    BACKEND.synchronize()


@pytest.fixture(scope="module", autouse=True)
def _backend_routed():
    """The ops run the backend's engine for this module (emu: the ops' CPU kernels, this module only)."""
    with BACKEND.routed():
        yield


@pytest.fixture(autouse=True)
def _no_pending_input_errors(request):
    """A clean backend per test (emu: a schedule from the test's name) and one intra-op thread
    (emu: idle OpenMP workers spin against the single-threaded emulator otherwise). An asynchronous
    input-check failure is reported against the test that caused it (a teardown error there),
    never raised inside a later test; so is a kernel error left behind on the emulator."""
    threads = torch.get_num_threads()
    BACKEND.start_test(request.node.nodeid)
    if EMU:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    synchronize()
    magloss.flush_input_checks()
    assert BACKEND.kernel_error() is None, BACKEND.kernel_error()


def make_case(*args, **kwargs):
    """cases.make_case on this suite's device."""
    return cases.make_case(*args, device=DEV, **kwargs)


def lam_tensor(lam):
    return cases.lam_tensor(lam, DEV)


def fused(x, w, y, spec, ii, lam, grads, extras=NO_EXTRAS):
    """The fused op and its backward op, called directly (float32 row statistics). extras: the
    optional (row_margins, neg_threshold, neg_t), float32 (the compute dtype) or None."""
    rows = OP(x, w, y, lam, *extras, *spec.op_args(ii))[:4]      # (the side outputs follow: off here)
    g32 = [g.float() for g in grads]
    gx, gw = OP_BWD(*g32, x, w, y, rows[0], rows[3], lam, *extras, *spec.op_args(ii))
    return rows, (gx, gw)


def check_fp32(x, w, y, spec, ii, lam_t, grads, what="", extras=NO_EXTRAS):
    """Fused op in strict fp32 (TF32 off) against the float64 oracle; returns the fused rows."""
    with tf32(False):
        rows, gr = fused(x.float(), w.float(), y, spec, ii, lam_t, grads, extras)
    ref_rows, ref_grads = oracle(x, w, y, spec, ii, lam_t, grads, extras)
    assert_fp32_parity(rows, gr, ref_rows, ref_grads, what)
    return rows


# ---- fp32 parity over families and shapes ---------------------------------------------------------
# Every value of each axis appears: B in {1, 3, 37, 128, 512}, C in {1, 7, 1000, 85742},
# D in {40, 64, 100, 512}. One chunk of 1000 columns is ~4 columns per thread of a 256-thread block;
# B = 128 and 512 are 16 and 64 blocks of the warp-per-row kernels; D = 100 is not a multiple of 32.
SMALL_SHAPES = [(1, 1, 64), (3, 7, 100), (128, 1000, 512), (512, 7, 64), (3, 1000, 100)]
# The class count of MS1MV2. On the emulator one shape, one family: its launches have ~10^4 blocks.
LARGE = ([(f, s) for f in ("arcface", "magface", "sphereface", "cosface") for s in ((512, 85742, 512), (1, 85742, 64))]
         if GPU else [("magface", (37, 85742, 40))])


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "B%d-C%d-D%d" % s)
@pytest.mark.parametrize("family", ALL)
def test_fp32_parity(family, shape):
    spec, lam = FAMILIES[family]
    B, C, D = shape
    x, w, y, grads = make_case(B, C, D, ignored=(1, 5, 77))
    lam_t = lam_tensor(lam)
    check_fp32(x, w, y, spec, -1, lam_t, grads, f"{family} {shape}")


@pytest.mark.parametrize("family,shape", LARGE, ids=lambda v: v if isinstance(v, str) else "B%d-C%d-D%d" % v)
def test_fp32_parity_large(family, shape):
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(*shape, seed=1, ignored=(0, 300))
    lam_t = lam_tensor(lam)
    check_fp32(x, w, y, spec, -1, lam_t, grads, f"{family} {shape}")


# Chunking: several chunks, a partial last chunk, labels in every chunk, C = 1 chunk of one column.
@pytest.mark.parametrize("chunk,C", [(256, 1000), (999, 1000), (1, 7), (7, 7), (1000, 1000), (300, 4099)] +
                         ([(4096, 85742)] if GPU else []))
@pytest.mark.parametrize("family", ["arcface", "sphereface", "magface"])
def test_chunking(monkeypatch, family, chunk, C):
    spec, lam = FAMILIES[family]
    monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))
    assert _ext.fused_chunk_columns(128, C, DEV.type) == min(chunk, C)
    x, w, y, grads = make_case(128, C, 100, seed=2, ignored=(3,))
    lam_t = lam_tensor(lam)
    check_fp32(x, w, y, spec, -1, lam_t, grads, f"{family} chunk={chunk} C={C}")


def test_default_chunk_bound():
    # 2^22 fp32 tile elements: 8192 columns at B = 512, at least 1024, never more than C.
    assert _ext.fused_chunk_columns(512, 85742, DEV.type) == 8192
    assert _ext.fused_chunk_columns(1, 85742, DEV.type) == 85742
    assert _ext.fused_chunk_columns(100000, 85742, DEV.type) == 1024
    assert _ext.fused_chunk_columns(512, 7, DEV.type) == 7


# ---- ignored rows, ignore_index, label dtypes -------------------------------------------------------
@pytest.mark.parametrize("ignore_index,ignored", [(-1, (0, 2)), (-100, (1,)), (0, ()), (-1, (0, 1, 2, 3, 4, 5, 6, 7))])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_ignored_rows(ignore_index, ignored, label_dtype):
    spec, lam = FAMILIES["magface"]
    x, w, y, grads = make_case(8, 1000, 64, seed=3, ignored=ignored, ignore_index=ignore_index,
                               label_dtype=label_dtype)
    rows = check_fp32(x, w, y, spec, ignore_index, None, grads, f"ignore_index={ignore_index}")
    no_label = y == ignore_index
    assert torch.all(rows[1][no_label] == 0)


def test_empty_batch():
    spec, _ = FAMILIES["arcface"]
    x = torch.zeros(0, 64, device=DEV)
    w = torch.randn(10, 64, device=DEV)
    y = torch.zeros(0, dtype=torch.long, device=DEV)
    rows = OP(x, w, y, None, None, None, None, *spec.op_args(-1))
    assert all(r.shape == (0,) and r.dtype == torch.float32 for r in rows[:4])
    z = torch.zeros(0, device=DEV)
    gx, gw = OP_BWD(z, z, z, z, x, w, y, rows[0], rows[3], None, None, None, None, *spec.op_args(-1))
    assert gx.shape == (0, 64) and torch.all(gw == 0) and gw.shape == (10, 64)


def test_float64_routes_to_the_chunked_engine():
    spec, _ = FAMILIES["arcface"]
    x, w, y, grads = make_case(16, 100, 64, seed=4)
    rows = OP(x, w, y, None, None, None, None, *spec.op_args(-1))
    ref = reference.margin_ce_rows(x, w, y, spec, -1)
    assert rows[0].dtype == torch.float64
    torch.testing.assert_close(rows[0], ref[0], rtol=1e-12, atol=1e-12)


# ---- reductions through the modules ---------------------------------------------------------------
# every registered loss with a margin (tests/cases.py), variants included; the stateful and sub-center ones
# as fresh modules: the same initial state, updated from the same batch
MODULES = {n: functools.partial(cases.build_loss, n, 100, 1000, **cases.loss_kwargs(n))
           for n in cases.LOSS_VARIANTS if n not in cases.NO_SPEC}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_reductions(name, reduction):
    torch.manual_seed(5)
    ref_mod = MODULES[name]().double()
    ref_mod.reduction = reduction
    gpu_mod = MODULES[name]().to(DEV, torch.float32)
    gpu_mod.reduction = reduction
    with torch.no_grad():
        gpu_mod.weight.copy_(ref_mod.weight)
    x64, _, y, _ = make_case(64, 1000, 100, seed=6, ignored=(2, 9))
    xr = x64.cpu().clone().requires_grad_()
    xg = x64.float().clone().requires_grad_()
    with tf32(False):
        lr = ref_mod(xr, y.cpu())
        lg = gpu_mod(xg, y)
    up = torch.linspace(0.5, 1.5, lr.numel(), dtype=torch.float64).reshape(lr.shape)
    (lr * up).sum().backward()
    (lg * up.to(DEV)).sum().backward()
    assert lg.dtype == torch.float32 and lg.shape == lr.shape
    assert rel(lg.cpu(), lr.detach()) <= 1e-5
    assert rel(xg.grad.cpu(), xr.grad) <= 1e-4
    assert rel(gpu_mod.weight.grad.cpu(), ref_mod.weight.grad) <= 1e-4


# ---- non-contiguous inputs: copied to contiguous at the boundary (documented), same bits ----------
def test_non_contiguous_inputs_are_accepted():
    spec, _ = FAMILIES["arcface"]
    x, w, y, grads = make_case(32, 500, 64, seed=7, ignored=(4,))
    x, w = x.float(), w.float()
    x_nc = x.t().contiguous().t()                  # transposed storage
    w_big = torch.zeros(500, 128, device=DEV)
    w_big[:, ::2] = w
    w_nc = w_big[:, ::2]                           # strided columns
    y_big = torch.stack([y, y], 1)
    y_nc = y_big[:, 0]                             # strided labels
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous() and not y_nc.is_contiguous()
    a = fused(x, w, y, spec, -1, None, grads)
    b = fused(x_nc, w_nc, y_nc, spec, -1, None, grads)
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)
    assert b[1][0].is_contiguous() and b[1][1].is_contiguous()


# ---- TF32 and half precision: error ≤ 2 × the eager same-precision baseline ------------------------
LOWP_CASES = [
    ("arcface", (128, 1000, 512)),
    ("magface", (37, 1000, 100)),
    ("sphereface", (3, 7, 100)),
    ("cosface", (1, 1, 64)),
] + ([("combined", (512, 85742, 512)), ("arcface", (512, 85742, 512))] if GPU else [])


@pytest.mark.parametrize("family,shape", LOWP_CASES, ids=lambda v: v if isinstance(v, str) else "B%d-C%d-D%d" % v)
@pytest.mark.parametrize("precision", ["tf32", "fp16", "bf16"])
def test_low_precision_vs_eager(precision, family, shape):
    spec, lam = FAMILIES[family]
    x64, w64, y, grads = make_case(*shape, seed=8, ignored=(1,))
    dt = {"tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    # The oracle sees the inputs rounded to the dtype: the error measured is the computation's.
    x64, w64 = x64.to(dt).double(), w64.to(dt).double()
    lam_t = lam_tensor(lam)
    ref_rows, ref_grads = oracle(x64, w64, y, spec, -1, lam_t, grads)
    eager_rows, eager_grads = eager_lowp(x64, w64, y, spec, -1, lam_t, grads, precision)
    with tf32(precision == "tf32"):
        rows, gr = fused(x64.to(dt), w64.to(dt), y, spec, -1, lam_t, grads)
    assert rows[0].dtype == torch.float32
    assert gr[0].dtype == dt and gr[1].dtype == dt
    pairs = [
        ("loss", rows[0] - rows[1], eager_rows[0] - eager_rows[1], ref_rows[0] - ref_rows[1]),
        ("grad_embeddings", gr[0], eager_grads[0], ref_grads[0]),
        ("grad_weight", gr[1], eager_grads[1], ref_grads[1]),
    ]
    assert_within_eager(pairs, f"{precision} {family} {shape}")


def test_autocast_bf16_module():
    mod = magloss.ArcFaceLoss(512, 1000).to(DEV)
    x64, _, y, _ = make_case(128, 1000, 512, seed=9)
    x = x64.float().requires_grad_()
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        loss = mod(x, y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert x.grad.dtype == torch.float32 and mod.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(mod.weight.grad).all()


# ---- the plain-fp32 (SIMT) path ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface"])
def test_forced_simt_path(monkeypatch, family, dtype):
    spec, lam = FAMILIES[family]
    monkeypatch.setenv("MAGLOSS_FORCE_SIMT", "1")
    assert ENGINE.simt_path(BACKEND.simt_device())
    x64, w64, y, grads = make_case(128, 3000, 100, seed=10, ignored=(0,))
    x64, w64 = x64.to(dtype).double(), w64.to(dtype).double()
    lam_t = lam_tensor(lam)
    ref_rows, ref_grads = oracle(x64, w64, y, spec, -1, lam_t, grads)
    with tf32(True):  # SIMT must switch TF32 off for its own products, and leave the setting alone
        before = torch.backends.cuda.matmul.allow_tf32
        rows, gr = fused(x64.to(dtype), w64.to(dtype), y, spec, -1, lam_t, grads)
        assert torch.backends.cuda.matmul.allow_tf32 == before
    if dtype == torch.float32:
        assert_fp32_parity(rows, gr, ref_rows, ref_grads, f"simt {family}")
    else:
        # fp32 math on the rounded inputs: row statistics as fp32; gradients only rounded on output.
        assert_rounded_fp32_parity(rows, gr, ref_rows, ref_grads, dtype)


# ---- bad inputs: same errors as the CPU reference; never out of bounds --------------------------------
def _bad_cases():
    x, w, y, _ = make_case(6, 10, 64, seed=11)
    x, w = x.float(), w.float()
    y_hi = y.clone(); y_hi[3] = 10
    y_neg = y.clone(); y_neg[2] = -5
    x_nan = x.clone(); x_nan[4, 7] = float("nan")
    w_inf = w.clone(); w_inf[8, 1] = float("inf")
    return {
        "label_too_large": (x, w, y_hi, ValueError, "labels: expected class indices in [0, 10)"),
        "label_negative": (x, w, y_neg, ValueError, "got -5 at row 2"),
        "nan_embeddings": (x_nan, w, y, ValueError, "embeddings: contains NaN or Inf (row 4)"),
        "inf_weight": (x, w_inf, y, ValueError, "weight: contains NaN or Inf (row 8)"),
    }


@pytest.mark.parametrize("path", ["flat", "speed"])
@pytest.mark.parametrize("case", ["label_too_large", "label_negative", "nan_embeddings", "inf_weight"])
def test_bad_inputs_same_errors_as_cpu(monkeypatch, case, path):
    """The fused engine's errors on either path are the chunked engine's, word for word."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sync")  # raise in the offending call, as the CPU
    monkeypatch.setenv("MAGLOSS_PATH", path)
    x, w, y, exc, msg = _bad_cases()[case]
    with pytest.raises(exc) as cpu_err, BACKEND.default_cpu_kernels():
        magloss.functional.arcface_loss(x.cpu(), w.cpu(), y.cpu())
    with pytest.raises(exc) as gpu_err:
        magloss.functional.arcface_loss(x, w, y)
    assert msg in str(gpu_err.value)
    assert str(cpu_err.value) == str(gpu_err.value)


def test_dtype_mismatch_is_a_type_error():
    spec, _ = FAMILIES["arcface"]
    x = torch.randn(4, 64, device=DEV)
    w = torch.randn(10, 64, device=DEV, dtype=torch.float16)
    y = torch.zeros(4, dtype=torch.long, device=DEV)
    with pytest.raises(TypeError, match="embeddings, weight: expected the same dtype"):
        OP(x, w, y, None, None, None, None, *spec.op_args(-1))
    with pytest.raises(TypeError, match="embeddings, weight"):
        magloss.functional.arcface_loss(x, w, y)


def test_shape_errors_name_the_argument():
    spec, _ = FAMILIES["arcface"]
    x = torch.randn(4, 64, device=DEV)
    w = torch.randn(10, 32, device=DEV)
    y = torch.zeros(4, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="embeddings"):
        OP(x, w, y, None, None, None, None, *spec.op_args(-1))
    with pytest.raises(ValueError, match="labels"):
        OP(x, torch.randn(10, 64, device=DEV), y[:3], None, None, None, None, *spec.op_args(-1))
    with pytest.raises(ValueError, match="sphere_lambda"):
        OP(x, torch.randn(10, 64, device=DEV), y, None, None, None, None, *MarginSpec.sphere(4).op_args(-1))


#: Each fused path's forward and backward op: the backward also takes the speed forward's kept
#: products (its outputs 4 and 5); see tests/test_cuda_parity_speed.py for the speed path's suite.
PATH_OPS = {"flat": (OP, OP_BWD, 0), "speed": (torch.ops.magloss.margin_ce_kept,
                                            torch.ops.magloss.margin_ce_backward_kept, 2)}


@pytest.mark.parametrize("path", list(PATH_OPS))
@pytest.mark.parametrize("mode", ["async", "off"])
def test_bad_label_rows_are_nan_in_bounds_and_add_no_gradient(monkeypatch, mode, path):
    """Without a host wait (the default "async" mode, and "off"), an out-of-range label never
    reads or writes out of bounds: its row has no label column, lse = NaN, and the backward
    gives it no softmax/margin gradient, exactly as an ignored row with zero incoming gradient;
    every other row is exact. In "async" mode the error is still raised, late. On the speed path
    the kept products have no label column to skip: they stay finite, equal to the ignored rows'."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", mode)
    fwd, bwd, n_kept = PATH_OPS[path]
    spec, _ = FAMILIES["magface"]
    x, w, y, grads = make_case(16, 50, 64, seed=12)
    x, w, g32 = x.float(), w.float(), [g.float() for g in grads]
    bad = y.clone()
    bad[5] = 10 ** 9
    bad[6] = -7
    rows = fwd(x, w, bad, None, None, None, None, *spec.op_args(-1))
    synchronize()  # an illegal access would surface here
    if mode == "async":  # raised late (here, by the flush), once
        with pytest.raises(ValueError, match="got 1000000000 at row 5 .*reported late"):
            magloss.flush_input_checks()
    gx, gw = bwd(*g32, x, w, bad, rows[0], rows[3], *rows[4:4 + n_kept], None, None, None, None, *spec.op_args(-1))
    synchronize()
    assert torch.isnan(rows[0][5]) and torch.isnan(rows[0][6])
    ok = torch.ones(16, dtype=torch.bool, device=DEV)
    ok[5] = ok[6] = False
    ignored = y.clone()
    ignored[5] = ignored[6] = -1
    good = fwd(x, w, ignored, None, None, None, None, *spec.op_args(-1))
    assert torch.equal(rows[0][ok], good[0][ok])
    for kept, kept_ignored in zip(rows[4:4 + n_kept], good[4:4 + n_kept]):
        assert torch.isfinite(kept).all() and torch.equal(kept, kept_ignored)
    g_ign = [g.clone() for g in g32]
    g_ign[0][~ok] = 0.0  # no incoming gradient on the ignored rows' lse and zy
    g_ign[1][~ok] = 0.0
    gx_ref, gw_ref = bwd(*g_ign, x, w, ignored, good[0], good[3], *good[4:4 + n_kept], None, None, None, None,
                         *spec.op_args(-1))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)


@pytest.mark.parametrize("where", ["flush", "next_forward", "backward"])
def test_async_input_check_raises_late(monkeypatch, where):
    """Default mode: the offending forward does not wait; its error (the reference's message,
    marked "reported late") comes from the next fused call that finds the read-back finished
    (here forced by a synchronize), or from magloss.flush_input_checks()."""
    monkeypatch.delenv("MAGLOSS_CHECK_INPUTS", raising=False)
    x, w, y_hi, _, msg = _bad_cases()["label_too_large"]
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = magloss.functional.arcface_loss(xg, wg, y_hi)  # returns: the check is queued
    synchronize()
    assert torch.isnan(loss)
    with pytest.raises(ValueError) as err:
        if where == "flush":
            magloss.flush_input_checks()
        elif where == "next_forward":
            magloss.functional.arcface_loss(x, w, y_hi.clamp(0, 9))
        else:
            loss.backward()
    assert msg in str(err.value) and "reported late" in str(err.value)
    assert wg.grad is None
    magloss.flush_input_checks()  # raised once


def test_check_mode_variable_is_validated(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sometimes")
    x, w, y, _ = make_case(4, 10, 64, seed=13)
    with pytest.raises(ValueError, match="MAGLOSS_CHECK_INPUTS: expected 'async'"):
        OP(x.float(), w.float(), y, None, None, None, None, *FAMILIES["arcface"].spec.op_args(-1))


# ---- determinism ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_repeatable_bitwise(monkeypatch, dtype):
    spec, _ = FAMILIES["magface"]
    if EMU:
        monkeypatch.setenv("MAGLOSS_CHUNK", "700")  # several chunks, a ragged last one
    x, w, y, grads = make_case(*((256, 20000, 128) if GPU else (37, 3000, 72)), seed=13, ignored=(3,))
    x, w = x.to(dtype), w.to(dtype)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a = fused(x, w, y, spec, -1, None, grads)
        BACKEND.reorder(12345)  # another block and thread visiting order: the result must not depend on it
        b = fused(x, w, y, spec, -1, None, grads)
    finally:
        torch.use_deterministic_algorithms(prev)
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)


# ---- torch.library / torch.compile -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["arcface", "sphereface", "magface"])
def test_opcheck_cuda(family):
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(8, 40, 64, seed=14, ignored=(2,))
    x = x.float().requires_grad_()
    w = w.float().requires_grad_()
    lam_t = lam_tensor(lam)
    torch.library.opcheck(OP, (x, w, y, lam_t, None, None, None, *spec.op_args(-1)))
    rows = OP(x.detach(), w.detach(), y, lam_t, None, None, None, *spec.op_args(-1))
    torch.library.opcheck(OP_BWD, (*[g.float() for g in grads], x.detach(), w.detach(), y, rows[0], rows[3], lam_t,
                                   None, None, None, *spec.op_args(-1)))


def test_compile_fullgraph_training_step():
    torch.manual_seed(15)
    mod = magloss.MagFaceLoss(100, 1000).to(DEV)
    ref = magloss.MagFaceLoss(100, 1000).to(DEV)
    ref.load_state_dict(mod.state_dict())
    x64, _, y, _ = make_case(64, 1000, 100, seed=15)

    def step(m, x, y):
        return m(x, y)

    compiled = torch.compile(step, fullgraph=True)
    xa = x64.float().clone().requires_grad_()
    xb = x64.float().clone().requires_grad_()
    with tf32(False):
        la = compiled(mod, xa, y)
        la.backward()
        lb = step(ref, xb, y)
        lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)


@gpu_only
def test_extension_status_reports_fused():
    assert magloss.extension_status()["fused"] is True


# ---- memory flat in C ---------------------------------------------------------------------------------------
def _extra_peak_bytes(B, C, D, precision):
    """Peak memory of one ArcFace forward+backward beyond x, W and their gradients. precision:
    'fp32', 'bf16' (bf16 tensors) or 'bf16-autocast' (fp32 x and W under bf16 autocast)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator(device=DEV).manual_seed(16)
    x = torch.randn(B, D, device=DEV, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(C, D, device=DEV, dtype=dtype, generator=g).requires_grad_()
    y = torch.randint(0, C, (B,), device=DEV, generator=g)

    def run():
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = magloss.functional.arcface_loss(x, w, y)
        loss.backward()

    run()  # warm-up: cuBLAS workspaces, allocator pools
    x.grad = w.grad = None
    peak, _ = BACKEND.peak_bytes(run)
    grads = (x.numel() + w.numel()) * x.element_size()
    return peak - grads


# GPU: the shape of record's B and D, C = 10,000 and 200,000 at the default chunk (N = 8,192).
# emu (its launches are far slower): B = 37, D = 40, C = 2,000 and 12,000 with N = 512 forced.
MEMORY_CASE = (512, 512, (10_000, 200_000), None) if GPU else (37, 40, (2_000, 12_000), 512)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-autocast"])
def test_memory_flat_in_C(monkeypatch, precision):
    """Extra peak memory of a fused forward+backward is bounded by the chunk, not by C (the
    allocator's statistics: CUDA's, or the emulated device memory's). The flat path: the speed
    path keeps B×C products by design (tests/test_cuda_parity_speed.py bounds it)."""
    monkeypatch.setenv("MAGLOSS_PATH", "flat")
    B, D, (c_small, c_large), chunk = MEMORY_CASE
    if chunk:
        monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))
    N = _ext.fused_chunk_columns(B, c_large, DEV.type)
    small = _extra_peak_bytes(B, c_small, D, precision)
    large = _extra_peak_bytes(B, c_large, D, precision)
    logits_bytes = B * c_large * 4  # one fp32 B x C buffer: 410 MB on the GPU
    # Bound independent of C (docs/cuda.md, "Memory bound"): the B x N fp32 tile and its half copy
    # of T, the N x D fp32 product for half dW and the N x D half chunk of an fp32 W under autocast,
    # 8 fp32 row buffers of B x D, 8 bytes a class of column norms, and 256 KiB for the small
    # allocations around the op. On the GPU: 57.8 MiB (a C x D bf16 copy of W would be 205 MB).
    bound = B * N * 6 + N * D * 6 + 8 * B * D * 4 + 8 * c_large + 2 ** 18
    assert large <= bound, f"extra peak {large / 2**20:.2f} MiB at C={c_large} exceeds {bound / 2**20:.2f} MiB"
    assert large - small <= 4 * 4 * (c_large - c_small), f"extra memory grows with C: {small} -> {large} bytes"
    assert large < logits_bytes / 2, f"extra peak {large} bytes is half a B x C fp32 logits buffer or more"


# ---- the autocast pair: half embeddings with an fp32 W (rounded in the engine, dW in fp32) ---------
@pytest.mark.parametrize("simt", [False, True], ids=["tensor-core", "simt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface"])
def test_fp32_weight_with_half_embeddings(monkeypatch, family, dtype, simt):
    """(half x, fp32 W) is (half x, W rounded to x's dtype): row statistics and dx bit for bit,
    dW in fp32 and at most one rounding from the half path's dW (several chunks, a ragged one)."""
    if simt:
        monkeypatch.setenv("MAGLOSS_FORCE_SIMT", "1")
    monkeypatch.setenv("MAGLOSS_CHUNK", "256")
    spec, lam = FAMILIES[family]
    x64, w64, y, grads = make_case(37, 1500, 100, seed=21, ignored=(3,))
    x, w, lam_t = x64.to(dtype), w64.float(), lam_tensor(lam)
    rows_m, (gx_m, gw_m) = fused(x, w, y, spec, -1, lam_t, grads)
    rows_h, (gx_h, gw_h) = fused(x, w.to(dtype), y, spec, -1, lam_t, grads)
    assert gw_m.dtype == torch.float32 and gx_m.dtype == dtype
    for u, v in zip(rows_m + (gx_m,), rows_h + (gx_h,)):
        assert torch.equal(u, v)
    assert rel(gw_m.to(dtype), gw_h) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_zero_embedding_row_half_gradient_saturates(dtype):
    """A zero row's gradient is (dL/dxhat)/1e-12 (F.normalize's): past fp16's range. Stored as the
    dtype's largest finite value, never Inf; the other rows are as in float64 up to one rounding."""
    spec, _ = FAMILIES["arcface"]
    x64, w64, y, grads = make_case(9, 50, 64, seed=23)
    x64[3] = 0.0
    x64, w64 = x64.to(dtype).double(), w64.to(dtype).double()
    _, (gx, gw) = fused(x64.to(dtype), w64.to(dtype), y, spec, -1, None, grads)
    _, (rgx, rgw) = oracle(x64, w64, y, spec, -1, None, grads)
    big = torch.finfo(dtype).max
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    expect = rgx[3].clamp(-big, big)  # float64 math, then saturated
    assert torch.equal(gx[3].double().abs() == big, expect.abs() == big)
    assert torch.equal(torch.sign(gx[3].double()), torch.sign(expect))
    ok = torch.arange(9, device=DEV) != 3
    assert rel(gx[ok], rgx[ok]) <= 4 * torch.finfo(dtype).eps + 1e-3 * (dtype == torch.bfloat16)


# ---- no host synchronization on the training hot path ---------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["arcface", "magface", "sphereface"])
def test_training_step_never_waits_for_the_gpu(monkeypatch, name, precision):
    """A module's fused forward+backward makes no host synchronization (the input check is
    asynchronous): torch's sync debug mode turns any into an error on a GPU; on the emulator the
    boundary's host waits (cudaEventSynchronize) are counted."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "async")
    mod = MODULES[name]().to(DEV)
    x64, _, y, _ = make_case(64, 1000, 100, seed=22, ignored=(1,))
    x = x64.float().requires_grad_()

    def step():
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = mod(x, y)
        loss.backward()

    step()  # warm-up: cuBLAS handles, the half-product probe
    synchronize()
    with BACKEND.no_host_waits():
        step()


# =====================================================================================================
# ---- NaN in, NaN out (docs/cuda.md, "NaN in, NaN out") ---------------------------------------------
# A NaN in embedding row i makes row i's lse, zy, norm (reg for the MagFace families) NaN, its ∂x row
# NaN and all of ∂W NaN; a NaN in class row j makes every lse NaN and zy NaN on the rows labelled j;
# an ignored NaN row has lse NaN (never −inf) and zy 0, and its NaN reaches ∂W even with no incoming
# gradient (0·NaN, as F.linear + F.cross_entropy). Everything else matches the float64 oracle as in
# the fp32 parity tests. Checked with the input check off (no error, nothing else raises) and in
# 'sync' mode (the reference's error in the call). Once, a merge of two online-softmax states with
# max −inf dropped the NaN sum and clamp(NaN) gave −1: a labelled NaN row got loss 0, an ignored one
# lse = −inf, and a chunk of NaN logits dropped out of the lse.
# =====================================================================================================
_NAN_B, _NAN_C, _NAN_D, _NAN_CHUNK = 37, 300, 100, 64      # 5 chunks, the last one ragged (44 columns)
_NAN_ROW, _NAN_IGNORED, _NAN_LABEL_OF = 2, 5, 9


def _nan_case(where, dtype=torch.float64):
    """Inputs with NaN placed by ``where`` and the hand-derived NaN masks (CPU bool tensors)."""
    x, w, y, grads = make_case(_NAN_B, _NAN_C, _NAN_D, seed=31, ignored=(_NAN_IGNORED,))
    x, w = x.to(dtype), w.to(dtype)
    rows = torch.zeros(_NAN_B, dtype=torch.bool)
    labels = y.cpu()
    zy_rows = torch.zeros(_NAN_B, dtype=torch.bool)
    if where == "embedding":          # one entry of a labelled row
        x[_NAN_ROW, 7] = float("nan")
        rows[_NAN_ROW] = zy_rows[_NAN_ROW] = True
    elif where == "ignored":          # one entry of an ignored row
        x[_NAN_IGNORED, 11] = float("nan")
        rows[_NAN_IGNORED] = True
    elif where == "weight":           # one entry of one class row, in the ragged last chunk, the label of a row
        j = _NAN_C - 10               # column 34 of 44: its lane's first merge partner (lane 50) has no column
        y[_NAN_LABEL_OF] = j
        labels = y.cpu()
        w[j, 3] = float("nan")
        zy_rows = labels == j
    else:                             # "chunk": every logit of the second chunk is NaN
        w[_NAN_CHUNK:2 * _NAN_CHUNK] = float("nan")
        zy_rows = (labels >= _NAN_CHUNK) & (labels < 2 * _NAN_CHUNK)
    all_rows = torch.ones(_NAN_B, dtype=torch.bool)
    grads = [g.clone() for g in grads]
    for g in grads[:2]:               # the losses give an ignored row no lse/zy gradient
        g[_NAN_IGNORED] = 0.0
    masks = {"lse": all_rows if where in ("weight", "chunk") else rows, "zy": zy_rows, "norms": rows,
             "gx": (all_rows if where in ("weight", "chunk") else rows).unsqueeze(1), "gw": torch.ones(1, 1, dtype=torch.bool)}
    return x, w, y, grads, masks


def _assert_nan_parity(got, ref, mask, tol, what):
    """NaN exactly at ``mask`` (and where the oracle has it), never ±inf; the rest within the
    fp32 parity tolerance (max error over max |oracle|)."""
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    mask = mask.expand_as(got)
    assert torch.equal(torch.isnan(got), mask), f"{what}: NaN at {torch.isnan(got).nonzero().tolist()}"
    assert torch.equal(torch.isnan(ref), mask), f"{what}: the oracle disagrees with the hand-derived mask"
    assert not torch.isinf(got).any(), f"{what}: ±inf"
    keep = ~mask
    if keep.any():
        scale = ref[keep].abs().max().item()
        err = (got[keep] - ref[keep]).abs().max().item()
        assert err <= tol * max(scale, 1e-30) or (scale == 0 and err == 0), f"{what}: error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("where", ["embedding", "ignored", "weight", "chunk"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_nan_in_nan_out_checks_off(monkeypatch, family, where):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    monkeypatch.setenv("MAGLOSS_CHUNK", str(_NAN_CHUNK))
    spec, lam = FAMILIES[family]
    lam_t = None if lam is None else torch.tensor(float(lam), device=DEV)
    x, w, y, grads, m = _nan_case(where)
    rows, (gx, gw) = fused(x.float(), w.float(), y, spec, -1, lam_t, grads)
    ref_rows, (rgx, rgw) = oracle(x, w, y, spec, -1, lam_t, grads)
    reg_mask = m["norms"] if spec.has_regularizer else torch.zeros_like(m["norms"])
    for k, (name, mask) in enumerate([("lse", m["lse"]), ("zy", m["zy"]), ("reg", reg_mask), ("norms", m["norms"])]):
        _assert_nan_parity(rows[k], ref_rows[k], mask, 1e-5, f"{family} {where} {name}")
    assert rows[1][_NAN_IGNORED].item() == 0.0
    _assert_nan_parity(gx, rgx, m["gx"], 1e-4, f"{family} {where} grad_embeddings")
    _assert_nan_parity(gw, rgw, m["gw"], 1e-4, f"{family} {where} grad_weight")


@pytest.mark.parametrize("where", ["embedding", "ignored", "chunk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_nan_in_nan_out_half(monkeypatch, dtype, where):
    """fp16/bf16 inputs (T and x̂ stored in half for the products): the same NaN masks."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    monkeypatch.setenv("MAGLOSS_CHUNK", str(_NAN_CHUNK))
    spec, _ = FAMILIES["magface"]
    x, w, y, grads, m = _nan_case(where)
    rows, (gx, gw) = fused(x.to(dtype), w.to(dtype), y, spec, -1, None, grads)
    for name, t, mask in [("lse", rows[0], m["lse"]), ("zy", rows[1], m["zy"]), ("reg", rows[2], m["norms"]),
                          ("norms", rows[3], m["norms"]), ("grad_embeddings", gx, m["gx"]),
                          ("grad_weight", gw, m["gw"])]:
        got = torch.isnan(t).cpu()
        assert torch.equal(got, mask.expand_as(got)), f"{dtype} {where} {name}: NaN at {got.nonzero().tolist()}"


def test_nan_raises_in_the_call_with_sync_checks(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sync")
    spec, _ = FAMILIES["arcface"]
    x, w, y, _, _ = _nan_case("embedding", torch.float32)
    with pytest.raises(ValueError, match=rf"embeddings: contains NaN or Inf \(row {_NAN_ROW}\)"):
        OP(x, w, y, None, None, None, None, *spec.op_args(-1))


def test_nan_rows_are_nan_before_the_async_check_reports(monkeypatch):
    """Default mode: the forward returns NaN rows (no host wait) and the error comes late."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "async")
    spec, _ = FAMILIES["arcface"]
    x, w, y, _, m = _nan_case("ignored", torch.float32)
    rows = OP(x, w, y, None, None, None, None, *spec.op_args(-1))
    with pytest.raises(ValueError, match=rf"embeddings: contains NaN or Inf \(row {_NAN_IGNORED}\).*reported late"):
        magloss.flush_input_checks()
    assert torch.equal(torch.isnan(rows[0]).cpu(), m["lse"])


# =====================================================================================================
# ---- Mutation check: bugs the tests above let through (docs/cuda.md, "Mutation check") -------------
# tests/emu/mutate.py applies each mutant of its table (a realistic kernel bug) to a kernel source of csrc/ and
# runs the emulated suites; every test here kills mutants that the suite above did not (named in
# each docstring). Each checks a property of the math or of the contract, on both backends.
# =====================================================================================================
_BAD_ROWS = (11, 3, 5)  # rows of blocks 1, 0 and 0 of the warp-per-row kernels (8 rows a block); the first is 3


@pytest.mark.parametrize("what", ["labels", "embeddings", "weight"])
def test_several_bad_rows_report_the_first(monkeypatch, what):
    """Bad rows in two blocks and two warps of one block: every one flags it at once; the flag keeps
    the smallest row (the reference's message), whatever the order the blocks ran in, with no race.
    Kills embeddings_flag_not_atomic, weight_flag_not_atomic, weight_flag_atomic_max."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sync")
    spec, _ = FAMILIES["arcface"]
    x, w, y, _ = make_case(20, 30, 40, seed=41)
    x, w = x.float(), w.float()
    for i in _BAD_ROWS:
        if what == "labels":
            y[i] = 30 + i
        elif what == "embeddings":
            x[i, i] = float("nan")
        else:
            w[i, i] = float("inf")
    msg = {"labels": "got 33 at row 3", "embeddings": r"embeddings: contains NaN or Inf \(row 3\)",
           "weight": r"weight: contains NaN or Inf \(row 3\)"}[what]
    with pytest.raises(ValueError, match=msg):
        OP(x, w, y, None, None, None, None, *spec.op_args(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_weight_gradient_rounds_to_the_half_gradient(monkeypatch, dtype):
    """(half x, fp32 W) computes dW_j = P_j − r_j² (ŵ_j·P_j) ŵ_j with ŵ = W rounded to x's dtype: the
    fp32 value that the (half x, half W) path rounds once on store, so rounding it gives that path's
    dW bit for bit (several chunks, a ragged one). Kills correction_w_unrounded (the correction's
    ŵ_j read without the rounding: off by less than one half ulp, within the test above's bound)."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "256")
    spec, _ = FAMILIES["arcface"]
    x64, w64, y, grads = make_case(21, 600, 72, seed=42, ignored=(3,))
    x, w = x64.to(dtype), w64.float()
    _, (_, gw_mixed) = fused(x, w, y, spec, -1, None, grads)
    _, (_, gw_half) = fused(x, w.to(dtype), y, spec, -1, None, grads)
    assert gw_mixed.dtype == torch.float32 and torch.isfinite(gw_mixed).all()
    assert torch.equal(gw_mixed.to(dtype), gw_half)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_products_round_once(dtype):
    """The half backward products take T_ij = G_ij·r_j and x̂_i = x_i/‖x_i‖, each rounded ONCE to the
    dtype. With one row and an fp32 W (dW stored in fp32, ŵ = W rounded), P_j = T_1j·x̂_1 exactly, so
    dW_j = T_1j·u_j with u_j = x̂_1 − r_j²(ŵ_j·x̂_1)ŵ_j: the test recovers T_1j from dW_j (no residual
    off u_j) and compares it with the float64 oracle's G_1j·r_j (its dW_j over the unrounded u_j)
    rounded once. A column may differ where fp32 noise meets a rounding tie (≤ 1 %). Scale 16 and
    incoming gradients × 64: every T_1j in the dtype's normal range (with s = 64 most underflow to 0).
    Kills backward_out_double_rounding and normalize_rounds_inv_a."""
    spec = MarginSpec.combined(16.0, 1.0, 0.5, 0.0)
    x64, w64, y, grads = make_case(1, 500, 256, seed=43)
    grads = [64 * g for g in grads]
    xh, wh = x64.to(dtype), w64.float()
    _, (_, gw) = fused(xh, wh, y, spec, -1, None, grads)
    w_hat = wh.to(dtype).double().cpu()
    _, (_, rgw) = oracle(xh.double(), w_hat.to(DEV), y, spec, -1, None, grads)
    x1 = xh.double().cpu()[0]

    def along_u(xhat):  # u_j for every class j, [C, D]
        r2 = 1.0 / (w_hat * w_hat).sum(1, keepdim=True)
        return xhat - r2 * (w_hat @ xhat).unsqueeze(1) * w_hat

    u_half = along_u((x1 / x1.norm()).to(dtype).double())
    u_ref = along_u(x1 / x1.norm())
    gw, rgw = gw.double().cpu(), rgw.double().cpu()
    t_fused = (gw * u_half).sum(1) / (u_half * u_half).sum(1)
    t_ref = ((rgw * u_ref).sum(1) / (u_ref * u_ref).sum(1)).to(dtype).double()
    assert t_ref.abs().min() >= torch.finfo(dtype).tiny
    residual = (gw - t_fused.unsqueeze(1) * u_half).norm(dim=1) / gw.norm(dim=1)
    assert residual.max() <= 1e-5, f"dW_j is not along u_j (x̂ rounded otherwise): {residual.max():.3g}"
    ulp = torch.finfo(dtype).eps
    differ = ((t_fused - t_ref).abs() > ulp / 8 * t_ref.abs()).sum().item()
    assert differ <= 5, f"{differ} of 500 columns: T_1j is not G_1j·r_j rounded once"


# =====================================================================================================
# ---- The engine's general features (docs/cuda.md, "Per-row margins, curricular
# modulation, sub-centers"): per-row margins with the CLIP/NONE policies, the curricular
# modulation of the non-label columns, K sub-centers, alone and combined, against the float64
# oracle with the same inputs. Shapes: B = 1, odd B, 5 row blocks; C·K wider than a block.
# =====================================================================================================
from cases import FEATURES, feature_inputs  # noqa: E402

FEATURE_SHAPES = [(1, 7, 40), (5, 13, 33), (37, 300, 72)]


def feature_case(name, B, C, D, **kw):
    return feature_inputs(name, B, C, D, device=DEV, **kw)


@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "B%d-C%d-D%d" % s)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_fp32_parity(feature, shape):
    x, w, y, grads, spec, lam, extras = feature_case(feature, *shape, seed=51, ignored=(4, 9))
    check_fp32(x, w, y, spec, -1, lam, grads, f"{feature} {shape}", extras)


# Chunks of whole classes: MAGLOSS_CHUNK weight rows rounded down to whole classes (1 class a chunk,
# 2 classes with a ragged last one, 21 classes: 64 rows with K = 3, ragged), labels in every chunk.
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("feature", ["curricular", "subcenter_arc", "subcenter_adaface_curricular"])
def test_feature_chunking(monkeypatch, feature, chunk):
    monkeypatch.setenv("MAGLOSS_CHUNK", str(chunk))
    x, w, y, grads, spec, lam, extras = feature_case(feature, 9, 51, 40, seed=52, ignored=(3,))
    check_fp32(x, w, y, spec, -1, lam, grads, f"{feature} chunk={chunk}", extras)


@pytest.mark.parametrize("feature", ["adaface_clip", "curricular", "subcenter_adaface_curricular"])
@pytest.mark.parametrize("precision", ["tf32", "fp16", "bf16"])
def test_feature_low_precision_vs_eager(precision, feature):
    x64, w64, y, grads, spec, lam, extras = feature_case(feature, 37, 200, 72, seed=53, ignored=(1,))
    dt = _parity_common.PRECISION_DTYPES[precision]
    x64, w64 = x64.to(dt).double(), w64.to(dt).double()
    ref_rows, ref_grads = oracle(x64, w64, y, spec, -1, lam, grads, extras)
    eager_rows, eager_grads = eager_lowp(x64, w64, y, spec, -1, lam, grads, precision, extras)
    with tf32(precision == "tf32"):
        rows, gr = fused(x64.to(dt), w64.to(dt), y, spec, -1, lam, grads, extras)
    assert gr[0].dtype == dt and gr[1].dtype == dt
    assert_within_eager([
        ("loss", rows[0] - rows[1], eager_rows[0] - eager_rows[1], ref_rows[0] - ref_rows[1]),
        ("grad_embeddings", gr[0], eager_grads[0], ref_grads[0]),
        ("grad_weight", gr[1], eager_grads[1], ref_grads[1]),
    ], f"{precision} {feature}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_feature_fp32_weight_with_half_embeddings(monkeypatch, dtype):
    """The autocast pair with every feature on: (half x, fp32 W) is (half x, W rounded): row
    statistics and dx bit for bit, dW in fp32 within one rounding (chunks of 5 classes, ragged)."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "15")
    x64, w64, y, grads, spec, lam, extras = feature_case("subcenter_adaface_curricular", 21, 52, 40, seed=54,
                                                         ignored=(3,))
    x, w = x64.to(dtype), w64.float()
    rows_m, (gx_m, gw_m) = fused(x, w, y, spec, -1, lam, grads, extras)
    rows_h, (gx_h, gw_h) = fused(x, w.to(dtype), y, spec, -1, lam, grads, extras)
    assert gw_m.dtype == torch.float32 and gx_m.dtype == dtype
    for u, v in zip(rows_m + (gx_m,), rows_h + (gx_h,)):
        assert torch.equal(u, v)
    assert rel(gw_m.to(dtype), gw_h) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_feature_forced_simt_path(monkeypatch, dtype):
    monkeypatch.setenv("MAGLOSS_FORCE_SIMT", "1")
    x64, w64, y, grads, spec, lam, extras = feature_case("subcenter_adaface_curricular", 37, 100, 72, seed=55,
                                                         ignored=(0,))
    x64, w64 = x64.to(dtype).double(), w64.to(dtype).double()
    ref_rows, ref_grads = oracle(x64, w64, y, spec, -1, lam, grads, extras)
    with tf32(True):
        rows, gr = fused(x64.to(dtype), w64.to(dtype), y, spec, -1, lam, grads, extras)
    if dtype == torch.float32:
        assert_fp32_parity(rows, gr, ref_rows, ref_grads, "simt features")
    else:
        assert_rounded_fp32_parity(rows, gr, ref_rows, ref_grads, dtype)


def test_feature_repeatable_bitwise(monkeypatch):
    """Every feature on, several chunks: the same bits under another block/thread visiting order."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "64")
    x, w, y, grads, spec, lam, extras = feature_case("subcenter_adaface_curricular", 37, 100, 72, seed=56,
                                                     ignored=(3,))
    a = fused(x.float(), w.float(), y, spec, -1, lam, grads, extras)
    BACKEND.reorder(4242)
    b = fused(x.float(), w.float(), y, spec, -1, lam, grads, extras)
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)


def test_feature_opcheck():
    x, w, y, grads, spec, lam, extras = feature_case("subcenter_adaface_curricular", 8, 20, 40, seed=57, ignored=(2,))
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    torch.library.opcheck(OP, (x, w, y, lam, *extras, *spec.op_args(-1)))
    rows = OP(x.detach(), w.detach(), y, lam, *extras, *spec.op_args(-1))
    torch.library.opcheck(OP_BWD, (*[g.float() for g in grads], x.detach(), w.detach(), y, rows[0], rows[3], lam,
                                   *extras, *spec.op_args(-1)))


# ---- the plain losses' paths are untouched: features that reduce to them give the same bits ----------
@pytest.mark.parametrize("boundary", [0, 1, 2, 3], ids=["threshold", "easy", "clip", "none"])
def test_constant_row_margins_equal_the_scalars(boundary):
    """row_margins filled with the spec's (m2, m3) gives exactly the scalar path's bits."""
    spec = MarginSpec.combined(64.0, 1.0, 0.45, 0.1, boundary=boundary)
    x, w, y, grads = cases.make_feature_case(37, 300, 72, seed=58, ignored=(4,), device=DEV)
    x, w = x.float(), w.float()
    rm = torch.tensor([[0.45, 0.1]], device=DEV).expand(37, 2).contiguous()
    a = fused(x, w, y, spec, -1, None, grads)
    b = fused(x, w, y, spec, -1, None, grads, (rm, None, None))
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)


def test_curricular_with_infinite_thresholds_equals_the_plain_kernels(monkeypatch):
    """τ_i = +inf modulates nothing: the general epilogues give the plain kernels' bits."""
    monkeypatch.setenv("MAGLOSS_CHUNK", "128")
    spec, _ = FAMILIES["arcface"]
    x, w, y, grads = make_case(37, 300, 72, seed=59, ignored=(4,))
    x, w = x.float(), w.float()
    tau = torch.full((37,), float("inf"), device=DEV)
    a = fused(x, w, y, spec, -1, None, grads)
    b = fused(x, w, y, spec, -1, None, grads, (None, tau, torch.tensor(0.3, device=DEV)))
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)


def test_duplicate_subcenters_tie_to_the_first():
    """K = 3 identical copies of every class row: each class cosine is a 3-way tie, won by k = 0 (the
    lowest), so the result is the K = 1 loss and only sub-center 0 of each class gets gradient
    (exact zeros elsewhere), curricular modulation included."""
    spec1 = MarginSpec.combined(64.0, 1.0, 0.5, 0.0)
    x, w, y, grads = make_case(21, 40, 40, seed=60, ignored=(3,))
    x, w = x.float(), w.float()
    tau = torch.linspace(-0.2, 0.3, 21, device=DEV)
    extras = (None, tau, torch.tensor(0.2, device=DEV))
    w3 = w.repeat_interleave(3, dim=0)
    r1, (gx1, gw1) = fused(x, w, y, spec1, -1, None, grads, extras)
    r3, (gx3, gw3) = fused(x, w3, y, spec1.with_subcenters(3), -1, None, grads, extras)
    gw3 = gw3.view(40, 3, 40)
    assert torch.all(gw3[:, 1:] == 0)
    assert gw3[:, 0].abs().max() > 0
    for u, v in zip(r3 + (gx3, gw3[:, 0]), r1 + (gx1, gw1)):
        assert rel(u, v) <= 1e-6


# ---- NaN in, NaN out with the features --------------------------------------------------------------
def test_feature_nan_subcenter_row_reaches_every_row(monkeypatch):
    """A NaN in one sub-center row of class 5 (not the winner's) makes class 5's cosine NaN for
    every row (the max keeps a NaN), so every lse is NaN and the labelled rows of class 5 get a NaN
    zy; checks off, as the oracle."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, w, y, grads, spec, lam, extras = feature_case("subcenter_adaface_curricular", 13, 20, 40, seed=61,
                                                     ignored=(4,))
    y[6] = 5
    w[5 * 3 + 2, 7] = float("nan")
    rows, (gx, gw) = fused(x.float(), w.float(), y, spec, -1, lam, grads, extras)
    ref_rows, _ = oracle(x, w, y, spec, -1, lam, grads, extras)
    assert torch.isnan(rows[0]).all() and torch.isnan(ref_rows[0]).all()
    assert torch.equal(torch.isnan(rows[1]), torch.isnan(ref_rows[1]))
    assert torch.isnan(rows[1][6]) and not torch.isnan(rows[1][y != 5]).any()


def test_feature_nan_embedding_row(monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "off")
    x, w, y, grads, spec, lam, extras = feature_case("subcenter_adaface_curricular", 13, 20, 40, seed=62,
                                                     ignored=(4,))
    x[2, 5] = float("nan")
    rows, (gx, gw) = fused(x.float(), w.float(), y, spec, -1, lam, grads, extras)
    ref_rows, (rgx, rgw) = oracle(x, w, y, spec, -1, lam, grads, extras)
    for k, name in enumerate(["lse", "zy", "reg", "norms"]):
        assert torch.equal(torch.isnan(rows[k]), torch.isnan(ref_rows[k])), name
    ok = torch.arange(13, device=DEV) != 2
    assert torch.isnan(rows[0][2]) and torch.isnan(gx[2]).all() and not torch.isnan(gx[ok]).any()
    assert rel(rows[0][ok] - rows[1][ok], ref_rows[0][ok] - ref_rows[1][ok]) <= 1e-5
    assert rel(gx[ok], rgx[ok]) <= 1e-4


# ---- bad new inputs: the errors name the argument, as the reference engine's -----------------------------
def _bad_feature_args(dev=None):
    """name -> (op args, argument named in the error), on ``dev`` (default: the suite's device)."""
    dev = dev or DEV
    x, w, y, _ = cases.make_case(6, 12, 40, seed=63, device=dev)
    x, w = x.float(), w.float()
    rm = torch.zeros(6, 2, device=dev)
    tau, t = torch.zeros(6, device=dev), torch.tensor(0.1, device=dev)
    arc = MarginSpec.combined(64.0, 1.0, 0.5, 0.0)
    clip_args = list(arc.op_args(-1))
    clip_args[9] = 2                                # boundary CLIP ...
    mag_clip = list(MarginSpec.magface().op_args(-1))
    mag_clip[9] = 2                                 # ... with kind MAGFACE
    bad_boundary = list(clip_args)
    bad_boundary[9] = 7
    k0 = list(arc.op_args(-1))
    k0[12] = 0
    k5 = list(arc.op_args(-1))
    k5[12] = 5                                      # 12 weight rows, K = 5
    k3 = list(arc.op_args(-1))
    k3[12] = 3                                      # 12 rows = 4 classes of 3: label 7 is out of range
    y7 = y.clone()
    y7[2] = 7
    a = arc.op_args(-1)
    # name -> (op args, argument named in the error)
    return {
        "row_margins_shape": ((x, w, y, None, rm[:, :1], None, None, *clip_args), "row_margins"),
        "row_margins_rows": ((x, w, y, None, rm[:5], None, None, *clip_args), "row_margins"),
        "row_margins_dtype": ((x, w, y, None, rm.double(), None, None, *clip_args), "row_margins"),
        "row_margins_non_contiguous": ((x, w, y, None, torch.zeros(2, 6, device=dev).t(), None, None, *clip_args),
                                       "row_margins"),
        "row_margins_kind": ((x, w, y, None, rm, None, None, *MarginSpec.magface().op_args(-1)), "row_margins"),
        "clip_kind": ((x, w, y, None, None, None, None, *mag_clip), "boundary"),
        "boundary_range": ((x, w, y, None, None, None, None, *bad_boundary), "boundary"),
        "neg_t_missing": ((x, w, y, None, None, tau, None, *a), "neg_threshold, neg_t"),
        "neg_threshold_missing": ((x, w, y, None, None, None, t, *a), "neg_threshold, neg_t"),
        "neg_threshold_shape": ((x, w, y, None, None, tau[:5], t, *a), "neg_threshold"),
        "neg_threshold_dtype": ((x, w, y, None, None, tau.half(), t, *a), "neg_threshold"),
        "neg_t_shape": ((x, w, y, None, None, tau, t.reshape(1), *a), "neg_t"),
        "subcenters_zero": ((x, w, y, None, None, None, None, *k0), "subcenters"),
        "subcenters_not_dividing": ((x, w, y, None, None, None, None, *k5), "weight"),
        "label_past_classes": ((x, w, y7, None, None, None, None, *k3), "labels"),
    }


_BAD_FEATURE_NAMES = list(_bad_feature_args(torch.device("cpu")))  # collection does no device work


@pytest.mark.parametrize("case", _BAD_FEATURE_NAMES)
def test_bad_feature_inputs_name_the_argument(monkeypatch, case):
    """The fused engine raises ValueError whose message starts with the argument's name."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sync")
    args, name = _bad_feature_args()[case]
    with pytest.raises(ValueError) as fused_err:
        OP(*args)
    assert str(fused_err.value).startswith(name + ":"), str(fused_err.value)


@pytest.mark.parametrize("case", _BAD_FEATURE_NAMES)
def test_bad_feature_inputs_cpu_engine_agrees(monkeypatch, case):
    """The default CPU engine (the users' CPU path) raises ValueError naming the same argument."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sync")
    args, name = _bad_feature_args()[case]
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(ValueError) as cpu_err, BACKEND.default_cpu_kernels():
        OP(*cpu_args)
    assert name.split(",")[0] in str(cpu_err.value), str(cpu_err.value)
