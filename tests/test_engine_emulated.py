"""The fused CUDA engine's kernels (csrc/engine.cu), executed on the CPU by an emulator, against
the float64 reference: kernel bugs surface here, without a GPU.

tests/emu/build.py compiles engine.cu unchanged as host code with g++ under tests/emu/cuda_emu.h
(blocks one at a time, a block's threads as cooperative fibers; undefined behaviour such as a
shuffle with an exited lane or a partial __syncthreads is an error), and tests/emu/driver.py
replays csrc/margin_ce.cpp's launches and chunked products around them (CPU matmuls in the GPU
path's precision). Oracle and tolerances are those of the GPU suite (tests/_parity_common.py):
fp32 rel ≤ 1e-5 on row statistics, ≤ 1e-4 on gradients; fp16/bf16 within 2 × an eager
same-precision baseline. The inputs are rounded to the dtype before the oracle sees them.

Skipped only when g++ or the CUDA headers are missing (the skip message names which).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from _parity_common import (ALL, FAMILIES, abs_err, assert_fp32_parity, assert_rounded_fp32_parity, assert_within_eager,
                            eager_lowp, lam_tensor, make_case, oracle, rel)
from emu import build, driver
from magloss.margins import COMBINED, MAGCOS

try:
    driver.library()
except build.EmulatorUnavailable as exc:
    pytest.skip(f"CUDA emulator unavailable: {exc}", allow_module_level=True)

K = driver.constants()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _emulator():
    """A clean emulator per test, and one intra-op thread (idle OpenMP workers spin against the
    single-threaded emulator otherwise: 3-4x slower on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    driver.reset()
    yield
    torch.set_num_threads(threads)


def run(x, w, y, spec, ii, lam, grads, *, chunk=None, simt=False):
    """The emulated op and its backward op, as test_cuda_parity.fused calls them on the GPU."""
    rows, flags = driver.forward(x, w, y, spec, lam, ii, chunk=chunk, simt=simt)
    gx, gw, bflags = driver.backward([g.float() for g in grads], x, w, y, rows[0], spec, lam, ii, chunk=chunk,
                                     simt=simt)
    assert torch.equal(flags, bflags)
    return rows, (gx, gw), flags


def case(family, shape, dtype=torch.float32, *, seed=0, ignored=(1, 5), ignore_index=-1, label_dtype=torch.int64):
    """Inputs rounded to `dtype`, their float64 oracle and the family's lambda."""
    spec, lam = FAMILIES[family]
    x64, w64, y, grads = make_case(*shape, seed=seed, ignored=ignored, ignore_index=ignore_index,
                                   label_dtype=label_dtype)
    x64, w64 = x64.to(dtype).double(), w64.to(dtype).double()
    lam_t = lam_tensor(lam)
    return spec, lam_t, (x64, w64, y, grads), oracle(x64, w64, y, spec, ignore_index, lam_t, grads)


# ---- fp32 over every family and irregular shapes --------------------------------------------------
# Each of B in {1, 3, 17}, C in {1, 7, 300}, D in {1, 64, 100} appears; chunks give several chunks
# with a ragged last one (300 = 4*64 + 44 = 256 + 44, 7 = 3 + 3 + 1 = 2 + 2 + 2 + 1) or one chunk (None:
# the default width). D = 1 only for families linear in c: at |c| = 1 the angle, and so psi of the
# angular margins, is ill-conditioned (fp32 rounding of c moves sin(theta) by 3e-4).
FP32_CASES = [
    ("normface", (3, 7, 1), 3, torch.int64),
    ("cosface", (17, 300, 64), 64, torch.int32),
    ("arcface", (1, 1, 64), None, torch.int64),
    ("arcface_easy", (17, 7, 100), 3, torch.int32),
    ("arcface_st", (3, 300, 100), 256, torch.int64),
    ("combined", (17, 300, 100), 256, torch.int64),
    ("combined_m1_gt1", (3, 7, 64), 2, torch.int32),
    ("sphereface", (17, 300, 64), 64, torch.int64),
    ("sphereface_s", (1, 7, 100), 3, torch.int64),
    ("magface", (17, 300, 100), 64, torch.int32),
    ("magface_threshold", (3, 1, 64), 1, torch.int64),
    ("magcos", (17, 7, 1), 3, torch.int64),
]
assert sorted(f for f, *_ in FP32_CASES) == sorted(ALL)


@pytest.mark.parametrize("family,shape,chunk,label_dtype", FP32_CASES,
                         ids=[f"{f}-B{s[0]}-C{s[1]}-D{s[2]}-N{c}" for f, s, c, _ in FP32_CASES])
def test_fp32_parity(family, shape, chunk, label_dtype):
    spec, lam, (x, w, y, grads), (ref_rows, ref_grads) = case(family, shape, label_dtype=label_dtype)
    rows, gr, flags = run(x.float(), w.float(), y, spec, -1, lam, grads, chunk=chunk)
    if shape[2] == 1:
        # dL/dW is exactly 0 for D = 1 (a 1-D direction has no tangent): both sides return the rounding
        # noise of P_j - P_j, where |P_j| <= r_j s sum_i (|gl_i| + |gz_i|) (dpsi/dc = 1 here). Bound the
        # error by that instead, and take the reference's grad_weight out of the rel comparison.
        assert (spec.kind, spec.m1, spec.m2) == (COMBINED, 1.0, 0.0) or spec.kind == MAGCOS
        p_bound = spec.scale / w.abs().min().item() * (grads[0].abs() + grads[1].abs()).sum().item()
        assert abs_err(gr[1], ref_grads[1]) <= 1e-5 * p_bound
        gr = (gr[0], ref_grads[1])
    assert_fp32_parity(rows, gr, ref_rows, ref_grads, f"{family} {shape} chunk={chunk}")
    assert flags.tolist() == [K["FLAG_CLEAR"]] * K["NUM_FLAGS"]


# ---- fp16 / bf16: within 2 x the eager same-precision baseline ------------------------------------
LOWP_CASES = [
    ("arcface", (17, 300, 64), 64),
    ("magface", (17, 7, 100), 3),
    ("sphereface", (3, 300, 100), 256),
    ("cosface", (1, 1, 64), None),
    ("combined", (3, 300, 64), 64),
]


@pytest.mark.parametrize("family,shape,chunk", LOWP_CASES, ids=[f"{f}-B{s[0]}-C{s[1]}-D{s[2]}" for f, s, _ in LOWP_CASES])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_vs_eager(precision, family, shape, chunk):
    dt = DTYPES[precision]
    spec, lam, (x64, w64, y, grads), (ref_rows, ref_grads) = case(family, shape, dt)
    eager_rows, eager_grads = eager_lowp(x64, w64, y, spec, -1, lam, grads, precision)
    rows, gr, _ = run(x64.to(dt), w64.to(dt), y, spec, -1, lam, grads, chunk=chunk)
    assert gr[0].dtype == dt and gr[1].dtype == dt
    pairs = [("loss", rows[0] - rows[1], eager_rows[0] - eager_rows[1], ref_rows[0] - ref_rows[1])]
    pairs += [(name, rows[k], eager_rows[k], ref_rows[k]) for k, name in enumerate(["lse", "zy", "reg", "norms"])]
    pairs += [("grad_embeddings", gr[0], eager_grads[0], ref_grads[0]),
              ("grad_weight", gr[1], eager_grads[1], ref_grads[1])]
    assert_within_eager(pairs, f"{precision} {family} {shape}")


# ---- the plain-fp32 (SIMT) products ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface"])
def test_simt_path(family, dtype):
    dt = DTYPES[dtype]
    spec, lam, (x64, w64, y, grads), (ref_rows, ref_grads) = case(family, (17, 300, 100), dt, seed=10)
    rows, gr, _ = run(x64.to(dt), w64.to(dt), y, spec, -1, lam, grads, chunk=64, simt=True)
    if dt == torch.float32:
        assert_fp32_parity(rows, gr, ref_rows, ref_grads, f"simt {family}")
    else:
        assert_rounded_fp32_parity(rows, gr, ref_rows, ref_grads, dt)


# ---- the autocast pair: half embeddings with an fp32 class matrix -----------------------------------
@pytest.mark.parametrize("simt", [False, True], ids=["tensor-core", "simt"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface"])
def test_fp32_weight_with_half_embeddings(family, dtype, simt):
    """An fp32 W with half x is the half path on W rounded to x's dtype: row statistics, flags and
    ∂x bit for bit; ∂W returned in fp32, equal to the half path's ∂W before its final rounding."""
    dt = DTYPES[dtype]
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(17, 300, 64, seed=15, ignored=(2,))
    x, w = x.to(dt), w.float()   # most fp32 entries of w are not representable in dt
    rows_m, (gx_m, gw_m), flags_m = run(x, w, y, spec, -1, lam_tensor(lam), grads, chunk=64, simt=simt)
    rows_h, (gx_h, gw_h), flags_h = run(x, w.to(dt), y, spec, -1, lam_tensor(lam), grads, chunk=64, simt=simt)
    assert gw_m.dtype == torch.float32 and gx_m.dtype == dt
    for u, v in zip(rows_m + (gx_m, flags_m), rows_h + (gx_h, flags_h)):
        assert torch.equal(u, v)
    assert torch.equal(gw_m.to(dt), gw_h)
    assert not torch.equal(gw_m, gw_h.float())   # really fp32: not the rounded values


def test_fp32_weight_overflowing_fp16_is_flagged():
    """A finite fp32 weight entry that rounds to inf in fp16 is flagged as non-finite, as the
    reference does after its rounding (weight_operand)."""
    spec, lam = FAMILIES["arcface"]
    x, w, y, _ = make_case(5, 30, 64, seed=16)
    w = w.float()
    w[21, 7] = 1e5
    _, flags = driver.forward(x.half(), w, y, spec, lam, -1, chunk=8)
    assert flags.tolist() == [K["FLAG_CLEAR"], K["FLAG_CLEAR"], 21, K["FLAG_CLEAR"]]


# ---- ignored rows, ignore_index, label dtypes ---------------------------------------------------------
@pytest.mark.parametrize("ignore_index,ignored", [(-1, (0, 2)), (-100, (1, 16)), (0, ()), (-1, tuple(range(17)))])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_ignored_rows(ignore_index, ignored, label_dtype):
    spec, lam, (x, w, y, grads), (ref_rows, ref_grads) = case(
        "magface", (17, 7, 64), seed=3, ignored=ignored, ignore_index=ignore_index, label_dtype=label_dtype)
    rows, gr, _ = run(x.float(), w.float(), y, spec, ignore_index, lam, grads, chunk=3)
    assert_fp32_parity(rows, gr, ref_rows, ref_grads, f"ignore_index={ignore_index}")
    assert torch.all(rows[1][y == ignore_index] == 0)


# ---- bad inputs: flags, NaN rows, no gradient, never out of bounds -----------------------------------
@pytest.mark.parametrize("schedule", [0, 1, 2])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_bad_labels(label_dtype, schedule):
    """Out-of-range labels (LAB_BAD): lse NaN on those rows only, every other row bitwise as with the
    rows ignored, flags[FLAG_LABEL] = the smallest bad row, and no gradient from the bad rows
    (bitwise as ignored rows with zero incoming lse/zy gradient)."""
    driver.reset(schedule, seed=11)
    spec, lam = FAMILIES["magface"]
    x, w, y, grads = make_case(17, 7, 64, seed=12, label_dtype=label_dtype)
    x, w = x.float(), w.float()
    bad, ignored = y.clone(), y.clone()
    bad[12], bad[9] = 10 ** 9, -7
    ignored[12] = ignored[9] = -1
    ok = torch.ones(17, dtype=torch.bool)
    ok[12] = ok[9] = False
    rows, (gx, gw), flags = run(x, w, bad, spec, -1, lam, grads, chunk=3)
    assert flags.tolist() == [9, K["FLAG_CLEAR"], K["FLAG_CLEAR"], K["FLAG_CLEAR"]]
    assert torch.isnan(rows[0][~ok]).all() and torch.isfinite(rows[0][ok]).all()
    g_ign = [g.clone() for g in grads]
    g_ign[0][~ok] = 0.0
    g_ign[1][~ok] = 0.0
    good, (gx_ref, gw_ref), _ = run(x, w, ignored, spec, -1, lam, g_ign, chunk=3)
    for k in range(4):
        assert torch.equal(rows[k][ok], good[k][ok])
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)


@pytest.mark.parametrize("schedule", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nonfinite_flags(dtype, schedule):
    """NaN/Inf in embeddings or weight set their flag slot to the smallest row / class (atomicMin),
    whatever the order the blocks and threads run in."""
    driver.reset(schedule, seed=5)
    spec, lam = FAMILIES["arcface"]
    x, w, y, grads = make_case(17, 300, 64, seed=13)
    x, w = x.to(DTYPES[dtype]), w.to(DTYPES[dtype])
    x[12, 0], x[4, 63] = float("inf"), float("nan")
    w[200, 5], w[3, 0], w[299, 63] = float("nan"), float("-inf"), float("nan")
    _, flags = driver.forward(x, w, y, spec, lam, -1, chunk=128)
    assert flags.tolist() == [K["FLAG_CLEAR"], 4, 3, K["FLAG_CLEAR"]]
    *_, bflags = driver.backward([g.float() for g in grads], x, w, y, torch.zeros(17), spec, lam, -1, chunk=128)
    assert torch.equal(flags, bflags)


@pytest.mark.parametrize("family", ["arcface", "magface", "sphereface", "cosface"])
@pytest.mark.parametrize("zero", ["embedding_row", "weight_row"])
def test_zero_norm_rows(zero, family):
    """||x_i|| = 0 and ||w_j|| = 0: the NORM_EPS branches (inv_a = r_j = 1e12, no projection term)."""
    spec, lam = FAMILIES[family]
    x, w, y, grads = make_case(17, 300, 64, seed=14, ignored=(1,))
    x, w = x.float().double(), w.float().double()  # the oracle sees the fp32 inputs
    if zero == "embedding_row":
        x[6] = 0.0
    else:
        w[y[6]] = 0.0  # row 6's own class, and a column of every row's logits
    lam_t = lam_tensor(lam)
    ref_rows, ref_grads = oracle(x, w, y, spec, -1, lam_t, grads)
    rows, gr, flags = run(x.float(), w.float(), y, spec, -1, lam_t, grads, chunk=64)
    assert_fp32_parity(rows, gr, ref_rows, ref_grads, f"zero {zero}")
    keep = torch.ones(17, dtype=torch.bool)
    keep[6] = False  # the other rows, on their own scale (the zero row's gradient is ~1e12 larger)
    assert rel(gr[0][keep], ref_grads[0][keep]) <= 1e-4
    assert flags.tolist() == [K["FLAG_CLEAR"]] * K["NUM_FLAGS"]


# ---- determinism ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_repeatable_bitwise(dtype):
    """Two identical runs agree bit for bit, and so do runs with the threads and blocks scheduled in
    reverse and in random order (any dependence on the order, e.g. a race, would show)."""
    spec, lam = FAMILIES["magface"]
    x, w, y, grads = make_case(17, 300, 64, seed=13, ignored=(3,))
    x, w = x.to(DTYPES[dtype]), w.to(DTYPES[dtype])
    outs = []
    for schedule in (0, 0, 1, 2):
        driver.reset(schedule, seed=len(outs))
        rows, gr, _ = run(x, w, y, spec, -1, lam, grads, chunk=64)
        outs.append(rows + gr)
    for other in outs[1:]:
        for u, v in zip(outs[0], other):
            assert torch.equal(u, v)


# ---- the emulator itself -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selftest():
    lib = ctypes.CDLL(str(build.build("selftest")))
    lib.emu_error.restype = ctypes.c_char_p
    lib.emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
    return lib


UB_CASES = {
    "exited_lane": "already exited|exits while lane",
    "partial_barrier": "not every thread reaches it",
    "barrier_after_exit": "not every thread reaches it",
    "divergent_sites": "meet at different warp collectives",
    "deadlock": "deadlock in deadlock_kernel",
    "outside_mask": "mask that excludes the caller",
    "empty_grid": "invalid configuration argument",
    "huge_block": "invalid configuration argument",
}


def _selftest_run(lib, name, schedule):
    lib.emu_clear_error()
    lib.emu_set_schedule(schedule, 3)
    out = torch.full((64,), -1.0)
    getattr(lib, f"selftest_{name}")(ctypes.c_void_p(out.data_ptr()))
    err = lib.emu_error()
    return out, None if err is None else err.decode()


@pytest.mark.parametrize("schedule", [0, 1, 2])
def test_emulator_collectives(selftest, schedule):
    """Shuffle/vote/barrier semantics, and uninitialized shared memory reads as NaN."""
    out, err = _selftest_run(selftest, "good", schedule)
    assert err is None
    t = torch.arange(64, dtype=torch.float32)
    warp_sum = torch.where(t < 32, 496.0, 1520.0)
    down = torch.where(t % 32 == 31, t, t + 1)  # the last lane of each warp keeps its own value
    assert torch.equal(out, warp_sum + 1000.0 * down + 1e6 + 1e7 * 2016.0)
    out, err = _selftest_run(selftest, "uninitialized_shared", schedule)
    assert err is None and torch.isnan(out[63]) and torch.all(out[:63] == 1.0)


@pytest.mark.parametrize("schedule", [0, 1, 2])
@pytest.mark.parametrize("name", list(UB_CASES))
def test_emulator_reports_undefined_behaviour(selftest, name, schedule):
    _, err = _selftest_run(selftest, name, schedule)
    assert err is not None, f"{name}: undefined behaviour went unreported"
    assert any(part in err for part in UB_CASES[name].split("|")), err
    out = torch.full((64,), -1.0)  # sticky, as a CUDA sticky error: later launches do nothing
    selftest.selftest_good(ctypes.c_void_p(out.data_ptr()))
    assert torch.all(out == -1.0) and selftest.emu_error().decode() == err
