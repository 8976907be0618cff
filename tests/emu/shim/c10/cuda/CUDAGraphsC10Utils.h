// Emulator stand-in for c10/cuda/CUDAGraphsC10Utils.h: capture status set by emu_set_capturing().
#pragma once

#include "cuda_emu_host.h"

namespace c10::cuda {
enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() {
  return ::cuda_emu::capturing() ? CaptureStatus::Active : CaptureStatus::None;
}
}  // namespace c10::cuda
