"""``python -m magloss.train``: :func:`magloss.train.main`."""

import sys

from magloss.train.command import main

if __name__ == "__main__":
    sys.exit(main())
