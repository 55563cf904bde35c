"""Image data sources: a procedural shapes set, MNIST idx files, image folders, arrays.

Every loader returns images as a ``torch.uint8`` tensor of shape ``(N, C, H, W)``
with values 0..255, where ``C`` is 1 (grayscale) or 3 (RGB). Conversion to float
and normalisation is left to the model code, so that data sets stay compact in
memory (one byte per pixel) and bit-exact when cached.

Every problem caused by the user's data (missing path, unreadable or corrupt file,
wrong header, inconsistent image sizes, unsupported array shape or dtype, ...)
raises :class:`progvq.errors.DataError` with a one-line message that starts with
the offending file or folder. Raw ``OSError`` / numpy / Pillow exceptions are never
allowed to escape for such cases, because the command line turns ``DataError``
into a clean one-line report while anything else is treated as a bug.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from progvq.canvas import Canvas
from progvq.datasets import SHIPPED_MNIST, get_command
from progvq.errors import DataError
from progvq.fileio import current_umask
from progvq.folder import (
    IMAGE_SUFFIXES,
    Decoded,
    MappedImages,
    Transform,
    cached_folder,
    decode_in_memory,
    first_shape,
    list_folder,
    load_manifest,
    release,
    shown,
    skipped_line,
)
from progvq.folder import reason as _reason
from progvq.memory import physical_bytes as _memory  # a name tests can stand in for
from progvq.registry import Registry

#: Where a source reads when ``data.path`` is not given (the other sources with files need one): for
#: ``mnist``, MNIST's test set shipped with progvq (t10k files only: 9,000 train and 1,000 held out
#: with ``data.heldout: 1000``).
DEFAULT_PATHS = {"mnist": SHIPPED_MNIST}

#: Side of generated shapes images when ``data.size`` is not set, and the smallest side they can have.
SHAPES_DEFAULT_SIZE = 32
SHAPES_MIN_SIZE = 8


@dataclass
class DataConfig:
    """Where images come from and how they are split."""

    source: str = "shapes"  # shapes | mnist | folder | array
    path: str | None = None  # folder (mnist, folder) or file (array); mnist without one: DEFAULT_PATHS
    prefix: str = "t10k"  # mnist: files {prefix}-images-idx3-ubyte[.gz]
    key: str | None = None  # array: the .npz entry to read
    channels: int = 1  # shapes and folder: 1 (grey) or 3 (RGB)
    # centre-pad images to size x size (shapes: their size; folder with resize or crop: the crop's side)
    size: int | None = None
    count: int = 6000  # shapes: how many to generate
    # held-out images: the last `heldout` (folder: `heldout` picked by a hash of data.seed and each path)
    heldout: int = 500
    limit: int | None = None  # use only the first `limit` images
    seed: int = 0  # shapes: generator seed; folder: the held-out pick and the random crops
    resize: str = "none"  # folder: none | shorter-side (scaled so the shorter side is data.size)
    crop: str = "none"  # folder: none | centre | random (data.size x data.size, random: fixed per image)
    on_unreadable: str = "refuse"  # folder: refuse | skip (skipped files are counted in the log)


__all__ = [
    "DEFAULT_PATHS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_SUFFIXES",
    "SHAPE_CLASSES",
    "SHAPE_KINDS",
    "SOURCES",
    "DataConfig",
    "data_change",
    "data_config_digest",
    "data_path",
    "data_record",
    "heldout_rows",
    "is_data_record",
    "load_array",
    "load_dataset",
    "load_image_folder",
    "load_mnist",
    "make_labelled_shapes",
    "make_shapes",
    "on_canvas",
    "pad_to",
    "read_idx",
    "stage_record",
    "write_shapes_folder",
]

#: idx magic number of a 1-d uint8 array (MNIST labels): type code 0x08, 1 dim.
IDX_LABELS_MAGIC = 2049
#: idx magic number of a 3-d uint8 array (MNIST images): type code 0x08, 3 dims.
IDX_IMAGES_MAGIC = 2051
#: Number of dimensions announced by each accepted magic number.
_IDX_NDIM = {IDX_LABELS_MAGIC: 1, IDX_IMAGES_MAGIC: 3}

# Supersampling factor of make_shapes: each output pixel averages SS x SS binary
# coverage samples, which gives soft, anti-aliased edges without any Pillow
# drawing code (whose antialiasing could change between Pillow versions).
_SS = 4


# --------------------------------------------------------------------------- #
# Procedural shapes
# --------------------------------------------------------------------------- #


#: The kinds of shape :func:`make_shapes` draws, in the order of its random draw of a kind (0, 1, 2).
SHAPE_KINDS = ("ellipse", "rectangle", "triangle")

#: Names of the shapes' class labels, label ``i`` being ``SHAPE_CLASSES[i]``: one class per number of
#: shapes drawn (1 or 2) and sorted multiset of their kinds, kinds joined by ``+``. Circles are
#: ellipses, squares rectangles; the order of drawing does not count (``rectangle+triangle`` is
#: also a triangle painted before a rectangle).
SHAPE_CLASSES = (
    "ellipse",
    "rectangle",
    "triangle",
    "ellipse+ellipse",
    "ellipse+rectangle",
    "ellipse+triangle",
    "rectangle+rectangle",
    "rectangle+triangle",
    "triangle+triangle",
)

# sorted tuple of kind indices -> class label; SHAPE_KINDS is in alphabetical order, so sorting
# indices sorts names too
_SHAPE_CLASS_OF = {
    tuple(SHAPE_KINDS.index(kind) for kind in name.split("+")): label for label, name in enumerate(SHAPE_CLASSES)
}


def make_shapes(n: int, *, size: int = 32, channels: int = 1, seed: int = 0) -> Tensor:
    """``n`` images (n, channels, size, size) uint8 of 1-2 soft filled shapes on a black background.

    The images of :func:`make_labelled_shapes` with the same arguments, without their labels.
    """
    return make_labelled_shapes(n, size=size, channels=channels, seed=seed)[0]


def make_labelled_shapes(n: int, *, size: int = 32, channels: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images (n, channels, size, size) uint8 of 1-2 soft filled shapes, and their labels (n,) int64.

    ``n >= 0`` images of ``size`` x ``size`` pixels (``size >= 8``), grayscale
    (``channels`` 1) or RGB (``channels`` 3), drawn from the random ``seed``.
    The shapes are ellipses (circles included), axis-aligned rectangles and
    triangles of random size, position and brightness (and colour when
    ``channels == 3``). Each shape keeps most of its area inside the image. Edges
    are anti-aliased by rendering at 4x resolution and averaging 4x4 blocks.

    The result depends only on the arguments: only ``numpy.random.default_rng``
    draws and exactly rounded IEEE arithmetic (no transcendental functions, no
    Pillow) are used, and compositing and downsampling are done in integers, so
    the same seed yields identical bytes on every machine.

    Label ``i`` names what image ``i`` was drawn with: an index into :data:`SHAPE_CLASSES`
    (how many shapes and of which kinds). It records the drawing, not what stays visible: a
    later shape is painted over an earlier one and may hide part of it, rarely all of it.
    Recording the labels draws nothing from the random generator, so the images are those the
    generator drew before it recorded them.
    """
    if n < 0:
        raise DataError(f"make_shapes: n must be >= 0, got {n}")
    if size < 8:
        # Below 8 pixels the smallest shapes would be 1-2 pixels wide: not useful.
        raise DataError(f"make_shapes: size must be >= 8, got {size}")
    if channels not in (1, 3):
        raise DataError(f"make_shapes: channels must be 1 or 3, got {channels}")

    rng = np.random.default_rng(seed)
    hi = size * _SS
    # Sample centres of the high-resolution grid, in output-pixel units. Shape
    # geometry is drawn in output-pixel units too, so it does not depend on _SS.
    coords = (np.arange(hi, dtype=np.float64) + 0.5) / _SS
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    canvas = np.empty((channels, hi, hi), dtype=np.uint8)
    for i in range(n):
        canvas.fill(0)
        kinds = []
        for _ in range(int(rng.integers(1, 3))):
            kind = int(rng.integers(0, 3))
            kinds.append(kind)
            if kind == 0:
                mask, rows, cols = _ellipse(rng, size, coords)
            elif kind == 1:
                mask, rows, cols = _rectangle(rng, size, coords)
            else:
                mask, rows, cols = _triangle(rng, size, coords)
            colour = _colour(rng, channels)
            # Later shapes are painted over earlier ones (opaque, like objects).
            region = canvas[:, rows, cols]
            region[:, mask] = colour[:, None]
        # Box-filter downsampling in int32 (exact), then round half up.
        blocks = canvas.reshape(channels, size, _SS, size, _SS).sum(
            axis=(2, 4), dtype=np.int32
        )
        out[i] = (blocks + (_SS * _SS) // 2) // (_SS * _SS)
        labels[i] = _SHAPE_CLASS_OF[tuple(sorted(kinds))]
    return torch.from_numpy(out), torch.from_numpy(labels)


def _colour(rng: np.random.Generator, channels: int) -> np.ndarray:
    """Draw a shape colour: shape ``(channels,)`` uint8, never dark.

    Grayscale brightness is in 96..255 so every shape stands out from the black
    background; in RGB one random channel is forced to 160..255 for the same reason
    while the other two are free, which gives saturated as well as pale colours.
    """
    if channels == 1:
        return np.array([rng.integers(96, 256)], dtype=np.uint8)
    colour = rng.integers(0, 256, size=3)
    colour[int(rng.integers(0, 3))] = rng.integers(160, 256)
    return colour.astype(np.uint8)


def _window(lo: float, hi_: float, coords: np.ndarray) -> slice:
    """Index range of the sample ``coords`` (sorted, shape ``(S,)``) inside [lo, hi_].

    Restricting the coverage test to the shape's bounding box keeps generation fast.
    """
    start = int(np.searchsorted(coords, lo, side="left"))
    stop = int(np.searchsorted(coords, hi_, side="right"))
    return slice(start, max(start, stop))


def _ellipse(
    rng: np.random.Generator, size: int, coords: np.ndarray
) -> tuple[np.ndarray, slice, slice]:
    """Axis-aligned filled ellipse; returns (bool mask (h, w), row slice, col slice)."""
    ry, rx = rng.uniform(0.12, 0.3, size=2) * size
    if rng.random() < 0.3:
        rx = ry  # a share of exact circles
    # Centre at least 0.7 radius from each border: most of the area stays inside.
    cy = rng.uniform(0.7 * ry, size - 0.7 * ry)
    cx = rng.uniform(0.7 * rx, size - 0.7 * rx)
    rows = _window(cy - ry, cy + ry, coords)
    cols = _window(cx - rx, cx + rx, coords)
    dy = (coords[rows, None] - cy) / ry
    dx = (coords[None, cols] - cx) / rx
    return dy * dy + dx * dx <= 1.0, rows, cols


def _rectangle(
    rng: np.random.Generator, size: int, coords: np.ndarray
) -> tuple[np.ndarray, slice, slice]:
    """Axis-aligned filled rectangle; returns (bool mask (h, w), row slice, col slice)."""
    h, w = rng.uniform(0.2, 0.55, size=2) * size
    # Up to 10% of the side may hang over the border.
    y0 = rng.uniform(-0.1 * h, size - 0.9 * h)
    x0 = rng.uniform(-0.1 * w, size - 0.9 * w)
    rows = _window(y0, y0 + h, coords)
    cols = _window(x0, x0 + w, coords)
    mask = np.ones((rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
    return mask, rows, cols


def _triangle(
    rng: np.random.Generator, size: int, coords: np.ndarray
) -> tuple[np.ndarray, slice, slice]:
    """Filled triangle; returns (bool mask (h, w), row slice, col slice).

    Vertices are uniform in a square of half-side ``r`` around a centre; small
    or thin triangles are redrawn so triangles look like triangles. No
    trigonometry is used, keeping the output bit-reproducible.
    """
    r = rng.uniform(0.25, 0.4) * size
    cy = rng.uniform(0.8 * r, size - 0.8 * r)
    cx = rng.uniform(0.8 * r, size - 0.8 * r)
    while True:
        v = rng.uniform(-r, r, size=(3, 2))  # rows: vertices, cols: (y, x) offsets
        e = v - v[[1, 2, 0]]  # edge vectors, shape (3, 2)
        twice_area = abs(e[0, 0] * e[1, 1] - e[0, 1] * e[1, 0])
        longest_sq = float((e * e).sum(axis=1).max())
        # Big enough, and not a sliver: an equilateral triangle has
        # 2 * area / longest**2 = 0.87; 0.45 allows fairly obtuse ones too.
        if twice_area >= 1.0 * r * r and twice_area >= 0.45 * longest_sq:
            break
    vy = v[:, 0] + cy
    vx = v[:, 1] + cx
    rows = _window(vy.min(), vy.max(), coords)
    cols = _window(vx.min(), vx.max(), coords)
    py = coords[rows, None]
    px = coords[None, cols]
    # A point is inside when it lies on the same side of all three edges; the
    # sign of the edge functions depends on the vertex winding, hence both tests.
    edges = [
        (vx[(k + 1) % 3] - vx[k]) * (py - vy[k])
        - (vy[(k + 1) % 3] - vy[k]) * (px - vx[k])
        for k in range(3)
    ]
    inside_pos = (edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)
    inside_neg = (edges[0] <= 0) & (edges[1] <= 0) & (edges[2] <= 0)
    return inside_pos | inside_neg, rows, cols


# --------------------------------------------------------------------------- #
# MNIST idx files
# --------------------------------------------------------------------------- #


#: idx type codes (the magic's third byte) and what they hold; only unsigned bytes are read.
_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


def read_idx(path: Path) -> np.ndarray:
    """The idx file (the MNIST format) at ``path``, gzip-compressed or raw, as a uint8 array.

    The array is (N,) for magic 2049 (labels) or (N, rows, cols) for magic 2051
    (images), writable and owning its memory. Compression is detected from the
    gzip signature, not the file name, so a decompressed file that kept its
    ``.gz`` name still reads. Only unsigned-byte files are accepted: magic 2049
    and 2051.

    The header is checked before anything is allocated: the product of its dimensions
    (exact, in Python integers, so no product wraps around) must be the payload's length,
    the file's length for a raw file, and what the gzip stream holds (read no further
    than one byte past it, so a stream that inflates without end is refused, not read).

    Raises :class:`DataError` for a missing or unreadable file, a bad gzip
    stream, an unknown magic number, a short header, or a payload whose length
    does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: idx file not found")
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if compressed else raw
            head = stream.read(4)
            dims, header_len = _idx_header(path, head, stream)
            expected = math.prod(dims)
            if not compressed:
                payload = path.stat().st_size - header_len
            elif expected <= _memory():
                # at most one byte more than announced: enough to tell "too long" from "right"
                data = _read_at_most(stream, expected + 1)
                payload = len(data)
            else:
                # more than memory holds: count what the stream inflates to, keeping none of it
                payload = _count_at_most(stream, expected + 1)
            if payload != expected:
                shape = " x ".join(str(d) for d in dims)
                more = " or more" if compressed and payload > expected else ""
                raise DataError(
                    f"{path}: idx payload is {payload} bytes{more}, header announces {shape} = {expected}"
                )
            _check_fits(expected, str(path))  # a true header, of more than memory holds
            if not compressed:
                data = _read_at_most(raw, expected)
                if len(data) != expected:
                    raise DataError(f"{path}: idx payload is {len(data)} bytes, header announces {expected}")
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise DataError(f"{path}: cannot read idx file ({_reason(exc)})") from None
    # frombuffer gives a read-only view of the bytes; copy so callers (and torch)
    # get an ordinary writable array.
    return np.frombuffer(data, dtype=np.uint8).reshape(dims).copy()


def _idx_header(path: Path, head: bytes, stream: Any) -> tuple[tuple[int, ...], int]:
    """The dimensions of an idx file from its magic ``head`` (4 bytes) and the rest of ``stream``'s header."""
    if len(head) < 4:
        raise DataError(f"{path}: not an idx file (only {len(head)} bytes)")
    magic = int.from_bytes(head, "big")
    if magic not in _IDX_NDIM:
        code, ndim = head[2], head[3]
        if head[:2] == b"\0\0" and code in _IDX_TYPES and code != 0x08:
            raise DataError(
                f"{path}: idx type code 0x{code:02X} ({_IDX_TYPES[code]}) not supported "
                f"(magic {magic}); progvq reads unsigned-byte idx files (0x08)"
            )
        if head[:2] == b"\0\0" and code == 0x08:
            raise DataError(
                f"{path}: idx file of {ndim} dimensions (magic {magic}); expected {IDX_LABELS_MAGIC} "
                f"for labels (1) or {IDX_IMAGES_MAGIC} for images (3)"
            )
        raise DataError(
            f"{path}: not an idx file (magic {magic}, expected {IDX_LABELS_MAGIC} "
            f"for labels or {IDX_IMAGES_MAGIC} for images)"
        )
    ndim = _IDX_NDIM[magic]
    header_len = 4 + 4 * ndim
    rest = stream.read(4 * ndim)
    if len(rest) < 4 * ndim:
        raise DataError(f"{path}: truncated idx header ({4 + len(rest)} of {header_len} bytes)")
    dims = tuple(int.from_bytes(rest[4 * k : 4 * k + 4], "big") for k in range(ndim))
    return dims, header_len


def _check_fits(nbytes: int, where: str) -> None:
    """Refuse an array of ``nbytes`` that this machine's memory cannot hold (one line, not a MemoryError)."""
    memory = _memory()
    if nbytes > memory:
        raise DataError(
            f"{where}: holds {nbytes / 2**30:.1f} GiB of images, more than this machine's "
            f"{memory / 2**30:.1f} GiB of memory (an image folder is read through a cache on disk instead)"
        )


def _count_at_most(stream: Any, limit: int) -> int:
    """How many bytes ``stream`` yields, counting no further than ``limit`` (the bytes are not kept)."""
    count = 0
    while count < limit:
        block = stream.read(min(limit - count, 1 << 24))
        if not block:
            break
        count += len(block)
    return count


def _read_at_most(stream: Any, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``stream``, in blocks (memory grows with what is there, not with ``limit``).

    A bytearray, so arrays made on it with ``np.frombuffer`` are writable without a copy.
    """
    out = bytearray()
    while len(out) < limit:
        block = stream.read(min(limit - len(out), 1 << 24))
        if not block:
            break
        out += block
    return out


def _find_idx(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem`` or ``folder/stem.gz`` (raw preferred), or None."""
    for name in (stem, stem + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def load_mnist(folder: Path, prefix: str = "t10k") -> tuple[Tensor, Tensor | None]:
    """MNIST-format images uint8 (N, 1, rows, cols) and labels int64 (N,) or None, from ``folder``.

    The images are 28 x 28 for MNIST; the labels are None when there is no label
    file. Looks for ``{prefix}-images-idx3-ubyte`` (or ``.gz``) and optionally
    ``{prefix}-labels-idx1-ubyte`` (or ``.gz``); ``prefix`` is ``"t10k"`` for the
    test set and ``"train"`` for the training set.

    Raises :class:`DataError` for a missing folder or image file (naming the
    names looked for), unreadable idx files, a file holding the wrong kind of
    array, or a label count different from the image count.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            what = "not a folder (data.path of source mnist names the folder of the idx files)"
        else:
            what = "MNIST folder not found"
        raise DataError(f"{folder}: {what}")
    images_stem = f"{prefix}-images-idx3-ubyte"
    images_path = _find_idx(folder, images_stem)
    if images_path is None:
        raise DataError(
            f"{folder}: no MNIST images file (looked for {images_stem} and {images_stem}.gz)"
        )
    images = read_idx(images_path)
    if images.ndim != 3:
        # read_idx accepts labels too, so a mislabelled file arrives here as 1-d.
        raise DataError(
            f"{images_path}: holds labels (1-d), expected images (magic {IDX_IMAGES_MAGIC})"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: contains no images")

    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    labels: Tensor | None = None
    if labels_path is not None:
        raw_labels = read_idx(labels_path)
        if raw_labels.ndim != 1:
            raise DataError(
                f"{labels_path}: holds images, expected labels (magic {IDX_LABELS_MAGIC})"
            )
        if raw_labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{labels_path}: {raw_labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}"
            )
        labels = torch.from_numpy(raw_labels.astype(np.int64))
    return torch.from_numpy(images).unsqueeze(1), labels


# --------------------------------------------------------------------------- #
# Folders of image files
# --------------------------------------------------------------------------- #


def load_image_folder(folder: Path, channels: int) -> Tensor:
    """Every PNG/JPEG/WebP file directly inside ``folder`` (not sub-folders) -> uint8 (N, channels, H, W).

    Files are those whose suffix is ``.png``, ``.jpg``, ``.jpeg`` or ``.webp`` in any case,
    taken in order of file name. Each is converted by Pillow to mode ``"L"``
    (``channels == 1``) or ``"RGB"`` (``channels == 3``); an alpha channel is
    dropped, not composited. (``load_dataset`` reads class folders too, and resizes and crops.)

    Raises :class:`DataError` for a missing folder, bad ``channels``, no image
    files, a file Pillow cannot decode (naming it), or a file whose size differs
    from the first one's (naming it and both sizes).
    """
    folder = Path(folder)
    if channels not in (1, 3):
        raise DataError(f"{folder}: channels must be 1 or 3, got {channels}")
    listing = list_folder(folder, classes=False)
    return torch.from_numpy(decode_in_memory(listing, Transform(channels)).images)


# --------------------------------------------------------------------------- #
# NumPy arrays
# --------------------------------------------------------------------------- #


def load_array(path: Path, key: str | None = None) -> Tensor:
    """Images from a ``.npy`` or ``.npz`` file -> uint8 (N, C, H, W).

    In an ``.npz`` the array is ``key`` if given, else the one named ``"images"``,
    else the only array in the file.

    Accepted shapes (``N`` images, ``C`` in {1, 3}):

    * ``(N, H, W)``: grayscale, becomes ``(N, 1, H, W)``.
    * ``(N, H, W, C)``, channels-last, when the last axis is 1 or 3 *and* axis 1
      is not (so ``(N, 28, 28, 1)`` and ``(N, 32, 32, 3)`` are channels-last).
    * ``(N, C, H, W)``, channels-first, otherwise when axis 1 is 1 or 3. An
      ambiguous shape such as ``(N, 3, 5, 3)`` is therefore read channels-first,
      the PyTorch convention.

    Accepted dtypes: uint8 (used as is), and floating point with every value in
    [0, 1], scaled by 255 and rounded to nearest. Anything else is refused rather
    than guessed at (e.g. int64 0..255 or float 0..255 must be converted first).

    Raises :class:`DataError` for a missing or unreadable file, pickled data, an
    unknown or ambiguous npz key (listing the keys), an unsupported shape, dtype
    or value range, or no images.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, expected a .npy or .npz file" if path.is_dir() else "array file not found"
        raise DataError(f"{path}: {what}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            f.seek(0)
            if magic == b"\x93NUMPY":
                if key is not None:
                    raise DataError(f"{path}: key {key!r} given but this is a .npy file, not .npz")
                array, where = _read_npy(f, path.stat().st_size, str(path)), str(path)
            elif magic[:2] == b"PK":
                with zipfile.ZipFile(f) as zf:
                    members = {n.removesuffix(".npy"): n for n in zf.namelist() if n.endswith(".npy")}
                    name = _pick_npz_key(path, list(members), key)
                    where = f"{path}[{name}]"
                    info = zf.getinfo(members[name])
                    with zf.open(info) as member:
                        array = _read_npy(member, info.file_size, where)
            else:
                raise DataError(f"{path}: cannot load array (not a .npy or .npz file)")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # not npy/npz, truncated, a bad zip, or a header numpy cannot parse
        raise DataError(f"{path}: cannot load array ({_reason(exc)})") from None
    return torch.from_numpy(_to_nchw_uint8(array, where))


def _read_npy(f: Any, length: int, where: str) -> np.ndarray:
    """The array of the ``.npy`` stream ``f`` of ``length`` bytes (a file, or a member of an npz).

    The header is read first and what it announces (shape x item size, exact integers) is
    compared with the bytes that follow it before anything is allocated, so a header that
    announces terabytes is refused in one line. Arrays of Python objects are refused:
    reading them means unpickling, and a data file must never be able to run code.
    """
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DataError(f"{where}: cannot load array (.npy format version {version} unknown)")
    if dtype.hasobject:
        raise DataError(
            f"{where}: cannot load array (it holds Python objects, which need allow_pickle=True; "
            "progvq reads with allow_pickle=False)"
        )
    if any(d < 0 for d in shape):
        dims = " x ".join(str(d) for d in shape)
        raise DataError(f"{where}: cannot load array (its header announces a negative size, {dims})")
    header = f.tell()
    announced = math.prod(shape) * dtype.itemsize
    follows = length - header
    if announced != follows:
        dims = " x ".join(str(d) for d in shape) or "a scalar"
        raise DataError(
            f"{where}: cannot load array (its header announces {dims} of {dtype} = {announced} bytes, "
            f"but {follows} bytes follow it)"
        )
    _check_fits(announced, where)
    data = _read_at_most(f, announced)
    if len(data) != announced:
        raise DataError(f"{where}: cannot load array ({len(data)} of the {announced} bytes it announces)")
    array = np.frombuffer(data, dtype=dtype)
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _pick_npz_key(path: Path, keys: list[str], key: str | None) -> str:
    """Choose which array of an npz to read (see :func:`load_array`)."""
    if key is not None:
        if key not in keys:
            raise DataError(
                f"{path}: no array {key!r} in npz (keys: {', '.join(keys) or 'none'})"
            )
        return key
    if "images" in keys:
        return "images"
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise DataError(f"{path}: npz file holds no arrays")
    raise DataError(
        f"{path}: npz holds several arrays and no 'images'; pick a key from: {', '.join(keys)}"
    )


def _to_nchw_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Validate an image array and return it as contiguous uint8 ``(N, C, H, W)``."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        if array.shape[3] in (1, 3) and array.shape[1] not in (1, 3):
            array = array.transpose(0, 3, 1, 2)
        elif array.shape[1] not in (1, 3):
            raise DataError(
                f"{where}: shape {array.shape} has no channel axis of size 1 or 3 "
                "(expected N x H x W, N x H x W x C or N x C x H x W)"
            )
    else:
        raise DataError(
            f"{where}: {array.ndim}-d array of shape {array.shape}, "
            "expected N x H x W, N x H x W x C or N x C x H x W"
        )
    if array.size == 0:
        raise DataError(f"{where}: no images (shape {array.shape})")

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(array.min()), float(array.max())
        # NaN makes both comparisons false, so "not (..)" also refuses NaN.
        if not (lo >= 0.0 and hi <= 1.0):
            raise DataError(
                f"{where}: float values must lie in [0, 1], found {lo:g}..{hi:g}"
            )
        # float64 so that float16/32 inputs round the same way as float64 ones.
        scaled = np.rint(array.astype(np.float64) * 255.0)
        return np.ascontiguousarray(scaled.astype(np.uint8))
    raise DataError(
        f"{where}: dtype {array.dtype} not supported (need uint8, or float in [0, 1])"
    )


# --------------------------------------------------------------------------- #
# Transforms
# --------------------------------------------------------------------------- #


def pad_to(images: Tensor, size: int) -> Tensor:
    """Centre ``images`` (N, C, H, W), any dtype, on a zero canvas -> (N, C, size, size) (e.g. MNIST 28 -> 32).

    ``size`` is the target height and width, ``>= max(H, W)``; the result has the
    dtype and device of ``images``. When the padding is odd, the extra row/column
    goes to the bottom/right.

    Raises :class:`DataError` when ``images`` is not 4-d, or ``size`` is smaller
    than H or W.
    """
    if images.ndim != 4:
        raise DataError(
            f"pad_to: expected images of shape N x C x H x W, got {tuple(images.shape)}"
        )
    h, w = int(images.shape[2]), int(images.shape[3])
    if size < h or size < w:
        raise DataError(
            f"pad_to: cannot pad {h}x{w} images to {size}x{size} (size smaller than the image)"
        )
    c = int(images.shape[1])
    return Canvas((c, h, w), (c, size, size)).pad(images)


# --------------------------------------------------------------------------- splits

#: Images of a split: a tensor (N, C, H, W) uint8 in memory, or rows of a memory-mapped cache that index
#: like one (``images[index]`` gives a tensor).
Images = Tensor | MappedImages


@dataclass
class ImageData:
    """A data set split in two, at the data's own size.

    Images are uint8 (N, C, H, W) as the source has them (the training split of a cached image
    folder stays in its memory map: see :class:`MappedImages`); labels int64 (N,) or None.
    ``canvas`` says where the models place them (``data.size`` pads them, centred, for the
    convolutions); every figure is over the original pixels. ``labels_from`` names the file or
    folder the labels came from, for messages about them.
    """

    train: Images
    heldout: Tensor
    train_labels: Tensor | None = None
    heldout_labels: Tensor | None = None
    canvas: Canvas | None = None  # None: the images are not padded
    labels_from: str | None = None

    def __post_init__(self) -> None:
        if self.canvas is None:
            self.canvas = Canvas.unpadded(self.image_shape)

    @property
    def channels(self) -> int:
        return int(self.train.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, at the data's own size."""
        c, h, w = self.heldout.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Classes 0..num_classes-1 of the labels (largest label of either split, plus one); 0 without labels."""
        if self.train_labels is None or self.heldout_labels is None:
            return 0
        return int(torch.cat([self.train_labels, self.heldout_labels]).max()) + 1

    def check_classes(self, num_classes: int) -> None:
        """Refuse labels outside 0..num_classes-1 (what a trained class-conditional prior knows), naming their file."""
        for labels in (self.train_labels, self.heldout_labels):
            if labels is None or not len(labels):
                continue
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                bad = hi if hi >= num_classes else lo
                raise DataError(
                    f"{self.labels_from}: label {bad} is outside the {num_classes} classes (0..{num_classes - 1}) "
                    "the run's prior was trained on"
                )


def on_canvas(images: Images, canvas: Canvas, device: torch.device) -> Images:
    """``images`` placed on ``canvas`` and ``device``: a padded tensor, or for a memory map, the same rows
    whose batches come out padded and on ``device`` (the split itself is never read in full)."""
    if isinstance(images, MappedImages):
        return images.placed(canvas, device)
    return canvas.pad(images.to(device))


def load_dataset(
    cfg: DataConfig,
    total_downsample: int = 1,
    *,
    cache_dir: Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> ImageData:
    """Read the configured source and split it: the last ``cfg.heldout`` images are held out.

    The images keep their own size; ``data.size`` sets the canvas they are
    centred on for the models. ``total_downsample`` is the hierarchy's overall
    factor: the canvas sides must be divisible by it, or the top grid would
    not be whole.

    An image folder is read differently: its held-out images are picked by a hash of
    ``data.seed`` and each file's path (so the pick depends on neither the file system's
    order nor on other files), and with ``cache_dir`` (a run folder) the images are decoded
    once into a memory-mapped cache there (:func:`progvq.folder.cached_folder`), whose
    training split is then read batch by batch. ``progress`` shows a bar while a folder is
    decoded (None: only on a terminal); ``log`` reports a rebuilt cache and skipped files.

    ``check`` sees the data's record (see :func:`data_record`), first with the image shape alone as
    soon as it is known, then whole, and may refuse it: :func:`progvq.run.load_run_data` passes the
    run's check, so a data set replaced under the same path is refused in one line rather than
    handed to models made for another (training checks stage by stage instead).
    """
    if check is None:
        return _load_dataset(cfg, total_downsample, cache_dir=cache_dir, progress=progress, log=log)

    def shape_known(shape: tuple[int, ...]) -> None:
        # images of another shape are refused as soon as their shape is known: before a folder is
        # decoded into the run's cache, and before a size check would name data.size instead
        where = "" if cfg.source == "shapes" else str(data_path(cfg))
        check({"source": cfg.source, "path": where, "shape": [int(v) for v in shape]})

    data = _load_dataset(cfg, total_downsample, cache_dir=cache_dir, progress=progress, log=log, on_shape=shape_known)
    check(data_record(cfg, data))
    return data


def _load_dataset(
    cfg: DataConfig,
    total_downsample: int,
    *,
    cache_dir: Path | None,
    progress: bool | None,
    log: Callable[[str], None],
    on_shape: Callable[[tuple[int, ...]], None] | None = None,
) -> ImageData:
    """:func:`load_dataset` without the check against a run's records; ``on_shape`` sees the images' (C, H, W)
    as soon as it is known, and may refuse them."""
    if cfg.source != "shapes":
        _refuse_missing(cfg)
    if cfg.source == "folder":
        return _load_folder(cfg, total_downsample, cache_dir=cache_dir, progress=progress, log=log, on_shape=on_shape)
    images, labels = SOURCES.entry(cfg.source).builder(cfg)
    if on_shape is not None:
        on_shape(tuple(int(v) for v in images.shape[1:]))
    where = "shapes" if cfg.source == "shapes" else data_path(cfg)
    if images.shape[1] != cfg.channels:
        raise DataError(f"{where}: images have {images.shape[1]} channels but data.channels is {cfg.channels}")
    if cfg.limit is not None:
        images = images[: cfg.limit]
        labels = None if labels is None else labels[: cfg.limit]
    canvas = _canvas(cfg, tuple(int(v) for v in images.shape[1:]), total_downsample, str(where))
    _check_count(len(images), cfg, str(where))
    cut = len(images) - cfg.heldout
    labels_from = None
    if labels is not None and cfg.source == "mnist":
        labels_from = str(_find_idx(data_path(cfg), f"{cfg.prefix}-labels-idx1-ubyte"))
    elif labels is not None:
        labels_from = cfg.source
    return ImageData(
        images[:cut].contiguous(),
        images[cut:].contiguous(),
        None if labels is None else labels[:cut],
        None if labels is None else labels[cut:],
        canvas,
        labels_from,
    )


# --------------------------------------------------------------------------- what a data set is

#: Bytes of a data set hashed at a time when no cache digest stands for them.
_HASH_ROWS = 1024


def data_record(cfg: DataConfig, data: ImageData) -> dict[str, Any]:
    """What ``data`` (loaded from ``cfg``) is, as plain strings, integers and lists a checkpoint can keep.

    ``shape``: (C, H, W) of the images at their own size; ``train`` and ``heldout``: the split's
    counts; ``images`` and ``labels``: blake2b digests of the pixels of both splits in order and
    of the labels ("" without labels); ``config``: a digest of the ``data`` section they were read
    with. Generated shapes are a function of their settings, so those stand for their content. An
    image folder read through its cache in a run folder is named by the digest the cache's
    manifest keeps and the rows of its training split, so a folder of 50,000 images is never read
    again to name it. ``source`` and ``path`` say where the data came from, for messages.

    A stage that does not train on labels keeps its record without ``labels`` (:func:`stage_record`).
    """
    images, labels = hashlib.blake2b(digest_size=20), hashlib.blake2b(digest_size=20)
    if cfg.source == "shapes":
        size = cfg.size or SHAPES_DEFAULT_SIZE
        settings = f"shapes count={cfg.count} size={size} channels={cfg.channels} seed={cfg.seed} limit={cfg.limit}"
        images.update(settings.encode())
        labels.update(settings.encode())
        where = ""
    else:
        _feed_pixels(images, data.train)
        _feed_pixels(images, data.heldout)
        for part in (data.train_labels, data.heldout_labels):
            if part is not None:
                labels.update(memoryview(np.ascontiguousarray(part.numpy().astype("<i8"))))
        where = str(data_path(cfg))
    return {
        "source": cfg.source,
        "path": where,
        "config": data_config_digest(cfg),
        "shape": list(data.image_shape),
        "train": len(data.train),
        "heldout": len(data.heldout),
        "images": images.hexdigest(),
        "labels": "" if data.train_labels is None and cfg.source != "shapes" else labels.hexdigest(),
    }


def data_config_digest(cfg: DataConfig) -> str:
    """A digest of the ``data`` section: two records of equal digests were read from the same place in the
    same way, so only a file or folder replaced there can make their content differ."""
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def stage_record(record: dict[str, Any], uses_labels: bool) -> dict[str, Any]:
    """``record`` as a stage keeps it: without ``labels`` for a stage that never reads them (every level; a
    prior that is not class-conditional), so other labels are other data only for a stage trained on them."""
    return dict(record) if uses_labels else {k: v for k, v in record.items() if k != "labels"}


def _feed_pixels(digest: Any, images: Images) -> None:
    """Feed the pixels of one split to ``digest``: a tensor's bytes, or for rows of a cached folder its
    cache's digest and the rows (reading every row only when the manifest does not name the mapped file)."""
    if isinstance(images, MappedImages):
        cached = _cache_digest(images.array)
        if cached is not None:
            digest.update(f"cache {cached} rows ".encode())
            digest.update(memoryview(np.ascontiguousarray(images.rows.astype("<i8"))))
            return
        for start in range(0, len(images), _HASH_ROWS):
            digest.update(memoryview(images[start : start + _HASH_ROWS].contiguous().numpy()))
        return
    digest.update(memoryview(np.ascontiguousarray(images.numpy())))


def _cache_digest(array: np.ndarray) -> str | None:
    """The content digest that a folder cache's manifest keeps for the memory-mapped file ``array``, or None
    (not a map, or the manifest names another file: a cache rebuilt since it was mapped)."""
    name = getattr(array, "filename", None)
    if not name:
        return None
    mapped = Path(name)
    # read as cached_folder reads it: checked against its schema, so whatever stands there now is a value or None
    manifest = load_manifest(mapped.parent)
    if manifest is None or manifest["file"] != mapped.name:
        return None
    return manifest["digest"]


def data_change(then: Any, now: Any, *, was: str = "then", is_: str = "now") -> str | None:
    """How the data of record ``now`` differs from record ``then`` (see :func:`data_record`), in words that
    name the data; None when they agree or either is unknown (a checkpoint written before records were
    kept, or no record at all). ``was`` and ``is_`` name the two sides ("then" and "now").

    The image shape always counts: models made for one shape cannot take another. The rest (split
    counts, pixels, labels) counts when both were read with the same ``data`` section: then only a
    file or folder replaced under the same path can make them differ. A ``data`` section changed on
    purpose (``--force`` adopts it) is the config's business, compared where configs are. Labels
    count only when both records keep them (see :func:`stage_record`).

    ``now`` may be partial: ``source``, ``path`` and ``shape`` alone (the shape is known before the images
    are read) compare the shape alone.
    """
    if not is_data_record(then) or not isinstance(now, dict) or not isinstance(now.get("shape"), list):
        return None
    place = f"data.path {now.get('path')}" if now.get("path") else f"data.source {now.get('source')}"
    old, new = then["shape"], now["shape"]
    if old != new:
        what = f"{_shape_words(old, new)} images {was}, {_shape_words(new, old)} {is_}"
    elif not is_data_record(now) or ("config" in then and "config" in now and then["config"] != now["config"]):
        return None
    elif (then["train"], then["heldout"]) != (now["train"], now["heldout"]):
        what = (
            f"{then['train']} training and {then['heldout']} held-out images {was}, "
            f"{now['train']} and {now['heldout']} {is_}"
        )
    elif then["images"] != now["images"]:
        what = "other images of the same size and number"
    elif "labels" not in then or "labels" not in now or then["labels"] == now["labels"]:
        return None
    elif then["labels"] and now["labels"]:
        what = "the same images with other labels"
    else:
        what = f"labels {was}, none {is_}" if then["labels"] else f"no labels {was}, labels {is_}"
    return f"{place}: {what}"


def is_data_record(record: Any) -> bool:
    """Whether ``record`` is a whole data record (what :func:`data_record` makes): a checkpoint edited to hold
    anything else there is refused by name rather than compared with the data as it is."""
    if not isinstance(record, dict):
        return False
    shape = record.get("shape")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    return (
        isinstance(shape, list)
        and len(shape) == 3
        and all(count(v) and v > 0 for v in shape)
        and all(isinstance(record.get(key), str) for key in ("source", "path", "images"))
        and all(isinstance(record.get(key, ""), str) for key in ("labels", "config"))  # kept by some records only
        and all(count(record.get(key)) for key in ("train", "heldout"))
    )


def _shape_words(shape: list[int], other: list[int]) -> str:
    """``HxW`` of a (C, H, W) shape, with its colour when the channels are what differs from ``other``'s."""
    c, h, w = shape
    if c == other[0]:
        return f"{h}x{w}"
    return f"{h}x{w} " + {1: "grey", 3: "colour"}.get(c, f"{c}-channel")


def data_path(cfg: DataConfig) -> Path:
    """The file or folder the configured source reads: ``data.path``, else the source's :data:`DEFAULT_PATHS`."""
    if cfg.path is not None:
        return Path(cfg.path)
    if cfg.source not in DEFAULT_PATHS:
        raise DataError(f"data.path: source {cfg.source!r} needs one")
    return DEFAULT_PATHS[cfg.source]


def _refuse_missing(cfg: DataConfig) -> None:
    """Refuse a ``data.path`` with nothing there to read, in one line that names the ``progvq data get``
    command writing it when the path is a known data set's place (see :func:`progvq.datasets.get_command`)."""
    path = data_path(cfg)
    images = f"{cfg.prefix}-images-idx3-ubyte"
    if cfg.path is None and _find_idx(path, images) is None:
        # the default is mnist's alone (data_path refuses the others), and it holds the t10k files only
        raise DataError(
            f"data.path: not given, and MNIST's test set shipped with progvq has only t10k files, not "
            f"data.prefix {cfg.prefix!r}; get the whole set with: progvq data get mnist data/mnist, "
            "and set data.path: data/mnist"
        )
    if not path.exists():
        what = {"mnist": "MNIST folder", "folder": "image folder", "array": "array file"}.get(cfg.source, "data")
        what = f"{what} not found"
    elif cfg.source == "mnist" and path.is_dir() and _find_idx(path, images) is None:
        what = f"no MNIST images file (looked for {images} and {images}.gz)"
    else:
        return  # there: the source reads it and says what is wrong with it, if anything
    command = get_command(path, cfg.source)
    raise DataError(f"data.path: {path}: {what}" + (f"; get it with: {command}" if command else ""))


def _canvas(cfg: DataConfig, shape: tuple[int, ...], total_downsample: int, where: str) -> Canvas:
    """Where images of ``shape`` (C, H, W) go for the models; refuses images the levels cannot take."""
    c, h, w = shape
    canvas = Canvas.unpadded((c, h, w))
    if cfg.size is not None and cfg.source != "shapes":
        if h > cfg.size or w > cfg.size:
            raise DataError(
                f"{where}: images are {h}x{w}, larger than data.size ({cfg.size}); data.size only pads, it never crops"
                + (" (data.crop does)" if cfg.source == "folder" else "")
            )
        canvas = Canvas((c, h, w), (c, cfg.size, cfg.size))
    _, ph, pw = canvas.padded
    if ph % total_downsample or pw % total_downsample:
        raise DataError(
            f"{where}: images are {ph}x{pw}, not divisible by the levels' total downsampling {total_downsample}; "
            "set data.size to pad them"
        )
    return canvas


def _check_count(n: int, cfg: DataConfig, where: str) -> None:
    if n <= cfg.heldout:
        raise DataError(f"{where}: {n} images, need more than data.heldout ({cfg.heldout})")


def heldout_rows(paths: list[str], heldout: int, seed: int) -> np.ndarray:
    """Which of the images at ``paths`` are held out: ``heldout`` row numbers, ascending.

    Each path gets a hash of (seed, path) and the ``heldout`` smallest are held out: a
    function of the seed and the paths alone, and adding or removing one file moves at most
    one image between the splits.
    """
    # a path that is not UTF-8 (undecodable bytes held as lone surrogates) hashes as its own bytes
    keys = [hashlib.blake2b(f"{seed}\0{p}".encode("utf-8", "surrogateescape"), digest_size=8).digest() for p in paths]
    order = sorted(range(len(paths)), key=lambda i: (keys[i], paths[i]))
    return np.sort(np.array(order[:heldout], dtype=np.int64))


def _load_folder(
    cfg: DataConfig,
    total_downsample: int,
    *,
    cache_dir: Path | None,
    progress: bool | None,
    log: Callable[[str], None],
    on_shape: Callable[[tuple[int, ...]], None] | None = None,
) -> ImageData:
    """An image folder as split data (see :func:`load_dataset`)."""
    assert cfg.path is not None
    folder = Path(cfg.path)
    listing = list_folder(folder).first(cfg.limit)
    transform = Transform(cfg.channels, cfg.size, cfg.resize, cfg.crop, cfg.seed)
    # everything that can be refused from the listing and one header is refused before any decoding
    shape = first_shape(listing, transform)
    if on_shape is not None:
        on_shape(shape)
    where = shown(folder)  # a newline in the folder's name would make a refusal two lines
    canvas = _canvas(cfg, shape, total_downsample, where)
    _check_count(len(listing.entries), cfg, where)
    skip = cfg.on_unreadable == "skip"

    def enough(decoded: Decoded) -> None:
        # before a new cache is committed: a refused data set leaves no cache behind
        _check_count(len(decoded.entries), cfg, f"{where} (after skipping {len(decoded.skipped)} unreadable files)")

    if cache_dir is None:
        decoded = decode_in_memory(listing, transform, skip=skip, progress=progress, check=enough)
        if decoded.skipped:
            log(skipped_line(folder, decoded.skipped))
    else:
        decoded = cached_folder(
            listing, transform, Path(cache_dir), skip=skip, progress=progress, log=log, check=enough
        )
    held = heldout_rows([e.rel for e in decoded.entries], cfg.heldout, cfg.seed)
    keep = np.ones(len(decoded.entries), dtype=bool)
    keep[held] = False
    train_rows = np.flatnonzero(keep)
    train = MappedImages(decoded.images, train_rows)
    if cache_dir is None:
        train = torch.from_numpy(np.ascontiguousarray(decoded.images[train_rows]))
    heldout = torch.from_numpy(np.ascontiguousarray(decoded.images[held]))
    release(decoded.images)  # the pages reading the held-out images mapped (see progvq.folder.release)
    labels = None
    if decoded.classes:
        labels = torch.tensor([e.label for e in decoded.entries], dtype=torch.int64)
    return ImageData(
        train,
        heldout,
        None if labels is None else labels[train_rows],
        None if labels is None else labels[held],
        canvas,
        str(folder) if labels is not None else None,
    )


# --------------------------------------------------------------------------- sources

#: ``data.source`` -> a loader of (uint8 images (N, C, H, W), int64 labels (N,) or None) from the
#: flat ``data`` section, which every source shares.
SOURCES = Registry("data source", shared_config=True)


def _folder_source(cfg: DataConfig) -> tuple[Tensor, Tensor | None]:
    """An image folder decoded in memory, in sorted path order, with its class labels (None: no class folders)."""
    assert cfg.path is not None
    listing = list_folder(Path(cfg.path))
    transform = Transform(cfg.channels, cfg.size, cfg.resize, cfg.crop, cfg.seed)
    decoded = decode_in_memory(listing, transform, skip=cfg.on_unreadable == "skip")
    labels = torch.tensor([e.label for e in decoded.entries], dtype=torch.int64) if decoded.classes else None
    return torch.from_numpy(decoded.images), labels
SOURCES.add(
    "shapes",
    DataConfig,
    # the labels name the classes of SHAPE_CLASSES
    lambda cfg: make_labelled_shapes(
        cfg.count, size=cfg.size or SHAPES_DEFAULT_SIZE, channels=cfg.channels, seed=cfg.seed
    ),
)
SOURCES.add("mnist", DataConfig, lambda cfg: load_mnist(data_path(cfg), cfg.prefix))
SOURCES.add("folder", DataConfig, lambda cfg: _folder_source(cfg))
SOURCES.add("array", DataConfig, lambda cfg: (load_array(Path(cfg.path), cfg.key), None))
#: Sources whose images can come with class labels: shapes (what was drawn, SHAPE_CLASSES), mnist
#: (an idx labels file beside the images) and folder (class folders).
LABELLED_SOURCES = ("shapes", "mnist", "folder")


# --------------------------------------------------------------------------- a shapes folder


def write_shapes_folder(
    folder: Path, n: int, *, size: int = 32, channels: int = 3, seed: int = 0, suffix: str = ".png"
) -> None:
    """Write ``n`` shapes images (see :func:`make_labelled_shapes`) as files in class folders named after
    :data:`SHAPE_CLASSES`: an image folder with labels, to try the folder source on.

    Files are ``folder/K-CLASS/NNNNNN.png`` (``0-ellipse``, ..., ``8-triangle+triangle``), or another
    ``suffix`` (``.jpg``, ``.webp``); a PNG holds the generated pixels exactly.
    """
    import shutil
    import tempfile

    from PIL import Image

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "is not a folder" if not folder.is_dir() else "is a folder that already holds files"
        raise DataError(f"{folder}: {what}; give a new folder (nothing in it is replaced)")
    images, labels = make_labelled_shapes(n, size=size, channels=channels, seed=seed)
    # "K-name": sorted, the folders are in the order of SHAPE_CLASSES, so class K is SHAPE_CLASSES[K] here too
    names = [f"{k}-{name}" for k, name in enumerate(SHAPE_CLASSES)]
    # written in a temporary folder beside it and renamed into place: a failure or a signal leaves nothing
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in names:
            (work / name).mkdir()
        width = len(str(max(n - 1, 0)))
        for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist(), strict=True)):
            pixels = image[0] if channels == 1 else image.transpose(1, 2, 0)
            Image.fromarray(pixels).save(work / names[label] / f"{i:0{width}d}{suffix}")
        work.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; as readable as any folder
        if folder.exists():
            folder.rmdir()  # empty (checked above): the rename needs it gone
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise



if __name__ == "__main__":
    # the older spelling of `progvq data shapes`, kept for the scripts that use it
    import sys

    from run_stage import main

    _argv = sys.argv[1:]
    sys.exit(main(["data", "shapes", *_argv[1:]] if _argv[:1] == ["shapes-folder"] else ["data", *_argv]))
