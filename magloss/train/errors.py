"""The two ways the training command ends early: a usage error before training, a stop during it."""

from __future__ import annotations


class UsageError(Exception):
    """A bad command line or data folder: reported as ``magloss.train: error: ...`` (exit 2)."""


class Stopped(Exception):
    """Training stopped before its end with its finished steps saved: a data error found during
    training (``code`` 2), a checkpoint that cannot be written (``code`` 1), Ctrl-C (``code``
    130) or SIGTERM (``code`` 143). The message is the one line printed, by rank 0 and by a
    rank that read the damaged record or failed to write (``show``)."""

    def __init__(self, message: str, code: int, show: bool = True) -> None:
        super().__init__(message)
        self.code, self.show = code, show


def os_reason(exc: OSError) -> str:
    """An OSError as the end of a one-line message: its text when it names its file
    (``magloss.checkpoint``'s errors: "PATH: fsync failed: ..."), else ``str(exc)`` (the
    errno, the reason and the file names of a failed rename)."""
    return exc.strerror if exc.strerror and exc.filename is None else str(exc)
