"""Loading MagFace's class matrix from the MagFace trainer's checkpoint (its layout
re-implemented here: a DataParallel SoftmaxBuilder with an iresnet and a MagLinear head)."""

import pytest
import torch

import magloss


def magface_trainer_checkpoint(D, C, backbone_out=None):
    """The layout of the MagFace trainer's checkpoint: a DataParallel SoftmaxBuilder with an
    iresnet (its own ``fc``: [D, 512·7·7]) and a MagLinear head ([D, C])."""
    g = torch.Generator().manual_seed(0)
    state = {
        "module.features.conv1.weight": torch.randn(64, 3, 3, 3, generator=g),
        "module.features.fc.weight": torch.randn(D, backbone_out or 64 * 7 * 7, generator=g),
        "module.features.fc.bias": torch.randn(D, generator=g),
        "module.features.features.weight": torch.randn(D, generator=g),
        "module.fc.weight": torch.randn(D, C, generator=g),
    }
    return {"epoch": 25, "arch": "iresnet100", "state_dict": state, "optimizer": {"state": {}}}


def test_load_magface_weight_from_a_trainer_checkpoint():
    ck = magface_trainer_checkpoint(16, 37)
    crit = magloss.MagFaceLoss(16, 37)
    magloss.load_magface_weight(crit, ck)
    torch.testing.assert_close(crit.weight.detach(), ck["state_dict"]["module.fc.weight"].t())


def test_load_magface_weight_asks_for_key_only_when_ambiguous():
    ck = magface_trainer_checkpoint(16, 16, backbone_out=16)   # both fc layers [16, 16]
    crit = magloss.MagFaceLoss(16, 16)
    with pytest.raises(ValueError, match=r"key: several entries.*module.features.fc.weight.*module.fc.weight"):
        magloss.load_magface_weight(crit, ck)
    magloss.load_magface_weight(crit, ck, key="module.fc.weight")
    torch.testing.assert_close(crit.weight.detach(), ck["state_dict"]["module.fc.weight"].t())
    with pytest.raises(ValueError, match=r"no entry of shape \[D, C\] = \[16, 40\]"):
        magloss.load_magface_weight(magloss.MagFaceLoss(16, 40), ck)
