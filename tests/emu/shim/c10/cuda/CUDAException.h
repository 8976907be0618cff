// Emulator stand-in for c10/cuda/CUDAException.h (tests/emu/build.py puts this directory first on
// the include path of the torch boundary): the same two macros, over the emulated CUDA runtime.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const cudaError_t c10_emu_err = (EXPR);                                           \
    TORCH_CHECK(c10_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(c10_emu_err)); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
