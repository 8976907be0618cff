// Host-side entry points of the CUDA emulator's runtime (cuda_emu_runtime.cpp) used by the shims
// that stand in for c10/cuda when the torch boundary is compiled for the emulator (build.py).
#pragma once

#include <cstddef>

namespace cuda_emu {
/// The sticky error of the last failed launch, or nullptr.
const char* error();
/// Tracks [base + guard_lo, base + guard_lo + bytes) as emulated device memory, with guard bands.
void track_allocation(void* base, size_t guard_lo, size_t bytes, size_t guard_hi);
void untrack_allocation(void* base);
/// Whether the emulated current stream is being captured into a CUDA graph (emu_set_capturing).
bool capturing();
}  // namespace cuda_emu
