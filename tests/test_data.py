"""magloss.data: the readers of insightface's RecordIO sets, image folders and .bin sets.

Every file is written by the independent writers of tests/_insightface_files.py, coded
from the format description (MXNet recordio.py / dmlc-core recordio.cc, insightface's
header record, Python 2 pickle opcodes), never with the reader's own code. Expected pixels: PNG is lossless (exact);
JPEG is compared with Pillow's decoding of the same bytes.
"""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

PIL_Image = pytest.importorskip("PIL.Image")

from magloss import evaluation  # noqa: E402
from magloss.data import ImageFolderDataset, RecordIODataset, VerificationBin  # noqa: E402
from _insightface_files import (MAGIC, MAGIC_FLOAT, encode, frame, image_record, py2_pickle,  # noqa: E402
                                rand_pixels, write_recordio)


def insightface_set(rng):
    """Header record 0, five image records of 3 identities (scalar and vector labels, PNG,
    grey PNG and JPEG, one record with the magic word twice inside: 3 parts), identity records."""
    imgs = {
        1: (rand_pixels(rng, 7, 5), "PNG", 0),
        2: (rand_pixels(rng, 6, 9), "PNG", [0.0, 1.5]),
        3: (rand_pixels(rng, 8, 8), "JPEG", 1),
        4: (rand_pixels(rng, 5, 4), "PNG", [2.0, MAGIC_FLOAT, MAGIC_FLOAT, 9.0]),
        5: (rand_pixels(rng, 3, 6, grey=True), "PNG", 2.0),
    }
    records = [(0, image_record([6.0, 9.0], b""))]
    expected = {}
    for key, (px, fmt, label) in imgs.items():
        data = encode(px, fmt)
        records.append((key, image_record(label, data, rec_id=100 + key)))
        expected[key] = (px, fmt, label, data)
    for ident, (a, b) in zip(range(6, 9), [(1, 3), (3, 4), (4, 6)]):
        records.append((ident, image_record([float(a), float(b)], b"")))
    return records, expected


def expected_image(px, fmt, data):
    if fmt == "JPEG":
        px = np.asarray(PIL_Image.open(io.BytesIO(data)).convert("RGB"))
    elif px.ndim == 2:
        px = np.repeat(px[:, :, None], 3, axis=2)
    return torch.from_numpy(np.array(px)).permute(2, 0, 1)


@pytest.fixture
def rec_folder(tmp_path):
    records, expected = insightface_set(np.random.default_rng(0))
    folder = str(tmp_path / "faces")
    write_recordio(folder, records, prop=(3, 112, 112))
    return folder, records, expected


# ---------------------------------------------------------------- RecordIO round trip
def test_writer_made_a_multipart_record(rec_folder):
    folder, _, _ = rec_folder
    blob = open(os.path.join(folder, "train.rec"), "rb").read()
    flags = [int.from_bytes(blob[i + 4:i + 8], "little") >> 29 for i in range(0, len(blob) - 4, 4) if blob[i:i + 4] == MAGIC]
    assert {1, 2, 3} <= set(flags)  # the continuation path is really exercised


@pytest.mark.parametrize("use_rec_path", [False, True])
def test_recordio_round_trip(rec_folder, use_rec_path):
    folder, records, expected = rec_folder
    ds = RecordIODataset(os.path.join(folder, "train.rec") if use_rec_path else folder)
    assert len(ds) == 5 and ds.header == (6, 9) and ds.num_classes == 3 and ds.image_size == (112, 112)
    assert ds.keys.tolist() == [1, 2, 3, 4, 5]
    for i, key in enumerate(range(1, 6)):
        px, fmt, label, data = expected[key]
        flag, labels, rid, rid2, img_bytes = ds.read_record(key)
        want_labels = np.asarray(label if isinstance(label, list) else [label], dtype=np.float32)
        assert flag == (len(label) if isinstance(label, list) else 0)
        assert labels.tobytes() == want_labels.tobytes()  # the magic-valued floats come back bit-exact
        assert (rid, rid2) == (100 + key, 0) and img_bytes == data
        assert ds.read_raw(key) == dict(records)[key]
        image, lab = ds[i]
        assert image.dtype == torch.uint8 and lab.dtype == torch.int64
        assert int(lab) == int(want_labels[0])
        assert torch.equal(image, expected_image(px, fmt, data))
    with pytest.raises(IndexError):
        ds[5]


def test_recordio_without_header_and_unordered_index(tmp_path):
    rng = np.random.default_rng(1)
    pxs = {k: rand_pixels(rng, 4 + k % 3, 5) for k in (0, 3, 7, 10)}
    records = [(k, image_record(k % 4, encode(px, "PNG"))) for k, px in pxs.items()]
    folder = str(tmp_path / "plain")
    write_recordio(folder, records, idx_order=[10, 0, 7, 3])  # no property file
    ds = RecordIODataset(folder, transform=lambda x: x.float() / 255)
    assert ds.header is None and ds.num_classes is None
    assert ds.keys.tolist() == [10, 0, 7, 3]
    for i, k in enumerate([10, 0, 7, 3]):
        image, lab = ds[i]
        assert int(lab) == k % 4
        assert torch.equal(image, torch.from_numpy(pxs[k]).permute(2, 0, 1).float() / 255)


def test_num_classes_argument_and_header_fallback(rec_folder):
    folder, _, _ = rec_folder
    os.remove(os.path.join(folder, "property"))
    assert RecordIODataset(folder).num_classes == 3  # identity records 6..8
    assert RecordIODataset(folder, num_classes=7).num_classes == 7
    with pytest.raises(ValueError, match="num_classes"):
        RecordIODataset(folder, num_classes=0)


def _dataloader_items(ds, workers):
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=list,
                                         multiprocessing_context="fork" if workers else None)
    return [item for batch in loader for item in batch]


def test_dataloader_workers_read_the_same(rec_folder):
    folder, _, _ = rec_folder
    ds = RecordIODataset(folder)
    ds[0]  # the parent opens its handle first: workers must not share it
    a = _dataloader_items(ds, 0)
    b = _dataloader_items(ds, 2)
    assert len(a) == len(b) == 5
    for (ia, la), (ib, lb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    clone = pickle.loads(pickle.dumps(ds))  # spawn-style workers: the handle is not pickled
    assert clone._fh is None and torch.equal(clone[3][0], ds[3][0])


# ---------------------------------------------------------------- damaged RecordIO files
def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _offsets(folder):
    with open(os.path.join(folder, "train.idx")) as f:
        return {int(k): int(o) for k, o in (line.split("\t") for line in f)}


def _truncate_inside_5(rec, off):
    with open(rec, "r+b") as f:
        f.truncate(off[5] + 20)  # inside record 5's payload


DAMAGES = [
    # (damage(rec path, offsets), sample index, message)
    (lambda rec, off: _patch(rec, off[3], b"\x00\x11\x22\x33"), 2,
     r"train\.rec: record 3: wrong magic number 0x33221100 at byte \d+ \(expected 0xced7230a\)"),
    (lambda rec, off: _patch(rec, off[2] + 4, struct.pack("<I", (1 << 29) - 1)), 1,  # a huge length word
     r"train\.rec: record 2: truncated record \(part at byte \d+ declares 536870911 bytes"),
    (lambda rec, off: _patch(rec, off[4] + 4, struct.pack("<I", 3 << 29 | 8)), 3,  # first part flagged "last"
     r"train\.rec: record 4: broken continuation: part at byte \d+ has cflag 3, expected 0 or 1"),
]


@pytest.mark.parametrize("damage,index,message", DAMAGES)
def test_damaged_record(rec_folder, damage, index, message):
    folder, _, _ = rec_folder
    damage(os.path.join(folder, "train.rec"), _offsets(folder))
    ds = RecordIODataset(folder)
    with pytest.raises(ValueError, match=message):
        ds[index]
    assert int(ds[0][1]) == 0  # the other records still read


def test_broken_continuation(tmp_path):
    folder = str(tmp_path / "broken")
    os.makedirs(folder)
    payload = image_record(0, encode(np.zeros((2, 2, 3), np.uint8), "PNG"))
    with open(os.path.join(folder, "train.rec"), "wb") as f:
        f.write(frame(payload, corrupt_first_cflag=2))  # a record may not start with a middle part
    with open(os.path.join(folder, "train.idx"), "w") as f:
        f.write("0\t0\n")
    with pytest.raises(ValueError, match=r"record 0: broken continuation.*cflag 2"):
        RecordIODataset(folder)  # key 0 is read to look for the header record


def test_label_out_of_range(rec_folder):
    folder, _, _ = rec_folder
    ds = RecordIODataset(folder, num_classes=2)
    assert int(ds[2][1]) == 1
    with pytest.raises(ValueError, match=r"train\.rec: record 4: label 2 outside \[0, 2\)"):
        ds[3]


def test_label_not_whole(tmp_path):
    folder = str(tmp_path / "frac")
    write_recordio(folder, [(0, image_record(1.5, encode(np.zeros((2, 2, 3), np.uint8), "PNG")))])
    with pytest.raises(ValueError, match=r"record 0: label 1.5 is not a whole number"):
        RecordIODataset(folder)[0]


@pytest.mark.parametrize("idx_order", [None, [8, 0, 5, 1, 7, 2, 6, 3, 4]])  # consecutive keys, then shuffled ones
def test_missing_index_entry(tmp_path, idx_order):
    records, _ = insightface_set(np.random.default_rng(0))
    folder = str(tmp_path / "holes")
    write_recordio(folder, records, prop=(3, 112, 112), idx_order=idx_order, skip_keys={3})
    with pytest.raises(ValueError, match=r"train\.idx: record 3 has no index entry"):
        RecordIODataset(folder)
    write_recordio(folder, records, prop=(3, 112, 112), idx_order=idx_order, skip_keys={2, 3, 4, 5, 6, 7, 8})
    with pytest.raises(ValueError, match=r"record 0 \(header\) lists 5 image records, the index .*train\.idx has 2"):
        RecordIODataset(folder)
    write_recordio(folder, records, prop=(3, 112, 112), idx_order=idx_order, skip_keys={8})
    ds = RecordIODataset(folder)  # an identity record is not needed to read the images
    assert [int(ds[i][1]) for i in range(5)] == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match=r"train\.idx: record 8 has no index entry"):
        ds.read_record(8)


def test_bad_index_line_and_missing_files(rec_folder, tmp_path):
    folder, _, _ = rec_folder
    with open(os.path.join(folder, "train.idx"), "a") as f:
        f.write("9 nonsense\n")
    with pytest.raises(ValueError, match=r"train\.idx: line 10"):
        RecordIODataset(folder)
    open(os.path.join(folder, "train.idx"), "w").close()
    with pytest.raises(ValueError, match=r"train\.idx: the index is empty"):
        RecordIODataset(folder)
    with pytest.raises(FileNotFoundError, match="nowhere.*neither a folder nor a .rec file"):
        RecordIODataset(str(tmp_path / "nowhere"))
    os.remove(os.path.join(folder, "train.idx"))
    with pytest.raises(FileNotFoundError, match=r"index file .*train\.idx"):
        RecordIODataset(folder)


# ---------------------------------------------------------------- image folders
def test_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    layout = {"bob/a.png": None, "alice/x/b.png": None, "alice/c.PNG": None, "carol/d.png": None}
    pixels = {}
    for rel in layout:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        pixels[rel] = rand_pixels(rng, 3 + len(rel) % 4, 5)
        p.write_bytes(encode(pixels[rel], "PNG"))
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(tmp_path))
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3
    order = ["alice/c.PNG", "alice/x/b.png", "bob/a.png", "carol/d.png"]
    assert [os.path.relpath(p, tmp_path) for p, _ in ds.samples] == order
    for i, rel in enumerate(order):
        image, lab = ds[i]
        assert int(lab) == ["alice", "bob", "carol"].index(rel.split("/")[0])
        assert torch.equal(image, torch.from_numpy(pixels[rel]).permute(2, 0, 1))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sub-folder"):
        ImageFolderDataset(str(tmp_path))
    (tmp_path / "dave").mkdir()
    with pytest.raises(FileNotFoundError, match="dave.*holds no image"):
        ImageFolderDataset(str(tmp_path))


# ---------------------------------------------------------------- .bin verification sets
def bin_set(rng, pairs=20, h=6, w=8):
    """Pair k: two images of one colour family when same, else of two; PNG."""
    issame = [bool(k % 2 == 0) for k in range(pairs)]
    base = rng.integers(0, 256, size=(pairs * 2, 3))
    pixels = []
    for k in range(pairs):
        a = np.clip(base[2 * k] + rng.integers(-10, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)
        src = base[2 * k] if issame[k] else base[2 * k + 1]
        b = np.clip(src + rng.integers(-10, 10, size=(h, w, 3)), 0, 255).astype(np.uint8)
        pixels += [a, b]
    return pixels, issame


@pytest.mark.parametrize("writer", ["python2", "python3_protocol2", "python3_numpy_flags"])
def test_bin_round_trip(tmp_path, writer):
    pixels, issame = bin_set(np.random.default_rng(3), pairs=6)
    encoded = [encode(p, "PNG") for p in pixels]
    if writer == "python2":
        blob = py2_pickle(encoded, issame)
    elif writer == "python3_protocol2":
        blob = pickle.dumps((encoded, issame), protocol=2)
    else:
        blob = pickle.dumps((encoded, np.array(issame)), protocol=4)
    path = tmp_path / "lfw.bin"
    path.write_bytes(blob)
    ds = VerificationBin(str(path), dtype=torch.uint8)
    assert len(ds) == 6 and ds.name == "lfw" and ds.issame.tolist() == issame
    for k in range(6):
        a, b, same = ds[k]
        assert same == issame[k]
        assert torch.equal(a, torch.from_numpy(pixels[2 * k]).permute(2, 0, 1))
        assert torch.equal(b, torch.from_numpy(pixels[2 * k + 1]).permute(2, 0, 1))
    f = VerificationBin(str(path))[1][0]
    want = (torch.from_numpy(pixels[2]).permute(2, 0, 1).double() - 127.5) / 127.5
    assert f.dtype == torch.float32 and torch.allclose(f.double(), want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("n_images,n_pairs,pattern", [(3, 1, r"3 images for 1 pairs.*odd"), (2, 2, r"2 images for 2 pairs")])
def test_bin_count_mismatch(tmp_path, n_images, n_pairs, pattern):
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(py2_pickle([encode(np.zeros((2, 2, 3), np.uint8), "PNG")] * n_images, [True] * n_pairs))
    with pytest.raises(ValueError, match=r"agedb_30\.bin: " + pattern):
        VerificationBin(str(path))


def test_bin_refuses_code(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((os.getcwd, [True])))  # a global: could be os.system
    with pytest.raises(ValueError, match=r"evil\.bin: not a verification .bin pickle.*refusing"):
        VerificationBin(str(path))


def test_bin_undecodable_image(tmp_path):
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(py2_pickle([encode(np.zeros((2, 2, 3), np.uint8), "PNG"), b"garbage!"], [False]))
    with pytest.raises(ValueError, match=r"cfp_fp\.bin: image 1: cannot decode"):
        VerificationBin(str(path))[0]


def _half_means(x):
    """Embedding [mean of the left half per channel, mean of the right half]: not flip-invariant."""
    w = x.shape[-1] // 2
    return torch.cat([x[..., :w].mean(dim=(2, 3)), x[..., w:].mean(dim=(2, 3))], dim=1)


@pytest.mark.parametrize("flip", [False, True])
def test_bin_evaluate(tmp_path, flip):
    pixels, issame = bin_set(np.random.default_rng(4), pairs=20)
    # give every image a left/right asymmetry so flip fusion changes the embeddings
    pixels = [np.concatenate([p[:, :4], (p[:, 4:] // 2)], axis=1) for p in pixels]
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_pickle([encode(p, "PNG") for p in pixels], issame))
    ds = VerificationBin(str(path))
    res = ds.evaluate(_half_means, flip=flip, batch_size=7)
    # expected, in float64 from the pixels: x = (p - 127.5) / 127.5, halves' channel means
    emb = []
    for p in pixels:
        x = (p.astype(np.float64) - 127.5) / 127.5
        left, right = x[:, :4].mean(axis=(0, 1)), x[:, 4:].mean(axis=(0, 1))
        e = np.concatenate([left, right])
        emb.append(e + np.concatenate([right, left]) if flip else e)
    emb = np.array(emb)
    a, b = emb[0::2], emb[1::2]
    scores = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(res["scores"].numpy(), scores, atol=1e-5, rtol=0)
    want = evaluation.kfold_verification(res["scores"], issame, n_folds=10)
    assert res["accuracy_mean"] == want["accuracy_mean"] and res["thresholds"] == want["thresholds"]
    assert len(res["fold_accuracies"]) == 10


def test_missing_pillow_names_the_extra(rec_folder, monkeypatch):
    folder, _, _ = rec_folder
    ds = RecordIODataset(folder)  # opening needs no Pillow
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # import PIL now fails
    with pytest.raises(ImportError, match=r"pip install 'magloss\[data\]'"):
        ds[0]


# ---------------------------------------------------------------- checks when the set is opened
def _cut(at):
    """Truncate the .rec ``at(offsets, size)`` bytes long."""
    def damage(folder):
        rec = os.path.join(folder, "train.rec")
        with open(rec, "r+b") as f:
            f.truncate(at(_offsets(folder), os.path.getsize(rec)))
    return damage


def _idx_offset(key, at):
    """Rewrite the .idx with record ``key``'s offset replaced by ``at(size of the .rec)``."""
    def damage(folder):
        off = _offsets(folder)
        off[key] = at(os.path.getsize(os.path.join(folder, "train.rec")))
        with open(os.path.join(folder, "train.idx"), "w") as f:
            f.writelines(f"{k}\t{o}\n" for k, o in off.items())
    return damage


def _property(*values):
    def damage(folder):
        with open(os.path.join(folder, "property"), "w") as f:
            f.write(",".join(map(str, values)))
    return damage


OPEN_DAMAGES = [
    # a .rec cut inside record 5's payload: the identity records 6..8 after it point past the end
    (_cut(lambda off, size: off[5] + 20), r"train\.rec: record 5: truncated record \(part at byte \d+ declares"),
    (_cut(lambda off, size: size - 4), r"train\.rec: record 8: truncated record"),        # the last record cut
    (_cut(lambda off, size: off[8] + 5), r"train\.rec: record 8: truncated record \(file ends inside the record "
                                         r"header"),
    # a .rec whose records are whole, an index that points past it: the index is at fault
    (_idx_offset(8, lambda size: size + 100), r"train\.idx: record 8: offset \d+ lies past the end of .*train\.rec "
                                              r"\(\d+ bytes\): this index does not belong to that file \(1 of its 9"),
    (_idx_offset(3, lambda size: size), r"train\.idx: record 3: offset \d+ lies past the end of .*train\.rec"),
    # property against the header record's identity count (records 6..8: 3 identities)
    (_property(60, 112, 112), r"property: says 60 classes, but the header record of .*train\.rec lists 3 identities "
                              r"\(records 6 \.\. 8\): correct the first number of .*property to 3"),
    (_property(2, 112, 112), r"property: says 2 classes, but the header record .* lists 3 identities"),
]


@pytest.mark.parametrize("damage, message", OPEN_DAMAGES)
def test_damage_found_when_opened(rec_folder, damage, message):
    folder, _, _ = rec_folder
    damage(folder)
    with pytest.raises(ValueError, match=message):
        RecordIODataset(folder)


def test_label_error_names_where_the_class_count_comes_from(tmp_path):
    folder = str(tmp_path / "plain")
    px = encode(np.zeros((2, 2, 3), np.uint8), "PNG")
    write_recordio(folder, [(0, image_record(0, px)), (1, image_record(3, px))], prop=(3, 2, 2))  # no header
    ds = RecordIODataset(folder)
    assert int(ds[0][1]) == 0
    with pytest.raises(ValueError, match=r"train\.rec: record 1: label 3 outside \[0, 3\) \(the class count of "
                                         r".*plain/property\)"):
        ds[1]
    with pytest.raises(ValueError, match=r"label 3 outside \[0, 2\) \(the class count of the num_classes argument\)"):
        RecordIODataset(folder, num_classes=2)[1]

# --- decode_image: every bit depth scaled to 8 bits as OpenCV's imread(IMREAD_COLOR) does ---

def _png(width, height, bit_depth, color_type, rows: bytes) -> bytes:
    """A PNG written from the specification (signature, IHDR, one zlib IDAT, IEND; filter 0 on
    every row), independent of Pillow's writer: ``rows`` are the big-endian samples."""
    import zlib

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[r * stride:(r + 1) * stride] for r in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _grey16(rng, h=5, w=7):
    v = rng.integers(0, 65536, size=(h, w), dtype=np.uint16)
    v.flat[:4] = [0, 255, 256, 65535]  # the ends of the range and the byte boundary
    return v


def test_decode_16bit_grey_png_keeps_the_high_byte():
    from magloss.data import decode_image

    v = _grey16(np.random.default_rng(30))
    data = _png(v.shape[1], v.shape[0], 16, 0, v.astype(">u2").tobytes())
    want = np.repeat((v // 256).astype(np.uint8)[None], 3, axis=0)     # v >> 8, by integer division
    assert torch.equal(decode_image(data), torch.from_numpy(want))


def test_decode_16bit_copy_of_an_8bit_image_equals_it():
    """x·257 is the 16-bit copy of the 8-bit value x (full range to full range): it decodes back to x;
    the mean of a full-range ramp stays 127.5 (clipping gave 254.5)."""
    from magloss.data import decode_image

    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    data16 = _png(16, 16, 16, 0, (x.astype(np.uint16) * 257).astype(">u2").tobytes())
    out = decode_image(data16)
    assert torch.equal(out, decode_image(encode(x, "PNG")))
    assert float(out.double().mean()) == 127.5


def test_decode_16bit_grey_and_48bit_rgb_agree():
    """Pillow reads a 48-bit RGB PNG to 8-bit RGB itself; the 16-bit grey path must give the same bytes."""
    from magloss.data import decode_image

    v = _grey16(np.random.default_rng(31))
    rgb = np.repeat(v[:, :, None], 3, axis=2).astype(">u2").tobytes()
    grey = v.astype(">u2").tobytes()
    a = decode_image(_png(v.shape[1], v.shape[0], 16, 2, rgb))
    b = decode_image(_png(v.shape[1], v.shape[0], 16, 0, grey))
    assert torch.equal(a, b)


def test_decode_16bit_tiff():
    from magloss.data import decode_image

    v = _grey16(np.random.default_rng(32))
    want = np.repeat((v // 256).astype(np.uint8)[None], 3, axis=0)
    assert torch.equal(decode_image(encode(v, "TIFF")), torch.from_numpy(want))


def test_decode_float_tiff_in_unit_range():
    from magloss.data import decode_image

    f = np.random.default_rng(33).random((4, 6)).astype(np.float32)
    f.flat[:3] = [0.0, 1.0, 0.5]
    want = np.array([round(float(t) * 255) for t in f.astype(np.float64).ravel()], dtype=np.uint8).reshape(f.shape)
    assert torch.equal(decode_image(encode(f, "TIFF")), torch.from_numpy(np.repeat(want[None], 3, axis=0)))


@pytest.mark.parametrize("bad, pattern", [
    (np.array([[0.0, 2.0]], np.float32), r"face\.tif: float pixels .* must lie in \[0, 1\].*\[0, 2\]"),
    (np.array([[0.0, np.nan]], np.float32), r"face\.tif: float pixels .*NaN"),
    (np.array([[0, 70000]], np.int32), r"face\.tif: 32-bit integer pixels .*'I'"),
])
def test_decode_refuses_pixels_without_an_8bit_scale(bad, pattern):
    from magloss.data import decode_image

    with pytest.raises(ValueError, match=pattern):
        decode_image(encode(bad, "TIFF"), "faces/face.tif")


def test_image_folder_reads_16bit_png(tmp_path):
    v = _grey16(np.random.default_rng(34))
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "a.png").write_bytes(_png(v.shape[1], v.shape[0], 16, 0, v.astype(">u2").tobytes()))
    image, _ = ImageFolderDataset(str(tmp_path))[0]
    assert torch.equal(image, torch.from_numpy(np.repeat((v // 256).astype(np.uint8)[None], 3, axis=0)))


@pytest.mark.parametrize("output, pattern", [
    (lambda e: (e, e.norm(dim=1)), r"embed_fn: expected a \[4, D\] tensor of embeddings, got a tuple of 2 outputs.*"
                                   r"lambda x: model\(x\)\[0\]"),
    (lambda e: {"emb": e}, r"embed_fn: .*got a dict of 1 outputs"),
    (lambda e: e.numpy(), r"embed_fn: expected a \[4, D\] tensor of embeddings, got a ndarray$"),
])
def test_bin_evaluate_model_returning_several_outputs(tmp_path, output, pattern):
    pixels, issame = bin_set(np.random.default_rng(35), pairs=2)
    path = tmp_path / "lfw.bin"
    path.write_bytes(py2_pickle([encode(p, "PNG") for p in pixels], issame))
    with pytest.raises(TypeError, match=pattern):
        VerificationBin(str(path)).evaluate(lambda x: output(_half_means(x)), n_folds=2)
