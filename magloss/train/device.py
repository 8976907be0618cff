"""The device-specific choices of a training process, as one pure function of what the machine offers."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from .errors import UsageError


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """The device-specific choices of a training process (:func:`decide_device`).

    Attributes:
        device: ``cpu`` or ``cuda:N`` (always with its index on CUDA).
        backend: process-group backend, ``"nccl"`` on CUDA, ``"gloo"`` on the CPU.
        amp: ``"off"``, ``"fp16"`` or ``"bf16"`` (``--amp auto`` resolved).
        amp_dtype: the autocast dtype (``torch.float16``/``torch.bfloat16``) or None (no autocast).
        scaler: whether the gradient scaler is enabled (fp16 only: bf16 has fp32's exponent range).
        pin_memory: the DataLoader's pin_memory (only worth it for copies to a GPU).
        ddp_device_ids: DistributedDataParallel's ``device_ids`` (``[N]`` on ``cuda:N`` under
            torchrun, None on the CPU or in one process).
    """

    device: torch.device
    backend: str
    amp: str
    amp_dtype: Optional[torch.dtype]
    scaler: bool
    pin_memory: bool
    ddp_device_ids: Optional[List[int]]


def decide_device(device_arg: Optional[str], amp: str, cuda_available: bool, device_count: int,
                  bf16_supported: bool, local_rank: int, world: int) -> DevicePlan:
    """Every choice of the training command that depends on the device, as a pure function of
    what the machine offers (so that the CUDA branches are tested on a CPU-only machine).

    Args:
        device_arg: ``--device`` (None: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``;
            ``cuda`` without an index: ``cuda:LOCAL_RANK``).
        amp: ``--amp``: ``auto`` (bf16 on a GPU that supports it, else fp16; off on the CPU), ``off``,
            ``fp16`` (CUDA only), ``bf16``.
        cuda_available, device_count, bf16_supported: ``torch.cuda.is_available()``,
            ``torch.cuda.device_count()``, ``torch.cuda.is_bf16_supported()`` (False without CUDA).
        local_rank, world: ``LOCAL_RANK`` and ``WORLD_SIZE`` (0 and 1 in one process).

    Returns:
        a :class:`DevicePlan`.

    Raises:
        UsageError: ``--device`` not ``cpu``/``cuda[:N]``, CUDA asked for but absent, an index
        past the devices, ``--amp fp16`` off CUDA, ``--amp bf16`` on a GPU without bfloat16.
    """
    if device_arg is None:
        device_arg = "cuda" if cuda_available else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device_arg!r}")
    on_gpu = device.type == "cuda"
    if on_gpu:
        if not cuda_available:
            raise UsageError(f"--device {device_arg}: no CUDA device is available (use --device cpu)")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= device_count:
            raise UsageError(f"--device: cuda:{device.index} does not exist (this process sees "
                             f"{device_count} CUDA device{'s' if device_count != 1 else ''})")
    elif device.index not in (None, 0):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device_arg!r}")
    else:
        device = torch.device("cpu")
    if amp == "auto":
        amp = ("bf16" if bf16_supported else "fp16") if on_gpu else "off"
    if amp == "fp16" and not on_gpu:
        raise UsageError("--amp fp16: float16 autocast needs a CUDA device; on the CPU use --amp bf16 or off")
    if amp == "bf16" and on_gpu and not bf16_supported:
        raise UsageError(f"--amp bf16: {device} has no bfloat16 support; use --amp fp16 (or auto)")
    return DevicePlan(device=device, backend="nccl" if on_gpu else "gloo", amp=amp,
                      amp_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp), scaler=amp == "fp16",
                      pin_memory=on_gpu, ddp_device_ids=[device.index] if on_gpu and world > 1 else None)
