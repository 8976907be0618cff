"""The only importer of the compiled extension ``magloss._C``.

The extension is optional: without it (a pure-Python install, a CPU-only torch, or
``MAGLOSS_DISABLE_EXT=1``) every op runs the chunked PyTorch engine (magloss.chunked). :func:`extension_status`
says which path is in use and why.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Dict, Optional

from . import switches

__all__ = ["extension_status", "flush_input_checks", "register_kernels", "register_one_vs_all_kernels",
           "fused_chunk_columns"]

_NAME = f"{__package__}._C"
_C: Optional[Any] = None
_reason: str

if switches.flag("MAGLOSS_DISABLE_EXT"):
    _reason = "disabled by MAGLOSS_DISABLE_EXT"
else:
    try:
        _C = importlib.import_module(_NAME)
        _reason = "compiled extension loaded"
    except ModuleNotFoundError as exc:
        if exc.name != _NAME:
            raise
        _reason = ("no compiled extension (pure-Python install): build it on a machine with a CUDA torch and "
                   "toolkit with `pip install --no-build-isolation .`")
    except ImportError as exc:  # built, but for another torch/CUDA, or a missing shared library
        _reason = f"compiled extension {_NAME} failed to load ({exc}); rebuild it against the installed torch"


def _is_f64(*tensors) -> bool:
    import torch

    return any(t.dtype == torch.float64 for t in tensors)


def _spec_and_index(params):
    # params = spec.op_args(ignore_index) = (kind, scale, m1, m2, m3, l_a, u_a, l_m, u_m, boundary,
    # straight_through, ignore_index, subcenters), produced by a validated MarginSpec.
    from .margins import MarginSpec

    return MarginSpec.from_op_args(params)


#: device type -> the fused engine module whose kernels are registered for it ("cuda": magloss._C;
#: the CPU emulator's build of the same sources registers itself for "cpu" in the tests).
_ENGINES: Dict[str, Any] = {}


def _side_flag(params):
    """(the op's scalar arguments without ``side``, side): a call may leave the default (off) out."""
    from . import ops

    n = len(ops._PARAMS)
    return params[:n], len(params) > n and bool(params[n])


def _fused_margin_ce(engine, embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t, *params):
    """Fused kernel of magloss::margin_ce: the fused engine for fp32/fp16/bf16, the
    chunked PyTorch engine for float64 (the fused kernels are fp32-math only). With ``side``
    (the op's last argument) the fused forward also tracks the side outputs."""
    from . import chunked, ops

    params, side = _side_flag(params)
    if _is_f64(embeddings, weight):
        spec, ignore_index = _spec_and_index(params)
        outs = chunked.margin_ce_forward(embeddings, weight, labels, spec, ignore_index, sphere_lambda,
                                         row_margins, neg_threshold, neg_t, side=side)
        return ops.with_side(outs, embeddings, side)
    return engine.margin_ce(embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t, *params,
                            side)


def _fused_margin_ce_backward(engine, grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels, lse, norms,
                             sphere_lambda, row_margins, neg_threshold, neg_t, *params):
    """Fused kernel of magloss::margin_ce_backward (float64 -> the chunked engine, as the forward)."""
    if _is_f64(embeddings, weight):
        from . import chunked

        spec, ignore_index = _spec_and_index(params)
        return chunked.margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels,
                                          lse, spec, ignore_index, sphere_lambda, row_margins, neg_threshold,
                                          neg_t)
    return engine.margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels, lse,
                                     norms, sphere_lambda, row_margins, neg_threshold, neg_t, *params)


def _fused_margin_ce_kept(engine, embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t,
                          *params):
    """Fused kernel of magloss::margin_ce_kept, the speed path's forward (float64 -> the chunked engine);
    ``side`` as :func:`_fused_margin_ce`."""
    from . import chunked, ops

    params, side = _side_flag(params)
    if _is_f64(embeddings, weight):
        spec, ignore_index = _spec_and_index(params)
        outs = chunked.margin_ce_forward(embeddings, weight, labels, spec, ignore_index, sphere_lambda,
                                         row_margins, neg_threshold, neg_t, keep=True, side=side)
        return ops.with_side(outs, embeddings, side)
    return engine.margin_ce_kept(embeddings, weight, labels, sphere_lambda, row_margins, neg_threshold, neg_t,
                                 *params, side)


def _fused_margin_ce_backward_kept(engine, grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels, lse,
                                   norms, kept, kept_norms, sphere_lambda, row_margins, neg_threshold, neg_t, *params):
    """Fused kernel of magloss::margin_ce_backward_kept (float64 -> the chunked engine)."""
    if _is_f64(embeddings, weight):
        from . import chunked

        spec, ignore_index = _spec_and_index(params)
        return chunked.margin_ce_backward(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels,
                                          lse, spec, ignore_index, sphere_lambda, row_margins, neg_threshold,
                                          neg_t, kept=kept, kept_norms=kept_norms)
    return engine.margin_ce_backward_kept(grad_lse, grad_zy, grad_reg, grad_norms, embeddings, weight, labels, lse,
                                          norms, kept, kept_norms, sphere_lambda, row_margins, neg_threshold, neg_t,
                                          *params)


def register_kernels(fwd_op, bwd_op, engine: Optional[Any] = None, device_type: str = "cuda",
                     kept_ops=None) -> bool:
    """Register a fused engine's kernels as the `device_type` implementation of the custom ops.

    ``fwd_op``, ``bwd_op``: magloss::margin_ce and magloss::margin_ce_backward (the flat path);
    ``kept_ops``: (magloss::margin_ce_kept, magloss::margin_ce_backward_kept), the speed path,
    or None to leave those on their default kernel. ``engine`` defaults to the compiled extension
    magloss._C on "cuda". Returns True when registered; without the extension the default kernels
    stay in use and this returns False.
    float64 inputs are routed to the chunked PyTorch engine by the registered wrappers (docs/cuda.md).
    The CPU emulator's build of the same sources (tests/emu) registers itself for "cpu".
    """
    engine = _C if engine is None else engine
    if engine is None or not hasattr(engine, "margin_ce"):
        return False
    fwd_op.register_kernel(device_type)(functools.partial(_fused_margin_ce, engine))
    bwd_op.register_kernel(device_type)(functools.partial(_fused_margin_ce_backward, engine))
    if kept_ops is not None:
        kept_fwd, kept_bwd = kept_ops
        kept_fwd.register_kernel(device_type)(functools.partial(_fused_margin_ce_kept, engine))
        kept_bwd.register_kernel(device_type)(functools.partial(_fused_margin_ce_backward_kept, engine))
    _ENGINES[device_type] = engine
    return True


def _fused_one_vs_all(engine, embeddings, weight, labels, bias, kind, params, ignore_index, side=False):
    """Fused kernel of magloss::one_vs_all (float64 -> the chunked engine, as margin_ce's); with
    ``side`` the fused forward also tracks the side outputs."""
    from . import onevsall, ops

    if _is_f64(embeddings, weight):
        outs = onevsall.one_vs_all_forward(embeddings, weight, labels, bias, kind, params, ignore_index, side)
        return ops.with_side(outs, embeddings, side)
    onevsall._check_op_args(kind, params, bias, embeddings)   # the chunked op's messages
    return engine.one_vs_all(embeddings, weight, labels, bias, kind, params, ignore_index, side)


def _fused_one_vs_all_backward(engine, grad_rows, embeddings, weight, labels, bias, kind, params, ignore_index):
    """Fused kernel of magloss::one_vs_all_backward (float64 -> the chunked engine, as the forward)."""
    from . import onevsall

    if _is_f64(embeddings, weight):
        return onevsall.one_vs_all_backward(grad_rows, embeddings, weight, labels, bias, kind, params, ignore_index)
    onevsall._check_op_args(kind, params, bias, embeddings)
    return engine.one_vs_all_backward(grad_rows, embeddings, weight, labels, bias, kind, params, ignore_index)


def register_one_vs_all_kernels(fwd_op, bwd_op, engine: Optional[Any] = None, device_type: str = "cuda") -> bool:
    """Register a fused engine's one-vs-all kernels as the `device_type` implementation of
    magloss::one_vs_all and its backward op (magloss.onevsall), as :func:`register_kernels` does
    for the margin ops. Returns False (the chunked engine stays in use) without an engine that
    has them (no extension, or one built before they existed)."""
    engine = _C if engine is None else engine
    if engine is None or not hasattr(engine, "one_vs_all"):
        return False
    fwd_op.register_kernel(device_type)(functools.partial(_fused_one_vs_all, engine))
    bwd_op.register_kernel(device_type)(functools.partial(_fused_one_vs_all_backward, engine))
    _ENGINES[device_type] = engine
    return True


def fused_chunk_columns(batch: int, num_classes: int, device_type: str = "cuda") -> Optional[int]:
    """The class-chunk width the fused engine uses for this shape (honours MAGLOSS_CHUNK),
    or None without the extension. Peak extra memory of the fused op is about
    batch x chunk x 4 bytes (x 1.5 for fp16/bf16), independent of num_classes beyond that."""
    engine = _ENGINES.get(device_type)
    return None if engine is None else int(engine.chunk_columns(int(batch), int(num_classes)))


def flush_input_checks() -> None:
    """Wait for the fused engine's pending input checks and raise the first failure.

    The fused CUDA forward checks its inputs on the device (labels in [0, C) or
    ``ignore_index``, no NaN/Inf in embeddings or weight) and, by default
    (``MAGLOSS_CHECK_INPUTS=async``), reads the result back without making the host wait.
    A failure is raised as ``ValueError`` by the next fused forward or backward that finds the
    read-back finished, or by this function, which waits for every pending read-back (one
    host synchronization). Call it where a late error would be costly, e.g. before saving a
    checkpoint or at the end of an epoch. Each failure is raised once. Without the compiled
    extension it does nothing: the chunked engine raises in the offending call.

    Raises:
        ValueError: the message of :func:`magloss.checks.check_values` for the oldest failed check, marked
            "reported late" with the number of the fused forward call it came from.
    """
    for engine in _ENGINES.values():
        engine.flush_input_checks()


def extension_status() -> Dict[str, Any]:
    """Whether the fused CUDA engine is in use, and why (not).

    Returns a dict: ``compiled`` (the extension imported), ``cuda_available``
    (torch sees a GPU), ``fused`` (both, i.e. CUDA tensors run the fused kernels) and
    ``reason`` (a sentence for logs).
    """
    import torch

    cuda = torch.cuda.is_available()
    compiled = _C is not None
    if compiled and not cuda:
        reason = "compiled extension loaded, but no CUDA device is visible: chunked PyTorch engine in use"
    elif compiled:
        reason = "compiled extension loaded: CUDA tensors use the fused kernels"
    else:
        reason = _reason
    return {"compiled": compiled, "cuda_available": cuda, "fused": compiled and cuda, "reason": reason}
