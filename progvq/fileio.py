"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file is serialised in memory first and only then written to disk. Serialisers
report a full disk in their own ways (``torch.save``'s zip writer turns ENOSPC into a
``RuntimeError`` that hides the ``OSError``); a plain write of bytes reports it as the
``OSError`` it is, naming the file the user asked for, never the temporary one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import signal
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from .errors import ProgvqError, signal_handlers

Writer = Callable[[BinaryIO], object]


def current_umask() -> int:
    """The process's file mode creation mask (read by setting it and putting it back)."""
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
    made: list[str] = []  # every temporary file, named as soon as it exists (a signal may come at any point)
    done: list[tuple[str, Path]] = []  # (temporary, path) written and fsynced
    # folders this call makes for the files, deepest first: removed again (when empty) if it fails
    new_dirs = sorted(
        {p for path, _ in contents for p in (path.parent, *path.parent.parents) if not p.exists()},
        key=lambda p: len(p.parts),
        reverse=True,
    )
    renamed = False
    try:
        for path, data in contents:
            done.append((_write_temporary(path, data, made), path))
        # several files are one unit for concurrent writers too: a second command writing the same
        # names renames its files after or before all of ours, never between them
        with (
            _writers_lock([path.parent for path, _ in contents]) if len(contents) > 1 else contextlib.nullcontext(),
            _signals_deferred(),
        ):
            for tmp, path in done:
                try:
                    if path in keep and path.exists():
                        os.replace(path, keep[path])
                    os.replace(tmp, path)
                    renamed = True
                except OSError as err:
                    raise _named(err, path, tmp) from err
    finally:
        for tmp in made:
            Path(tmp).unlink(missing_ok=True)  # a no-op for those renamed
        if not renamed:
            for folder in new_dirs:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: never anything that holds files
    for parent in {path.parent for path, _ in contents}:
        # make the renames themselves durable
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while files are renamed into place, so a signal cannot land
    between two renames of one unit (a new PNG beside the old arrays); it is raised again just after.

    Python runs signal handlers in the main thread only, so swapping the handlers for one that notes
    the signal is enough (a thread's signal mask would not be: the kernel hands a process's signal to
    any thread that does not block it). From another thread the renames go ahead as they are.
    """
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        with signal_handlers(held, lambda signum, frame: caught.append(signum)):
            yield
    finally:
        for sig in caught[:1]:
            signal.raise_signal(sig)  # now, to the handler that was there before


@contextlib.contextmanager
def _writers_lock(folders: Iterable[Path]) -> Iterator[None]:
    """Hold an exclusive lock per folder (in a fixed order, so two holders cannot deadlock) while files
    are renamed into them.

    The lock files live in the system's temporary folder, named by a digest of each folder's
    resolved path, so nothing is added to the user's folders. A run folder's own ``flock`` (the
    training lock) is another file and never waits on these. Where no lock file can be made the
    renames go ahead unlocked: a lock is a courtesy between concurrent commands, not a reason to fail.
    """
    base = Path(tempfile.gettempdir()) / f"progvq-locks-{os.getuid()}"
    fds: list[int] = []
    try:
        try:
            base.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            yield
            return
        for folder in sorted({str(Path(f).resolve()) for f in folders}):
            name = hashlib.blake2b(folder.encode(), digest_size=12).hexdigest() + ".lock"
            try:
                fd = os.open(base / name, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                continue
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases its lock


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path], run_dir: str | Path | None) -> None:
    """Refuse (:class:`ProgvqError`, naming both) an output that would replace a file the command reads or
    a file of its run folder, before any work is done.

    An output names an input when the two resolve to one path or are one file under two names (a
    symbolic or a hard link): a rename over it would destroy the input. The run's files are its
    config, its stage folders (``stage-K``, ``prior``), its data cache and its hidden files (the lock, temporary files);
    anything else in the run folder (a grid of samples) may be written.
    """
    existing = []
    for name in inputs:
        path = Path(name)
        with contextlib.suppress(OSError):
            existing.append((path, os.stat(path)))
    run = Path(run_dir).resolve() if run_dir is not None else None
    for name in outputs:
        out = Path(name)
        try:
            info = os.stat(out)
        except OSError:
            info = None
        for path, seen in existing:
            same = info is not None and (info.st_dev, info.st_ino) == (seen.st_dev, seen.st_ino)
            if same or out.resolve() == path.resolve():
                raise ProgvqError(f"{out}: is {path}, which this command reads; write the output elsewhere")
        if run is not None:
            resolved = out.resolve()
            if resolved != run and resolved.is_relative_to(run):
                top = resolved.relative_to(run).parts[0]
                if top in ("config.yaml", "prior", "data-cache") or top.startswith(("stage-", ".")):
                    raise ProgvqError(f"{out}: inside {run_dir}'s own files ({top}); write the output elsewhere")


def _write_temporary(path: Path, data: bytes, made: list[str] | None = None) -> str:
    """``data`` in a new temporary file beside ``path``, fsynced; returns its name, which also goes into
    ``made`` the moment the file exists (so a caller interrupted at any point can remove it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _named(err, path, None) from err
    if made is not None:
        made.append(tmp)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
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
