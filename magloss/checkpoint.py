"""Checkpoints of the class matrix that reshard: written by N ranks, read by any M (or 1).

Format: a directory holding one file per writing rank and an index::

    path/meta.json                   {"format", "num_classes", "subcenters", "embedding_size", "world_size",
                                      "shards": [{"file", "start", "end"}, ...], "extra": {...}}
    path/shard-00000-of-00002.pt     {"start", "end", "weight": [K·C_r, D], "optim": {...}}

Each shard file holds the global rows [start, end) of W (with K sub-centers per class, the
K·C_r rows of its C_r classes: start and end count rows of W, not classes) and, if an optimizer was given,
the optimizer state that belongs to ``weight``: per-class tensors (those shaped like
``weight``: SGD momentum, Adam's exp_avg / exp_avg_sq, ...) are sliced by rows like W;
anything else (Adam's ``step``, ...) is replicated. Loading reads only the files that
overlap the rows the loading rank owns (memory-mapped) and slices them, so a checkpoint
written by 2 ranks loads on 3 ranks, on 1 rank, or into a single-process
:class:`magloss.MarginLoss` without any process group. Values are copied bit for bit.

The head's replicated counters (Partial FC ``step``, SphereFace ``iteration``) are
stored in ``meta.json`` under "extra" and restored when the head has them.

Durability: every file is written into a temporary file, flushed and fsync'ed, then renamed
onto its name (:func:`write_atomically`), and the directory is fsync'ed after the renames
(:func:`fsync_dir`), so that after a power loss a name is either absent or its complete
content, never a truncated file. A failed write or fsync raises OSError naming the file and
leaves no temporary file behind; under a process group every rank learns of it and raises.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["save_class_matrix", "load_class_matrix", "load_full", "write_atomically", "fsync_dir"]

FORMAT = "magloss.class_matrix/1"
_META = "meta.json"
#: Buffers saved with the matrix: Partial FC's step, SphereFace's iteration, AdaFace's norm
#: statistics and CurricularFace's t (replicated on every rank).
_EXTRA = ("step", "iteration", "batch_mean", "batch_std", "t")


def _layout(head) -> Tuple[Tensor, int, int, int, int, int, object, int]:
    """(weight, start, end, num_classes, rank, world, group, K) of a sharded or plain head: this
    process owns classes [start, end), i.e. W rows [start·K, end·K) with K sub-centers per class."""
    if isinstance(head, nn.Parameter):
        weight, n = head, head.shape[0]
        return weight, 0, n, n, 0, 1, None, 1
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"head: expected a loss module with a 2-D `weight` (or the Parameter itself), "
                        f"got {type(head).__name__}")
    spec = getattr(head, "spec", None)
    k = 1 if spec is None else spec.subcenters
    if hasattr(head, "shard_start"):
        return weight, head.shard_start, head.shard_end, head.num_classes, head.rank, head.world_size, head.group, k
    n = weight.shape[0] // k
    return weight, 0, n, n, 0, 1, None, k


#: What ``fsync`` on a directory raises where the file system cannot do it (some network and
#: FUSE file systems): the directory entry is then as durable as that file system makes it.
_DIR_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR, errno.EACCES)


def fsync_dir(path: str) -> None:
    """``fsync`` the directory ``path``, making the entries created, renamed or replaced in it
    durable (a rename is only in the directory until then: after a power loss the old name may
    come back). Skipped where the platform cannot: no ``os.O_DIRECTORY`` (Windows, where a
    directory cannot be opened), or a file system that refuses it (EINVAL, ENOTSUP, ...).

    Raises:
        OSError: ``path`` cannot be opened, or its fsync fails (EIO: the data may be lost),
        naming the directory.
    """
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: cannot open the directory to fsync it: {exc.strerror}") from None
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise OSError(exc.errno, f"{path}: fsync of the directory failed: {exc.strerror}") from None
    finally:
        os.close(fd)


def write_atomically(path: str, write, sync_dir: bool = True) -> None:
    """Write a file that is never seen half-written, even after a power loss.

    ``write(f)`` fills a binary file ``path + ".tmp<pid>"``, which is flushed, ``fsync``'ed and
    closed, then renamed onto ``path`` (``os.replace``: a reader sees the old file or the whole
    new one); then the directory is fsync'ed (:func:`fsync_dir`) unless ``sync_dir`` is False
    (a caller renaming several files into one directory fsyncs it once after the last).

    Raises:
        OSError naming ``path`` and the operation that failed (write, fsync, rename); the
        temporary file is removed and ``path`` is left as it was.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    op = "write"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            op = "fsync"
            os.fsync(f.fileno())
        op = "rename"
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"{path}: {op} failed: {exc.strerror or exc}") from None
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def all_ok(error: Optional[BaseException], group, what: str) -> None:
    """Raise ``error`` on its rank and an OSError on the others when some rank of ``group``
    failed (one all-reduce; a no-op without a group): every rank leaves a collective write
    together instead of waiting in the next barrier for the rank that failed. ``what`` names
    the write in the others' message."""
    if group is not None:
        from .distributed.comm import comm_device

        flag = torch.tensor([float(error is not None)], device=comm_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() > 0 and error is None:
            raise OSError(errno.EIO, f"{what}: another rank failed to write its part")
    if error is not None:
        raise error


def _atomic_save(obj, path: str, sync_dir: bool = True) -> None:
    write_atomically(path, lambda f: torch.save(obj, f), sync_dir)


def save_class_matrix(path: str, head, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Save the class matrix (and ``optimizer``'s state for it) under the directory ``path``.

    head: a :class:`magloss.distributed.ShardedMarginLoss` (collective: every rank of its
    group must call this with the same ``path`` on a shared file system; each writes its
    rows), a single-process loss module with ``weight`` [C, D], or the Parameter itself
    (call it on one process only). optimizer: optional; the state of ``head.weight`` is
    saved (per-class tensors by rows, the rest replicated). Overwrites an earlier
    checkpoint in ``path``; stale shard files of another world size are ignored on load.
    Each file is written atomically and fsync'ed, and so are ``path`` and its parent
    (module docstring: Durability).

    Raises:
        OSError: a file could not be written or fsync'ed (naming it; on every rank of the
        group: the others say that another rank failed). ``meta.json`` is written last: a
        failed write into a new ``path`` leaves no ``meta.json`` (a load refuses the folder).
    """
    weight, start, end, num_classes, rank, world, group, k = _layout(head)
    os.makedirs(path, exist_ok=True)
    name = f"shard-{rank:05d}-of-{world:05d}.pt"
    entry = {"start": start * k, "end": end * k, "weight": weight.detach().cpu()}
    if optimizer is not None:
        state = optimizer.state.get(weight, {})
        entry["optim"] = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in state.items()}
        entry["optim_rows"] = [k for k, v in state.items() if isinstance(v, Tensor) and v.shape == weight.shape]
    error = None
    try:
        _atomic_save(entry, os.path.join(path, name), sync_dir=False)
    except OSError as exc:
        error = exc
    all_ok(error, group, path)
    if rank == 0:
        from .distributed.loss import shard_range

        shards = []
        for r in range(world):
            s, e = shard_range(num_classes, world, r) if group is not None else (0, num_classes)
            shards.append({"file": f"shard-{r:05d}-of-{world:05d}.pt", "start": s * k, "end": e * k})
        extra = {k: getattr(head, k).item() for k in _EXTRA if isinstance(getattr(head, k, None), Tensor)}
        meta = {"format": FORMAT, "num_classes": num_classes, "subcenters": k, "embedding_size": int(weight.shape[1]),
                "world_size": world, "has_optimizer": optimizer is not None, "shards": shards, "extra": extra}
        if optimizer is not None:
            meta["optimizer"] = type(optimizer).__name__
        try:
            write_atomically(os.path.join(path, _META), lambda f: f.write(json.dumps(meta, indent=1).encode()))
            fsync_dir(os.path.dirname(os.path.abspath(path)))      # `path` itself, when it was just made
        except OSError as exc:
            error = exc
    all_ok(error, group, path)


def _read_meta(path: str) -> Dict:
    file = os.path.join(path, _META)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"path: no class-matrix checkpoint at {path!r} (missing {_META})")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def _read_rows(path: str, meta: Dict, start: int, end: int, with_optim: bool):
    """Rows [start, end) of W and of the per-class optimizer state, plus the replicated state."""
    parts, optim_parts, replicated, row_keys = [], {}, None, None
    for sh in meta["shards"]:
        lo, hi = max(start, sh["start"]), min(end, sh["end"])
        if lo >= hi:
            continue
        entry = torch.load(os.path.join(path, sh["file"]), map_location="cpu", mmap=True, weights_only=True)
        a, b = lo - sh["start"], hi - sh["start"]
        parts.append(entry["weight"][a:b])
        if with_optim:
            if row_keys is None:
                row_keys = list(entry["optim_rows"])
                replicated = {k: v for k, v in entry["optim"].items() if k not in row_keys}
            for k in row_keys:
                optim_parts.setdefault(k, []).append(entry["optim"][k][a:b])
    weight = torch.cat(parts) if parts else None
    optim = None
    if with_optim:
        optim = dict(replicated or {})
        optim.update({k: torch.cat(v) for k, v in optim_parts.items()})
    return weight, optim


def _state_keys(optimizer: torch.optim.Optimizer, weight: Tensor):
    """The state keys ``optimizer`` keeps for ``weight``: those of a one-element parameter after
    one step of a fresh optimizer of the same class and hyperparameters (weight's group), or
    None when that cannot be built (a custom optimizer with other constructor arguments)."""
    group = next((g for g in optimizer.param_groups if any(p is weight for p in g["params"])), None)
    if group is None:
        return None
    kwargs = {k: group[k] for k in optimizer.defaults if k in group}
    probe = torch.zeros(1, requires_grad=True)
    try:
        fresh = type(optimizer)([probe], **kwargs)
        probe.grad = torch.zeros(1)
        fresh.step()
    except Exception:               # not constructible like that: nothing to compare with
        return None
    return {k for k, v in fresh.state[probe].items() if v is not None}


def _check_optimizer_kind(path: str, meta: Dict, optimizer: torch.optim.Optimizer, weight: Tensor,
                          saved: Dict) -> None:
    """ValueError when the checkpoint's optimizer state is not the kind ``optimizer`` keeps
    (e.g. SGD's momentum_buffer loaded into Adam, whose first step would then fail with
    KeyError: 'exp_avg'). A checkpoint saved before any step (no state) fits any optimizer."""
    have = {k for k, v in saved.items() if v is not None}
    want = _state_keys(optimizer, weight)
    if not have or want is None or have == want:
        return
    wrote = meta.get("optimizer", "an optimizer")
    raise ValueError(
        f"optimizer: the checkpoint at {path!r} holds {wrote} state for the class matrix "
        f"({', '.join(sorted(have))}), but this {type(optimizer).__name__} keeps "
        f"{', '.join(sorted(want)) or 'no state'}; build the optimizer the checkpoint was written with "
        "(same class and options), or load without optimizer= to start its state afresh")


def load_class_matrix(path: str, head, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load the rows this process owns from a checkpoint of :func:`save_class_matrix`,
    whatever world size wrote it.

    head: as in :func:`save_class_matrix` (a sharded head loads rows
    [shard_start, shard_end); a single-process head or Parameter loads all C rows and
    needs no process group). ``head.weight`` is overwritten in place (its dtype and
    device are kept). optimizer: if given, its state for ``head.weight`` is replaced by the
    checkpoint's (rows sliced the same way, moved to the weight's device). Raises
    ValueError when num_classes or embedding_size differ, when an optimizer is given but
    the checkpoint has no optimizer state, or when its state is of another kind than the
    given optimizer keeps (SGD's momentum_buffer into Adam, ...); nothing is changed then.
    """
    weight, start, end, num_classes, _, _, _, k = _layout(head)
    meta = _read_meta(path)
    if meta["num_classes"] != num_classes:
        raise ValueError(f"head: the checkpoint has num_classes={meta['num_classes']}, the head {num_classes}")
    if meta.get("subcenters", 1) != k:
        raise ValueError(f"head: the checkpoint has subcenters={meta.get('subcenters', 1)}, the head {k}")
    if meta["embedding_size"] != weight.shape[1]:
        raise ValueError(f"head: the checkpoint has embedding_size={meta['embedding_size']}, "
                         f"the head {weight.shape[1]}")
    if optimizer is not None and not meta.get("has_optimizer", False):
        raise ValueError(f"optimizer: the checkpoint at {path!r} holds no optimizer state")
    rows, optim = _read_rows(path, meta, start * k, end * k, optimizer is not None)
    if optimizer is not None:
        _check_optimizer_kind(path, meta, optimizer, weight, optim)
    with torch.no_grad():
        weight.copy_(rows)
    if optimizer is not None:
        optimizer.state[weight] = {
            k: (v.to(weight.device) if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in optim.items()}
    for k, v in meta.get("extra", {}).items():
        buf = getattr(head, k, None)
        if isinstance(buf, Tensor):
            buf.fill_(v)


def load_full(path: str) -> Tuple[Tensor, Optional[Dict]]:
    """The whole class matrix [C, D] ([K·C, D] with K sub-centers; CPU, saved dtype) and the optimizer state for it
    (full per-class tensors plus the replicated entries; None if none was saved)."""
    meta = _read_meta(path)
    rows = meta["num_classes"] * meta.get("subcenters", 1)
    return _read_rows(path, meta, 0, rows, bool(meta.get("has_optimizer", False)))
