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

The cache (``RUN/data-cache``) is one raw file of uint8 images (N, C, H, W) read through a memory
map, and a manifest that names the files (path, size, modification time), the transform, the
classes and the cache file's length and digest. It is reused while the folder is unchanged and
rebuilt when anything in the manifest differs or the cache file is damaged. Every write goes to a
temporary file first; the manifest is replaced last, so an interrupted or failed build leaves the
previous cache whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
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
from progvq.errors import DataError
from progvq.fileio import atomic_write as _atomic_write

#: File name suffixes (compared lower-cased) that are read as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RESIZES = ("none", "shorter-side")
CROPS = ("none", "centre", "random")
ON_UNREADABLE = ("refuse", "skip")

#: Folder of the cache inside the run folder, and its manifest.
CACHE_DIR = "data-cache"
MANIFEST = "manifest.json"
#: The cached files, one a line: path, size, mtime (ns), class (-1: none), tab-separated.
FILES = "files.tsv"
#: Bumped whenever the cache's layout or the decoding changes, so older caches are rebuilt.
CACHE_VERSION = 1
#: Bytes hashed per read when a cache file's digest is computed or checked.
_BLOCK = 1 << 24

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
    return " ".join(str(exc).split()) or type(exc).__name__


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


def _walk_images(top: Path, rel: str, label: int = -1) -> Iterator[Entry]:
    """Image files under ``top`` (recursively, dot-names skipped), as entries of class ``label``.

    Each is made an :class:`Entry` at once, keeping none of the scandir and stat objects: a
    folder of a million files would hold hundreds of megabytes of them.
    """
    try:
        with os.scandir(top) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"{top}: cannot list image folder ({exc.strerror or reason(exc)})") from None
    for item in items:
        if item.name.startswith("."):
            continue
        path = f"{rel}/{item.name}" if rel else item.name
        try:
            if item.is_dir():
                yield from _walk_images(Path(item.path), path, label)
            elif _is_image(item.name) and item.is_file():
                st = item.stat()
                yield Entry(path, st.st_size, st.st_mtime_ns, label)
        except OSError as exc:
            raise DataError(f"{item.path}: cannot read ({exc.strerror or reason(exc)})") from None


def list_folder(folder: Path, *, classes: bool = True) -> Listing:
    """The image files of ``folder``: directly inside it, or (``classes``) in class folders below it.

    Raises :class:`DataError` for a missing folder, a folder with no images, or a folder
    with images both directly inside and in class folders (which of them would be what?).
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            what = "not a folder (data.path of source folder names a folder of images)"
        else:
            what = "image folder not found"
        raise DataError(f"{folder}: {what}")
    try:
        with os.scandir(folder) as it:
            items = sorted(it, key=lambda e: e.name)
        top = [Entry(e.name, st.st_size, st.st_mtime_ns) for e in items if _is_image(e.name) and e.is_file()
               for st in (e.stat(),)]
        subdirs = [e for e in items if not e.name.startswith(".") and e.is_dir()]
    except OSError as exc:
        raise DataError(f"{folder}: cannot list image folder ({exc.strerror or reason(exc)})") from None
    found: list[tuple[str, list[Entry]]] = []
    if classes:
        found = [(sub.name, list(_walk_images(Path(sub.path), sub.name, k))) for k, sub in enumerate(subdirs)]
        if not any(files for _, files in found):
            found = []  # no class folders: a flat folder (its sub-folders hold no images)
    if top and found:
        raise DataError(
            f"{folder}: images both directly inside ({top[0].rel}) and in class folders "
            f"({next(name for name, files in found if files)}/); "
            "keep every image in a class folder, or none"
        )
    if found:
        entries = [entry for _, files in found for entry in files]
        entries.sort(key=lambda e: e.rel)
        return Listing(folder, entries, [name for name, _ in found])
    if not top:
        where = " or in class folders" if classes else ""
        # the suffixes once read and still read; WebP came later
        raise DataError(f"{folder}: no image files (.png, .jpg, .jpeg) or .webp files in it{where}")
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

    def apply(self, img: Image.Image, path: Path, rel: str) -> np.ndarray:
        """A decoded Pillow image -> uint8 (C, H, W). ``rel`` places a random crop."""
        img = img.convert("L" if self.channels == 1 else "RGB")  # a full decode: truncated data fails here
        if self.resize == "shorter-side":
            assert self.size is not None
            target = _shorter_side(*img.size, self.size)
            if target != img.size:
                img = img.resize(target, Image.Resampling.BICUBIC)
        if self.crop != "none":
            assert self.size is not None
            w, h = img.size
            if w < self.size or h < self.size:
                raise DataError(
                    f"{path}: image is {w}x{h}, smaller than the {self.size}x{self.size} crop "
                    "(data.size; data.resize: shorter-side scales images up to it)"
                )
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
    digest = hashlib.blake2b(f"{seed}\0{rel}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") % spread_x, int.from_bytes(digest[8:], "big") % spread_y


def probe(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header (no decode)."""
    try:
        with Image.open(path) as img:
            return img.size
    except PIL_ERRORS as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {reason(exc)})") from None


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
        raise Unreadable(f"{path}: cannot read image ({type(exc).__name__}: {reason(exc)})") from None


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
            skipped.append(f"{entry.rel}: {str(err).removeprefix(f'{path}: ')}")
            continue
        if image.shape != shape:
            raise DataError(
                f"{path}: image size {image.shape[2]}x{image.shape[1]} differs from {listing.entries[0].rel}'s "
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
            f"{folder}: changed while its images were read ({entry.rel} was "
            f"{'removed' if st is None else 'rewritten'}); run the command again once the folder is still"
        )


def first_shape(listing: Listing, transform: Transform) -> tuple[int, int, int]:
    """(C, H, W) the first image becomes, from its header alone (what every image must become)."""
    if transform.crop != "none":
        assert transform.size is not None
        return transform.channels, transform.size, transform.size
    width, height = probe(listing.folder / listing.entries[0].rel)
    return (transform.channels, *transform.output_size(width, height))


def decode_in_memory(
    listing: Listing,
    transform: Transform,
    *,
    skip: bool = False,
    progress: bool | None = None,
    check: Callable[[Decoded], None] | None = None,
) -> Decoded:
    """Every image of ``listing`` decoded into memory: uint8 (N, C, H, W), seen by ``check`` (which may refuse)."""
    shape = first_shape(listing, transform)
    images = np.empty((len(listing.entries), *shape), dtype=np.uint8)
    n = 0

    def write(image: np.ndarray) -> None:
        nonlocal n
        images[n] = image
        n += 1

    kept, skipped = _decode_all(
        listing, transform, shape, write, skip=skip, progress=progress, desc=f"reading {listing.folder}"
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


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest as a mapping, or None when it is missing, unreadable or not one."""
    try:
        if not stat.S_ISREG(path.stat().st_mode) or path.stat().st_size > (1 << 30):
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cache_problem(cache: Path, manifest: dict[str, Any]) -> str | None:
    """Why the cache file a (matching) manifest names cannot be used; None when it is whole."""
    try:
        name, shape, length, digest = (manifest[k] for k in ("file", "shape", "bytes", "digest"))
        shape = tuple(int(v) for v in shape)
        ok = isinstance(name, str) and "/" not in name and len(shape) == 4 and int(np.prod(shape)) == int(length)
    except (KeyError, TypeError, ValueError):
        return "its manifest is incomplete"
    if not ok:
        return "its manifest is inconsistent"
    path = cache / name
    try:
        size = path.stat().st_size
    except OSError:
        return f"{name} is missing"
    if size != length:
        return f"{name} is {size} bytes, its manifest says {length}"
    if length and _digest_file(path, length) != digest:
        return f"{name} does not match its digest"
    return None


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
            raise DataError(f"{path}: cannot make the data cache folder ({exc.strerror or reason(exc)})") from None
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
        raise DataError(f"{cache}: not a folder (progvq keeps its data cache there); move it away")
    made.mkdir(cache)
    try:
        lock = os.open(cache, os.O_RDONLY)
    except OSError as exc:
        made.undo()
        raise DataError(f"{cache}: cannot open the data cache folder ({exc.strerror or reason(exc)})") from None
    try:
        # one builder at a time (several ranks of one run, two commands); the kernel drops the lock if we die
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _read_manifest(cache / MANIFEST)
        if manifest is not None and manifest.get("source") == source:
            problem = _cache_problem(cache, manifest)
            if problem is None:
                decoded = _open(cache, manifest, listing, log)
                if check is not None:
                    check(decoded)
                return decoded
            log(f"{cache}: data cache damaged ({problem}); building it again")
        elif manifest is not None:
            log(f"{cache}: {_what_changed(manifest.get('source'), source)}; building the data cache again")
        return _build(cache, listing, transform, source, skip=skip, progress=progress, log=log, check=check)
    except BaseException:
        made.undo()
        raise
    finally:
        os.close(lock)


def _what_changed(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "the manifest is from another version"
    if old.get("count") != new["count"]:
        return f"the folder holds {new['count']} images, the cache {old.get('count')}"
    for key in ("version", "folder", "transform", "classes"):
        if old.get(key) != new[key]:
            return f"the {key} differs from the cache's"
    return "the folder's files changed since the cache was built"


def _open(cache: Path, manifest: dict[str, Any], listing: Listing, log: Callable[[str], None]) -> Decoded:
    shape = tuple(int(v) for v in manifest["shape"])
    images = _map(cache / manifest["file"], shape)
    skipped = [str(v) for v in manifest.get("skipped", [])]
    gone = {str(v) for v in manifest.get("skipped_files", [])}
    entries = [e for e in listing.entries if e.rel not in gone] if gone else listing.entries
    if len(entries) != shape[0]:
        raise DataError(f"{cache / MANIFEST}: lists {len(entries)} images for a cache of {shape[0]}")
    if skipped:
        log(f"{listing.folder}: {len(skipped)} unreadable files skipped (first: {skipped[0]})")
    return Decoded(images, entries, listing.classes, skipped)


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
    shape = first_shape(listing, transform)
    per_image = int(np.prod(shape))
    key = hashlib.blake2b(json.dumps(source, sort_keys=True).encode(), digest_size=8).hexdigest()
    name = f"images-{key}.u8"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=cache)
    tmp = Path(tmp_name)
    h = hashlib.blake2b(digest_size=20)
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; as readable as the run's other files

            def write(image: np.ndarray) -> None:
                data = np.ascontiguousarray(image).tobytes()
                h.update(data)
                f.write(data)

            kept, skipped = _decode_all(
                listing, transform, shape, write, skip=skip, progress=progress, desc=f"caching {listing.folder}"
            )
            f.flush()
            os.fsync(f.fileno())
        again = list_folder(listing.folder).entries
        if not listing.complete:
            again = again[: len(listing.entries)]
        if [e.record() for e in again] != [e.record() for e in listing.entries]:
            raise DataError(
                f"{listing.folder}: changed while its images were read (files added, removed or rewritten); "
                "run the command again once the folder is still"
            )
        if check is not None:
            check(Decoded(_map(tmp, (len(kept), *shape)), kept, listing.classes, skipped))
        os.replace(tmp, cache / name)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{cache / name}: cannot write the data cache ({exc.strerror or reason(exc)})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    try:
        # the files one per line, for people (the manifest holds their digest); then the manifest itself
        table = "".join(f"{e.rel}\t{e.size}\t{e.mtime_ns}\t{e.label}\n" for e in listing.entries).encode()
        _atomic_write(cache / FILES, lambda f: f.write(table))
        _atomic_json(cache / MANIFEST, manifest)
    except OSError as exc:
        raise DataError(f"{cache / MANIFEST}: cannot write ({exc.strerror or reason(exc)})") from None
    # the manifest now names the new file: earlier caches and leftovers of interrupted builds go
    for old in cache.iterdir():
        is_old = old.name.startswith("images-") and old.name.endswith(".u8") and old.name != name
        if is_old or (old.name.startswith(".images-") and old.name.endswith(".tmp")):
            old.unlink(missing_ok=True)
    if skipped:
        log(f"{listing.folder}: {len(skipped)} unreadable files skipped (first: {skipped[0]})")
    images = _map(cache / name, full)
    return Decoded(images, kept, listing.classes, skipped)


def _map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array ``shape`` in the file ``path``, memory-mapped read-only (an empty one cannot be mapped)."""
    if 0 in shape:
        return np.zeros(shape, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1).encode()
    _atomic_write(path, lambda f: f.write(text))


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
