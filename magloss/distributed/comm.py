"""Differentiable collectives for class-sharded heads, on ``torch.distributed``.

Only torch.distributed's own collectives are used (NCCL on GPUs, gloo on CPU): this
module adds the autograd rules a sharded loss needs and nothing else.

* :func:`gather_rows` — all-gather of every rank's rows (uneven row counts allowed);
  backward sums the row-gradients over ranks (in float32 at least) and returns each rank
  its own rows (a reduce-scatter; all-reduce + slice where the backend has no reduce-scatter).
* :func:`gather_stats` — all-gather of a per-row statistic ``[B]`` into ``[world, B]``
  whose backward returns the own slice: valid because every rank computes the same
  scalar loss from the gathered values, so rank r already holds ∂L/∂(its slice).
* :func:`sum_stats` — all-reduce sum whose backward is the identity, by the same argument.
* :func:`scale_grad` — identity whose backward multiplies by a factor; the sharded heads
  use it (factor = world size) to compensate DDP's gradient averaging by default, and
  :func:`undo_ddp_average` is the same by hand (see docs/distributed.md, "DDP and the
  loss scale").

Contract for the last two: every rank must backpropagate the same scalar (the sharded
loss, or one identical function of it). That holds for the losses of
:mod:`magloss.distributed`, which return the same value on every rank.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "REDUCE_SCATTER_BACKENDS",
    "require_group",
    "comm_device",
    "all_gather_ints",
    "gather_rows",
    "gather_stats",
    "sum_stats",
    "undo_ddp_average",
    "scale_grad",
    "DDP_UNDONE_MARK",
]

#: Backends whose backward of :func:`gather_rows` uses ``dist.reduce_scatter``; the
#: others (gloo, whose CPU reduce-scatter is missing in some torch versions) use
#: ``all_reduce`` and keep their own slice. Same result, twice the bytes.
REDUCE_SCATTER_BACKENDS = ("nccl",)


def require_group(group=None):
    """Return ``group`` (default: the WORLD group) or raise RuntimeError when torch.distributed
    is unavailable or not initialized."""
    if not dist.is_available():
        raise RuntimeError("group: torch.distributed is not available in this build of PyTorch")
    if not dist.is_initialized():
        raise RuntimeError(
            "group: the default torch.distributed process group is not initialized; call "
            "torch.distributed.init_process_group(backend='nccl' or 'gloo') first (torchrun sets "
            "RANK/WORLD_SIZE/MASTER_ADDR for it), or use the single-process magloss losses")
    return group if group is not None else dist.group.WORLD


def comm_device(group, fallback: Optional[torch.device] = None) -> torch.device:
    """The device collective buffers must live on: the current CUDA device for NCCL, else
    ``fallback`` (or CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback is not None else torch.device("cpu")


def all_gather_ints(values: Tensor, group) -> List[List[int]]:
    """All-gather a short 1-D int64 tensor (same length on every rank, on the group's
    :func:`comm_device`); returns one list of ints per rank, in rank order. This read-back
    is a host synchronization: callers pack everything the host needs into one call."""
    out = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, values.contiguous(), group=group)
    return torch.stack(out).tolist()


def _gather_padded(t: Tensor, sizes: Sequence[int], group) -> Tensor:
    """All-gather tensors of ``sizes[r]`` rows (same trailing shape); concatenate in rank order."""
    world = len(sizes)
    if world == 1:
        return t
    n_max = max(sizes)
    pad = t.new_zeros((n_max,) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad.contiguous(), group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: Sequence[int], group) -> Tensor:
        ctx.sizes, ctx.group = list(sizes), group
        return _gather_padded(x, ctx.sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, group = ctx.sizes, ctx.group
        world, rank = len(sizes), dist.get_rank(group)
        if world == 1:
            return grad, None, None
        dtype = grad.dtype
        # Sum the partial row-gradients in float32 at least (never in fp16/bf16), and never
        # reduce autograd's buffer in place.
        acc = grad.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else grad.clone()
        acc = acc.contiguous()
        if dist.get_backend(group) in REDUCE_SCATTER_BACKENDS:
            n_max, start = max(sizes), 0
            chunks = []
            for n in sizes:
                c = acc.new_zeros((n_max,) + tuple(acc.shape[1:]))
                c[:n] = acc[start: start + n]
                chunks.append(c)
                start += n
            out = torch.empty_like(chunks[0])
            dist.reduce_scatter(out, chunks, op=dist.ReduceOp.SUM, group=group)
            return out[: sizes[rank]].to(dtype), None, None
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
        start = sum(sizes[:rank])
        return acc[start: start + sizes[rank]].to(dtype, copy=True), None, None


def gather_rows(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """Differentiable all-gather of rows.

    x: [B_r, ...] on rank r (any dtype; float for gradients), with ``sizes[r] = B_r``
    gathered beforehand (:func:`all_gather_ints`). Returns [Σ_r B_r, ...], rank 0's rows
    first. Backward: ∂L/∂x_r = Σ_q (∂L_q/∂x_all)[rows of r], summed over ranks q; it is
    collective, so ``x.requires_grad`` must be the same on every rank.
    """
    group = require_group(group)
    if x.shape[0] != sizes[dist.get_rank(group)]:
        raise ValueError(f"x: expected {sizes[dist.get_rank(group)]} rows (sizes), got {x.shape[0]}")
    if not x.requires_grad:
        return _gather_padded(x, list(sizes), group)
    return _GatherRows.apply(x, list(sizes), group)


class _GatherStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, group) -> Tensor:
        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, v.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[ctx.rank], None


def gather_stats(v: Tensor, group=None) -> Tensor:
    """All-gather a per-row statistic: v [B] on every rank -> [world, B].

    Backward returns rank r the row r of the incoming gradient (no communication):
    exact when every rank backpropagates the same scalar function of the result.
    """
    return _GatherStats.apply(v, require_group(group))


class _SumStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, group) -> Tensor:
        out = v.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def sum_stats(v: Tensor, group=None) -> Tensor:
    """All-reduce sum Σ_r v_r of a [B] statistic; backward is the identity (same contract
    as :func:`gather_stats`)."""
    return _SumStats.apply(v, require_group(group))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


#: Attribute set on the output of :func:`undo_ddp_average`, so that a head that already
#: compensates for DDP (``ddp_backbone=True``) refuses to compensate twice.
DDP_UNDONE_MARK = "_magloss_ddp_average_undone"


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward; multiplies the gradient by ``factor`` in the backward."""
    return _ScaleGrad.apply(x, float(factor))


def undo_ddp_average(embeddings: Tensor, group=None) -> Tensor:
    """Identity in the forward; multiplies the gradient by the world size in the backward.

    DistributedDataParallel averages parameter gradients over ranks. A sharded loss is
    already the *global* loss on every rank, and its backward returns rank r ∂L/∂x_r;
    DDP's averaging would then hand the backbone (1/world)·∂L/∂θ. The sharded heads
    compensate by themselves by default (``ddp_backbone=True``, as insightface's
    PartialFC_V2) and raise ValueError when fed this function's output, which would
    compensate twice. Use it only with a head built with ``ddp_backbone=False`` whose
    embeddings need the compensation on some paths and not on others.

    embeddings: [B_r, D] float. Returns a tensor equal to it.
    """
    group = require_group(group)
    out = scale_grad(embeddings, dist.get_world_size(group))
    setattr(out, DDP_UNDONE_MARK, True)
    return out
