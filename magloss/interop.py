"""Loading class matrices saved by other projects into magloss losses."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["load_magface_weight"]


def load_magface_weight(loss: nn.Module, source: Union[Tensor, Mapping[str, Tensor]],
                        key: Optional[str] = None) -> nn.Module:
    """Copy an official MagFace class matrix into ``loss.weight``.

    The MagFace code's ``MagLinear`` stores its weight as [D, C] (in_features first) and
    normalizes columns; magloss stores [C, D] (nn.Linear layout) and normalizes rows.
    This transposes.

    Args:
        loss: any magloss margin loss (it has ``weight`` [C, D]).
        source: the [D, C] tensor, or a state dict / checkpoint (``{"state_dict": ...}``
            is unwrapped) holding it.
        key: the state-dict key; by default the single key ending in ``fc.weight``
            (``module.`` prefixes from DataParallel are fine).

    Returns ``loss``. Raises ValueError naming the problem when the key is missing or
    ambiguous or the shape is not [D, C].
    """
    if isinstance(source, Mapping):
        state = source.get("state_dict", source)
        if key is None:
            keys = [k for k in state if k.endswith("fc.weight")]
            if len(keys) != 1:
                raise ValueError(f"key: expected exactly one state-dict key ending in 'fc.weight', found {keys}; "
                                 "pass key=")
            key = keys[0]
        if key not in state:
            raise ValueError(f"key: {key!r} is not in the state dict")
        source = state[key]
    if not isinstance(source, Tensor):
        raise TypeError(f"source: expected a tensor or a state dict, got {type(source).__name__}")
    c, d = loss.weight.shape
    if tuple(source.shape) != (d, c):
        raise ValueError(f"source: expected the MagFace layout [D, C] = [{d}, {c}], got {tuple(source.shape)}")
    with torch.no_grad():
        loss.weight.copy_(source.t())
    return loss
