#!/usr/bin/env python3
"""Peak extra host memory of one call, measured in a fresh process (CPU runs).

CPU allocators keep no statistics, so the harness measures the resident set instead: a
fresh Python process builds the provider's runner (inputs x, W, labels), resets the
kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5, Linux), reads VmRSS, runs one
forward (fwd), one backward after an unmeasured forward (bwd) or one forward+backward
(full), and reads VmHWM. Peak extra = VmHWM − VmRSS before − the bytes of the gradients
of x and W (bwd, full), in MiB, as the CUDA figure. A fresh process per case, because
memory freed by an earlier case stays mapped by the allocator and would hide a peak.

    python benchmarks/cpu_memory.py chunked arcface fp32 64 85742 512 full   # prints MiB
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def supported() -> bool:
    """Whether this system lets a process reset its peak-RSS mark (Linux /proc)."""
    try:
        _kib("VmHWM")
        return Path("/proc/self/clear_refs").exists()
    except (OSError, AttributeError):
        return False


def measure(provider: str, loss: str, precision: str, B: int, C: int, D: int, mode: str) -> float:
    """Peak extra MiB of one ``mode`` call of the case, in this process (meant to be fresh)."""
    import torch

    from benchmarks import providers as P

    case = P.Case(provider, loss, precision, B, C, D, "cpu")
    with P.precision_context(precision, "cpu"):
        # One forward+backward of a tiny case first: the code the call runs is paged in (and
        # libraries set up their pools) before the measurement, not counted as the case's memory.
        warm = P.build(P.Case(provider, loss, precision, B, min(C, 512), D, "cpu"))
        with warm.context():
            warm.bwd(warm.fwd(), False)
        del warm
        runner = P.build(case)
        out = None
        if mode == "bwd":
            with runner.context():
                out = runner.fwd()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _kib("VmRSS")
        if mode == "bwd":
            runner.bwd(out, False)
        else:
            with runner.context():
                out = runner.fwd()
            if mode == "full":
                runner.bwd(out, False)
        peak = _kib("VmHWM")
        grads = runner.grad_bytes() if mode != "fwd" else 0
    del out, torch
    return round(((peak - before) * 1024 - grads) / 2**20, 2)


def fresh(provider: str, loss: str, precision: str, B: int, C: int, D: int, mode: str,
          threads: Optional[int] = None, timeout: float = 1800.0) -> Optional[float]:
    """:func:`measure` in a new Python process; None if it fails (the reason goes to stderr)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), provider, loss, precision, str(B), str(C), str(D), mode]
    if threads:
        cmd.append(str(threads))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"cpu_memory: {' '.join(cmd[2:])} timed out", file=sys.stderr)
        return None
    if res.returncode != 0:
        print(f"cpu_memory: {' '.join(cmd[2:])} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) not in (7, 8):
        raise SystemExit(__doc__)
    if len(a) == 8:
        import torch

        torch.set_num_threads(int(a[7]))
    print(json.dumps(measure(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), a[6])))
