"""Spawn helpers for the distributed tests: gloo on CPU, one process per rank.

``spawn(fn, world_size, tmp_dir, *args)`` starts ``world_size`` processes with
torch.multiprocessing.spawn, initializes a gloo process group through a ``file://``
init_method inside ``tmp_dir`` and calls ``fn(rank, world_size, *args)`` in each. An
exception in any rank fails the call (spawn re-raises it with the rank's traceback).
Run many checks per spawn: starting processes is the slow part.
"""

from __future__ import annotations

import os
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, tmp_dir, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; ``fn`` must be a
    module-level (picklable) function."""
    init_file = os.path.join(str(tmp_dir), f"pg-init-{uuid.uuid4().hex}")
    mp.spawn(_worker, args=(world_size, init_file, fn, args), nprocs=world_size, join=True)


def split_sizes(n: int, world_size: int):
    """np.array_split sizes of n items over world_size parts (first n % W parts one larger)."""
    q, e = divmod(n, world_size)
    return [q + (1 if r < e else 0) for r in range(world_size)]
