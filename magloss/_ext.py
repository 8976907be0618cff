"""The only importer of the compiled extension ``magloss._C``.

The extension is optional: without it (a pure-Python install, a CPU-only torch, or
``MAGLOSS_DISABLE_EXT=1``) every op runs the reference engine. :func:`extension_status`
says which path is in use and why.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

__all__ = ["extension_status", "register_cuda_kernels"]

_C: Optional[Any] = None
_reason: str

if os.environ.get("MAGLOSS_DISABLE_EXT", "0") not in ("", "0"):
    _reason = "disabled by MAGLOSS_DISABLE_EXT"
else:
    try:
        from . import _C  # type: ignore[no-redef]  # noqa: F811

        _reason = "compiled extension loaded"
    except ImportError as exc:  # pure-Python install, or a build for another torch
        _C = None
        _reason = f"compiled extension not available ({exc}); install with a CUDA toolkit and " \
                  "`pip install --no-build-isolation .` to build it"


def register_cuda_kernels(fwd_op, bwd_op) -> bool:
    """Register the fused kernels as the "cuda" implementation of the two custom ops.

    Returns True when registered; without the extension the reference stays the CUDA
    kernel too and this returns False.
    """
    if _C is None or not hasattr(_C, "margin_ce"):
        return False
    fwd_op.register_kernel("cuda")(_C.margin_ce)
    bwd_op.register_kernel("cuda")(_C.margin_ce_backward)
    return True


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
        reason = "compiled extension loaded, but no CUDA device is visible: reference engine in use"
    elif compiled:
        reason = "compiled extension loaded: CUDA tensors use the fused kernels"
    else:
        reason = _reason
    return {"compiled": compiled, "cuda_available": cuda, "fused": compiled and cuda, "reason": reason}
