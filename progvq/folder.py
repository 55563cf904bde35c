"""Folders of image files: listing, class labels, transforms, the held-out split and a uint8 cache.

A folder holds PNG, JPEG or WebP files, either directly inside it (no labels) or inside class
folders one level down (the usual image-folder convention: the sorted names of the sub-folders
are classes 0..C-1, a class folder may hold sub-folders of its own, and one without images is a
class without images). Files and folders whose
names start with a dot are not read (editors' and file managers' droppings, such as ``._x.jpg``).

Each image is decoded by Pillow, converted to grey (``L``) or colour (``RGB``), then optionally
resized so that its shorter side is ``data.size`` (bicubic, antialiased when shrinking) and cropped
to ``data.size`` x ``data.size``: at the centre, or at a random place that is fixed per image, drawn
from ``data.seed`` and the image's path. A random crop therefore never changes between epochs
or runs: the cache holds one crop per image, and a resumed run sees exactly the pixels it saw.

A listing is bounded: folders nest at most :data:`MAX_DEPTH` levels below a class folder (or the
folder itself), a folder that contains itself (a symbolic link back up) is refused rather than
walked forever, and at most :data:`MAX_ENTRIES` files and folders are looked at in all.

The cache (``RUN/data-cache``) is one raw file of uint8 images (N, C, H, W) read through a memory
map, and a manifest that names the files (path, size, modification time), the transform, the
classes and the cache file's length and digest. It is reused while the folder is unchanged and
rebuilt when anything in the manifest differs or the cache file is damaged. The manifest is read
as a stranger's document (:mod:`progvq.untrusted`): one that fails its schema is damaged, and the
cache is built again. Every write goes to a temporary file first; the manifest is replaced last,
so an interrupted or failed build leaves the previous cache whole.

Sizes are checked before the work: what one image becomes (and the resize before the crop) against
memory, the whole cache against the free space of its disk, and an in-memory decode against memory.

A file name may hold any character but ``/``: in messages, a name with a control character (a
newline, a tab) is written with backslash escapes (:func:`shown`), so an error stays one line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from progvq.canvas import Canvas
from progvq.errors import DataError, ProgvqError
from progvq.fileio import atomic_write as _atomic_write
from progvq.fileio import current_umask
from progvq.memory import check_fits, human
from progvq.untrusted import ANY, Dict, Int, List, Str, UntrustedError, parse_json

#: File name suffixes (compared lower-cased) that are read as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RESIZES = ("none", "shorter-side")
CROPS = ("none", "centre", "random")
ON_UNREADABLE = ("refuse", "skip")

#: Folder of the cache inside the run folder, and its manifest.
CACHE_DIR = "data-cache"
MANIFEST = "manifest.json"
#: The cached files, one a line: path, size, mtime (ns), class (-1: none), tab-separated, UTF-8.
#: In the path a backslash is written ``\\``, a tab ``\t``, a newline ``\n``, a carriage return ``\r``,
#: any other control or line-breaking character ``\xNN`` or ``\uNNNN`` (as are the undecodable bytes
#: of a name that is not UTF-8, which Python holds as lone surrogates): so each file is one line
#: whatever its name, and :func:`read_files_table` reads the paths back exactly.
FILES = "files.tsv"
#: Bumped whenever the cache's layout or the decoding changes, so older caches are rebuilt.
CACHE_VERSION = 1
#: Bytes hashed per read when a cache file's digest is computed or checked.
_BLOCK = 1 << 24
#: Levels of folders read below a class folder (or below the folder itself when it has no classes).
MAX_DEPTH = 64
#: Files and folders a listing looks at, in all: past it the folder is refused (a listing of
#: 10 million entries already takes minutes and a gigabyte of memory).
MAX_ENTRIES = 10_000_000
#: Largest manifest read back: a manifest is small unless it lists hundreds of thousands of skipped files.
MANIFEST_MAX_BYTES = 64 << 20
#: What one image may take (its resize and crop) before memory is asked: reading the machine's free
#: memory costs a file read, and an image this small fits anywhere progvq runs.
_ALWAYS_FITS = 64 << 20

# What Pillow raises on corrupt or hostile input, beyond OSError (which covers
# UnidentifiedImageError and "image file is truncated"): some plugins signal bad
# headers with SyntaxError/ValueError/struct.error, a short stream with EOFError,
# and huge declared sizes with DecompressionBombError.
PIL_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


def reason(exc: BaseException) -> str:
    """A library exception's message squeezed onto one line (DataError is one line)."""
    return shown(" ".join(str(exc).split()) or type(exc).__name__)


# --------------------------------------------------------------------------- names on one line

#: Characters written escaped: control characters, Unicode's line and paragraph separators (which
#: ``str.splitlines`` breaks at) and lone surrogates (the undecodable bytes of a name that is not UTF-8).
_SPECIAL = r"\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_NEEDS_ESCAPE = re.compile(f"[{_SPECIAL}]")
_ESCAPED = re.compile(rf"[\\{_SPECIAL}]")
_SHORT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPE = re.compile(r"\\(?:([\\tnr])|x([0-9a-f]{2})|u([0-9a-f]{4}))")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_name(text: str) -> str:
    """``text`` with backslashes and special characters (see :data:`FILES`) written as backslash escapes."""
    return _ESCAPED.sub(_escape_char, text)


def unescape_name(text: str) -> str:
    """The name :func:`escape_name` wrote as ``text``; raises ValueError for a stray backslash."""
    out: list[str] = []
    at = 0
    while (slash := text.find("\\", at)) >= 0:
        match = _UNESCAPE.match(text, slash)
        if match is None:
            raise ValueError(f"a backslash not followed by an escape at character {slash}")
        out.append(text[at:slash])
        short, byte, wide = match.groups()
        if short is not None:
            out.append({"t": "\t", "n": "\n", "r": "\r"}.get(short, short))
        else:
            out.append(chr(int(byte or wide, 16)))
        at = match.end()
    out.append(text[at:])
    return "".join(out)


def shown(path: Path | str) -> str:
    """``path`` for a message: as it is, or escaped (:func:`escape_name`) when it holds a character that would
    break the line or the terminal's encoding (a newline in a file's name would make an error two lines)."""
    text = str(path)
    return escape_name(text) if _NEEDS_ESCAPE.search(text) else text


def _utf8(text: str) -> bytes:
    """``text`` as the bytes it came from: a name that is not UTF-8 hashes as its own bytes, not as an error."""
    return text.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True, slots=True)
class Entry:
    """One image file: its path relative to the folder (``/``-separated), size, mtime and class (-1: none)."""

    rel: str
    size: int
    mtime_ns: int
    label: int = -1

    def record(self) -> list[Any]:
        """What the manifest keeps of the file: a change to any of it rebuilds the cache."""
        return [self.rel, self.size, self.mtime_ns, self.label]


@dataclass
class Listing:
    """The image files of a folder, sorted by relative path, and the class names (empty: no classes)."""

    folder: Path
    entries: list[Entry]
    classes: list[str] = field(default_factory=list)
    complete: bool = True  # False: the first entries only (data.limit)

    def first(self, limit: int | None) -> Listing:
        """The first ``limit`` files (all of them for None)."""
        if limit is None or limit >= len(self.entries):
            return self
        return Listing(self.folder, self.entries[:limit], self.classes, complete=False)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


@dataclass
class _Budget:
    """The files and folders one listing of ``folder`` has looked at, counted against :data:`MAX_ENTRIES`."""

    folder: Path
    seen: int = 0

    def scan(self, path: str) -> list[os.DirEntry[str]]:
        """The entries of the folder ``path`` sorted by name, each counted as it is read: a folder of a
        billion entries is refused after :data:`MAX_ENTRIES`, not held in memory first."""
        items: list[os.DirEntry[str]] = []
        try:
            with os.scandir(path) as it:
                for item in it:
                    self.seen += 1
                    if self.seen > MAX_ENTRIES:
                        raise DataError(
                            f"{shown(self.folder)}: more than {MAX_ENTRIES:,} files and folders in it (counted "
                            f"up to {shown(path)}); progvq lists at most {MAX_ENTRIES:,}: "
                            "point data.path at a smaller folder"
                        )
                    items.append(item)
        except OSError as exc:
            raise DataError(f"{shown(path)}: cannot list image folder ({exc.strerror or reason(exc)})") from None
        items.sort(key=lambda e: e.name)
        return items


@dataclass
class _Open:
    """A folder being walked: its path, its path relative to the listed folder, its (st_dev, st_ino),
    its sorted entries and the index of the next one to look at."""

    path: str
    rel: str
    key: tuple[int, int]
    items: list[os.DirEntry[str]]
    next: int = 0


def _folder_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _walk_images(
    top: str, rel: str, label: int, budget: _Budget, outer: dict[tuple[int, int], str], key: tuple[int, int]
) -> Iterator[Entry]:
    """Image files under the folder ``top`` (``key``: its (st_dev, st_ino)), dot-names skipped, as entries
    of class ``label``, in the order of a depth-first walk over sorted names.

    A loop over a stack of open folders rather than recursion: a tree thousands of folders deep is
    refused at :data:`MAX_DEPTH` levels in one line, not in a RecursionError. ``outer`` names the
    folders ``top`` lies in (the listed folder): a folder that is one of the folders it lies in (a
    symbolic link back up) is a loop and is refused, where following it would never end. The same
    folder reached twice on separate paths (two links to it) is no loop and is read under both.

    Each file is made an :class:`Entry` at once, keeping none of the stat objects: a folder of a
    million files would hold hundreds of megabytes of them.
    """
    on_path = dict(outer)
    if key in on_path:
        raise DataError(_loop(top, on_path[key]))
    stack = [_Open(top, rel, key, budget.scan(top))]
    on_path[key] = top
    while stack:
        here = stack[-1]
        if here.next == len(here.items):
            stack.pop()
            del on_path[here.key]
            continue
        item = here.items[here.next]
        here.next += 1
        if item.name.startswith("."):
            continue
        path = f"{here.rel}/{item.name}" if here.rel else item.name
        try:
            if item.is_dir():
                found = _folder_key(item.stat())
                if found in on_path:
                    raise DataError(_loop(item.path, on_path[found]))
                if len(stack) > MAX_DEPTH:
                    raise DataError(
                        f"{shown(item.path)}: folders nested more than {MAX_DEPTH} levels below {shown(top)}; "
                        f"progvq reads at most {MAX_DEPTH} levels of folders in a class folder"
                    )
                stack.append(_Open(item.path, path, found, budget.scan(item.path)))
                on_path[found] = item.path
            elif _is_image(item.name) and item.is_file():
                st = item.stat()
                yield Entry(path, st.st_size, st.st_mtime_ns, label)
        except OSError as exc:
            raise DataError(f"{shown(item.path)}: cannot read ({exc.strerror or reason(exc)})") from None


def _loop(path: str, outer: str) -> str:
    """The refusal of a folder ``path`` that is the folder ``outer`` it lies in."""
    return (
        f"{shown(path)}: a folder loop: it is {shown(outer)}, a folder it lies in (a symbolic link back up?); "
        "remove the link or point data.path below it"
    )


def list_folder(folder: Path, *, classes: bool = True) -> Listing:
    """The image files of ``folder``: directly inside it, or (``classes``) in class folders below it.

    Raises :class:`DataError` for a missing folder, a folder with no images, or a folder
    with images both directly inside and in class folders (which of them would be what?);
    and for a tree deeper than :data:`MAX_DEPTH`, with a folder loop, or of more than
    :data:`MAX_ENTRIES` files and folders.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            what = "not a folder (data.path of source folder names a folder of images)"
        else:
            what = "image folder not found"
        raise DataError(f"{shown(folder)}: {what}")
    budget = _Budget(folder)
    try:
        key = _folder_key(folder.stat())
        items = budget.scan(str(folder))
        top = [
            Entry(e.name, st.st_size, st.st_mtime_ns)
            for e in items
            if _is_image(e.name) and e.is_file()
            for st in (e.stat(),)
        ]
        subdirs = [(e, _folder_key(e.stat())) for e in items if not e.name.startswith(".") and e.is_dir()]
    except OSError as exc:
        raise DataError(f"{shown(folder)}: cannot list image folder ({exc.strerror or reason(exc)})") from None
    found: list[tuple[str, list[Entry]]] = []
    if classes:
        outer = {key: str(folder)}
        found = [
            (sub.name, list(_walk_images(sub.path, sub.name, k, budget, outer, sub_key)))
            for k, (sub, sub_key) in enumerate(subdirs)
        ]
        if not any(files for _, files in found):
            found = []  # no class folders: a flat folder (its sub-folders hold no images)
    if top and found:
        raise DataError(
            f"{shown(folder)}: images both directly inside ({shown(top[0].rel)}) and in class folders "
            f"({shown(next(name for name, files in found if files))}/); "
            "keep every image in a class folder, or none"
        )
    if found:
        entries = [entry for _, files in found for entry in files]
        entries.sort(key=lambda e: e.rel)
        return Listing(folder, entries, [name for name, _ in found])
    if not top:
        where = " or in class folders" if classes else ""
        # the suffixes once read and still read; WebP came later
        raise DataError(f"{shown(folder)}: no image files (.png, .jpg, .jpeg) or .webp files in it{where}")
    return Listing(folder, top)


# --------------------------------------------------------------------------- transform


@dataclass(frozen=True)
class Transform:
    """How a file becomes a uint8 (C, H, W) image: channels, then resize, then crop to ``size``."""

    channels: int
    size: int | None = None
    resize: str = "none"
    crop: str = "none"
    seed: int = 0  # the random crop's

    def record(self) -> dict[str, Any]:
        """What the cache depends on (the seed only for a random crop)."""
        out: dict[str, Any] = {"channels": self.channels, "resize": self.resize, "crop": self.crop}
        if self.resize != "none" or self.crop != "none":
            out["size"] = self.size
        if self.crop == "random":
            out["seed"] = self.seed
        return out

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of the image a (width, height) file becomes."""
        if self.crop != "none":
            assert self.size is not None
            return self.size, self.size
        if self.resize == "shorter-side":
            assert self.size is not None
            w, h = _shorter_side(width, height, self.size)
            return h, w
        return height, width

    def check_memory(self, width: int, height: int, where: str) -> None:
        """Refuse, in one line naming ``where`` and data.size, a (width, height) image whose resize and
        crop would take more memory than there is: checked on the header's size, before the decode."""
        pixel = 1 if self.channels == 1 else 4  # Pillow keeps RGB images at 4 bytes a pixel
        h, w = self.output_size(width, height)
        need = self.channels * h * w
        steps = f"an image of {self.channels}x{h}x{w}"
        if self.resize == "shorter-side":
            assert self.size is not None
            rw, rh = _shorter_side(width, height, self.size)
            need += rw * rh * pixel
            steps = f"resizing a {width}x{height} image to {rw}x{rh} (data.size {self.size}) for {steps}"
        elif self.crop != "none":
            steps = f"{steps} (data.size {self.size})"
        if need <= _ALWAYS_FITS:
            return
        try:
            check_fits(need, f"{where}: {steps}")
        except ProgvqError as err:
            raise DataError(str(err)) from None

    def apply(self, img: Image.Image, path: Path, rel: str) -> np.ndarray:
        """A Pillow image, opened but not yet decoded -> uint8 (C, H, W). ``rel`` places a random crop.

        What the resize and crop would make is checked on the header's size before the decode: an
        image too small for the crop, or one whose resize would not fit in memory, is refused first.
        """
        width, height = img.size
        # a resize to the shorter side makes both sides at least data.size; without one the file must be
        if self.crop != "none" and self.resize == "none":
            assert self.size is not None
            if width < self.size or height < self.size:
                raise DataError(
                    f"{shown(path)}: image is {width}x{height}, smaller than the {self.size}x{self.size} crop "
                    "(data.size; data.resize: shorter-side scales images up to it)"
                )
        self.check_memory(width, height, shown(path))
        img = img.convert("L" if self.channels == 1 else "RGB")  # a full decode: truncated data fails here
        if self.resize == "shorter-side":
            assert self.size is not None
            target = _shorter_side(*img.size, self.size)
            if target != img.size:
                img = img.resize(target, Image.Resampling.BICUBIC)
        if self.crop != "none":
            assert self.size is not None
            w, h = img.size
            if self.crop == "centre":
                left, top = (w - self.size) // 2, (h - self.size) // 2
            else:
                left, top = _crop_offset(self.seed, rel, w - self.size + 1, h - self.size + 1)
            img = img.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(img, dtype=np.uint8)
        # mode "L" gives (H, W): add the channel axis so both modes come out alike
        return pixels.reshape(pixels.shape[0], pixels.shape[1], self.channels).transpose(2, 0, 1)


def _shorter_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is ``size``, the other rounded (never below ``size``)."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def _crop_offset(seed: int, rel: str, spread_x: int, spread_y: int) -> tuple[int, int]:
    """A crop's (left, top) in [0, spread_x) x [0, spread_y), a function of the seed and the file's path only.

    A hash rather than a generator drawn in file order: adding or removing another file
    leaves every other image's crop where it was.
    """
    digest = hashlib.blake2b(_utf8(f"{seed}\0{rel}"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") % spread_x, int.from_bytes(digest[8:], "big") % spread_y


def probe(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header (no decode)."""
    try:
        with Image.open(path) as img:
            return img.size
    except PIL_ERRORS as exc:
        raise DataError(f"{shown(path)}: cannot read image ({type(exc).__name__}: {reason(exc)})") from None


class Unreadable(DataError):
    """A file that Pillow cannot decode (as opposed to one that decodes to an unusable size)."""


def decode(folder: Path, entry: Entry, transform: Transform) -> np.ndarray:
    """The file of ``entry`` as uint8 (C, H, W); raises :class:`DataError` naming it when unreadable."""
    path = folder / entry.rel
    try:
        with Image.open(path) as img:
            return transform.apply(img, path, entry.rel)
    except DataError:
        raise
    except PIL_ERRORS as exc:
        raise Unreadable(f"{shown(path)}: cannot read image ({type(exc).__name__}: {reason(exc)})") from None


# --------------------------------------------------------------------------- decoding many


@dataclass
class Decoded:
    """The images of a folder after its transform: uint8 (N, C, H, W) (an array or a memory map)."""

    images: np.ndarray
    entries: list[Entry]  # the images' files, in the images' order (skipped files left out)
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # "rel: reason" of each file skipped as unreadable


def _decode_all(
    listing: Listing,
    transform: Transform,
    shape: tuple[int, int, int],
    write: Callable[[np.ndarray], None],
    *,
    skip: bool,
    progress: bool | None,
    desc: str,
) -> tuple[list[Entry], list[str]]:
    """Decode every file of ``listing`` in order and hand each image to ``write``.

    Each file's size and mtime are compared with the listing's just before it is read, so
    a folder that changes under the build is noticed. Returns the entries written and the
    skipped files.
    """
    kept: list[Entry] = []
    skipped: list[str] = []
    # disable=None: a bar only on a terminal, so logs and captured output stay free of it
    bar = tqdm(listing.entries, desc=desc, unit="img", disable=None if progress is None else not progress, leave=False)
    for entry in bar:
        path = listing.folder / entry.rel
        _check_unchanged(listing.folder, path, entry)
        try:
            image = decode(listing.folder, entry, transform)
        except Unreadable as err:
            if not skip:
                raise
            skipped.append(f"{entry.rel}: {str(err).removeprefix(f'{shown(path)}: ')}")
            continue
        if image.shape != shape:
            raise DataError(
                f"{shown(path)}: image size {image.shape[2]}x{image.shape[1]} differs from "
                f"{shown(listing.entries[0].rel)}'s "
                f"{shape[2]}x{shape[1]} (width x height); data.crop with data.size brings images to one size"
            )
        write(image)
        kept.append(entry)
    return kept, skipped


def _check_unchanged(folder: Path, path: Path, entry: Entry) -> None:
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
        raise DataError(
            f"{shown(folder)}: changed while its images were read ({shown(entry.rel)} was "
            f"{'removed' if st is None else 'rewritten'}); run the command again once the folder is still"
        )


def first_shape(listing: Listing, transform: Transform) -> tuple[int, int, int]:
    """(C, H, W) the first image becomes, from its header alone (what every image must become).

    Refuses (one line naming the file and data.size) when that image, the resize before its crop,
    or (data.size without a crop) the padded canvas would take more memory than there is: before
    any image is decoded or resized.
    """
    path = listing.folder / listing.entries[0].rel
    if transform.crop != "none":
        assert transform.size is not None
        try:
            width, height = probe(path)
        except DataError:
            # unreadable: its decode refuses or skips it; a resize makes both sides at least data.size
            width = height = transform.size
        transform.check_memory(width, height, shown(path))
        return transform.channels, transform.size, transform.size
    width, height = probe(path)
    transform.check_memory(width, height, shown(path))
    if transform.size is not None:
        # data.size without a crop pads each image to size x size for the models, which read it as float32
        c, size = transform.channels, transform.size
        try:
            check_fits(
                4 * c * size * size,
                f"data.size: {size}: one image of {shown(listing.folder)} padded to {c}x{size}x{size} (float32)",
            )
        except ProgvqError as err:
            raise DataError(str(err)) from None
    return (transform.channels, *transform.output_size(width, height))


def decode_in_memory(
    listing: Listing,
    transform: Transform,
    *,
    skip: bool = False,
    progress: bool | None = None,
    check: Callable[[Decoded], None] | None = None,
) -> Decoded:
    """Every image of ``listing`` decoded into memory: uint8 (N, C, H, W), seen by ``check`` (which may refuse).

    The array's size is checked against memory before it is allocated or any image decoded.
    """
    shape = first_shape(listing, transform)
    count = len(listing.entries)
    c, h, w = shape
    try:
        check_fits(count * c * h * w, f"{shown(listing.folder)}: {count} images of {c}x{h}x{w} decoded in memory")
    except ProgvqError as err:
        raise DataError(str(err)) from None
    images = np.empty((count, *shape), dtype=np.uint8)
    n = 0

    def write(image: np.ndarray) -> None:
        nonlocal n
        images[n] = image
        n += 1

    kept, skipped = _decode_all(
        listing, transform, shape, write, skip=skip, progress=progress, desc=f"reading {shown(listing.folder)}"
    )
    decoded = Decoded(images[:n], kept, listing.classes, skipped)
    if check is not None:
        check(decoded)
    return decoded


# --------------------------------------------------------------------------- the cache


def _source_record(listing: Listing, transform: Transform) -> dict[str, Any]:
    """What a cache is a function of: the folder's files (a digest of each one's path, size, mtime and
    class, so a folder of millions of files makes a small record) and the transform."""
    files = hashlib.blake2b(digest_size=20)
    for entry in listing.entries:
        files.update(json.dumps(entry.record()).encode() + b"\n")
    return {
        "version": CACHE_VERSION,
        "folder": str(listing.folder.resolve()),
        "transform": transform.record(),
        "classes": listing.classes,
        "count": len(listing.entries),
        "files": files.hexdigest(),
    }


def _digest_file(path: Path, length: int) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        left = length
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


#: The manifest's schema. ``source`` is compared whole with the record of the folder as it is, so
#: any value (within the nesting bound) will do: one that differs only means a rebuild.
_MANIFEST_SCHEMA = Dict(
    required={
        "source": ANY,
        # the name _cache_name gives: no folder, no "..", nothing but the one file it names
        "file": Str(max_len=64, pattern=r"images-[0-9a-f]{16}\.u8"),
        "shape": List(Int(0, 2**31 - 1), max_len=4, min_len=4),
        "bytes": Int(0, 2**62),
        "digest": Str(max_len=40, pattern=r"[0-9a-f]{40}"),
    },
    optional={
        "skipped": List(Str(max_len=1 << 16), max_len=MAX_ENTRIES),
        "skipped_files": List(Str(max_len=1 << 16), max_len=MAX_ENTRIES),
    },
)


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest at ``path`` checked against its schema, or (None, why it cannot be used); (None, None)
    when there is none.

    Opened without blocking and read only when a regular file, at most :data:`MANIFEST_MAX_BYTES`:
    a named pipe or ``/dev/zero`` put in its place is damage, not a hang.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{MANIFEST} cannot be opened ({exc.strerror or reason(exc)})"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, f"{MANIFEST} is not a regular file"
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MANIFEST_MAX_BYTES + 1)
    except OSError as exc:
        return None, f"{MANIFEST} cannot be read ({exc.strerror or reason(exc)})"
    finally:
        os.close(fd)
    try:
        return parse_json(data, _MANIFEST_SCHEMA, max_bytes=MANIFEST_MAX_BYTES), None
    except UntrustedError as err:
        return None, f"{MANIFEST}: {err}"


def load_manifest(cache: Path) -> dict[str, Any] | None:
    """The manifest of the data cache folder ``cache`` checked against its schema, or None when there is
    none or it cannot be used (for readers besides :func:`cached_folder`, such as a record of the data)."""
    manifest, _ = _read_manifest(Path(cache) / MANIFEST)
    return manifest


def _cache_problem(cache: Path, manifest: dict[str, Any], listing: Listing, shape: tuple[int, int, int]) -> str | None:
    """Why the cache file a (matching, schema-checked) manifest names cannot be used; None when it is whole.

    Beyond the schema the values must agree with each other and with the folder: the images the
    folder's files make (``shape``: what the first one becomes), less the skipped files, each of
    which is one of the folder's.
    """
    name, dims, length, digest = (manifest[k] for k in ("file", "shape", "bytes", "digest"))
    gone = manifest.get("skipped_files", [])
    skipped = manifest.get("skipped", [])
    rels = {e.rel for e in listing.entries}
    if len(set(gone)) != len(gone) or not rels.issuperset(gone) or len(skipped) != len(gone):
        return "its manifest's skipped files are not the folder's"
    if dims != [len(listing.entries) - len(gone), *shape]:
        return f"its manifest's shape {dims} is not that of the folder's images"
    if int(np.prod(dims, dtype=object)) != length:
        return "its manifest is inconsistent"
    path = cache / name
    try:
        st = path.stat()
    except OSError:
        return f"{name} is missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{name} is not a regular file"
    if st.st_size != length:
        return f"{name} is {st.st_size} bytes, its manifest says {length}"
    if length and _digest_file(path, length) != digest:
        return f"{name} does not match its digest"
    return None


def _cache_name(source: dict[str, Any]) -> str:
    """The cache file's name: a function of the source record, so a rebuild of another source never
    overwrites the file a running reader maps."""
    key = hashlib.blake2b(json.dumps(source, sort_keys=True).encode(), digest_size=8).hexdigest()
    return f"images-{key}.u8"


@dataclass
class _Made:
    """Folders this process created for a cache, removed again if the build fails while they are empty."""

    dirs: list[Path] = field(default_factory=list)

    def mkdir(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"{shown(path)}: cannot make the data cache folder ({exc.strerror or reason(exc)})"
            ) from None
        self.dirs = missing  # deepest first

    def undo(self) -> None:
        for d in self.dirs:
            try:
                d.rmdir()  # only when empty: never anything that holds files
            except OSError:
                break


def cached_folder(
    listing: Listing,
    transform: Transform,
    run_dir: Path,
    *,
    skip: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    check: Callable[[Decoded], None] | None = None,
) -> Decoded:
    """The images of ``listing`` from the memory-mapped cache in ``run_dir/data-cache``, built if needed.

    ``check`` sees what was decoded (skipped files left out) before a new cache is committed,
    and may refuse it: a refused build leaves nothing behind.

    The returned images are a read-only ``np.memmap`` (N, C, H, W) uint8. Raises
    :class:`DataError` (one line) when the folder cannot be read, changes while the cache
    is built, or the cache cannot be written; the previous cache is then left as it was.
    """
    cache = Path(run_dir) / CACHE_DIR
    source = _source_record(listing, transform)
    made = _Made()
    if cache.exists() and not cache.is_dir():
        raise DataError(f"{shown(cache)}: not a folder (progvq keeps its data cache there); move it away")
    made.mkdir(cache)
    try:
        lock = os.open(cache, os.O_RDONLY)
    except OSError as exc:
        made.undo()
        raise DataError(f"{shown(cache)}: cannot open the data cache folder ({exc.strerror or reason(exc)})") from None
    try:
        # one builder at a time (several ranks of one run, two commands); the kernel drops the lock if we die
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest, problem = _read_manifest(cache / MANIFEST)
        if manifest is not None and manifest["source"] == source:
            problem = _cache_problem(cache, manifest, listing, first_shape(listing, transform))
            if problem is None:
                decoded = _open(cache, manifest, listing, log)
                if check is not None:
                    check(decoded)
                return decoded
        if problem is not None:
            log(f"{shown(cache)}: data cache damaged ({problem}); building it again")
        elif manifest is not None:
            log(f"{shown(cache)}: {_what_changed(manifest['source'], source)}; building the data cache again")
        return _build(cache, listing, transform, source, skip=skip, progress=progress, log=log, check=check)
    except BaseException:
        made.undo()
        raise
    finally:
        os.close(lock)


def _what_changed(old: Any, new: dict[str, Any]) -> str:
    """What differs between a manifest's ``source`` (any JSON value) and the folder's, in a few words:
    never the old value itself, which may be anything (a log line stays one short line)."""
    if not isinstance(old, dict):
        return "the manifest is from another version"
    count = old.get("count")
    if count != new["count"]:
        then = count if type(count) is int else "another number"
        return f"the folder holds {new['count']} images, the cache {then}"
    for key in ("version", "folder", "transform", "classes"):
        if old.get(key) != new[key]:
            return f"the {key} differs from the cache's"
    return "the folder's files changed since the cache was built"


def _open(cache: Path, manifest: dict[str, Any], listing: Listing, log: Callable[[str], None]) -> Decoded:
    """The cache a manifest checked by :func:`_cache_problem` names, mapped."""
    shape = tuple(manifest["shape"])
    images = _map(cache / manifest["file"], shape)
    skipped = list(manifest.get("skipped", []))
    gone = set(manifest.get("skipped_files", []))
    entries = [e for e in listing.entries if e.rel not in gone] if gone else listing.entries
    if skipped:
        log(skipped_line(listing.folder, skipped))
    return Decoded(images, entries, listing.classes, skipped)


def skipped_line(folder: Path, skipped: list[str]) -> str:
    """The log line of skipped files: their count and the first (its name escaped, so one line)."""
    return f"{shown(folder)}: {len(skipped)} unreadable files skipped (first: {shown(skipped[0])})"


def _build(
    cache: Path,
    listing: Listing,
    transform: Transform,
    source: dict[str, Any],
    *,
    skip: bool,
    progress: bool | None,
    log: Callable[[str], None],
    check: Callable[[Decoded], None] | None,
) -> Decoded:
    """Decode ``listing`` into a new cache file in ``cache``, then write its files table and manifest.

    Everything that can be refused without decoding is refused first, leaving nothing behind: a
    folder where a file of the cache goes, an image (or its resize) too large for memory, a cache
    too large for the free space of its disk.
    """
    name = _cache_name(source)
    for part in (name, FILES, MANIFEST):
        try:
            in_the_way = stat.S_ISDIR((cache / part).lstat().st_mode)
        except OSError:
            in_the_way = False  # nothing there (or nothing readable): the write says what is wrong
        if in_the_way:
            raise DataError(f"{shown(cache / part)}: a folder where progvq writes its data cache; move it away")
    shape = first_shape(listing, transform)
    per_image = int(np.prod(shape))
    _check_disk(cache, len(listing.entries), shape, transform)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=cache)
    tmp = Path(tmp_name)
    h = hashlib.blake2b(digest_size=20)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600; as readable as the run's other files

            def write(image: np.ndarray) -> None:
                data = np.ascontiguousarray(image).tobytes()
                h.update(data)
                f.write(data)

            kept, skipped = _decode_all(
                listing, transform, shape, write, skip=skip, progress=progress, desc=f"caching {shown(listing.folder)}"
            )
            f.flush()
            os.fsync(f.fileno())
        again = list_folder(listing.folder).entries
        if not listing.complete:
            again = again[: len(listing.entries)]
        if [e.record() for e in again] != [e.record() for e in listing.entries]:
            raise DataError(
                f"{shown(listing.folder)}: changed while its images were read (files added, removed or rewritten); "
                "run the command again once the folder is still"
            )
        if check is not None:
            check(Decoded(_map(tmp, (len(kept), *shape)), kept, listing.classes, skipped))
        full = (len(kept), *shape)
        manifest = {
            "source": source,
            "file": name,
            "shape": list(full),
            "bytes": len(kept) * per_image,
            "digest": h.hexdigest(),
            "skipped": skipped,
        }
        if skipped:
            kept_rels = {e.rel for e in kept}
            manifest["skipped_files"] = [e.rel for e in listing.entries if e.rel not in kept_rels]
        text = json.dumps(manifest, indent=1).encode()
        if len(text) > MANIFEST_MAX_BYTES:
            # a manifest the next read would refuse as damaged: every command would build the cache again
            raise DataError(
                f"{shown(listing.folder)}: {len(skipped)} unreadable files skipped, more than the data cache's "
                f"manifest can list in {human(MANIFEST_MAX_BYTES)}; remove them from the folder"
            )
        os.replace(tmp, cache / name)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{shown(cache / name)}: cannot write the data cache ({exc.strerror or reason(exc)})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the files one per line, for people (the manifest holds their digest); then the manifest itself
    table = files_table(listing.entries)
    for part, write_part in ((FILES, lambda f: f.write(table)), (MANIFEST, lambda f: f.write(text))):
        try:
            _atomic_write(cache / part, write_part)
        except OSError as exc:
            raise DataError(f"{shown(cache / part)}: cannot write ({exc.strerror or reason(exc)})") from None
    _remove_old(cache, name)
    if skipped:
        log(skipped_line(listing.folder, skipped))
    images = _map(cache / name, full)
    return Decoded(images, kept, listing.classes, skipped)


def _map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array ``shape`` in the file ``path``, memory-mapped read-only (an empty one cannot be mapped)."""
    if 0 in shape:
        return np.zeros(shape, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)


def _check_disk(cache: Path, count: int, shape: tuple[int, int, int], transform: Transform) -> None:
    """Refuse a cache of ``count`` images of ``shape`` that the free space of ``cache``'s disk cannot hold,
    before anything is written (the old cache, if any, stays until the new one is whole)."""
    need = count * int(np.prod(shape, dtype=object))
    try:
        free = shutil.disk_usage(cache).free
    except OSError:
        return  # a file system that does not say: the write itself fails, and says why
    if need > free:
        c, h, w = shape
        size = f" (data.size {transform.size})" if transform.size is not None else ""
        raise DataError(
            f"{shown(cache)}: a data cache of {count} images of {c}x{h}x{w}{size} would take {human(need)}, "
            f"more than the {human(free)} free on its disk"
        )


def _remove_old(cache: Path, name: str) -> None:
    """Remove earlier cache files and leftovers of interrupted builds from ``cache``, now that the manifest
    names ``name``. Only regular files of those names go; anything else (a folder someone left under such a
    name) stays, and a file that cannot be removed is left for the next build: the new cache is whole."""
    try:
        names = [entry.name for entry in os.scandir(cache) if entry.is_file(follow_symlinks=False)]
    except OSError:
        return
    for old in names:
        is_old = old.startswith("images-") and old.endswith(".u8") and old != name
        if is_old or (old.startswith(".images-") and old.endswith(".tmp")):
            try:
                (cache / old).unlink()
            except OSError:
                pass


def files_table(entries: list[Entry]) -> bytes:
    """``files.tsv`` of ``entries``: one line a file, its path escaped (see :data:`FILES`)."""
    return "".join(f"{escape_name(e.rel)}\t{e.size}\t{e.mtime_ns}\t{e.label}\n" for e in entries).encode()


def read_files_table(path: Path) -> list[Entry]:
    """The entries a ``files.tsv`` written by :func:`files_table` lists; raises ValueError naming the line
    of one that is not four tab-separated fields, a path with a stray backslash or a non-integer number."""
    entries = []
    lines = Path(path).read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}: line {number} has {len(fields)} fields, not 4")
        try:
            entries.append(Entry(unescape_name(fields[0]), int(fields[1]), int(fields[2]), int(fields[3])))
        except ValueError as err:
            raise ValueError(f"{path}: line {number}: {err}") from None
    return entries


# --------------------------------------------------------------------------- lazy images


#: Reads of a memory map between two releases of its pages (see :func:`release`).
RELEASE_EVERY = 4


def release(array: np.ndarray) -> None:
    """Unmap the pages of ``array``'s memory map from this process (MADV_DONTNEED); a no-op for other arrays.

    Reading a row maps far more than the row: the kernel maps whole page-cache folios around
    each fault (about 300 KB a row here), so random batches would map the whole cache into the
    process within a few hundred steps and count it as its resident memory. The pages stay in
    the page cache, so the next read of them is a minor fault; releasing every
    ``RELEASE_EVERY`` batches cost about 0.2 ms a batch of 64 and kept under 20 MB mapped, not 600.
    """
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


class MappedImages:
    """Rows of a uint8 image array (N, C, H, W), typically a memory map, that index like a tensor.

    ``images[index]`` (a tensor or array of row numbers, a slice or an int) reads those rows
    into an ordinary tensor (B, C, H, W), so only the batches in use are ever in memory.
    With a ``canvas`` the rows come placed on it (padded) and on ``device``.
    """

    def __init__(
        self,
        array: np.ndarray,
        rows: np.ndarray,
        canvas: Canvas | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.canvas = canvas
        self.device = device
        self._reads = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        """(N, C, H, W), on the canvas when there is one."""
        c, h, w = self.canvas.padded if self.canvas is not None else self.array.shape[1:]
        return torch.Size((len(self.rows), int(c), int(h), int(w)))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        rows = self.rows[index]
        # fancy indexing a memory map copies just these rows out of it
        out = torch.from_numpy(np.ascontiguousarray(self.array[rows]))
        self._reads += 1
        if self._reads % RELEASE_EVERY == 0:
            release(self.array)
        if self.device is not None:
            out = out.to(self.device)
        return self.canvas.pad(out) if self.canvas is not None else out

    def placed(self, canvas: Canvas, device: torch.device) -> MappedImages:
        """The same rows, each batch read onto ``canvas`` and ``device``."""
        return MappedImages(self.array, self.rows, canvas, device)

    def to(self, device: torch.device | str) -> Tensor:
        """Every row read into one tensor on ``device`` (for small splits)."""
        return self[:].to(device)

    def contiguous(self) -> Tensor:
        return self[:]
