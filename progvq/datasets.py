"""Known data sets: where each is published, getting it (``progvq data get``), and the MNIST test set progvq ships.

:data:`KNOWN` is the one table of them: each file's URLs (mirrors, tried in order), size and SHA-256,
the data set's licence, and the folder a user keeps it in by default (``data/NAME``, relative to the
working directory). :func:`get` downloads a data set into a folder:

- each file goes to ``NAME.part`` beside its final name first, is checked against its SHA-256, and
  only then renamed into place, so a file under its final name is always whole; a file already there
  with the right checksum is not downloaded again;
- an interrupted download (Ctrl-C, a dropped connection) keeps its ``.part`` file, and the next
  ``get`` asks the server for the rest of it (an HTTP Range request; a server that ignores the
  range sends the whole file, which starts it again);
- every failure is one :class:`DataError` line and leaves nothing behind but such a resumable
  ``.part`` file: a wrong checksum deletes the download, and so does a full disk (whose bytes are
  better freed than kept).

CIFAR-10 is published as one archive of pickled batches; :func:`get` writes it out as two image
folders of lossless PNGs, ``DIR/train/<class>/NNNNN.png`` (50,000) and ``DIR/test/<class>/...``
(10,000), whose class folders sort in label order, so that ``data.source: folder`` reads them with
CIFAR-10's labels. The batches are unpickled by an unpickler that builds nothing but NumPy arrays,
lists, dicts, numbers and strings: a data file never runs code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import io
import os
import pickle
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm import tqdm

from progvq import __version__
from progvq.errors import DataError

#: MNIST's test set as published (the t10k idx files), shipped with progvq: ``data.source: mnist`` without a path.
SHIPPED_MNIST = Path(__file__).resolve().parent / "shipped" / "mnist"
#: Environment variable naming a mirror to download every data set from (see :func:`file_urls`).
MIRROR_VARIABLE = "PROGVQ_DATA_MIRROR"
#: Seconds a connection may stay silent before a download counts as interrupted.
TIMEOUT_S = 60
#: Bytes read from the network, and hashed, at a time.
_BLOCK = 1 << 16


@dataclass(frozen=True)
class Remote:
    """One published file: its name, its URLs (mirrors, tried in order), its size in bytes and SHA-256 (hex)."""

    name: str
    urls: tuple[str, ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class DataSet:
    """A data set :func:`get` knows: where it comes from and what a config reads of it.

    ``place`` is the folder it goes to by default; ``splits`` are the image folders written from the
    download (CIFAR-10's ``train`` and ``test``; none when the files are read as they are); ``use`` says
    how a config reads it, with ``{dir}`` for the folder it was written to.
    """

    name: str
    title: str
    home: str
    licence: str
    source: str
    files: tuple[Remote, ...]
    use: str
    splits: tuple[str, ...] = ()

    @property
    def place(self) -> str:
        return f"data/{self.name}"


def _files(bases: tuple[str, ...], sizes_and_sums: dict[str, tuple[int, str]]) -> tuple[Remote, ...]:
    return tuple(
        Remote(name, tuple(f"{base}/{name}" for base in bases), size, sha)
        for name, (size, sha) in sizes_and_sums.items()
    )


# Sizes and SHA-256 sums as the publishers' files have them; where each was checked is in the README
# (Data sets). The mirrors come first where the canonical page is often down or slow.
KNOWN: dict[str, DataSet] = {
    "mnist": DataSet(
        name="mnist",
        title="MNIST handwritten digits (LeCun, Cortes and Burges): 60,000 training and 10,000 test digits, 28x28 grey",
        home="http://yann.lecun.com/exdb/mnist/",
        licence="CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
        source="mnist",
        files=_files(
            (
                "https://ossci-datasets.s3.amazonaws.com/mnist",  # PyTorch's mirror
                "https://storage.googleapis.com/cvdf-datasets/mnist",  # TensorFlow's mirror
                "http://yann.lecun.com/exdb/mnist",  # the canonical page
            ),
            {
                "train-images-idx3-ubyte.gz": (
                    9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
                ),
                "train-labels-idx1-ubyte.gz": (
                    28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
                ),
                "t10k-images-idx3-ubyte.gz": (
                    1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
                ),
                "t10k-labels-idx1-ubyte.gz": (
                    4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
                ),
            },
        ),
        use="data.source: mnist, data.path: {dir}, data.prefix: train (60,000 digits) or t10k (10,000)",
    ),
    "fashion-mnist": DataSet(
        name="fashion-mnist",
        title="Fashion-MNIST (Zalando Research): 60,000 training and 10,000 test images of clothing, 28x28 grey",
        home="https://github.com/zalandoresearch/fashion-mnist",
        licence="MIT (Zalando SE)",
        source="mnist",
        files=_files(
            (
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",  # the canonical location
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
            ),
            {
                "train-images-idx3-ubyte.gz": (
                    26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
                ),
                "train-labels-idx1-ubyte.gz": (
                    29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
                ),
                "t10k-images-idx3-ubyte.gz": (
                    4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
                ),
                "t10k-labels-idx1-ubyte.gz": (
                    5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
                ),
            },
        ),
        use="data.source: mnist, data.path: {dir}, data.prefix: train (60,000 images) or t10k (10,000)",
    ),
    "cifar10": DataSet(
        name="cifar10",
        title="CIFAR-10 (Krizhevsky, Nair and Hinton): 50,000 training and 10,000 test images, 10 classes, 32x32 RGB",
        home="https://www.cs.toronto.edu/~kriz/cifar.html",
        licence="no licence stated; its page asks that work using it cite Krizhevsky 2009, "
        "Learning Multiple Layers of Features from Tiny Images",
        source="folder",
        files=_files(
            ("https://www.cs.toronto.edu/~kriz",),
            {
                "cifar-10-python.tar.gz": (
                    170498071, "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
                ),
            },
        ),
        use="data.source: folder, data.channels: 3, data.path: {dir}/train (50,000 images) or {dir}/test (10,000)",
        splits=("train", "test"),
    ),
}


def _key(name: str) -> str:
    """A data set's name as compared: lower case, no dashes or underscores (``Fashion_MNIST`` is ``fashion-mnist``)."""
    return name.lower().replace("-", "").replace("_", "")


def known(name: str) -> DataSet:
    """The data set called ``name`` (see :func:`_key`); :class:`DataError` listing the known ones otherwise."""
    for dataset in KNOWN.values():
        if _key(dataset.name) == _key(name):
            return dataset
    raise DataError(f"unknown data set {name!r}; known: {', '.join(KNOWN)}")


def get_command(path: str | Path, source: str) -> str | None:
    """The ``progvq data get`` command that writes what a config's ``data.path`` of ``source`` names, or None.

    A folder named after a known data set (``data/cifar10``), or one of the split folders written
    from it (``data/cifar10/train``), is that data set's place; a folder of source ``mnist`` of any
    other name gets MNIST. Only data sets that the config's source reads are named.
    """
    where = Path(path)
    for dataset in KNOWN.values():
        if dataset.source != source:
            continue
        if where.name in dataset.splits and _key(where.parent.name) == _key(dataset.name):
            return f"progvq data get {dataset.name} {shlex.quote(str(where.parent))}"
        if _key(where.name) == _key(dataset.name):
            then = f" (then data.path: {where / dataset.splits[0]})" if dataset.splits else ""
            return f"progvq data get {dataset.name} {shlex.quote(str(where))}{then}"
    if source == "mnist":
        return f"progvq data get mnist {shlex.quote(str(where))}"
    return None


def file_urls(dataset: DataSet, remote: Remote, mirror: str | None) -> tuple[str, ...]:
    """Where to download ``remote`` from: its own URLs, or with ``mirror`` only ``MIRROR/NAME/FILE``.

    A mirror holds one folder per data set, named as in :data:`KNOWN`, with the files under their
    published names (``MIRROR/mnist/train-images-idx3-ubyte.gz``).
    """
    if mirror is None:
        return remote.urls
    return (f"{mirror.rstrip('/')}/{dataset.name}/{remote.name}",)


def check_mirror(mirror: str, what: str) -> str:
    """``mirror`` if it is an http(s) URL with a host; :class:`DataError` naming ``what`` gave it otherwise."""
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataError(f"{what} {mirror!r}: not an http:// or https:// URL of a mirror")
    return mirror


def usage(dataset: DataSet, folder: Path) -> str:
    """How a config reads ``dataset`` written to ``folder``, in one line."""
    return dataset.use.format(dir=folder)


# --------------------------------------------------------------------------- get


def get(
    name: str,
    folder: Path,
    *,
    mirror: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> DataSet:
    """Download the data set ``name`` into ``folder`` (see the module's docstring), and write its image folders.

    Each file comes from ``mirror`` (see :func:`file_urls`) when given, else from its URLs in turn.
    ``progress`` shows a bar on stderr per file (None: only on a terminal); ``log`` reports each file.
    Raises :class:`DataError` (one line) for an unknown ``name``, a folder that cannot be written, a
    file already there with another checksum, or a file no URL gave whole and with its checksum (each
    URL's failure named: refused connection, HTTP status, interruption, wrong size or checksum), and
    for a full disk. A folder made here and left empty by a failure is removed again.
    """
    dataset = known(name)
    folder = Path(folder)
    with _folder_for_writing(folder):
        for remote in dataset.files:
            fetch(remote, folder, file_urls(dataset, remote, mirror), progress=progress, log=log)
        write = _WRITERS.get(dataset.name)
        if write is not None:
            write(folder, progress=progress, log=log)
    return dataset


@contextlib.contextmanager
def _folder_for_writing(folder: Path) -> Iterator[None]:
    """``folder``, made if need be, locked against a second ``get`` and checked writable; on failure the
    folders made here are removed again while empty."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{folder}: not a folder (data sets are written into a folder)") from None
    except OSError as exc:
        raise DataError(f"{folder}: cannot make the folder ({exc.strerror or exc})") from None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        _remove_empty(made)
        raise DataError(f"{folder}: cannot open the folder ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{folder}: another `progvq data get` is writing there; let it finish") from None
        _check_writable(folder)
        yield
    except BaseException:
        _remove_empty(made)
        raise
    finally:
        os.close(fd)  # drops the lock


def _check_writable(folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".progvq-probe.", dir=folder)
    except OSError as exc:
        raise DataError(f"{folder}: cannot write there ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) that are empty; one that is not stays, and so do those above it."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


def sha256_of(path: Path) -> str:
    """The SHA-256 (hex) of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Failed(Exception):
    """One URL did not give the file (the reason, one line); what was downloaded of it may stay in the .part file."""


def fetch(
    remote: Remote,
    folder: Path,
    urls: tuple[str, ...],
    *,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> bool:
    """Put ``remote`` at ``folder / remote.name``, checked; True when it was downloaded, False when already there.

    The URLs are tried in turn, each resuming what the ones before left in the ``.part`` file. A file
    already at the final name is kept when its checksum is right, and refused (never overwritten)
    otherwise. Raises :class:`DataError` as :func:`get` describes.
    """
    final = folder / remote.name
    part = folder / f"{remote.name}.part"
    if final.exists() or final.is_symlink():
        if not final.is_file():
            raise DataError(f"{final}: not a file; move it away to download {remote.name}")
        got = sha256_of(final)
        if got != remote.sha256:
            raise DataError(
                f"{final}: already there with SHA-256 {got}, expected {remote.sha256}; "
                "move it away to download it again"
            )
        log(f"{final}: already there, SHA-256 checked")
        return False
    failures = []
    for url in urls:
        try:
            _download(url, part, remote, progress)
        except _Failed as why:
            failures.append(f"{url}: {why}")
            continue
        got = sha256_of(part)
        if got != remote.sha256:
            part.unlink()
            failures.append(f"{url}: SHA-256 of {remote.name} is {got}, expected {remote.sha256} (download deleted)")
            continue
        os.replace(part, final)
        _sync_folder(folder)
        log(f"{final}: {remote.size:,} bytes, SHA-256 checked")
        return True
    kept = ""
    if part.exists():
        kept = f"; {part} keeps the {part.stat().st_size:,} bytes downloaded, and the same command resumes from there"
    raise DataError(f"cannot download {remote.name}: {'; '.join(failures)}{kept}")


def _download(url: str, part: Path, remote: Remote, progress: bool | None, *, ranged: bool = True) -> None:
    """Complete ``part`` from ``url``: ask for the bytes after those it holds (``ranged``), or for all of them.

    Raises :class:`_Failed` when ``url`` gives no file (nothing written then), is interrupted (what came
    stays in ``part``) or sends more than ``remote.size`` bytes (``part`` deleted); :class:`DataError`
    for a full disk (``part`` deleted).
    """
    offset = part.stat().st_size if part.exists() else 0
    if offset > remote.size:
        part.unlink()  # longer than the file: not a part of it
        offset = 0
    if offset == remote.size:
        return  # whole already (interrupted before its check): the caller checks it
    headers = {"User-Agent": f"progvq/{__version__}"}
    if offset and ranged:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and "Range" in headers:  # the server holds fewer bytes than the part: start again
            return _download(url, part, remote, progress, ranged=False)
        raise _Failed(f"HTTP {err.code} {_line(err.reason)}") from None
    except urllib.error.URLError as err:
        raise _Failed(_reason(err.reason)) from None
    except (OSError, http.client.HTTPException) as err:
        raise _Failed(_reason(err)) from None
    with response:
        resumed = bool(offset) and response.status == 206 and _starts_at(response.headers.get("Content-Range"), offset)
        if not resumed:
            offset = 0  # the whole file comes (a server that ignores Range): the part starts again
        announced = _announced(response.headers, offset)
        if announced is not None and announced != remote.size:
            raise _Failed(f"its {remote.name} is {announced:,} bytes, expected {remote.size:,}")
        _write(response, part, remote, offset, progress)


def _write(response: Any, part: Path, remote: Remote, offset: int, progress: bool | None) -> None:
    """Append the body of ``response`` to ``part`` at ``offset`` (0: replace it), with a progress bar."""
    written = offset
    bar = tqdm(
        total=remote.size, initial=offset, desc=remote.name, unit="B", unit_scale=True, leave=False,
        file=sys.stderr, disable=None if progress is None else not progress,
    )
    try:
        with bar, open(part, "ab" if offset else "wb") as f:
            while True:
                try:
                    block = response.read(_BLOCK)
                except (OSError, http.client.HTTPException) as err:
                    raise _Failed(f"interrupted after {written:,} of {remote.size:,} bytes ({_reason(err)})") from None
                if not block:
                    break
                if written + len(block) > remote.size:
                    f.close()
                    part.unlink()
                    raise _Failed(f"sends more than the {remote.size:,} bytes of {remote.name} (download deleted)")
                f.write(block)
                written += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        # writing failed (a full disk, a quota): the bytes are better freed than kept for a resume
        part.unlink(missing_ok=True)
        final = part.with_name(remote.name)
        raise DataError(f"{final}: cannot write ({err.strerror or err}); the partial download was removed") from None
    if written < remote.size:
        raise _Failed(f"interrupted after {written:,} of {remote.size:,} bytes (the connection ended)")


def _announced(headers: Any, offset: int) -> int | None:
    """The whole file's size as a response's headers give it (None: they do not), its body starting at ``offset``."""
    total = re.fullmatch(r"\s*bytes\s+\d+-\d+/(\d+)\s*", headers.get("Content-Range") or "")
    if offset and total is not None:
        return int(total.group(1))
    length = headers.get("Content-Length")
    return offset + int(length) if length is not None and length.strip().isdigit() else None


def _starts_at(content_range: str | None, offset: int) -> bool:
    """Whether a ``Content-Range`` header gives the bytes from ``offset`` on."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", content_range or "")
    return match is not None and int(match.group(1)) == offset


def _reason(err: BaseException | str) -> str:
    """Why a connection failed, in a few words on one line (``Connection refused``, ``timed out``)."""
    if isinstance(err, str):
        return _line(err)
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return _line(err.strerror)
    return _line(str(err)) or type(err).__name__


def _line(text: Any) -> str:
    return " ".join(str(text).split())


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- CIFAR-10 as image folders

#: Where CIFAR-10's batches are in its archive, and the split each belongs to.
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCHES = {**{f"data_batch_{k}": "train" for k in range(1, 6)}, "test_batch": "test"}


def write_cifar10(folder: Path, *, progress: bool | None = None, log: Callable[[str], None] = print) -> None:
    """Write ``folder/train`` and ``folder/test`` from ``folder/cifar-10-python.tar.gz`` (already checked).

    Image ``i`` of a split (batches in order, images in batch order) becomes
    ``SPLIT/<class>/<i:05d>.png``, an RGB PNG of its 32x32 pixels exactly. Each split is written in a
    hidden temporary folder and renamed into place when whole; a split folder already there is kept as
    it is. Raises :class:`DataError` for an archive without CIFAR-10's batches, or batches not in its
    format, and for a full disk (nothing of the split left).
    """
    todo = [split for split in KNOWN["cifar10"].splits if not (folder / split).exists()]
    for split in KNOWN["cifar10"].splits:
        if split not in todo:
            log(f"{folder / split}: already there, kept as it is")
    if not todo:
        return
    archive = folder / KNOWN["cifar10"].files[0].name
    classes, batches = read_cifar10(archive)
    for split in todo:
        parts = [batches[name] for name in sorted(batches) if _CIFAR_BATCHES[name] == split]
        count = write_split(folder / split, parts, classes, progress=progress)
        log(f"{folder / split}: {count:,} PNG images in {len(classes)} class folders")


#: data set -> what writes its image folders from its checked files (for data sets with ``splits``)
_WRITERS: dict[str, Callable[..., None]] = {"cifar10": write_cifar10}


def read_cifar10(archive: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The class names and each batch (images uint8 (N, 32, 32, 3), labels int64 (N,)) of CIFAR-10's python archive.

    Raises :class:`DataError` naming the archive (and member) for a missing batch or meta file, a
    member that is not a pickle of CIFAR-10's format, or labels outside the classes.
    """
    meta: dict[str, Any] | None = None
    raw: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if not member.isfile() or path.parent.name != _CIFAR_DIR:
                    continue
                if path.name == "batches.meta" or path.name in _CIFAR_BATCHES:
                    stream = tar.extractfile(member)
                    assert stream is not None  # a regular file
                    loaded = _unpickle(stream.read(), f"{archive}[{member.name}]")
                    if path.name == "batches.meta":
                        meta = loaded
                    else:
                        raw[path.name] = loaded
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise DataError(f"{archive}: cannot read the archive ({_line(exc)})") from None
    for name in (*_CIFAR_BATCHES, "batches.meta"):
        if name not in raw and (name != "batches.meta" or meta is None):
            raise DataError(f"{archive}: no {_CIFAR_DIR}/{name} in it (not CIFAR-10's python archive)")
    assert meta is not None
    names = meta.get("label_names")
    where = f"{archive}[{_CIFAR_DIR}/batches.meta]"
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: no list of class names under label_names")
    classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    batches = {name: _batch(loaded, len(classes), f"{archive}[{_CIFAR_DIR}/{name}]") for name, loaded in raw.items()}
    return classes, batches


def _batch(loaded: dict[str, Any], classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images (N, 32, 32, 3) uint8 and labels (N,) int64, from its ``data`` (N x 3072: the red,
    green, then blue plane of each image, rows in order) and ``labels``."""
    data, labels = loaded.get("data"), loaded.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{where}: data is not a uint8 array of N x 3072 (got {type(data).__name__} {shape})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{where}: labels are not integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{where}: {labels.size} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{where}: labels outside the {classes} classes (0..{classes - 1})")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def _latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of Python 3 use it for bytes (latin-1 only: no other codec)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"it encodes with {encoding!r}, which a data batch never does")
    return text.encode("latin1")


_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]  # numpy's own, wherever this version keeps it
#: What a pickled batch may ask for: a NumPy array's parts (under the module names of NumPy 1 and 2), and
#: bytes as Python 3 writes them at protocol 2.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"): _latin1,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
# how a damaged or hostile pickle fails; each is the file's fault, not progvq's
_PICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError,
    UnicodeDecodeError, RecursionError, MemoryError,
)


class _Unpickler(pickle.Unpickler):
    """An unpickler that builds NumPy arrays and builtin values only: CIFAR-10's batches, and never code."""

    def find_class(self, module: str, name: str) -> Any:
        found = _PICKLE_ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a data batch never holds")
        return found


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    """The dict pickled in ``data`` (Python 2's pickles: byte-string keys, read as str), refusing anything else."""
    try:
        loaded = _Unpickler(io.BytesIO(data), encoding="bytes").load()
    except _PICKLE_ERRORS as exc:
        raise DataError(f"{where}: not a CIFAR-10 batch ({_line(exc) or type(exc).__name__})") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (a {type(loaded).__name__}, not a dict)")
    return {k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k): v for k, v in loaded.items()}


def class_folders(names: list[str]) -> list[str]:
    """Folder names of classes 0..C-1 that sort in label order: the names themselves (made safe as
    folder names) when they already do, else ``K-name`` with K zero-padded."""
    safe = [re.sub(r"[^A-Za-z0-9_+-]", "_", name).strip("_") or "class" for name in names]
    if safe == sorted(safe) and len(set(safe)) == len(safe):
        return safe
    width = len(str(len(names) - 1))
    return [f"{k:0{width}d}-{name}" for k, name in enumerate(safe)]


def write_split(
    target: Path, batches: list[tuple[np.ndarray, np.ndarray]], classes: list[str], *, progress: bool | None = None
) -> int:
    """Write ``batches`` (images (N, H, W, 3) uint8, labels (N,)) as ``target/<class>/<i:05d>.png``; returns
    how many. The folder appears whole or not at all (see :func:`write_cifar10`)."""
    from PIL import Image

    folders = class_folders(classes)
    total = sum(len(labels) for _, labels in batches)
    width = max(5, len(str(total - 1)))
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise DataError(f"{target}: cannot write ({err.strerror or err})") from None
    try:
        for name in folders:
            (tmp / name).mkdir()
        index = 0
        with tqdm(total=total, desc=target.name, unit="img", leave=False, file=sys.stderr,
                  disable=None if progress is None else not progress) as bar:
            for images, labels in batches:
                for image, label in zip(images, labels.tolist(), strict=True):
                    Image.fromarray(image, "RGB").save(tmp / folders[label] / f"{index:0{width}d}.png")
                    index += 1
                    bar.update()
        os.rename(tmp, target)
        _sync_folder(target.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{target}: cannot write the images ({err.strerror or err}); nothing of it was kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


def describe() -> list[str]:
    """The table of :data:`KNOWN`, a few lines per data set, for ``progvq data list``."""
    lines = []
    for dataset in KNOWN.values():
        lines.append(f"{dataset.name}: {dataset.title}")
        lines.append(f"  from {dataset.home}; licence: {dataset.licence}")
        lines.append(f"  progvq data get {dataset.name} {dataset.place}, then {usage(dataset, Path(dataset.place))}")
        for remote in dataset.files:
            lines.append(f"  {remote.name}: {remote.size:,} bytes, SHA-256 {remote.sha256}")
            lines.extend(f"    {url}" for url in remote.urls)
    return lines

