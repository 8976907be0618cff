"""Input checks of the ops' tensors: shapes, dtypes, families and values, in the caller's words.

The Python engines (the chunked engine, the oracle) and every public function that takes
embeddings, a class matrix and labels run these, and the fused engine's C++ checks (csrc/)
raise the same messages, so that a bad input gets the same error whichever path it takes:
a TypeError or ValueError naming the argument, never a traceback from deep inside or a
silent NaN.

* :func:`check_types`, :func:`check_inputs`: metadata only (no data access, no device
  synchronization): tensor kinds, dtypes, ranks, sizes, devices, the [D, C] layout.
* :func:`num_classes_of`, :func:`check_extras`: the op's optional inputs and integer
  hyperparameters (which come unvalidated from C++/torch.library callers).
* :func:`check_values`, :func:`check_labels`: what needs the data (label range, NaN/Inf),
  found on the device and read back once.

Scalar hyperparameters are validated by :mod:`magloss.validation`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import switches
from .margins import BOUNDARIES, COMBINED, EASY, MarginSpec, check_boundary, check_row_margins_family
from .rows import autocasting, compute_dtype, is_autocast_pair
from .validation import check_subcenters

__all__ = [
    "first_true", "bad_labels", "input_check_mode", "check_types", "check_inputs", "num_classes_of",
    "check_extras", "label_error", "check_labels", "check_values",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int64, torch.int32)


def first_true(mask: Tensor) -> Tensor:
    """Index of the first True of a 1-D bool ``mask`` as a 0-d int64 tensor on the mask's
    device, or ``len(mask)`` when there is none. No host synchronization."""
    n = mask.shape[0]
    idx = torch.arange(n, device=mask.device)
    return torch.where(mask, idx, n).amin() if n else idx.new_zeros(())


def bad_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """[B] bool: labels that are neither in [0, num_classes) nor ``ignore_index``."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def label_error(label: int, row: int, num_classes: int, ignore_index: int, where: str = "row") -> str:
    """The message of a label outside [0, num_classes) that is not ``ignore_index``, found at
    ``row`` (``where``: "row", or "global row" in a sharded head's gathered batch)."""
    return (f"labels: expected class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got {label} at {where} {row}")


def check_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """[B] bool: the rows not labelled ``ignore_index``, after checking that every other
    label is in [0, num_classes) (ValueError naming ``labels``, the first bad value and its
    row, as :func:`check_values`). One host synchronization."""
    i = int(first_true(bad_labels(labels, num_classes, ignore_index)))
    if i < labels.shape[0]:
        raise ValueError(label_error(int(labels[i]), i, num_classes, ignore_index))
    return labels != ignore_index


def input_check_mode() -> str:
    """``MAGLOSS_CHECK_INPUTS``, read at each call and parsed as the fused engine parses it:
    'async' (unset, '', 'async' or '1'), 'sync', or 'off' ('off' or '0'). Raises ValueError
    for anything else. The chunked engine and the oracle always check synchronously; only
    'off' changes what they check (:func:`check_values`)."""
    return switches.choice("MAGLOSS_CHECK_INPUTS", ("async", "sync", "off"), aliases={"1": "async", "0": "off"})


def check_types(**tensors: Tensor) -> None:
    """Each keyword argument must be a tensor of its role's dtypes: ``labels`` int64/int32,
    anything else (``embeddings``, ``weight``) float16/bfloat16/float32/float64. Raises
    TypeError naming the argument; no data access."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if name == "labels":
            if t.dtype not in _INTS:
                raise TypeError(f"labels: expected an int64 or int32 tensor of class indices, got {t.dtype}")
        elif t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")


def check_inputs(embeddings: Tensor, weight: Tensor, labels: Tensor) -> None:
    """Metadata checks (no data access, no device sync). Raises TypeError/ValueError naming
    the argument. Value checks (label range, NaN/Inf) happen inside the op kernels.
    embeddings and weight must share a dtype, except a float32 weight with float16/bfloat16
    embeddings under autocast (what :func:`magloss.functional.autocast_inputs` passes on)."""
    check_types(embeddings=embeddings, weight=weight, labels=labels)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings: expected shape [B, D], got {tuple(embeddings.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [C, D], got {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels: expected shape [B], got {tuple(labels.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one class, got C = 0")
    if embeddings.shape[1] != weight.shape[1] and embeddings.shape[1] == weight.shape[0]:
        raise ValueError(
            f"weight: expected the layout [C, D] (one row per class, as nn.Linear) with D = {embeddings.shape[1]} "
            f"(the embeddings' size), got {tuple(weight.shape)}: it looks transposed, [D, C] as the MagFace code "
            "and pytorch-metric-learning store it; pass weight.t() (or magloss.load_magface_weight for a checkpoint)"
        )
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings: expected embedding size D = {weight.shape[1]} (weight is {tuple(weight.shape)}), "
            f"got {embeddings.shape[1]}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels: expected {embeddings.shape[0]} labels (one per embedding row), got {labels.shape[0]}")
    if embeddings.device != weight.device or labels.device != embeddings.device:
        raise ValueError(
            f"embeddings, weight, labels: expected one device, got {embeddings.device}, {weight.device}, {labels.device}"
        )
    mixed_ok = is_autocast_pair(embeddings.dtype, weight.dtype) and autocasting(embeddings)
    if embeddings.dtype != weight.dtype and not mixed_ok:
        raise TypeError(
            f"embeddings, weight: expected the same dtype, got {embeddings.dtype} and {weight.dtype} "
            "(cast one, or run under torch.autocast)"
        )


def num_classes_of(weight: Tensor, subcenters: int) -> int:
    """C = weight.shape[0] / K for K = ``subcenters`` sub-centers per class (row j·K + k of
    ``weight`` is sub-center k of class j; K = 1: one row per class).

    Raises ValueError naming ``subcenters`` (not an integer ≥ 1) or ``weight`` (its rows
    are not a multiple of K)."""
    k = check_subcenters(subcenters)
    if weight.shape[0] % k:
        raise ValueError(f"weight: expected K*C rows for subcenters K={k} (row j*K + k is sub-center k of "
                         f"class j), got {weight.shape[0]} rows, not a multiple of {k}")
    return weight.shape[0] // k


def check_extras(embeddings: Tensor, spec: MarginSpec, row_margins: Optional[Tensor],
                 neg_threshold: Optional[Tensor], neg_t: Optional[Tensor]) -> None:
    """Shape, dtype and family checks of the optional op inputs (every engine runs them).

    * row_margins: None or [B, 2] contiguous, in the compute dtype, on the embeddings'
      device, only with the COMBINED family: per-row (m2_i, m3_i).
    * neg_threshold, neg_t: both None or both given (CurricularFace): [B] and 0-d, compute
      dtype, same device.
    * boundary one of THRESHOLD, EASY, CLIP, NONE (:func:`magloss.margins.check_boundary`),
      CLIP or NONE only with COMBINED; subcenters K >= 1 (:func:`num_classes_of` also checks
      that K divides the class matrix's rows). The op's integers come unvalidated from
      C++/torch.library callers.

    Raises ValueError naming the argument.
    """
    boundary = check_boundary(spec.boundary)
    check_subcenters(spec.subcenters)
    if boundary > EASY and spec.kind != COMBINED:
        raise ValueError(f"boundary: {BOUNDARIES[boundary].upper()} needs the COMBINED margin family "
                         f"(kind 0), got kind {spec.kind}")
    ct = compute_dtype(embeddings.dtype)
    b = embeddings.shape[0]

    def expect(name: str, t: Tensor, shape: Tuple[int, ...]) -> None:
        if tuple(t.shape) != shape or t.dtype != ct or t.device != embeddings.device or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {list(shape)} {ct} tensor on {embeddings.device}, "
                             f"got {'a non-contiguous ' if not t.is_contiguous() else ''}{list(t.shape)} "
                             f"{t.dtype} on {t.device}")

    check_row_margins_family(spec, row_margins)
    if row_margins is not None:
        expect("row_margins", row_margins, (b, 2))
    if (neg_threshold is None) != (neg_t is None):
        raise ValueError("neg_threshold, neg_t: expected both (CurricularFace's per-row threshold and t) or "
                         f"neither, got {'neg_threshold' if neg_t is None else 'neg_t'} alone")
    if neg_threshold is not None:
        expect("neg_threshold", neg_threshold, (b,))
        expect("neg_t", neg_t, ())


def check_values(embeddings: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                 num_classes: Optional[int] = None) -> None:
    """Value checks that need the data: label range and finiteness. Raises ValueError.

    The first bad label row, embedding row and class row are found on the device and read
    back together: one host synchronization per call. The chunked engine and the oracle
    pay that; the fused CUDA path checks on the device without waiting (docs/cuda.md).

    With ``MAGLOSS_CHECK_INPUTS=off`` (:func:`input_check_mode`) the NaN/Inf check is skipped,
    as in the fused engine: a NaN then gives NaN row statistics (NaN in, NaN out). The label
    check always runs, since the engines index with the labels.
    """
    num_classes = weight.shape[0] if num_classes is None else num_classes
    firsts = [first_true(bad_labels(labels, num_classes, ignore_index))]
    if input_check_mode() != "off":
        firsts += [first_true(~torch.isfinite(embeddings).all(dim=1)), first_true(~torch.isfinite(weight).all(dim=1))]
    i, *rows = torch.stack(firsts).tolist()
    if i < labels.shape[0]:
        raise ValueError(label_error(int(labels[i]), i, num_classes, ignore_index))
    for name, t, j in zip(("embeddings", "weight"), (embeddings, weight), rows):
        if j < t.shape[0]:
            raise ValueError(f"{name}: contains NaN or Inf (row {j})")
