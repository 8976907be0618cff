// Emulator stand-in for c10/cuda/CUDAStream.h: one stream, the null stream, on which every emulated
// launch runs to completion when it is enqueued.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

namespace c10::cuda {
class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
}  // namespace c10::cuda
