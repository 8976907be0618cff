// What the CPU build of torch lacks for the fused engine's boundary to run under the emulator
// (tests/emu/build.py links this into the emulated extension):
//
// * Emulated device memory. The CPU allocator is replaced, when the extension loads, by one that
//   puts guard bands around every allocation, fills new memory with 0xff bytes (NaN in fp32, fp16
//   and bf16, as uninitialized device memory should be treated) and tells the race / bounds
//   detector about it: a kernel access in a guard band is reported as out of bounds. It keeps
//   the caching allocator's statistics (bytes allocated now, the peak since the last reset:
//   emu_memory_allocated, emu_max_memory_allocated, emu_reset_peak_memory_stats), so the GPU
//   suite's memory tests run on the emulator too.
// * The cuBLAS products with fp16/bf16 operands and fp32 accumulation and output
//   (aten::mm.dtype, aten::addmm.dtype and their out= forms), which have no CPU kernel: fp16 and
//   bf16 values are exact in fp32, so an fp32 product of the widened operands is "half in, fp32
//   accumulate" (the order of the sums differs from cuBLAS, as any two BLAS libraries do).
#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "cuda_emu_host.h"

namespace {

constexpr size_t kGuard = 256;  // bytes on each side; a multiple of 64 keeps torch's alignment

// Allocation statistics: bytes of every live allocation (without its guard bands) and the peak.
struct MemoryStats {
  std::mutex mutex;
  std::unordered_map<void*, size_t> live;
  uint64_t allocated = 0, peak = 0;
};
MemoryStats& stats() {
  static MemoryStats s;  // never destroyed before the last tensor: function-local, leaked at exit
  return s;
}

// The context is the caller's pointer (torch asserts data == context for CPU allocations).
void guarded_delete(void* ptr) {
  void* base = static_cast<char*>(ptr) - kGuard;
  {
    auto& s = stats();
    std::lock_guard<std::mutex> lock(s.mutex);
    auto it = s.live.find(base);
    if (it != s.live.end()) {
      s.allocated -= it->second;
      s.live.erase(it);
    }
  }
  cuda_emu::untrack_allocation(base);
  c10::free_cpu(base);
}

struct GuardedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    auto* base = static_cast<char*>(c10::alloc_cpu(n + 2 * kGuard));
    std::memset(base, 0xff, n + 2 * kGuard);
    cuda_emu::track_allocation(base, kGuard, n, kGuard);
    {
      auto& s = stats();
      std::lock_guard<std::mutex> lock(s.mutex);
      s.live[base] = n;
      s.allocated += n;
      if (s.allocated > s.peak) s.peak = s.allocated;
    }
    return {base + kGuard, base + kGuard, &guarded_delete, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &guarded_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

GuardedAllocator allocator;

const bool installed = [] {
  c10::SetCPUAllocator(&allocator, /*priority=*/100);
  return true;
}();

}  // namespace

// The emulated device memory's statistics (tests/emu/engine.py, as torch.cuda's of the same names).
extern "C" uint64_t emu_memory_allocated() {
  std::lock_guard<std::mutex> lock(stats().mutex);
  return stats().allocated;
}
extern "C" uint64_t emu_max_memory_allocated() {
  std::lock_guard<std::mutex> lock(stats().mutex);
  return stats().peak;
}
extern "C" void emu_reset_peak_memory_stats() {
  std::lock_guard<std::mutex> lock(stats().mutex);
  stats().peak = stats().allocated;
}

namespace {

at::Tensor widened(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat); }

void check_out_dtype(const at::Tensor& a, at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == at::kFloat && (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16 ||
                                          a.scalar_type() == at::kFloat),
              "emulated mm.dtype: expected fp16/bf16/fp32 operands with out_dtype=float32, got ", a.scalar_type(),
              " -> ", out_dtype);
}

at::Tensor mm_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  check_out_dtype(a, out_dtype);
  return at::mm(widened(a), widened(b));
}

at::Tensor& mm_dtype_out(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype, at::Tensor& out) {
  check_out_dtype(a, out_dtype);
  return at::mm_out(out, widened(a), widened(b));
}

at::Tensor addmm_dtype(const at::Tensor& self, const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype,
                       const at::Scalar& beta, const at::Scalar& alpha) {
  check_out_dtype(a, out_dtype);
  return at::addmm(self.to(at::kFloat), widened(a), widened(b), beta, alpha);
}

at::Tensor& addmm_dtype_out(const at::Tensor& self, const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype,
                            const at::Scalar& beta, const at::Scalar& alpha, at::Tensor& out) {
  check_out_dtype(a, out_dtype);
  return at::addmm_out(out, self, widened(a), widened(b), beta, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, CPU, m) {
  m.impl("mm.dtype", mm_dtype);
  m.impl("mm.dtype_out", mm_dtype_out);
  m.impl("addmm.dtype", addmm_dtype);
  m.impl("addmm.dtype_out", addmm_dtype_out);
}
