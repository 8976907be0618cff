"""magloss.backbones: the iresnet layout, counted from its description; sizes; errors."""

import pytest
import torch

from magloss.backbones import ARCHITECTURES, IResNet, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def expected_parameters(depths, widths, D, h, w):
    """Parameters of the layout in the module docstring, counted by hand (BN: weight + bias,
    PReLU: one slope per channel, convolutions without bias)."""
    n = 3 * 9 * widths[0] + 2 * widths[0] + widths[0]                 # stem conv, BN, PReLU
    c_in = widths[0]
    for blocks, c in zip(depths, widths):
        for b in range(blocks):
            n += 2 * c_in + 9 * c_in * c + 2 * c + c + 9 * c * c + 2 * c  # BN conv BN PReLU conv BN
            if b == 0:                                                   # stride 2: projection shortcut
                n += c_in * c + 2 * c
            c_in = c
    return n + 2 * c_in + (c_in * (h // 16) * (w // 16) + 1) * D + 2 * D   # BN2d, FC, BatchNorm1d


@pytest.mark.parametrize("name, D, size", [("tiny", 32, (16, 16)), ("tiny", 7, (32, 48)), ("r18", 512, (112, 112)),
                                           ("r50", 512, (112, 112)), ("r34", 128, (64, 96))])
def test_layout_and_shapes(name, D, size):
    model = build_backbone(name, D, size)
    depths, widths = ARCHITECTURES[name]
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(depths, widths, D, *size)
    assert not model.features.weight.requires_grad and torch.equal(model.features.weight, torch.ones(D))
    if name == "tiny":                                      # forward passes: the small ones only
        model.train()
        x = torch.randn(3, 3, *size)
        assert model(x).shape == (3, D)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.float32          # the FC layer and the last BN stay float32


def test_depths_are_insightfaces():
    assert {k: v[0] for k, v in ARCHITECTURES.items() if k != "tiny"} == {
        "r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6)}


@pytest.mark.parametrize("make, pattern", [
    (lambda: build_backbone("r77"), r"network: unknown backbone 'r77'; known: tiny, r18, r34, r50, r100, r200"),
    (lambda: build_backbone("tiny", 8, (100, 112)), r"input_size: expected .* multiples of 16.*got 100x112"),
    (lambda: build_backbone("tiny", 8, (16, 16), dropout=1.0), r"dropout: expected a probability in \[0, 1\)"),
    (lambda: IResNet((1, 1, 1), (8, 8, 8, 8)), r"depths, widths: expected 4 positive ints each"),
    (lambda: build_backbone("tiny", 8, (16, 16))(torch.zeros(2, 3, 32, 32)),
     r"x: expected \[B, 3, 16, 16\] images \(the backbone's input_size\), got \(2, 3, 32, 32\)"),
])
def test_errors(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()
