"""Build csrc/engine.cu as host code for the CPU emulator (tests/emu/cuda_emu.h).

The only non-C++ syntax in engine.cu is the launch ``kernel<<<grid, block, shmem, stream>>>(args)``;
:func:`host_source` rewrites each one, line numbers unchanged, into
``::cuda_emu::launch("kernel", ::cuda_emu::config(grid, block, shmem, stream), kernel, args)``.
The result is written to a build directory (csrc/ is never modified) as engine_host.inc, included
by engine_capi.cpp, and compiled by g++ -std=c++20 -O1 with the defines of CMakeLists.txt into a
shared library with a C ABI. Builds are cached under ``$MAGLOSS_EMU_CACHE`` (default
``<tmp>/magloss-emu``), keyed by a hash of every input and of the compiler command.

``MAGLOSS_EMU_ENGINE_CU=path`` builds another copy of engine.cu instead (mutation checks: a
deliberately broken kernel must make tests/test_engine_emulated.py fail).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
# Same restrictions as torch's extension build (CMakeLists.txt MAGLOSS_TORCH_LIKE_DEFS).
DEFINES = ["__CUDA_NO_HALF_OPERATORS__", "__CUDA_NO_HALF_CONVERSIONS__", "__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "__CUDA_NO_HALF2_OPERATORS__"]
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas"]

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)\s*<<<")


class EmulatorUnavailable(RuntimeError):
    """A tool the emulator needs is missing (the message names it)."""


def _matching_paren(text: str, start: int) -> int:
    depth = 0
    for k in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[k], 0)
        if depth == 0:
            return k
    raise ValueError(f"unbalanced parentheses after offset {start}")


def host_source(text: str, filename: str) -> str:
    """engine.cu with every ``<<<...>>>`` launch rewritten for cuda_emu; line numbers are kept."""
    out, pos = [f'#line 1 "{filename}"\n'], 0
    while (m := _LAUNCH.search(text, pos)) is not None:
        cfg_end = text.index(">>>", m.end())
        args_open = cfg_end + 3 + (len(text[cfg_end + 3:]) - len(text[cfg_end + 3:].lstrip()))
        if text[args_open] != "(":
            raise ValueError(f"{filename}: expected '(' after '>>>' at offset {args_open}")
        args_close = _matching_paren(text, args_open)
        name, cfg, args = m.group(1), text[m.end():cfg_end], text[args_open + 1:args_close]
        sep = ", " if args.strip() else ""
        out.append(text[pos:m.start()])
        out.append(f'::cuda_emu::launch("{name}", ::cuda_emu::config({cfg}), {name}{sep}{args})')
        pos = args_close + 1
    out.append(text[pos:])
    result = "".join(out)
    if "<<<" in result or ">>>" in result:
        raise ValueError(f"{filename}: a '<<<' launch was not rewritten")
    return result


def _cuda_roots():
    yield from filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield str(Path(nvcc).resolve().parents[1])
        try:  # a wrapper script's own dir says nothing; nvcc reports its real root as TOP
            probe = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                   timeout=60)
            yield from re.findall(r"^#\$ TOP=(\S+)", probe.stdout + probe.stderr, re.M)
        except (OSError, subprocess.SubprocessError):
            pass


def cuda_include_dir() -> Optional[Path]:
    """The toolkit's include dir: CUDA_HOME, CUDA_PATH, /usr/local/cuda, then nvcc's root (from
    its path, else as ``nvcc --dryrun`` reports it, which also sees through wrapper scripts)."""
    for root in _cuda_roots():
        inc = Path(root) / "include"
        if all((inc / h).is_file() for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return inc.resolve()
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("MAGLOSS_EMU_CACHE") or Path(tempfile.gettempdir()) / "magloss-emu")


def build(unit: str = "engine") -> Path:
    """Path of an emulated shared library, building it if needed. Units: "engine" (csrc/engine.cu
    with the C ABI of engine_capi.cpp) and "selftest" (emu_selftest.cu, the emulator's own test).

    Raises :class:`EmulatorUnavailable` if g++ or the CUDA headers are missing, and
    RuntimeError with the compiler's output if the build fails."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        raise EmulatorUnavailable("g++ not found (set CXX)")
    inc = cuda_include_dir()
    if inc is None:
        raise EmulatorUnavailable("CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) not found: set CUDA_HOME")
    if unit == "engine":
        cu = Path(os.environ.get("MAGLOSS_EMU_ENGINE_CU") or CSRC / "engine.cu").resolve()
        main = f'#line 1 "{HERE / "engine_capi.cpp"}"\n' + (HERE / "engine_capi.cpp").read_text()  # includes engine_host.inc
    else:
        cu = HERE / "emu_selftest.cu"
        main = f'#include "cuda_emu.h"\n#include "{unit}_host.inc"\n'
    source = host_source(cu.read_text(), str(cu))
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in [source, main, version, str(inc), *FLAGS, *DEFINES, Path(__file__).read_text()]:
        key.update(part.encode())
    for dep in [CSRC / "engine.cuh", CSRC / "margins.cuh", HERE / "cuda_emu.h"]:
        key.update(dep.read_bytes())
    out_dir = _cache_dir() / f"{unit}-{key.hexdigest()[:20]}"
    lib = out_dir / f"lib{unit}_emu.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{unit}_host.inc").write_text(source)
    (out_dir / f"{unit}_main.cpp").write_text(main)
    tmp = out_dir / f"lib{unit}_emu.{os.getpid()}.so"
    cmd: List[str] = [cxx, *FLAGS, *(f"-D{d}" for d in DEFINES), f"-I{out_dir}", f"-I{HERE}", f"-I{cu.parent}",
                      f"-I{CSRC}", "-isystem", str(inc), str(out_dir / f"{unit}_main.cpp"), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, lib)  # atomic: concurrent test processes never load a half-written library
    return lib


if __name__ == "__main__":
    print(build("engine"), build("selftest"))
