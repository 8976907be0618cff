"""The training command's command line: the parser (its loss options read from the loss
registry), the value checks argparse cannot do, and the loss hyperparameters of a parse."""

from __future__ import annotations

import argparse
import inspect
import math
from typing import Dict, List, Sequence, Tuple

from magloss import registry
from magloss.backbones import ARCHITECTURES

from .errors import UsageError

#: --loss name -> loss class, from the one registry (magloss.registry): each class's constructor
#: arguments (after embedding_size and num_classes) become the loss options of --help.
LOSSES: Dict[str, type] = registry.LOSSES


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
    """--image-size: ``H`` or ``HxW`` (also ``H,W``) → (H, W) of positive integers."""
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
    """--milestones: increasing positive epochs separated by commas."""
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
    add(g, "--export-onnx", action=argparse.BooleanOptionalAction, default=False,
        help="at the end, also write OUTPUT/model.onnx (magloss.export: dynamic batch, embedding and magnitude "
             "outputs, checked with onnxruntime; needs the export extra)")
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


def parse(argv: Sequence[str]) -> Tuple[argparse.Namespace, set]:
    """(options, names of the options given explicitly) of a command line."""
    args = build_parser().parse_args(list(argv))
    return args, set(vars(build_parser(suppress_defaults=True).parse_args(list(argv))))
