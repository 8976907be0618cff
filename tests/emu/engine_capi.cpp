// C ABI of csrc/engine.cu compiled as host code under the CUDA emulator (tests/emu/cuda_emu.h).
// tests/emu/build.py writes engine_host.inc (engine.cu with its <<<>>> launches rewritten) and
// compiles this file into a shared library for tests/emu/driver.py (ctypes). Every emu_* launcher
// forwards to the engine::launch_* of the same name with a null stream.
#include "cuda_emu.h"

#include "engine_host.inc"

using magloss::MarginParams;
using magloss::engine::DType;
using magloss::engine::RowState;

#define FIELD(S, F) static_cast<int64_t>(offsetof(S, F))

extern "C" {

// [sizeof(RowState), offsets of its fields in declaration order, sizeof(MarginParams), offsets of
// its fields]: compared with the ctypes mirrors in driver.py, so a layout change fails loudly.
int emu_layout(int64_t* out) {
  const int64_t v[] = {
      sizeof(RowState), FIELD(RowState, a), FIELD(RowState, inv_a), FIELD(RowState, scale), FIELD(RowState, cy),
      FIELD(RowState, zlab), FIELD(RowState, dpsi_dc), FIELD(RowState, dpsi_da), FIELD(RowState, lab),
      FIELD(RowState, zy), FIELD(RowState, reg), FIELD(RowState, run_max), FIELD(RowState, run_sum),
      FIELD(RowState, grad_lse), FIELD(RowState, grad_zy), FIELD(RowState, grad_reg), FIELD(RowState, grad_norms),
      FIELD(RowState, lse), FIELD(RowState, dz_y), FIELD(RowState, g_y), FIELD(RowState, grad_a),
      FIELD(RowState, gc_row), FIELD(RowState, sph),
      sizeof(MarginParams), FIELD(MarginParams, kind), FIELD(MarginParams, scale), FIELD(MarginParams, m1),
      FIELD(MarginParams, m2), FIELD(MarginParams, m3), FIELD(MarginParams, l_a), FIELD(MarginParams, u_a),
      FIELD(MarginParams, l_m), FIELD(MarginParams, u_m), FIELD(MarginParams, easy_margin),
      FIELD(MarginParams, straight_through)};
  const int n = static_cast<int>(sizeof v / sizeof v[0]);
  if (out != nullptr) std::memcpy(out, v, sizeof v);
  return n;
}

// The engine's constants, so the driver never restates them.
void emu_constants(int64_t* out) {
  using namespace magloss::engine;
  const int64_t v[] = {LAB_NONE, LAB_BAD, FLAG_LABEL, FLAG_EMBEDDINGS, FLAG_WEIGHT, NUM_FLAGS, FLAG_CLEAR,
                       static_cast<int64_t>(DType::F32), static_cast<int64_t>(DType::F16),
                       static_cast<int64_t>(DType::BF16)};
  std::memcpy(out, v, sizeof v);
}

void emu_col_norms(int dtype, int w_dtype, const void* w, int64_t C, int64_t D, float* r, float* wnorm,
                   int32_t* flags) {
  magloss::engine::launch_col_norms(DType(dtype), DType(w_dtype), w, C, D, r, wnorm, flags, nullptr);
}

void emu_row_stage(int dtype, int w_dtype, const void* x, const void* w, const void* labels, int labels64, int64_t B,
                   int64_t C, int64_t D, int64_t ignore_index, const MarginParams* params, const float* lam,
                   const float* r, const RowState* rows, int backward, int32_t* flags) {
  magloss::engine::launch_row_stage(DType(dtype), DType(w_dtype), x, w, labels, labels64 != 0, B, C, D, ignore_index,
                                    *params, lam, r, *rows, backward != 0, flags, nullptr);
}

void emu_forward_epilogue(const float* tile, int64_t B, int64_t n, int64_t j0, const float* r,
                          const RowState* rows) {
  magloss::engine::launch_forward_epilogue(tile, B, n, j0, r, *rows, nullptr);
}

void emu_forward_finalize(int64_t B, const RowState* rows, float* lse) {
  magloss::engine::launch_forward_finalize(B, *rows, lse, nullptr);
}

void emu_backward_epilogue(float* tile, void* out, int out_dtype, int64_t B, int64_t n, int64_t j0, const float* r,
                           const RowState* rows, int scale_by_norm) {
  magloss::engine::launch_backward_epilogue(tile, out, DType(out_dtype), B, n, j0, r, *rows, scale_by_norm != 0,
                                            nullptr);
}

void emu_column_correction(int dtype, int w_dtype, const float* p, const void* w, const float* r, const float* wnorm,
                           int64_t n, int64_t j0, int64_t D, void* grad_w) {
  magloss::engine::launch_column_correction(DType(dtype), DType(w_dtype), p, w, r, wnorm, n, j0, D, grad_w, nullptr);
}

void emu_row_chain(int dtype, const void* x, const float* g_xhat, int64_t B, int64_t D, const RowState* rows,
                   int scale_by_norm, void* grad_x) {
  magloss::engine::launch_row_chain(DType(dtype), x, g_xhat, B, D, *rows, scale_by_norm != 0, grad_x, nullptr);
}

void emu_normalize_rows(int dtype, const void* x, int64_t B, int64_t D, const float* inv_a, int out_dtype,
                        void* xhat) {
  magloss::engine::launch_normalize_rows(DType(dtype), x, B, D, inv_a, DType(out_dtype), xhat, nullptr);
}

}  // extern "C"
