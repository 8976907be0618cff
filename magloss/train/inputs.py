"""What the training command reads: DATA_DIR's training images (resized, with a damaged record
turned into data), its ``.bin`` verification sets, and the resize both use."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import threading
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import UsageError

#: Folds of the verification protocol (insightface's 10-fold): a .bin needs at least this many pairs.
EVAL_FOLDS = 10


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


#: The signals a run stops on after the step in progress, with a checkpoint: Ctrl-C and a
#: scheduler's (or ``docker stop``'s) SIGTERM; the loop's handler, the workers' and the
#: block around their start are set for these.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly
    between steps and then stops them: a terminal's Ctrl-C and a scheduler's SIGTERM reach the
    whole process group, and a worker killed by either would fail the batch the main process
    still reads. (A worker whose parent died exits by itself: torch's watchdog.)

    Ctrl-C is ignored. SIGTERM is ignored unless it comes from the worker's parent (torch's
    rule, kept: the parent's ``terminate()`` at its exit must still end the worker, or the
    parent would wait for it forever): a thread takes each SIGTERM with ``sigwaitinfo`` and
    exits the worker (status 0, as torch does) when the parent sent it. Without
    ``sigwaitinfo`` (not POSIX) SIGTERM is ignored outright. The worker was started with
    both signals blocked (:func:`_stop_signals_blocked`): one that came meanwhile is
    pending, and is taken by these rules here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])      # for every thread: the waiter takes it
        threading.Thread(target=_sigterm_from_parent_only, args=(os.getppid(),), daemon=True,
                         name="magloss-sigterm").start()
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        if signal.sigwaitinfo([signal.SIGTERM]).si_pid == parent:
            os._exit(0)


@contextlib.contextmanager
def _stop_signals_blocked():
    """Ctrl-C and SIGTERM blocked in this thread while DataLoader workers are started: a
    started process inherits the mask, so a signal sent to the process group between its start
    and its :func:`_ignore_stop_signals` waits instead of killing it (which made the main
    process fail, or hang, on the batch that worker owed). The main process gets the signal
    when the block ends. A no-op where there are no signal masks (Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def select_bins(paths: Sequence[str], eval_sets: Optional[str]) -> List[str]:
    """The ``.bin`` paths ``--eval-sets`` names (comma-separated file names without ``.bin``,
    in that order); every path when it is None. UsageError naming the missing sets."""
    if eval_sets is None:
        return list(paths)
    wanted = [s.strip() for s in eval_sets.split(",") if s.strip()]
    have = {os.path.splitext(os.path.basename(b))[0]: b for b in paths}
    missing = [w for w in wanted if w not in have]
    if missing:
        raise UsageError(f"--eval-sets: {', '.join(missing)} not in DATA_DIR (it has: "
                         f"{', '.join(have) or 'no .bin file'})")
    return [have[w] for w in wanted]


def open_bins(paths: List[str]) -> list:
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
