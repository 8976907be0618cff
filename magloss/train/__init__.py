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

The package, one job a module: ``options`` (the command line and its checks), ``device``
(:func:`decide_device`), ``inputs`` (DATA_DIR and the .bin sets), ``sampler`` (the data order),
``schedule``, ``log``, ``checkpoints`` (checkpoints, resume, ``model.pt``), ``run`` (:class:`Run`,
built in named steps), ``loop`` (the training loop and the evaluations), ``command`` (:func:`main`).
"""

from __future__ import annotations

from .checkpoints import CHECKPOINT_FORMAT, load_model
from .command import main
from .device import DevicePlan, decide_device
from .errors import Stopped, UsageError
from .inputs import EVAL_FOLDS, Resize, open_data, resize
from .log import Log
from .loop import _overflow_everywhere as _overflow_everywhere   # private; the tests import it from the package
from .options import LOSS_OPTIONS, LOSSES, build_parser, loss_kwargs, parse
from .run import Run
from .sampler import GlobalBatchSampler
from .sampler import _mix as _mix   # private; the tests import it from the package
from .schedule import Schedule

__all__ = ["CHECKPOINT_FORMAT", "EVAL_FOLDS", "LOSSES", "LOSS_OPTIONS", "DevicePlan", "GlobalBatchSampler", "Log",
           "Resize", "Run", "Schedule", "Stopped", "UsageError", "build_parser", "decide_device", "load_model",
           "loss_kwargs", "main", "open_data", "parse", "resize"]
