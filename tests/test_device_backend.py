"""The GPU-only methods of the device objects (benchmarks/device.py, tests/_backend.py), driven on the
CPU with torch.cuda's functions replaced by recording fakes: each method calls the torch.cuda API it
names, once, with the device index, and never itself. On a GPU the same methods run for real in the
parity suite and the benchmark; here nothing touches a device.

Once, the parity suite's ``synchronize()`` called itself where a GPU is visible (RecursionError in
every test there): test_parity_harness_synchronize_calls_cuda_once drives that branch.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch

import _backend
from benchmarks import device as devices


class FakeCuda:
    """Records the calls of the torch.cuda functions the device objects may make."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.allocated = 1000
        self.peak = 1000
        self.mode = 0
        fake = self

        class Event:
            made = 0

            def __init__(self, enable_timing=False):
                assert enable_timing, "timing events need enable_timing=True"
                Event.made += 1
                self.n = Event.made

            def record(self):
                fake.calls.append(("record", self.n))

            def elapsed_time(self, end):
                return float(end.n - self.n) * 1.5

        def rec(name, value=None):
            def f(*args):
                fake.calls.append((name,) + args)
                return value() if callable(value) else value
            return f

        def set_mode(mode):
            fake.calls.append(("set_sync_debug_mode", mode))
            fake.mode = mode

        for name, fn in {
            "synchronize": rec("synchronize"),
            "current_device": rec("current_device", 3),
            "empty_cache": rec("empty_cache"),
            "memory_allocated": rec("memory_allocated", lambda: fake.allocated),
            "max_memory_allocated": rec("max_memory_allocated", lambda: fake.peak),
            "reset_peak_memory_stats": rec("reset_peak_memory_stats"),
            "get_sync_debug_mode": rec("get_sync_debug_mode", lambda: fake.mode),
            "set_sync_debug_mode": set_mode,
            "Event": Event,
            "get_device_properties": rec("get_device_properties", types.SimpleNamespace(
                name="Fake H100", total_memory=80 * 2 ** 30, major=9, minor=0)),
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCuda(monkeypatch)


class _StubExtension:
    """Stands in for magloss._C on a fake GPU: the suite's module code only looks it up."""

    margin_ce = margin_ce_backward = chunk_columns = simt_path = flush_input_checks = None


def _suite_as_on_a_gpu(monkeypatch, fake_cuda):
    """A fresh copy of tests/test_cuda_parity.py imported as it is on a GPU machine: torch sees a
    CUDA device and the compiled extension loaded (a stub)."""
    from magloss import _ext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_C", _StubExtension())
    spec = importlib.util.spec_from_file_location("_parity_suite_on_fake_gpu", Path(__file__).with_name(
        "test_cuda_parity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fake_cuda.calls.clear()
    return mod


def test_parity_harness_synchronize_calls_cuda_once(monkeypatch, fake_cuda):
    """The suite's synchronize() where a GPU is visible waits once, through torch.cuda.synchronize
    (it once called itself: RecursionError in every test on a GPU)."""
    suite = _suite_as_on_a_gpu(monkeypatch, fake_cuda)
    assert suite.GPU and suite.DEV == torch.device("cuda")
    suite.synchronize()
    assert fake_cuda.calls == [("synchronize", 3)]


def test_parity_harness_gpu_branches_use_the_cuda_api(monkeypatch, fake_cuda):
    """The suite's other GPU-only steps through its backend: the gpu mark on every test, the
    extension as ENGINE, the per-test reset, torch's sync debug mode around the hot-path test, and
    the memory figure of test_memory_flat_in_C (peak above the start, after a wait)."""
    suite = _suite_as_on_a_gpu(monkeypatch, fake_cuda)
    assert suite.pytestmark == pytest.mark.gpu and isinstance(suite.ENGINE, _StubExtension)
    assert suite.BACKEND.simt_device() == 3 and suite.BACKEND.kernel_error() is None
    with suite.BACKEND.routed() as engine, suite.BACKEND.default_cpu_kernels():
        assert engine is suite.ENGINE          # magloss._C registered itself for "cuda": nothing to route
    suite.BACKEND.start_test("any")
    suite.BACKEND.reorder(1)
    with suite.BACKEND.no_host_waits():
        assert fake_cuda.mode == "error"
    assert fake_cuda.mode == 0

    def run():
        fake_cuda.peak = fake_cuda.allocated + 4096
    assert suite.BACKEND.peak_bytes(run) == (4096, None)
    assert fake_cuda.names()[-2:] == ["synchronize", "max_memory_allocated"]


@pytest.mark.parametrize("device,index", [("cuda", 3), ("cuda:1", 1)])
def test_cuda_device_synchronize_and_memory_statistics(fake_cuda, device, index):
    dev = devices.Cuda(device)
    fake_cuda.calls.clear()
    dev.synchronize()
    assert dev.memory_allocated() == 1000 and dev.max_memory_allocated() == 1000
    dev.reset_peak_memory_stats()
    dev.free()
    assert fake_cuda.calls == [("synchronize", index), ("memory_allocated", index), ("max_memory_allocated", index),
                               ("reset_peak_memory_stats", index), ("empty_cache",)]


def test_cuda_peak_bytes_resets_after_before_and_measures_above_the_start(fake_cuda):
    """peak = max allocated while fn runs − allocated at the start; before() runs ahead of the reset."""
    dev = devices.Cuda("cuda:0")

    def before():
        fake_cuda.allocated += 200           # e.g. the tensors a forward saved
        return "saved"

    def fn(arg):
        assert arg == "saved"
        fake_cuda.peak = fake_cuda.allocated + 50
        return "out"

    fake_cuda.calls.clear()
    peak, out = dev.peak_bytes(fn, before=before)
    assert (peak, out) == (250, "out")
    names = fake_cuda.names()
    assert names.index("memory_allocated") < names.index("reset_peak_memory_stats") < names.index("max_memory_allocated")
    assert names[-2:] == ["synchronize", "max_memory_allocated"]   # the peak is read after the device finished


def test_cuda_timer_uses_event_pairs(fake_cuda):
    """measure(): one (start, end) event pair per call, one wait, elapsed_time of each pair."""
    dev = devices.Cuda("cuda")
    fake_cuda.calls.clear()
    times = dev.measure(lambda ev: (ev[0].record(), ev[1].record()), 3)
    assert times == [1.5, 1.5, 1.5]
    assert fake_cuda.names() == ["record"] * 6 + ["synchronize"]


def test_host_device_has_no_memory_statistics_and_times_with_the_clock():
    dev = devices.for_name("cpu")
    assert type(dev) is devices.Host and not dev.memory_stats
    assert dev.peak_bytes(lambda: 7) == (None, 7)
    with pytest.raises(NotImplementedError, match="no allocator statistics on cpu"):
        dev.memory_allocated()
    (ms,) = dev.measure(lambda ev: (ev[0].record(), sum(range(1000)), ev[1].record()), 1)
    assert ms > 0


def test_benchmark_record_describes_the_cuda_device(fake_cuda):
    """run.py's environment record on CUDA: the device's name, memory and capability, the event timer."""
    from benchmarks import run

    env = run.environment("cuda:1", ["benchmarks/run.py"])
    assert (env["gpu"], env["gpu_memory_gb"], env["capability"], env["timer"]) == ("Fake H100", 80.0, "9.0",
                                                                                    "cuda-events")
    assert ("get_device_properties", 1) in fake_cuda.calls
    cpu = run.environment("cpu", ["benchmarks/run.py"])
    assert cpu["gpu"].startswith("CPU: ") and cpu["timer"] == "time.perf_counter" and "capability" not in cpu


def test_benchmark_refuses_cuda_without_a_gpu(monkeypatch):
    from benchmarks import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device visible"):
        run.main(["--device", "cuda", "--grid", "ci"])


def test_gpu_backend_no_host_waits_sets_error_mode_and_restores_the_previous_one(fake_cuda):
    gpu = _backend.Gpu(engine=None)
    fake_cuda.mode = "warn"
    with gpu.no_host_waits():
        assert fake_cuda.mode == "error"
    assert fake_cuda.mode == "warn"
    with pytest.raises(KeyError), gpu.no_host_waits():   # restored when the body raises, too
        raise KeyError
    assert fake_cuda.mode == "warn"
    assert gpu.simt_device() == 3 and gpu.device == torch.device("cuda")


def test_select_on_a_gpu_without_the_extension_names_the_reason(monkeypatch):
    from magloss import _ext

    monkeypatch.setattr(_ext, "_C", None)
    with pytest.raises(_backend.Unavailable, match="fused extension not built"):
        _backend.select(cuda_available=True)


def test_benchmark_peak_extra_subtracts_the_gradients(fake_cuda):
    """run.py's peak figure through the device object: peak above the start minus the gradients of
    x and W (bwd: the forward runs before the peak reset)."""
    from benchmarks import run
    from benchmarks.providers import Runner

    x = torch.zeros(4, 3, requires_grad=True)
    w = torch.zeros(5, 3, requires_grad=True)

    def fwd():
        fake_cuda.allocated += 2 ** 20       # the forward's saved tensors
        return (x.sum() + w.sum()) * 1.0

    def bwd(out, retain):
        fake_cuda.peak = fake_cuda.allocated + 3 * 2 ** 20 + (x.numel() + w.numel()) * 4
        out.backward()

    runner = Runner(fwd, bwd, [x, w])
    assert run._peak_extra_mb(runner, "bwd", devices.Cuda("cuda")) == 4.0       # saved (1) + transient (3)
    fake_cuda.allocated = fake_cuda.peak = 1000
    assert run._peak_extra_mb(runner, "full", devices.Cuda("cuda")) == 4.0
    assert run._peak_extra_mb(runner, "fwd", devices.Host()) is None


# ---- magloss/_ext.py: how the compiled extension loads (or not), driven with a stand-in module -----------
_IMPORT_AS = r'''
import importlib.abc, importlib.machinery, json, sys, types
import torch

class Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if HOW == "broken":       # built for another torch: an undefined symbol
            raise ImportError("magloss/_C.so: undefined symbol: _ZN3c10fake")
        if HOW == "dependency":   # a library the extension imports is missing
            raise ModuleNotFoundError("No module named 'libfake'", name="libfake")
        module.margin_ce = module.margin_ce_backward = lambda *a: None

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "magloss._C":
            return importlib.machinery.ModuleSpec(name, Loader())
        return None

sys.meta_path.insert(0, Finder())
torch.cuda.is_available = lambda: CUDA
try:
    import magloss
except ModuleNotFoundError as exc:
    print(json.dumps({"raised": exc.name}))
else:
    print(json.dumps(magloss.extension_status()))
'''


@pytest.mark.parametrize("how,cuda,env,expect", [
    ("loaded", True, {}, dict(compiled=True, fused=True, reason="compiled extension loaded: CUDA tensors use the "
                                                                "fused kernels")),
    ("loaded", False, {}, dict(compiled=True, fused=False, reason="compiled extension loaded, but no CUDA device is "
                                                                  "visible: chunked PyTorch engine in use")),
    ("broken", True, {}, dict(compiled=False, fused=False, reason="compiled extension magloss._C failed to load "
                                                                  "(magloss/_C.so: undefined symbol: _ZN3c10fake); "
                                                                  "rebuild it against the installed torch")),
    ("loaded", True, {"MAGLOSS_DISABLE_EXT": "1"}, dict(compiled=False, fused=False,
                                                        reason="disabled by MAGLOSS_DISABLE_EXT")),
    ("dependency", True, {}, {"raised": "libfake"}),
])
def test_extension_import_outcomes(how, cuda, env, expect):
    """Each way `import magloss._C` can end, in a fresh interpreter with a stand-in extension: loaded
    (with and without a visible GPU), built for another torch, disabled, or a missing dependency (not
    hidden: raised)."""
    import json
    import os
    import subprocess
    import sys

    code = f"HOW = {how!r}\nCUDA = {cuda!r}\n" + _IMPORT_AS
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **env), cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert {k: got.get(k) for k in expect} == expect
