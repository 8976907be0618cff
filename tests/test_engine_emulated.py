"""The CPU emulator of the CUDA execution model (tests/emu), and what only it can test.

The fused engine's parity with the reference runs under the emulator in tests/test_cuda_parity.py
(the GPU suite's emulated backend). This file tests the emulator itself, on the kernels of
tests/emu/emu_selftest.cu: well-defined collectives and barriers give the right values, and each
kind of bug it must report is reported (undefined behaviour of the warp collectives, data races
in shared and global memory, out-of-bounds accesses, uninitialized shared memory), under every
block/thread visiting order, while the legal twin of each racy kernel is not. Then the boundary's
behaviour that needs control over the emulated device: events that are not ready yet (the
asynchronous input check's polling), CUDA-graph capture (checks off), a GPU without tensor cores
(the plain-fp32 products chosen by compute capability), and the device memory's guard bands.

Skipped only when g++ or the CUDA headers are missing (the skip message names which).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from emu import build
from emu import engine as emu_engine

try:
    ENGINE = emu_engine.module()
except build.EmulatorUnavailable as exc:
    pytest.skip(f"CUDA emulator unavailable: {exc}", allow_module_level=True)

import magloss  # noqa: E402
from _parity_common import assert_fp32_parity, oracle  # noqa: E402
from cases import FAMILIES, make_case  # noqa: E402

SCHEDULES = [0, 1, 2]


# ---- the emulator itself -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selftest():
    lib = ctypes.CDLL(str(build.build("selftest")))
    lib.emu_error.restype = ctypes.c_char_p
    lib.emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
    lib.emu_track_guarded.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
    lib.emu_untrack.argtypes = [ctypes.c_void_p]
    return lib


GUARD = 16  # floats of guard band on each side of the 64-float buffer the kernels see


def _selftest_run(lib, name, schedule, out=None):
    """Runs selftest_<name> on a 64-float buffer tracked as emulated device memory with guard bands;
    returns (the buffer, the emulator's error or None)."""
    lib.emu_clear_error()
    lib.emu_set_schedule(schedule, 3)
    store = torch.full((64 + 2 * GUARD,), -1.0)
    if out is not None:
        store[GUARD:GUARD + 64] = out
    lib.emu_track_guarded(ctypes.c_void_p(store.data_ptr()), 4 * GUARD, 4 * 64, 4 * GUARD)
    try:
        getattr(lib, f"selftest_{name}")(ctypes.c_void_p(store.data_ptr() + 4 * GUARD))
    finally:
        lib.emu_untrack(ctypes.c_void_p(store.data_ptr()))
    err = lib.emu_error()
    return store[GUARD:GUARD + 64], None if err is None else err.decode()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_emulator_collectives(selftest, schedule):
    """Shuffle/vote/barrier semantics."""
    out, err = _selftest_run(selftest, "good", schedule)
    assert err is None
    t = torch.arange(64, dtype=torch.float32)
    warp_sum = torch.where(t < 32, 496.0, 1520.0)
    down = torch.where(t % 32 == 31, t, t + 1)  # the last lane of each warp keeps its own value
    assert torch.equal(out, warp_sum + 1000.0 * down + 1e6 + 1e7 * 2016.0)


# kernel -> a part of the message the emulator must give (| separates alternatives)
ERROR_CASES = {
    "exited_lane": "already exited|exits while lane",
    "partial_barrier": "not every thread reaches it",
    "barrier_after_exit": "not every thread reaches it",
    "divergent_sites": "meet at different warp collectives",
    "deadlock": "deadlock in deadlock_kernel",
    "outside_mask": "mask that excludes the caller",
    "empty_grid": "invalid configuration argument",
    "huge_block": "invalid configuration argument",
    "uninitialized_shared": "read of uninitialized shared memory",
    "shared_race": "data race in shared_race_kernel on shared memory",
    "reduction_reuse_race": "data race in reduction_reuse_race_kernel on shared memory",
    "cross_block_store": "another block of the same launch",
    "same_block_store": "with no __syncthreads between them",
    "read_then_write": "data race in read_then_write_kernel on global memory",
    "out_of_bounds": "out-of-bounds write in out_of_bounds_kernel",
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_emulator_reports_errors(selftest, name, schedule):
    _, err = _selftest_run(selftest, name, schedule)
    assert err is not None, f"{name}: the bug went unreported"
    assert any(part in err for part in ERROR_CASES[name].split("|")), err
    store = torch.full((64,), -1.0)  # sticky, as a CUDA sticky error: later launches do nothing
    selftest.selftest_good(ctypes.c_void_p(store.data_ptr()))
    assert torch.all(store == -1.0) and selftest.emu_error().decode() == err


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_emulator_accepts_the_legal_twins(selftest, schedule):
    """The same patterns, correctly synchronized: no report, and the values a GPU gives."""
    out, err = _selftest_run(selftest, "reduction_reuse_ok", schedule)
    assert err is None and torch.all(out == 64.0 + 128.0)  # sum of 64 x 1.0, then of 64 x 2.0
    out, err = _selftest_run(selftest, "cross_block_atomic", schedule, out=torch.zeros(64))
    assert err is None and out[0] == 3.0  # three blocks, one atomicAdd each
    inputs = torch.arange(64, dtype=torch.float32)
    out, err = _selftest_run(selftest, "disjoint", schedule, out=inputs)
    assert err is None
    expect = inputs[(15 - torch.arange(16)) % 8]
    assert torch.equal(out[8:24], expect) and torch.equal(out[24:40], expect)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_engine_block_reductions_can_be_called_twice(selftest, schedule):
    """engine.cu's block_sum2 and block_softmax_merge, each twice in a row in one block of 256
    threads: no race (each ends with a barrier; without it the detector reports one, as for
    reduction_reuse_race above) and the sums a GPU gives, against float64."""
    out, err = _selftest_run(selftest, "engine_reductions_twice", schedule)
    assert err is None, err
    t = torch.arange(256, dtype=torch.float64)
    expect = [256.0, t.sum(), 512.0, 256.0,
              127.5, torch.exp(0.5 * t - 127.5).sum(), 0.0, 2.0 * torch.exp(-t).sum()]
    torch.testing.assert_close(out[:8].double(), torch.tensor([float(e) for e in expect], dtype=torch.float64),
                               rtol=1e-6, atol=0)


# ---- the boundary on the emulated device -------------------------------------------------------------
@pytest.fixture
def routed():
    emu_engine.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with emu_engine.routed():
        yield
    torch.set_num_threads(threads)
    emu_engine.reset()
    magloss.flush_input_checks()


def _bad_label_batch():
    x, w, y, _ = make_case(9, 30, 40, seed=31)
    y = y.clone()
    y[4] = 30
    return x.float(), w.float(), y


def test_async_check_polls_without_waiting(routed, monkeypatch):
    """Events that are not ready yet: later fused calls poll without blocking and raise nothing;
    the error comes once the read-back has landed (here: the flush, which waits), exactly once."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "async")
    emu_engine.controls().emu_set_event_delay(3)
    x, w, y = _bad_label_batch()
    waits = emu_engine.host_waits()
    loss = magloss.functional.arcface_loss(x, w, y)  # queued; NaN at once
    assert torch.isnan(loss)
    for _ in range(2):  # each call queries the pending event once: not ready, no error, no wait
        magloss.functional.arcface_loss(x, w, y.clamp(0, 29))
    assert emu_engine.host_waits() == waits
    with pytest.raises(ValueError, match=r"got 30 at row 4 .*reported late.*call #"):
        magloss.flush_input_checks()
    assert emu_engine.host_waits() > waits
    magloss.flush_input_checks()  # raised once


def test_async_check_raises_in_the_first_call_that_finds_it_ready(routed, monkeypatch):
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "async")
    emu_engine.controls().emu_set_event_delay(1)
    x, w, y = _bad_label_batch()
    magloss.functional.arcface_loss(x, w, y)
    magloss.functional.arcface_loss(x, w, y.clamp(0, 29))  # the first poll: not ready yet
    with pytest.raises(ValueError, match="reported late"):
        magloss.functional.arcface_loss(x, w, y.clamp(0, 29))  # the second: ready, failed
    magloss.flush_input_checks()


def test_graph_capture_turns_checks_off(routed, monkeypatch):
    """While the stream is captured, no read-back and no host wait: a bad row is only NaN, in any mode."""
    monkeypatch.setenv("MAGLOSS_CHECK_INPUTS", "sync")
    x, w, y = _bad_label_batch()
    waits = emu_engine.host_waits()
    emu_engine.controls().emu_set_capturing(1)
    try:
        loss = magloss.functional.arcface_loss(x, w, y, reduction="none")
    finally:
        emu_engine.controls().emu_set_capturing(0)
    assert torch.isnan(loss[4]) and torch.isfinite(loss[torch.arange(9) != 4]).all()
    assert emu_engine.host_waits() == waits
    magloss.flush_input_checks()  # nothing was queued


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_without_tensor_cores_takes_the_plain_fp32_path(routed, monkeypatch, dtype):
    """Compute capability 6.1 (1080 Ti): the boundary picks the SIMT products by itself, with the
    same bits as MAGLOSS_FORCE_SIMT=1 on sm_90."""
    spec, _ = FAMILIES["magface"]
    x, w, y, grads = make_case(21, 700, 72, seed=32, ignored=(2,))
    x, w = x.to(dtype), w.to(dtype)
    g32 = [g.float() for g in grads]

    def run():
        rows = torch.ops.magloss.margin_ce(x, w, y, None, None, None, None, *spec.op_args(-1))[:4]
        return rows + torch.ops.magloss.margin_ce_backward(*g32, x, w, y, rows[0], rows[3], None, None, None, None, *spec.op_args(-1))

    monkeypatch.setenv("MAGLOSS_CHUNK", "256")
    emu_engine.controls().emu_set_compute_capability(6, 1)
    assert ENGINE.simt_path(0)
    pascal = run()
    emu_engine.controls().emu_set_compute_capability(9, 0)
    assert not ENGINE.simt_path(0)
    hopper = run()
    monkeypatch.setenv("MAGLOSS_FORCE_SIMT", "1")
    forced = run()
    for a, b in zip(pascal, forced):
        assert torch.equal(a, b)
    if dtype == torch.float32:
        ref_rows, ref_grads = oracle(x.double(), w.double(), y, spec, -1, None, grads)
        assert_fp32_parity(pascal[:4], pascal[4:], ref_rows, ref_grads, "sm_61")
    else:  # the tensor-core path rounds T = G*r to bf16 for its products; the plain path keeps fp32
        assert any(not torch.equal(a, b) for a, b in zip(pascal, hopper))


def test_device_memory_is_guarded_and_poisoned(routed):
    """What the boundary allocates is emulated device memory: poisoned (NaN) and tracked."""
    t = torch.empty(1000)
    assert torch.isnan(t).all()


def test_kernel_errors_reach_the_caller_as_cuda_errors(routed):
    """A failed kernel is a sticky CUDA error: the boundary's launch check raises it as a
    RuntimeError naming the kernel, and every later call raises it too until the context is reset."""
    x, w, y, _ = make_case(3, 10, 40, seed=33)
    args = (x.float(), w.float(), y, None, None, None, None, *FAMILIES["arcface"].spec.op_args(-1))
    emu_engine.controls().emu_fail_next_launch(b"injected fault")
    with pytest.raises(RuntimeError, match="CUDA error: cuda_emu: injected fault in col_norms_kernel"):
        torch.ops.magloss.margin_ce(*args)
    with pytest.raises(RuntimeError, match="injected fault"):
        torch.ops.magloss.margin_ce(*args)
    emu_engine.reset()
    assert torch.isfinite(torch.ops.magloss.margin_ce(*args)[0]).all()


# ---- the GPU check's sanitizer cases, run here on the emulated backend --------------------------------
import _backend  # noqa: E402
import sanitizer_cases  # noqa: E402


@pytest.mark.parametrize("case", sanitizer_cases.CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_sanitizer_case_runs_on_the_emulator(routed, case):
    """Every case of tests/sanitizer_cases.py (what compute-sanitizer runs on the GPU) passes its own
    sanity checks on the emulated backend, with no kernel error: the file's only GPU-only code is
    main()'s choice of the GPU backend."""
    expected = "raised as expected" if case.get("bad_label") and case.get("check") == "sync" else "ok"
    assert sanitizer_cases.run_case(**case, backend=_backend.Emulated(emu_engine)) == expected
    assert emu_engine.error() is None, emu_engine.error()
    magloss.flush_input_checks()


def test_sanitizer_main_on_the_emulator(routed, capsys, monkeypatch):
    """main() on the emulated backend: one "passed" line per case (what the GPU check counts), exit 0;
    a case that fails its sanity check is reported and makes the exit status 1."""
    assert sanitizer_cases.main(backend=_backend.Emulated(emu_engine)) == 0
    out = capsys.readouterr().out
    n = len(sanitizer_cases.CASES)
    assert sum(line.startswith("sanitizer case ") and f"/{n} passed: " in line for line in out.splitlines()) == n
    monkeypatch.setattr(sanitizer_cases, "CASES", sanitizer_cases.CASES[:1] + [dict(name="nosuchfamily", B=1, C=1,
                                                                                        D=8)])
    assert sanitizer_cases.main(backend=_backend.Emulated(emu_engine)) == 1
    assert "sanitizer case 2/2 FAILED: KeyError" in capsys.readouterr().out


def test_sanitizer_main_without_the_fused_engine_runs_nothing(capsys):
    assert sanitizer_cases.main() == 2
    assert "sanitizer cases: cannot run (" in capsys.readouterr().out
