"""The loss registry (magloss.registry): complete, and what every command reads."""

import pytest
import torch
from torch import nn

import magloss
from magloss import registry
from magloss.margins import MarginSpec

import cases


def _public_loss_classes():
    return {getattr(magloss, n) for n in magloss.__all__
            if isinstance(getattr(magloss, n), type) and issubclass(getattr(magloss, n), nn.Module)
            and n.endswith("Loss") and n != "MarginLoss"}


def test_every_public_loss_is_registered_once():
    classes = list(registry.LOSSES.values())
    assert len(classes) == len(set(classes))
    assert set(classes) == _public_loss_classes()


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_sharded_twin_is_the_one_shard_builds(name):
    twin = registry.sharded(name)
    if name == "softmax":
        assert twin is None
        return
    assert twin is registry.sharded(registry.LOSSES[name])
    assert twin.__name__ == "Sharded" + registry.LOSSES[name].__name__


def test_the_training_command_and_the_example_read_the_registry():
    import importlib.util
    import os

    from magloss import train
    assert train.LOSSES is registry.LOSSES
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_sharded.py")
    spec = importlib.util.spec_from_file_location("train_sharded_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert set(example.LOSSES) == {n for n in registry.LOSSES if n != "softmax"}


def test_unknown_names_are_errors_naming_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'arcfce'.*arcface"):
        registry.loss_class("arcfce")
    with pytest.raises(TypeError, match="sharded: expected a loss name"):
        registry.sharded(torch.zeros(1))


# -- the test tables (tests/cases.py) cover every registered loss ------------------------------------------
def test_every_loss_has_its_functional_form_in_the_cases():
    assert list(cases.FUNCTIONAL) == list(registry.LOSSES)


@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_every_loss_with_a_margin_is_a_family_or_a_feature_row(name):
    """A loss with a margin spec must be the loss of a FAMILIES or FEATURES row, so that the op-level
    tables (reference, chunked, fused engine, NaN, margins) cover it; one without is in NO_SPEC."""
    rows = [f for f in cases.FAMILIES.values() if f.loss == name]
    rows += [f.family for f in cases.FEATURES.values() if f.family.loss == name]
    has_spec = isinstance(getattr(registry.LOSSES[name](4, 3), "spec", None), MarginSpec)
    assert (name not in cases.NO_SPEC) == has_spec
    assert bool(rows) == has_spec, f"{name}: add a FAMILIES or FEATURES row to tests/cases.py"


def test_every_sharded_loss_has_a_distributed_case():
    """The spawned suites keep their own case tables (world sizes, splits, label patterns): every
    registered loss with a class-sharded twin has a case in one of them."""
    import test_distributed
    import test_distributed_adaptive
    import test_one_vs_all_distributed

    covered = {c[1] for c in test_distributed.CASES} | {c[1] for c in test_distributed_adaptive.CASES} \
        | {c[1] for c in test_one_vs_all_distributed.CASES}
    assert covered == {registry.LOSSES[n].__name__ for n in registry.LOSSES if registry.sharded(n) is not None}
