"""``python -m magloss.train``'s entry point: parse, build the run, train, and turn each way a
run ends into its exit status and one line."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .errors import Stopped, UsageError
from .options import build_parser, parse
from .run import Run


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m magloss.train``; returns 0 (the outputs written; a failed
    evaluation is a warning). Exits with status 2 and ``magloss.train: error: ...`` on a bad
    command line or data folder (before training) or a damaged record found during training
    (after saving the finished steps); with status 1 and ``magloss.train: error: ...`` when a
    checkpoint cannot be written or fsync'ed (the newest complete one named); with status 130
    and one line on Ctrl-C, 143 and one line on SIGTERM (a checkpoint of the finished steps
    written when the signal came during the steps; 128 + the signal's number, the shells'
    convention)."""
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
        parser.exit(exc.code, f"magloss.train: {'error: ' if exc.code < 128 else ''}{exc}\n" if exc.show else None)
    except KeyboardInterrupt:
        if run.is_main:
            print(f"magloss.train: interrupted at step {run.step} (a second Ctrl-C, or after the last step); "
                  f"the newest checkpoint is that of step {run.saved_step}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        run.close()
    return 0
