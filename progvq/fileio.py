"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file is serialised in memory first and only then written to disk. Serialisers
report a full disk in their own ways (``torch.save``'s zip writer turns ENOSPC into a
``RuntimeError`` that hides the ``OSError``); a plain write of bytes reports it as the
``OSError`` it is, naming the file the user asked for, never the temporary one.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from .errors import ProgvqError

Writer = Callable[[BinaryIO], object]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def serialise(write: Writer) -> bytes:
    """What ``write(f)`` writes to a file ``f``, as bytes."""
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def _named(err: OSError, path: Path, temporary: str | None) -> OSError:
    """``err`` naming ``path`` when it names no file or a temporary one (whose name means nothing to a user)."""
    if err.filename is not None and str(err.filename) != temporary and not str(err.filename).endswith(".tmp"):
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))


def atomic_write(path: str | Path, write: Writer | bytes, *, previous: str | Path | None = None) -> None:
    """Write ``path`` with ``write(f)`` (or the bytes ``write``) atomically: see :func:`atomic_write_all`.

    With ``previous``, the file at ``path`` (if any) is renamed to ``previous`` once the new one is
    wholly on disk, just before the new one takes its place; a failed write changes neither.
    """
    atomic_write_all({path: write}, previous={path: previous} if previous is not None else None)


def atomic_write_all(
    writes: Mapping[str | Path, Writer | bytes], *, previous: Mapping[str | Path, str | Path] | None = None
) -> None:
    """Write several files so that either all of them are replaced or none is.

    Each value is a function writing to a file object, or the bytes themselves. Every
    file is serialised in memory, then written to a temporary file beside its path and
    fsynced; only when all of them are on disk are they renamed over their paths, in
    order. A failure before the renames (a full disk, a path that is a folder) leaves
    every old file as it was and no temporary file behind; an ``OSError`` names the
    path asked for. ``previous`` maps a path to the name its old file is kept under.
    """
    keep = {Path(k): Path(v) for k, v in (previous or {}).items()}
    contents: list[tuple[Path, bytes]] = []
    for target, write in writes.items():
        path = Path(target)
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory, not a file", str(path))
        contents.append((path, write if isinstance(write, bytes) else serialise(write)))
    done: list[tuple[str, Path]] = []  # (temporary, path) written and fsynced
    try:
        for path, data in contents:
            done.append((_write_temporary(path, data), path))
        for tmp, path in done:
            try:
                if path in keep and path.exists():
                    os.replace(path, keep[path])
                os.replace(tmp, path)
            except OSError as err:
                raise _named(err, path, tmp) from err
    finally:
        for tmp, _ in done:
            Path(tmp).unlink(missing_ok=True)  # a no-op for those renamed
    for parent in {path.parent for path, _ in contents}:
        # make the renames themselves durable
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_temporary(path: Path, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path``, fsynced; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _named(err, path, None) from err
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _named(err, path, tmp) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "is a directory"),
        (stat.S_ISFIFO, "is a named pipe"),
        (stat.S_ISCHR, "is a character device"),
        (stat.S_ISBLK, "is a block device"),
        (stat.S_ISSOCK, "is a socket"),
    ):
        if test(mode):
            return name
    return "is not a regular file"


def check_regular(path: str | Path, what: str, limit: int | None = None) -> int:
    """The size of ``path`` in bytes, refused (:class:`ProgvqError`, naming the file) unless it is a
    regular file of at most ``limit`` bytes. A named pipe or a device would block or never end."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ProgvqError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise ProgvqError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ProgvqError(f"{path}: {_kind(info.st_mode)}, not a {what} file")
    if limit is not None and info.st_size > limit:
        raise ProgvqError(f"{path}: {info.st_size} bytes, too large for a {what} (at most {limit})")
    return info.st_size


def read_limited(path: str | Path, what: str, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`check_regular`), never more than ``limit``."""
    check_regular(path, what, limit)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # a file that grew since its size was read is still bounded
    except OSError as err:
        raise ProgvqError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if len(data) > limit:
        raise ProgvqError(f"{path}: more than {limit} bytes, too large for a {what}")
    return data
