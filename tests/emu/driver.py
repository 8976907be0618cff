"""Runs the fused engine's kernels on the CPU: csrc/engine.cu under the emulator (cuda_emu.h, build.py).

:func:`forward` and :func:`backward` MIRROR ``margin_ce_cuda`` and ``margin_ce_backward_cuda`` of
csrc/margin_ce.cpp step by step: the same buffers (one row of the fp32 workspace per RowState
field, the same aliasing: lse as the running max, the forward's ``norms`` as ``a``, the fp32 tile
as T and P as grad_w rows on the fp32 path), the same launches in the same order, the same class-
chunk loop, and the cuBLAS products as torch CPU matmuls in the GPU path's precision (fp16/bf16
operands are exact in fp32, so ``a.float() @ b.float()`` is "half in, fp32 accumulate"; TF32 off).
It must be updated whenever margin_ce.cpp changes.

Emulated device memory: every buffer the kernels see is a slice of a larger CPU tensor whose guard
bands are checked after each call (an out-of-bounds write fails), and everything the boundary
allocates with at::empty, guard bands included, is poisoned first: NaN for floats, 0x7b bytes for
integers (an out-of-bounds or uninitialized read shows up in the results).
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from magloss.margins import SPHERE, MarginSpec

from . import build

ROWSTATE_FIELDS = ["a", "inv_a", "scale", "cy", "zlab", "dpsi_dc", "dpsi_da", "lab", "zy", "reg", "run_max",
                   "run_sum", "grad_lse", "grad_zy", "grad_reg", "grad_norms", "lse", "dz_y", "g_y", "grad_a",
                   "gc_row", "sph"]


class RowState(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ROWSTATE_FIELDS]


class MarginParams(ctypes.Structure):  # csrc/margins.cuh; built from MarginSpec.op_args()
    _fields_ = [("kind", ctypes.c_int)] + [(n, ctypes.c_float) for n in
                                           ("scale", "m1", "m2", "m3", "l_a", "u_a", "l_m", "u_m")] + \
               [("easy_margin", ctypes.c_bool), ("straight_through", ctypes.c_bool)]


class EmulatorError(RuntimeError):
    """A kernel did something undefined (cuda_emu's message), or a guard band was overwritten."""


_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {
    "emu_col_norms": [_I, _I, _P, _I64, _I64, _P, _P, _P],
    "emu_row_stage": [_I, _I, _P, _P, _P, _I, _I64, _I64, _I64, _I64, ctypes.POINTER(MarginParams), _P, _P,
                      ctypes.POINTER(RowState), _I, _P],
    "emu_forward_epilogue": [_P, _I64, _I64, _I64, _P, ctypes.POINTER(RowState)],
    "emu_forward_finalize": [_I64, ctypes.POINTER(RowState), _P],
    "emu_backward_epilogue": [_P, _P, _I, _I64, _I64, _I64, _P, ctypes.POINTER(RowState), _I],
    "emu_column_correction": [_I, _I, _P, _P, _P, _P, _I64, _I64, _I64, _P],
    "emu_row_chain": [_I, _P, _P, _I64, _I64, ctypes.POINTER(RowState), _I, _P],
    "emu_normalize_rows": [_I, _P, _I64, _I64, _P, _I, _P],
}


def _layout_of(struct) -> List[int]:
    return [ctypes.sizeof(struct)] + [getattr(struct, name).offset for name, _ in struct._fields_]


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The emulated engine (built on first use); raises build.EmulatorUnavailable without g++/CUDA headers."""
    lib = ctypes.CDLL(str(build.build()))
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.emu_error.restype = ctypes.c_char_p
    lib.emu_set_schedule.argtypes = [_I, ctypes.c_uint64]
    lib.emu_launches.restype = ctypes.c_uint64
    n = lib.emu_layout(None)
    got = (ctypes.c_int64 * n)()
    lib.emu_layout(got)
    want = _layout_of(RowState) + _layout_of(MarginParams)
    if list(got) != want:  # a static_assert across the language boundary
        raise EmulatorError(f"RowState/MarginParams layout differs from the ctypes mirror: C {list(got)} vs {want}")
    return lib


@functools.lru_cache(maxsize=None)
def constants() -> dict:
    """The engine's own LAB_* / FLAG_* / DType values (engine.cuh)."""
    v = (ctypes.c_int64 * 10)()
    library().emu_constants(v)
    names = ["LAB_NONE", "LAB_BAD", "FLAG_LABEL", "FLAG_EMBEDDINGS", "FLAG_WEIGHT", "NUM_FLAGS", "FLAG_CLEAR",
             torch.float32, torch.float16, torch.bfloat16]
    return dict(zip(names, v))


def reset(schedule: int = 0, seed: int = 0) -> None:
    """Clears a sticky error and picks the fiber/block visiting order (0 up, 1 down, 2 random)."""
    library().emu_clear_error()
    library().emu_set_schedule(schedule, seed)


def launches() -> int:
    return library().emu_launches()


def _launch(name: str, *args) -> None:
    """One engine::launch_* call, then the emulator's C10_CUDA_KERNEL_LAUNCH_CHECK."""
    lib = library()
    getattr(lib, name)(*args)
    err = lib.emu_error()
    if err is not None:
        raise EmulatorError(f"{name}: {err.decode()}")


class Memory:
    """Emulated device allocations: poisoned, with guard bands checked by :meth:`check`."""

    GUARD = 64  # elements on each side

    def __init__(self):
        self._blocks: List[Tuple[Tensor, int, Tensor]] = []

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        n = math.prod(shape)
        buf = torch.empty(n + 2 * self.GUARD, dtype=dtype)
        buf.view(torch.uint8).fill_(0xFF if dtype.is_floating_point else 0x7B)  # 0xff..: NaN in every float type
        self._blocks.append((buf, n, buf.view(torch.uint8).clone()))
        return buf[self.GUARD:self.GUARD + n].view(list(shape))

    def full(self, shape: Sequence[int], value, dtype: torch.dtype) -> Tensor:
        return self.empty(shape, dtype).fill_(value)

    def copy(self, t: Tensor) -> Tensor:
        return self.empty(t.shape, t.dtype).copy_(t)

    def check(self) -> None:
        for buf, n, init in self._blocks:
            raw, g = buf.view(torch.uint8), self.GUARD * buf.element_size()
            end = (self.GUARD + n) * buf.element_size()
            if not (torch.equal(raw[:g], init[:g]) and torch.equal(raw[end:], init[end:])):
                raise EmulatorError(f"a kernel wrote outside a {buf.dtype} buffer of {n} elements")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _rows(**buffers: Tensor) -> RowState:
    return RowState(**{k: _ptr(v) for k, v in buffers.items()})


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """A cuBLAS product with fp32 output: fp32 operands, or fp16/bf16 ones with fp32 accumulation."""
    return a.float() @ b.float()


def _chunk_operand(w_chunk: Tensor, x_dtype: torch.dtype, simt: bool) -> Tensor:
    """chunk_operand(): the class chunk rounded to the embeddings' dtype, up-cast on the SIMT path."""
    rounded = w_chunk.to(x_dtype)
    return rounded.float() if simt else rounded


def chunk_columns(B: int, C: int, chunk: Optional[int]) -> int:
    """margin_ce.cpp chunk_columns(), with ``chunk`` playing MAGLOSS_CHUNK."""
    n = chunk if chunk is not None else -(-max(2 ** 22 // max(B, 1), 1024) // 256) * 256
    return max(min(n, C), 1)


def _operands(mem: Memory, x: Tensor, w: Tensor, labels: Tensor, spec: MarginSpec, lam: Optional[Tensor]):
    """x, w, labels as contiguous device copies; lambda_tensor(); the launchers' DType codes
    (embeddings, weight): check_operands() admits one dtype, or an fp32 W with half x."""
    if w.dtype != x.dtype and not (w.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"embeddings, weight: unsupported dtype pair {x.dtype}, {w.dtype}")
    lam_t = mem.copy(lam.float().reshape(1)) if spec.kind == SPHERE else None
    return mem.copy(x.contiguous()), mem.copy(w.contiguous()), mem.copy(labels.contiguous()), lam_t, \
        (constants()[x.dtype], constants()[w.dtype])


def _row_stage(mem, dts, x, w, lab_in, C, ignore_index, spec, lam_t, rows, backward):
    """col_norms -> row_stage, as both entry points start; returns (r, wnorm, flags)."""
    B, D = x.shape
    colr = mem.empty([2, C], torch.float32)  # r_j, ||w_j||
    flags = mem.full([constants()["NUM_FLAGS"]], constants()["FLAG_CLEAR"], torch.int32)
    _launch("emu_col_norms", *dts, _ptr(w), C, D, _ptr(colr[0]), _ptr(colr[1]), _ptr(flags))
    _launch("emu_row_stage", *dts, _ptr(x), _ptr(w), _ptr(lab_in), int(lab_in.dtype == torch.int64), B, C, D,
            ignore_index, ctypes.byref(MarginParams(*spec.op_args())), _ptr(lam_t), _ptr(colr[0]),
            ctypes.byref(rows), int(backward), _ptr(flags))
    return colr[0], colr[1], flags


def forward(x: Tensor, w: Tensor, labels: Tensor, spec: MarginSpec, lam: Optional[Tensor] = None,
            ignore_index: int = -1, *, chunk: Optional[int] = None, simt: bool = False):
    """margin_ce_cuda: ((lse, zy, reg, norms), flags) for B >= 1; ``chunk`` plays MAGLOSS_CHUNK.
    (``simt`` only changes the products' operand dtypes, which are exact in fp32 either way.)"""
    mem = Memory()
    B, C = x.shape[0], w.shape[0]
    lse, zy, reg, norms = (mem.empty([B], torch.float32) for _ in range(4))
    x, w, lab_in, lam_t, dts = _operands(mem, x, w, labels, spec, lam)
    ws, ws_lab = mem.empty([7, B], torch.float32), mem.empty([B], torch.int64)
    rows = _rows(a=norms, inv_a=ws[0], scale=ws[1], cy=ws[2], zlab=ws[3], dpsi_dc=ws[4], dpsi_da=ws[5],
                 run_sum=ws[6], run_max=lse, lab=ws_lab, zy=zy, reg=reg)
    r, _, flags = _row_stage(mem, dts, x, w, lab_in, C, ignore_index, spec, lam_t, rows, backward=False)
    x_gemm = x.float() if simt else x
    N = chunk_columns(B, C, chunk)
    tile_store = mem.empty([B * N], torch.float32)
    for j0 in range(0, C, N):
        n = min(N, C - j0)
        tile = tile_store[:B * n].view(B, n)
        tile.copy_(_mm32(x_gemm, _chunk_operand(w[j0:j0 + n], x.dtype, simt).t()))  # raw_dots
        _launch("emu_forward_epilogue", _ptr(tile), B, n, j0, _ptr(r), ctypes.byref(rows))
    _launch("emu_forward_finalize", B, ctypes.byref(rows), _ptr(lse))
    mem.check()
    return tuple(t.clone() for t in (lse, zy, reg, norms)), flags.clone()


def backward(grads: Sequence[Tensor], x: Tensor, w: Tensor, labels: Tensor, lse: Tensor, spec: MarginSpec,
             lam: Optional[Tensor] = None, ignore_index: int = -1, *, chunk: Optional[int] = None,
             simt: bool = False):
    """margin_ce_backward_cuda: (grad_x, grad_w, flags) for B >= 1, grads = (gl, gz, gr, gn)."""
    mem = Memory()
    B, D, C = x.shape[0], x.shape[1], w.shape[0]
    x, w, lab_in, lam_t, (dt, wdt) = _operands(mem, x, w, labels, spec, lam)
    half = x.dtype != torch.float32
    sbn = spec.scale_by_norm
    gl, gz, gr, gn, lse_f = (mem.copy(t.float().contiguous()) for t in (*grads, lse))
    ws, ws_lab = mem.empty([12, B], torch.float32), mem.empty([B], torch.int64)
    rows = _rows(a=ws[0], inv_a=ws[1], scale=ws[2], cy=ws[3], zlab=ws[4], dpsi_dc=ws[5], dpsi_da=ws[6], dz_y=ws[7],
                 g_y=ws[8], grad_a=ws[9], gc_row=ws[10], sph=ws[11], lab=ws_lab, grad_lse=gl, grad_zy=gz,
                 grad_reg=gr, grad_norms=gn, lse=lse_f)
    r, wnorm, flags = _row_stage(mem, (dt, wdt), x, w, lab_in, C, ignore_index, spec, lam_t, rows, backward=True)

    x_gemm = x.float() if simt else x
    half_products = half and not simt
    xhat = mem.empty([B, D], x.dtype if half_products else torch.float32)
    _launch("emu_normalize_rows", dt, _ptr(x), B, D, _ptr(ws[1]), dt if half_products else constants()[torch.float32],
            _ptr(xhat))
    g_xhat = mem.full([B, D], 0.0, torch.float32)
    grad_w = mem.empty([C, D], w.dtype)
    N = chunk_columns(B, C, chunk)
    tile_store = mem.empty([B * N], torch.float32)
    t_store = mem.empty([B * N], x.dtype) if half_products else None
    grad_w_f32 = w.dtype == torch.float32  # P is computed in place in grad_w
    p_store = None if grad_w_f32 else mem.empty([N * D], torch.float32)
    for j0 in range(0, C, N):
        n = min(N, C - j0)
        w_op = _chunk_operand(w[j0:j0 + n], x.dtype, simt)
        tile = tile_store[:B * n].view(B, n)
        tile.copy_(_mm32(x_gemm, w_op.t()))  # raw_dots
        t = t_store[:B * n].view(B, n) if half_products else tile  # T = G * r
        _launch("emu_backward_epilogue", _ptr(tile), _ptr(t), dt if half_products else constants()[torch.float32],
                B, n, j0, _ptr(r), ctypes.byref(rows), int(sbn))
        g_xhat.add_(_mm32(t, w_op))  # dL/dxhat += T @ W_chunk
        p = grad_w[j0:j0 + n] if grad_w_f32 else p_store[:n * D].view(n, D)
        p.copy_(_mm32(t.t(), xhat))  # P = T^T @ xhat
        _launch("emu_column_correction", dt, wdt, _ptr(p), _ptr(w), _ptr(r), _ptr(wnorm), n, j0, D, _ptr(grad_w))
    grad_x = mem.empty([B, D], x.dtype)
    _launch("emu_row_chain", dt, _ptr(x), _ptr(g_xhat), B, D, ctypes.byref(rows), int(sbn), _ptr(grad_x))
    mem.check()
    return grad_x.clone(), grad_w.clone(), flags.clone()
