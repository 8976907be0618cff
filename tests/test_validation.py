"""The library's layout and its one module of validators.

* The oracle stands apart: no library module imports magloss.reference, and importing
  magloss does not load it (a change to the oracle cannot change what the engines compute).
* magloss.validation: each validator against values and messages written out by hand.
* One rule, one message: the same mistake made through different entry points (a losses
  constructor, a functional loss, the sub-center tools, the oracle) gets the same words.
"""

import ast
import math
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import magloss
import magloss.functional as MF
from cases import make_inputs
from magloss import reference, subcenter
from magloss.checks import num_classes_of
from magloss.margins import MarginSpec
from magloss.validation import (check_angle, check_bool, check_finite, check_ignore_index, check_int, check_int_type,
                                check_interval, check_non_negative, check_positive, check_reduction,
                                check_subcenters, degrees_hint)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = sorted(p for p in (ROOT / "magloss").rglob("*.py") if p.name != "reference.py")


# -- the oracle apart ---------------------------------------------------------------------------------------
def _imports_reference(text: str, package: str) -> bool:
    """Whether module source ``text`` of ``package`` (e.g. "magloss.distributed") imports
    magloss.reference, in any spelling (absolute, relative at any depth, ``from . import
    reference``), read from its syntax tree."""
    parts = package.split(".")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import) and any(a.name == "magloss.reference" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "magloss.reference" or (module == "magloss" and any(a.name == "reference"
                                                                             for a in node.names)):
                return True
    return False


@pytest.mark.parametrize("text,package,expected", [
    ("import magloss.reference", "magloss", True),
    ("from magloss import reference", "magloss", True),
    ("from .reference import margin_ce_rows", "magloss", True),
    ("from . import chunked, reference", "magloss", True),
    ("from ..reference import margin_ce_rows", "magloss.distributed", True),
    ("from .reference import x", "magloss.distributed", False),       # magloss.distributed.reference
    ("from .rows import compute_dtype", "magloss", False),
    ("from magloss import references", "magloss", False),
])
def test_the_import_finder_sees_every_spelling(text, package, expected):
    """The finder itself can fail: each spelling of the import is found, a look-alike is not."""
    assert _imports_reference(text, package) is expected


@pytest.mark.parametrize("path", LIBRARY, ids=[str(p.relative_to(ROOT)) for p in LIBRARY])
def test_no_library_module_imports_the_oracle(path):
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    assert not _imports_reference(path.read_text(), package), f"{path.relative_to(ROOT)} imports magloss.reference"


def test_importing_magloss_does_not_load_the_oracle():
    code = ("import sys, magloss, magloss.distributed.loss, magloss.train; "
            "print('magloss.reference' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- magloss.validation, value by value ------------------------------------------------------------------------
OK = [
    (lambda: check_finite("x", 3), 3.0),
    (lambda: check_finite("x", np.float32(0.5)), 0.5),
    (lambda: check_finite("x", torch.tensor(2.0)), 2.0),
    (lambda: check_positive("h", 0.333), 0.333),
    (lambda: check_positive("momentum", 1, 1.0, inclusive=True), 1.0),
    (lambda: check_non_negative("std", 0), 0.0),
    (lambda: check_int("n", np.int64(7), 1), 7),
    (lambda: check_int("n", 0, 0), 0),
    (lambda: check_int_type("seed", None, optional=True), None),
    (lambda: check_int_type("ignore_index", -100), -100),
    (lambda: check_bool("flag", False), False),
    (lambda: check_interval("margin", 1.5, 2.0), 1.5),
    (lambda: check_angle("m2", 0.0, math.pi), 0.0),
    (lambda: check_subcenters(3), 3),
    (lambda: check_reduction("none"), "none"),
    (lambda: check_ignore_index(-1, 10), -1),
]


@pytest.mark.parametrize("call,expected", OK)
def test_validators_return_the_value_as_used(call, expected):
    got = call()
    assert got == expected and type(got) is type(expected)


BAD = [
    # (call, exception, the whole message, written out by hand)
    (lambda: check_finite("scale", "64"), ValueError, "scale: expected a finite number, got '64'"),
    (lambda: check_finite("scale", True), ValueError, "scale: expected a finite number, got True"),
    (lambda: check_finite("scale", float("inf")), ValueError, "scale: expected a finite number, got inf"),
    (lambda: check_positive("h", 0.0), ValueError, "h: expected a positive finite number, got 0.0"),
    (lambda: check_positive("momentum", 1.5, 1.0, inclusive=True), ValueError,
     "momentum: expected a number in (0, 1], got 1.5"),
    (lambda: check_positive("p", 1.0, 1.0), ValueError, "p: expected a number in (0, 1), got 1.0"),
    (lambda: check_non_negative("lambda_g", -1, "weight"), ValueError,
     "lambda_g: expected a finite non-negative weight, got -1"),
    (lambda: check_non_negative("std", None, "standard deviation"), ValueError,
     "std: expected a finite non-negative standard deviation, got None"),
    (lambda: check_int("num_classes", 8.0, 1), ValueError, "num_classes: expected a positive integer, got 8.0"),
    (lambda: check_int("num_classes", True, 1), ValueError, "num_classes: expected a positive integer, got True"),
    (lambda: check_int("k", -1, 0), ValueError, "k: expected an integer >= 0, got -1"),
    (lambda: check_int_type("seed", 1.0), TypeError, "seed: expected an int, got float"),
    (lambda: check_int_type("seed", "x", optional=True), TypeError, "seed: expected an int or None, got str"),
    (lambda: check_bool("plus", 1), TypeError, "plus: expected a bool (True or False), got 1"),
    (lambda: check_interval("margin", 2.0, 2.0, what="a cosine margin"), ValueError,
     "margin: expected a cosine margin in [0, 2), got 2.0"),
    (lambda: check_angle("threshold", 0.0, math.pi, positive=True, upper_text="pi"), ValueError,
     "threshold: expected an angle in radians in (0, pi), got 0.0"),
    (lambda: check_angle("m2", -0.1, math.pi, upper_text="pi"), ValueError,
     "m2: expected an angle in radians in [0, pi), got -0.1"),
    (lambda: check_angle("margin", 28.6, math.pi / 2, upper_text="pi/2"), ValueError,
     "margin: expected an angle in radians in [0, pi/2), got 28.6 (angles are in radians; if 28.6 is in degrees, "
     "as pytorch-metric-learning's ArcFaceLoss takes its margin, pass math.radians(28.6) = 0.4992)"),
    (lambda: check_subcenters(0), ValueError, "subcenters: expected an integer >= 1 (sub-centers per class), got 0"),
    (lambda: check_reduction("avg"), ValueError, "reduction: expected one of ('mean', 'sum', 'none'), got 'avg'"),
    (lambda: check_ignore_index(-1.0), TypeError, "ignore_index: expected an int, got float"),
]


@pytest.mark.parametrize("call,exc,message", BAD)
def test_validators_raise_in_the_callers_words(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


def test_degrees_hint_only_past_the_bound():
    assert degrees_hint(1.0) == ""                       # below pi/2: a plausible margin in radians
    hint = degrees_hint(75.0, math.pi)
    assert f"math.radians(75.0) = {75.0 * math.pi / 180:.4g}" in hint and "1.309" in hint


def test_ignore_index_inside_the_classes_warns():
    with pytest.warns(UserWarning, match="ignore_index=3 is a class index in \\[0, 10\\)"):
        check_ignore_index(3, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_ignore_index(3)                             # no class count: nothing to compare with


# -- one rule, one message, whichever way in -------------------------------------------------------------
def _message(call) -> str:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return str(info.value)


def test_subcenter_count_has_one_message_everywhere():
    w = torch.randn(6, 4, dtype=torch.float64)
    want = "subcenters: expected an integer >= 1 (sub-centers per class), got 0"
    assert _message(lambda: MarginSpec.combined().with_subcenters(0)) == want
    assert _message(lambda: num_classes_of(w, 0)) == want
    assert _message(lambda: subcenter.dominant_weight(w, torch.zeros(6, dtype=torch.long), 0)) == want
    assert _message(lambda: magloss.SubCenterArcFaceLoss(4, 3, subcenters=0)) == want


def test_rows_not_a_multiple_of_k_have_one_message_everywhere():
    x, w, y = make_inputs(3, 5, 4)                      # 5 class rows, K = 2 does not divide them
    want = ("weight: expected K*C rows for subcenters K=2 (row j*K + k is sub-center k of class j), "
            "got 5 rows, not a multiple of 2")
    spec = MarginSpec.combined().with_subcenters(2)
    assert _message(lambda: reference.margin_ce_forward(x, w, y, spec)) == want
    assert _message(lambda: MF.margin_loss(x, w, y, spec)) == want
    assert _message(lambda: subcenter.subcenter_counts(x, w, y, 2)) == want


def test_oracle_names_a_bad_subcenter_count_before_using_it():
    """A spec built without its validation (as an op's integers arrive) with K = 0: the oracle's
    forward divided by K before checking it (ZeroDivisionError)."""
    x, w, y = make_inputs(3, 4, 5)
    spec = MarginSpec(0, 64.0, 1.0, 0.5, subcenters=0)
    for fn in (reference.margin_ce_forward, reference.margin_ce_rows):
        with pytest.raises(ValueError, match=r"^subcenters: expected an integer >= 1"):
            fn(x, w, y, spec)


@pytest.mark.parametrize("call", [
    lambda: magloss.ArcFaceLoss(8, 5, margin=28.6),
    lambda: magloss.AdaFaceLoss(8, 5, margin=28.6),
    lambda: magloss.ElasticArcFaceLoss(8, 5, margin=28.6),
    lambda: MF.elastic_arcface_loss(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 1]), margin=28.6),
    lambda: magloss.CurricularFaceLoss(8, 5, margin=28.6),
    lambda: magloss.CombinedMarginLoss(8, 5, m2=28.6),
], ids=["arcface", "adaface", "elastic-arc", "elastic-arc-functional", "curricular", "combined-m2"])
def test_one_degrees_hint(call):
    """Every angular margin given in degrees gets the same hint, with the radian value 28.6·π/180."""
    assert f"pass math.radians(28.6) = {28.6 * math.pi / 180:.4g})" in _message(call)


def test_far_from_class_threshold_in_degrees_gets_the_hint():
    x, w, y = make_inputs(3, 4, 5)
    msg = _message(lambda: subcenter.far_from_class(x, w, y, threshold=75.0))
    assert msg.startswith("threshold: expected an angle in radians in (0, pi), got 75.0")
    assert f"math.radians(75.0) = {75.0 * math.pi / 180:.4g}" in msg


def test_cosine_margin_is_not_called_radians():
    msg = _message(lambda: magloss.ElasticCosFaceLoss(8, 5, margin=3.0))
    assert msg == "margin: expected a cosine margin in [0, 2), got 3.0"
    assert _message(lambda: MF.elastic_cosface_loss(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 1]),
                                                     margin=3.0)) == msg


@pytest.mark.parametrize("call,word", [
    (lambda: MarginSpec.combined(scale="64"), "scale"),
    (lambda: MarginSpec.combined(scale=True), "scale"),
    (lambda: magloss.SphereFaceLoss(8, 5, lambda_base="1000"), "lambda_base"),
    (lambda: magloss.AdaFaceLoss(8, 5, h="0.333"), "h"),
    (lambda: magloss.MagFaceLoss(8, 5, lambda_g=None), "lambda_g"),
    (lambda: MF.elastic_arcface_loss(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 1]), plus=1), "plus"),
    (lambda: MF.cosine_argmax(torch.randn(2, 8), torch.randn(5, 8), chunk_classes=0), "chunk_classes"),
    (lambda: MF.accuracy(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 1]), chunk_classes=2.5),
     "chunk_classes"),
], ids=["scale-str", "scale-bool", "lambda_base-str", "h-str", "lambda_g-None", "plus-int", "chunk_classes-0",
        "chunk_classes-float"])
def test_a_value_of_the_wrong_kind_is_named(call, word):
    """Not a raw 'could not convert string to float', not a bool taken as 1.0, not a chunk
    count of 0 silently replaced by the default."""
    assert _message(call).startswith(f"{word}: expected")


def test_named_family_specs_are_the_combined_margin_with_the_callers_word():
    """ArcFace is (1, m, 0) and CosFace (1, 0, m) of the combined margin; their errors say
    ``margin``, never the spec's m2/m3."""
    assert MarginSpec.arcface(30.0, 0.3, True, True) == MarginSpec.combined(30.0, 1.0, 0.3, 0.0, True, True)
    assert MarginSpec.cosface(30.0, 0.2, True) == MarginSpec.combined(30.0, 1.0, 0.0, 0.2, straight_through=True)
    assert _message(lambda: MarginSpec.arcface(margin=-0.1)).startswith("margin: expected an angle in radians")
    assert _message(lambda: MarginSpec.cosface(margin=-0.1)) == "margin: expected a non-negative number, got -0.1"
    assert _message(lambda: MarginSpec.arcface(scale=0)).startswith("scale: ")      # the others keep their names


def test_accuracy_checks_its_subcenter_count():
    """accuracy divided the class rows by K unchecked: K = 0 raised ZeroDivisionError, and a K
    that does not divide the rows silently counted the wrong classes."""
    x, w, y = make_inputs(3, 5, 4)
    assert _message(lambda: MF.accuracy(x, w, y, subcenters=0)).startswith("subcenters: expected an integer >= 1")
    assert _message(lambda: MF.accuracy(x, w, y, subcenters=2)).startswith("weight: expected K*C rows")
