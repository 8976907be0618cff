"""The API reference (docs/api/index.rst) documents every public module of the package."""

import os
import pkgutil
import re

import magloss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _public_modules():
    names = {"magloss"}
    for m in pkgutil.walk_packages(magloss.__path__, "magloss."):
        parts = m.name.split(".")
        if any(p.startswith("_") for p in parts[1:]):
            continue                                  # private modules and __main__
        parent = ".".join(parts[:-1])
        if parent in ("magloss.train", "magloss.demo"):
            continue                                  # the commands' parts: the package documents the command
        names.add(m.name)
    return names


def test_every_public_module_is_in_the_api_reference():
    with open(os.path.join(ROOT, "docs", "api", "index.rst"), encoding="utf-8") as f:
        listed = set(re.findall(r"^\.\. automodule:: (\S+)$", f.read(), re.M))
    assert listed == _public_modules()
