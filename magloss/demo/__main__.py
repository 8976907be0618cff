"""``python -m magloss.demo``: :func:`magloss.demo.cli`."""

import sys

from magloss.demo.command import cli

if __name__ == "__main__":
    sys.exit(cli())
