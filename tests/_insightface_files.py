"""Independent writers of insightface's files, for the tests (never the reader's own code).

Coded from the format descriptions: MXNet ``recordio.py`` / dmlc-core ``recordio.cc`` (the
framing, the image record header), insightface's header record, ``property``, and Python 2
pickle opcodes for the ``.bin`` verification sets. Used by tests/test_data.py (the
readers) and tests/test_train.py (the training command).
"""

import io
import os
import struct

import numpy as np
from PIL import Image as PIL_Image

MAGIC = (0xCED7230A).to_bytes(4, "little")
MAGIC_FLOAT = struct.unpack("<f", MAGIC)[0]  # a label value whose bytes are the magic word


# ---------------------------------------------------------------- independent writers
def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    PIL_Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def rand_pixels(rng, h, w, grey=False):
    return rng.integers(0, 256, size=(h, w) if grey else (h, w, 3), dtype=np.uint8)


def image_record(label, image: bytes, rec_id=0) -> bytes:
    """IRHeader 'IfQQ' (flag, label, id, id2), a vector label after it when flag > 0, the image."""
    if isinstance(label, (list, tuple)):
        head = struct.pack("<IfQQ", len(label), 0.0, rec_id, 0)
        return head + b"".join(struct.pack("<f", v) for v in label) + image
    return struct.pack("<IfQQ", 0, float(label), rec_id, 0) + image


def frame(payload: bytes, corrupt_first_cflag=None) -> bytes:
    """dmlc RecordIO framing: split at every 4-aligned magic word, cflag 0 / 1,2..,3, pad to 4."""
    parts, start = [], 0
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i:i + 4] == MAGIC:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    out = b""
    for j, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if j == 0 else 3 if j == len(parts) - 1 else 2
        if j == 0 and corrupt_first_cflag is not None:
            cflag = corrupt_first_cflag
        out += MAGIC + ((cflag << 29) | len(part)).to_bytes(4, "little") + part + b"\0" * (-len(part) % 4)
    return out


def write_recordio(folder, records, prop=None, idx_order=None, skip_keys=()):
    """records: list of (key, payload). Writes train.rec, train.idx (key<TAB>offset), property."""
    os.makedirs(folder, exist_ok=True)
    offsets, blob = {}, b""
    for key, payload in records:
        offsets[key] = len(blob)
        blob += frame(payload)
    with open(os.path.join(folder, "train.rec"), "wb") as f:
        f.write(blob)
    keys = idx_order if idx_order is not None else [k for k, _ in records]
    with open(os.path.join(folder, "train.idx"), "w") as f:
        for k in keys:
            if k not in skip_keys:
                f.write(f"{k}\t{offsets[k]}\n")
    if prop is not None:
        with open(os.path.join(folder, "property"), "w") as f:
            f.write(",".join(str(v) for v in prop))
    return offsets


def py2_pickle(images, issame) -> bytes:
    """(list of str, list of bool) as Python 2's cPickle protocol 2 writes it (opcodes by hand)."""
    out = b"\x80\x02]("  # PROTO 2, EMPTY_LIST, MARK
    for b in images:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b
    out += b"e]("  # APPENDS, EMPTY_LIST, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    return out + b"e\x86."  # APPENDS, TUPLE2, STOP
