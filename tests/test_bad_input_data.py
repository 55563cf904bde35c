"""Hostile data through the real command line: headers that announce more than the file holds, labels a
trained prior never saw, and image folders and their cache. One table, checked as ``tests/test_bad_input.py``
checks its own: exit status 2, exactly one ``progvq: error:`` line naming the file or key, no traceback,
every file byte-identical after the command.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import progvq.folder
from progvq.data import make_labelled_shapes, write_shapes_folder
from progvq.folder import CACHE_DIR
from run_stage import main

from .conftest import TINY
from .helpers import idx_bytes
from .test_bad_input import (
    Case,
    Ctx,
    array_file,
    case_params,
    check_refusal,
    data_source,
    images16,
    mnist_folder,
    train_args,
    trains,
)

# --------------------------------------------------------------------------- file makers


def idx_header(magic: int, *dims: int) -> bytes:
    """The header of an idx file: magic, then each dimension as a big-endian uint32."""
    return b"".join(d.to_bytes(4, "big") for d in (magic, *dims))


def write_to(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


IMAGES = "t10k-images-idx3-ubyte"
LABELS = "t10k-labels-idx1-ubyte"


def npy_header(shape: tuple[int, ...], descr: str = "|u1", version: tuple[int, int] = (1, 0)) -> bytes:
    """The bytes of a .npy header announcing ``shape`` of ``descr`` (no payload)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    size_bytes = 2 if version == (1, 0) else 4
    pad = -(6 + 2 + size_bytes + len(text) + 1) % 64
    text += " " * pad + "\n"
    return b"\x93NUMPY" + bytes(version) + len(text).to_bytes(size_bytes, "little") + text.encode("latin1")


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a .npy file."""
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def npz_with(members: dict[str, bytes]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)

    return write


def raw(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


GOOD = images16(12)  # (12, 16, 16) uint8


# --------------------------------------------------------------------------- a class-conditional run on idx files


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.yaml with a class-conditional prior, trained on shapes written as idx files with their labels.

    The run's config names its data by a relative path (``data``), so a copy of the run and
    the data folder anywhere reads the copied data. ``prior-3``: the same with the prior
    stopped at step 3.
    """
    root = tmp_path_factory.mktemp("conditional")
    images, labels = make_labelled_shapes(192, size=16, seed=7)
    (root / "data").mkdir()
    (root / "data" / IMAGES).write_bytes(idx_bytes(images[:, 0].numpy()))
    (root / "data" / LABELS).write_bytes(idx_bytes(labels.numpy().astype(np.uint8)))
    sets = ["data.source=mnist", "data.path=data", "stages.prior.class_conditional=true"]
    args = [arg for s in sets for arg in ("--set", s)]
    old = Path.cwd()
    os.chdir(root)
    try:
        assert main(["train", str(TINY), "--all", "--run-dir", "run", "--no-progress", *args]) == 0
        shutil.copytree(root / "run", root / "prior-3")
        shutil.rmtree(root / "prior-3" / "prior")
        base = ["train", str(TINY), "--stage", "prior", "--until", "3", "--run-dir", "prior-3", "--no-progress"]
        assert main([*base, *args]) == 0
    finally:
        os.chdir(old)
    return root


def labels_beyond_prior(verb: str, run: str = "run", label: int = 200) -> Callable[[Ctx], list[str]]:
    """A copy of the conditional run and its data, one label changed to ``label``; then ``verb``."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        root = ctx.request.getfixturevalue("conditional_run")
        shutil.copytree(root / run, ctx.tmp / run)
        shutil.copytree(root / "data", ctx.tmp / "data")
        labels = bytearray((ctx.tmp / "data" / LABELS).read_bytes())
        labels[-1] = label  # the last image: held out
        labels[8] = label  # the first: trained on
        (ctx.tmp / "data" / LABELS).write_bytes(bytes(labels))
        if verb == "eval":
            return ["eval", run]
        sets = ["data.source=mnist", "data.path=data", "stages.prior.class_conditional=true"]
        args = [arg for s in sets for arg in ("--set", s)]
        return ["train", str(TINY), "--stage", "prior", "--run-dir", run, "--no-progress", *args]

    return setup


# --------------------------------------------------------------------------- image folders


def shapes_folder(change: Callable[[Path], None], *sets: str, count: int = 24) -> Callable[[Ctx], list[str]]:
    """A folder of colour shapes in class folders (16x16 PNGs), changed by ``change``; then train on it."""

    def setup(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / "pics"
        write_shapes_folder(folder, count, size=16, channels=3, seed=1)
        change(folder)
        return train_args(ctx, TINY, *data_source("folder", str(folder), "data.channels=3", *sets))

    return setup


def flat_folder(change: Callable[[Path], None], *sets: str) -> Callable[[Ctx], list[str]]:
    """Twelve grey 20x24 PNGs directly in a folder, changed by ``change``; then train on it."""

    def setup(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / "flat"
        folder.mkdir()
        for i in range(12):
            Image.new("L", (20, 24), 10 * i).save(folder / f"{i:02d}.png")
        change(folder)
        return train_args(ctx, TINY, *data_source("folder", str(folder), *sets))

    return setup


CROP = ("data.size=16", "data.crop=centre")


def with_cache(damage: Callable[[Path], None], change: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    """A run folder whose data cache was built, then damaged by ``damage``; the folder then changed by ``change``."""

    def setup(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / "pics"
        write_shapes_folder(folder, 24, size=16, channels=3, seed=1)
        args = train_args(ctx, TINY, *data_source("folder", str(folder), "data.channels=3"), verb=("--stage", "1"))
        assert main([*args, "--until", "1"]) == 0
        damage(ctx.tmp / "r" / CACHE_DIR)
        change(folder)
        return args

    return trains(setup)


def truncate_cache(cache: Path) -> None:
    (images,) = cache.glob("images-*.u8")
    images.write_bytes(images.read_bytes()[:100])


def unreadable(folder: Path) -> None:
    (folder / "0-ellipse" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png after all")


def meddling_build(ctx: Ctx) -> list[str]:
    """The folder changes while its cache is built: a file appears when the fifth image is read."""
    folder = ctx.tmp / "pics"
    write_shapes_folder(folder, 24, size=16, channels=3, seed=1)
    real, calls = progvq.folder.decode, []

    def decode(where: Path, entry: Any, transform: Any) -> np.ndarray:
        calls.append(entry)
        if len(calls) == 5:
            Image.new("RGB", (16, 16)).save(where / "1-rectangle" / "late.png")
        return real(where, entry, transform)

    ctx.request.getfixturevalue("monkeypatch").setattr(progvq.folder, "decode", decode)
    return train_args(ctx, TINY, *data_source("folder", str(folder), "data.channels=3"))


def cache_is_a_file(ctx: Ctx) -> list[str]:
    folder = ctx.tmp / "pics"
    write_shapes_folder(folder, 24, size=16, channels=3, seed=1)
    ctx.write(f"r/{CACHE_DIR}", "a file where the cache folder goes")
    return train_args(ctx, TINY, *data_source("folder", str(folder), "data.channels=3"))


# --------------------------------------------------------------------------- the table

BIG = 2**32 - 1  # the largest idx dimension
CASES: list[Case] = [
    # ---- idx headers: dimensions, magic numbers, type codes, gzip
    Case(
        "idx", "dims-multiply-to-2**64",
        mnist_folder(write_to(IMAGES, idx_header(2051, 2**22, 2**21, 2**21))),
        (f"{IMAGES}: idx payload is 0 bytes, header announces 4194304 x 2097152 x 2097152 = {2**64}",),
    ),
    Case(
        "idx", "dims-past-64-bits-with-payload",
        mnist_folder(write_to(IMAGES, idx_header(2051, BIG, BIG, BIG) + GOOD.tobytes())),
        (f"{IMAGES}: idx payload is 3072 bytes, header announces {BIG} x {BIG} x {BIG} = {BIG**3}",),
    ),
    Case(
        "idx", "labels-count-past-the-file",
        mnist_folder(lambda f: ((f / IMAGES).write_bytes(idx_bytes(GOOD)),
                                (f / LABELS).write_bytes(idx_header(2049, BIG) + bytes(12)))),
        (f"{LABELS}: idx payload is 12 bytes, header announces {BIG} = {BIG}",),
    ),
    Case(
        "idx", "gz-dims-multiply-to-2**64",
        mnist_folder(write_to(IMAGES + ".gz", gzip.compress(idx_header(2051, 2**22, 2**21, 2**21)))),
        (f"{IMAGES}.gz: idx payload is 0 bytes, header announces 4194304 x 2097152 x 2097152",),
    ),
    Case(
        "idx", "gz-inflates-past-its-header",
        mnist_folder(write_to(IMAGES + ".gz", gzip.compress(idx_header(2051, 2, 16, 16) + bytes(10**6)))),
        (f"{IMAGES}.gz: idx payload is 513 bytes or more, header announces 2 x 16 x 16 = 512",),
    ),
    Case(
        "idx", "type-code-float32",
        mnist_folder(write_to(IMAGES, idx_header(0x0D03, 12, 16, 16) + bytes(12 * 16 * 16 * 4))),
        (f"{IMAGES}: idx type code 0x0D (float32) not supported (magic 3331)",),
    ),
    Case(
        "idx", "type-code-int32-labels",
        mnist_folder(lambda f: ((f / IMAGES).write_bytes(idx_bytes(GOOD)),
                                (f / LABELS).write_bytes(idx_header(0x0C01, 12) + bytes(48)))),
        (f"{LABELS}: idx type code 0x0C (int32) not supported",),
    ),
    Case(
        "idx", "two-dimensions",
        mnist_folder(write_to(IMAGES, idx_header(0x0802, 12, 256) + GOOD.tobytes())),
        (f"{IMAGES}: idx file of 2 dimensions (magic 2050)",),
    ),
    Case(
        "idx", "magic-not-idx",
        mnist_folder(write_to(IMAGES, b"GIF89a" + bytes(100))),
        (f"{IMAGES}: not an idx file (magic",),
    ),
    Case(
        "idx", "header-cut-in-the-dims",
        mnist_folder(write_to(IMAGES, idx_header(2051, 12))),
        (f"{IMAGES}: truncated idx header (8 of 16 bytes)",),
    ),
    Case(
        "idx", "gz-header-cut",
        mnist_folder(write_to(IMAGES + ".gz", gzip.compress(idx_header(2051)[:3]))),
        (f"{IMAGES}.gz: not an idx file (only 3 bytes)",),
    ),
    # ---- .npy / .npz headers
    Case(
        "npy", "announces-terabytes",
        array_file("tb.npy", raw(npy_header((10**12, 28, 28)) + bytes(100))),
        (
            ("tb.npy: cannot load array (its header announces 1000000000000 x 28 x 28 of uint8 = "
            "784000000000000 bytes, but 100 bytes follow it)"),
        ),
    ),
    Case(
        "npy", "shape-past-64-bits",
        array_file("wide.npy", raw(npy_header((2**40, 2**40, 16)) + bytes(64))),
        (f"wide.npy: cannot load array (its header announces {2**40} x {2**40} x 16 of uint8 = {2**84} bytes",),
    ),
    Case(
        "npy", "float64-exabytes",
        array_file("f.npy", raw(npy_header((2**30, 2**30, 4), "<f8") + bytes(8))),
        (f"f.npy: cannot load array (its header announces {2**30} x {2**30} x 4 of float64",),
    ),
    Case(
        "npy", "version-2-header-terabytes",
        array_file("v2.npy", raw(npy_header((10**12, 16, 16), version=(2, 0)) + bytes(10))),
        ("v2.npy: cannot load array (its header announces 1000000000000 x 16 x 16",),
    ),
    Case(
        "npy", "unknown-version",
        array_file("v9.npy", raw(b"\x93NUMPY\x09\x00" + bytes(100))),
        ("v9.npy: cannot load array",),
    ),
    Case(
        "npy", "payload-longer-than-header",
        array_file("long.npy", raw(npy_header((12, 16, 16)) + GOOD.tobytes() + bytes(7))),
        ("long.npy: cannot load array (its header announces 12 x 16 x 16 of uint8 = 3072 bytes, but 3079",),
    ),
    Case(
        "npy", "header-not-a-dict",
        array_file("junk.npy", raw(b"\x93NUMPY\x01\x00" + (10).to_bytes(2, "little") + b"[1, 2, 3]\n")),
        ("junk.npy: cannot load array",),
    ),
    Case(
        "npz", "member-announces-terabytes",
        array_file("tb.npz", npz_with({"images.npy": npy_header((10**12, 16, 16)) + bytes(1000)})),
        ("tb.npz[images]: cannot load array (its header announces 1000000000000 x 16 x 16 of uint8",),
    ),
    Case(
        "npz", "member-cut-short",
        array_file("cut.npz", npz_with({"images.npy": npy_header((12, 16, 16)) + GOOD.tobytes()[:1000]})),
        (
            ("cut.npz[images]: cannot load array (its header announces 12 x 16 x 16 of uint8 = 3072 bytes, "
            "but 1000 bytes follow it)"),
        ),
    ),
    Case(
        "npz", "member-of-objects",
        array_file("obj.npz", npz_with({"images.npy": npy_header((2,), "|O") + bytes(16)})),
        ("obj.npz[images]: cannot load array (it holds Python objects",),
    ),
    Case(
        "npz", "named-key-announces-terabytes",
        array_file(
            "two.npz",
            npz_with({"a.npy": npy_bytes(GOOD), "b.npy": npy_header((2**33, 2**33), "<f4") + bytes(4)}),
            "data.key=b",
        ),
        (f"two.npz[b]: cannot load array (its header announces {2**33} x {2**33} of float32",),
    ),
    # ---- labels a trained class-conditional prior never saw
    Case(
        # the labels file changed under the same path: other data, refused before any class is read
        "labels", "eval-label-beyond-the-prior", labels_beyond_prior("eval"),
        ("the prior was trained on other data (data.path data: the same images with other labels)",),
    ),
    Case(
        "labels", "eval-label-just-past-the-prior", labels_beyond_prior("eval", label=9),
        ("the prior was trained on other data", "other labels"),
    ),
    Case(
        # a new class means other labels: the partial prior was started on other data
        "labels", "resume-prior-with-a-new-class", labels_beyond_prior("train", "prior-3"),
        ("prior-3: the prior (partial (step 3 of 6)) was started on other data", "other labels"),
    ),
    # ---- image folders and their cache
    Case(
        "folder", "no-images-only-empty-class-folders",
        shapes_folder(lambda f: [p.unlink() for p in f.rglob("*.png")]),
        ("{tmp}/pics: no image files (.png, .jpg, .jpeg) or .webp files in it or in class folders",),
    ),
    Case(
        "folder", "image-smaller-than-the-crop",
        flat_folder(lambda f: Image.new("L", (20, 12)).save(f / "05.png"), *CROP),
        ("{tmp}/flat/05.png: image is 20x12, smaller than the 16x16 crop",),
    ),
    Case(
        "folder", "images-beside-class-folders",
        shapes_folder(lambda f: Image.new("RGB", (16, 16)).save(f / "stray.png")),
        ("{tmp}/pics: images both directly inside (stray.png) and in class folders (0-ellipse/)",),
    ),
    Case(
        "folder", "unreadable-image-in-a-class",
        shapes_folder(unreadable),
        ("{tmp}/pics/0-ellipse/zz.png: cannot read image (UnidentifiedImageError",),
    ),
    Case(
        "folder", "too-few-after-skipping",
        flat_folder(lambda f: [(f / f"{i:02d}.png").write_bytes(b"broken") for i in range(4)],
                    *CROP, "data.heldout=8", "data.on_unreadable=skip"),
        ("{tmp}/flat (after skipping 4 unreadable files): 8 images, need more than data.heldout (8)",),
    ),
    Case(
        "folder", "mixed-sizes-without-crop",
        flat_folder(lambda f: Image.new("L", (24, 20)).save(f / "03.png"), "data.size=32"),
        ("{tmp}/flat/03.png: image size 24x20 differs from 00.png's 20x24",),
    ),
    Case(
        "folder", "changed-while-its-cache-is-built", meddling_build,
        ("{tmp}/pics: changed while its images were read",),
        new_files_ok=True,  # the file that appeared mid-build: nothing else
    ),
    Case(
        "folder", "damaged-cache-and-an-unreadable-new-file", with_cache(truncate_cache, unreadable),
        ("{tmp}/pics/0-ellipse/zz.png: cannot read image",),
    ),
    Case(
        "folder", "cache-path-is-a-file", cache_is_a_file,
        ("{tmp}/r/data-cache: not a folder (progvq keeps its data cache there)",),
    ),
    Case(
        "folder", "resize-without-crop", flat_folder(lambda f: None, "data.size=16", "data.resize=shorter-side"),
        ("data.crop: must be centre or random with data.resize 'shorter-side', got 'none'",),
    ),
    Case(
        "folder", "crop-without-size", flat_folder(lambda f: None, "data.size=null", "data.crop=random"),
        ("data.size: must be the crop's side with data.crop 'random', got None",),
    ),
    Case(
        "folder", "crop-for-mnist", mnist_folder(lambda f: None, "data.crop=centre"),
        ("data.crop: must be 'none' for source 'mnist', got 'centre'",),
    ),
    Case(
        "folder", "unknown-crop", flat_folder(lambda f: None, "data.crop=center-ish"),
        ("data.crop: must be one of none, centre, random, got 'center-ish'",),
    ),
    Case(
        "folder", "unknown-on-unreadable", flat_folder(lambda f: None, "data.on_unreadable=ignore"),
        ("data.on_unreadable: must be one of refuse, skip, got 'ignore'",),
    ),
]


def test_table_is_big_and_unique() -> None:
    ids = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids))
    assert sum(c.kind in ("idx", "npy", "npz", "labels") for c in CASES) >= 15


@pytest.mark.parametrize("case", case_params(CASES))
def test_bad_data_is_one_line_status_2_and_keeps_files(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before, after = check_refusal(case, tmp_path, request, capsys, monkeypatch)
    if case.new_files_ok:  # only the file that appeared mid-build, in the folder, never the cache
        assert all("data-cache" not in name and name.startswith("pics/") for name in set(after) - set(before))
