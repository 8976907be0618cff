"""The fused engine built for the CPU emulator (build.py), and its controls.

:func:`module` imports the emulated extension: the same bindings, boundary (margin_ce.cpp,
input_checks.cpp) and kernels (engine.cu) as magloss._C, on CPU tensors. :func:`routed` makes it
the "cpu" kernel of the magloss ops through magloss._ext.register_kernels, exactly as magloss._C
is registered for "cuda", so the modules, the functional API and the ops run it unchanged.
The emulator's own controls (schedule, sticky error, event delay, compute capability, emulated
CUDA-graph capture, host-wait count, device-memory statistics) are C functions of the same shared
object (ctypes).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
from types import ModuleType

from . import build


@functools.lru_cache(maxsize=None)
def module() -> ModuleType:
    """The emulated extension (built on first use); raises build.EmulatorUnavailable without g++ or
    the CUDA headers."""
    path = build.build("engine")
    spec = importlib.util.spec_from_file_location(build.MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.controls = _controls(str(path))
    return mod


def _controls(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)  # the handle of the module just imported: same globals
    lib.emu_error.restype = ctypes.c_char_p
    lib.emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
    lib.emu_host_waits.restype = ctypes.c_uint64
    lib.emu_fail_next_launch.argtypes = [ctypes.c_char_p]
    lib.emu_memory_allocated.restype = ctypes.c_uint64
    lib.emu_max_memory_allocated.restype = ctypes.c_uint64
    return lib


def controls() -> ctypes.CDLL:
    return module().controls


def reset(schedule: int = 0, seed: int = 0) -> None:
    """Clears a sticky error and restores the defaults: block and thread order (0 ascending,
    1 descending, 2 random from `seed`), events ready at once, sm_90, no graph capture."""
    lib = controls()
    lib.emu_clear_error()
    lib.emu_set_schedule(schedule, seed)
    lib.emu_set_event_delay(0)
    lib.emu_set_compute_capability(9, 0)
    lib.emu_set_capturing(0)
    lib.emu_fail_next_launch(b"")


def error():
    err = controls().emu_error()
    return None if err is None else err.decode()


def host_waits() -> int:
    """cudaEventSynchronize calls made by the boundary so far (its only way to wait for the device)."""
    return int(controls().emu_host_waits())


def memory_allocated() -> int:
    """Bytes of emulated device memory (every CPU tensor's storage since the module loaded) alive now."""
    return int(controls().emu_memory_allocated())


def max_memory_allocated() -> int:
    """The most bytes alive at once since the last :func:`reset_peak_memory_stats`."""
    return int(controls().emu_max_memory_allocated())


def reset_peak_memory_stats() -> None:
    controls().emu_reset_peak_memory_stats()


_disabled = None  # the never-exited "disabled" state of the ops' cpu kernels outside routed()


def _cpu_kernels(enabled: bool) -> contextlib.ExitStack:
    """Within the returned context the ops' registered "cpu" kernels are on (or off)."""
    from magloss import ops

    stack = contextlib.ExitStack()
    for op in (ops.margin_ce, ops.margin_ce_backward, ops.margin_ce_kept, ops.margin_ce_backward_kept):
        stack.enter_context(op.set_kernel_enabled("cpu", enabled))
    return stack


@contextlib.contextmanager
def routed():
    """Within: the magloss ops' CPU kernels are the emulated fused engine; outside: the default."""
    global _disabled
    from magloss import _ext, ops

    if _disabled is None:
        _ext.register_kernels(ops.margin_ce, ops.margin_ce_backward, engine=module(), device_type="cpu",
                              kept_ops=(ops.margin_ce_kept, ops.margin_ce_backward_kept))
        _disabled = _cpu_kernels(False)
    with _cpu_kernels(True):
        yield module()


def default_cpu_kernels() -> contextlib.ExitStack:
    """Within routed(): the CPU path users get (the ops' default kernel) for a moment."""
    return _cpu_kernels(False)
