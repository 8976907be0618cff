"""One object per kind of device for what timing and memory figures need: waiting for the device,
a (start, end) timer pair per call, peak allocator statistics, giving cached memory back.

The benchmark harness (benchmarks/run.py) and the GPU test suite (tests/_backend.py, whose emulated
backend is a :class:`Host` with the CPU emulator's controls) call only these methods, so their code
is the same on a GPU and on the CPU, and the CUDA-only calls are the few one-line methods of
:class:`Cuda` (docs/cuda.md, "GPU-only lines"). :func:`for_name` picks the object for a device
string.
"""

from __future__ import annotations

import gc
import platform
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["Host", "Cuda", "for_name", "cpu_name"]


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _HostMark:
    """A (start, end) pair on the host clock, indexed like a pair of CUDA events: ``pair[0].record()``
    starts, ``pair[1].record()`` stops; :attr:`ms` is the time between them in milliseconds."""

    def __init__(self):
        self.t0 = self.ms = 0.0

    def __getitem__(self, i: int) -> "_HostEvent":
        return _HostEvent(self, i)


class _HostEvent:
    def __init__(self, box: _HostMark, i: int):
        self.box, self.i = box, i

    def record(self) -> None:
        if self.i == 0:
            self.box.t0 = time.perf_counter()
        else:
            self.box.ms = (time.perf_counter() - self.box.t0) * 1e3


class Host:
    """The CPU: work is done when a call returns, timed by ``time.perf_counter``; no allocator
    statistics (``memory_stats`` is False, :meth:`peak_bytes` returns None)."""

    cuda = False
    timer_name = "time.perf_counter"
    memory_stats = False

    def __init__(self, device: str = "cpu"):
        self.device = device

    def describe(self) -> dict:
        """What the benchmark record says about the device: ``gpu`` (here "CPU: <model name>")."""
        return {"gpu": f"CPU: {cpu_name()}"}

    def synchronize(self) -> None:
        """Wait until every queued kernel has finished (nothing is queued on the host)."""

    def free(self) -> None:
        """Give cached memory back between cases (the CPU allocator caches nothing)."""

    def timer_pairs(self, n: int) -> list:
        """n (start, end) timer pairs for :meth:`measure`."""
        return [_HostMark() for _ in range(n)]

    def elapsed_ms(self, pairs: list) -> List[float]:
        """Milliseconds between start and end of each pair (after the timed calls returned)."""
        return [p.ms for p in pairs]

    def measure(self, fn: Callable, n: int) -> List[float]:
        """Milliseconds of each of n calls ``fn(pair)``; fn records ``pair[0]`` where its timed part
        starts and ``pair[1]`` where it ends (untimed setup goes before ``pair[0]``)."""
        pairs = self.timer_pairs(n)
        for p in pairs:
            fn(p)
        self.synchronize()
        return self.elapsed_ms(pairs)

    def memory_allocated(self) -> int:
        raise NotImplementedError(f"{type(self).__name__}: no allocator statistics on {self.device}")

    def max_memory_allocated(self) -> int:
        raise NotImplementedError(f"{type(self).__name__}: no allocator statistics on {self.device}")

    def reset_peak_memory_stats(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}: no allocator statistics on {self.device}")

    def peak_bytes(self, fn: Callable, before: Optional[Callable[[], object]] = None) -> Tuple[Optional[int], object]:
        """Run ``fn()`` (or ``fn(before())``) and return (peak bytes, fn's result). The peak is the
        allocator's maximum while fn runs minus what was allocated when this was called: so memory
        that ``before()`` (e.g. an untimed forward whose output fn consumes) still holds counts in
        the peak, its transient peak does not. None without allocator statistics (fn still runs)."""
        if not self.memory_stats:
            return None, fn() if before is None else fn(before())
        gc.collect()
        self.synchronize()
        base = self.memory_allocated()
        arg = before() if before is not None else None
        self.synchronize()
        self.reset_peak_memory_stats()
        out = fn() if before is None else fn(arg)
        self.synchronize()
        return self.max_memory_allocated() - base, out


class Cuda(Host):
    """A CUDA device: kernels queue on the current stream, timed by CUDA events; the caching
    allocator's statistics. Each method is one call of the torch.cuda API it names."""

    cuda = True
    timer_name = "cuda-events"
    memory_stats = True

    def __init__(self, device: str = "cuda"):
        super().__init__(device)
        self.index = torch.device(device).index
        self.index = torch.cuda.current_device() if self.index is None else self.index

    def describe(self) -> dict:
        """``gpu`` (the device's name), ``gpu_memory_gb`` and ``capability`` ("9.0")."""
        props = torch.cuda.get_device_properties(self.index)
        return {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}"}

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def free(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def timer_pairs(self, n: int) -> list:
        return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]

    def elapsed_ms(self, pairs: list) -> List[float]:
        return [s.elapsed_time(e) for s, e in pairs]

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.index)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.index)

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.index)


def for_name(device: str) -> Host:
    """The device object for ``device`` ("cpu", "cuda", "cuda:N")."""
    return Cuda(device) if torch.device(device).type == "cuda" else Host(device)
