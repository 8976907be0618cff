"""One training process: :class:`Run` builds everything a run holds from its options, in named
steps (each one job, in the order their errors must come), and trains it (:class:`Loop`)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

import magloss
from magloss.backbones import build_backbone
from magloss.distributed.comm import comm_device

from . import checkpoints
from .checkpoints import _check_writable, _write_atomically, check_export
from .device import decide_device
from .errors import UsageError, os_reason
from .inputs import _Guarded, _inside, open_bins, open_data, select_bins
from .log import Log
from .loop import Loop
from .options import LOSSES, _check_args, build_parser, loss_kwargs
from .schedule import Schedule


class Run(Loop):
    """Everything one training process holds: built from parsed options (and ``explicit``,
    the option names given on the command line, for ``--resume``). ``train()`` runs it,
    ``close()`` releases the process group and the log.

    Raises:
        UsageError: a bad option, data folder, checkpoint or ``--output``, found before the first
        step (every rank raises it; nothing is left open).
    """

    def __init__(self, args: argparse.Namespace, explicit: Optional[set] = None) -> None:
        if explicit is None:              # the options that differ from the command line's defaults
            defaults = vars(build_parser().parse_args([args.data_dir]))
            explicit = {k for k, v in vars(args).items() if v != defaults.get(k)}
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = None
        self._own_group = False
        self.log = self._bar = self._interrupted = self._signal = None
        self.saved_step = None
        self.eval_failures = 0
        try:
            self._setup(args, explicit, local_rank)
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------------------------
    def _setup(self, args: argparse.Namespace, explicit: set, local_rank: int) -> None:
        """The steps of the set-up, in the order in which their errors are reported."""
        ck_dir, state = checkpoints.read_checkpoint(args.resume, args.output) if args.resume is not None \
            else (None, None)
        self.args = self._options(args, explicit, state)
        kw = loss_kwargs(self.args)
        self._choose_device(local_rank)
        bins = self._open_data()
        sharded = self.world > 1 or self.args.sample_rate < 1.0
        self._join_group(sharded)
        self._build_model(kw, sharded)
        self._build_optimizer()
        self._restore(ck_dir, state)
        self._check_outputs(bins)
        self._start_outputs(resumed=state is not None)

    def _options(self, args: argparse.Namespace, explicit: set, state: Optional[dict]) -> argparse.Namespace:
        """The options of the run: the checkpoint's, overridden by those given (resumed), checked,
        with the optimizer's defaults of --lr and --weight-decay filled in."""
        if state is not None:
            args = checkpoints.merge_options(args, explicit, state["args"])
        _check_args(args)
        if args.resume is None:
            checkpoints.check_new_output(args.output)
        if args.lr is None:
            args.lr = 0.1 if args.optimizer == "sgd" else 1e-3
        if args.weight_decay is None:
            args.weight_decay = 5e-4 if args.optimizer == "sgd" else 0.1
        return args

    def _choose_device(self, local_rank: int) -> None:
        """The device, AMP and scaler decisions (:func:`decide_device`) for what this machine has."""
        cuda = torch.cuda.is_available()
        self.plan = decide_device(self.args.device, self.args.amp, cuda, torch.cuda.device_count() if cuda else 0,
                                  cuda and torch.cuda.is_bf16_supported(), local_rank, self.world)
        self.device, self.amp, self.amp_dtype = self.plan.device, self.plan.amp, self.plan.amp_dtype
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)    # GPU-only: NCCL and the default CUDA stream of this rank

    def _open_data(self) -> List[str]:
        """The training set (``self.dataset``, ``self.n``, ``self.num_classes``, ``self.image_size``);
        returns the paths of the .bin sets to evaluate."""
        args = self.args
        dataset, self.num_classes, self.image_size, bins = open_data(args.data_dir, args.image_size)
        if not os.path.isfile(os.path.join(args.data_dir, "train.rec")) and _inside(args.output, args.data_dir):
            raise UsageError(f"--output: {args.output!r} lies inside the image folder DATA_DIR {args.data_dir!r}, "
                             f"where its folders would become identities (and the run could not be resumed): "
                             f"choose an --output outside DATA_DIR")
        self.dataset = _Guarded(dataset, self.image_size)
        self.n = len(self.dataset)
        if self.n < self.world * args.batch_size:
            raise UsageError(f"--batch-size: {args.batch_size} x {self.world} processes = "
                             f"{self.world * args.batch_size} images per step, but DATA_DIR holds {self.n}")
        return select_bins(bins, args.eval_sets)

    def _join_group(self, sharded: bool) -> None:
        """The process group: torchrun's, or a group of one for Partial FC in one process."""
        if sharded and LOSSES[self.args.loss] is magloss.SoftmaxLoss:
            raise UsageError("--loss softmax has no class-sharded version: it runs in one process without "
                             "--sample-rate; pick a margin loss for torchrun or Partial FC")
        if sharded:
            if not dist.is_initialized():
                backend = self.plan.backend
                if "MASTER_ADDR" in os.environ:   # torchrun; the long timeout covers rank 0's evaluation
                    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
                else:                     # one process with Partial FC: a group of one
                    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
                self._own_group = True
            self.group = dist.group.WORLD
        self.is_main = self.rank == 0

    def _build_model(self, kw: dict, sharded: bool) -> None:
        """The backbone (DDP under torchrun) and the loss head (class-sharded when ``sharded``)."""
        args = self.args
        torch.manual_seed(args.seed)
        self.backbone = build_backbone(args.network, args.embedding_size, self.image_size, args.dropout).to(self.device)
        try:
            proto = LOSSES[args.loss](args.embedding_size, self.num_classes, **kw,
                                      **({"device": "meta"} if sharded else {}))
            if sharded:
                self.head = magloss.distributed.shard(proto, sample_rate=args.sample_rate, seed=args.seed,
                                                      ddp_backbone=True, device=self.device)
            else:
                self.head = proto.to(self.device)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--loss {args.loss}: {exc}") from None
        self.model = self.backbone
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.backbone, device_ids=self.plan.ddp_device_ids, broadcast_buffers=False)

    def _build_optimizer(self) -> None:
        """The optimizer (backbone and class matrix in two groups), the schedule, the gradient scaler."""
        args = self.args
        bb_params = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": bb_params}, {"params": list(self.head.parameters())}]
        if args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
        self._head_index = len(bb_params)     # the class matrix's index in the optimizer's state_dict
        self.schedule = Schedule(args.schedule, args.lr, args.epochs, args.warmup_epochs, args.milestones, args.gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.plan.scaler)

    def _restore(self, ck_dir: Optional[str], state: Optional[dict]) -> None:
        """The position of the run: the checkpoint's (resumed) or the start, and the last step."""
        self.step, self.epoch, self.position = 0, 0, 0
        if state is not None:
            checkpoints.restore(self, ck_dir, state)
        self.total = self._total_steps()
        self.saved_step = self.step if state is not None else None     # the step of the newest checkpoint

    def _check_outputs(self, bins: List[str]) -> None:
        """Rank 0 opens the .bin sets, tries --output and writes config.json there; every rank learns of
        a failure."""
        self.bins, failure = [], None
        if self.is_main:               # only rank 0 evaluates and writes; the other ranks learn of a failure below
            try:
                self.bins = open_bins(bins)
                _check_writable(self.args.output)
                if self.args.export_onnx:
                    check_export()
                self._write_config()
            except UsageError as exc:
                failure = exc
        if self.group is not None:
            flag = torch.tensor(float(failure is not None), device=comm_device(self.group))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if flag.item() and failure is None:
                failure = UsageError("rank 0 found a .bin set or --output unusable (see its error)")
        if failure is not None:
            raise failure

    def _write_config(self) -> None:
        """``config.json`` in --output (rank 0, before the first step); UsageError naming it when it
        cannot be written."""
        args = self.args
        try:
            _write_atomically(os.path.join(args.output, "config.json"), lambda f: f.write(json.dumps(
                {**vars(args), "world_size": self.world, "num_classes": self.num_classes,
                 "input_size": list(self.image_size), "amp": self.amp, "images": self.n}, indent=1).encode()))
        except OSError as exc:
            raise UsageError(f"--output: cannot write config.json: {os_reason(exc)}") from None

    def _start_outputs(self, resumed: bool) -> None:
        """The log (a resumed run's cut back to its checkpoint)."""
        self.log = Log(self.args.output, self.is_main, self.args.tensorboard, self.step if resumed else None)

    def _total_steps(self) -> int:
        """The step the run ends at (--epochs, capped by --max-steps); UsageError when a new run
        would train no step. A resumed run with no step left is a finished run (killed, say,
        before it wrote model.pt): it trains nothing, writes model.pt and evaluates."""
        a = self.args
        per_step = self.world * a.batch_size
        steps_per_epoch = self.n // per_step
        full = int(a.epochs)              # a fractional --epochs ends inside the last epoch
        target = full * steps_per_epoch + int((a.epochs - full) * steps_per_epoch)
        total = self.step + max(0, target - self.epoch * steps_per_epoch - self.position // per_step)
        if a.max_steps is not None:
            total = min(total, a.max_steps)
        if total > self.step or self.step:
            return max(total, self.step)
        raise UsageError(f"--epochs: {a.epochs} epochs of {steps_per_epoch} steps ({self.n} images, {per_step} per "
                         f"step) is less than one step: the run would train nothing")

    # -- checkpoints -------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def save(self) -> str:
        """Write checkpoints/step-XXXXXXXX (collective); returns its folder
        (:func:`magloss.train.checkpoints.save`: never half-written where ``--resume`` looks,
        fsync'ed). A write or fsync that fails stops the run (:class:`Stopped`, exit status 1)
        with one line naming the file and the newest complete checkpoint."""
        try:
            return checkpoints.save(self)
        except OSError as exc:
            self._stop(f"cannot write the checkpoint of step {self.step}: {os_reason(exc)}", 1, mine=True,
                       save=False)

    def close(self) -> None:
        """Close the log and the process group this run started (the set-up's failure calls it too)."""
        if self.log is not None:
            self.log.close()
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False
