// Host side of the fused engine's input checks (see input_checks.h and docs/cuda.md, "Label and
// value checks"): read-back of the device flags without a host synchronization, and the
// error messages of magloss.checks.check_values, word for word.
#include "input_checks.h"

#include <atomic>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "engine.cuh"

namespace magloss {
namespace {

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Async checks not yet reported, oldest first. Heap-allocated and never freed, so that no
// CUDA call runs during static destruction at interpreter exit.
struct Queue {
  std::mutex mu;
  std::deque<std::unique_ptr<InputReadback>> items;
  std::atomic<int64_t> calls{0};
};

Queue& queue() {
  static Queue* q = new Queue();
  return *q;
}

}  // namespace

CheckMode check_mode() {
  if (capturing()) return CheckMode::Off;  // no event queries or host copies inside a CUDA graph
  const char* v = std::getenv("MAGLOSS_CHECK_INPUTS");
  const std::string s = v == nullptr ? "" : v;
  if (s.empty() || s == "async" || s == "1") return CheckMode::Async;
  if (s == "sync") return CheckMode::Sync;
  if (s == "off" || s == "0") return CheckMode::Off;
  TORCH_CHECK_VALUE(false, "MAGLOSS_CHECK_INPUTS: expected 'async' (default), 'sync' or 'off', got '", s, "'");
  return CheckMode::Off;  // unreachable
}

InputReadback::InputReadback(const at::Tensor& flags, const at::Tensor& labels, int64_t C, int64_t ignore_index,
                             cudaStream_t stream, int64_t call)
    : C_(C), ignore_index_(ignore_index), call_(call), device_(flags.get_device()) {
#ifdef MAGLOSS_EMULATED  // tests/emu: the CPU build of torch has no pinned-memory allocator
  const auto pinned = at::TensorOptions().device(at::kCPU);
#else
  const auto pinned = at::TensorOptions().device(at::kCPU).pinned_memory(true);
#endif
  flags_ = at::empty({flags.numel()}, pinned.dtype(at::kInt));
  labels_ = at::empty({labels.numel()}, pinned.dtype(labels.scalar_type()));
  // Device -> pinned host copies on the current stream (`stream`): asynchronous.
  flags_.copy_(flags, /*non_blocking=*/true);
  labels_.copy_(labels, /*non_blocking=*/true);
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event_, stream));
}

InputReadback::~InputReadback() {
  if (event_ != nullptr) cudaEventDestroy(event_);  // no throw from a destructor
}

bool InputReadback::finished(bool wait) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  if (wait) {
    C10_CUDA_CHECK(cudaEventSynchronize(event_));
    return true;
  }
  const cudaError_t err = cudaEventQuery(event_);
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();  // "not ready" is not an error: clear it, as at::cuda::CUDAEvent::query does
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}

std::string InputReadback::failure() const {
  const int32_t* f = flags_.data_ptr<int32_t>();
  if (f[engine::FLAG_LABEL] != engine::FLAG_CLEAR) {
    const int64_t row = f[engine::FLAG_LABEL];
    const int64_t value = labels_.scalar_type() == at::kLong ? labels_.data_ptr<int64_t>()[row]
                                                             : labels_.data_ptr<int32_t>()[row];
    return c10::str("labels: expected class indices in [0, ", C_, ") or ignore_index=", ignore_index_, ", got ",
                    value, " at row ", row);
  }
  if (f[engine::FLAG_EMBEDDINGS] != engine::FLAG_CLEAR) {
    return c10::str("embeddings: contains NaN or Inf (row ", f[engine::FLAG_EMBEDDINGS], ")");
  }
  if (f[engine::FLAG_WEIGHT] != engine::FLAG_CLEAR) {
    return c10::str("weight: contains NaN or Inf (row ", f[engine::FLAG_WEIGHT], ")");
  }
  return "";
}

void InputReadback::raise_if_failed() {
  finished(/*wait=*/true);
  const std::string msg = failure();
  TORCH_CHECK_VALUE(msg.empty(), msg);
}

std::unique_ptr<InputReadback> submit_input_check(CheckMode mode, const at::Tensor& flags, const at::Tensor& labels,
                                                  int64_t C, int64_t ignore_index, cudaStream_t stream) {
  if (mode == CheckMode::Off) return nullptr;
  Queue& q = queue();
  auto rb = std::make_unique<InputReadback>(flags, labels, C, ignore_index, stream, ++q.calls);
  if (mode == CheckMode::Sync) return rb;
  const std::lock_guard<std::mutex> lock(q.mu);
  q.items.push_back(std::move(rb));
  return nullptr;
}

void poll_input_checks(bool wait) {
  Queue& q = queue();
  std::vector<std::unique_ptr<InputReadback>> done;
  {
    const std::lock_guard<std::mutex> lock(q.mu);
    if (q.items.empty() || (!wait && capturing())) return;
    for (auto it = q.items.begin(); it != q.items.end();) {
      if (wait || (*it)->finished(/*wait=*/false)) {
        done.push_back(std::move(*it));
        it = q.items.erase(it);
      } else {
        ++it;
      }
    }
  }
  std::string first;
  int64_t more = 0;
  for (auto& rb : done) {
    if (wait) rb->finished(/*wait=*/true);  // outside the lock
    const std::string msg = rb->failure();
    if (msg.empty()) continue;
    if (first.empty()) {
      first = c10::str(msg, " [reported late: found by the asynchronous input check of fused forward call #",
                       rb->call(), "; MAGLOSS_CHECK_INPUTS=sync raises it in that call]");
    } else {
      ++more;
    }
  }
  if (more > 0) first += c10::str(" (", more, " later call(s) failed their input check too)");
  TORCH_CHECK_VALUE(first.empty(), first);
}

void flush_input_checks() { poll_input_checks(/*wait=*/true); }

}  // namespace magloss
