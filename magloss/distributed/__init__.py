"""Scaling past one GPU: class-sharded margin losses over ``torch.distributed`` and Partial FC.

Usage under torchrun (NCCL on GPUs, gloo on CPU; see docs/distributed.md)::

    torch.distributed.init_process_group("nccl")
    head = magloss.distributed.ShardedArcFaceLoss(512, 10_000_000, sample_rate=0.1).cuda()
    loss = head(ddp_backbone(images), labels)   # the head compensates DDP's gradient averaging

Checkpoints that reshard across world sizes: :mod:`magloss.checkpoint`.
"""

from .comm import gather_rows, gather_stats, scale_grad, sum_stats, undo_ddp_average
from .loss import (
    ShardedAdaFaceLoss,
    ShardedArcFaceLoss,
    ShardedCombinedMarginLoss,
    ShardedCosFaceLoss,
    ShardedCurricularFaceLoss,
    ShardedElasticArcFaceLoss,
    ShardedElasticCosFaceLoss,
    ShardedMagCosFaceLoss,
    ShardedMagFaceLoss,
    ShardedMarginLoss,
    ShardedNormFaceLoss,
    ShardedOneVsAllLoss,
    ShardedP2SGradLoss,
    ShardedSFaceLoss,
    ShardedSphereFace2Loss,
    ShardedSphereFaceLoss,
    ShardedSubCenterArcFaceLoss,
    ShardedUniFaceLoss,
    shard,
    shard_range,
)
from .partial_fc import sample_classes, sample_count

__all__ = [
    "ShardedAdaFaceLoss",
    "ShardedArcFaceLoss",
    "ShardedCombinedMarginLoss",
    "ShardedCosFaceLoss",
    "ShardedCurricularFaceLoss",
    "ShardedElasticArcFaceLoss",
    "ShardedElasticCosFaceLoss",
    "ShardedMagCosFaceLoss",
    "ShardedMagFaceLoss",
    "ShardedMarginLoss",
    "ShardedNormFaceLoss",
    "ShardedOneVsAllLoss",
    "ShardedP2SGradLoss",
    "ShardedSFaceLoss",
    "ShardedSphereFace2Loss",
    "ShardedSphereFaceLoss",
    "ShardedSubCenterArcFaceLoss",
    "ShardedUniFaceLoss",
    "gather_rows",
    "gather_stats",
    "sample_classes",
    "sample_count",
    "scale_grad",
    "shard",
    "shard_range",
    "sum_stats",
    "undo_ddp_average",
]
