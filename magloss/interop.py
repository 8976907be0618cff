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
            is unwrapped) holding it, e.g. ``torch.load(path)`` of a checkpoint of the
            MagFace trainer.
        key: the state-dict key. By default the class matrix is found by its shape: the
            one entry of shape [D, C] = [loss.embedding_size, loss.num_classes]. A MagFace
            checkpoint has two keys ending in ``fc.weight`` (the iresnet backbone's
            ``module.features.fc.weight`` and the head's ``module.fc.weight``); only the
            head's has that shape. If several entries have it, those ending in
            ``fc.weight`` are preferred; ``key=`` is needed only when that still leaves
            more than one.

    Returns ``loss``. Raises ValueError naming the problem when no entry or more than
    one entry has the shape (listing them), when ``key`` is missing, or when the shape
    is not [D, C]; TypeError when ``source`` is neither a tensor nor a mapping.
    """
    c, d = loss.weight.shape
    if isinstance(source, Mapping):
        state = source.get("state_dict", source)
        if key is None:
            key = _find_class_matrix(state, (d, c))
        if key not in state:
            raise ValueError(f"key: {key!r} is not in the state dict")
        source = state[key]
    if not isinstance(source, Tensor):
        raise TypeError(f"source: expected a tensor or a state dict, got {type(source).__name__}")
    if tuple(source.shape) != (d, c):
        hint = " (it looks like [C, D]: pass source.t())" if tuple(source.shape) == (c, d) else ""
        raise ValueError(f"source: expected the MagFace layout [D, C] = [{d}, {c}], got {tuple(source.shape)}{hint}")
    with torch.no_grad():
        loss.weight.copy_(source.t())
    return loss


def _find_class_matrix(state: Mapping[str, Tensor], shape) -> str:
    """The one key of ``state`` whose tensor has ``shape`` ([D, C]); ties go to keys ending in
    ``fc.weight``. Raises ValueError listing the candidates otherwise."""
    matches = [k for k, v in state.items() if isinstance(v, Tensor) and tuple(v.shape) == tuple(shape)]
    if len(matches) > 1:
        matches = [k for k in matches if k.endswith("fc.weight")] or matches
    if len(matches) == 1:
        return matches[0]
    if not matches:
        fc = {k: tuple(v.shape) for k, v in state.items() if k.endswith("fc.weight") and isinstance(v, Tensor)}
        raise ValueError(f"source: no entry of shape [D, C] = {list(shape)} (embedding_size, num_classes) in the "
                         f"state dict; entries ending in 'fc.weight': {fc}. Check num_classes, or pass key=")
    raise ValueError(f"key: several entries have the shape [D, C] = {list(shape)}: {matches}; pass key=")
