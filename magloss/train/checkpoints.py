"""What a run keeps on disk and reads back: checkpoints (written so that ``--resume`` never
sees half of one), the options a resumed run takes from its checkpoint, and ``model.pt``."""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from torch import nn

from magloss import checkpoint as ckpt
from magloss.backbones import build_backbone

from .errors import UsageError
from .options import LOSS_OPTIONS, LOSSES, _loss_params

CHECKPOINT_FORMAT = "magloss.train/1"

#: Options a resumed run must keep (they define the model or the trajectory); an explicit
#: different value on the command line is an error. The loss options are added below.
_FIXED = ("network", "embedding_size", "dropout", "image_size", "loss", "optimizer", "lr", "momentum",
          "weight_decay", "schedule", "warmup_epochs", "epochs", "milestones", "gamma", "seed")


def _norm(v):
    """Options as stored in a checkpoint (tuples as lists) and compared on resume."""
    return list(v) if isinstance(v, tuple) else v


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
    """``write(binary file)`` into ``path`` atomically and durably (:func:`magloss.checkpoint.write_atomically`:
    a temporary file, fsync'ed, renamed, the folder fsync'ed): a reader, a resumed run, or the
    machine after a power loss sees the old file or the whole new one, never a part."""
    ckpt.write_atomically(path, write)


def read_checkpoint(resume: str, output: str):
    """(checkpoint folder, its ``state.pt`` as a dict) of ``--resume`` (``"auto"``: the latest
    checkpoint of ``output``); UsageError when the file cannot be read or is not a checkpoint
    of this command."""
    ck_dir = _find_checkpoint(resume, output)
    try:
        state = torch.load(os.path.join(ck_dir, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as exc:          # a damaged file: torch raises RuntimeError, pickle's errors...
        raise UsageError(f"--resume: cannot read {os.path.join(ck_dir, 'state.pt')!r}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume: {ck_dir!r} is not a magloss.train checkpoint")
    return ck_dir, state


def check_new_output(output: str) -> None:
    """A new run (no --resume) must not write over another run's checkpoints."""
    if os.path.isfile(os.path.join(output, "checkpoints", "latest")):
        raise UsageError(f"--output: {output!r} already holds a run's checkpoints: pass --resume to "
                         f"continue it, or choose another --output")


def merge_options(args: argparse.Namespace, explicit: set, saved: dict) -> argparse.Namespace:
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


def restore(run, ck_dir: str, state: dict) -> None:
    """Load a checkpoint into a built run (backbone, optimizer, class matrix at any world size,
    the loss's buffers, the scaler, the data position); UsageError when it does not fit."""
    try:
        run.backbone.load_state_dict(state["backbone"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(f"--resume: the checkpoint {ck_dir!r} does not fit this model (input size "
                         f"{run.image_size[0]}x{run.image_size[1]} from DATA_DIR; another data set?): "
                         f"{str(exc).splitlines()[0]}") from None
    try:
        ckpt.load_class_matrix(os.path.join(ck_dir, "head"), run.head, run.optimizer)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc} (DATA_DIR {run.args.data_dir!r} has {run.num_classes} classes)") \
            from None
    own = run.head.state_dict()     # buffers, and extra state such as ElasticFace's generator
    own.update({k: v for k, v in state["head_state"].items() if k in own})
    run.head.load_state_dict(own)
    if state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch, run.position = int(state["step"]), int(state["epoch"]), int(state["position"])
    if run.position >= run.n:
        raise UsageError(f"--resume: the checkpoint is at sample {run.position} of an epoch, DATA_DIR holds "
                         f"{run.n} images (another data set?)")


def save(run) -> str:
    """Write checkpoints/step-XXXXXXXX (collective); returns its folder.

    Never half-written where ``--resume`` looks: every file goes into the temporary folder
    ``checkpoints/.tmp-step-XXXXXXXX`` (the class-matrix shards by their ranks, then
    ``state.pt`` by rank 0), which is renamed to ``step-XXXXXXXX`` when complete; only then
    is ``checkpoints/latest`` replaced (atomically) by its name. A process killed at any
    point leaves the previous checkpoint and ``latest`` as they were; the next save
    removes the leftovers.

    Durable across a power loss: each file is fsync'ed before its rename, and each folder
    after the entries in it changed, in the order that makes `latest` name a complete folder
    at every instant on disk: the files, ``head/`` and the temporary folder, then (after its
    rename) ``checkpoints/``, then ``latest`` and ``checkpoints/`` again, and only then are
    older checkpoints removed.

    Raises:
        OSError: a write or an fsync failed (naming the file), on every rank; ``latest`` and
        the previous checkpoint are as they were.
    """
    root = os.path.join(run.args.output, "checkpoints")
    name = f"step-{run.step:08d}"
    path = os.path.join(root, name)
    work = os.path.join(root, ".tmp-" + name)
    error = None
    if run.is_main:
        try:
            if not os.path.isdir(root):
                os.makedirs(root)
                ckpt.fsync_dir(run.args.output)
            try:
                with open(os.path.join(root, "latest")) as f:
                    pointed = ".old-" + f.read().strip()    # what --resume would take until `latest` moves on
            except OSError:
                pointed = None
            for d in os.listdir(root):        # leftovers of a process killed while saving
                if d.startswith((".tmp-", ".old-")) and d != pointed:
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            os.makedirs(work)
        except OSError as exc:
            error = exc
    ckpt.all_ok(error, run.group, root)
    ckpt.save_class_matrix(os.path.join(work, "head"), run.head, run.optimizer)
    if run.is_main:
        opt = run.optimizer.state_dict()
        opt["state"] = {k: v for k, v in opt["state"].items() if k != run._head_index}
        state = {
            "format": CHECKPOINT_FORMAT, "step": run.step, "epoch": run.epoch, "position": run.position,
            "world_size": run.world, "args": {k: _norm(v) for k, v in vars(run.args).items()},
            "backbone": run.backbone.state_dict(), "optimizer": opt,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "schedule": run.schedule.state_dict(),
            "head_state": {k: v for k, v in run.head.state_dict().items() if k != "weight"},
        }
        try:
            _write_atomically(os.path.join(work, "state.pt"), lambda f: torch.save(state, f))   # and work/
            if os.path.exists(path):          # the same step saved before (a resume from an older checkpoint)
                os.rename(path, os.path.join(root, ".old-" + name))
            os.rename(work, path)
            ckpt.fsync_dir(root)              # the folder's new name is on disk before `latest` names it
            _write_atomically(os.path.join(root, "latest"), lambda f: f.write(f"{name}\n".encode()))
        except OSError as exc:
            error = exc
    ckpt.all_ok(error, run.group, root)
    if run.is_main:                       # `latest` is on disk: what it replaced may go
        done = sorted(d for d in os.listdir(root) if d.startswith("step-")
                      and os.path.isfile(os.path.join(root, d, "state.pt")))
        for old in done[:-run.args.keep_checkpoints]:
            if old != name:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        for d in os.listdir(root):        # `latest` names a complete folder now: no fallback is needed
            if d.startswith(".old-"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    run._barrier()
    run.saved_step = run.step
    return path


def write_model(run) -> None:
    """``OUTPUT/model.pt``: the backbone and what rebuilds it (:func:`load_model`), written atomically."""
    a = run.args
    _write_atomically(os.path.join(a.output, "model.pt"), lambda f: torch.save(
        {"network": a.network, "embedding_size": a.embedding_size, "input_size": list(run.image_size),
         "dropout": a.dropout, "state_dict": run.backbone.state_dict()}, f))


def check_export() -> None:
    """--export-onnx needs the export extra: UsageError before the first step if it is missing."""
    try:
        from magloss import export
        export._require_onnx()
    except ImportError as exc:
        raise UsageError(f"--export-onnx: {exc}") from None


def write_onnx(run) -> None:
    """``OUTPUT/model.onnx`` from ``OUTPUT/model.pt`` (:func:`magloss.export.export_onnx`: fp32,
    dynamic batch, checked with onnxruntime). A failure is a warning: the run keeps its outputs."""
    from magloss.export import export_onnx

    out = os.path.join(run.args.output, "model.onnx")
    try:
        info = export_onnx(os.path.join(run.args.output, "model.pt"), out)
    except Exception as exc:  # noqa: BLE001 - an export never costs the run
        run._say(f"magloss.train: warning: the ONNX export failed, model.pt is kept: {type(exc).__name__}: {exc}",
                 err=True)
        return
    diff = (info.get("check") or {}).get("embedding")
    run._say(f"wrote {out}" + (f" (onnxruntime vs torch: largest embedding difference {diff:.2g})"
                               if isinstance(diff, float) else ""))


def load_model(path: str, map_location="cpu") -> nn.Module:
    """The backbone of a finished run (``OUTPUT/model.pt``), in eval mode: ``[B, 3, H, W]``
    images normalized to ``[-1, 1]`` → ``[B, D]`` embeddings (not normalized)."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    model = build_backbone(saved["network"], saved["embedding_size"], tuple(saved["input_size"]), saved["dropout"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()
