// The input checks of the fused engine: reporting the device-side label / NaN / Inf flags to
// the host without a host synchronization on the hot path (docs/cuda.md, "Label and value
// checks"). The flags themselves are computed by the row stage and the column-norm kernel
// (engine.cu); this file only reads them back and raises magloss.checks.check_values's errors.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace magloss {

/// MAGLOSS_CHECK_INPUTS, read at each call:
///   Async (unset, "async", "1"): read back without waiting; the error is raised by the next
///         fused call (forward or backward) that finds the read-back finished, or by
///         flush_input_checks(). Bad rows meanwhile give lse = NaN and no gradient.
///   Sync  ("sync"): the forward waits for its own check and raises in the offending call.
///   Off   ("0", "off"): no read-back; bad rows only give lse = NaN.
/// While the current stream is captured into a CUDA graph the mode is always Off.
enum class CheckMode { Async, Sync, Off };
CheckMode check_mode();

/// One forward call's read-back: pinned host copies of the device flags and the labels, and a
/// CUDA event recorded after the copies on the stream. Owns (and destroys) the event.
class InputReadback {
 public:
  InputReadback(const at::Tensor& flags, const at::Tensor& labels, int64_t C, int64_t ignore_index,
                cudaStream_t stream, int64_t call);
  InputReadback(const InputReadback&) = delete;
  InputReadback& operator=(const InputReadback&) = delete;
  ~InputReadback();
  /// Whether the copies have landed; wait = true blocks until they have.
  bool finished(bool wait);
  /// magloss.checks.check_values's error message for the first failing check, "" if all passed.
  /// Only valid once finished() returned true.
  std::string failure() const;
  int64_t call() const { return call_; }
  /// Sync mode: wait, then raise the failure (ValueError, check_values's exact message).
  void raise_if_failed();

 private:
  at::Tensor flags_, labels_;  // pinned host copies
  int64_t C_, ignore_index_, call_;
  int device_;
  cudaEvent_t event_ = nullptr;
};

/// Starts the read-back of one forward call's flags ([NUM_FLAGS] int32, device) and labels
/// ([B], device) on `stream`; call it right after the kernels that write the flags have been
/// enqueued. Async: queues it for poll_input_checks() and returns nullptr. Sync: returns it; the
/// caller enqueues the rest of the call and then calls raise_if_failed(). Off: nullptr.
std::unique_ptr<InputReadback> submit_input_check(CheckMode mode, const at::Tensor& flags, const at::Tensor& labels,
                                                  int64_t C, int64_t ignore_index, cudaStream_t stream);

/// Raises the error of the oldest queued check that has finished and failed (and forgets every
/// finished check). wait = false never blocks (cudaEventQuery); wait = true waits for all queued
/// checks first. Called on entry to every fused forward and backward (wait = false) and by
/// magloss.flush_input_checks() (wait = true).
void poll_input_checks(bool wait);

/// poll_input_checks(true): the Python-visible magloss._C.flush_input_checks().
void flush_input_checks();

}  // namespace magloss
