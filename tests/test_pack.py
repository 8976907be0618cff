"""magloss.pack: RecordIO sets and .bin pair sets from photos, checked against the independent
writers of tests/_insightface_files.py and magloss.data's readers."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from _insightface_files import MAGIC, encode, frame, image_record, rand_pixels  # noqa: E402
from magloss import pack as P  # noqa: E402
from magloss.data import RecordIODataset, VerificationBin, decode_image  # noqa: E402


def _folder(root, counts=(2, 1, 3), seed=0, size=(16, 12)):
    """root/<id>/<n>.<ext>: JPEG and PNG, grey ones too; returns {label: [(path, bytes), ...]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for label, n in enumerate(counts):
        d = os.path.join(root, f"id{label:02d}")
        os.makedirs(d)
        out[label] = []
        for i in range(n):
            fmt = ("PNG", "JPEG")[(label + i) % 2]
            data = encode(rand_pixels(rng, *size, grey=(i == 2)), fmt)
            p = os.path.join(d, f"{i}.{'png' if fmt == 'PNG' else 'jpg'}")
            with open(p, "wb") as f:
                f.write(data)
            out[label].append((p, data))
    return out


def _expected_rec(images_by_label):
    """train.rec and train.idx as face2rec2.py lays them out, built with the tests' own writer."""
    records, bounds, key = [], [], 1
    for label in sorted(images_by_label):
        first = key
        for _, data in images_by_label[label]:
            records.append((key, image_record(label, data, rec_id=key)))
            key += 1
        bounds.append((first, key))
    n, k = key - 1, len(bounds)
    records.append((0, image_record([float(n + 1), float(n + 1 + k)], b"", rec_id=0)))
    for j, (a, b) in enumerate(bounds):
        records.append((n + 1 + j, image_record([float(a), float(b)], b"", rec_id=n + 1 + j)))
    blob, idx = b"", ""
    for key, payload in records:
        idx += f"{key}\t{len(blob)}\n"
        blob += frame(payload)
    return blob, idx


def _read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


@pytest.mark.parametrize("workers", [1, 2])
def test_folder_packs_byte_exact_as_face2rec2(tmp_path, workers):
    imgs = _folder(str(tmp_path / "photos"))
    r = P.pack(str(tmp_path / "photos"), str(tmp_path / "out"), workers=workers)
    assert (r["images"], r["classes"], r["size"], r["skipped"]) == (6, 3, (16, 12), [])
    blob, idx = _expected_rec(imgs)
    assert _read(tmp_path / "out" / "train.rec") == blob
    assert _read(tmp_path / "out" / "train.idx", "r") == idx
    assert _read(tmp_path / "out" / "property", "r") == "3,16,12"
    assert sorted(os.listdir(tmp_path / "out")) == ["property", "train.idx", "train.rec"]  # no temporary left


def test_round_trip_through_magloss_reader(tmp_path):
    imgs = _folder(str(tmp_path / "photos"), counts=(1, 4, 2), seed=3)
    P.pack(str(tmp_path / "photos"), str(tmp_path / "out"))
    ds = RecordIODataset(str(tmp_path / "out"))
    assert ds.header == (8, 11) and ds.num_classes == 3 and ds.image_size == (16, 12) and len(ds) == 7
    flat = [(lab, data) for lab in sorted(imgs) for _, data in imgs[lab]]
    for i, (lab, data) in enumerate(flat):
        x, y = ds[i]
        assert int(y) == lab
        assert torch.equal(x, decode_image(data))
        assert ds.read_record(i + 1)[4] == data  # original bytes kept
    for j, (a, b) in enumerate([(1, 2), (2, 6), (6, 8)]):  # identity records
        flag, labels, _, _, img = ds.read_record(8 + j)
        assert flag == 2 and labels.tolist() == [a, b] and img == b""


def test_writer_splits_at_aligned_magic_like_dmlc(tmp_path):
    payloads = [b"ab" + MAGIC + b"cd", b"abcd" + MAGIC + b"efgh" + MAGIC, MAGIC + b"x", b"abcd" + MAGIC + MAGIC + b"z", b"xyz"]
    with P.RecordWriter(str(tmp_path / "a.rec"), str(tmp_path / "a.idx")) as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    assert _read(tmp_path / "a.rec") == b"".join(frame(p) for p in payloads)
    ds = RecordIODataset.__new__(RecordIODataset)  # read_raw alone, no header logic
    ds.rec_path, ds.idx_path, ds._fh, ds._pid = str(tmp_path / "a.rec"), str(tmp_path / "a.idx"), None, None
    keys, ds._offsets = RecordIODataset._read_index(ds.idx_path)
    ds._first_key, ds._sorted_keys = 0, None
    assert [ds.read_raw(k) for k in range(len(payloads))] == payloads


def test_list_file_groups_by_label_and_keeps_file_order(tmp_path):
    imgs = _folder(str(tmp_path / "photos"), counts=(2, 2), seed=5)
    (a0, d0), (a1, d1) = imgs[0]
    (b0, e0), (b1, e1) = imgs[1]
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    (tmp_path / "list.txt").write_text(f"{rel(b1)}\t0\n# comment\n{rel(a1)}\t1\n\n{rel(a0)} 0\n{rel(b0)}\t1\n")
    P.pack(str(tmp_path / "list.txt"), str(tmp_path / "out"))
    blob, _ = _expected_rec({0: [(b1, e1), (a0, d0)], 1: [(a1, d1), (b0, e0)]})
    assert _read(tmp_path / "out" / "train.rec") == blob


@pytest.mark.parametrize("text, needle", [
    ("a.jpg\t0\nb.jpg\t2\n", "label 1 has no image"),
    ("a.jpg\tx\n", "line 1"),
    ("a.jpg\n", "line 1"),
    ("a.jpg\t-1\n", "line 1"),
    ("", "no image"),
])
def test_bad_list_file_names_it(tmp_path, text, needle):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(P.PackError, match=needle):
        P.pack(str(tmp_path / "l.txt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unreadable_image_named_and_skip_bad_lists_it(tmp_path):
    imgs = _folder(str(tmp_path / "photos"), counts=(2, 2))
    bad = os.path.join(str(tmp_path / "photos"), "id01", "9.jpg")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(P.PackError, match=r"9\.jpg.*--skip-bad"):
        P.pack(str(tmp_path / "photos"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "train.rec").exists()
    r = P.pack(str(tmp_path / "photos"), str(tmp_path / "out"), skip_bad=True, workers=2)
    assert len(r["skipped"]) == 1 and r["skipped"][0].startswith(bad)
    assert _read(tmp_path / "out" / "train.rec") == _expected_rec(imgs)[0]


def test_identity_left_empty_is_an_error(tmp_path):
    _folder(str(tmp_path / "photos"), counts=(1, 1))
    with open(os.path.join(str(tmp_path / "photos"), "id01", "0.jpg"), "wb") as f:
        f.write(b"broken")
    with pytest.raises(P.PackError, match="'id01' has no readable image"):
        P.pack(str(tmp_path / "photos"), str(tmp_path / "out"), skip_bad=True)


def test_resize_reencodes_at_the_size(tmp_path):
    _folder(str(tmp_path / "photos"), counts=(1, 1), size=(20, 30))
    r = P.pack(str(tmp_path / "photos"), str(tmp_path / "out"), resize=(16, 32), encoding="png")
    ds = RecordIODataset(str(tmp_path / "out"))
    assert r["size"] == (16, 32) and ds.image_size == (16, 32)
    assert ds[0][0].shape == (3, 16, 32) and ds.read_record(1)[4][:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- alignment
def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(1)
    for _ in range(5):
        th, s, t = rng.uniform(-3, 3), rng.uniform(0.2, 5), rng.normal(size=2) * 30
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        src = rng.normal(size=(5, 2)) * 20
        m = P.similarity_transform(src, s * src @ rot.T + t)
        np.testing.assert_allclose(m, np.hstack([s * rot, t[:, None]]), atol=1e-9)


def test_similarity_transform_least_squares_optimum():
    """Perturbing the fitted parameters never lowers the squared error (noisy points)."""
    rng = np.random.default_rng(2)
    src = rng.normal(size=(5, 2)) * 10
    dst = src @ np.array([[0.8, -0.6], [0.6, 0.8]]).T * 1.5 + rng.normal(size=(5, 2))
    m = P.similarity_transform(src, dst)
    a, b = m[0, 0], m[1, 0]  # [[a, -b], [b, a]]
    assert abs(m[0, 1] + b) < 1e-12 and abs(m[1, 1] - a) < 1e-12

    def err(a, b, tx, ty):
        pred = src @ np.array([[a, -b], [b, a]]).T + [tx, ty]
        return ((pred - dst) ** 2).sum()
    best = err(a, b, m[0, 2], m[1, 2])
    for d in np.eye(4) * 1e-4:
        assert err(a + d[0], b + d[1], m[0, 2] + d[2], m[1, 2] + d[3]) > best
        assert err(a - d[0], b - d[1], m[0, 2] - d[2], m[1, 2] - d[3]) > best


def test_similarity_transform_of_mirrored_points_stays_a_rotation():
    """Mirrored landmarks: the best orthogonal map is a reflection; Umeyama's sign correction keeps
    a rotation (det > 0), the least-squares optimum among similarities."""
    rng = np.random.default_rng(3)
    src = rng.normal(size=(5, 2)) * 10
    dst = src * [-1.0, 1.0] + rng.normal(size=(5, 2)) * 0.1
    m = P.similarity_transform(src, dst)
    a, b = m[0, 0], m[1, 0]
    assert abs(m[0, 1] + b) < 1e-12 and abs(m[1, 1] - a) < 1e-12 and a * a + b * b > 0

    def err(a, b, tx, ty):
        return ((src @ np.array([[a, -b], [b, a]]).T + [tx, ty] - dst) ** 2).sum()
    best = err(a, b, m[0, 2], m[1, 2])
    for d in np.vstack([np.eye(4), -np.eye(4)]) * 1e-4:
        assert err(a + d[0], b + d[1], m[0, 2] + d[2], m[1, 2] + d[3]) > best


def _bilinear(img, x, y):
    """Bilinear sample of img [H, W, 3] at pixel-index coordinates, zeros outside (float64)."""
    h, w = img.shape[:2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = np.zeros(x.shape + (3,))
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - np.abs(x - xi)) * (1 - np.abs(y - yi))
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            out[ok] += wgt[ok, None] * img[yi[ok], xi[ok]]
    return out


def test_alignment_samples_where_the_inverse_transform_points():
    """Scaled and rotated landmarks: each output pixel is the bilinear sample of the source at
    M⁻¹(x, y) (pixel-index coordinates, as OpenCV's warpAffine), computed here independently."""
    rng = np.random.default_rng(7)
    src_img = rng.integers(0, 256, (200, 220, 3), dtype=np.uint8)
    th = np.deg2rad(12.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    lm = P.ARCFACE_LANDMARKS @ rot.T * 1.6 + [30, 20]
    out = np.asarray(P.align_face(Image.fromarray(src_img), lm)).astype(float)
    inv = np.linalg.inv(np.vstack([P.similarity_transform(lm, P.ARCFACE_LANDMARKS), [0, 0, 1]]))
    ys, xs = np.mgrid[0:112, 0:112].astype(float)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    inside = (sx >= 1) & (sx <= 218) & (sy >= 1) & (sy <= 198)
    want = _bilinear(src_img.astype(float), sx, sy)
    assert inside.mean() > 0.9
    assert np.abs(out - want)[inside].max() <= 2  # Pillow's fixed-point bilinear rounding


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.ones((4, 3)), np.full((5, 2), np.nan)])
def test_similarity_transform_rejects_degenerate_points(bad):
    with pytest.raises(ValueError, match="landmarks"):
        P.similarity_transform(bad, P.ARCFACE_LANDMARKS[: len(bad)] if bad.shape[1] == 2 else bad)


def test_alignment_of_a_shifted_face_is_the_crop(tmp_path):
    """Landmarks at reference + (dx, dy): the aligned face is the 112×112 crop at (dx, dy)."""
    rng = np.random.default_rng(4)
    big = rand_pixels(rng, 130, 140)
    os.makedirs(tmp_path / "p" / "a")
    Image.fromarray(big).save(tmp_path / "p" / "a" / "x.png")
    lm = P.ARCFACE_LANDMARKS + [9, 6]
    (tmp_path / "lm.txt").write_text("a/x.png " + " ".join(f"{v:.4f}" for v in lm.ravel()) + "\n")
    P.pack(str(tmp_path / "p"), str(tmp_path / "out"), landmarks=str(tmp_path / "lm.txt"), encoding="png")
    x = RecordIODataset(str(tmp_path / "out"))[0][0].permute(1, 2, 0).numpy().astype(int)
    assert x.shape == (112, 112, 3)
    assert np.abs(x - big[6:118, 9:121]).max() <= 1  # bilinear at points within 1e-4 of the pixels


def test_alignment_needs_landmarks_for_every_image(tmp_path):
    _folder(str(tmp_path / "p"), counts=(2, 1))
    pts = " ".join(f"{v}" for v in P.ARCFACE_LANDMARKS.ravel() / 8)
    (tmp_path / "lm.txt").write_text(f"id00/0.png {pts}\nid01/0.jpg\t{pts}\n")  # id00/1.jpg has none
    with pytest.raises(P.PackError, match="no landmarks"):
        P.pack(str(tmp_path / "p"), str(tmp_path / "out"), landmarks=str(tmp_path / "lm.txt"))
    r = P.pack(str(tmp_path / "p"), str(tmp_path / "out"), landmarks=str(tmp_path / "lm.txt"), skip_bad=True)
    assert r["images"] == 2 and r["size"] == (112, 112) and "1.jpg: no landmarks" in r["skipped"][0]
    with pytest.raises(P.PackError, match="resize: alignment .* square faces; got 112x96"):
        P.pack(str(tmp_path / "p"), str(tmp_path / "out"), landmarks=str(tmp_path / "lm.txt"), resize=(112, 96))
    (tmp_path / "lm.txt").write_text("id00/0.png 1 2 3\n")
    with pytest.raises(P.PackError, match="lm.txt: line 1"):
        P.pack(str(tmp_path / "p"), str(tmp_path / "out"), landmarks=str(tmp_path / "lm.txt"))


# ------------------------------------------------------------------------------ .bin
def _lfw(root, rng):
    files = {}
    for name, n in (("Ann_Lee", 2), ("Bo", 1), ("Cy_Di", 3)):
        os.makedirs(os.path.join(root, name))
        for i in range(1, n + 1):
            data = encode(rand_pixels(rng, 8, 8), "PNG")
            p = os.path.join(root, name, f"{name}_{i:04d}.jpg")
            with open(p, "wb") as f:
                f.write(data)
            files[(name, i)] = data
    return files


def test_bin_from_lfw_pairs(tmp_path):
    files = _lfw(str(tmp_path / "lfw"), np.random.default_rng(0))
    (tmp_path / "pairs.txt").write_text("1\t3\nAnn_Lee\t1\t2\nBo\t1\tCy_Di\t3\nCy_Di\t3\t1\n")
    r = P.build_bin(str(tmp_path / "pairs.txt"), str(tmp_path / "lfw"), str(tmp_path / "t.bin"), workers=2)
    assert r == {"pairs": 3, "genuine": 2}
    images, issame = pickle.loads(_read(tmp_path / "t.bin"))
    want = [("Ann_Lee", 1), ("Ann_Lee", 2), ("Bo", 1), ("Cy_Di", 3), ("Cy_Di", 3), ("Cy_Di", 1)]
    assert images == [files[k] for k in want] and issame == [True, False, True]
    vb = VerificationBin(str(tmp_path / "t.bin"), dtype=torch.uint8)
    assert vb.issame.tolist() == [True, False, True]
    assert torch.equal(vb[1][1], decode_image(files[("Cy_Di", 3)]))


def test_bin_missing_image_and_bad_line_are_named(tmp_path):
    _lfw(str(tmp_path / "lfw"), np.random.default_rng(0))
    (tmp_path / "pairs.txt").write_text("Bo\t1\t2\n")
    with pytest.raises(P.PackError, match="Bo_0002.jpg"):
        P.build_bin(str(tmp_path / "pairs.txt"), str(tmp_path / "lfw"), str(tmp_path / "t.bin"))
    assert not (tmp_path / "t.bin").exists()
    (tmp_path / "pairs.txt").write_text("Bo\t1\n")
    with pytest.raises(P.PackError, match="pairs.txt: line 1"):
        P.build_bin(str(tmp_path / "pairs.txt"), str(tmp_path / "lfw"), str(tmp_path / "t.bin"))


def test_cli_packs_and_reports_errors(tmp_path):
    _folder(str(tmp_path / "photos"), counts=(1, 2))
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "magloss.pack", "--no-progress", "--workers", "1"]
    ok = subprocess.run(cmd + [str(tmp_path / "photos"), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "3 images, 2 identities" in ok.stdout
    bad = subprocess.run(cmd + [str(tmp_path / "nothing"), str(tmp_path / "o2")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "neither a folder nor a list file" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------- MXNet's own reader (optional, skipped without it)
def _mxnet_python():
    """A Python that imports mxnet: $MAGLOSS_MXNET_PYTHON (e.g. a separate venv with mxnet 1.9.1 and
    numpy 1.23), else this one; None when neither does."""
    for exe in filter(None, (os.environ.get("MAGLOSS_MXNET_PYTHON"), sys.executable)):
        try:
            if subprocess.run([exe, "-c", "import mxnet"], capture_output=True, timeout=120).returncode == 0:
                return exe
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


_MX_READ = """
import hashlib, json, sys
import mxnet as mx
rec = mx.recordio.MXIndexedRecordIO(sys.argv[1] + '/train.idx', sys.argv[1] + '/train.rec', 'r')
out = []
for key in rec.keys:
    h, img = mx.recordio.unpack(rec.read_idx(key))
    label = [float(v) for v in h.label] if h.flag > 0 else [float(h.label)]
    out.append([int(key), int(h.flag), label, int(h.id), int(h.id2), hashlib.sha256(img).hexdigest()])
print(json.dumps(out))
"""


def test_mxnet_reads_the_packed_set(tmp_path):
    import hashlib
    import json

    from PIL import PngImagePlugin

    exe = _mxnet_python()
    if exe is None:
        pytest.skip("mxnet not importable (set MAGLOSS_MXNET_PYTHON to a Python with mxnet 1.9.1)")
    imgs = _folder(str(tmp_path / "photos"), counts=(2, 3))
    # a PNG whose bytes hold the RecordIO magic at every offset mod 4: one copy is 4-aligned in the
    # payload, so that record is split into continuation parts MXNet must join
    info = PngImagePlugin.PngInfo()
    m = MAGIC.decode("latin-1")
    info.add_text("note", m + "a" + m + "bb" + m + "ccc" + m)
    path = os.path.join(str(tmp_path / "photos"), "id00", "2.png")
    Image.fromarray(rand_pixels(np.random.default_rng(9), 16, 12)).save(path, pnginfo=info)
    data = _read(path)
    imgs[0].append((path, data))
    P.pack(str(tmp_path / "photos"), str(tmp_path / "out"))
    words = np.frombuffer(_read(tmp_path / "out" / "train.rec"), dtype="<u4")
    assert np.count_nonzero(words == 0xCED7230A) == 6 + 1 + 2 + 1  # 9 records, one of them in two parts
    run = subprocess.run([exe, "-c", _MX_READ, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    flat = [(lab, d) for lab in sorted(imgs) for _, d in imgs[lab]]
    n, k = len(flat), len(imgs)
    want = [[i + 1, 0, [float(lab)], i + 1, 0, hashlib.sha256(d).hexdigest()] for i, (lab, d) in enumerate(flat)]
    empty = hashlib.sha256(b"").hexdigest()
    want.append([0, 2, [n + 1.0, n + 1.0 + k], 0, 0, empty])
    want += [[n + 1, 2, [1.0, 4.0], n + 1, 0, empty], [n + 2, 2, [4.0, 7.0], n + 2, 0, empty]]
    assert got == want
