"""Readers for face-recognition data in the layouts insightface publishes, without MXNet.

* :class:`RecordIODataset`: a map-style Dataset over ``train.rec`` + ``train.idx`` (+
  ``property``), the MXNet RecordIO training sets (``faces_emore/`` = MS1MV2,
  ``faces_webface_112x112/``, Glint360K, ...).
* :class:`ImageFolderDataset`: ``root/<identity>/<image>``, one sub-folder per identity.
* :class:`VerificationBin`: the pickled ``.bin`` verification sets (``lfw.bin``,
  ``cfp_fp.bin``, ``agedb_30.bin``, ...) and their 10-fold evaluation
  (:meth:`VerificationBin.evaluate`, the protocol of :func:`magloss.evaluation.kfold_verification`).

Formats (written from MXNet's ``python/mxnet/recordio.py``, dmlc-core's ``recordio.cc``
and insightface's ``recognition/arcface_torch/dataset.py``):

* RecordIO framing, all words little-endian uint32: ``magic = 0xced7230a``, then
  ``lrec = cflag << 29 | length`` (upper 3 bits: continuation flag, lower 29: payload
  length in bytes), then the payload, zero-padded to a multiple of 4 bytes. The writer
  splits a record wherever the magic word occurs at a 4-byte-aligned offset of the
  data (that word is dropped): the parts carry ``cflag`` 1 (first), 2 (middle), 3
  (last), and the reader joins them with the magic word in between; ``cflag`` 0 is a
  whole record.
* ``train.idx``: text lines ``key<TAB>byte offset`` of each record in ``train.rec``.
* Image record payload: the IRHeader ``struct '<IfQQ'`` (24 bytes: ``flag`` uint32,
  ``label`` float32, ``id`` uint64, ``id2`` uint64); when ``flag > 0`` the label is
  the ``flag`` float32 values that follow the header (and the header's own label field
  is unused); then the encoded image (JPEG or PNG).
* insightface's header record, key 0, ``flag > 0``: ``label = [a, b]``; the image
  records are keys ``1 .. a-1`` and the records ``a .. b-1`` hold one identity each
  (their label: the range of image keys of that identity). Without such a header
  (key 0 with ``flag == 0``) every key of the index is an image record.
* ``property``: one line ``num_classes,height,width``.
* ``.bin``: a pickle (Python 2 in the originals) of ``(images, issame)``: a list of
  ``2·P`` encoded images and ``P`` booleans; pair ``k`` is images ``2k`` and ``2k+1``.

Images are decoded by Pillow (``pip install 'magloss[data]'``), imported when the first
image is decoded, to a uint8 tensor ``[3, H, W]`` in RGB order (grey images are
expanded to RGB, as MXNet's ``imdecode`` does by default); deeper images are scaled to 8 bits as
OpenCV's ``imread(IMREAD_COLOR)`` does (:func:`decode_image`).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .evaluation import cosine_scores, kfold_verification

__all__ = [
    "RECORDIO_MAGIC",
    "RecordIODataset",
    "ImageFolderDataset",
    "VerificationBin",
    "decode_image",
    "read_property",
]

RECORDIO_MAGIC = 0xCED7230A
#: File name endings (compared in lower case) taken as images in an image folder, here and by the demo.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_BITS = 29
_IRHEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


def _pil_image():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("decoding images needs Pillow: pip install 'magloss[data]' (or pip install pillow)") from exc
    return Image


#: Pillow modes of 16-bit samples (grey PNG, TIFF): scaled to 8 bits by keeping the high byte.
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pixels_8bit(im, where: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an opened Pillow image, every bit depth scaled to 8 bits
    as OpenCV's ``imread(IMREAD_COLOR)`` (hence MXNet's ``imdecode``) does.

    * 8-bit modes (``L``, ``P``, ``RGB``, ``RGBA``, ``CMYK``, ``1``, ...): Pillow's
      ``convert("RGB")``.
    * 16-bit samples (modes ``I;16*``, and mode ``I`` of a PNG, which older Pillow uses
      for 16-bit grey): ``v >> 8``, the high byte (OpenCV asks libpng for
      ``png_set_strip_16``; Pillow itself reads 48-bit RGB PNGs to ``RGB`` the same way).
    * float samples (mode ``F``): ``round(255 · v)`` (half to even, as OpenCV's
      ``saturate_cast``) when every value lies in ``[0, 1]``; anything else is an error.
    * 32-bit integer samples (mode ``I`` of a TIFF, ...): an error, there is no agreed
      scale to 8 bits.
    """
    mode = im.mode
    if mode in _MODES_16BIT or (mode == "I" and im.format == "PNG"):
        grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "F":
        v = np.asarray(im, dtype=np.float64)
        if v.size and not (np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0):
            raise ValueError(f"{where}: float pixels (Pillow mode 'F') must lie in [0, 1] to be scaled to 8 bits, "
                             f"got values in [{np.nanmin(v):g}, {np.nanmax(v):g}]"
                             + (" and NaN or Inf" if not np.isfinite(v).all() else ""))
        grey = np.rint(v * 255.0).astype(np.uint8)
    elif mode.startswith("I"):
        raise ValueError(f"{where}: 32-bit integer pixels (Pillow mode {mode!r}) have no standard scale to "
                         "8 bits; save the image with 8 or 16 bits per sample")
    else:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def decode_image(data: bytes, where: str = "image") -> torch.Tensor:
    """Decode an encoded image (JPEG, PNG, TIFF, ... anything Pillow reads) to 8-bit RGB.

    Images of more than 8 bits per sample are scaled to 8 bits as OpenCV's
    ``imread(IMREAD_COLOR)`` and MXNet's ``imdecode`` do: 16-bit samples keep their
    high byte (``v >> 8``), float samples in ``[0, 1]`` become ``round(255 · v)``.

    Args:
        data: the encoded bytes. where: the file and record, for the error message.

    Returns:
        uint8 tensor ``[3, H, W]``, RGB (grey and palette images converted to RGB).

    Raises:
        ValueError (naming ``where``): the bytes are not an image Pillow can decode;
        float pixels outside ``[0, 1]`` (or NaN); 32-bit integer pixels.
        ImportError: Pillow is not installed (the ``data`` extra).
    """
    Image = _pil_image()
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"{where}: cannot decode the image ({len(data)} bytes): {exc}") from None
    with im:
        a = _pixels_8bit(im, where)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def read_property(path: str) -> Tuple[int, int, int]:
    """Read insightface's ``property`` file: one line ``num_classes,height,width``.

    Returns:
        ``(num_classes, height, width)`` as ints.

    Raises:
        ValueError: not three positive integers separated by commas (names the file).
    """
    with open(path, "r") as f:
        text = f.read().strip()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"{path}: expected one line 'num_classes,height,width' of positive integers, got {text!r}")
    return values  # type: ignore[return-value]


class RecordIODataset(Dataset):
    """Map-style Dataset over an MXNet RecordIO training set (insightface's layout).

    ``dataset[i]`` is ``(image, label)``: ``image`` the decoded uint8 tensor
    ``[3, H, W]`` (RGB), passed through ``transform`` when given; ``label`` an int64
    0-d tensor. A vector label gives its first element, as insightface does. Labels
    must be whole numbers in ``[0, num_classes)``.

    Reading: the ``.idx`` offsets are parsed once into a numpy array; each record is
    read on demand by seeking to its offset (nothing else of ``train.rec`` is held in
    memory). The file handle is opened lazily and per process (re-opened when the
    process id changes, dropped when the dataset is pickled), so DataLoader workers,
    forked or spawned, each read through their own handle.

    Args:
        path: a folder holding ``train.rec``, ``train.idx`` and (optionally)
            ``property``, or the path of a ``.rec`` file (its index: the same name with
            ``.idx``; ``property`` looked up in the same folder).
        transform: callable applied to the image tensor (default None).
        num_classes: overrides the count from ``property``. Without either, the count
            of identity records in the header record is used; without that, labels
            are only checked to be ``>= 0``.

    Attributes:
        num_classes: int or None.
        image_size: ``(height, width)`` from ``property``, or None.
        header: ``(a, b)`` of the header record, or None.
        keys: int64 numpy array, the index key of each sample.

    Raises:
        FileNotFoundError: a missing ``.rec`` or ``.idx``.
        ValueError (naming the file at fault and the record key): a malformed index
        line, an image key of the header's range missing from the index, an index
        offset past the end of the .rec (names the .idx), a ``property`` class count
        other than the header record's identity count (names ``property``), wrong
        magic, truncated record, broken continuation flags, a payload shorter than its
        header, a label that is not a whole number in ``[0, num_classes)`` (names where
        the count came from), an image that does not decode. Checked when the dataset
        is opened (cheap, no full read): the index offsets, the framing of the records
        at the first and the last offset, the header record against ``property``; the
        rest when a record is read.

    Source: MXNet ``recordio.py`` (``MXIndexedRecordIO``, ``unpack``), dmlc-core
    ``recordio.cc``, insightface ``arcface_torch/dataset.py`` (``MXFaceDataset``).
    """

    def __init__(self, path: str, transform: Optional[Callable] = None, num_classes: Optional[int] = None):
        if os.path.isdir(path):
            rec = os.path.join(path, "train.rec")
        elif os.path.isfile(path):
            rec = path
        else:
            raise FileNotFoundError(f"RecordIODataset: path {path!r} is neither a folder nor a .rec file")
        folder = os.path.dirname(os.path.abspath(rec))
        idx = os.path.splitext(rec)[0] + ".idx"
        for p, what in ((rec, "record file"), (idx, "index file")):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"RecordIODataset: {what} {p!r} not found (path={path!r})")
        self.rec_path = rec
        self.idx_path = idx
        self.transform = transform
        self._fh = self._pid = None
        self._size = 0

        index_keys, self._offsets = self._read_index(idx)
        self._index_keys = index_keys
        self._first_key = int(index_keys[0])
        if _is_range(index_keys):  # the usual index: row = key - first key
            self._sorted_keys = self._sorted_rows = None
        else:
            self._sorted_rows = np.argsort(index_keys, kind="stable")
            self._sorted_keys = index_keys[self._sorted_rows]

        prop = os.path.join(folder, "property")
        self.image_size = None
        prop_classes = None
        if os.path.isfile(prop):
            prop_classes, h, w = read_property(prop)
            self.image_size = (h, w)

        self._check_framing()
        self.header = None
        if self._row(0) >= 0:
            flag, labels, _, _, _ = self.read_record(0)
            if flag > 0:
                if labels.size < 2 or not np.all(np.isfinite(labels[:2])) or labels[0] < 1 or labels[1] < labels[0]:
                    raise ValueError(f"{rec}: record 0 (header): expected label [a, b] with 1 <= a <= b, got {labels.tolist()}")
                self.header = (int(labels[0]), int(labels[1]))
        if self.header is not None:
            if self.header[0] - 1 > index_keys.size:
                raise ValueError(f"{rec}: record 0 (header) lists {self.header[0] - 1} image records, "
                                 f"the index {idx} has {index_keys.size} entries")
            self.keys = np.arange(1, self.header[0], dtype=np.int64)
            missing = self.keys[~np.isin(self.keys, index_keys)]
            if missing.size:
                raise ValueError(
                    f"{idx}: record {int(missing[0])} has no index entry (the header record of {rec} lists image "
                    f"records 1 .. {self.header[0] - 1})"
                )
        else:
            self.keys = index_keys.astype(np.int64)

        identities = self.header[1] - self.header[0] if self.header is not None else 0
        #: where the class count comes from, for the label error: the argument, property or the header
        self.num_classes_source = None
        if num_classes is not None:
            self.num_classes = int(num_classes)
            if self.num_classes <= 0:
                raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
            self.num_classes_source = "the num_classes argument"
        elif prop_classes is not None:
            if identities and prop_classes != identities:
                raise ValueError(f"{prop}: says {prop_classes} classes, but the header record of {rec} lists "
                                 f"{identities} identities (records {self.header[0]} .. {self.header[1] - 1}): "
                                 f"correct the first number of {prop} to {identities}")
            self.num_classes = prop_classes
            self.num_classes_source = prop
        elif identities:
            self.num_classes = identities
            self.num_classes_source = f"the header record of {rec}"
        else:
            self.num_classes = None

    # -- index ---------------------------------------------------------------------------
    @staticmethod
    def _read_index(idx: str) -> Tuple[np.ndarray, np.ndarray]:
        """``(keys, offsets)`` int64 arrays; numpy's C parser, the line-by-line one for the error."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an empty file: reported below
                table = np.loadtxt(idx, dtype=np.int64, delimiter="\t", comments=None, ndmin=2)
            ok = table.shape[0] > 0 and table.shape[1] == 2 and (table[:, 1] >= 0).all()
        except ValueError:
            ok = False
        if ok:
            return table[:, 0].copy(), table[:, 1].copy()
        with open(idx, "r") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                try:
                    if len(parts) != 2 or int(parts[1]) < 0:
                        raise ValueError
                    int(parts[0])
                except ValueError:
                    raise ValueError(f"{idx}: line {lineno}: expected 'key<TAB>offset' (integers), got {line.rstrip()!r}") from None
        raise ValueError(f"{idx}: the index is empty (expected lines 'key<TAB>offset')")

    def _row(self, key: int) -> int:
        """Row of ``key`` in the index, -1 when absent."""
        if self._sorted_keys is None:
            row = key - self._first_key
            return row if 0 <= row < self._offsets.size else -1
        i = int(np.searchsorted(self._sorted_keys, key))
        return int(self._sorted_rows[i]) if i < self._sorted_keys.size and self._sorted_keys[i] == key else -1

    def _past_end(self, key: int, pos: int) -> str:
        """The message of an index offset that lies outside the .rec: the index's fault."""
        return (f"{self.idx_path}: record {key}: offset {pos} lies past the end of {self.rec_path} "
                f"({self._size} bytes): this index does not belong to that file")

    def _check_framing(self) -> None:
        """Open-time check, without reading the whole file: every offset of the index lies
        inside the .rec, and the records at the smallest and the largest offset frame
        correctly (magic, continuation flags, lengths within the file). A .rec cut short
        (its last record runs past its end, or offsets past the end follow a record cut
        inside) is reported as the .rec's fault; offsets past the end of a .rec whose last
        record frames correctly as the index's."""
        self._file()
        rows = np.flatnonzero(self._offsets >= self._size)
        inside = np.flatnonzero(self._offsets < self._size)
        if inside.size:
            last = int(inside[np.argmax(self._offsets[inside])])
            self.read_raw(int(self._index_keys[last]))            # a cut inside it names the .rec
            self.read_raw(int(self._index_keys[int(inside[np.argmin(self._offsets[inside])])]))
        if rows.size:
            row = int(rows[np.argmin(self._offsets[rows])])
            raise ValueError(self._past_end(int(self._index_keys[row]), int(self._offsets[row]))
                             + f" ({rows.size} of its {self._offsets.size} entries do)")

    def _offset(self, key: int) -> int:
        row = self._row(key)
        if row < 0:
            raise ValueError(f"{self.idx_path}: record {key} has no index entry")
        return int(self._offsets[row])

    # -- file handle ---------------------------------------------------------------------
    def _file(self):
        pid = os.getpid()
        if self._fh is None or self._pid != pid:
            self._fh = open(self.rec_path, "rb")  # a forked worker gets its own handle
            self._pid = pid
            self._size = os.fstat(self._fh.fileno()).st_size
        return self._fh

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = state["_pid"] = None
        return state

    def __del__(self):
        fh = getattr(self, "_fh", None)
        if fh is not None and self._pid == os.getpid():
            fh.close()

    # -- records -------------------------------------------------------------------------
    def read_raw(self, key: int) -> bytes:
        """The payload of record ``key`` (continuation parts joined), as bytes."""
        key = int(key)
        where = f"{self.rec_path}: record {key}"
        f = self._file()
        pos = self._offset(key)
        f.seek(pos)
        parts: List[bytes] = []
        first = True
        if pos >= self._size:
            raise ValueError(self._past_end(key, pos))
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{where}: truncated record (file ends inside the record header at byte {pos})")
            magic, lrec = struct.unpack("<II", head)
            if magic != RECORDIO_MAGIC:
                raise ValueError(f"{where}: wrong magic number 0x{magic:08x} at byte {pos} (expected 0x{RECORDIO_MAGIC:08x})")
            cflag, length = lrec >> _LENGTH_BITS, lrec & ((1 << _LENGTH_BITS) - 1)
            if cflag not in ((0, 1) if first else (2, 3)):
                expected = "0 or 1 (a record's first part)" if first else "2 or 3 (a continuation part)"
                raise ValueError(f"{where}: broken continuation: part at byte {pos} has cflag {cflag}, expected {expected}")
            padded = (length + 3) & ~3
            if pos + 8 + padded > self._size:  # checked before reading: a damaged length may be huge
                raise ValueError(f"{where}: truncated record (part at byte {pos} declares {length} bytes, "
                                 f"the file holds {max(self._size - pos - 8, 0)} after its header)")
            body = f.read(padded)
            parts.append(body[:length])
            pos += 8 + padded
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)
            first = False

    def read_record(self, key: int) -> Tuple[int, np.ndarray, int, int, bytes]:
        """Record ``key`` unpacked: ``(flag, labels, id, id2, image_bytes)``.

        ``labels`` is a float32 numpy array: the header's label field (size 1) when
        ``flag == 0``, else the ``flag`` floats that follow the header.
        """
        key = int(key)
        data = self.read_raw(key)
        where = f"{self.rec_path}: record {key}"
        if len(data) < _IRHEADER.size:
            raise ValueError(f"{where}: payload of {len(data)} bytes is shorter than the {_IRHEADER.size}-byte image header")
        flag, label, id1, id2 = _IRHEADER.unpack_from(data)
        start = _IRHEADER.size
        if flag > 0:
            end = start + 4 * flag
            if len(data) < end:
                raise ValueError(f"{where}: header announces {flag} label values, the payload holds {(len(data) - start) // 4}")
            labels = np.frombuffer(data, dtype="<f4", count=flag, offset=start).astype(np.float32)
            start = end
        else:
            labels = np.array([label], dtype=np.float32)
        return int(flag), labels, int(id1), int(id2), data[start:]

    def _label(self, key: int, labels: np.ndarray) -> int:
        v = float(labels[0])
        where = f"{self.rec_path}: record {int(key)}"
        if not np.isfinite(v) or v != int(v):
            raise ValueError(f"{where}: label {v} is not a whole number")
        lab = int(v)
        if lab < 0 or (self.num_classes is not None and lab >= self.num_classes):
            bound = (f"[0, {self.num_classes}) (the class count of {self.num_classes_source})"
                     if self.num_classes is not None else ">= 0")
            raise ValueError(f"{where}: label {lab} outside {bound}")
        return lab

    def __len__(self) -> int:
        return int(self.keys.size)

    def __getitem__(self, index: int):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        key = int(self.keys[index])
        _, labels, _, _, img = self.read_record(key)
        label = self._label(key, labels)
        image = decode_image(img, f"{self.rec_path}: record {key}")
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(label, dtype=torch.int64)


def _is_range(keys: np.ndarray) -> bool:
    """True when the keys are consecutive increasing integers."""
    return bool(np.array_equal(keys, np.arange(keys[0], keys[0] + keys.size)))


class ImageFolderDataset(Dataset):
    """``root/<identity>/.../<image>``: one sub-folder per identity.

    Identity folders sorted by name get labels ``0 .. K-1`` (``classes[k]`` is the
    name of label ``k``); images are found recursively below each identity folder,
    by extension (``.png .jpg .jpeg .bmp .pgm .ppm .tif .tiff .webp``, any case),
    in sorted path order. ``dataset[i]`` is ``(image, label)``: the uint8 tensor
    ``[3, H, W]`` (RGB) through ``transform`` when given, and an int64 0-d tensor.

    Raises:
        FileNotFoundError: ``root`` is not a folder, it has no sub-folder, or an
        identity folder holds no image (named).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolderDataset: root {root!r} is not a folder")
        self.root = root
        self.transform = transform
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"ImageFolderDataset: root {root!r} has no sub-folder (one per identity expected)")
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
                dirnames.sort()
                files += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not files:
                raise FileNotFoundError(f"ImageFolderDataset: identity folder {os.path.join(root, name)!r} holds no image")
            self.samples += [(p, label) for p in sorted(files)]
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with open(path, "rb") as f:
            image = decode_image(f.read(), path)
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(label, dtype=torch.int64)


class _BinUnpickler(pickle.Unpickler):
    """Only plain containers, bytes, bools and numpy arrays: a .bin cannot run code."""

    _ALLOWED = {
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a .bin holds only images and flags)")


def _embedding(e, batch: int) -> torch.Tensor:
    """The output of ``embed_fn`` when it is one tensor; a TypeError naming ``embed_fn`` otherwise."""
    if isinstance(e, torch.Tensor):
        return e
    hint = ""
    if isinstance(e, (tuple, list, dict)):
        hint = (f" of {len(e)} outputs; pass a callable that returns the embeddings alone, e.g. "
                "lambda x: model(x)[0] when the first output is the embedding")
    raise TypeError(f"embed_fn: expected a [{batch}, D] tensor of embeddings, got a {type(e).__name__}{hint}")


class VerificationBin(Dataset):
    """An insightface ``.bin`` verification set (``lfw.bin``, ``cfp_fp.bin``, ...).

    The pickle ``(images, issame)`` is loaded with ``encoding="bytes"`` (the originals
    were written by Python 2) through an unpickler that accepts only containers,
    bytes, bools and numpy arrays (a ``.bin`` cannot execute code). The encoded images
    stay encoded in memory (a few tens of MB for LFW) and are decoded per pair.

    ``dataset[k]`` is ``(image_a, image_b, issame)``: two ``[3, H, W]`` tensors
    (pair ``k`` = images ``2k`` and ``2k+1``) and a bool. With ``dtype=torch.uint8``
    the pixels are as decoded; with a floating dtype (default float32) they are
    ``(x - 127.5) / 127.5`` in ``[-1, 1]``, insightface's input normalization.

    Args:
        path: the ``.bin`` file. dtype: ``torch.uint8`` or a floating dtype.

    Attributes:
        issame: bool tensor ``[P]``.
        name: the file name without ``.bin``.

    Raises:
        ValueError: naming the file: not a pickle of two sequences,
            ``len(images) != 2 * len(issame)`` (an odd count included), an entry that is not bytes.
    """

    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        if dtype != torch.uint8 and not dtype.is_floating_point:
            raise ValueError(f"dtype: expected torch.uint8 or a floating dtype, got {dtype}")
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.dtype = dtype
        with open(path, "rb") as f:
            try:
                obj = _BinUnpickler(f, encoding="bytes").load()
            except Exception as exc:
                raise ValueError(f"{path}: not a verification .bin pickle: {exc}") from None
        if not isinstance(obj, (tuple, list)) or len(obj) != 2:
            raise ValueError(f"{path}: expected a pickled pair (images, issame), got {type(obj).__name__}")
        images, issame = obj
        images = list(images)
        issame = np.asarray(issame)
        if issame.ndim != 1 or not (issame.dtype == bool or np.isin(issame, (0, 1)).all()):
            raise ValueError(f"{path}: issame must be a flat list of booleans, got shape {issame.shape} dtype {issame.dtype}")
        if len(images) != 2 * issame.size:
            raise ValueError(
                f"{path}: {len(images)} images for {issame.size} pairs: expected 2 x {issame.size} = {2 * issame.size}"
                + (" (an odd number of images)" if len(images) % 2 else "")
            )
        for i, b in enumerate(images):
            if isinstance(b, np.ndarray):
                images[i] = b.tobytes()
            elif not isinstance(b, (bytes, bytearray)):
                raise ValueError(f"{path}: image {i} is a {type(b).__name__}, expected encoded bytes")
        self._images = images
        self.issame = torch.from_numpy(issame.astype(bool))

    def __len__(self) -> int:
        return int(self.issame.numel())

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` (of ``2·P``) decoded, ``[3, H, W]`` in the dataset's dtype."""
        x = decode_image(self._images[i], f"{self.path}: image {i}")
        if self.dtype == torch.uint8:
            return x
        return (x.to(self.dtype) - 127.5) / 127.5

    def __getitem__(self, k: int):
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"pair {k} out of range for {n} pairs")
        k %= n
        return self.image(2 * k), self.image(2 * k + 1), bool(self.issame[k])

    def embed(self, embed_fn: Callable[[torch.Tensor], torch.Tensor], flip: bool = True, batch_size: int = 64,
              device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """Embeddings of all ``2·P`` images, ``[2P, D]`` float32 on the CPU.

        ``embed_fn`` gets batches ``[B, 3, H, W]`` in the dataset's dtype (on ``device``
        when given) and must return one ``[B, D]`` tensor; a model that returns several
        outputs (a tuple, a dict) is a TypeError saying so: wrap it, e.g.
        ``lambda x: model(x)[0]`` (which output is the embedding is the model's to say). With ``flip`` the embedding of an image is
        ``embed_fn(x) + embed_fn(x mirrored left-right)`` (feature fusion by sum, as
        insightface's ``verification.py``). Runs under ``torch.no_grad()``.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        out = []
        with torch.no_grad():
            for s in range(0, len(self._images), int(batch_size)):
                imgs = [self.image(i) for i in range(s, min(s + int(batch_size), len(self._images)))]
                shapes = {tuple(t.shape) for t in imgs}
                if len(shapes) > 1:
                    raise ValueError(f"{self.path}: images {s}..{s + len(imgs) - 1} differ in size {sorted(shapes)}; "
                                     "resize them to one size first")
                x = torch.stack(imgs)
                if device is not None:
                    x = x.to(device)
                e = _embedding(embed_fn(x), x.shape[0])
                if flip:
                    e = e + _embedding(embed_fn(torch.flip(x, dims=[3])), x.shape[0])
                if e.dim() != 2 or e.shape[0] != x.shape[0]:
                    raise ValueError(f"embed_fn: expected [{x.shape[0]}, D] embeddings, got {tuple(e.shape)}")
                out.append(e.detach().float().cpu())
        return torch.cat(out)

    def evaluate(self, embed_fn: Callable[[torch.Tensor], torch.Tensor], flip: bool = True, batch_size: int = 64,
                 n_folds: int = 10, device: Union[str, torch.device, None] = None) -> dict:
        """10-fold verification accuracy of ``embed_fn`` on this set.

        Embeds every image (:meth:`embed`, flip fusion optional), scores pair ``k`` by
        the cosine of its two embeddings (:func:`magloss.evaluation.cosine_scores`) and
        returns :func:`magloss.evaluation.kfold_verification` of the scores and
        ``issame`` (contiguous folds, as insightface; the cosine orders pairs as
        insightface's Euclidean distance of normalized embeddings does, reversed), with
        ``"scores"`` (``[P]`` float tensor) added.
        """
        emb = self.embed(embed_fn, flip=flip, batch_size=batch_size, device=device)
        scores = cosine_scores(emb[0::2], emb[1::2])
        result = kfold_verification(scores, self.issame.numpy(), n_folds=n_folds)
        result["scores"] = scores
        return result
