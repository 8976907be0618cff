"""The run-time switches: environment variables that change what the engines do, in one table.

Every Python module that reads a switch reads it through this module; the fused engine's C++
boundary (csrc/) reads the same variables with the same meanings (it cannot import Python), and
the README's table of run-time switches is kept in step with :data:`SWITCHES` by
tests/test_switches.py. Build switches (``MAGLOSS_BUILD_CUDA``, ``TORCH_CUDA_ARCH_LIST``,
``MAGLOSS_NVCC_THREADS``) belong to setup.py and are not listed here.

Each switch is read when it is used (at each call), except ``MAGLOSS_DISABLE_EXT`` (import time).
A value that cannot be parsed is a ``ValueError`` naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["SWITCHES", "Switch", "choice", "flag", "positive_int"]


@dataclass(frozen=True)
class Switch:
    """One environment variable: its name, the value it has when unset, what it does, and
    which parts of magloss read it."""

    name: str
    default: str
    meaning: str
    read_by: str


SWITCHES: Tuple[Switch, ...] = (
    Switch("MAGLOSS_DISABLE_EXT", "0",
           "(import time) never load the compiled extension: the chunked engine everywhere",
           "magloss._ext"),
    Switch("MAGLOSS_FORCE_SIMT", "0",
           "the plain fp32 products of GPUs without tensor cores (1080 Ti class), on any GPU",
           "fused engine"),
    Switch("MAGLOSS_CHUNK", "",
           "class-chunk width N in columns, on both engines; unset, each engine sizes its B×N tile itself "
           "(chunked: about 2^19 elements, N in [256, 4096]; fused: about 2^22 elements, N ≥ 1024)",
           "chunked engine, fused engine"),
    Switch("MAGLOSS_CHECK_INPUTS", "async",
           "label/NaN check: 'async' raises a bad batch's ValueError in the next fused call or in "
           "magloss.flush_input_checks() (no host wait); 'sync' in the offending call (one host wait per "
           "forward); 'off' never reads it back (bad rows give a NaN loss). The chunked engine always "
           "checks in the call, except with 'off'",
           "chunked engine, fused engine"),
    Switch("MAGLOSS_PATH", "auto",
           "the engine's path (chunked and fused alike): 'speed' keeps the forward's B×C products for the backward (three "
           "products), 'flat' recomputes them (four, memory flat in C), 'auto' takes 'speed' when its extra "
           "memory fits MAGLOSS_SPEED_BUDGET (docs/cpu_engine.md, docs/cuda.md)",
           "chunked engine, fused engine"),
    Switch("MAGLOSS_SPEED_BUDGET", "",
           "bytes of extra memory the speed path may take under 'auto'; unset: the size of the class matrix "
           "(shard) itself",
           "chunked engine, fused engine"),
)

_BY_NAME = {s.name: s for s in SWITCHES}


def _raw(name: str) -> str:
    if name not in _BY_NAME:
        raise KeyError(f"{name} is not a magloss run-time switch (see magloss.switches.SWITCHES)")
    return os.environ.get(name, "")


def flag(name: str) -> bool:
    """A switch that is on or off: unset, '' and '0' are off, anything else is on."""
    return _raw(name) not in ("", "0")


def positive_int(name: str, minimum: int = 1, what: str = "") -> Optional[int]:
    """A switch holding an integer ≥ ``minimum`` (default 1), or None when unset or '';
    ValueError naming the variable (and ``what`` the number counts, e.g. " (bytes)") for
    anything else."""
    v = _raw(name)
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        kind = "a positive integer" if minimum == 1 and not what else f"an integer >= {minimum}{what}"
        raise ValueError(f"{name}: expected {kind}, got '{v}'")
    return n


def choice(name: str, choices: Tuple[str, ...], aliases: Optional[dict] = None) -> str:
    """A switch with a fixed set of values: the value (or its alias), the default when unset or
    ''; ValueError naming the variable and the choices for anything else."""
    v = _raw(name)
    if not v:
        return _BY_NAME[name].default
    got = v
    v = (aliases or {}).get(v, v)
    if v not in choices:
        default = _BY_NAME[name].default
        shown = [f"'{c}'" + (" (default)" if c == default else "") for c in choices]
        listed = ", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0]
        raise ValueError(f"{name}: expected {listed}, got '{got}'")
    return v


def markdown_table() -> str:
    """The README's table of run-time switches, from :data:`SWITCHES` (tests/test_switches.py
    checks that the README holds exactly this text)."""
    rows = ["| variable | default | effect | read by |", "| --- | --- | --- | --- |"]
    for s in SWITCHES:
        rows.append(f"| `{s.name}` | {f'`{s.default}`' if s.default else 'unset'} | {s.meaning} | {s.read_by} |")
    return "\n".join(rows)
