"""Build script: pure Python everywhere, plus the CUDA extension ``magloss._C`` where possible.

Switches (environment variables):

* ``MAGLOSS_BUILD_CUDA=1`` forces the CUDA build (fails loudly if torch has no CUDA or
  no toolkit is found); ``=0`` skips it; unset (default) builds it when the installed
  torch has CUDA and a toolkit (``CUDA_HOME``/nvcc) is found.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, as for any torch extension.
  When unset and no GPU is visible we default to "7.5;8.0;8.6;9.0+PTX" so that a build
  on a GPU-less machine still runs on Turing through Hopper.
* ``MAGLOSS_NVCC_THREADS`` (default 2) is passed to nvcc ``--threads``.

The CUDA build needs the torch it compiles against at build time, so use
``pip install --no-build-isolation .`` (with build isolation pip hides the installed
torch and the result is the pure-Python package).
"""

import glob
import os

from setuptools import setup

#: the architectures built when none is asked for and no GPU is visible: csrc/cuda_archs.txt (the one
#: list; CMakeLists.txt and .ci/compile_check.sh read it too), plus PTX of the newest for later GPUs
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cuda_archs.txt")) as _f:
    DEFAULT_ARCHS = _f.read().strip() + "+PTX"


def _cuda_extension():
    mode = os.environ.get("MAGLOSS_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        print("magloss: MAGLOSS_BUILD_CUDA=0, building the pure-Python package")
        return [], {}
    forced = mode in ("1", "true", "yes", "on")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if forced:
            raise RuntimeError("MAGLOSS_BUILD_CUDA=1 but torch is not importable at build time; "
                               "install torch first and use `pip install --no-build-isolation .`") from exc
        print("magloss: torch not visible at build time (build isolation?), building the pure-Python package")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    reason = None
    if torch.version.cuda is None:
        reason = f"the installed torch {torch.__version__} has no CUDA"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    elif not sources:
        reason = "no sources under csrc/"
    if reason is not None:
        if forced:
            raise RuntimeError(f"MAGLOSS_BUILD_CUDA=1 but {reason}")
        print(f"magloss: {reason}; building the pure-Python package")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    threads = os.environ.get("MAGLOSS_NVCC_THREADS", "2")
    ext = CUDAExtension(
        name="magloss._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for
        # torch >= 2.15, whose headers reject C++17); the kernels themselves only need C++17.
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", f"--threads={threads}"],
        },
    )
    print(f"magloss: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
