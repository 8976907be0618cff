"""Validators of scalar arguments and their messages: one rule, one wording.

Every constructor and function of magloss checks its numbers, counts, flags and angles
with these, so that the same mistake gets the same message wherever it is made. Each
validator returns the value as it will be used (a float, an int, a bool) or raises, naming
the argument in the caller's words: ``"<name>: expected <what>, got <value>"``.

* ValueError: a value of the right kind outside its range (a negative count, a NaN weight,
  an angle past its bound); a float where a count is wanted (3.0 is not a count).
* TypeError: a value of the wrong kind where a wrong kind would silently mean something
  else (a string as a bool flag, a float as ``ignore_index`` or a seed).

Angles are in radians. An angle past its bound that would be in range as degrees gets the
hint of :func:`degrees_hint` (pytorch-metric-learning's ArcFaceLoss takes its margin in
degrees, so 28.6 is a likely slip for 0.5).

No torch and no other magloss module here: :mod:`magloss.margins` and every module above
it import this one.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

__all__ = [
    "REDUCTIONS",
    "check_finite",
    "check_positive",
    "check_non_negative",
    "check_int",
    "check_int_type",
    "check_bool",
    "degrees_hint",
    "check_interval",
    "check_angle",
    "check_subcenters",
    "check_reduction",
    "check_ignore_index",
]

#: The reductions every loss takes.
REDUCTIONS = ("mean", "sum", "none")


def _as_float(value) -> float:
    """``float(value)`` for a number (Python, numpy, a one-element tensor), NaN for anything
    else (a string, None, a bool: True is not the 1.0 anyone means): the caller's range test
    then fails and names the argument."""
    if isinstance(value, (bool, str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def _shown(value) -> str:
    """How a message shows the value it got: a number as written, the repr of anything else."""
    return str(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else repr(value)


def check_finite(name: str, value) -> float:
    """``value`` as a float when it is a finite real number; ValueError naming ``name``
    otherwise (NaN, ±Inf, or something ``float()`` does not take, such as a string)."""
    v = _as_float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {_shown(value)}")
    return v


def check_positive(name: str, value, upper: Optional[float] = None, inclusive: bool = False) -> float:
    """``value`` as a float in (0, ``upper``) (``inclusive``: (0, ``upper``]; no upper bound
    when None), finite. ValueError naming ``name`` otherwise, e.g. a momentum in (0, 1]."""
    v = _as_float(value)
    if not math.isfinite(v) or v <= 0 or (upper is not None and (v > upper if inclusive else v >= upper)):
        rng = f"a number in (0, {upper:g}{']' if inclusive else ')'}" if upper is not None else "a positive finite number"
        raise ValueError(f"{name}: expected {rng}, got {_shown(value)}")
    return v


def check_non_negative(name: str, value, what: str = "number") -> float:
    """``value`` as a float ≥ 0, finite; ValueError naming ``name`` and ``what`` it is
    (e.g. "weight" for λ_g, "standard deviation" for ElasticFace's σ) otherwise."""
    v = _as_float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name}: expected a finite non-negative {what}, got {_shown(value)}")
    return v


def check_int(name: str, value, minimum: int, what: str = "") -> int:
    """``value`` as an int when it is an integer (Python or numpy, not bool) ≥ ``minimum``;
    ValueError naming ``name`` otherwise (floats such as 3.0 included: a count is an int).
    ``what`` is appended to the expectation, e.g. " (sub-centers per class)"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 and not what else f"an integer >= {minimum}{what}"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    return int(value)


def check_int_type(name: str, value, optional: bool = False) -> Optional[int]:
    """``value`` when it is a Python int (not bool), or None when ``optional``; TypeError
    naming ``name`` otherwise. For integers whose every value is meaningful (an
    ``ignore_index``, a seed), where only the kind can be wrong."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int{' or None' if optional else ''}, got {type(value).__name__}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` when it is a bool; TypeError naming ``name`` otherwise (a string such as
    'no' is truthy: taking it as True would silently do the opposite of what was meant)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool (True or False), got {value!r}")
    return value


def degrees_hint(value: float, limit: float = math.pi / 2) -> str:
    """The hint appended to an angle ``value`` ≥ ``limit`` (radians) that looks like
    degrees: the radian value it probably meant. "" below ``limit``."""
    if value >= limit:
        return (f" (angles are in radians; if {value} is in degrees, as pytorch-metric-learning's ArcFaceLoss "
                f"takes its margin, pass math.radians({value}) = {math.radians(value):.4g})")
    return ""


def check_interval(name: str, value, upper: float, *, what: str = "a number", positive: bool = False,
                   upper_text: Optional[str] = None) -> float:
    """``value`` as a finite float in [0, ``upper``) (``positive``: (0, ``upper``)); ValueError
    naming ``name`` and ``what`` it is otherwise. ``upper_text`` writes the bound in the
    message (e.g. "pi")."""
    v = check_finite(name, value)
    if v < 0 or (positive and v == 0) or v >= upper:
        bound = upper_text or f"{upper:.4g}"
        raise ValueError(f"{name}: expected {what} in {'(' if positive else '['}0, {bound}), got {v}"
                         + (degrees_hint(v, upper) if what == _ANGLE else ""))
    return v


_ANGLE = "an angle in radians"


def check_angle(name: str, value, upper: float, *, positive: bool = False, upper_text: Optional[str] = None) -> float:
    """``value`` as a float angle in radians in [0, ``upper``) (``positive``: (0, ``upper``)),
    finite: :func:`check_interval`, with :func:`degrees_hint` when the value is past ``upper``."""
    return check_interval(name, value, upper, what=_ANGLE, positive=positive, upper_text=upper_text)


def check_subcenters(value) -> int:
    """The sub-center count K of Sub-center ArcFace: an integer ≥ 1 (ValueError naming
    ``subcenters`` otherwise)."""
    return check_int("subcenters", value, 1, " (sub-centers per class)")


def check_reduction(reduction: str) -> str:
    """``reduction`` when it is 'mean', 'sum' or 'none'; ValueError naming it otherwise."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_ignore_index(ignore_index, num_classes: Optional[int] = None, stacklevel: int = 3) -> int:
    """``ignore_index`` when it is an int (TypeError naming it otherwise). With
    ``num_classes``, warn (UserWarning, attributed ``stacklevel`` frames up) when it is a
    class index in [0, num_classes): the rows of that class would be dropped from the loss
    and the class never learned."""
    check_int_type("ignore_index", ignore_index)
    if num_classes is not None and 0 <= ignore_index < num_classes:
        warnings.warn(f"ignore_index={ignore_index} is a class index in [0, {num_classes}): rows labelled "
                      f"{ignore_index} add nothing to the loss and class {ignore_index} is never learned. "
                      "Use a negative value (the default is -1) unless that is what you mean",
                      UserWarning, stacklevel=stacklevel)
    return ignore_index
