"""Builds the fused engine for the CPU emulator: the real torch boundary and kernels, run on CPU tensors.

Two products, cached under ``$MAGLOSS_EMU_CACHE`` (default ``<tmp>/magloss-emu``), keyed by a hash
of every input, the compiler and the torch version:

* ``build("engine")``: a Python extension module with csrc/bindings.cpp, csrc/margin_ce.cpp and
  csrc/input_checks.cpp compiled unchanged (``-DMAGLOSS_EMULATED``) against the CPU build of torch,
  with tests/emu/shim/ first on the include path (stand-ins for the c10/cuda headers), plus
  csrc/engine.cu as host code under the emulator (cuda_emu.h), the emulator's runtime
  (cuda_emu_runtime.cpp: also the CUDA runtime calls the boundary makes) and torch_shims.cpp
  (guarded device memory; the half-in/fp32-out products).
* ``build("selftest")``: a plain shared library (ctypes) of emu_selftest.cu and the runtime, the
  emulator's own test kernels (well-defined ones, and one per kind of error it must report).

The only non-C++ syntax in a .cu file is the launch ``kernel<<<grid, block, shmem, stream>>>(args)``;
:func:`host_source` rewrites each one, line numbers unchanged, into
``::cuda_emu::launch("kernel", ::cuda_emu::config(grid, block, shmem, stream), kernel, args)``.
Kernel translation units are compiled with ``-fsanitize=thread`` and linked without
ThreadSanitizer's runtime: the runtime's own race and bounds detector serves the hooks.

The engine also gets csrc/onevsall.cu (the one-vs-all kernels) as a second instrumented kernel
unit, ``ova_kernels.cpp``; ``MAGLOSS_EMU_ONEVSALL_CU=path`` builds another copy of it (its mutants).
csrc/*.inc (a boundary file compiled inside margin_ce.cpp) count as headers for the cache keys.

``MAGLOSS_EMU_ENGINE_CU=path`` builds another copy of engine.cu instead (mutation checks: a
deliberately broken kernel must make the emulated suites fail); a ``margins.cuh`` or ``reduce.cuh``
next to it (or next to the onevsall.cu override) is included by that kernel unit instead of csrc's
(the boundary keeps csrc's).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
SHIM = HERE / "shim"
# Same restrictions as torch's extension build (CMakeLists.txt MAGLOSS_TORCH_LIKE_DEFS).
KERNEL_DEFINES = ["__CUDA_NO_HALF_OPERATORS__", "__CUDA_NO_HALF_CONVERSIONS__", "__CUDA_NO_BFLOAT16_CONVERSIONS__",
                  "__CUDA_NO_HALF2_OPERATORS__"]
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-Wall", "-Wno-unknown-pragmas"]
MODULE = "_C_emu"

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
    """A .cu file with every ``<<<...>>>`` launch rewritten for cuda_emu; line numbers are kept."""
    out, pos = [f'#include "cuda_emu.h"\n#line 1 "{filename}"\n'], 0
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


def _compile(cmd: List[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def build(unit: str = "engine") -> Path:
    """Path of the emulated engine extension ("engine") or the self-test library ("selftest"),
    building it if needed. Raises :class:`EmulatorUnavailable` if g++ or the CUDA headers are
    missing, and RuntimeError with the compiler's output if the build fails."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        raise EmulatorUnavailable("g++ not found (set CXX)")
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise EmulatorUnavailable("CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) not found: set CUDA_HOME")
    if unit not in ("engine", "selftest"):
        raise ValueError(f"unit: expected 'engine' or 'selftest', got {unit!r}")
    cu = Path(os.environ.get("MAGLOSS_EMU_ENGINE_CU") or CSRC / "engine.cu").resolve()
    kernels = host_source(cu.read_text(), str(cu))
    if unit == "selftest":  # engine.cu's device functions are in the same translation unit (its tests use them)
        kernels += host_source((HERE / "emu_selftest.cu").read_text(), str(HERE / "emu_selftest.cu"))
    runtime = HERE / "cuda_emu_runtime.cpp"
    base = [cxx, *FLAGS, "-isystem", str(cuda_inc)]
    # (source, extra flags); the kernel TU is instrumented for the race and bounds detector.
    # -g: the detector's reports name the kernel's source line (addr2line).
    # The kernel's own directory comes before csrc/: a mutant may bring its own margins.cuh (mutate.py).
    units = [("kernels.cpp", ["-fsanitize=thread", "-g", *(f"-D{d}" for d in KERNEL_DEFINES), f"-I{HERE}",
                              f"-I{cu.parent}", f"-I{CSRC}"]),
             (str(runtime), [f"-I{HERE}"])]
    # Generated kernel units: name -> (host source, the .cu it comes from).
    generated = {"kernels.cpp": (kernels, cu)}
    if unit == "engine":
        ova = Path(os.environ.get("MAGLOSS_EMU_ONEVSALL_CU") or CSRC / "onevsall.cu").resolve()
        generated["ova_kernels.cpp"] = (host_source(ova.read_text(), str(ova)), ova)
        units.insert(1, ("ova_kernels.cpp", [*units[0][1][:-2], f"-I{ova.parent}", f"-I{CSRC}"]))
    link: List[str] = []
    suffix = ".so"
    key = hashlib.sha256(unit.encode())
    if unit == "engine":
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths

        torch_flags = [f"-I{SHIM}", *(f for p in include_paths() for f in ("-isystem", p)),
                       "-isystem", sysconfig.get_paths()["include"], "-DMAGLOSS_EMULATED",
                       f"-DTORCH_EXTENSION_NAME={MODULE}", "-DTORCH_API_INCLUDE_EXTENSION_H",
                       f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{CSRC}"]
        units += [(str(CSRC / f), torch_flags) for f in ("bindings.cpp", "margin_ce.cpp", "input_checks.cpp")]
        units += [(str(HERE / "torch_shims.cpp"), torch_flags)]
        libdir = library_paths()[0]
        link = [f"-L{libdir}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{libdir}"]
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        key.update(torch.__version__.encode())
        key.update(sys.version.encode())
    # Objects are cached one by one (a mutated engine.cu recompiles only the kernels), each keyed by
    # its source, the flags, the compiler, the headers it may include and the torch/Python versions.
    key.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    key.update(str(cuda_inc).encode())
    key.update(Path(__file__).read_text().encode())
    headers = [HERE / "cuda_emu.h", *sorted(CSRC.glob("*.h")), *sorted(CSRC.glob("*.cuh")), *sorted(CSRC.glob("*.inc")),
               *sorted(SHIM.rglob("*.h"))]
    for h in headers:
        key.update(h.read_bytes())
    # Headers next to another engine.cu (a mutant's margins.cuh) reach the kernels only.
    def kernel_headers(path: Path) -> bytes:
        return b"".join(h.read_bytes() for h in sorted(path.parent.glob("*.cuh"))) if path.parent != CSRC else b""

    cache = _cache_dir()
    (cache / "obj").mkdir(parents=True, exist_ok=True)
    objs, todo = [], []
    for src, extra in units:
        text = generated[src][0] if src in generated else Path(src).read_text()
        k = key.copy()
        if src in generated:
            k.update(kernel_headers(generated[src][1]))
        k.update(text.encode())
        k.update(" ".join(extra).encode())
        obj = cache / "obj" / f"{Path(src).stem}-{k.hexdigest()[:20]}.o"
        objs.append(obj)
        if obj.is_file():
            continue
        if src in generated:
            src = str(cache / "obj" / f"{obj.stem}.cpp")
            Path(src).write_text(text)
        todo.append([*base, *extra, "-c", src, "-o", f"{obj}.{os.getpid()}.tmp"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(_compile, todo))
    for cmd in todo:
        os.replace(cmd[-1], cmd[-1].rsplit(".", 2)[0])
    link_key = hashlib.sha256("".join(o.name for o in objs).encode() + " ".join(link).encode()).hexdigest()[:20]
    out_dir = cache / f"{unit}-{link_key}"
    lib = out_dir / (f"{MODULE}{suffix}" if unit == "engine" else f"lib{unit}_emu.so")
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{lib.name}.{os.getpid()}.tmp"
    _compile([cxx, "-shared", *map(str, objs), *link, "-o", str(tmp)])
    os.replace(tmp, lib)  # atomic: concurrent test processes never load a half-written library
    return lib


if __name__ == "__main__":
    print(build("engine"), build("selftest"))
