"""``python -m magloss.train DATA_DIR``: train a face recognizer on an insightface folder.

DATA_DIR is insightface's layout (``train.rec`` + ``train.idx`` + ``property``, and any
``*.bin`` verification sets beside them) or a folder of images with one sub-folder per
identity. The command trains an iresnet backbone (:mod:`magloss.backbones`) with any
magloss loss, in one process or under ``torchrun`` (DDP backbone, class-sharded head,
Partial FC), with AMP, SGD/AdamW and a warm-up + cosine/step schedule, evaluates every
``.bin`` set periodically, logs to CSV/JSON lines (TensorBoard when installed) and writes
checkpoints that resume exactly and reload at any world size. The walkthrough is
docs/train.md; every option is in ``--help``.

Decisions (also in docs/train.md):

* The schedule is a function of the *epochs done* (a fraction, counted in samples), not
  of the step: a run resumed at another world size keeps its learning-rate curve.
* The data order of an epoch is one permutation drawn from (seed, epoch); every step
  consumes the next ``world × batch_size`` samples of it (rank r takes the r-th block).
  A checkpoint stores the epoch and the samples consumed, so a resumed run reads exactly
  the samples the uninterrupted one would.
* The global RNG is re-seeded at every step from (seed, step, rank) (horizontal flips,
  dropout): no RNG state to save, and resuming at the same world size is bit-exact.
* One process with ``--sample-rate 1`` uses the plain loss module; under ``torchrun`` (or
  with Partial FC) the head is :func:`magloss.distributed.shard` of it.
* Everything checkable is checked before the first step (``magloss.train: error: ...``, exit
  2). During a run, nothing finished is lost: checkpoints are written into a temporary folder
  and renamed, the last checkpoint and ``model.pt`` come before the final evaluation (whose
  failure is a warning), and a damaged record or Ctrl-C stops between two steps after saving
  the finished ones (exit 2 or 130, one line saying how to resume).
* The device-specific choices are one pure function, :func:`decide_device`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import glob
import inspect
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import magloss
from magloss import checkpoint as ckpt
from magloss import registry
from magloss.backbones import ARCHITECTURES, build_backbone
from magloss.distributed.comm import comm_device

__all__ = ["LOSSES", "DevicePlan", "Run", "build_parser", "decide_device", "load_model", "main", "parse"]

#: --loss name -> loss class, from the one registry (magloss.registry): each class's constructor
#: arguments (after embedding_size and num_classes) become the loss options of --help.
LOSSES: Dict[str, type] = registry.LOSSES

CHECKPOINT_FORMAT = "magloss.train/1"

#: Options a resumed run must keep (they define the model or the trajectory); an explicit
#: different value on the command line is an error. The loss options are added below.
_FIXED = ("network", "embedding_size", "dropout", "image_size", "loss", "optimizer", "lr", "momentum",
          "weight_decay", "schedule", "warmup_epochs", "epochs", "milestones", "gamma", "seed")

_TRAIN_FIELDS = ("step", "epoch", "lr", "loss", "ce", "reg", "reg_weighted", "magnitude_mean", "magnitude_std",
                 "magnitude_min", "magnitude_max", "accuracy", "grad_scale", "images_per_s", "time")
_EVAL_FIELDS = ("step", "epoch", "set", "pairs", "accuracy_mean", "accuracy_std", "flip", "time")


#: Folds of the verification protocol (insightface's 10-fold): a .bin needs at least this many pairs.
EVAL_FOLDS = 10


class UsageError(Exception):
    """A bad command line or data folder: reported as ``magloss.train: error: ...`` (exit 2)."""


class Stopped(Exception):
    """Training stopped before its end with its finished steps saved: a data error found during
    training (``code`` 2) or Ctrl-C (``code`` 130). The message is the one line printed, by rank 0
    and by a rank that read the damaged record (``show``)."""

    def __init__(self, message: str, code: int, show: bool = True) -> None:
        super().__init__(message)
        self.code, self.show = code, show


# ------------------------------------------------------------------------------------- options
def _loss_params(cls: type) -> List[inspect.Parameter]:
    """The hyperparameters of a loss class: its constructor's arguments after
    (embedding_size, num_classes) that can be passed by position or name and whose default
    is a number, a bool, a string or None (a number left to the loss, as SphereFace's scale)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]   # self, D, C
    return [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD
            and (p.default is None or isinstance(p.default, (bool, int, float, str)))]


def _loss_options() -> Dict[str, dict]:
    """{constructor argument: {"type", "losses": [(loss name, default)]}} over LOSSES."""
    out: Dict[str, dict] = {}
    for lname, cls in LOSSES.items():
        for p in _loss_params(cls):
            d = p.default
            if d is None:   # a number left to the loss: its annotation says which kind
                kind = int if "int" in str(p.annotation) and "float" not in str(p.annotation) else float
            else:
                kind = bool if isinstance(d, bool) else int if isinstance(d, int) else str if isinstance(d, str) else float
            entry = out.setdefault(p.name, {"type": kind, "losses": []})
            if {entry["type"], kind} == {int, float}:
                entry["type"] = float                        # int for one loss, float for another
            entry["losses"].append((lname, d))
    return out


LOSS_OPTIONS = _loss_options()


def _image_size(text: str) -> Tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected H or HxW, e.g. 112 or 112x96, got {text!r}")
    return tuple(parts)


def _milestones(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or values != sorted(values) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected increasing positive epochs separated by commas, e.g. "
                                         f"10,18,22, got {text!r}")
    return values


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ("unset": the help says what applies)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line. ``suppress_defaults=True`` leaves unset options out of the result
    (to tell which options a resumed run was given explicitly)."""
    kw = {"argument_default": argparse.SUPPRESS} if suppress_defaults else {}
    p = argparse.ArgumentParser(
        prog="python -m magloss.train",
        description="Train a face-recognition backbone with a magloss loss on an insightface data folder "
                    "(train.rec/train.idx/property and *.bin verification sets) or an image folder "
                    "(one sub-folder per identity). Multi-GPU: torchrun --nproc_per_node N -m magloss.train ... "
                    "Walkthrough: docs/train.md.",
        formatter_class=_Help, **kw)

    def add(group, *names, **a):
        if suppress_defaults:
            a.pop("default", None)
        group.add_argument(*names, **a)

    g = p.add_argument_group("data")
    add(g, "data_dir", metavar="DATA_DIR", help="insightface folder (train.rec, train.idx, property, *.bin) or "
        "image folder (one sub-folder per identity)")
    add(g, "--image-size", type=_image_size, default=None, metavar="HxW",
        help="input size (multiples of 16); default: from `property`, or the first image of an image folder; "
             "images of another size are resized")
    add(g, "--batch-size", type=int, default=128, help="images per process and step (global batch = this x world size)")
    add(g, "--workers", type=int, default=4, help="DataLoader worker processes per training process")
    add(g, "--eval-sets", default=None, metavar="NAMES",
        help="comma-separated .bin names to evaluate (e.g. lfw,cfp_fp); default: every *.bin in DATA_DIR")

    g = p.add_argument_group("model")
    add(g, "--network", choices=list(ARCHITECTURES), default="r50", help="iresnet backbone")
    add(g, "--embedding-size", type=int, default=512, help="embedding width D")
    add(g, "--dropout", type=float, default=0.0, help="dropout before the backbone's FC layer")

    loss_group = g = p.add_argument_group("loss", "--loss picks the loss; the options below are its hyperparameters "
                                                  "(unset: the loss's own default, shown per loss; a name that a "
                                                  "training option also has gets the prefix --loss-, as "
                                                  "--loss-momentum)")
    add(g, "--loss", choices=list(LOSSES), default="arcface", help="the loss (margins in radians for arcface, "
        "combined m2, magface)")
    add(g, "--sample-rate", type=float, default=1.0, help="Partial FC: share of the classes per step, in (0, 1]")

    g = p.add_argument_group("optimization")
    add(g, "--optimizer", choices=("sgd", "adamw"), default="sgd", help="optimizer of backbone and class matrix")
    add(g, "--lr", type=float, default=None, help="peak learning rate (default: 0.1 for sgd, 0.001 for adamw)")
    add(g, "--momentum", type=float, default=0.9, help="SGD momentum")
    add(g, "--weight-decay", type=float, default=None, help="weight decay (default: 5e-4 for sgd, 0.1 for adamw)")
    add(g, "--epochs", type=float, default=20, help="length of the schedule in epochs")
    add(g, "--schedule", choices=("cosine", "step"), default="cosine", help="decay after the warm-up")
    add(g, "--warmup-epochs", type=float, default=1.0, help="linear warm-up from 0 to --lr over this many epochs")
    add(g, "--milestones", type=_milestones, default=[10.0, 18.0, 22.0], metavar="E1,E2,...",
        help="step schedule: epochs at which the lr is multiplied by --gamma")
    add(g, "--gamma", type=float, default=0.1, help="step schedule factor")
    add(g, "--clip-grad-norm", type=float, default=5.0, help="clip the backbone's gradient norm (0: off)")
    add(g, "--amp", choices=("auto", "off", "fp16", "bf16"), default="auto",
        help="mixed precision: auto = bf16 on GPUs that have it, else fp16; off on the CPU (bf16 autocast "
             "works there)")
    add(g, "--seed", type=int, default=0, help="seed of the initialization, data order, flips and Partial FC")
    add(g, "--max-steps", type=int, default=None,
        help="stop after this many steps in all (the schedule still spans --epochs): smoke runs, tests")
    add(g, "--device", default=None, help="cpu or cuda (default: cuda when available; under torchrun cuda:LOCAL_RANK)")

    g = p.add_argument_group("output")
    add(g, "--output", "-o", default="runs/magloss", help="folder for logs, checkpoints and the final model")
    add(g, "--resume", nargs="?", const="auto", default=None, metavar="PATH",
        help="continue a run: no PATH = the latest checkpoint in --output; or a run folder or a checkpoint "
             "folder. Options not given again are the checkpoint's")
    add(g, "--log-every", type=int, default=50, help="steps between log rows (loss parts, magnitudes, accuracy)")
    add(g, "--eval-every", type=int, default=2000, help="steps between evaluations on the .bin sets (0: only at the end)")
    add(g, "--eval-batch-size", type=int, default=256, help="batch size of the evaluation")
    add(g, "--flip", action=argparse.BooleanOptionalAction, default=True,
        help="evaluation: fuse each image's embedding with its mirror image's (sum)")
    add(g, "--save-every", type=int, default=0, help="steps between checkpoints (0: at the end of every epoch)")
    add(g, "--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    add(g, "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar (when installed)")
    add(g, "--tensorboard", action=argparse.BooleanOptionalAction, default=True,
        help="also log to TensorBoard (when the tensorboard package is installed)")
    for name, spec in LOSS_OPTIONS.items():     # last, so that a clash with a training option is known
        used = ", ".join(f"{ln} ({d})" for ln, d in spec["losses"])
        flag = "--" + name.replace("_", "-")
        if flag in p._option_string_actions:
            flag = "--loss-" + name.replace("_", "-")
        if spec["type"] is bool:
            add(loss_group, flag, dest=f"loss_{name}", action=argparse.BooleanOptionalAction, default=None,
                help=f"loss option of: {used}")
        else:
            add(loss_group, flag, dest=f"loss_{name}", type=spec["type"], default=None, metavar="V",
                help=f"loss option of: {used}")
    return p


def _check_args(a: argparse.Namespace) -> None:
    """Value checks argparse cannot do, in the option's words (every option, before anything runs)."""
    positive = {"embedding_size": a.embedding_size, "log_every": a.log_every,
                "eval_batch_size": a.eval_batch_size, "keep_checkpoints": a.keep_checkpoints, "max_steps": a.max_steps}
    for k, v in positive.items():
        if v is not None and v < 1:
            raise UsageError(f"--{k.replace('_', '-')}: expected a positive integer, got {v}")
    if a.batch_size < 2:
        raise UsageError(f"--batch-size: expected at least 2 (BatchNorm needs two images per process and step), "
                         f"got {a.batch_size}")
    for k in ("workers", "eval_every", "save_every"):
        if getattr(a, k) < 0:
            raise UsageError(f"--{k.replace('_', '-')}: expected an integer >= 0, got {getattr(a, k)}")
    for k in ("lr", "weight_decay", "momentum", "dropout", "epochs", "warmup_epochs", "gamma", "clip_grad_norm",
              "sample_rate"):
        v = getattr(a, k)
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{k.replace('_', '-')}: expected a finite number, got {v}")
    if not 0.0 <= a.momentum < 1.0:
        raise UsageError(f"--momentum: expected a number in [0, 1), got {a.momentum}")
    if not 0.0 <= a.dropout < 1.0:
        raise UsageError(f"--dropout: expected a probability in [0, 1), got {a.dropout}")
    if not 0.0 < a.gamma <= 1.0:
        raise UsageError(f"--gamma: expected a decay factor in (0, 1] (the lr is multiplied by it at each "
                         f"milestone), got {a.gamma}")
    if not 0.0 < a.sample_rate <= 1.0:
        raise UsageError(f"--sample-rate: expected a share of the classes in (0, 1], got {a.sample_rate}")
    if not a.epochs > 0 or not 0 <= a.warmup_epochs < a.epochs:
        raise UsageError(f"--epochs/--warmup-epochs: expected epochs > 0 and 0 <= warm-up < epochs, "
                         f"got {a.epochs} and {a.warmup_epochs}")
    for k in ("lr", "weight_decay"):
        v = getattr(a, k)
        if v is not None and not v >= 0:
            raise UsageError(f"--{k.replace('_', '-')}: expected a number >= 0, got {v}")
    if a.lr == 0:
        raise UsageError("--lr: expected a positive learning rate, got 0")
    if a.clip_grad_norm < 0:
        raise UsageError(f"--clip-grad-norm: expected >= 0 (0: off), got {a.clip_grad_norm}")
    if a.image_size is not None and (a.image_size[0] % 16 or a.image_size[1] % 16):
        raise UsageError(f"--image-size: expected multiples of 16 (the backbone halves the size 4 times), "
                         f"got {a.image_size[0]}x{a.image_size[1]}")


def loss_kwargs(a: argparse.Namespace) -> Dict[str, object]:
    """The hyperparameters given for ``a.loss``; an option of another loss is an error."""
    own = {p.name: p.default for p in _loss_params(LOSSES[a.loss])}
    kw = {}
    for name in LOSS_OPTIONS:
        v = getattr(a, f"loss_{name}", None)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name not in own:
            mine = ", ".join("--" + n.replace("_", "-") for n in own) or "none"
            raise UsageError(f"{flag} is not an option of --loss {a.loss} (its options: {mine})")
        if isinstance(own[name], int) and not isinstance(own[name], bool):
            if float(v) != int(v):
                raise UsageError(f"{flag}: --loss {a.loss} expects an integer, got {v}")
            v = int(v)
        kw[name] = v
    return kw


# ------------------------------------------------------------------------------------- device
@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """The device-specific choices of a training process (:func:`decide_device`).

    Attributes:
        device: ``cpu`` or ``cuda:N`` (always with its index on CUDA).
        backend: process-group backend, ``"nccl"`` on CUDA, ``"gloo"`` on the CPU.
        amp: ``"off"``, ``"fp16"`` or ``"bf16"`` (``--amp auto`` resolved).
        amp_dtype: the autocast dtype (``torch.float16``/``torch.bfloat16``) or None (no autocast).
        scaler: whether the gradient scaler is enabled (fp16 only: bf16 has fp32's exponent range).
        pin_memory: the DataLoader's pin_memory (only worth it for copies to a GPU).
        ddp_device_ids: DistributedDataParallel's ``device_ids`` (``[N]`` on ``cuda:N`` under
            torchrun, None on the CPU or in one process).
    """

    device: torch.device
    backend: str
    amp: str
    amp_dtype: Optional[torch.dtype]
    scaler: bool
    pin_memory: bool
    ddp_device_ids: Optional[List[int]]


def decide_device(device_arg: Optional[str], amp: str, cuda_available: bool, device_count: int,
                  bf16_supported: bool, local_rank: int, world: int) -> DevicePlan:
    """Every choice of the training command that depends on the device, as a pure function of
    what the machine offers (so that the CUDA branches are tested on a CPU-only machine).

    Args:
        device_arg: ``--device`` (None: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``;
            ``cuda`` without an index: ``cuda:LOCAL_RANK``).
        amp: ``--amp``: ``auto`` (bf16 on a GPU that supports it, else fp16; off on the CPU), ``off``,
            ``fp16`` (CUDA only), ``bf16``.
        cuda_available, device_count, bf16_supported: ``torch.cuda.is_available()``,
            ``torch.cuda.device_count()``, ``torch.cuda.is_bf16_supported()`` (False without CUDA).
        local_rank, world: ``LOCAL_RANK`` and ``WORLD_SIZE`` (0 and 1 in one process).

    Returns:
        a :class:`DevicePlan`.

    Raises:
        UsageError: ``--device`` not ``cpu``/``cuda[:N]``, CUDA asked for but absent, an index
        past the devices, ``--amp fp16`` off CUDA, ``--amp bf16`` on a GPU without bfloat16.
    """
    if device_arg is None:
        device_arg = "cuda" if cuda_available else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device_arg!r}")
    on_gpu = device.type == "cuda"
    if on_gpu:
        if not cuda_available:
            raise UsageError(f"--device {device_arg}: no CUDA device is available (use --device cpu)")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= device_count:
            raise UsageError(f"--device: cuda:{device.index} does not exist (this process sees "
                             f"{device_count} CUDA device{'s' if device_count != 1 else ''})")
    elif device.index not in (None, 0):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {device_arg!r}")
    else:
        device = torch.device("cpu")
    if amp == "auto":
        amp = ("bf16" if bf16_supported else "fp16") if on_gpu else "off"
    if amp == "fp16" and not on_gpu:
        raise UsageError("--amp fp16: float16 autocast needs a CUDA device; on the CPU use --amp bf16 or off")
    if amp == "bf16" and on_gpu and not bf16_supported:
        raise UsageError(f"--amp bf16: {device} has no bfloat16 support; use --amp fp16 (or auto)")
    return DevicePlan(device=device, backend="nccl" if on_gpu else "gloo", amp=amp,
                      amp_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp), scaler=amp == "fp16",
                      pin_memory=on_gpu, ddp_device_ids=[device.index] if on_gpu and world > 1 else None)


# ------------------------------------------------------------------------------------- schedule
class Schedule:
    """Learning rate as a function of the epochs done ``t`` (a fraction).

    Linear warm-up ``lr·t/w`` for ``t < w``; then cosine ``lr·(1 + cos(π(t − w)/(E − w)))/2``
    or step ``lr·gamma^(number of milestones ≤ t)``. The rate of a step is taken at the
    epochs done *after* it (so the first step's rate is not 0).
    """

    def __init__(self, kind: str, lr: float, epochs: float, warmup: float, milestones: Sequence[float], gamma: float):
        self.kind, self.base, self.epochs, self.warmup = kind, float(lr), float(epochs), float(warmup)
        self.milestones, self.gamma = [float(m) for m in milestones], float(gamma)

    def __call__(self, t: float) -> float:
        if t < self.warmup:
            return self.base * t / self.warmup
        if self.kind == "cosine":
            u = min(1.0, (t - self.warmup) / (self.epochs - self.warmup))
            return self.base * 0.5 * (1.0 + math.cos(math.pi * u))
        return self.base * self.gamma ** sum(1 for m in self.milestones if m <= t)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.base, "epochs": self.epochs, "warmup": self.warmup,
                "milestones": self.milestones, "gamma": self.gamma}


# ------------------------------------------------------------------------------------- data
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


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Float images ``[B, C, h, w]`` → ``[B, C, H, W]`` (bilinear, antialiased); ``x`` itself
    when it has the size already."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


class Resize:
    """The datasets' transform: uint8 ``[3, h, w]`` → uint8 ``[3, H, W]`` by :func:`resize`
    (rounded) when the size differs."""

    def __init__(self, size: Tuple[int, int]) -> None:
        self.size = tuple(size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if tuple(img.shape[-2:]) == self.size:
            return img
        return resize(img[None].float(), self.size)[0].round().clamp(0, 255).to(torch.uint8)


def open_data(data_dir: str, image_size: Optional[Tuple[int, int]]):
    """(dataset, num_classes, (H, W), [.bin paths]) of DATA_DIR; UsageError in the caller's words."""
    from magloss import data

    if not os.path.isdir(data_dir):
        raise UsageError(f"DATA_DIR: {data_dir!r} is not a folder")
    rec = os.path.join(data_dir, "train.rec")
    try:
        if os.path.isfile(rec):
            prop = os.path.join(data_dir, "property")
            if not os.path.isfile(prop):
                raise UsageError(f"DATA_DIR: {data_dir!r} has train.rec but no `property` file: write one line "
                                 f"'num_classes,height,width' (e.g. 85742,112,112) into {prop}")
            ds = data.RecordIODataset(data_dir)
            size = image_size or ds.image_size
        else:
            subdirs = [e for e in os.scandir(data_dir) if e.is_dir()]
            if not subdirs:
                raise UsageError(f"DATA_DIR: {data_dir!r} holds neither train.rec (an insightface folder) nor "
                                 f"sub-folders (an image folder, one sub-folder per identity)")
            ds = data.ImageFolderDataset(data_dir)
            size = image_size or tuple(ds[0][0].shape[-2:])
        if len(ds):                   # the first and the last sample decode, their labels are in range
            ds[0], ds[len(ds) - 1]
    except (FileNotFoundError, ValueError, ImportError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"DATA_DIR: {exc}") from None
    if size[0] % 16 or size[1] % 16:
        raise UsageError(f"DATA_DIR: the images are {size[0]}x{size[1]}; the backbone needs multiples of 16: "
                         f"pass --image-size (e.g. 112) to resize them")
    if len(ds) == 0:
        raise UsageError(f"DATA_DIR: {data_dir!r} holds no training image")
    ds.transform = Resize(size)
    bins = sorted(glob.glob(os.path.join(data_dir, "*.bin")))
    return ds, int(ds.num_classes), tuple(size), bins


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Guarded(torch.utils.data.Dataset):
    """The training dataset, with a reader error turned into data: ``(image, label, error)``,
    ``error`` "" or the reader's message (naming the file and the record), the image then zeros
    of the input size. A damaged record stops the run in the main process, between steps,
    whatever the number of workers (a worker's exception would arrive as a traceback)."""

    def __init__(self, dataset, size: Tuple[int, int]) -> None:
        self.dataset, self.size = dataset, tuple(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image, label = self.dataset[i]
            return image, label, ""
        except (ValueError, OSError) as exc:
            return torch.zeros((3, *self.size), dtype=torch.uint8), torch.tensor(-1), str(exc)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process (which stops cleanly between steps)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------------------- logging
class Log:
    """train.csv, eval.csv, log.jsonl (and TensorBoard) under the output folder; rank 0 only."""

    def __init__(self, out: str, enabled: bool, tensorboard: bool, keep_until: Optional[int]) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.paths = {"train": os.path.join(out, "train.csv"), "eval": os.path.join(out, "eval.csv"),
                      "jsonl": os.path.join(out, "log.jsonl")}
        if keep_until is not None:        # resumed: drop rows after the checkpoint, as if never written
            self._truncate(keep_until)
        else:
            for p in self.paths.values():
                if os.path.exists(p):
                    os.remove(p)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=keep_until)
            except ImportError:
                self.tb = None

    def _truncate(self, step: int) -> None:
        for kind in ("train", "eval"):
            p = self.paths[kind]
            if os.path.exists(p):
                with open(p, newline="") as f:
                    rows = list(csv.DictReader(f))
                self._rewrite_csv(p, [r for r in rows if int(r["step"]) <= step])
        p = self.paths["jsonl"]
        if os.path.exists(p):
            with open(p) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
            with open(p, "w") as f:
                f.writelines(lines)

    def _rewrite_csv(self, path: str, rows: List[dict]) -> None:
        fields = _TRAIN_FIELDS if path == self.paths["train"] else _EVAL_FIELDS
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, kind: str, row: dict) -> None:
        if not self.enabled:
            return
        path = self.paths[kind]
        fields = _TRAIN_FIELDS if kind == "train" else _EVAL_FIELDS
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in fields})
        with open(self.paths["jsonl"], "a") as f:
            f.write(json.dumps({"kind": kind, **row}) + "\n")
        if self.tb is not None:
            if kind == "train":
                for k, v in row.items():
                    if k not in ("step", "time") and isinstance(v, float):
                        self.tb.add_scalar(f"train/{k}", v, row["step"])
            else:
                self.tb.add_scalar(f"eval/{row['set']}/accuracy", row["accuracy_mean"], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------- the run
def _find_checkpoint(resume: str, output: str) -> str:
    """The checkpoint folder ``--resume`` designates."""
    path = output if resume == "auto" else resume
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        found = os.path.join(path, "checkpoints", name)
        old = os.path.join(path, "checkpoints", ".old-" + name)   # killed while replacing a checkpoint of that step
        return old if not os.path.isfile(os.path.join(found, "state.pt")) and \
            os.path.isfile(os.path.join(old, "state.pt")) else found
    where = f"--output {output!r}" if resume == "auto" else f"--resume {resume!r}"
    raise UsageError(f"{where}: no checkpoint there (expected a checkpoint folder with state.pt, or a run folder "
                     f"with checkpoints/latest)")


def _check_writable(folder: str) -> None:
    """Create ``folder`` (--output) and write a file into it; UsageError naming --output."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--output: cannot write into {folder!r}: {exc.strerror or exc}") from None


def _write_atomically(path: str, write) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then renamed onto it: a
    reader (or a resumed run) sees the old file or the whole new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _overflow_everywhere(head: nn.Module, group) -> None:
    """fp16 under a sharded head: the class matrix's gradient is local to each rank, so an
    overflow on one shard must make every rank skip the step (GradScaler decides per rank).
    Called on the *scaled* gradients before ``unscale_``: a rank that saw no Inf/NaN but
    learns that another did poisons its own gradient so that its scaler skips too."""
    g = head.weight.grad
    bad = torch.zeros((), device=head.weight.device) if g is None else (~torch.isfinite(g).all()).float()
    flag = bad.clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() > 0 and bad.item() == 0 and g is not None:
        g.fill_(float("inf"))


class Run:
    """Everything one training process holds: built from parsed options (and ``explicit``,
    the option names given on the command line, for ``--resume``). ``train()`` runs it,
    ``close()`` releases the process group and the log."""

    def __init__(self, args: argparse.Namespace, explicit: Optional[set] = None) -> None:
        if explicit is None:              # the options that differ from the command line's defaults
            defaults = vars(build_parser().parse_args([args.data_dir]))
            explicit = {k for k, v in vars(args).items() if v != defaults.get(k)}
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = None
        self._own_group = False
        self.log = self._bar = self._interrupted = None
        self.saved_step = None
        self.eval_failures = 0
        try:
            self._setup(args, explicit, local_rank)
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------------------------
    def _setup(self, args, explicit, local_rank) -> None:
        state = None
        ck_dir = None
        if args.resume is not None:
            ck_dir = _find_checkpoint(args.resume, args.output)
            try:
                state = torch.load(os.path.join(ck_dir, "state.pt"), map_location="cpu", weights_only=True)
            except Exception as exc:          # a damaged file: torch raises RuntimeError, pickle's errors...
                raise UsageError(f"--resume: cannot read {os.path.join(ck_dir, 'state.pt')!r}: {exc}") from None
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise UsageError(f"--resume: {ck_dir!r} is not a magloss.train checkpoint")
            args = self._merge(args, explicit, state["args"])
        _check_args(args)
        if args.resume is None and os.path.isfile(os.path.join(args.output, "checkpoints", "latest")):
            raise UsageError(f"--output: {args.output!r} already holds a run's checkpoints: pass --resume to "
                             f"continue it, or choose another --output")
        if args.lr is None:
            args.lr = 0.1 if args.optimizer == "sgd" else 1e-3
        if args.weight_decay is None:
            args.weight_decay = 5e-4 if args.optimizer == "sgd" else 0.1
        self.args = args
        kw = loss_kwargs(args)

        cuda = torch.cuda.is_available()
        self.plan = decide_device(args.device, args.amp, cuda, torch.cuda.device_count() if cuda else 0,
                                  cuda and torch.cuda.is_bf16_supported(), local_rank, self.world)
        self.device, self.amp, self.amp_dtype = self.plan.device, self.plan.amp, self.plan.amp_dtype
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)    # GPU-only: NCCL and the default CUDA stream of this rank

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
        if args.eval_sets is not None:
            wanted = [s.strip() for s in args.eval_sets.split(",") if s.strip()]
            have = {os.path.splitext(os.path.basename(b))[0]: b for b in bins}
            missing = [w for w in wanted if w not in have]
            if missing:
                raise UsageError(f"--eval-sets: {', '.join(missing)} not in DATA_DIR (it has: "
                                 f"{', '.join(have) or 'no .bin file'})")
            bins = [have[w] for w in wanted]
        sharded = self.world > 1 or args.sample_rate < 1.0
        if sharded and LOSSES[args.loss] is magloss.SoftmaxLoss:
            raise UsageError("--loss softmax has no class-sharded version: it runs in one process without "
                             "--sample-rate; pick a margin loss for torchrun or Partial FC")

        if self.world > 1 or sharded:
            if not dist.is_initialized():
                backend = self.plan.backend
                if "MASTER_ADDR" in os.environ:   # torchrun; the long timeout covers rank 0's evaluation
                    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
                else:                     # one process with Partial FC: a group of one
                    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
                self._own_group = True
            self.group = dist.group.WORLD
        self.is_main = self.rank == 0

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

        bb_params = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": bb_params}, {"params": list(self.head.parameters())}]
        if args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
        self._head_index = len(bb_params)     # the class matrix's index in the optimizer's state_dict
        self.schedule = Schedule(args.schedule, args.lr, args.epochs, args.warmup_epochs, args.milestones, args.gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.plan.scaler)

        self.step, self.epoch, self.position = 0, 0, 0
        if state is not None:
            self._load(ck_dir, state)
        self.total = self._total_steps()
        self.saved_step = self.step if state is not None else None     # the step of the newest checkpoint
        self.bins, failure = [], None
        if self.is_main:               # only rank 0 evaluates and writes; the other ranks learn of a failure below
            try:
                self.bins = self._open_bins(bins)
                _check_writable(args.output)
            except UsageError as exc:
                failure = exc
        if self.group is not None:
            flag = torch.tensor(float(failure is not None), device=comm_device(self.group))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if flag.item() and failure is None:
                failure = UsageError("rank 0 found a .bin set or --output unusable (see its error)")
        if failure is not None:
            raise failure
        self.log = Log(args.output, self.is_main, args.tensorboard, self.step if state is not None else None)
        if self.is_main:
            _write_atomically(os.path.join(args.output, "config.json"), lambda f: f.write(json.dumps(
                {**vars(args), "world_size": self.world, "num_classes": self.num_classes,
                 "input_size": list(self.image_size), "amp": self.amp, "images": self.n}, indent=1).encode()))

    @staticmethod
    def _open_bins(paths: List[str]) -> list:
        """The .bin sets, each with enough pairs for the folds; UsageError naming the file."""
        try:
            from magloss.data import VerificationBin
            sets = [VerificationBin(b) for b in paths]
        except (ValueError, ImportError) as exc:
            raise UsageError(f"DATA_DIR: {exc}") from None
        for b in sets:
            if len(b) < EVAL_FOLDS:
                others = [o.name for o in sets if len(o) >= EVAL_FOLDS]
                raise UsageError(f"DATA_DIR: {b.path}: {len(b)} pairs, the {EVAL_FOLDS}-fold verification needs at "
                                 f"least {EVAL_FOLDS}: repair it, or leave it out with --eval-sets "
                                 f"{','.join(others) if others else chr(39) * 2} (the sets to evaluate)")
        return sets

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

    @staticmethod
    def _merge(args, explicit, saved: dict) -> argparse.Namespace:
        """The checkpoint's options, overridden by those given explicitly; a given value that
        changes the model or the trajectory is an error."""
        fixed = set(_FIXED) | {f"loss_{n}" for n in LOSS_OPTIONS}
        merged = dict(saved)
        clashes = []
        # a loss option saved as None ran with the loss's own default: that value is the one to compare
        own = {f"loss_{p.name}": p.default for p in _loss_params(LOSSES[saved["loss"]])} \
            if saved.get("loss") in LOSSES else {}
        for k, v in vars(args).items():
            if k in explicit and k not in ("data_dir", "resume"):
                used = own.get(k) if saved.get(k) is None else saved.get(k)
                if k in fixed and _norm(v) != _norm(used):
                    had = ("the loss's default" + ("" if used is None else f" {used}")) if saved.get(k) is None \
                        else saved.get(k)
                    clashes.append(f"--{k.removeprefix('loss_').replace('_', '-')} {v} (the checkpoint has {had})")
                merged[k] = v
        if clashes:
            raise UsageError("--resume: these options differ from the checkpoint's and would change the run: "
                             + "; ".join(clashes) + ". Drop them (the checkpoint's values are used), or start a "
                             "new run with another --output")
        merged["data_dir"], merged["resume"] = args.data_dir, args.resume
        for k, v in vars(args).items():
            merged.setdefault(k, v)
        if merged.get("image_size") is not None:
            merged["image_size"] = tuple(merged["image_size"])
        return argparse.Namespace(**merged)

    def _load(self, ck_dir: str, state: dict) -> None:
        try:
            self.backbone.load_state_dict(state["backbone"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UsageError(f"--resume: the checkpoint {ck_dir!r} does not fit this model (input size "
                             f"{self.image_size[0]}x{self.image_size[1]} from DATA_DIR; another data set?): "
                             f"{str(exc).splitlines()[0]}") from None
        try:
            ckpt.load_class_matrix(os.path.join(ck_dir, "head"), self.head, self.optimizer)
        except ValueError as exc:
            raise UsageError(f"--resume: {exc} (DATA_DIR {self.args.data_dir!r} has {self.num_classes} classes)") \
                from None
        own = self.head.state_dict()     # buffers, and extra state such as ElasticFace's generator
        own.update({k: v for k, v in state["head_state"].items() if k in own})
        self.head.load_state_dict(own)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        if self.position >= self.n:
            raise UsageError(f"--resume: the checkpoint is at sample {self.position} of an epoch, DATA_DIR holds "
                             f"{self.n} images (another data set?)")

    # -- checkpoints -------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def save(self) -> str:
        """Write checkpoints/step-XXXXXXXX (collective); returns its folder.

        Never half-written where ``--resume`` looks: every file goes into the temporary folder
        ``checkpoints/.tmp-step-XXXXXXXX`` (the class-matrix shards by their ranks, then
        ``state.pt`` by rank 0), which is renamed to ``step-XXXXXXXX`` when complete; only then
        is ``checkpoints/latest`` replaced (atomically) by its name. A process killed at any
        point leaves the previous checkpoint and ``latest`` as they were; the next save
        removes the leftovers."""
        root = os.path.join(self.args.output, "checkpoints")
        name = f"step-{self.step:08d}"
        path = os.path.join(root, name)
        work = os.path.join(root, ".tmp-" + name)
        if self.is_main:
            os.makedirs(root, exist_ok=True)
            try:
                with open(os.path.join(root, "latest")) as f:
                    pointed = ".old-" + f.read().strip()    # what --resume would take until `latest` moves on
            except OSError:
                pointed = None
            for d in os.listdir(root):        # leftovers of a process killed while saving
                if d.startswith((".tmp-", ".old-")) and d != pointed:
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            os.makedirs(work)
        self._barrier()
        ckpt.save_class_matrix(os.path.join(work, "head"), self.head, self.optimizer)
        if self.is_main:
            opt = self.optimizer.state_dict()
            opt["state"] = {k: v for k, v in opt["state"].items() if k != self._head_index}
            state = {
                "format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch, "position": self.position,
                "world_size": self.world, "args": {k: _norm(v) for k, v in vars(self.args).items()},
                "backbone": self.backbone.state_dict(), "optimizer": opt,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "schedule": self.schedule.state_dict(),
                "head_state": {k: v for k, v in self.head.state_dict().items() if k != "weight"},
            }
            torch.save(state, os.path.join(work, "state.pt"))
            if os.path.exists(path):          # the same step saved before (a resume from an older checkpoint)
                os.rename(path, os.path.join(root, ".old-" + name))
            os.rename(work, path)
            _write_atomically(os.path.join(root, "latest"), lambda f: f.write(f"{name}\n".encode()))
            done = sorted(d for d in os.listdir(root) if d.startswith("step-")
                          and os.path.isfile(os.path.join(root, d, "state.pt")))
            for old in done[:-self.args.keep_checkpoints]:
                if old != name:
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
            for d in os.listdir(root):        # `latest` names a complete folder now: no fallback is needed
                if d.startswith(".old-"):
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        self._barrier()
        self.saved_step = self.step
        return path

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> List[dict]:
        """Every .bin set on rank 0 (the others wait); rows also go to the log. A set whose
        evaluation fails is reported (one line, naming it) and skipped: training goes on."""
        rows = []
        if self.is_main and self.bins:
            was = self.backbone.training
            self.backbone.eval()

            def embed(x):
                return self.backbone(resize(x, self.image_size))

            for b in self.bins:
                try:
                    r = b.evaluate(embed, flip=self.args.flip, batch_size=self.args.eval_batch_size,
                                   device=self.device, n_folds=EVAL_FOLDS)
                except Exception as exc:          # an evaluation never costs the run
                    self.eval_failures += 1
                    self._say(f"magloss.train: warning: step {self.step}: evaluation of {b.path} failed, "
                              f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                              err=True)
                    continue
                row = {"step": self.step, "epoch": self._epochs_done(), "set": b.name, "pairs": len(b),
                       "accuracy_mean": r["accuracy_mean"], "accuracy_std": r["accuracy_std"],
                       "flip": self.args.flip, "time": time.time()}
                self.log.write("eval", row)
                self._say(f"step {self.step}: {b.name} {100 * r['accuracy_mean']:.2f} ± "
                          f"{100 * r['accuracy_std']:.2f} % ({len(b)} pairs{', flip' if self.args.flip else ''})")
                rows.append(row)
            self.backbone.train(was)
        self._barrier()
        return rows

    # -- training ----------------------------------------------------------------------------
    def _epochs_done(self) -> float:
        return self.epoch + self.position / self.n

    def _next(self, per_step: int) -> Tuple[int, int]:
        """(epoch, position) after one more step: the epoch ends when another global batch
        would not fit (its remaining samples are dropped)."""
        position = self.position + per_step
        return (self.epoch + 1, 0) if position + per_step > self.n else (self.epoch, position)

    def _say(self, text: str, err: bool = False) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr if err else None)
        else:
            print(text, flush=True, file=sys.stderr if err else sys.stdout)

    def _loader(self):
        sampler = GlobalBatchSampler(self.n, self.args.batch_size, self.world, self.rank, self.args.seed,
                                     self.epoch, self.position)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.args.workers,
                                           pin_memory=self.plan.pin_memory, worker_init_fn=_ignore_sigint)

    def _on_sigint(self, signum, frame) -> None:
        """Ctrl-C: the run stops after the step in progress (checkpoint, exit 130). Another
        Ctrl-C a second or more later stops at once; one sooner is the same keypress delivered
        twice (the terminal and torchrun both send it)."""
        now = time.monotonic()
        if self._interrupted is not None and now - self._interrupted >= 1.0:
            raise KeyboardInterrupt
        if self._interrupted is None:
            self._interrupted = now

    def _agree(self, data_error: Optional[str]) -> Tuple[bool, bool]:
        """(some rank's batch has a damaged record, some rank was interrupted): one small
        all-reduce under torchrun, so that every rank stops at the same step."""
        flags = [float(data_error is not None), float(self._interrupted is not None)]
        if self.group is not None and self.world > 1:
            t = torch.tensor(flags, device=comm_device(self.group))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flags = t.tolist()
        return flags[0] > 0, flags[1] > 0

    def _stop(self, reason: str, code: int, mine: bool = False) -> None:
        """Save the finished steps (when any since the last checkpoint) and raise Stopped."""
        if self.step > 0 and self.saved_step != self.step:
            self.save()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        a = self.args
        if self.saved_step is None:
            where = "no step was finished, nothing saved"
        else:
            where = (f"checkpoint of step {self.saved_step} in {os.path.join(a.output, 'checkpoints')}; resume with: "
                     f"python -m magloss.train {shlex.quote(a.data_dir)} --output {shlex.quote(a.output)} --resume")
        raise Stopped(f"{reason}; {where}", code, show=self.is_main or mine)

    def train(self) -> None:
        """Train to ``self.total`` steps, save the checkpoint and ``model.pt``, then evaluate.

        Raises:
            Stopped: a damaged record in a batch (code 2) or Ctrl-C (code 130), after saving
            the finished steps.
        """
        a = self.args
        per_step = self.world * a.batch_size
        total = self.total
        self._bar = None
        self._interrupted = None
        if self.is_main and a.progress:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                                 file=sys.stderr)
            except ImportError:
                self._bar = None
        self._say(f"magloss.train: {self.n} images, {self.num_classes} classes, {a.network} "
                  f"{self.image_size[0]}x{self.image_size[1]} -> {a.embedding_size}, loss {a.loss}, world {self.world}, "
                  f"global batch {per_step}, {self.n // per_step} steps/epoch, amp {self.amp}, device {self.device}"
                  + (f", resumed at step {self.step}" if self.step else "")
                  + (" (the run is finished: nothing left to train)" if self.step >= total else ""))
        handler = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if handler else None
        try:
            self._steps(total, per_step)
        except KeyboardInterrupt:         # a second Ctrl-C: the bar ends its line before main's one line
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            raise
        finally:
            if handler:
                signal.signal(signal.SIGINT, previous)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.saved_step != self.step:
            self.save()
        if self.is_main:              # the outputs exist before any evaluation can fail or hang
            _write_atomically(os.path.join(a.output, "model.pt"), lambda f: torch.save(
                {"network": a.network, "embedding_size": a.embedding_size, "input_size": list(self.image_size),
                 "dropout": a.dropout, "state_dict": self.backbone.state_dict()}, f))
        self._barrier()
        self.evaluate()

    def _steps(self, total: int, per_step: int) -> None:
        a = self.args
        tick, tick_step = time.perf_counter(), self.step
        bb_params = self.optimizer.param_groups[0]["params"]
        self.backbone.train()
        self.head.train()
        while self.step < total:
            for images, labels, errors in self._loader():
                bad = next((e for e in errors if e), None)
                data_error, interrupted = self._agree(bad)
                if data_error:
                    self._stop(f"{bad or 'another rank read a damaged record'} (training stopped before step "
                               f"{self.step + 1})", 2, mine=bad is not None)
                if interrupted:
                    self._stop(f"interrupted at step {self.step}", 130)
                torch.manual_seed(_mix(a.seed, self.step, self.rank))
                x = (images.to(self.device, non_blocking=True).float() - 127.5) / 127.5
                flip = torch.rand(x.shape[0]) < 0.5
                x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
                y = labels.to(self.device, non_blocking=True)
                epoch, position = self._next(per_step)
                lr = self.schedule(epoch + position / self.n)
                for grp in self.optimizer.param_groups:
                    grp["lr"] = lr
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    emb = self.model(x)
                    parts = self.head(emb, y, return_parts=True)
                last = self.step + 1 >= total
                log = (self.step + 1) % a.log_every == 0 or last
                if log:   # what this step saw: its embeddings against the class matrix before the update
                    with torch.no_grad():
                        acc = self.head.accuracy(emb.detach().float(), y)     # collective when sharded
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(parts.loss).backward()
                if self.scaler.is_enabled() and self.world > 1:
                    _overflow_everywhere(self.head, self.group)
                self.scaler.unscale_(self.optimizer)
                if a.clip_grad_norm > 0:
                    nn.utils.clip_grad_norm_(bb_params, a.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                self.epoch, self.position = epoch, position
                if self._bar is not None:
                    self._bar.update(1)
                if log:
                    now = time.perf_counter()
                    row = self._row(parts, acc, lr, (self.step - tick_step) * per_step / max(now - tick, 1e-9))
                    tick, tick_step = now, self.step
                    self.log.write("train", row)
                    if self._bar is not None:
                        self._bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}",
                                              mag=f"{row['magnitude_mean']:.1f}", lr=f"{lr:.3g}")
                    elif self.is_main:
                        print(f"step {self.step} epoch {row['epoch']:.3f} loss {row['loss']:.4f} "
                              f"acc {row['accuracy']:.3f} |x| {row['magnitude_mean']:.2f} lr {lr:.4g}", flush=True)
                if last:
                    return                # the last checkpoint, model.pt and the evaluation: train()
                if (a.save_every and self.step % a.save_every == 0) or (not a.save_every and self.position == 0):
                    self.save()
                if a.eval_every and self.step % a.eval_every == 0:
                    self.evaluate()
                if self.position == 0:
                    break
        if self._interrupted is not None:
            self._stop(f"interrupted at step {self.step}", 130)

    def _row(self, parts, acc, lr, speed) -> dict:
        parts = type(parts)(*(t.detach().float() for t in parts))
        norms = parts.norms
        return {"step": self.step, "epoch": self._epochs_done(), "lr": lr, "loss": float(parts.loss),
                "ce": float(parts.ce), "reg": float(parts.reg), "reg_weighted": float(parts.reg_weighted),
                "magnitude_mean": float(norms.mean()), "magnitude_std": float(norms.std()) if norms.numel() > 1 else 0.0,
                "magnitude_min": float(norms.min()), "magnitude_max": float(norms.max()), "accuracy": float(acc),
                "grad_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0,
                "images_per_s": speed, "time": time.time()}

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False


def _norm(v):
    """Options as stored in a checkpoint (tuples as lists) and compared on resume."""
    return list(v) if isinstance(v, tuple) else v


def load_model(path: str, map_location="cpu") -> nn.Module:
    """The backbone of a finished run (``OUTPUT/model.pt``), in eval mode: ``[B, 3, H, W]``
    images normalized to ``[-1, 1]`` → ``[B, D]`` embeddings (not normalized)."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    model = build_backbone(saved["network"], saved["embedding_size"], tuple(saved["input_size"]), saved["dropout"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def parse(argv: Sequence[str]) -> Tuple[argparse.Namespace, set]:
    """(options, names of the options given explicitly) of a command line."""
    args = build_parser().parse_args(list(argv))
    return args, set(vars(build_parser(suppress_defaults=True).parse_args(list(argv))))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m magloss.train``; returns 0 (the outputs written; a failed
    evaluation is a warning). Exits with status 2 and ``magloss.train: error: ...`` on a bad
    command line or data folder (before training) or a damaged record found during training
    (after saving the finished steps); with status 130 and one line on Ctrl-C (a checkpoint
    of the finished steps written when Ctrl-C came during training)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, explicit = parse(argv)
    parser = build_parser()
    try:
        run = Run(args, explicit)
    except UsageError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print("magloss.train: interrupted before training started; nothing written", file=sys.stderr, flush=True)
        sys.exit(130)
    try:
        run.train()
    except Stopped as exc:
        parser.exit(exc.code, f"magloss.train: {'error: ' if exc.code == 2 else ''}{exc}\n" if exc.show else None)
    except KeyboardInterrupt:
        if run.is_main:
            print(f"magloss.train: interrupted at step {run.step} (a second Ctrl-C, or after the last step); "
                  f"the newest checkpoint is that of step {run.saved_step}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
