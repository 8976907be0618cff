"""The device a fused-engine suite runs on: one interface, two backends.

``Gpu``: magloss._C on a CUDA device. ``Emulated``: the same sources built for the CPU emulator
(tests/emu), registered as the ops' "cpu" kernels. tests/test_cuda_parity.py and
tests/sanitizer_cases.py call only these methods, so their code is the same on both backends; the
CUDA-only lines are the one-line methods of :class:`Gpu` and of benchmarks.device.Cuda it builds
on (waiting, memory statistics), listed in docs/cuda.md ("GPU-only lines").

Both backends have: ``name`` ("gpu" / "emu"), ``device`` (torch.device), ``engine`` (the module
whose ``margin_ce`` etc. run), ``synchronize()``, ``memory_stats`` with ``memory_allocated()``,
``max_memory_allocated()``, ``reset_peak_memory_stats()`` and ``peak_bytes(fn)`` (the emulated
one: the emulated device memory's, i.e. every CPU allocation's), ``simt_device()`` (the device index
``engine.simt_path`` takes), ``routed()`` (within: the ops run the engine), ``default_cpu_kernels()``
(within routed(): the ops' default kernel for CPU tensors), ``start_test(nodeid)`` and
``kernel_error()`` (a clean state per test, the sticky kernel error afterwards), ``reorder(seed)``
(another block/thread visiting order where the backend can choose one), and
``no_host_waits()`` (a context in which any host wait for the device is an error).
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from typing import Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:   # benchmarks/ is a package at the repository root
    sys.path.insert(0, _ROOT)

from benchmarks import device as _devices  # noqa: E402


class Unavailable(Exception):
    """Neither backend can run here (the reason is the message)."""


class Gpu(_devices.Cuda):
    """magloss._C on the current CUDA device (registered for "cuda" when magloss imports)."""

    name = "gpu"

    def __init__(self, engine):
        super().__init__("cuda")
        self.device = torch.device("cuda")
        self.engine = engine

    def simt_device(self) -> int:
        return self.index

    def routed(self):
        return contextlib.nullcontext(self.engine)

    def default_cpu_kernels(self):
        return contextlib.nullcontext()

    def start_test(self, nodeid: str) -> None:
        """Nothing to reset: a GPU has one schedule, and a kernel error is raised by the call."""

    def kernel_error(self) -> Optional[str]:
        return None

    def reorder(self, seed: int) -> None:
        """The hardware picks the block order: nothing to choose."""

    @contextlib.contextmanager
    def no_host_waits(self):
        """torch's sync debug mode: any host synchronization inside raises RuntimeError."""
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)


class Emulated(_devices.Host):
    """The fused engine under the CPU emulator, on CPU tensors (tests/emu/engine.py). Its memory
    statistics are the emulated device memory's: every CPU allocation of the process."""

    name = "emu"
    memory_stats = True

    def __init__(self, emu_engine):
        super().__init__("cpu")
        self.device = torch.device("cpu")
        self._emu = emu_engine
        self.engine = emu_engine.module()

    def simt_device(self) -> int:
        return 0

    def memory_allocated(self) -> int:
        return self._emu.memory_allocated()

    def max_memory_allocated(self) -> int:
        return self._emu.max_memory_allocated()

    def reset_peak_memory_stats(self) -> None:
        self._emu.reset_peak_memory_stats()

    def routed(self):
        return self._emu.routed()

    def default_cpu_kernels(self):
        return self._emu.default_cpu_kernels()

    def start_test(self, nodeid: str) -> None:
        """A clean emulator and a block/thread visiting order picked from a hash of the test's name
        (seeded, reproducible)."""
        h = zlib.crc32(nodeid.encode())
        self._emu.reset(schedule=h % 3, seed=h)

    def kernel_error(self) -> Optional[str]:
        return self._emu.error()

    def reorder(self, seed: int) -> None:
        """Another block and thread visiting order (random from seed) for the next launches."""
        self._emu.reset(schedule=2, seed=seed)

    @contextlib.contextmanager
    def no_host_waits(self):
        """The boundary's only way to wait for the device is cudaEventSynchronize, which the
        emulator counts: AssertionError if the count moved inside."""
        before = self._emu.host_waits()
        yield
        waits = self._emu.host_waits() - before
        assert waits == 0, f"{waits} host wait(s) for the device (cudaEventSynchronize) inside no_host_waits()"


def select(cuda_available: Optional[bool] = None):
    """The backend for this machine: Gpu where torch sees a CUDA device (the compiled extension
    must be loaded), else Emulated. Raises Unavailable with the reason when the chosen one cannot
    run (a GPU without the extension; no g++ or CUDA headers for the emulator)."""
    from magloss import _ext

    if torch.cuda.is_available() if cuda_available is None else cuda_available:
        if _ext._C is None or not hasattr(_ext._C, "margin_ce"):
            raise Unavailable(f"fused extension not built: {_ext.extension_status()['reason']}")
        return Gpu(_ext._C)
    from emu import build as emu_build
    from emu import engine as emu_engine

    try:
        return Emulated(emu_engine)
    except emu_build.EmulatorUnavailable as exc:
        raise Unavailable(f"no GPU, and the CUDA emulator is unavailable: {exc}") from None
