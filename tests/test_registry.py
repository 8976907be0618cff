"""The loss registry (magloss.registry): complete, and what every command reads."""

import pytest
import torch
from torch import nn

import magloss
from magloss import registry


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
