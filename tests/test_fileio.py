"""Atomic writes: the new file whole or the old one untouched, never a temporary file left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

import pytest

import progvq.fileio
from progvq.fileio import atomic_write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writes_the_file_with_the_usual_permissions(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.bin"  # missing folders are made
    atomic_write(path, lambda f: f.write(b"hello"))
    assert path.read_bytes() == b"hello"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    assert os.listdir(path.parent) == ["out.bin"]


def test_replaces_the_old_file_which_readers_see_until_the_rename(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    seen = []

    def write(f: BinaryIO) -> None:
        f.write(b"new")
        f.flush()
        seen.append(path.read_bytes())  # the new bytes are in a file of another name

    atomic_write(path, write)
    assert seen == [b"old"] and path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write(f: BinaryIO) -> None:
        f.write(b"half of the n")
        raise ValueError("cannot serialise")

    with pytest.raises(ValueError, match="cannot serialise"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"

    def write(f: BinaryIO) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel reports it: no file name

    monkeypatch.setattr(progvq.fileio.os, "fsync", no_space)
    with pytest.raises(OSError) as caught:
        atomic_write(path, lambda f: f.write(b"new"))
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_error_naming_its_file_is_passed_on_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    other = str(tmp_path / "elsewhere")

    def write(f: BinaryIO) -> None:
        raise FileNotFoundError(errno.ENOENT, "gone", other)

    with pytest.raises(FileNotFoundError) as caught:
        atomic_write(path, write)
    assert caught.value.filename == other
    assert os.listdir(tmp_path) == []
