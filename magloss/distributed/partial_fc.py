"""Partial FC class sampling (An et al., "Partial FC", 2021), per shard.

Each step, each shard keeps every class that appears in the global batch (its
"positives") plus uniformly sampled negatives, so that it keeps

    k_r = max(ceil(sample_rate · C_r), #positives on the shard)

of its C_r classes. The loss is then the softmax over the union of the kept classes of
all shards; only the kept rows of W enter the forward (``index_select``), so only they
receive gradient. The sample is a function of (seed, step, shard index) only:
reproducible, independent of timing and of the other ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..evaluation import fraction_count
from ..validation import check_positive

__all__ = ["check_sample_rate", "sample_count", "sampling_generator", "sample_classes"]

_MASK64 = (1 << 64) - 1


def check_sample_rate(sample_rate) -> float:
    """Raise ValueError unless ``sample_rate`` is a number in (0, 1]; return it as float."""
    return check_positive("sample_rate", sample_rate, 1.0, inclusive=True)


def sample_count(num_local: int, sample_rate: float, num_positives: int = 0) -> int:
    """k = min(C_r, max(ceil(sample_rate · C_r), num_positives)), the ceiling computed exactly
    (:func:`magloss.evaluation.fraction_count`: 0.1 · 70 keeps 7 classes, not 8)."""
    k = fraction_count(sample_rate, num_local, "ceil")
    return min(num_local, max(k, num_positives))


def sampling_generator(seed: int, step: int, shard: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (seed, step, shard) by a 64-bit LCG mix."""
    h = int(seed) & _MASK64
    for v in (int(step), int(shard)):
        h = (h * 6364136223846793005 + (v & _MASK64) + 1442695040888963407) & _MASK64
        h ^= h >> 29
    return torch.Generator().manual_seed(h & ((1 << 63) - 1))


def sample_classes(num_local: int, positives: Tensor, sample_rate: float, generator: torch.Generator) -> Tensor:
    """Sorted local class indices to keep on one shard.

    num_local: C_r, the shard's class count. positives: int64 local indices in [0, C_r)
    of classes present in the batch (duplicates allowed, any device). Returns an int64
    tensor of :func:`sample_count` distinct indices on ``positives``' device, containing
    every positive; the negatives are a uniform random subset (top-k of i.i.d. uniform
    scores drawn from ``generator``, with the positives' scores set above 1).
    """
    device = positives.device
    positives = positives.to("cpu", torch.int64)
    score = torch.rand(num_local, generator=generator, dtype=torch.float64)
    score[positives] = 2.0
    n_pos = int(torch.unique(positives).numel())
    k = sample_count(num_local, sample_rate, n_pos)
    index = torch.topk(score, k, sorted=False).indices
    return index.sort().values.to(device)
