"""Hostile files through the real command line: compressed files' headers parsed with bounds, files
checked before they are read, arrays checked before they are allocated, outputs that would replace
inputs, names that would break a line, signals in the middle of a write, concurrent writers.

The table rows run ``main([...])`` under the watchdog of ``tests/test_bad_input.py`` and check what it
checks: exit status 2, exactly one ``progvq: error:`` line naming the file, key or flag, no traceback,
every file present before byte-identical after and nothing new. Sparse files of 100 GiB live beside
the test's folder (a snapshot would read them) and are checked by their size and time.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import progvq.fileio
from progvq.codec import Codec
from run_stage import main

from .conftest import ROOT
from .test_bad_input import Case, Ctx, case_params, check_refusal, images16, trains, watchdog

GiB = 1 << 30

# --------------------------------------------------------------------------- files of the trained tiny run


def _packed(ctx: Ctx) -> bytes:
    """Two images of the tiny run's size, compressed with the run (ctx.run())."""
    images = torch.from_numpy(images16(2))[:, None]
    return Codec(ctx.run()).compress(images)


def _split(data: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    """A compressed file -> (magic and version, header, what follows the header without the file checksum)."""
    _, _, length = struct.unpack_from("<8sHI", data)
    header = json.loads(data[14 : 14 + length])
    return data[:10], header, data[14 + length : -4]


def _joined(start: bytes, header: bytes, rest: bytes, length: int | None = None) -> bytes:
    """A compressed file from its parts, with a right file checksum (so the header itself is what is tested)."""
    body = start + struct.pack("<I", len(header) if length is None else length) + header + rest
    return body + struct.pack("<I", zlib.crc32(body))


def pvq(
    change: Callable[[dict[str, Any]], Any] | None = None,
    raw: Callable[[bytes], bytes] | None = None,
    length: int | None = None,
) -> Callable[[Ctx], list[str]]:
    """``decompress RUN bad.pvq`` where bad.pvq is a real file whose header is ``change``d (or replaced by the
    bytes ``raw(header)``), its checksum recomputed."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        start, header, rest = _split(_packed(ctx))
        if change is not None:
            replaced = change(header)
            header = header if replaced is None else replaced
        text = json.dumps(header).encode() if raw is None else raw(json.dumps(header).encode())
        path = ctx.write("bad.pvq", _joined(start, text, rest, length))
        return ["decompress", str(ctx.run()), str(path), "--out", str(ctx.tmp / "out.npz")]

    return setup


def put(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__(key, value)


def nested(depth: int) -> Callable[[bytes], bytes]:
    return lambda header: header.replace(b'"run":', b'"run":' + b"[" * depth + b"]" * depth + b',"x":', 1)


def _sparse(ctx: Ctx, name: str, size: int, head: bytes = b"") -> Path:
    """A sparse file of ``size`` bytes beginning with ``head``, beside the test's folder (never snapshotted)."""
    folder = ctx.tmp.parent / (ctx.tmp.name + "-big")
    folder.mkdir(exist_ok=True)
    path = folder / name
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def sparse_pvq(with_header: bool) -> Callable[[Ctx], list[str]]:
    @trains
    def setup(ctx: Ctx) -> list[str]:
        head = _packed(ctx)[:-4] if with_header else b"\0" * 16
        path = _sparse(ctx, "huge.pvq", 100 * GiB, head)
        return ["decompress", str(ctx.run()), str(path), "--out", str(ctx.tmp / "out.npz")]

    return setup


# --------------------------------------------------------------------------- arrays


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def lying_npy(shape: tuple[int, ...], dtype: str = "<u2", payload: int = 64) -> bytes:
    """A .npy whose header announces ``shape`` of ``dtype`` but which holds ``payload`` bytes."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * payload


def npz_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def good_codes(n: int = 2) -> dict[str, bytes]:
    """A tiny run's codes file members (level 1: 4x4 of 16 codes, level 2: 2x2 of 8)."""
    return {
        "level1.npy": npy_bytes(np.zeros((n, 4, 4), np.uint16)),
        "level2.npy": npy_bytes(np.zeros((n, 2, 2), np.uint16)),
    }


def codes_file(members: dict[str, bytes] | Callable[[], dict[str, bytes]], *extra: str) -> Callable[[Ctx], list[str]]:
    """``decode RUN codes.npz --out out.png`` on an npz of ``members``."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        made = members() if callable(members) else members
        path = ctx.write("codes.npz", npz_of(made))
        return ["decode", str(ctx.run()), str(path), "--out", str(ctx.tmp / "out.png"), *extra]

    return setup


def images_file(content: bytes, verb: str, name: str = "images.npy") -> Callable[[Ctx], list[str]]:
    """``compress RUN images.npy --out out.pvq`` or ``encode RUN --npz images.npy --out out.npz``."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.write(name, content)
        if verb == "compress":
            return ["compress", str(ctx.run()), str(path), "--out", str(ctx.tmp / "out.pvq")]
        return ["encode", str(ctx.run()), "--npz", str(path), "--out", str(ctx.tmp / "out.npz")]

    return setup


# --------------------------------------------------------------------------- outputs over inputs


def _png(path: Path) -> Path:
    Image.fromarray(images16(1)[0]).save(path)
    return path


def _codes_npz(ctx: Ctx, name: str = "c.npz") -> Path:
    return ctx.write(name, npz_of(good_codes()))


def _link(kind: str, target: Path, link: Path) -> None:
    if kind == "hard":
        os.link(target, link)
    else:
        link.symlink_to(target)


def decode_over_codes(link: str | None) -> Callable[[Ctx], list[str]]:
    """``decode RUN c.npz --out c.png``: the arrays beside c.png would be c.npz (or a link to it)."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        codes = _codes_npz(ctx)
        out = ctx.tmp / "c.png"
        if link is not None:
            out = ctx.tmp / "d.png"
            _link(link, codes, ctx.tmp / "d.npz")
        return ["decode", str(ctx.run()), str(codes), "--out", str(out)]

    return setup


def encode_over_npz(link: str | None) -> Callable[[Ctx], list[str]]:
    @trains
    def setup(ctx: Ctx) -> list[str]:
        images = ctx.write("x.npz", npz_of({"images.npy": npy_bytes(images16(2))}))
        out = images
        if link is not None:
            out = ctx.tmp / "y.npz"
            _link(link, images, out)
        return ["encode", str(ctx.run()), "--npz", str(images), "--out", str(out)]

    return setup


def compress_over(input_name: str, link: str | None = None) -> Callable[[Ctx], list[str]]:
    @trains
    def setup(ctx: Ctx) -> list[str]:
        if input_name.endswith(".png"):
            source = _png(ctx.tmp / input_name)
        else:
            source = ctx.write(input_name, npz_of({"images.npy": npy_bytes(images16(2))}))
        out = source
        if link is not None:
            out = ctx.tmp / "out.pvq"
            _link(link, source, out)
        return ["compress", str(ctx.run()), str(source), "--out", str(out)]

    return setup


def into_run(verb: str, where: str) -> Callable[[Ctx], list[str]]:
    """A command whose output lands on one of its run's own files or folders."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        run = ctx.run()
        out = str(run / where)
        if verb == "compress":
            return ["compress", str(run), str(_png(ctx.tmp / "a.png")), "--out", out]
        if verb == "encode":
            return ["encode", str(run), "--images", str(_png(ctx.tmp / "a.png")), "--out", out]
        if verb == "decode":
            return ["decode", str(run), str(_codes_npz(ctx)), "--out", out]
        return ["sample", str(run), "-n", "2", "--out", out]

    return setup


def decompress_over(kind: str) -> Callable[[Ctx], list[str]]:
    @trains
    def setup(ctx: Ctx) -> list[str]:
        packed = _packed(ctx)
        if kind == "npz":  # a compressed file named x.npz, decompressed to x.npz
            path = ctx.write("x.npz", packed)
            return ["decompress", str(ctx.run()), str(path), "--out", str(path)]
        path = ctx.write("f.pvq", packed)
        folder = ctx.tmp / "pngs"
        folder.mkdir()
        _link(kind, path, folder / "00001.png")  # the second image's PNG would replace the input
        return ["decompress", str(ctx.run()), str(path), "--out", str(folder)]

    return setup


def inpaint_over(which: str) -> Callable[[Ctx], list[str]]:
    @trains
    def setup(ctx: Ctx) -> list[str]:
        image = _png(ctx.tmp / "x.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        mask_path = ctx.tmp / "m.png"
        Image.fromarray(mask).save(mask_path)
        out = {"image": image, "mask": mask_path}.get(which)
        if which == "symlink":
            out = ctx.tmp / "y.png"
            out.symlink_to(image)
        return ["inpaint", str(ctx.run()), "--image", str(image), "--mask", str(mask_path), "--out", str(out)]

    return setup


# --------------------------------------------------------------------------- names that break a line


def named(name: str, verb: str) -> Callable[[Ctx], list[str]]:
    """A command on a file whose name holds control characters (the file is not what the command wants)."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.write(name, b"not what it should be")
        run = str(ctx.run())
        if verb == "decompress":
            return ["decompress", run, str(path), "--out", str(ctx.tmp / "out.npz")]
        if verb == "decode":
            return ["decode", run, str(path), "--out", str(ctx.tmp / "out.png")]
        if verb == "compress":
            return ["compress", run, str(path), "--out", str(ctx.tmp / "out.pvq")]
        return ["inpaint", run, "--image", str(path), "--box", "2,2,6,6", "--out", str(ctx.tmp / "o.png")]

    return setup


def missing_named(name: str) -> Callable[[Ctx], list[str]]:
    return trains(lambda ctx: ["compress", str(ctx.run()), str(ctx.tmp / name), "--out", str(ctx.tmp / "o.pvq")])


def _big_png(ctx: Ctx) -> Path:
    """A 6000 x 6000 grey PNG (36 million pixels, a few kB on disk): its size is in its header."""
    path = ctx.tmp / "big.png"
    Image.new("L", (6000, 6000)).save(path)
    return path


def _retrained(ctx: Ctx) -> list[str]:
    """A file compressed with the run, whose prior was retrained since (its checkpoint's digest changed)."""
    from .test_hostile import rewrite

    path = ctx.write("p.pvq", _packed(ctx))
    run = ctx.run()
    rewrite(run / "prior" / "checkpoint.pt", lambda ckpt: ckpt["model"]["embed.weight"].add_(0.01))
    return ["decompress", str(run), str(path), "--out", str(ctx.tmp / "out.npz")]


def _stream_too_long(ctx: Ctx) -> list[str]:
    """A file whose first stream announces more words than the whole file holds (checksum recomputed)."""
    start, header, rest = _split(_packed(ctx))
    count = header["count"]
    pos = 4 * count  # after the image checksums: the first stream's length word
    rest = rest[:pos] + struct.pack("<I", 2**31) + rest[pos + 4 :]
    path = ctx.write("s.pvq", _joined(start, json.dumps(header).encode(), rest))
    return ["decompress", str(ctx.run()), str(path), "--out", str(ctx.tmp / "out.npz")]


# --------------------------------------------------------------------------- the table

HUGE = 10**40
CASES: list[Case] = [
    # ---- a compressed file's header: bounded JSON of a fixed schema, refused before any value is used
    Case("header", "nested-30000-deep", pvq(raw=nested(30_000)), ("bad.pvq", "nested 30001 deep")),
    Case("header", "nested-40-deep", pvq(raw=nested(40)), ("bad.pvq", "nested", "deep")),
    Case(
        "header",
        "count-infinity",
        pvq(raw=lambda h: h.replace(b'"count": 2', b'"count": Infinity')),
        ("bad.pvq", "Infinity"),
    ),
    Case("header", "count-nan", pvq(raw=lambda h: h.replace(b'"count": 2', b'"count": NaN')), ("bad.pvq", "NaN")),
    Case(
        "header",
        "count-minus-infinity",
        pvq(raw=lambda h: h.replace(b'"count": 2', b'"count": -Infinity')),
        ("bad.pvq", "-Infinity"),
    ),
    Case("header", "count-float", pvq(put("count", 2.0)), ("bad.pvq", "count: expected an integer, got 2.0")),
    Case("header", "count-bool", pvq(put("count", True)), ("bad.pvq", "count: expected an integer, got true")),
    Case("header", "count-negative", pvq(put("count", -5)), ("bad.pvq", "count: -5 is out of range")),
    Case("header", "count-huge", pvq(put("count", HUGE)), ("bad.pvq", "count", "out of range")),
    Case(
        "header",
        "count-5000-digits",
        pvq(raw=lambda h: h.replace(b'"count": 2', b'"count": 1' + b"0" * 5000)),
        ("bad.pvq", "not JSON"),
    ),
    Case("header", "count-a-string", pvq(put("count", "2")), ("bad.pvq", 'count: expected an integer, got "2"')),
    Case("header", "batch-zero", pvq(put("batch", 0)), ("bad.pvq", "batch: 0 is out of range")),
    Case("header", "shape-negative", pvq(put("shape", [-1, 16, 16])), ("bad.pvq", "shape[0]: -1 is out of range")),
    Case("header", "shape-two-items", pvq(put("shape", [16, 16])), ("bad.pvq", "shape: an array of 2 items")),
    Case("header", "shape-a-string", pvq(put("shape", "1x16x16")), ("bad.pvq", "shape: expected an array")),
    Case("header", "run-a-list", pvq(put("run", [1, 2])), ("bad.pvq", "run: expected an object")),
    Case(
        "header",
        "run-key-a-path",
        pvq(lambda h: h["run"].__setitem__("../../etc", "ab")),
        ("bad.pvq", "run key", "not of the expected form"),
    ),
    Case("header", "unknown-key", pvq(put("exec", "rm -rf /")), ("bad.pvq", 'unknown key "exec"')),
    Case("header", "count-missing", pvq(lambda h: h.pop("count") and None), ("bad.pvq", "no key 'count'")),
    Case("header", "an-array", pvq(lambda h: [h]), ("bad.pvq", "expected an object")),
    Case("header", "not-utf8", pvq(raw=lambda h: b"\xff\xfe" + h[2:]), ("bad.pvq", "not UTF-8")),
    Case("header", "length-4-gib", pvq(length=2**32 - 1), ("bad.pvq", "a header of 4,294,967,295 bytes")),
    Case("header", "length-past-the-end", pvq(length=10_000), ("bad.pvq", "a header of 10,000 bytes")),
    Case("header", "a-billion-images", pvq(put("count", 10**9)), ("bad.pvq", "shorter than its header says")),
    # ---- files checked before they are read whole
    Case("reads", "sparse-100-gib-not-ours", sparse_pvq(False), ("huge.pvq", "not a progvq compressed file")),
    Case("reads", "sparse-100-gib-with-header", sparse_pvq(True), ("huge.pvq", "damaged", "at most")),
    Case("reads", "stream-longer-than-the-file", trains(_stream_too_long), ("s.pvq", "damaged")),
    Case("reads", "compress-png-36-megapixels", trains(lambda ctx: ["compress", str(ctx.run()), str(_big_png(ctx)),
                                                                    "--out", str(ctx.tmp / "o.pvq")]),
         ("big.png: image is 6000x6000", "the run's images are 16x16")),
    Case("reads", "inpaint-image-36-megapixels", trains(lambda ctx: ["inpaint", str(ctx.run()), "--image",
                                                                     str(_big_png(ctx)), "--box", "1,1,4,4",
                                                                     "--out", str(ctx.tmp / "o.png")]),
         ("big.png: image is 6000x6000",)),
    Case("reads", "inpaint-mask-36-megapixels", trains(lambda ctx: ["inpaint", str(ctx.run()), "--image",
                                                                    str(_png(ctx.tmp / "a.png")), "--mask",
                                                                    str(_big_png(ctx)),
                                                                    "--out", str(ctx.tmp / "o.png")]),
         ("big.png: mask is 6000x6000", "the image is 16x16")),
    # ---- arrays checked against their real length and memory before anything is allocated
    Case(
        "arrays",
        "codes-announce-1e11",
        codes_file({"level1.npy": lying_npy((10**11, 4, 4))}),
        ("codes.npz[level1]", "announces", "bytes follow it"),
    ),
    Case(
        "arrays",
        "codes-announce-negative",
        codes_file({"level1.npy": lying_npy((-2, 4, 4))}),
        ("codes.npz[level1]", "a negative size"),
    ),
    Case(
        "arrays",
        "codes-objects",
        codes_file({"level1.npy": npy_bytes(np.array([None, 1], dtype=object))}),
        ("codes.npz[level1]", "Python objects"),
    ),
    Case(
        "arrays",
        "codes-unknown-key",
        codes_file(lambda: {"levels1.npy": npy_bytes(np.zeros((2, 4, 4), np.uint16))}),
        ("codes.npz", 'holds an array "levels1"', "level1, level2, labels"),
    ),
    Case(
        "arrays",
        "codes-key-with-newline",
        codes_file(lambda: {"level1\n.npy": npy_bytes(np.zeros((2, 4, 4), np.uint16))}),
        ("codes.npz", 'holds an array "level1\\n"'),
    ),
    Case(
        "arrays",
        "codes-level-0",
        codes_file(lambda: {"level0.npy": npy_bytes(np.zeros((2, 16, 16), np.uint16))}),
        ("codes.npz", '"level0"'),
    ),
    Case(
        "arrays",
        "codes-level-99",
        codes_file(lambda: {"level99.npy": npy_bytes(np.zeros((2, 1, 1), np.uint16))}),
        ("codes.npz", '"level99"'),
    ),
    Case(
        "arrays",
        "codes-truncated-member",
        codes_file(lambda: {"level2.npy": npy_bytes(np.zeros((2, 2, 2), np.uint16))[:-3]}),
        ("codes.npz[level2]", "bytes follow it"),
    ),
    Case(
        "arrays",
        "codes-a-npy",
        trains(
            lambda ctx: [
                "decode",
                str(ctx.run()),
                str(ctx.write("codes.npz", npy_bytes(np.zeros((2, 2, 2), np.uint16)))),
                "--out",
                str(ctx.tmp / "o.png"),
            ]
        ),
        ("codes.npz", "not an npz of codes"),
    ),
    Case(
        "arrays",
        "codes-float",
        codes_file(lambda: {"level2.npy": npy_bytes(np.zeros((2, 2, 2), np.float32))}),
        ("codes.npz[level2]", "expected integer codes"),
    ),
    Case(
        "arrays",
        "compress-npy-announce-1e11",
        images_file(lying_npy((10**11, 16, 16), "|u1"), "compress"),
        ("images.npy", "announces", "bytes follow it"),
    ),
    Case(
        "arrays",
        "encode-npy-announce-1e11",
        images_file(lying_npy((10**11, 16, 16), "|u1"), "encode"),
        ("images.npy", "announces", "bytes follow it"),
    ),
    Case(
        "arrays",
        "compress-npz-member-lies",
        images_file(npz_of({"images.npy": lying_npy((10**9, 16, 16), "|u1")}), "compress", "images.npz"),
        ("images.npz[images]", "announces"),
    ),
    Case(
        "arrays",
        "encode-objects",
        images_file(npy_bytes(np.array([None] * 3, dtype=object)), "encode"),
        ("images.npy", "Python objects"),
    ),
    # ---- an output never replaces an input, nor a file of its run
    Case("outputs", "decode-arrays-over-its-codes", decode_over_codes(None), ("c.npz", "which this command reads")),
    Case("outputs", "decode-arrays-hard-link", decode_over_codes("hard"), ("d.npz", "which this command reads")),
    Case("outputs", "decode-arrays-symlink", decode_over_codes("sym"), ("d.npz", "which this command reads")),
    Case("outputs", "encode-over-its-npz", encode_over_npz(None), ("x.npz", "which this command reads")),
    Case("outputs", "encode-hard-link", encode_over_npz("hard"), ("y.npz", "which this command reads")),
    Case("outputs", "compress-over-its-png", compress_over("a.png"), ("a.png", "which this command reads")),
    Case("outputs", "compress-over-its-npz", compress_over("x.npz"), ("x.npz", "which this command reads")),
    Case("outputs", "compress-symlink", compress_over("x.npz", "sym"), ("out.pvq", "which this command reads")),
    Case("outputs", "decompress-over-itself", decompress_over("npz"), ("x.npz", "which this command reads")),
    Case("outputs", "decompress-png-hard-link", decompress_over("hard"), ("00001.png", "which this command reads")),
    Case("outputs", "inpaint-over-its-image", inpaint_over("image"), ("x.png", "which this command reads")),
    Case("outputs", "inpaint-over-its-mask", inpaint_over("mask"), ("m.png", "which this command reads")),
    Case("outputs", "inpaint-symlink", inpaint_over("symlink"), ("y.png", "which this command reads")),
    Case("outputs", "compress-over-run-config", into_run("compress", "config.yaml"), ("config.yaml", "own files")),
    Case(
        "outputs", "compress-over-checkpoint", into_run("compress", "stage-1/checkpoint.pt"), ("stage-1", "own files")
    ),
    Case("outputs", "encode-into-prior", into_run("encode", "prior/codes.npz"), ("prior", "own files")),
    Case("outputs", "decode-into-stage-2", into_run("decode", "stage-2/x.png"), ("stage-2", "own files")),
    Case("outputs", "sample-hidden-run-file", into_run("sample", ".x.png"), (".x.png", "own files")),
    # ---- other verbs: data shapes sized and placed before any work, a file of a run retrained since
    Case("verbs", "shapes-count-huge", lambda ctx: ["data", "shapes", str(ctx.tmp / "s"), "--count", str(10**14)],
         ("--count 100000000000000", "more than the")),
    Case("verbs", "shapes-size-huge", lambda ctx: ["data", "shapes", str(ctx.tmp / "s"), "--size", str(10**6)],
         ("--size 1000000", "more than the")),
    Case("verbs", "shapes-count-zero", lambda ctx: ["data", "shapes", str(ctx.tmp / "s"), "--count", "0"],
         ("--count: must be >= 1",)),
    Case("verbs", "shapes-into-a-full-folder", lambda ctx: ["data", "shapes", str(ctx.write("d/keep.txt", "x").parent),
                                                            "--count", "9"], ("d: is a folder that already holds",)),
    Case("verbs", "shapes-onto-a-file", lambda ctx: ["data", "shapes", str(ctx.write("f.png", "x")), "--count", "9"],
         ("f.png: is not a folder",)),
    Case("verbs", "pvq-of-a-retrained-run", trains(lambda ctx: _retrained(ctx)), ("p.pvq", "made with another run")),
    # ---- names with newlines, tabs and escapes keep the message on one line
    Case("lines", "decompress-newline", named("a\nb.pvq", "decompress"), ("a\\nb.pvq", "not a progvq")),
    Case("lines", "decode-tab-newline", named("c\t\n.npz", "decode"), ("c\\t\\n.npz",)),
    Case("lines", "compress-carriage-return", named("x\r.png", "compress"), ("x\\r.png",)),
    Case("lines", "inpaint-escape-sequence", named("\x1b[2Jimg.png", "inpaint"), ("\\x1b[2Jimg.png",)),
    Case("lines", "missing-file-newline", missing_named("no\nsuch.png"), ("no\\nsuch.png", "not found")),
]


def test_table_is_big_unique_and_covers_every_kind() -> None:
    ids = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
    assert {c.kind for c in CASES} == {"header", "reads", "arrays", "outputs", "verbs", "lines"}


@pytest.mark.parametrize("case", case_params(CASES))
def test_hostile_file_is_one_line_status_2_and_keeps_files(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = tmp_path.parent / (tmp_path.name + "-big")
    check_refusal(case, tmp_path, request, capsys, monkeypatch)
    if big.exists():
        for path in big.iterdir():
            assert path.stat().st_size == 100 * GiB
            path.unlink()


# --------------------------------------------------------------------------- a good file still works


@pytest.mark.trains
def test_a_good_file_round_trips_after_the_bounded_read(tiny_run: Path, tmp_path: Path) -> None:
    images = torch.from_numpy(images16(3))[:, None]
    path = tmp_path / "ok.pvq"
    path.write_bytes(Codec(tiny_run).compress(images))
    out = tmp_path / "out.npz"
    assert main(["decompress", str(tiny_run), str(path), "--out", str(out)]) == 0
    with np.load(out) as loaded:
        assert np.array_equal(loaded["images"], images[:, 0].numpy())


# --------------------------------------------------------------------------- signals in the middle of a write


def _signal_while_writing(monkeypatch: pytest.MonkeyPatch, sig: int, *, after_renames: int | None = None) -> None:
    """Send ``sig`` to this process once the first temporary file is on disk (or after that many renames)."""
    real_write, real_replace = progvq.fileio._write_temporary, os.replace
    renames = {"n": 0}

    def write(path: Path, data: bytes, made: list[str] | None = None) -> str:
        tmp = real_write(path, data, made)
        if after_renames is None:
            os.kill(os.getpid(), sig)
        return tmp

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        renames["n"] += 1
        if after_renames is not None and renames["n"] == after_renames:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(progvq.fileio, "_write_temporary", write)
    monkeypatch.setattr(progvq.fileio.os, "replace", replace)


def _signal_commands(run: Path, tmp: Path) -> dict[str, list[str]]:
    tmp.mkdir(exist_ok=True)
    png = _png(tmp / "a.png")
    codes = tmp / "c.npz"
    codes.write_bytes(npz_of(good_codes()))
    packed = tmp / "p.pvq"
    packed.write_bytes(Codec(run).compress(torch.from_numpy(images16(2))[:, None]))
    return {
        "compress": ["compress", str(run), str(png), "--out", str(tmp / "out.pvq")],
        "decompress": ["decompress", str(run), str(packed), "--out", str(tmp / "out.npz")],
        "decompress-pngs": ["decompress", str(run), str(packed), "--out", str(tmp / "pngs")],
        "encode": ["encode", str(run), "--images", str(png), "--out", str(tmp / "out.npz")],
        "decode": ["decode", str(run), str(codes), "--out", str(tmp / "out.png")],
        "sample": ["sample", str(run), "-n", "2", "--out", str(tmp / "out.png")],
    }


@pytest.mark.trains
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
@pytest.mark.parametrize("command", ["compress", "decompress", "decompress-pngs", "encode", "decode", "sample"])
def test_a_signal_mid_write_leaves_nothing_partial(
    command: str,
    sig: int,
    tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from .test_bad_input import snapshot

    argv = _signal_commands(tiny_run, tmp_path)[command]
    for name in ("out.pvq", "out.npz", "out.png"):
        (tmp_path / name).write_bytes(b"the old output")
    before = snapshot(tmp_path)
    _signal_while_writing(monkeypatch, sig)
    capsys.readouterr()
    with watchdog(60):
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 128 + sig, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # the old outputs whole, no temporary file, no new file
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.trains
@pytest.mark.parametrize("command", ["decode", "sample"])
def test_a_signal_between_the_pair_renames_lands_after_both(
    command: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PNG and its arrays are one unit: a SIGTERM after the first rename is held until the second."""
    argv = _signal_commands(tiny_run, tmp_path)[command]
    _signal_while_writing(monkeypatch, signal.SIGTERM, after_renames=1)
    with watchdog(60):
        code = main(argv)
    assert code == 128 + signal.SIGTERM, capsys.readouterr().err
    png, npz = tmp_path / "out.png", tmp_path / "out.npz"
    with np.load(npz) as loaded:
        images = loaded["images"]
    assert np.asarray(Image.open(png)).shape[0] > images.shape[-1]  # the grid of these images, written whole
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- concurrent writers of one output


WRITER = textwrap.dedent(
    """
    import os
    import sys
    import time
    import torch
    import progvq.fileio
    from progvq.images import save_grid_and_arrays
    real_replace = os.replace

    def slow_replace(src, dst):  # widen the gap between the PNG's rename and the arrays'
        real_replace(src, dst)
        time.sleep(0.01)

    progvq.fileio.os.replace = slow_replace
    value, out, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for _ in range(rounds):
        images = torch.full((1, 1, 8, 8), value, dtype=torch.uint8)
        save_grid_and_arrays(images[0], out, images=images.numpy())
    """
)


def test_two_writers_of_one_output_leave_a_matching_pair(tmp_path: Path) -> None:
    """Two processes write the same PNG + npz pair many times; at every point the two files are one writer's."""
    out = tmp_path / "out.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rounds = 60
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(v), str(out), str(rounds)], env=env) for v in (40, 200)
    ]
    mismatches = checks = 0
    while any(w.poll() is None for w in writers):
        try:
            # a reader that takes the writers' lock sees a pair from one writer
            with progvq.fileio._writers_lock([tmp_path]):
                png = np.asarray(Image.open(out))
                with np.load(out.with_suffix(".npz")) as loaded:
                    arrays = loaded["images"]
        except FileNotFoundError:
            continue
        checks += 1
        mismatches += int(png.flat[0]) != int(arrays.flat[0])
    assert all(w.wait(timeout=60) == 0 for w in writers)
    png = np.asarray(Image.open(out))
    with np.load(out.with_suffix(".npz")) as loaded:
        assert int(png.flat[0]) == int(loaded["images"].flat[0])
    assert mismatches == 0, f"{mismatches} of {checks} looks saw one writer's PNG beside the other's arrays"
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- files that change or vanish mid-command


@pytest.mark.trains
def test_a_compressed_file_that_grows_while_read_is_refused(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size is read first, the bytes after: a file that grew between the two is refused, not half-used."""
    import progvq.codec

    path = tmp_path / "p.pvq"
    path.write_bytes(Codec(tiny_run).compress(torch.from_numpy(images16(2))[:, None]))
    real = progvq.codec.check_regular

    def grows(name: Any, what: str, limit: int | None = None) -> int:
        size = real(name, what, limit)
        with open(name, "ab") as f:
            f.write(b"\0" * 8)  # another writer appends after the size was taken
        return size

    monkeypatch.setattr(progvq.codec, "check_regular", grows)
    assert main(["decompress", str(tiny_run), str(path), "--out", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p.pvq: changed while it was read" in err, err
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.trains
@pytest.mark.parametrize("command", ["sample", "decompress-pngs"])
def test_an_output_folder_that_vanishes_mid_write_is_one_line(
    command: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    argv = _signal_commands(tiny_run, tmp_path / "in")
    folder = tmp_path / "gone"
    folder.mkdir()
    args = argv[command][:-1] + [str(folder / ("out.png" if command == "sample" else "pngs"))]
    real_write = progvq.fileio._write_temporary

    def vanish(path: Path, data: bytes, made: list[str] | None = None) -> str:
        tmp = real_write(path, data, made)
        shutil.rmtree(folder, ignore_errors=True)  # someone removes the output folder
        return tmp

    monkeypatch.setattr(progvq.fileio, "_write_temporary", vanish)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("progvq: error: ") and "gone" in err, err
    assert "Traceback" not in err and ".tmp" not in err
