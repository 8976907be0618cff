#!/usr/bin/env bash
# Compile check of magloss's CUDA engine without a GPU (and without a CUDA build of torch).
#
#   1. CMake: csrc/engine.cu, csrc/onevsall.cu (torch-free kernels) with nvcc for sm_75/80/86/90 in one nvcc
#      invocation, plus the host test of the margin functions, run by ctest.
#   2. The torch boundary, the input checks and the pybind11 bindings (csrc/*.cpp):
#      g++ -fsyntax-only against the installed torch's headers, when torch and pybind11 import.
#      A CPU-only torch wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h);
#      a one-line stand-in is written into the temp dir for this check only.
#
# Exits 0 with "nvcc not found: compile check skipped" when there is no CUDA toolkit.
# Env: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), PYTHON (default python3),
#      MAGLOSS_CUDA_ARCHS (default: csrc/cuda_archs.txt), KEEP_BUILD=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "nvcc not found: compile check skipped"
  exit 0
fi
if ! command -v cmake >/dev/null 2>&1; then
  echo "cmake not found: compile check skipped"
  exit 0
fi
PYTHON="${PYTHON:-python3}"
ARCHS="${MAGLOSS_CUDA_ARCHS:-$(tr -d '.\n' <csrc/cuda_archs.txt)}"   # the one list, "7.5;8.0" -> "75;80"
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/magloss-compile-check.XXXXXX")"
cleanup() { if [[ "${KEEP_BUILD:-0}" != "1" ]]; then rm -rf "$BUILD"; else echo "build kept in $BUILD"; fi; }
trap cleanup EXIT

echo "== compile check: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "== [1/2] cmake: csrc/engine.cu for sm_${ARCHS//;/, sm_} + tests/cpp (ctest)"
start=$SECONDS
cmake -S . -B "$BUILD/cmake" -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
  -DCMAKE_BUILD_TYPE=Release >"$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log"; echo "FAIL: cmake configure"; exit 1; }
cmake --build "$BUILD/cmake" -j 2 || { echo "FAIL: cmake build"; exit 1; }
ctest --test-dir "$BUILD/cmake" --output-on-failure || { echo "FAIL: ctest"; exit 1; }
echo "   cmake build + ctest: OK ($((SECONDS - start)) s)"

echo "== [2/2] torch boundary + bindings: g++ -fsyntax-only against the installed torch headers"
if ! INCS="$("$PYTHON" - <<'PY' 2>/dev/null
import sysconfig
import pybind11
import torch.utils.cpp_extension as ce
paths = ce.include_paths() + [sysconfig.get_paths()["include"], pybind11.get_include()]
print(" ".join(paths))
PY
)"; then
  echo "   torch/pybind11 not importable with $PYTHON: boundary check skipped"
  echo "compile check: OK (kernels only)"
  exit 0
fi
CUDA_INC=""
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; do
  if [[ -n "$d" && -f "$d/include/cuda_runtime.h" ]]; then CUDA_INC="$d/include"; break; fi
done
if [[ -z "$CUDA_INC" ]]; then echo "FAIL: cuda_runtime.h not found (set CUDA_HOME)"; exit 1; fi
STUB="$BUILD/stub"
TORCH_INC="${INCS%% *}"
if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$STUB/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
fi
ISYS=(-isystem "$STUB")
for p in $INCS "$CUDA_INC"; do ISYS+=(-isystem "$p"); done
CXX="${CXX:-g++}"
for src in csrc/*.cpp; do
  start=$SECONDS
  "$CXX" -std=c++20 -O2 -fsyntax-only -Wall -Wextra -Werror -Icsrc "${ISYS[@]}" -DTORCH_EXTENSION_NAME=_C \
    -DTORCH_API_INCLUDE_EXTENSION_H "$src" || { echo "FAIL: $src"; exit 1; }
  echo "   $src: OK ($((SECONDS - start)) s)"
done
echo "compile check: OK"
