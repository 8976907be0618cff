"""The data order of the training command: one permutation per (seed, epoch), read in global
steps of ``world × batch`` samples, and the seed mixer every random draw of a run uses."""

from __future__ import annotations

import numpy as np
import torch


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Rank ``rank``'s batches of one epoch: the permutation of ``n`` from (seed, epoch), read
    from sample ``start`` in global steps of ``world·batch`` samples (the incomplete last
    global batch is dropped); rank r takes block r of each step."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, epoch: int, start: int) -> None:
        self.n, self.batch, self.world, self.rank = n, batch, world, rank
        self.seed, self.epoch, self.start = seed, epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0x5EED))
        perm = torch.randperm(self.n, generator=g).tolist()
        step = self.world * self.batch
        for p in range(self.start, self.n - step + 1, step):
            lo = p + self.rank * self.batch
            yield perm[lo:lo + self.batch]

    def __len__(self) -> int:
        return max(0, (self.n - self.start) // (self.world * self.batch))


def _mix(*values: int) -> int:
    """A 63-bit seed from a few ints (numpy's SeedSequence hash: no correlated streams)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)
