"""Smoke test of the demo (a few steps on tiny data) and checks of its data helpers."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("scipy")

from magloss import _demo_data as dd  # noqa: E402
from magloss import demo  # noqa: E402

PLOTS = ["loss_curves.png", "magnitude_vs_degradation.png", "error_vs_reject.png", "roc.png"]
FAST = ["--steps", "3", "--batch-size", "32", "--width", "4", "--embedding-size", "16", "--pairs", "200",
        "--levels", "3", "--no-progress"]


def _check_outputs(out, report, names):
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["seed"] == report["seed"]
    assert list(on_disk["results"]) == names
    for name in names:
        r = on_disk["results"][name]
        assert 0.0 <= r["verification"]["accuracy_mean"] <= 1.0
        for kind in dd.DEGRADATIONS:
            assert len(r["magnitude_vs_degradation"][kind]["mean_magnitude"]) == len(on_disk["degradation_severities"])
        assert len(r["training"]) and r["training"]["steps"] == 3
    for key in ("command", "versions", "elapsed_seconds", "verdict", "dataset"):
        assert key in on_disk
    for p in PLOTS:
        path = os.path.join(out, p)
        assert os.path.getsize(path) > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, names", [([], ["magface", "arcface"]), (["--no-arcface", "--no-cluster"], ["magface"])])
def test_demo_smoke_digits(tmp_path, extra, names, capsys):
    out = str(tmp_path / "out")
    report = demo.main(FAST + ["--out", out] + extra)
    _check_outputs(out, report, names)
    printed = capsys.readouterr().out
    assert "open-set verif. acc" in printed and "report.json" in printed


def test_demo_smoke_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for ident in range(6):
        d = root / f"person_{ident}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, (20, 20, 3))
        for k in range(4):
            img = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{k}.png")
    (root / "not_a_dir.txt").write_text("ignored")
    out = str(tmp_path / "out")
    report = demo.main(FAST + ["--data", str(root), "--image-size", "8", "--out", out, "--holdout-classes", "2",
                               "--enroll", "1", "--no-arcface"])
    assert report["dataset"]["classes"] == 6
    assert report["dataset"]["image_shape"] == [3, 8, 8]
    assert len(report["dataset"]["held_out_classes"]) == 2
    _check_outputs(out, report, ["magface"])


def test_demo_is_deterministic(tmp_path):
    a = demo.main(FAST + ["--out", str(tmp_path / "a"), "--no-arcface", "--no-cluster"])
    b = demo.main(FAST + ["--out", str(tmp_path / "b"), "--no-arcface", "--no-cluster"])
    assert a["results"]["magface"]["magnitude_vs_degradation"] == b["results"]["magface"]["magnitude_vs_degradation"]
    assert a["results"]["magface"]["verification"] == b["results"]["magface"]["verification"]


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--holdout-classes", "9"], ["--data", "/nonexistent/dir"], ["--levels", "1"]],
)
def test_demo_bad_arguments(tmp_path, argv):
    with pytest.raises(ValueError):
        demo.main(argv + ["--out", str(tmp_path / "o"), "--no-progress"])


# ----------------------------------------------------------------------------- data helpers
def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("kind", dd.DEGRADATIONS)
def test_degrade_severity_zero_is_identity(kind):
    x = torch.rand(4, 1, 8, 8, generator=_gen())
    assert torch.equal(dd.degrade(x, kind, 0.0, _gen()), x)


def test_degrade_blur_keeps_mean_of_constant_image_and_smooths():
    const = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(dd.degrade(const, "blur", 1.0, _gen()), const)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1.0
    out = dd.degrade(spike, "blur", 0.5, _gen())
    assert out[0, 0, 4, 4] < 1.0 and out.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("severity, side", [(0.5, 3), (1.0, 6)])  # round(0.8 * s * 8): 3.2 -> 3, 6.4 -> 6
def test_degrade_occlusion_blacks_out_a_square(severity, side):
    x = torch.ones(3, 1, 8, 8)
    out = dd.degrade(x, "occlusion", severity, _gen())
    assert (out == 0).sum(dim=(1, 2, 3)).tolist() == [side * side] * 3


def test_degrade_noise_std():
    x = torch.full((2000, 1, 4, 4), 0.5)
    out = dd.degrade(x, "noise", 0.2, _gen())  # std 0.1, no clipping at 0.5 +- 5 std
    assert float((out - x).std()) == pytest.approx(0.1, rel=0.05)


def test_split_classes_disjoint_and_seeded():
    tr, he = dd.split_classes(10, 3, seed=4)
    assert len(he) == 3 and sorted(tr + he) == list(range(10))
    assert dd.split_classes(10, 3, seed=4) == (tr, he)


def test_subset_remaps_labels():
    x = torch.arange(5.0).view(5, 1, 1, 1)
    y = torch.tensor([3, 1, 3, 7, 1])
    xs, ys = dd.subset(x, y, [3, 7])
    assert xs.flatten().tolist() == [0.0, 2.0, 3.0]
    assert ys.tolist() == [0, 0, 1]
