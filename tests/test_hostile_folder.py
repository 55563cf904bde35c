"""Hostile image folders and data caches through the real command line: the cache's manifest, the walk
over the folder, file names that would break a line, and sizes that would not fit.

Each row of the table runs ``main([...])`` under a watchdog and checks what ``tests/test_bad_input.py``
checks: exit status 2, exactly one ``progvq: error:`` line naming the file, folder or key, no
traceback, and every file present before byte-identical after (nothing new either).

A hostile manifest is not an error: the cache is built again. Those are plain tests below, each
checking the one log line that says why, that the command succeeds, that no file outside the
data cache changed, and that the rebuilt cache is the one a clean build makes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

import progvq.folder
import progvq.memory
from progvq.config import DataConfig
from progvq.data import load_dataset
from progvq.errors import DataError
from progvq.folder import (
    CACHE_DIR,
    FILES,
    MANIFEST,
    Entry,
    Transform,
    escape_name,
    files_table,
    list_folder,
    read_files_table,
    shown,
    unescape_name,
)
from run_stage import main

from .conftest import TINY
from .helpers import tiny_raw
from .test_bad_input import (
    WATCHDOG_S,
    Case,
    Ctx,
    Setup,
    case_params,
    check_refusal,
    images16,
    png_folder,
    train_args,
    trains,
    watchdog,
)
from .test_bad_input import snapshot as snap

# --------------------------------------------------------------------------- helpers

#: A side no machine holds one image of: 10**12 bytes a grey image, more with its resize.
HUGE = 1_000_000


def folder_sets(folder: Path | str, *extra: str) -> tuple[str, ...]:
    """The ``--set`` values that read ``folder`` as ten grey 16x16 images, two held out."""
    return ("data.source=folder", f"data.path={folder}", "data.heldout=2", "data.channels=1", *extra)


def write_pngs(folder: Path, n: int = 10, names: Callable[[int], str] = lambda i: f"{i:02d}.png") -> list[str]:
    """``n`` good grey 16x16 PNGs in ``folder`` (made if missing); their names."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, image in enumerate(images16(n)):
        Image.fromarray(image).save(folder / names(i), format="PNG")
        made.append(names(i))
    return made


def patch(ctx: Ctx) -> pytest.MonkeyPatch:
    """The row's own monkeypatch (undone when the row ends)."""
    return ctx.request.getfixturevalue("monkeypatch")


def with_cache(make: Callable[[Path], None], content: Callable[[Path], None] = lambda f: None, *extra: str) -> Setup:
    """Ten good PNGs changed by ``content``, trained into ``tmp/r`` where ``make(r/data-cache)`` made a cache."""
    inner = png_folder(content, *extra)

    def setup(ctx: Ctx) -> list[str]:
        argv = inner(ctx)
        cache = ctx.tmp / "r" / CACHE_DIR
        cache.parent.mkdir(parents=True, exist_ok=True)
        make(cache)
        return argv

    return setup


def folder_dir(make: Callable[[Path], None]) -> Callable[[Path], None]:
    """Make the data cache folder, then ``make`` things in it."""

    def run(cache: Path) -> None:
        cache.mkdir()
        make(cache)

    return run


def eval_on_copy(change: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    """``eval`` on a copy of the trained folder run, its data cache changed by ``change``."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        run = copy_run(ctx.request.getfixturevalue("folder_run"), ctx.tmp)
        change(run / CACHE_DIR)
        return ["eval", str(run)]

    return setup


def config_with_data(ctx: Ctx, **data: Any) -> Path:
    """tiny.yaml with ``data`` keys set, written to ``tmp/bad.yaml`` (for values --set cannot carry)."""
    raw = tiny_raw()
    raw["data"].update(data)
    return ctx.write("bad.yaml", yaml.safe_dump(raw))


def copy_run(run: dict[str, Path], dest: Path) -> Path:
    """A private copy of the trained folder run (its images stay where they are: the cache names them)."""
    return Path(shutil.copytree(run["run"], dest / "run", symlinks=True))


def deep_chain(top: Path, levels: int) -> Path:
    """``top/d/d/.../d`` ``levels`` deep (made one level at a time: os.makedirs recurses), with a PNG at the
    bottom; the bottom folder."""
    here = top
    here.mkdir(parents=True, exist_ok=True)
    for _ in range(levels):
        here = here / "d"
        here.mkdir()
    write_pngs(here, 1)
    return here


def remove_chain(top: Path) -> None:
    """Remove a tree too deep for shutil.rmtree's recursion, bottom up, one folder at a time."""
    stack = [top]
    while stack:
        here = stack[-1]
        subs = [p for p in here.iterdir() if p.is_dir() and not p.is_symlink()]
        if subs:
            stack.extend(subs)
            continue
        for p in here.iterdir():
            p.unlink()
        here.rmdir()
        stack.pop()


def unreadable(ctx: Ctx, folder: Path) -> None:
    """``folder`` unreadable: mode 000, and, where that does not bind (root reads any folder), its listing
    refused as the kernel would refuse it."""
    folder.chmod(0)
    ctx.request.addfinalizer(lambda: folder.chmod(0o755))
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if not isinstance(path, int) and os.fspath(path) == str(folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real(path)

    patch(ctx).setattr(os, "scandir", scandir)


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def broken(name: str | bytes) -> Callable[[Path], None]:
    """A file ``name`` (bytes for a name that is not UTF-8) that is no image."""

    def write(folder: Path) -> None:
        path = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
        with open(path, "wb") as f:
            f.write(b"not an image at all")

    return write


def sized(name: str, width: int, height: int) -> Callable[[Path], None]:
    """A grey PNG ``name`` of ``width`` x ``height``."""

    def write(folder: Path) -> None:
        Image.new("L", (width, height), 90).save(folder / name, format="PNG")

    return write


# --------------------------------------------------------------------------- the trained folder run


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny.yaml trained a few steps on a folder of ten grey 16x16 PNGs, with its data cache (read-only)."""
    base = tmp_path_factory.mktemp("folder_run")
    folder = base / "pngs"
    write_pngs(folder)
    run = base / "run"
    args = ["train", str(TINY), "--all", "--run-dir", str(run), "--no-progress"]
    sets = [*folder_sets(folder), *(f"stages.{s}.steps=2" for s in ("1", "2", "prior"))]
    for value in sets:
        args += ["--set", value]
    assert main(args) == 0
    return {"run": run, "folder": folder}


# --------------------------------------------------------------------------- what the rows make


def patched(change: Callable[[pytest.MonkeyPatch], None], setup: Setup) -> Setup:
    """``setup`` after ``change`` patched something for the row (a limit, the free memory or disk)."""

    def run(ctx: Ctx) -> list[str]:
        change(patch(ctx))
        return setup(ctx)

    return run


def chain(name: str, levels: int) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        deep_chain(folder / name, levels)

    return make


def link(name: str, target: str, *, images: int = 0) -> Callable[[Path], None]:
    """A symbolic link ``name`` (inside the folder) to ``target``, after ``images`` PNGs in its folder."""

    def make(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if images:
            write_pngs(path.parent, images)
        path.symlink_to(target)

    return make


def classes(*names: str, each: int = 5) -> Callable[[Path], None]:
    """Class folders ``names`` of ``each`` PNGs, the PNGs directly inside the folder removed."""

    def make(folder: Path) -> None:
        for png in folder.glob("*.png"):
            png.unlink()
        for name in names:
            write_pngs(folder / name, each)

    return make


def both(*makes: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        for one in makes:
            one(folder)

    return make


def unreadable_class(ctx: Ctx) -> list[str]:
    def make(folder: Path) -> None:
        classes("a", "b", each=3)(folder)
        unreadable(ctx, folder / "b")

    return png_folder(make)(ctx)


def newline_in_the_folder(ctx: Ctx) -> list[str]:
    folder = ctx.tmp / "pn\ngs"
    write_pngs(folder)
    broken("05.png")(folder)
    return train_args(ctx, config_with_data(ctx, source="folder", path=str(folder), heldout=2, channels=1))


def small_disk(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))


def small_memory(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(progvq.memory, "available_bytes", lambda device="cpu": 50 << 20)


def limit(name: str, value: int) -> Callable[[pytest.MonkeyPatch], None]:
    return lambda mp: mp.setattr(progvq.folder, name, value)


def manifest_text(text: str) -> Callable[[Path], None]:
    return folder_dir(lambda cache: (cache / MANIFEST).write_text(text))


def replace_cache_file_with_a_folder(cache: Path) -> None:
    for path in cache.glob("images-*.u8"):
        path.unlink()
        path.mkdir()


# --------------------------------------------------------------------------- the table

CASES: list[Case] = [
    # ---- the data cache and its manifest: refused only where progvq cannot write its cache
    Case(
        "manifest",
        "cache-is-a-file",
        with_cache(lambda c: c.write_text("not a folder")),
        ("r/data-cache: not a folder", "move it away"),
    ),
    Case("manifest", "cache-is-a-fifo", with_cache(make_fifo), ("r/data-cache: not a folder",)),
    Case(
        "manifest",
        "manifest-is-a-folder",
        with_cache(folder_dir(lambda c: (c / MANIFEST).mkdir())),
        ("r/data-cache/manifest.json: a folder where progvq writes its data cache", "move it away"),
    ),
    Case(
        "manifest",
        "files-table-is-a-folder",
        with_cache(folder_dir(lambda c: (c / FILES).mkdir())),
        ("r/data-cache/files.tsv: a folder where",),
    ),
    Case(
        "manifest",
        "cache-file-is-a-folder",
        eval_on_copy(replace_cache_file_with_a_folder),
        ("run/data-cache/images-", ".u8: a folder where progvq writes its data cache"),
    ),
    Case(
        "manifest",
        "deep-manifest-then-a-broken-image",
        with_cache(manifest_text("[" * 100_000 + "]" * 100_000), broken("05.png")),
        ("pngs/05.png: cannot read image",),
    ),
    Case(
        "manifest",
        "nan-manifest-then-another-size",
        with_cache(manifest_text('{"bytes": NaN}'), sized("05.png", 16, 20)),
        ("pngs/05.png: image size 16x20 differs from 00.png's 16x16",),
    ),
    Case(
        "manifest",
        "too-many-skipped-to-list",
        patched(
            limit("MANIFEST_MAX_BYTES", 1500),
            png_folder(both(*(broken(f"z{i}-{'x' * 100}.png") for i in range(5))), "data.on_unreadable=skip"),
        ),
        ("pngs: 5 unreadable files skipped, more than the data cache's manifest can list in 1.5 KiB",),
    ),
    # ---- the walk over the folder: bounded in depth and entries, no loops
    Case(
        "walk",
        "deeper-than-64",
        png_folder(chain("a", 65)),
        ("pngs/a/" + "d/" * 64 + "d: folders nested more than 64 levels below", "/pngs/a;"),
    ),
    Case(
        "walk",
        "200-deep-beside-a-class",
        png_folder(both(classes("a"), chain("z", 200))),
        ("more than 64 levels below",),
    ),
    Case(
        "walk",
        "link-back-to-the-folder",
        png_folder(link("a/up", "..", images=2)),
        ("pngs/a/up: a folder loop: it is", "/pngs, a folder it lies in"),
    ),
    Case(
        "walk",
        "link-to-itself",
        png_folder(link("a/me", ".", images=2)),
        ("pngs/a/me: a folder loop: it is", "/pngs/a, a folder it lies in"),
    ),
    Case("walk", "class-folder-is-the-folder", png_folder(link("b", ".")), ("pngs/b: a folder loop",)),
    Case(
        "walk",
        "loop-deep-down",
        png_folder(both(chain("c", 3), link("c/d/d/back", "../.."))),
        ("pngs/c/d/d/back: a folder loop: it is", "/pngs/c, a folder it lies in"),
    ),
    Case(
        "walk",
        "too-many-entries-flat",
        patched(limit("MAX_ENTRIES", 5), png_folder(lambda f: None)),
        ("pngs: more than 5 files and folders in it", "point data.path at a smaller folder"),
    ),
    Case(
        "walk",
        "too-many-entries-in-classes",
        patched(limit("MAX_ENTRIES", 12), png_folder(classes("a", "b", "c"))),
        ("pngs: more than 12 files and folders in it",),
    ),
    Case(
        "walk", "unreadable-class-folder", unreadable_class, ("pngs/b: cannot list image folder (Permission denied)",)
    ),
    # ---- names that would break the line: each named escaped, on one line
    Case(
        "names",
        "newline-in-a-broken-file",
        png_folder(broken("bad\nname.png")),
        ("pngs/bad\\nname.png: cannot read image",),
    ),
    Case(
        "names",
        "tab-in-a-file-of-another-size",
        png_folder(sized("tab\tname.png", 16, 20)),
        ("pngs/tab\\tname.png: image size 16x20 differs",),
    ),
    Case(
        "names",
        "carriage-return-in-a-file-too-small",
        png_folder(sized("cr\rname.png", 8, 8), "data.crop=centre"),
        ("pngs/cr\\rname.png: image is 8x8, smaller than the 16x16 crop",),
    ),
    Case(
        "names",
        "newline-in-a-class-folder",
        png_folder(both(classes("b", "cl\nass"), broken("cl\nass/x.png"))),
        ("pngs/cl\\nass/x.png: cannot read image",),
    ),
    Case("names", "not-utf8-broken-file", png_folder(broken(b"bad\xff.png")), ("pngs/bad\\udcff.png: cannot read",)),
    Case(
        "names",
        "line-separator-and-backslash",
        png_folder(broken("a\\b\u2028c.png")),
        ("pngs/a\\\\b\\u2028c.png: cannot read image",),
    ),
    Case(
        "names",
        "newline-beside-class-folders",
        png_folder(both(classes("a"), sized("stray\n.png", 16, 16))),
        ("images both directly inside (stray\\n.png) and in class folders (a/)",),
    ),
    Case("names", "newline-in-the-folder", newline_in_the_folder, ("pn\\ngs/05.png: cannot read image",)),
    # ---- sizes checked before the work
    Case(
        "sizes",
        "huge-shorter-side",
        png_folder(lambda f: None, f"data.size={HUGE}", "data.resize=shorter-side", "data.crop=centre"),
        ("pngs/00.png: resizing a 16x16 image to 1000000x1000000 (data.size 1000000)", "of memory available"),
    ),
    Case(
        "sizes",
        "huge-centre-crop",
        png_folder(lambda f: None, f"data.size={HUGE}", "data.crop=centre"),
        ("pngs/00.png: an image of 1x1000000x1000000 (data.size 1000000) would take", "of memory available"),
    ),
    Case(
        "sizes",
        "huge-random-crop",
        png_folder(lambda f: None, f"data.size={HUGE}", "data.crop=random"),
        ("(data.size 1000000) would take",),
    ),
    Case(
        "sizes",
        "huge-padding",
        png_folder(lambda f: None, f"data.size={HUGE}"),
        ("data.size: 1000000: one image of", "padded to 1x1000000x1000000", "of memory available"),
    ),
    Case(
        "sizes",
        "cache-larger-than-the-disk",
        patched(small_disk, png_folder(lambda f: None)),
        (
            "r/data-cache: a data cache of 10 images of 1x16x16 (data.size 16) would take 2.5 KiB",
            "more than the 1000 bytes free on its disk",
        ),
    ),
    Case(
        "sizes",
        "one-long-image-resized",
        patched(
            small_memory,
            png_folder(
                sized("99-long.png", 16, 16 * 20_000), "data.size=64", "data.resize=shorter-side", "data.crop=centre"
            ),
        ),
        (
            "pngs/99-long.png: resizing a 16x320000 image to 64x1280000 (data.size 64)",
            "more than the 50.0 MiB of memory available",
        ),
    ),
]


def test_table_is_big_unique_and_covers_every_kind() -> None:
    ids = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 18
    assert {c.kind for c in CASES} == {"manifest", "walk", "names", "sizes"}


@pytest.mark.parametrize("case", case_params(CASES))
def test_hostile_folder_is_one_line_status_2_and_keeps_files(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_refusal(case, tmp_path, request, capsys, monkeypatch)


# --------------------------------------------------------------------------- a hostile manifest: rebuilt


def text_of(manifest: dict[str, Any]) -> bytes:
    """A manifest as the cache writes it."""
    return json.dumps(manifest, indent=1).encode()


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


Make = Callable[[Path, dict[str, Any], pytest.MonkeyPatch], None]


def edit(change: Callable[[dict[str, Any]], None]) -> Make:
    """The manifest with ``change`` made to it (an edit that keeps its source: the cache's values are read)."""

    def make(cache: Path, manifest: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        change(manifest)
        (cache / MANIFEST).write_bytes(text_of(manifest))

    return make


def raw(text: Callable[[dict[str, Any]], bytes]) -> Make:
    def make(cache: Path, manifest: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        (cache / MANIFEST).write_bytes(text(manifest))

    return make


def swap(make_there: Callable[[Path], None]) -> Make:
    """The manifest replaced by something that is not a file."""

    def make(cache: Path, manifest: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
        (cache / MANIFEST).unlink()
        make_there(cache / MANIFEST)

    return make


def over_the_limit(cache: Path, manifest: dict[str, Any], mp: pytest.MonkeyPatch) -> None:
    """The manifest padded (with white space JSON allows) past a limit lowered to 100 KB, which the clean
    manifest is far below."""
    mp.setattr(progvq.folder, "MANIFEST_MAX_BYTES", 100_000)
    (cache / MANIFEST).write_bytes(text_of(manifest) + b" " * 200_000)


def put(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: manifest.update(values)


def put_shape(index: int, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda manifest: manifest["shape"].__setitem__(index, value)


#: name -> (how the run's manifest is made hostile, what the log line of the rebuild says). Every
#: edit keeps the manifest's ``source`` where it can, so the values that follow it are the ones read.
MANIFESTS: dict[str, tuple[Make, str]] = {
    "nested-100000-deep": (raw(lambda m: b"[" * 100_000 + b"]" * 100_000), "nested 100000 deep, at most 32"),
    "source-nested-40-deep": (edit(put(source=nested(40))), "nested 41 deep, at most 32"),
    "nan-bytes": (
        raw(lambda m: text_of(m).replace(b'"bytes": 2560', b'"bytes": NaN')),
        "NaN is not a number JSON allows",
    ),
    "infinity-side": (
        raw(lambda m: text_of(m).replace(b"16\n ]", b"Infinity\n ]")),
        "Infinity is not a number JSON allows",
    ),
    "float-count": (edit(put_shape(0, 10.0)), "shape[0]: expected an integer, got 10.0"),
    "true-channels": (edit(put_shape(1, True)), "shape[1]: expected an integer, got true"),
    "negative-shape": (edit(put(shape=[-10, 1, 16, 16], bytes=-2560)), "shape[0]: -10 is out of range"),
    "huge-shape": (edit(put(shape=[10, 1, 2**40, 2**40], bytes=10 * 2**80)), "shape[2]: 1099511627776 is out of range"),
    "large-shape-in-range": (
        edit(put(shape=[10, 1, 2**20, 2**20], bytes=10 * 2**40)),
        "shape [10, 1, 1048576, 1048576] is not that of the folder's images",
    ),
    "same-bytes-other-shape": (edit(put(shape=[10, 1, 8, 32])), "shape [10, 1, 8, 32] is not that of the folder"),
    "file-up-a-folder": (edit(put(file="../config.yaml")), 'file: "../config.yaml" is not of the expected form'),
    "file-dot-dot": (edit(put(file="..")), 'file: ".." is not of the expected form'),
    "file-absolute": (edit(put(file="/etc/passwd")), 'file: "/etc/passwd" is not of the expected form'),
    "file-a-number": (edit(put(file=7)), "file: expected a string, got 7"),
    "shape-a-string": (edit(put(shape="10x1x16x16")), 'shape: expected an array, got "10x1x16x16"'),
    "bytes-true": (edit(put(bytes=True)), "bytes: expected an integer, got true"),
    "not-an-object": (raw(lambda m: b"[]"), "manifest.json: expected an object, got an array"),
    "not-json": (raw(lambda m: b"{not json"), "manifest.json: not JSON"),
    "not-utf8": (raw(lambda m: b'{"file": "\xff"}'), "manifest.json: not UTF-8 text"),
    "unknown-key": (edit(put(extra=1)), 'manifest.json: unknown key "extra"'),
    "no-digest": (edit(lambda m: m.pop("digest")), "manifest.json: no key 'digest'"),
    "skipped-files-not-the-folders": (
        edit(put(skipped=["x: gone"], skipped_files=["../../etc/passwd"])),
        "its manifest's skipped files are not the folder's",
    ),
    "count-of-many-lines": (
        edit(lambda m: m["source"].update(count="x\n" * 1000)),
        "the folder holds 10 images, the cache another number; building the data cache again",
    ),
    "a-named-pipe": (swap(make_fifo), "manifest.json is not a regular file"),
    "a-link-to-dev-zero": (swap(lambda p: p.symlink_to("/dev/zero")), "manifest.json is not a regular file"),
    "over-the-size-limit": (over_the_limit, "bytes of JSON, at most 100000"),
}


def outside_the_cache(entries: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entries.items() if not k.startswith(f"run/{CACHE_DIR}")}


@pytest.mark.trains
@pytest.mark.parametrize("name", list(MANIFESTS))
def test_a_hostile_manifest_is_rebuilt_in_one_line(
    name: str,
    folder_run: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A manifest that fails its schema or disagrees with the folder is damage: one log line says why, the
    cache is built again, and the command goes on; nothing outside the cache changes."""
    run = copy_run(folder_run, tmp_path)
    cache = run / CACHE_DIR
    clean = snap(cache)
    make, says = MANIFESTS[name]
    make(cache, json.loads((cache / MANIFEST).read_bytes()), monkeypatch)
    before, images = snap(tmp_path), snap(folder_run["folder"])
    capsys.readouterr()
    with watchdog(WATCHDOG_S):
        code = main(["eval", str(run)])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err and "error" not in err, err
    said = [line for line in out.splitlines() if CACHE_DIR in line]
    assert len(said) == 1 and said[0].startswith(f"{cache}: "), out
    assert says in said[0], said[0]
    assert "data cache damaged" in said[0] or "building the data cache again" in said[0], said[0]
    assert outside_the_cache(snap(tmp_path)) == outside_the_cache(before)
    assert snap(folder_run["folder"]) == images
    assert snap(cache) == clean  # the rebuilt cache is the one a clean build makes, byte for byte


def test_manifest_variants_are_many() -> None:
    assert len(MANIFESTS) >= 8


# --------------------------------------------------------------------------- the walk


def reference_walk(top: Path, rel: str, label: int) -> list[Entry]:
    """The image files under ``top`` as the recursive walk read them: depth first over sorted names."""
    with os.scandir(top) as it:
        items = sorted(it, key=lambda e: e.name)
    out: list[Entry] = []
    for item in items:
        if item.name.startswith("."):
            continue
        path = f"{rel}/{item.name}" if rel else item.name
        if item.is_dir():
            out += reference_walk(Path(item.path), path, label)
        elif os.path.splitext(item.name)[1].lower() in (".png", ".jpg", ".jpeg", ".webp") and item.is_file():
            st = item.stat()
            out.append(Entry(path, st.st_size, st.st_mtime_ns, label))
    return out


def test_the_walk_lists_what_the_recursive_walk_listed(tmp_path: Path) -> None:
    """On a nested tree (dot names, other files, a link to another folder, a dangling link, names that sort
    differently as paths and as names) the walk gives the same entries in the same order: the cache's
    record of the files is unchanged, so no cache is rebuilt for it."""
    top = tmp_path / "tree"
    write_pngs(top / "a", 2)
    write_pngs(top / "a" / "b", 1)
    write_pngs(top / "a" / "b-c", 1)
    sized("b.png", 4, 4)(top / "a")
    write_pngs(top / "a" / "x" / "y" / "z", 2)
    write_pngs(top / "a" / "x" / ".hidden", 1)
    (top / "a" / "x" / "notes.txt").write_text("not an image")
    sized("PIC.JPG.png", 3, 5)(top / "a" / "x")
    (top / "a" / "x" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    write_pngs(top / "c" / "deep" / "er", 3)
    (top / "a" / "to-c").symlink_to("../c")  # the same folder twice, on two paths: no loop, read under both
    (top / "e").mkdir()
    listing = list_folder(top)
    assert listing.classes == ["a", "c", "e"]
    reference = [e for k, name in enumerate(["a", "c", "e"]) for e in reference_walk(top / name, name, k)]
    assert listing.entries == sorted(reference, key=lambda e: e.rel)
    assert len(listing.entries) == 14 and "a/to-c/deep/er/00.png" in {e.rel for e in listing.entries}
    # the walk itself, before the listing sorts it: the recursive walk's depth-first order
    budget = progvq.folder._Budget(top)
    key = progvq.folder._folder_key((top / "a").stat())
    walked = list(progvq.folder._walk_images(str(top / "a"), "a", 0, budget, {}, key))
    assert walked == reference_walk(top / "a", "a", 0)
    assert [e.rel for e in walked][:4] == ["a/00.png", "a/01.png", "a/b/00.png", "a/b-c/00.png"]


def test_a_tree_1100_folders_deep_is_one_line_not_a_recursion_error(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deeper than Python's recursion limit: refused at the depth limit; and with the limit raised the
    walk still reads it, in a loop rather than in recursion."""
    folder = tmp_path / "pngs"
    write_pngs(folder / "a", 5)
    bottom = deep_chain(folder / "b", 1100)
    try:
        capsys.readouterr()
        with watchdog(WATCHDOG_S):
            code = main(train_args(Ctx(tmp_path, request), TINY, *folder_sets(folder)))
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"progvq: error: {folder}/b/{'d/' * 64}d: folders nested more than 64 levels below")
        assert not (tmp_path / "r").exists()
        monkeypatch.setattr(progvq.folder, "MAX_DEPTH", 2000)
        listing = list_folder(folder)
        deepest = [e for e in listing.entries if e.label == 1]
        assert len(listing.entries) == 6 and [folder / e.rel for e in deepest] == [bottom / "00.png"]
    finally:
        remove_chain(folder / "b")


def test_the_depth_limit_counts_levels_below_the_class_folder(tmp_path: Path) -> None:
    bottom = deep_chain(tmp_path / "ok" / "a", 64)  # 64 levels of folders below class folder a: read
    assert [tmp_path / "ok" / e.rel for e in list_folder(tmp_path / "ok").entries] == [bottom / "00.png"]
    deep_chain(tmp_path / "over" / "a", 65)
    with pytest.raises(DataError, match=r"over/a/(d/){64}d: folders nested more than 64 levels below .*/over/a;"):
        list_folder(tmp_path / "over")


# --------------------------------------------------------------------------- names that would break a line

ODD_NAMES = ["new\nline.png", "tab\there.png", "cr\rhere.png", "back\\slash.png", "sep\u2028ar.png", "nl\x85.png"]


def odd_folder(folder: Path) -> None:
    """Ten PNGs: six with names that break a line or hold a backslash, one whose name is not UTF-8."""
    names = ODD_NAMES + [f"plain-{i}.png" for i in range(4)]
    write_pngs(folder, len(names), lambda i: names[i])
    os.rename(os.fsencode(folder / "plain-3.png"), os.fsencode(folder) + b"/raw\xff.png")


def test_escaped_names_round_trip() -> None:
    names = [*ODD_NAMES, "x\udcff.png", "\\x41", "\\\\n", "é/ü.png", "ctl\x01\x1f\x7f.png", "plain.png", ""]
    for name in names:
        escaped = escape_name(name)
        assert unescape_name(escaped) == name and len(f"{escaped}\n".splitlines()) == 1, name
        escaped.encode("utf-8")  # a name that is not UTF-8 is written as escapes, never an encode error
    assert escape_name("a\\b\tc\nd\re") == "a\\\\b\\tc\\nd\\re"
    assert shown("plain\\name.png") == "plain\\name.png" and shown("a\\b\n") == "a\\\\b\\n"
    for stray in ("a\\qb", "tail\\", "\\x4", "\\u12"):
        with pytest.raises(ValueError, match="backslash"):
            unescape_name(stray)


def test_the_files_table_has_one_line_a_file_and_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the command line: a folder of names with newlines, tabs and backslashes trains, and its
    files.tsv is one line a file that :func:`read_files_table` reads back as the listing."""
    folder = tmp_path / "odd"
    odd_folder(folder)
    run = tmp_path / "run"
    args = ["train", str(TINY), "--stage", "1", "--until", "1", "--run-dir", str(run), "--no-progress"]
    for value in folder_sets(folder):
        args += ["--set", value]
    with watchdog(WATCHDOG_S):
        assert main(args) == 0, capsys.readouterr().err
    table = (run / CACHE_DIR / FILES).read_bytes()
    assert table.count(b"\n") == 10 and len(table.decode().splitlines()) == 10
    listing = list_folder(folder)
    assert read_files_table(run / CACHE_DIR / FILES) == listing.entries
    assert files_table(listing.entries) == table
    # names without anything to escape are written as before: an older files.tsv reads the same
    assert "raw\udcff.png" in {e.rel for e in listing.entries} and b"raw\\udcff.png\t" in table
    plain = [e for e in listing.entries if e.rel.startswith("plain-")]
    assert files_table(plain) == "".join(f"{e.rel}\t{e.size}\t{e.mtime_ns}\t{e.label}\n" for e in plain).encode()


def test_a_files_table_that_is_not_one_reads_as_an_error(tmp_path: Path) -> None:
    path = tmp_path / FILES
    for text, says in (
        ("a.png\t1\t2\n", "line 1 has 3 fields"),
        ("a\\q.png\t1\t2\t-1\n", "line 1: a backslash"),
        ("ok.png\t1\t2\t-1\nb.png\tx\t2\t-1\n", "line 2: invalid literal"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=says):
            read_files_table(path)


def test_skipped_files_with_odd_names_are_logged_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    odd_folder(folder)
    broken("gone\nbad.png")(folder)
    cfg = DataConfig(source="folder", path=str(folder), channels=1, heldout=2, on_unreadable="skip")
    said: list[str] = []
    for _ in range(2):  # the build, then the cache read back
        data = load_dataset(cfg, cache_dir=tmp_path / "run", log=said.append)
        assert len(data.train) + len(data.heldout) == 10
    assert len(said) == 2 and said[0] == said[1]
    assert said[0].startswith(f"{folder}: 1 unreadable files skipped (first: gone\\nbad.png: cannot read image")
    assert all(len(line.splitlines()) == 1 for line in said)
    manifest = json.loads((tmp_path / "run" / CACHE_DIR / MANIFEST).read_bytes())
    assert manifest["skipped_files"] == ["gone\nbad.png"]


# --------------------------------------------------------------------------- sizes


def test_an_in_memory_decode_is_checked_against_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a run folder a folder is decoded into memory: the whole array is checked before it is made."""
    write_pngs(tmp_path / "p")
    monkeypatch.setattr(progvq.memory, "available_bytes", lambda device="cpu": 1000)
    cfg = DataConfig(source="folder", path=str(tmp_path / "p"), channels=1, heldout=2)
    with pytest.raises(DataError) as refused:
        load_dataset(cfg)
    message = str(refused.value)
    assert message == (
        f"{tmp_path / 'p'}: 10 images of 1x16x16 decoded in memory would take 2.5 KiB, "
        "more than the 1000 bytes of memory available"
    )
    monkeypatch.setattr(progvq.memory, "available_bytes", lambda device="cpu": 3000)
    assert len(load_dataset(cfg).heldout) == 2


def test_sizes_are_checked_from_the_header_before_any_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge data.size is refused from the first file's header: no image is decoded, no cache folder made."""
    write_pngs(tmp_path / "p")
    decoded: list[str] = []
    monkeypatch.setattr(progvq.folder, "decode", lambda folder, entry, transform: decoded.append(entry.rel))
    for resize, crop in (("shorter-side", "centre"), ("none", "centre"), ("none", "random"), ("none", "none")):
        cfg = DataConfig(
            source="folder", path=str(tmp_path / "p"), channels=3, heldout=2, size=HUGE, resize=resize, crop=crop
        )
        with pytest.raises(DataError, match=r"data.size:? 1000000.* of memory available$"):
            load_dataset(cfg, cache_dir=tmp_path / "run")
    assert decoded == [] and not (tmp_path / "run").exists()
    assert Transform(3, HUGE, "shorter-side", "centre").output_size(16, 9) == (HUGE, HUGE)
