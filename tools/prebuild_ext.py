#!/usr/bin/env python3
"""Build the CUDA extension ``magloss._C`` ahead of time, keyed to its sources and its torch.

A GPU machine lent for a few minutes should spend them on tests, not on compiling. This
script compiles the extension on any machine with the GPU machine's Python and torch (no
GPU needed) into ``.prebuilt/<key>/``, a folder git ignores and the device call carries; the
GPU check (tests/gpu_check.sh) installs it from there, or builds it there if it is stale.

    python tools/prebuild_ext.py build      # compile into .prebuilt/<key>/ (skipped if present)
    python tools/prebuild_ext.py install    # copy .prebuilt/<key>/ into magloss/, building first if missing
    python tools/prebuild_ext.py key        # print the key
    python tools/prebuild_ext.py cuda-home  # print the toolkit directory the build uses

The key is the first 16 hex digits of a SHA-256 over every file under csrc/ and setup.py
(names and bytes), the torch version, torch's CUDA version, TORCH_CUDA_ARCH_LIST and the
interpreter's extension suffix (e.g. ``.cpython-312-x86_64-linux-gnu.so``): an artefact is
used only by the Python and torch it was built for, from the sources it was built from.
``.prebuilt/<key>/key.json`` lists these parts. A build removes the artefacts of other keys
(they are stale) so that what travels stays small.

Environment: ``TORCH_CUDA_ARCH_LIST`` (default 9.0: H100/H200), ``CUDA_HOME`` (default: see
:func:`cuda_home`), ``MAX_JOBS`` (parallel compile jobs, default the CPU count),
``MAGLOSS_PREBUILT_DIR`` (default ``<repo>/.prebuilt``).

The build runs setup.py (``MAGLOSS_BUILD_CUDA=1 python setup.py build_ext --inplace``) in a
scratch copy of the sources, so the working tree never gets a ``magloss/_C*.so`` that the
local torch could not load. Exit status 0 on success; a failure prints the compiler's last
lines and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = "9.0"
# what setup.py needs besides csrc/ (pyproject.toml names README.md; magloss/ is the package
# that receives the extension)
BUILD_INPUTS = ("setup.py", "pyproject.toml", "README.md", "csrc", "magloss")


def _prebuilt_dir() -> Path:
    return Path(os.environ.get("MAGLOSS_PREBUILT_DIR") or ROOT / ".prebuilt")


def _ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def key_parts() -> dict:
    """What the artefact depends on, besides the source bytes hashed into ``sources``."""
    import torch

    h = hashlib.sha256()
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()) + [ROOT / "setup.py"]
    for p in files:
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return {"sources": h.hexdigest(), "files": len(files), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS, "ext_suffix": _ext_suffix()}


def key(parts: dict | None = None) -> str:
    parts = parts or key_parts()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cuda_home() -> Path:
    """The toolkit the build uses: ``$CUDA_HOME``, else ``/usr/local/cuda-<torch's CUDA version>``,
    else ``/usr/local/cuda``, else two levels above the real path of ``nvcc`` on PATH; the first
    that holds both ``bin/nvcc`` and ``include/cuda_runtime_api.h``.

    torch itself guesses from the ``nvcc`` on PATH; where that is a wrapper script (e.g.
    ``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``) it guesses ``/usr/local``,
    which has no CUDA headers, and the build fails. Raises RuntimeError naming every directory
    tried when none qualifies.
    """
    import torch

    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    if torch.version.cuda:
        candidates.append(Path(f"/usr/local/cuda-{torch.version.cuda}"))
    candidates.append(Path("/usr/local/cuda"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    for c in candidates:
        if (c / "bin" / "nvcc").is_file() and (c / "include" / "cuda_runtime_api.h").is_file():
            return c
    raise RuntimeError("no CUDA toolkit found: none of " + ", ".join(map(str, candidates))
                       + " holds bin/nvcc and include/cuda_runtime_api.h; set CUDA_HOME")


def _artefact(folder: Path) -> Path | None:
    hits = sorted(folder.glob("_C*.so"))
    return hits[0] if hits else None


def _compile_seconds(build_dir: Path) -> dict:
    """Wall seconds of each object file, from ninja's log (how long a build takes on more cores
    is about the slowest one plus the link)."""
    out = {}
    for log in build_dir.glob("temp*/.ninja_log"):
        for line in log.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 4 and not line.startswith("#"):
                out[Path(fields[3]).name] = round((int(fields[1]) - int(fields[0])) / 1000, 1)
    return out


def build(force: bool = False) -> Path:
    """Compile the extension into ``<prebuilt>/<key>/`` and return that folder."""
    parts = key_parts()
    k = key(parts)
    dest = _prebuilt_dir() / k
    if not force and _artefact(dest) is not None:
        print(f"prebuilt {k}: already there ({dest})")
        return dest
    import torch

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} has no CUDA: cannot build the extension")
    home = cuda_home()
    env = dict(os.environ, MAGLOSS_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=parts["arch_list"], CUDA_HOME=str(home),
               MAX_JOBS=os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1), PYTHONDONTWRITEBYTECODE="1",
               PATH=f"{home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    print(f"building {k}: torch {parts['torch']} (CUDA {parts['torch_cuda']}), TORCH_CUDA_ARCH_LIST="
          f"{parts['arch_list']}, CUDA_HOME={home}, MAX_JOBS={env['MAX_JOBS']}", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="magloss_prebuild_") as tmp:
        for name in BUILD_INPUTS:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            else:
                shutil.copy2(src, Path(tmp) / name)
        log = Path(tmp) / "build.log"
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp, env=env,
                                stdout=f, stderr=subprocess.STDOUT).returncode
        so = _artefact(Path(tmp) / "magloss")
        if rc != 0 or so is None:
            sys.stdout.write("".join(log.read_text(errors="replace").splitlines(True)[-40:]))
            raise RuntimeError(f"build failed (setup.py exit status {rc})")
        steps = _compile_seconds(Path(tmp) / "build")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(so, staging / so.name)
        seconds = round(time.monotonic() - t0, 1)
        (staging / "key.json").write_text(json.dumps(dict(parts, key=k, cuda_home=str(home), build_seconds=seconds,
                                                           max_jobs=int(env["MAX_JOBS"]), compile_seconds=steps),
                                                      indent=1) + "\n")
    for old in _prebuilt_dir().iterdir():       # stale keys (and a previous partial build of this one)
        if old.is_dir() and old.name != staging.name:
            shutil.rmtree(old)
    staging.rename(dest)
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"built {k} in {seconds} s: {dest} ({size / 2**20:.1f} MiB); seconds per object: {steps}")
    return dest


def install(allow_build: bool = True) -> str:
    """Copy the artefact for the current key into magloss/ (building it first if missing and
    allowed). Returns "prebuilt" or "built"."""
    k = key()
    src = _prebuilt_dir() / k
    how = "prebuilt"
    if _artefact(src) is None:
        if not allow_build:
            raise RuntimeError(f"no prebuilt extension for key {k} under {_prebuilt_dir()}")
        have = sorted(p.name for p in _prebuilt_dir().glob("*")) if _prebuilt_dir().is_dir() else []
        print(f"no prebuilt extension for key {k} (have: {have or 'none'}): building")
        build()
        how = "built"
    so = _artefact(src)
    for old in (ROOT / "magloss").glob("_C*.so"):
        old.unlink()
    shutil.copy2(so, ROOT / "magloss" / so.name)
    print(f"installed {how} {k}: magloss/{so.name}")
    return how


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["build", "install", "key", "cuda-home"])
    ap.add_argument("--force", action="store_true", help="build: rebuild even if the artefact exists")
    ap.add_argument("--no-build", action="store_true", help="install: fail instead of building a missing artefact")
    args = ap.parse_args(argv)
    try:
        if args.action == "key":
            print(key())
        elif args.action == "cuda-home":
            print(cuda_home())
        elif args.action == "build":
            build(force=args.force)
        else:
            install(allow_build=not args.no_build)
    except RuntimeError as exc:
        print(f"prebuild_ext: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
