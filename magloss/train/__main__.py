"""``python -m magloss.train``: :func:`magloss.train.main`."""

import sys

from magloss.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
