"""Class-sharded margin losses: model parallelism over classes, with optional Partial FC.

Each rank of the process group owns a contiguous shard of the C classes
(:func:`shard_range`: the first C mod world ranks get one extra class) and holds only
those rows of the class matrix as its ``weight`` [C_r, D]. One step on rank r:

1. all-gather every rank's embeddings and labels (uneven batch sizes allowed):
   x_all [B, D], y_all [B] with B = Σ_q B_q, rank 0's rows first;
2. map labels to the shard: y − start_r where start_r ≤ y < end_r, otherwise "no label
   column here" (the op's ignore_index). ``valid = y_all != ignore_index`` is global, so
   an ignored row and a row whose class lives on another shard stay different states;
3. run the local engine ``magloss.ops.margin_ce`` (the chunked engine, or the fused kernels
   on CUDA when they are built) on (x_all, W_r): per-row lse_r, zy_r, reg, norms — the logits never leave it;
4. exchange per-row statistics only: lse = log Σ_r exp(lse_r) (all-gather of [B]),
   zy = Σ_r zy_r (all-reduce of [B]);
5. CE_i = lse_i − zy_i, then the single-process masking and reduction
   (:func:`magloss.functional.reduce_rows`), λ_g·g(ã) included.

The result is the same scalar on every rank and equals the single-process loss on the
concatenated batch over all C classes. Backward: the op's saved local lse_r and the
gradient exp(lse_r − lse) of the log-sum-exp give every rank the exact global softmax
on its columns, so ∂L/∂W_r is complete locally; ∂L/∂x_all is partial per rank and is
reduce-scattered back to the rows' owners. MagFace's g(ã) is identical on all ranks and
its gradient flows from rank 0 only; m(a) acts only in the label column, which lives on
one shard: both are counted once per sample. See docs/distributed.md.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as MF
from .. import losses, ops
from .. import onevsall as OVA
from ..adaptive import AdaFaceState, CurricularState, ElasticState, Extras, _KeptState, label_cosines
from ..checks import bad_labels, check_types, first_true, label_error
from ..margins import SPHERE, MarginSpec, check_float_table, class_row_margins, sphere_lambda
from ..rows import autocasting, compute_dtype
from ..validation import (REDUCTIONS, check_bool, check_ignore_index, check_int, check_int_type, check_non_negative,
                          check_reduction)
from .comm import (DDP_UNDONE_MARK, all_gather_ints, comm_device, gather_rows, gather_stats, require_group,
                   scale_grad, sum_stats)
from .partial_fc import check_sample_rate, sample_classes, sampling_generator

__all__ = [
    "shard_range",
    "ShardedMarginLoss",
    "ShardedNormFaceLoss",
    "ShardedCosFaceLoss",
    "ShardedArcFaceLoss",
    "ShardedCombinedMarginLoss",
    "ShardedSphereFaceLoss",
    "ShardedMagFaceLoss",
    "ShardedMagCosFaceLoss",
    "ShardedSubCenterArcFaceLoss",
    "ShardedAdaFaceLoss",
    "ShardedCurricularFaceLoss",
    "ShardedElasticArcFaceLoss",
    "ShardedElasticCosFaceLoss",
    "ShardedOneVsAllLoss",
    "ShardedSFaceLoss",
    "ShardedUniFaceLoss",
    "ShardedSphereFace2Loss",
    "ShardedP2SGradLoss",
    "shard",
]

#: The op's ignore_index for rows without a label column on this shard (local labels are ≥ 0).
_NO_LABEL = -1


def shard_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """Rows [start, end) of the class matrix owned by ``rank``.

    np.array_split layout: C = q·world + e; ranks 0..e−1 own q + 1 classes, the others q;
    shards are contiguous and in rank order. Raises ValueError if C < world_size.
    """
    if num_classes < world_size:
        raise ValueError(f"num_classes: expected at least one class per rank (world size {world_size}), "
                         f"got {num_classes}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    q, e = divmod(num_classes, world_size)
    start = rank * q + min(rank, e)
    return start, start + q + (1 if rank < e else 0)


class ShardedMarginLoss(_KeptState, nn.Module):
    """Class-sharded margin loss over a torch.distributed process group (see module docstring).

    Args:
        embedding_size: D. num_classes: C, the *global* class count (same on every rank).
        spec: the :class:`magloss.MarginSpec` of the loss family.
        lambda_g: weight of MagFace's regularizer (ignored by families without one).
        sphere_schedule: SphereFace's (base, gamma, power, lambda_min); λ is evaluated at
            the buffer ``iteration``, advanced once per training-mode forward (as
            :class:`magloss.SphereFaceLoss`).
        sample_rate: Partial FC rate in (0, 1]; 1 (default) is the full loss. In training
            mode each shard keeps its positives plus uniform negatives up to
            ceil(rate·C_r) classes (:mod:`magloss.distributed.partial_fc`), drawn from
            (seed, step, rank); in eval mode every class is used.
        seed: seeds both the weight initialisation and the Partial FC sampling.
        ddp_backbone: True (default) when the embeddings come from a backbone under
            DistributedDataParallel, which *averages* parameter gradients over ranks: the
            head then returns each rank world_size·∂L/∂x_r, so that DDP's average is exactly
            the gradient of the global loss (insightface's PartialFC_V2 does the same,
            always). False returns the exact ∂L/∂x_r, for backbones whose gradients are
            summed or not synchronized. See docs/distributed.md, "DDP and the loss scale".
        ignore_index, reduction: as the single-process losses.
        group: the process group (default: WORLD). It must be initialized.
        device, dtype: factory kwargs of ``weight``.

    With K = ``spec.subcenters`` > 1 (Sub-center ArcFace) a shard holds its classes' K·C_r
    rows (row j·K + k: sub-center k of local class j) and Partial FC samples whole classes.

    Per-class margins (``class_margins``, :meth:`set_class_margins`) and per-sample weights
    (``forward(..., sample_weight=...)``) work as in the single-process losses
    (:class:`magloss.MarginLoss`): every rank holds the whole [C] (or [C, 2]) table and looks up
    the gathered global labels, so each row gets its class's margin whichever shard owns the
    class (the table must be the same on every rank; it is not compared). ``sample_weight`` [B_r]
    is gathered with the rows; pass it on every rank or on none (a ValueError on every rank
    otherwise), and its values are checked with the labels (one error on every rank).

    Attributes: ``weight`` [K·C_r, D] (this rank's shard), ``shard_start``/``shard_end``
    (global rows [start, end)), ``step`` (buffer: Partial FC steps taken),
    ``last_sample`` (global class indices kept by the last sampled forward, sorted int64,
    or None), ``last_batch_sizes`` (rows per rank of the last forward).

    forward(embeddings [B_r, D], labels [B_r], return_parts=False) -> the global loss,
    identical on every rank: 0-d for 'mean'/'sum', [Σ_r B_r] in rank order for 'none',
    float32 (float64 for float64 inputs), or a :class:`magloss.MagFaceOutput`. Every rank
    must call forward (it is collective) and backpropagate the same scalar.
    Under ``torch.autocast`` the embeddings and the used rows of W are cast to the
    autocast dtype for the matrix products, as the single-process losses; the
    statistics exchanged are float32.
    """

    def __init__(self, embedding_size: int, num_classes: int, spec: MarginSpec, *, lambda_g: float = 0.0,
                 sphere_schedule: Optional[Tuple[float, float, float, float]] = None, sample_rate: float = 1.0,
                 seed: int = 0, ddp_backbone: bool = True, ignore_index: int = -1, reduction: str = "mean",
                 class_margins: Optional[Tensor] = None, group=None, device=None, dtype=None) -> None:
        super().__init__()
        self.group = require_group(group)
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise RuntimeError("group: this process is not a member of the process group it was given")
        self.embedding_size = check_int("embedding_size", embedding_size, 1)
        self.num_classes = check_int("num_classes", num_classes, 1)
        if not isinstance(spec, MarginSpec):
            raise TypeError(f"spec: expected a magloss.MarginSpec, got {type(spec).__name__}")
        self.spec = spec
        self.lambda_g = check_non_negative("lambda_g", lambda_g, "weight")
        self.sample_rate = check_sample_rate(sample_rate)
        self.seed = check_int_type("seed", seed)
        self.ddp_backbone = check_bool("ddp_backbone", ddp_backbone)
        self.ignore_index = check_ignore_index(ignore_index)   # the named heads warned via their prototype
        self.reduction = check_reduction(reduction)
        self.shard_start, self.shard_end = shard_range(num_classes, self.world_size, self.rank)
        self._check_consistent()
        self.weight = nn.Parameter(torch.empty(self.num_local * spec.subcenters, self.embedding_size, device=device,
                                               dtype=dtype))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.sphere_schedule = None
        if spec.kind == SPHERE:
            self.sphere_schedule = tuple(float(v) for v in (sphere_schedule or (1000.0, 0.12, 1.0, 5.0)))
            self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=device))
        self.last_sample: Optional[Tensor] = None
        self.last_batch_sizes: Optional[List[int]] = None
        self.register_buffer("class_margins", None)
        if class_margins is not None:
            self.set_class_margins(class_margins)
        self.reset_parameters()

    _float_state = ("class_margins",)
    _class_margin_column = losses.MarginLoss._class_margin_column
    _no_class_margins = losses.MarginLoss._no_class_margins
    set_class_margins = losses.MarginLoss.set_class_margins

    @property
    def num_local(self) -> int:
        """C_r = shard_end − shard_start, the classes this rank owns."""
        return self.shard_end - self.shard_start

    def _check_consistent(self) -> None:
        """One all-gather at construction: every rank must agree on the configuration."""
        s = self.spec
        fields = [("num_classes", self.num_classes), ("embedding_size", self.embedding_size),
                  ("sample_rate", self.sample_rate), ("seed", self.seed), ("ddp_backbone", int(self.ddp_backbone)),
                  ("ignore_index", self.ignore_index),
                  ("reduction", REDUCTIONS.index(self.reduction)), ("lambda_g", self.lambda_g),
                  ("spec", hash(s.op_args(self.ignore_index)) % (1 << 50))]
        dev = comm_device(self.group)
        mine = torch.tensor([float(v) for _, v in fields], dtype=torch.float64, device=dev)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        table = torch.stack(out).cpu()
        for j, (name, _) in enumerate(fields):
            col = table[:, j]
            if not bool((col == col[0]).all()):
                vals = [int(v) if float(v).is_integer() else float(v) for v in col.tolist()]
                what = "the margin hyperparameters" if name == "spec" else name
                raise ValueError(f"{name}: expected the same {what} on every rank, got {vals} (in rank order)")

    def reset_parameters(self) -> None:
        """Rows ~ N(0, I) scaled to unit norm, from a generator seeded by (seed, shard_start):
        distinct across shards, reproducible, and independent of the global RNG."""
        if self.weight.device.type == "meta":
            return
        g = sampling_generator(self.seed, -1, self.shard_start)
        w = torch.randn(self.weight.shape, generator=g, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            self.weight.copy_(w)

    def current_lambda(self, dtype: torch.dtype = torch.float32) -> Optional[Tensor]:
        """SphereFace's λ as forward uses it now (0-d tensor of ``dtype``; None for other
        families): λ(iteration + 1) in training mode, λ(iteration) in eval mode, as
        :meth:`magloss.SphereFaceLoss.current_lambda`."""
        if self.sphere_schedule is None:
            return None
        it = self.iteration + 1 if self.training else self.iteration
        return sphere_lambda(it, *self.sphere_schedule, dtype=dtype)

    def _check_local(self, embeddings: Tensor, labels: Tensor) -> None:
        ops.functorch_unsupported(type(self).__name__, embeddings, self.weight)
        check_types(embeddings=embeddings, labels=labels)
        if self.ddp_backbone and getattr(embeddings, DDP_UNDONE_MARK, False):
            raise ValueError(
                "embeddings: they went through undo_ddp_average, but this head already multiplies their "
                "gradient by the world size for a DDP backbone (ddp_backbone=True, the default): the backbone "
                "would get world_size times the right gradient. Drop undo_ddp_average, or build the head with "
                "ddp_backbone=False")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings: expected shape [B, {self.embedding_size}], got {tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels: expected shape [{embeddings.shape[0]}] (one per embedding row), "
                             f"got {tuple(labels.shape)}")
        if embeddings.device != self.weight.device or labels.device != self.weight.device:
            raise ValueError(f"embeddings, labels: expected the device of weight ({self.weight.device}), "
                             f"got {embeddings.device} and {labels.device}")
        if embeddings.dtype != self.weight.dtype and not autocasting(embeddings):
            raise TypeError(f"embeddings, weight: expected the same dtype, got {embeddings.dtype} and "
                            f"{self.weight.dtype} (cast one, or run under torch.autocast)")

    def _gather_header(self, labels: Tensor, device: torch.device,
                       sample_weight: Optional[Tensor] = None) -> List[List[int]]:
        """Per rank: [B_r, first local row with a label outside [0, C) (B_r if none), its label,
        1 if the rank passed ``sample_weight`` else 0, its first row that is negative or not
        finite (B_r if none)].

        The checks are computed on the device and ride on the batch-size all-gather
        that uneven batches need anyway: no host synchronization of their own, and every rank
        receives the same table, so every rank raises the same error (:meth:`_check_labels`).
        """
        labels = labels.to(torch.int64)
        first = first_true(bad_labels(labels, self.num_classes, self.ignore_index))
        value = torch.cat([labels, labels.new_zeros(1)]).index_select(0, first.view(1))[0]
        size = torch.full_like(first, labels.shape[0])
        if sample_weight is None:
            weighted, bad_weight = torch.zeros_like(first), size
        else:
            w = sample_weight.detach()
            weighted = torch.ones_like(first)
            bad_weight = first_true(~torch.isfinite(w) | (w < 0)).to(first.device)
        header = torch.stack([size, first, value, weighted, bad_weight])
        return all_gather_ints(header.to(device), self.group)

    def _check_labels(self, table: List[List[int]]) -> None:
        row = 0
        for size, first, value, *_ in table:
            if first < size:
                raise ValueError(label_error(value, row + first, self.num_classes, self.ignore_index, "global row"))
            row += size
        weighted = [r for r, (_, _, _, has, _) in enumerate(table) if has]
        if weighted and len(weighted) < len(table):
            raise ValueError(f"sample_weight: expected on every rank or on none, got it on ranks {weighted} of "
                             f"{len(table)}")
        row = 0
        for size, _, _, has, bad in table:
            if has and bad < size:
                raise ValueError(f"sample_weight: expected finite values >= 0, got a bad value at global row "
                                 f"{row + bad}")
            row += size

    def _shard_weight(self, local: Tensor, on_shard: Tensor) -> Tuple[Tensor, Tensor]:
        """The rows of W used this step and the labels remapped to them (Partial FC)."""
        if not (self.training and self.sample_rate < 1.0):
            self.last_sample = None
            return self.weight, local
        g = sampling_generator(self.seed, int(self.step), self.rank)
        index = sample_classes(self.num_local, local[on_shard], self.sample_rate, g).to(local.device)
        remap = torch.full((self.num_local,), _NO_LABEL, dtype=torch.int64, device=local.device)
        remap[index] = torch.arange(index.numel(), device=local.device)
        local = torch.where(on_shard, remap[local.clamp_min(0)], local)
        self.last_sample = index + self.shard_start
        k = self.spec.subcenters
        rows = index if k == 1 else (index.unsqueeze(1) * k + torch.arange(k, device=index.device)).flatten()
        return self.weight.index_select(0, rows), local

    def _extras(self, embeddings: Tensor, valid: Tensor, label_cosine) -> Extras:
        """The op's optional inputs from the loss's state (none for the plain families; the
        AdaFace, CurricularFace and ElasticFace twins override it with their state mixin)."""
        return None, None, None, None

    def _global_batch(self, embeddings: Tensor, labels: Tensor, sample_weight: Optional[Tensor] = None):
        """The checks, then the global batch: (x_all, valid, local labels, this shard's (sampled)
        weight rows, the global labels, the gathered sample weights or None). Every rank gathers
        every row; a row's label is local where its class is on this shard, else _NO_LABEL."""
        self._check_local(embeddings, labels)
        if sample_weight is not None:
            check_float_table("sample_weight", sample_weight, (embeddings.shape[0],), device=embeddings.device,
                              values=False)
        table = self._gather_header(labels, comm_device(self.group, embeddings.device), sample_weight)
        self._check_labels(table)
        sizes = [row[0] for row in table]
        self.last_batch_sizes = sizes
        if self.ddp_backbone and self.world_size > 1:   # DDP divides by the world size: compensate
            embeddings = scale_grad(embeddings, float(self.world_size))
        x_all = gather_rows(embeddings, sizes, self.group)
        labels_all = gather_rows(labels.to(torch.int64), sizes, self.group)
        valid = labels_all != self.ignore_index
        on_shard = valid & (labels_all >= self.shard_start) & (labels_all < self.shard_end)
        local = torch.where(on_shard, labels_all - self.shard_start, torch.full_like(labels_all, _NO_LABEL))
        weight, local = self._shard_weight(local, on_shard)
        w_all = None
        if sample_weight is not None:
            w_all = gather_rows(sample_weight.detach().to(compute_dtype(embeddings.dtype)), sizes, self.group)
        return x_all, valid, local, weight, labels_all, w_all

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        group = self.group
        x_all, valid, local, weight, labels_all, w_all = self._global_batch(embeddings, labels, sample_weight)

        # The state's inputs come from the global batch, identical on every rank; the label cosine
        # of a row is computed by the rank that owns its class and shared by a sum.
        rm, nt, t, commit = self._extras(x_all, valid, lambda: sum_stats(
            label_cosines(x_all, weight, local, _NO_LABEL, self.spec.subcenters), group))
        if self.class_margins is not None:  # looked up by the global labels, before any shard remapping
            rm = class_row_margins(self.class_margins, labels_all, self.ignore_index, self._class_margin_column,
                                   compute_dtype(x_all.dtype))
        x_all, weight, up = MF.autocast_inputs(x_all, weight, self.spec)   # after the gather: ∂x summed in fp32
        lam = self.current_lambda(x_all.dtype)
        lse, zy, reg, norms, *side = ops.margin_ce_rows(x_all, weight, local, lam, rm, nt, t,
                                                        *self.spec.op_args(_NO_LABEL), side=return_parts)
        if up is not None:
            norms = norms * up.to(norms.dtype)
        if self.last_sample is not None:   # the Partial FC step advances only once the op has run
            self.step.add_(1)
        # torch.logsumexp keeps a NaN: a NaN on one shard makes the row's global lse NaN on every
        # rank (no masked or max-shifted trick here that would drop it; tests/test_nan.py).
        lse = torch.logsumexp(gather_stats(lse, group), dim=0)
        zy = sum_stats(zy, group)
        if self.rank != 0:          # g(ã) and ‖x‖ are replicated: let one rank carry their gradient
            reg, norms = reg.detach(), norms.detach()
        if side:
            side = MF.side_parts(labels_all, valid, *self._combine_side(*side))
        out = MF.reduce_rows(lse - zy, reg, norms, valid, self.spec, self.reduction, self.lambda_g, return_parts,
                             w_all, side=side or None)
        if self.training and self.sphere_schedule is not None:
            self.iteration.add_(1)
        if commit is not None:
            commit()
        return out

    @torch.no_grad()
    def _combine_side(self, label_cosine: Tensor, nearest_cosine: Tensor,
                      nearest_class: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The global side outputs from this shard's (the op's, over the columns this step used):
        one all-gather of a [3, B] float64 block (class indices are exact in float64). The label
        cosine is a sum over the shards (only the label's shard adds a non-zero one); the nearest
        negative is the largest of the shards' (the first maximum: the lowest rank, whose classes
        have the lowest indices, so ties still go to the lowest class), its local column mapped
        to the global class (through the Partial FC sample when one was drawn; −1 stays −1)."""
        found = nearest_class >= 0
        cls = nearest_class.clamp_min(0)
        cls = self.last_sample.to(cls.device)[cls] if self.last_sample is not None else cls + self.shard_start
        cls = torch.where(found, cls, nearest_class)
        block = torch.stack([label_cosine.double(), nearest_cosine.double(), cls.double()])
        dev = comm_device(self.group, block.device)
        table = gather_stats(block.to(dev), self.group).to(block.device)        # [world, 3, B]
        winner = table[:, 1].argmax(dim=0, keepdim=True)
        best = table[:, 1].gather(0, winner).squeeze(0).to(nearest_cosine.dtype)
        best_class = table[:, 2].gather(0, winner).squeeze(0).long()
        return table[:, 0].sum(0).to(label_cosine.dtype), best, best_class

    @torch.no_grad()
    def accuracy(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Training accuracy over the global batch, the same 0-d tensor on every rank.

        Collective (every rank calls it). Each rank finds, for every row of the global batch,
        the arg-max of the plain cosine logits over its whole shard
        (:func:`magloss.functional.cosine_argmax`, chunked: no B×C_r matrix, no sampling);
        the per-rank winners ([B] values and global class indices) are all-gathered and
        the best wins, ties going to the lowest class index as in the single-process
        :meth:`magloss.MarginLoss.accuracy`, which this equals on the concatenated batch.
        Rows labelled ``ignore_index`` are not counted; 0 when no row is. A label outside
        [0, C) is the ValueError of :meth:`forward`; a non-finite embedding on a counted row
        makes the accuracy NaN (:func:`magloss.functional.hit_rate`).
        """
        self._check_local(embeddings, labels)
        group = self.group
        table = self._gather_header(labels, comm_device(group, embeddings.device))
        self._check_labels(table)
        sizes = [row[0] for row in table]
        x_all = gather_rows(embeddings.detach(), sizes, group)
        labels_all = gather_rows(labels.to(torch.int64), sizes, group)
        best, arg = MF.cosine_argmax(x_all, self.weight)
        dev = comm_device(group, embeddings.device)
        vals = gather_stats(best.to(dev), group)                    # [world, B]
        idx = gather_stats((arg // self.spec.subcenters + self.shard_start).to(dev), group)
        winner = vals.argmax(dim=0, keepdim=True)                   # first max: the lowest rank, lowest class
        pred = idx.gather(0, winner).squeeze(0).to(labels_all.device)
        best_all = vals.gather(0, winner).squeeze(0).to(labels_all.device)
        return MF.hit_rate(pred, best_all, labels_all, labels_all != self.ignore_index)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"shard=[{self.shard_start}, {self.shard_end}) of world {self.world_size}, kind={s.kind}, "
                f"scale={s.scale}, m1={s.m1}, m2={s.m2}, m3={s.m3}, lambda_g={self.lambda_g}, "
                f"sample_rate={self.sample_rate}, ddp_backbone={self.ddp_backbone}, ignore_index={self.ignore_index}, reduction={self.reduction!r}")


# -- named losses: the single-process constructor validates, the shard keeps its spec ------------
_SHARDED = {}


def _init_from(self, proto: losses.MarginLoss, *, sample_rate, seed, ddp_backbone, group, device, dtype) -> None:
    """Initialise the sharded loss ``self`` from a single-process prototype (validated, possibly
    on the meta device): its sizes, spec, λ_g, SphereFace schedule, ignore_index and
    reduction, then its running state (:func:`_init_state_from`)."""
    ShardedMarginLoss.__init__(
        self, proto.embedding_size, proto.num_classes, proto.spec, lambda_g=getattr(proto, "lambda_g", 0.0),
        sphere_schedule=getattr(proto, "schedule", None), sample_rate=sample_rate, seed=seed,
        ddp_backbone=ddp_backbone, ignore_index=proto.ignore_index, reduction=proto.reduction, group=group,
        device=device, dtype=dtype)
    self._class_margin_column, self._no_class_margins = proto._class_margin_column, proto._no_class_margins
    _init_state_from(self, proto, seed, device, dtype)


def _init_state_from(self, proto: losses.MarginLoss, seed: int, device, dtype) -> None:
    """The state of a stateful loss (AdaFace, CurricularFace, ElasticFace) on the sharded twin,
    with the prototype's hyperparameters. ElasticFace's margin generator is seeded by the
    sharded ``seed`` (the same on every rank, checked at construction), so that every rank
    draws the same margins for the global batch."""
    if not hasattr(proto, "_state_kwargs"):
        return
    kwargs = proto._state_kwargs()
    if "seed" in kwargs:
        kwargs["seed"] = seed
    self._init_state(**kwargs, device=device, dtype=dtype)


class _Named(ShardedMarginLoss):
    """Base of the named sharded losses: ``__init__`` takes exactly the arguments of the
    single-process class ``_single`` plus ``sample_rate``, ``seed``, ``ddp_backbone`` and ``group``."""

    _single = losses.MarginLoss

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _SHARDED[cls._single] = cls

    def __init__(self, embedding_size: int, num_classes: int, *args, sample_rate: float = 1.0, seed: int = 0,
                 ddp_backbone: bool = True, group=None, device=None, dtype=None, **kwargs) -> None:
        require_group(group)
        # Build the single-process module on the meta device: it validates every argument
        # (and warns, e.g. MagFace's λ_g bound) without allocating C×D.
        if issubclass(self._single, ElasticState):
            kwargs["seed"] = seed           # (the prototype would otherwise draw one from the global RNG)
        proto = self._single(embedding_size, num_classes, *args, device="meta", **kwargs)
        _init_from(self, proto, sample_rate=sample_rate, seed=seed, ddp_backbone=ddp_backbone, group=group,
                   device=device, dtype=dtype)
        self.set_class_margins(kwargs.get("class_margins"))     # validated by the prototype


class ShardedNormFaceLoss(_Named):
    """Sharded :class:`magloss.NormFaceLoss` (z = s·cos θ). Arguments: those of NormFaceLoss,
    plus ``sample_rate``, ``seed``, ``group`` (see :class:`ShardedMarginLoss`)."""

    _single = losses.NormFaceLoss


class ShardedCosFaceLoss(_Named):
    """Sharded :class:`magloss.CosFaceLoss` (ψ = cos θ − m). Arguments: those of CosFaceLoss,
    plus ``sample_rate``, ``seed``, ``group``."""

    _single = losses.CosFaceLoss


class ShardedArcFaceLoss(_Named):
    """Sharded :class:`magloss.ArcFaceLoss` (ψ = cos(θ + m)). Arguments: those of ArcFaceLoss,
    plus ``sample_rate``, ``seed``, ``group``."""

    _single = losses.ArcFaceLoss


class ShardedCombinedMarginLoss(_Named):
    """Sharded :class:`magloss.CombinedMarginLoss` (ψ = cos(m1·θ + m2) − m3). Arguments: those
    of CombinedMarginLoss, plus ``sample_rate``, ``seed``, ``group``."""

    _single = losses.CombinedMarginLoss


class ShardedSphereFaceLoss(_Named):
    """Sharded :class:`magloss.SphereFaceLoss` (A-Softmax, λ annealed by ``iteration``).
    Arguments: those of SphereFaceLoss, plus ``sample_rate``, ``seed``, ``group``."""

    _single = losses.SphereFaceLoss


class ShardedMagFaceLoss(_Named):
    """Sharded :class:`magloss.MagFaceLoss`: ψ = cos(θ + m(a)), loss = reduce(CE) + λ_g·reduce(g(ã)),
    with m(a) and g(ã) counted once per sample. Arguments: those of MagFaceLoss, plus
    ``sample_rate``, ``seed``, ``group``; ``forward(..., return_parts=True)`` as MagFaceLoss."""

    _single = losses.MagFaceLoss


class ShardedMagCosFaceLoss(_Named):
    """Sharded :class:`magloss.MagCosFaceLoss` (ψ = cos θ − m(a)). Arguments: those of
    MagCosFaceLoss, plus ``sample_rate``, ``seed``, ``group``."""

    _single = losses.MagCosFaceLoss


class ShardedSubCenterArcFaceLoss(_Named):
    """Sharded :class:`magloss.SubCenterArcFaceLoss`: each rank holds the K sub-centers of its
    classes ([K·C_r, D]); Partial FC samples whole classes. Arguments: those of
    SubCenterArcFaceLoss, plus ``sample_rate``, ``seed``, ``group``."""

    _single = losses.SubCenterArcFaceLoss


class ShardedAdaFaceLoss(AdaFaceState, _Named):
    """Sharded :class:`magloss.AdaFaceLoss`: the norm statistics (buffers ``batch_mean``,
    ``batch_std``) are those of the global batch, identical on every rank. Arguments: those
    of AdaFaceLoss, plus ``sample_rate``, ``seed``, ``group``."""

    _single = losses.AdaFaceLoss


class ShardedCurricularFaceLoss(CurricularState, _Named):
    """Sharded :class:`magloss.CurricularFaceLoss`: each row's label cosine is computed by the
    rank that owns its class and shared (one all-reduce of [B]), so τ_i and the buffer ``t``
    are those of the global batch on every rank. Arguments: those of CurricularFaceLoss, plus
    ``sample_rate``, ``seed``, ``group``."""

    _single = losses.CurricularFaceLoss


class ShardedElasticArcFaceLoss(ElasticState, _Named):
    """Sharded :class:`magloss.ElasticArcFaceLoss`: the margin generator is seeded by ``seed``
    (the same on every rank), so every rank draws the same margins for the global batch.
    Arguments: those of ElasticArcFaceLoss (``seed`` is the sharded one), plus
    ``sample_rate``, ``group``."""

    _single = losses.ElasticArcFaceLoss


class ShardedElasticCosFaceLoss(ElasticState, _Named):
    """Sharded :class:`magloss.ElasticCosFaceLoss`, as :class:`ShardedElasticArcFaceLoss`."""

    _single = losses.ElasticCosFaceLoss


def shard(module: losses.MarginLoss, *, sample_rate: float = 1.0, seed: int = 0, ddp_backbone: bool = True,
          group=None, device=None) -> ShardedMarginLoss:
    """Convert a single-process margin loss into its sharded counterpart on this rank.

    module: any :class:`magloss.MarginLoss` (NormFace … MagCosFace) or one-vs-all loss
    (:class:`magloss.losses.OneVsAllLoss`: SFace … P2SGrad, its ``bias`` copied) with the *global*
    num_classes. If its ``weight`` is materialized, the shard's rows
    ``weight[shard_start:shard_end]`` are copied (so every rank must hold the same
    matrix); build it with ``device="meta"`` to skip allocating C×D and get the sharded
    initialisation instead. Returns the matching ``Sharded*Loss`` (a
    :class:`ShardedMarginLoss` for a bare MarginLoss) on ``device`` (default: the
    module's device, CPU for meta). :class:`magloss.SoftmaxLoss` is not supported.
    """
    one_vs_all = isinstance(module, losses.OneVsAllLoss)
    if not one_vs_all and not isinstance(module, losses.MarginLoss):
        raise TypeError(f"module: expected a magloss margin or one-vs-all loss, got "
                        f"{type(module).__name__}; SoftmaxLoss has no sharded counterpart")
    src = module.weight
    if device is None:
        device = torch.device("cpu") if src.device.type == "meta" else src.device
    cls = _SHARDED.get(type(module), ShardedOneVsAllLoss if one_vs_all else ShardedMarginLoss)
    out = cls.__new__(cls)
    (_init_one_vs_all if one_vs_all else _init_from)(out, module, sample_rate=sample_rate, seed=seed,
                                                     ddp_backbone=ddp_backbone, group=group, device=device,
                                                     dtype=src.dtype)
    if one_vs_all:
        if src.device.type != "meta":
            with torch.no_grad():
                out.weight.copy_(src[out.shard_start:out.shard_end])
                if module.bias is not None:
                    out.bias.copy_(module.bias)
        return out
    if src.device.type != "meta":
        k = module.spec.subcenters
        with torch.no_grad():
            out.weight.copy_(src[out.shard_start * k:out.shard_end * k])
            for name, buf in module.named_buffers():    # AdaFace's statistics, CurricularFace's t
                if name in ("batch_mean", "batch_std", "t"):
                    getattr(out, name).copy_(buf)
            out.set_class_margins(module.class_margins)
    if isinstance(module, ElasticState):                # ElasticFace: continue the module's draws
        out.rng_state.copy_(module.rng_state)
    if out.sphere_schedule is not None and src.device.type != "meta":   # a meta prototype has no counter value
        out.iteration.copy_(module.iteration)
    return out


# -- one-vs-all losses: a sum over the classes, so the shards' row sums add up -------------------
class _ReplicatedParameter(torch.autograd.Function):
    """Identity on a parameter every rank holds the same copy of (the one-vs-all bias); its
    backward all-reduces the gradient, so each copy gets the whole ∂L/∂b (every shard's columns)."""

    @staticmethod
    def forward(ctx, p: Tensor, group) -> Tensor:
        ctx.group = group
        return p.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedOneVsAllLoss(ShardedMarginLoss):
    """Class-sharded one-vs-all loss (:class:`magloss.OneVsAllLoss`): rank r holds its classes'
    rows of W, the engine gives the row sums over its columns, and the global row loss is their
    sum over ranks (one all-reduce of [B]); ``reduction='mean'`` divides by the global count of
    non-ignored rows. ∂W_r is complete locally; ∂x is reduce-scattered back as for the margin
    heads; the learnable ``bias`` (UniFace, SphereFace2) is replicated and its gradient summed
    over ranks, so every copy takes the same step.

    Partial FC (``sample_rate`` < 1, training mode): each rank's sum runs over its positives and
    the sampled negatives only, so the loss is the one-vs-all sum over the kept classes: the
    negatives' part is a subsample, not an estimate of the full sum (no rescaling), as Partial
    FC's softmax keeps only the sampled logits. P2SGrad's 1/C stays the global C.

    Arguments: those of the single-process class, plus ``sample_rate``, ``seed``,
    ``ddp_backbone``, ``group`` (see :class:`ShardedMarginLoss`).
    """

    _single = losses.OneVsAllLoss
    _no_class_margins = "a one-vs-all loss has no softmax margin to set per class"

    def __init__(self, embedding_size: int, num_classes: int, *args, sample_rate: float = 1.0, seed: int = 0,
                 ddp_backbone: bool = True, group=None, device=None, dtype=None, **kwargs) -> None:
        require_group(group)
        proto = self._single(embedding_size, num_classes, *args, device="meta", **kwargs)
        _init_one_vs_all(self, proto, sample_rate=sample_rate, seed=seed, ddp_backbone=ddp_backbone, group=group,
                         device=device, dtype=dtype)

    def _check_consistent(self) -> None:
        super()._check_consistent()
        dev = comm_device(self.group)
        mine = torch.tensor([float(self.kind), *self.params], dtype=torch.float64, device=dev)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        if not all(torch.equal(o, mine) for o in out):
            raise ValueError(f"params: expected the same loss hyperparameters on every rank, got "
                             f"{[o.tolist() for o in out]} (kind first, in rank order)")

    def reset_parameters(self) -> None:
        """``weight`` as :meth:`ShardedMarginLoss.reset_parameters`; ``bias`` = its initial value."""
        super().reset_parameters()
        if getattr(self, "bias", None) is not None and self.bias.device.type != "meta":
            with torch.no_grad():
                self.bias.fill_(self.bias_init)

    def forward(self, embeddings: Tensor, labels: Tensor, return_parts: bool = False, *,
                sample_weight: Optional[Tensor] = None):
        group = self.group
        x_all, valid, local, weight, labels_all, w_all = self._global_batch(embeddings, labels, sample_weight)
        x_all, weight, up = MF.autocast_inputs(x_all, weight)
        bias = None if self.bias is None else _ReplicatedParameter.apply(self.bias, group)
        rows, *side = OVA.one_vs_all(x_all, weight, local, bias, self.kind, list(self.params), _NO_LABEL,
                                     return_parts)
        side = MF.side_parts(labels_all, valid, *self._combine_side(*side)) if return_parts else None
        if self.last_sample is not None:
            self.step.add_(1)
        rows = sum_stats(rows, group)
        norms = x_all.detach().to(rows.dtype).norm(dim=1)
        if up is not None:
            norms = norms * up.to(norms.dtype)
        return MF.reduce_rows(rows, rows, norms, valid, None, self.reduction, 0.0, return_parts, w_all, side=side)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"shard=[{self.shard_start}, {self.shard_end}) of world {self.world_size}, "
                f"{OVA.KINDS[self.kind][0]} params={self.params}, sample_rate={self.sample_rate}, "
                f"ddp_backbone={self.ddp_backbone}, ignore_index={self.ignore_index}, reduction={self.reduction!r}")


def _init_one_vs_all(self, proto, *, sample_rate, seed, ddp_backbone, group, device, dtype) -> None:
    """Initialise a sharded one-vs-all loss from a (validated, possibly meta) single-process module."""
    self.kind, self.params = proto._kind, proto.params
    self.bias_init = proto.bias_init
    # the margin machinery (gathers, label checks, Partial FC) needs a spec: a plain one, unused by the op
    ShardedMarginLoss.__init__(
        self, proto.embedding_size, proto.num_classes, MarginSpec.combined(1.0, 1.0, 0.0, 0.0),
        sample_rate=sample_rate, seed=seed, ddp_backbone=ddp_backbone, ignore_index=proto.ignore_index,
        reduction=proto.reduction, group=group, device=device, dtype=dtype)
    self.bias = None if proto.bias is None else nn.Parameter(torch.empty(1, device=device, dtype=dtype))
    self.reset_parameters()


class ShardedSFaceLoss(ShardedOneVsAllLoss):
    """Sharded :class:`magloss.SFaceLoss`. Arguments: those of SFaceLoss, plus ``sample_rate``,
    ``seed``, ``ddp_backbone``, ``group``."""

    _single = losses.SFaceLoss


class ShardedUniFaceLoss(ShardedOneVsAllLoss):
    """Sharded :class:`magloss.UniFaceLoss` (bias replicated, its gradient summed over ranks)."""

    _single = losses.UniFaceLoss


class ShardedSphereFace2Loss(ShardedOneVsAllLoss):
    """Sharded :class:`magloss.SphereFace2Loss` (bias replicated, its gradient summed over ranks)."""

    _single = losses.SphereFace2Loss


class ShardedP2SGradLoss(ShardedOneVsAllLoss):
    """Sharded :class:`magloss.P2SGradLoss` (the 1/C of the mean is the global C)."""

    _single = losses.P2SGradLoss


for _cls in (ShardedSFaceLoss, ShardedUniFaceLoss, ShardedSphereFace2Loss, ShardedP2SGradLoss):
    _SHARDED[_cls._single] = _cls
