"""Spawn helpers for the distributed tests: gloo on CPU, one process per rank.

``spawn(fn, world_size, tmp_dir, *args)`` starts ``world_size`` processes with
torch.multiprocessing.spawn, initializes a gloo process group through a ``file://``
init_method inside ``tmp_dir`` and calls ``fn(rank, world_size, *args)`` in each. An
exception in any rank fails the call (spawn re-raises it with the rank's traceback).
Run many checks per spawn: starting processes is the slow part.

``spawn_worlds(phase, world_sizes, tmp_dir)`` is "every world size in one spawn": max(world_sizes)
processes run ``phase(rank, world, group, out_dir)`` for each world size in turn, on the ranks
below it (``group``: None for the largest, the subgroup {0, …, world − 1} otherwise), and it
returns ``{(world, rank): what phase returned}``.
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


def _worlds_worker(rank, world_size, phase, world_sizes, out_dir):
    # new_group is collective: every rank creates every subgroup first, in the same order
    groups = {w: (None if w == world_size else dist.new_group(list(range(w)))) for w in world_sizes}
    for w in world_sizes:
        if rank < w:
            torch.save(phase(rank, w, groups[w], out_dir), os.path.join(out_dir, f"w{w}_r{rank}.pt"))
        dist.barrier()


def spawn_worlds(phase, world_sizes, tmp_dir) -> dict:
    """Run ``phase(rank, world, group, out_dir)`` for each world size of ``world_sizes`` (in that
    order, so a phase may read what an earlier world size wrote under ``out_dir`` = ``tmp_dir``)
    in one spawn of max(world_sizes) gloo ranks; ``phase`` is module-level and returns something
    torch.save can write. Returns ``{(world, rank): phase's result}``."""
    out_dir = str(tmp_dir)
    spawn(_worlds_worker, max(world_sizes), out_dir, phase, tuple(world_sizes), out_dir)
    return {(w, r): torch.load(os.path.join(out_dir, f"w{w}_r{r}.pt"), weights_only=False)
            for w in world_sizes for r in range(w)}


def split_sizes(n: int, world_size: int):
    """np.array_split sizes of n items over world_size parts (first n % W parts one larger)."""
    q, e = divmod(n, world_size)
    return [q + (1 if r < e else 0) for r in range(world_size)]
