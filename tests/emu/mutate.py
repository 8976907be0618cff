"""Mutation check of the emulated suites: deliberately broken copies of csrc/engine.cu must fail them.

Each mutant is one realistic kernel bug, written as a (name, kind, exact old snippet, new snippet)
row of :data:`MUTANTS` and applied to the text of csrc/engine.cu, csrc/margins.cuh, csrc/onevsall.cu
(the one-vs-all kernels, built as the emulator's second kernel unit, ``MAGLOSS_EMU_ONEVSALL_CU``) or
csrc/reduce.cuh (the conversions and warp/block sums both kernel files include: a mutant of it reaches
both units, as the bug would); a snippet that no longer matches
exactly once is an error: the table must follow the engine). For each mutant the tool writes the
mutated file, builds it for the emulator (``MAGLOSS_EMU_ENGINE_CU``: only the kernel object is
recompiled, tests/emu/build.py), runs the emulated suites with ``-x``, the tests named by
:data:`ORDER` first (quick, broad ones) and records "killed" with the first failing test, or "survived", and the time.
A build error is reported as "invalid" (the row is wrong, not the suite).

    python tests/emu/mutate.py                      # every mutant, 2 at a time
    python tests/emu/mutate.py --only NAME,NAME     # some of them
    python tests/emu/mutate.py --list               # the table (each row checked against engine.cu)
    python tests/emu/mutate.py --baseline           # first: the unmutated engine must pass

The JSON summary (``--json``, default ``<cache>/mutants/summary.json``) lists each mutant's name,
kind, status, first failing test and seconds, and the kill rate. The mutants are the bug kinds a
kernel author makes: a dropped rescale in the online softmax, an accumulator overwritten instead of
added to, a missing barrier between two uses of shared memory, a non-atomic update of a value
several blocks write, a loop that stops one element short, a wrong normalization factor, a wrong
index or stride, a wrong lane/warp index, a reduction over one warp too few, a missing thread guard,
state used before it is initialized, swapped arguments, rounding on the wrong side, an early return
that skips a barrier for some threads, a read of a buffer after an aliased write, label-code and
flag mix-ups, dispatch macro slips.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENGINE_CU = ROOT / "csrc" / "engine.cu"
MARGINS_CUH = ROOT / "csrc" / "margins.cuh"
REDUCE_CUH = ROOT / "csrc" / "reduce.cuh"
ONEVSALL_CU = ROOT / "csrc" / "onevsall.cu"
PY = sys.executable


class Mutant(NamedTuple):
    name: str
    kind: str
    old: str
    new: str
    # or "margins.cuh" (the device functions engine.cu includes), "onevsall.cu", or "reduce.cuh" (the
    # helpers engine.cu and onevsall.cu include)
    file: str = "engine.cu"


M = Mutant
MUTANTS: List[Mutant] = [
    # ---- online softmax ------------------------------------------------------------------------
    M("epilogue_dropped_rescale", "dropped rescale",
      "l = l * expf(m - z) + 1.0f;", "l = l + 1.0f;"),
    M("merge_dropped_rescale", "dropped rescale",
      "l = l * expf(m - mx) + l2 * expf(m2 - mx);", "l = l + l2 * expf(m2 - mx);"),
    M("merge_swapped_rescale", "swapped arguments",
      "l = l * expf(m - mx) + l2 * expf(m2 - mx);", "l = l * expf(m2 - mx) + l2 * expf(m - mx);"),
    M("merge_keeps_old_max", "dropped update",
      "  m = mx;\n}", "}"),
    M("merge_empty_drops_nan", "NaN swallowed",
      "l = l + l2;  // 0, or NaN", "l = 0.0f;"),
    M("epilogue_run_state_overwritten", "accumulator overwritten",
      "softmax_merge(rm, rl, m, l);", "rm = m;\n    rl = l;"),
    M("finalize_drops_max", "wrong normalization factor",
      "rows.run_max[i] + logf(rows.run_sum[i])", "logf(rows.run_sum[i])"),
    M("warp_merge_skips_last_step", "reduction too short",
      "  for (int off = kWarp / 2; off > 0; off >>= 1) {\n    const float m2", "  for (int off = kWarp / 2; off > 1; off >>= 1) {\n    const float m2"),
    # ---- accumulators ----------------------------------------------------------------------------
    M("gc_row_overwritten", "accumulator overwritten",
      "rows.gc_row[i] += acc_gc;", "rows.gc_row[i] = acc_gc;"),
    M("sph_overwritten", "accumulator overwritten",
      "if (sbn) rows.sph[i] += acc_sph;", "if (sbn) rows.sph[i] = acc_sph;"),
    M("acc_gc_overwritten", "accumulator overwritten",
      "acc_gc += (kept && col != lab) ? dz * z : g * c;", "acc_gc = (kept && col != lab) ? dz * z : g * c;"),
    M("col_norms_ss_overwritten", "accumulator overwritten",
      "ss += v * v;", "ss = v * v;"),
    M("correction_dot_overwritten", "accumulator overwritten",
      "dot += load_w<T>(wrow + k) * prow[k];", "dot = load_w<T>(wrow + k) * prow[k];"),
    M("grad_a_overwritten", "accumulator overwritten",
      "ga += scale * dzy * da;", "ga = scale * dzy * da;"),
    # ---- barriers, early exits, guards -----------------------------------------------------------
    M("block_sum_missing_barrier", "missing barrier",
      "  if (lane == 0) { sa[warp] = a; sb[warp] = b; }\n  __syncthreads();", "  if (lane == 0) { sa[warp] = a; sb[warp] = b; }",
      "reduce.cuh"),
    M("block_merge_missing_barrier", "missing barrier",
      "  if (lane == 0) { sm[warp] = m; sl[warp] = l; }\n  __syncthreads();", "  if (lane == 0) { sm[warp] = m; sl[warp] = l; }"),
    M("block_merge_barrier_too_early", "missing barrier",
      "  warp_softmax_merge(m, l);\n  if (lane == 0) { sm[warp] = m; sl[warp] = l; }\n  __syncthreads();",
      "  warp_softmax_merge(m, l);\n  __syncthreads();\n  if (lane == 0) { sm[warp] = m; sl[warp] = l; }"),
    M("backward_early_return", "early return skips a barrier",
      "  float acc_gc = 0.0f, acc_sph = 0.0f;\n", "  float acc_gc = 0.0f, acc_sph = 0.0f;\n  if (threadIdx.x >= n) return;\n"),
    M("forward_early_return", "early return skips a barrier",
      "  float m = -INFINITY, l = 0.0f;\n", "  float m = -INFINITY, l = 0.0f;\n  if (threadIdx.x >= n) return;\n"),
    M("backward_missing_thread_guard", "missing thread guard",
      "  if (threadIdx.x == 0) {\n    rows.gc_row[i] += acc_gc;", "  {\n    rows.gc_row[i] += acc_gc;"),
    # ---- atomics and flags ---------------------------------------------------------------------
    M("weight_flag_not_atomic", "non-atomic update",
      "if (bad) atomicMin(&flags[FLAG_WEIGHT], static_cast<int32_t>(j));",
      "if (bad && j < flags[FLAG_WEIGHT]) flags[FLAG_WEIGHT] = static_cast<int32_t>(j);"),
    M("embeddings_flag_not_atomic", "non-atomic update",
      "if (bad) atomicMin(&flags[FLAG_EMBEDDINGS], static_cast<int32_t>(i));",
      "if (bad && i < flags[FLAG_EMBEDDINGS]) flags[FLAG_EMBEDDINGS] = static_cast<int32_t>(i);"),
    M("label_flag_not_atomic", "non-atomic update",
      "if (lab == LAB_BAD) atomicMin(&flags[FLAG_LABEL], static_cast<int32_t>(i));",
      "if (lab == LAB_BAD) flags[FLAG_LABEL] = static_cast<int32_t>(i);"),
    M("weight_flag_atomic_max", "wrong flag value",
      "if (bad) atomicMin(&flags[FLAG_WEIGHT], static_cast<int32_t>(j));",
      "if (bad) atomicMax(&flags[FLAG_WEIGHT], static_cast<int32_t>(j));"),
    M("embeddings_flag_wrong_slot", "label/flag codes",
      "atomicMin(&flags[FLAG_EMBEDDINGS],", "atomicMin(&flags[FLAG_LABEL],"),
    # ---- label codes -----------------------------------------------------------------------------
    M("label_upper_bound_inclusive", "label/flag codes",
      "} else if (raw >= 0 && raw < C) {", "} else if (raw >= 0 && raw <= C) {"),
    M("ignored_row_coded_bad", "label/flag codes",
      "    lab = LAB_NONE;\n", "    lab = LAB_BAD;\n"),
    M("finalize_nan_for_ignored", "label/flag codes",
      "rows.lab[i] == LAB_BAD ? NAN", "rows.lab[i] < 0 ? NAN"),
    M("ignored_rows_no_softmax_grad", "label/flag codes",
      "dz = lab == LAB_BAD ? 0.0f : gl * expf(z - lse);  // a bad-label row", "dz = lab < 0 ? 0.0f : gl * expf(z - lse);  // a bad-label row"),
    # ---- loops one short, grids, strides, indices -------------------------------------------------
    M("forward_loop_one_short", "loop one short",
      "in the plain kernel\n  for (int64_t j = threadIdx.x; j < n; j += kThreads) {",
      "in the plain kernel\n  for (int64_t j = threadIdx.x; j < n - 1; j += kThreads) {"),
    M("backward_loop_one_short", "loop one short",
      "  if constexpr (!kGeneral) {\n    for (int64_t j = threadIdx.x; j < n; j += kThreads) {",
      "  if constexpr (!kGeneral) {\n    for (int64_t j = threadIdx.x; j < n - 1; j += kThreads) {"),
    M("col_norms_loop_one_short", "loop one short",
      "  for (int64_t k = lane; k < D; k += kWarp) {\n    const float v", "  for (int64_t k = lane; k < D - 1; k += kWarp) {\n    const float v"),
    M("correction_write_one_short", "loop one short",
      "  for (int64_t k = lane; k < D; k += kWarp) grow[k]", "  for (int64_t k = lane; k < D - 1; k += kWarp) grow[k]"),
    M("normalize_loop_one_short", "loop one short",
      "e < total;", "e < total - 1;"),
    M("warp_grid_floor", "wrong grid",
      "return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);",
      "return static_cast<unsigned>(rows / kWarpsPerBlock + (rows < kWarpsPerBlock));"),
    M("col_norms_guard_off_by_one", "off-by-one bound",
      "if (j >= C) return;  // whole warp", "if (j > C) return;  // whole warp"),
    M("normalize_stride_per_block", "wrong stride",
      "e += static_cast<int64_t>(gridDim.x) * blockDim.x", "e += static_cast<int64_t>(blockDim.x)"),
    M("normalize_index_mod", "wrong index",
      "inv_a[e / D]", "inv_a[e % B]"),
    M("forward_r_local_index", "wrong index",
      "const float c = srow[j] * inv_a * r[col];", "const float c = srow[j] * inv_a * r[j];"),
    M("backward_label_local_index", "wrong index",
      "      if (col == lab) {\n        c = cy;\n        z = zl;\n        dz = dzy;\n        g = gy;\n      } else {\n        c = kept",
      "      if (j == lab) {\n        c = cy;\n        z = zl;\n        dz = dzy;\n        g = gy;\n      } else {\n        c = kept"),
    M("backward_out_global_index", "wrong index",
      "out[i * n + j] = from_f<TO>(g * rj);", "out[i * n + col] = from_f<TO>(g * rj);"),
    M("correction_w_local_index", "wrong index",
      "const TW* wrow = w + col * D;", "const TW* wrow = w + j * D;"),
    M("row_chain_stride_B", "wrong index",
      "g_xhat[i * D + k]", "g_xhat[i * B + k]"),
    M("row_chain_warp_index", "wrong lane/warp index",
      "  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;\n  if (i >= B) return;\n  const float a",
      "  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x / kWarp;\n  if (i >= B) return;\n  const float a"),
    # ---- block / warp reductions ----------------------------------------------------------------
    M("block_sum_reads_warp_slot", "wrong lane/warp index",
      "a = lane < kWarpsPerBlock ? sa[lane] : 0.0f;", "a = lane < kWarpsPerBlock ? sa[warp] : 0.0f;", "reduce.cuh"),
    M("block_sum_one_warp_short", "reduction over one warp too few",
      "    a = lane < kWarpsPerBlock ? sa[lane] : 0.0f;\n    b = lane < kWarpsPerBlock ? sb[lane] : 0.0f;",
      "    a = lane < kWarpsPerBlock - 1 ? sa[lane] : 0.0f;\n    b = lane < kWarpsPerBlock - 1 ? sb[lane] : 0.0f;",
      "reduce.cuh"),
    M("block_merge_one_warp_short", "reduction over one warp too few",
      "    m = lane < kWarpsPerBlock ? sm[lane] : -INFINITY;\n    l = lane < kWarpsPerBlock ? sl[lane] : 0.0f;",
      "    m = lane < kWarpsPerBlock - 1 ? sm[lane] : -INFINITY;\n    l = lane < kWarpsPerBlock - 1 ? sl[lane] : 0.0f;"),
    M("warp_sum_skips_last_step", "reduction too short",
      "for (int off = kWarp / 2; off > 0; off >>= 1) v +=", "for (int off = kWarp / 2; off > 1; off >>= 1) v +=",
      "reduce.cuh"),
    M("block_sum_first_drops_last_warp", "reduction over one warp too few",
      "a = lane < kWarpsPerBlock ? sa[lane] : 0.0f;", "a = lane < kWarpsPerBlock - 1 ? sa[lane] : 0.0f;",
      "reduce.cuh"),
    M("warp_sum_shfl_down", "wrong lane/warp index",
      "v += __shfl_xor_sync(kFullMask, v, off);", "v += __shfl_down_sync(kFullMask, v, off);", "reduce.cuh"),
    # ---- normalization factors -------------------------------------------------------------------
    M("inv_a_of_squared_norm", "wrong normalization factor",
      "const float inv_a = 1.0f / maximum(a, NORM_EPS);", "const float inv_a = 1.0f / maximum(ss, NORM_EPS);"),
    M("label_cosine_unnormalized_w", "wrong normalization factor",
      "cy = dot * inv_a * r[lab * K + ksub];", "cy = dot * inv_a;"),
    M("correction_single_r", "wrong normalization factor",
      "rc * rc * dot;", "rc * dot;"),
    M("row_chain_missing_inv_a", "wrong normalization factor",
      "(xv * inv_a) * proj) * inv_a +", "(xv * inv_a) * proj) +"),
    M("row_chain_sph_unscaled", "wrong normalization factor",
      "(sbn ? rows.sph[i] * inv_a : 0.0f)", "(sbn ? rows.sph[i] : 0.0f)"),
    M("sphere_scale_swapped", "swapped arguments",
      "const float scale = sbn ? a : params.scale;", "const float scale = sbn ? params.scale : a;"),
    M("col_norms_r_wnorm_swapped", "swapped arguments",
      "(static_cast<const TW*>(w), C, D, r, wnorm,", "(static_cast<const TW*>(w), C, D, wnorm, r,"),
    # ---- state used before it is initialized -----------------------------------------------------
    M("run_max_not_initialized", "used before init",
      "    rows.run_max[i] = -INFINITY;\n", ""),
    M("gc_row_not_initialized", "used before init",
      "    rows.gc_row[i] = 0.0f;\n", ""),
    # ---- aliasing ----------------------------------------------------------------------------------
    M("backward_rereads_aliased_tile", "read after aliased write",
      "acc_gc += (kept && col != lab) ? dz * z : g * c;",
      "acc_gc += (kept && col != lab) ? dz * z : g * (col == lab ? c : tile[i * ld + j] * inv_a * rj);"),
    # ---- rounding, conversions ---------------------------------------------------------------------
    M("load_w_no_rounding", "rounding on the wrong side",
      "return to_f(from_f<T>(to_f(*p)));", "return to_f(*p);"),
    M("correction_w_unrounded", "rounding on the wrong side",
      "coef * load_w<T>(wrow + k));", "coef * load_w<TW>(wrow + k));"),
    M("store_grad_no_saturation", "rounding on the wrong side",
      "return from_f<T>(clampf_(v, -big, big));", "return from_f<T>(v);"),
    M("normalize_rounds_inv_a", "rounding on the wrong side",
      "from_f<TO>(to_f(x[e]) * inv_a[e / D])", "from_f<TO>(to_f(x[e]) * to_f(from_f<TO>(inv_a[e / D])))"),
    M("backward_out_double_rounding", "rounding on the wrong side",
      "from_f<TO>(g * rj);", "from_f<TO>(to_f(from_f<TO>(g)) * rj);"),
    # ---- dispatch macros ----------------------------------------------------------------------------
    M("dispatch_f16_as_bf16", "dispatch macro",
      "    case DType::F16: {                          \\\n      using T = __half;",
      "    case DType::F16: {                          \\\n      using T = __nv_bfloat16;"),
    M("dispatch_missing_break", "dispatch macro",
      "      using T = float;                          \\\n      __VA_ARGS__;                              \\\n      break;",
      "      using T = float;                          \\\n      __VA_ARGS__;                              \\\n"),
    M("dispatch_w_inverted", "dispatch macro",
      "if ((WDT) == (DT)) {", "if ((WDT) != (DT)) {"),
    M("dispatch_w_float_as_t", "dispatch macro",
      "      using TW = float;                         \\", "      using TW = T;                             \\"),
    # ---- the newer losses' features (issue 14): per-row margins, CLIP/NONE, curricular, sub-centers ----
    M("row_margins_wrong_stride", "wrong index or stride",
      "p.m2 = rows.row_margins[2 * i];\n    p.m3 = rows.row_margins[2 * i + 1];",
      "p.m2 = rows.row_margins[i];\n    p.m3 = rows.row_margins[i + 1];"),
    M("row_margins_swapped", "swapped arguments",
      "p.m2 = rows.row_margins[2 * i];\n    p.m3 = rows.row_margins[2 * i + 1];",
      "p.m2 = rows.row_margins[2 * i + 1];\n    p.m3 = rows.row_margins[2 * i];"),
    M("clip_missing_derivative_zeroing", "missing clamp derivative",
      "*dc = (c_clamped || arg_clamped) ? 0.0f : m1 * sinf(argc) / sin_c;", "*dc = m1 * sinf(argc) / sin_c;",
      "margins.cuh"),
    M("clip_angle_clamp_derivative_kept", "missing clamp derivative",
      "*dc = (c_clamped || arg_clamped) ? 0.0f", "*dc = c_clamped ? 0.0f", "margins.cuh"),
    M("none_policy_falls_back", "dispatch slip",
      "  if (boundary == NONE) {\n    float sin_body;", "  if (boundary == NONE && false) {\n    float sin_body;",
      "margins.cuh"),
    M("curricular_slope_t_plus_c", "wrong derivative",
      "*df = t + 2.0f * c;", "*df = t + c;", "margins.cuh"),
    M("curricular_slope_dropped", "wrong derivative",
      "g = s * dz * df;  // dL/dc_ij", "g = s * dz;  // dL/dc_ij"),
    M("curricular_on_label_column", "label column not skipped",
      "      if (col == lab) {\n        z = zl;\n      } else {\n        int32_t kb;",
      "      if (col == lab && !cur.on) {\n        z = zl;\n      } else {\n        int32_t kb;"),
    M("curricular_label_gradient_modulated", "label column not skipped",
      "        g = gy;\n        kb = ksub;",
      "        g = cur.on && c > cur.tau ? gy * (cur.t + 2.0f * c) : gy;\n        kb = ksub;"),
    M("curricular_threshold_of_row_0", "wrong index or stride",
      "tau(on ? rows.neg_threshold[i] : 0.0f)", "tau(on ? rows.neg_threshold[0] : 0.0f)"),
    M("curricular_not_dispatched", "dispatch slip",
      "return K > 1 || rows.neg_t != nullptr;", "return K > 1;"),
    M("subcenter_grad_to_all_k", "gradient to every sub-center",
      "from_f<TO>(k == kb ? g * r[col * K + k] : 0.0f)", "from_f<TO>(g * r[col * K + k])"),
    M("subcenter_tie_to_highest_k", "wrong tie rule",
      "    const float ck = s[k] * inv_a * r[cls * K + k];\n    if (replaces_max(ck, best)) {",
      "    const float ck = s[k] * inv_a * r[cls * K + k];\n    if (!(ck < best)) {"),
    M("subcenter_max_drops_nan", "NaN swallowed",
      "return !(best != best) && (cand > best || cand != cand);", "return cand > best;", "margins.cuh"),
    M("subcenter_label_winner_ignored", "state not used",
      "const int32_t ksub = (K > 1 && lab >= 0) ? rows.label_sub[i] : 0;", "const int32_t ksub = 0;"),
    M("subcenter_label_row_stride", "wrong index or stride",
      "w + (lab >= 0 ? lab * K : 0) * D;", "w + (lab >= 0 ? lab : 0) * D;"),
    M("subcenter_tile_row_stride", "wrong index or stride",
      "float* srow = tile + i * ld;", "float* srow = tile + i * n;"),
    M("subcenter_norm_index", "wrong index or stride",
      "  float best = s[0] * inv_a * r[cls * K];", "  float best = s[0] * inv_a * r[cls];"),
    # ---- the speed path (margin_ce_kept / margin_ce_backward_kept): kept blocks, their pitch and units ----
    M("speed_kept_unscaled", "wrong normalization factor",
      "if (keep) srow[j] = s * (srow[j] * inv_a);", "if (keep) srow[j] = srow[j] * inv_a;"),
    M("speed_kept_left_raw", "dropped update",
      "      if (keep) srow[j] = s * (srow[j] * inv_a);\n", ""),
    M("speed_kept_cosines_without_r", "wrong normalization factor",
      "srow[j * K + k] = srow[j * K + k] * inv_a * r[col * K + k];", "srow[j * K + k] = srow[j * K + k] * inv_a;"),
    M("speed_kept_cosines_one_short", "loop one short",
      "for (int64_t k = 0; k < K; ++k) srow[j * K + k]", "for (int64_t k = 0; k < K - 1; ++k) srow[j * K + k]"),
    M("speed_forward_cosines_renormalized", "state not used",
      "class_cosine(srow + j * K, col, K, inv_a, r, &kb, keep)", "class_cosine(srow + j * K, col, K, inv_a, r, &kb)"),
    M("speed_backward_chunk_pitch", "wrong index or stride",
      "z = kept ? tile[i * ld + j] * rj : s * c;", "z = kept ? tile[i * n + j] * rj : s * c;"),
    M("speed_backward_rescaled", "wrong normalization factor",
      "z = kept ? tile[i * ld + j] * rj : s * c;", "z = kept ? s * (tile[i * ld + j] * rj) : s * c;"),
    M("speed_backward_gc_from_unset_c", "dispatch slip",
      "acc_gc += (kept && col != lab) ? dz * z : g * c;", "acc_gc += g * c;"),
    M("speed_backward_general_chunk_pitch", "wrong index or stride",
      "class_cosine(tile + i * ld + j * K, col, K, inv_a, r, &kb, kept)",
      "class_cosine(tile + (i * n + j) * K, col, K, inv_a, r, &kb, kept)"),
    M("speed_backward_cosines_renormalized", "state not used",
      "class_cosine(tile + i * ld + j * K, col, K, inv_a, r, &kb, kept)",
      "class_cosine(tile + i * ld + j * K, col, K, inv_a, r, &kb)"),
    M("speed_kept_tie_to_highest_k", "wrong tie rule",
      "      if (replaces_max(s[k], best)) {", "      if (!(s[k] < best)) {"),
    M("speed_kept_max_drops_nan", "NaN swallowed",
      "      if (replaces_max(s[k], best)) {", "      if (s[k] > best) {"),
    # ---- the one-vs-all kernels (csrc/onevsall.cu; built as MAGLOSS_EMU_ONEVSALL_CU) -----------------
    M("ova_forward_acc_overwritten", "accumulator overwritten", "    acc += l;", "    acc = l;", "onevsall.cu"),
    M("ova_loss_overwritten_per_chunk", "accumulator overwritten",
      "NAN : rows.loss[i] + acc;", "NAN : acc;", "onevsall.cu"),
    M("ova_gc_row_overwritten", "accumulator overwritten",
      "rows.gc_row[i] += acc_gc;", "rows.gc_row[i] = acc_gc;", "onevsall.cu"),
    M("ova_db_row_overwritten", "accumulator overwritten",
      "rows.db_row[i] += acc_db;", "rows.db_row[i] = acc_db;", "onevsall.cu"),
    M("ova_gc_without_cosine", "wrong factor", "acc_gc += G * c;", "acc_gc += G;", "onevsall.cu"),
    M("ova_forward_loop_one_short", "loop one short",
      "  float acc = 0.0f, none = 0.0f;\n  for (int64_t j = threadIdx.x; j < n; j += kThreads) {",
      "  float acc = 0.0f, none = 0.0f;\n  for (int64_t j = threadIdx.x; j < n - 1; j += kThreads) {", "onevsall.cu"),
    M("ova_backward_loop_one_short", "loop one short",
      "  float acc_gc = 0.0f, acc_db = 0.0f;\n  for (int64_t j = threadIdx.x; j < n; j += kThreads) {",
      "  float acc_gc = 0.0f, acc_db = 0.0f;\n  for (int64_t j = threadIdx.x; j < n - 1; j += kThreads) {",
      "onevsall.cu"),
    M("ova_bias_sum_loop_one_short", "loop one short",
      "i < B; i += kThreads) acc += db_row[i];", "i < B - 1; i += kThreads) acc += db_row[i];", "onevsall.cu"),
    M("ova_bias_sum_one_block_of_rows", "wrong stride",
      "i < B; i += kThreads) acc += db_row[i];", "i < B; i += 2 * kThreads) acc += db_row[i];", "onevsall.cu"),
    M("ova_forward_label_local_index", "wrong index",
      "ova_element<false>(p, c, col == lab,", "ova_element<false>(p, c, j == lab,", "onevsall.cu"),
    M("ova_backward_r_local_index", "wrong index", "const float rj = r[col];", "const float rj = r[j];",
      "onevsall.cu"),
    M("ova_bad_row_gradient_kept", "label/flag codes",
      "const float G = bad ? 0.0f : g * dc;", "const float G = g * dc;", "onevsall.cu"),
    M("ova_bad_row_loss_not_nan", "label/flag codes",
      "rows.loss[i] = lab == LAB_BAD ? NAN : rows.loss[i] + acc;", "rows.loss[i] = rows.loss[i] + acc;",
      "onevsall.cu"),
    M("ova_forward_missing_thread_guard", "missing thread guard",
      "  if (threadIdx.x == 0) {\n    rows.loss[i] =", "  if (true) {\n    rows.loss[i] =", "onevsall.cu"),
    M("ova_bias_sum_missing_thread_guard", "missing thread guard",
      "  if (threadIdx.x == 0) grad_bias[0] = acc;", "  grad_bias[0] = acc;", "onevsall.cu"),
    M("ova_backward_bias_ignored", "state not used",
      "const float b = rows.bias != nullptr ? *rows.bias : 0.0f;\n  const bool bad",
      "const float b = 0.0f;\n  const bool bad", "onevsall.cu"),
    M("ova_uniface_clamp_gradient_kept", "missing clamp derivative",
      "lam * sigmoid_(zc)) * inside;", "lam * sigmoid_(zc));", "onevsall.cu"),
    M("ova_uniface_bias_gradient_sign", "wrong sign", "*db = -dz;", "*db = dz;", "onevsall.cu"),
    M("ova_sface_negative_weight_sign", "wrong sign",
      "s * sigmoid_(-k * (theta - bb))", "s * sigmoid_(k * (theta - bb))", "onevsall.cu"),
    M("ova_sphereface2_margin_sign", "wrong sign", "(label ? m : -m)", "(label ? -m : m)", "onevsall.cu"),
    M("ova_sphereface2_a_as_m", "dispatch slip",
      "theta = mtype == 1 ? theta + m : theta * m;", "theta = theta + m;", "onevsall.cu"),
    M("ova_sphereface2_weights_swapped", "swapped arguments",
      "label ? p.w_pos : p.w_neg", "label ? p.w_neg : p.w_pos", "onevsall.cu"),
    M("ova_softplus_without_abs", "wrong formula",
      "log1pf(expf(-fabsf(u)))", "log1pf(expf(-u))", "onevsall.cu"),
    # ---- the side outputs: the block arg-max of the non-label class cosines and its merge across chunks ----
    M("side_argmax_tie_to_highest", "wrong tie rule",
      "return v2 > v1 || (v2 == v1 && i2 < i1);", "return v2 > v1 || (v2 == v1 && i2 > i1);", "reduce.cuh"),
    M("side_chunk_merge_overwrites", "accumulator overwritten",
      "    if (side) argmax_take(bv, bi, rows.nn_val[i], rows.nn_idx[i]);",
      "    if (side) {\n      rows.nn_val[i] = bv;\n      rows.nn_idx[i] = bi;\n    }"),
    M("side_block_argmax_dropped", "reduction over one warp too few",
      "  if (side) block_argmax(bv, bi);", "  if (side) warp_argmax(bv, bi);"),
    M("side_argmax_missing_barrier", "missing barrier",
      "  if (lane == 0) { sv[warp] = v; si[warp] = idx; }\n  __syncthreads();\n",
      "  if (lane == 0) { sv[warp] = v; si[warp] = idx; }\n", "reduce.cuh"),
    M("side_warp_argmax_one_short", "loop one short",
      "for (int off = kWarp / 2; off > 0; off >>= 1) {\n    const float v2",
      "for (int off = kWarp / 2; off > 1; off >>= 1) {\n    const float v2", "reduce.cuh"),
    # ---- the one-vs-all side outputs: the same arg-max next to the row sum ----
    M("ova_side_label_not_excluded", "label/flag codes",
      "if (side && col != lab) argmax_take(c, col, bv, bi);", "if (side) argmax_take(c, col, bv, bi);",
      "onevsall.cu"),
    M("ova_side_local_class_index", "wrong index",
      "if (side && col != lab) argmax_take(c, col, bv, bi);", "if (side && col != lab) argmax_take(c, j, bv, bi);",
      "onevsall.cu"),
    M("ova_side_chunk_merge_overwrites", "accumulator overwritten",
      "    if (side) argmax_take(bv, bi, rows.nn_val[i], rows.nn_idx[i]);",
      "    if (side) {\n      rows.nn_val[i] = bv;\n      rows.nn_idx[i] = bi;\n    }", "onevsall.cu"),
    M("ova_side_block_argmax_dropped", "reduction over one warp too few",
      "  if (side) block_argmax(bv, bi);", "  if (side) warp_argmax(bv, bi);", "onevsall.cu"),
    M("ova_side_tile_cosine_unscaled", "wrong normalization factor",
      "argmax_take(c, col, bv, bi);", "argmax_take(tile[i * n + j] * inv_a, col, bv, bi);", "onevsall.cu"),
]

SUITES = ["tests/test_cuda_parity.py", "tests/test_engine_emulated.py", "tests/test_cuda_parity_speed.py",
          "tests/test_cuda_parity_one_vs_all.py", "tests/test_side_outputs_cuda.py"]
# The run order, as node-id prefixes: tests matching an earlier prefix run earlier, "*" stands for
# every test no prefix matches (in file order). Quick, broad tests first; the tests added for the
# mutants the suite once missed last, so a mutant first failed by one of them is one the rest misses.
ORDER = [
    "tests/test_cuda_parity.py::test_fp32_parity[",
    "tests/test_cuda_parity.py::test_chunking",
    "tests/test_cuda_parity.py::test_nan_in_nan_out_checks_off",
    "tests/test_cuda_parity.py::test_bad_inputs_same_errors_as_cpu",
    "tests/test_cuda_parity.py::test_bad_label_rows_are_nan_in_bounds_and_add_no_gradient",
    "tests/test_cuda_parity.py::test_fp32_weight_with_half_embeddings",
    "tests/test_cuda_parity.py::test_zero_embedding_row_half_gradient_saturates",
    "tests/test_side_outputs_cuda.py::test_fused_ties_across_threads_warps_and_chunks",
    "*",
    "tests/test_cuda_parity.py::test_several_bad_rows_report_the_first",
    "tests/test_cuda_parity.py::test_fp32_weight_gradient_rounds_to_the_half_gradient",
    "tests/test_cuda_parity.py::test_half_products_round_once",
]
_ORDER_ENV = "MAGLOSS_MUTATE_ORDER"


def pytest_collection_modifyitems(config, items):
    """Loaded as a pytest plugin (-p emu.mutate) by the runs below: sorts the tests by ORDER."""
    prefixes = [p for p in os.environ.get(_ORDER_ENV, "").split(",") if p]

    rest = prefixes.index("*") if "*" in prefixes else len(prefixes)

    def rank(item):
        return next((k for k, p in enumerate(prefixes) if p != "*" and item.nodeid.startswith(p)), rest)

    items.sort(key=rank)  # stable: file order within a rank


def apply(text: str, m: Mutant) -> str:
    """m.file's text with mutant m applied; ValueError unless m.old occurs exactly once."""
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"mutant {m.name}: its snippet occurs {count} times in {m.file} (expected once):\n{m.old}")
    if m.old == m.new:
        raise ValueError(f"mutant {m.name}: the new snippet equals the old one")
    return text.replace(m.old, m.new)


#: the build's override of each mutable file (tests/emu/build.py)
_OVERRIDE = {"engine.cu": "MAGLOSS_EMU_ENGINE_CU", "onevsall.cu": "MAGLOSS_EMU_ONEVSALL_CU"}


def _env(cu: Optional[Path], order: List[str] = ()) -> Dict[str, str]:
    """The environment of a build and test run; cu: a mutated engine.cu or onevsall.cu (by its name), or
    the folder of a reduce.cuh mutant (both kernel files, built from there)."""
    env = dict(os.environ)
    for var in set(_OVERRIDE.values()):
        env.pop(var, None)
    if cu is not None:
        for name in ([cu.name] if cu.suffix else list(_OVERRIDE)):
            env[_OVERRIDE[name]] = str(cu / name if not cu.suffix else cu)
    env[_ORDER_ENV] = ",".join(order)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


_BUILD = "import sys; sys.path.insert(0, 'tests'); from emu import build; build.build('engine')"
_FIRST = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_one(name: str, kind: str, cu: Optional[Path], order: List[str], timeout: float,
            deselect: List[str] = ()) -> dict:
    """Builds engine.cu (cu, or the real one) for the emulator and runs the suites with -x."""
    rec = {"name": name, "kind": kind}
    t0 = time.monotonic()
    build = subprocess.run([PY, "-c", _BUILD],
                           cwd=ROOT, env=_env(cu), capture_output=True, text=True)
    rec["build_seconds"] = round(time.monotonic() - t0, 1)
    if build.returncode != 0:
        rec.update(status="invalid", detail=(build.stdout + build.stderr)[-2000:])
        return rec
    t1 = time.monotonic()
    cmd = [PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "emu.mutate", *SUITES,
           *(f"--deselect={d}" for d in deselect)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(cu, order), capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
    rec["test_seconds"] = round(time.monotonic() - t1, 1)
    first = _FIRST.search(out)
    if rc == 0:
        rec["status"] = "survived"
    elif rc is None:
        rec.update(status="killed", first_failure=f"timeout after {timeout:.0f} s")
    else:
        rec.update(status="killed", first_failure=first.group(1) if first else f"pytest exit {rc}")
        err = re.findall(r"^E\s+(.*)$", out, re.M)
        rec["detail"] = (err[0] if err else out.strip().splitlines()[-1] if out.strip() else "")[:300]
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the table (each row checked) and exit")
    ap.add_argument("--baseline", action="store_true", help="first run the unmutated engine (it must pass)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run (default 900)")
    ap.add_argument("--order", default=",".join(ORDER), help="comma-separated node-id prefixes run first, in order")
    ap.add_argument("--json", type=Path, help="summary file (default <emulator cache>/mutants/summary.json)")
    ap.add_argument("--deselect", default="", help="comma-separated node-id prefixes left out of every run "
                    "(tests that fail for reasons outside engine.cu, e.g. another engine's)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE.parent))
    from emu import build  # noqa: E402  (the cache location)

    texts = {"engine.cu": ENGINE_CU.read_text(), "margins.cuh": MARGINS_CUH.read_text(),
             "onevsall.cu": ONEVSALL_CU.read_text(), "reduce.cuh": REDUCE_CUH.read_text()}
    chosen = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.name for m in MUTANTS})
        if unknown:
            ap.error(f"--only: unknown mutants {unknown}")
        chosen = [m for m in MUTANTS if m.name in wanted]
    names = [m.name for m in MUTANTS]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate mutant names: {dupes}")
    mutated = {m.name: apply(texts[m.file], m) for m in chosen}  # every row checked before anything runs
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.kind}")
        print(f"{len(chosen)} mutants, every snippet found once in its file under {ENGINE_CU.parent}")
        return 0

    work = build._cache_dir() / "mutants"
    summary_path = args.json or work / "summary.json"
    order = args.order.split(",")
    deselect = [d for d in args.deselect.split(",") if d]
    started = time.time()
    records: List[dict] = []

    rank = {m.name: k for k, m in enumerate(MUTANTS)}

    def write_summary():
        records.sort(key=lambda r: rank.get(r["name"], -1))  # the baseline, then the table's order
        killed = sum(r["status"] == "killed" for r in records if r["name"] != "(baseline)")
        valid = sum(r["status"] in ("killed", "survived") for r in records if r["name"] != "(baseline)")
        summary = {"engine": str(ENGINE_CU), "order": order, "killed": killed, "valid": valid,
                   "kill_rate": round(killed / valid, 4) if valid else None,
                   "seconds": round(time.time() - started, 1), "mutants": records}
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    if args.baseline:
        rec = run_one("(baseline)", "none", None, order, args.timeout, deselect)
        records.append(rec)
        print(f"(baseline): {rec['status']} {rec.get('first_failure', '')}", flush=True)
        if rec["status"] != "survived":
            write_summary()
            print("the unmutated engine fails the suites: fix that first", file=sys.stderr)
            return 2

    # The boundary's objects are shared by every mutant: build them once, not in parallel jobs.
    pre = subprocess.run([PY, "-c", _BUILD], cwd=ROOT, env=_env(None), capture_output=True, text=True)
    if pre.returncode != 0:
        print(pre.stdout + pre.stderr, file=sys.stderr)
        return 2

    def job(m: Mutant) -> dict:
        if m.file == "reduce.cuh":  # both kernel units, the real .cu files next to the mutated header
            folder = work / m.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "reduce.cuh").write_text(mutated[m.name])
            for name in _OVERRIDE:
                (folder / name).write_text(texts[name])
            return run_one(m.name, m.kind, folder, order, args.timeout, deselect)
        if m.file == "onevsall.cu":  # built as the second kernel unit; engine.cu stays the real one
            cu = work / m.name / "onevsall.cu"
            cu.parent.mkdir(parents=True, exist_ok=True)
            cu.write_text(mutated[m.name])
            return run_one(m.name, m.kind, cu, order, args.timeout, deselect)
        cu = work / m.name / "engine.cu"
        cu.parent.mkdir(parents=True, exist_ok=True)
        # A margins.cuh mutant: the real engine.cu with the mutated header (and engine.cuh, which
        # includes it) next to it; build.py puts the kernel's directory first on the include path.
        cu.write_text(mutated[m.name] if m.file == "engine.cu" else texts["engine.cu"])
        if m.file == "margins.cuh":  # engine.cuh too: its quoted include must find the mutant's margins.cuh
            (cu.parent / "margins.cuh").write_text(mutated[m.name])
            (cu.parent / "engine.cuh").write_text((ENGINE_CU.parent / "engine.cuh").read_text())
        return run_one(m.name, m.kind, cu, order, args.timeout, deselect)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(job, m) for m in chosen]):
            rec = fut.result()
            records.append(rec)
            write_summary()
            t = rec.get("build_seconds", 0) + rec.get("test_seconds", 0)
            print(f"{rec['name']:34s} {rec['status']:9s} {t:7.1f} s  {rec.get('first_failure', '')}", flush=True)
    summary = write_summary()
    print(f"killed {summary['killed']} of {summary['valid']} ({100 * (summary['kill_rate'] or 0):.1f} %); "
          f"summary: {summary_path}")
    invalid = [r["name"] for r in records if r["status"] == "invalid"]
    if invalid:
        print(f"invalid (do not build): {invalid}", file=sys.stderr)
    return 0 if not invalid else 1


if __name__ == "__main__":
    sys.exit(main())
