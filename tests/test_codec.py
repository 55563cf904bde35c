"""Lossless compression (progvq.codec): exact round trips, the file's size against the bound, and refusals.

Round trips go through the real command line on the session's tiny runs (shapes: factorised
levels, an unconditional prior; MNIST: an autoregressive level 2, a class-conditional prior,
28x28 digits padded to 32x32). Every level kind is also coded on its own, untrained, through the
coder's interface (``coding_walk``), so a kind no trained fixture has is covered too. Nothing here
depends on where a few training steps land: only exactness and relations are asserted.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progvq.build import build_level
from progvq.codec import MAGIC, PRECISION, Codec, StreamDecoder, StreamEncoder, frequencies
from progvq.data import load_dataset
from progvq.hierarchy import Hierarchy
from progvq.kinds import DECODERS, PIXEL_DECODERS
from progvq.nets import to_unit
from progvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from run_stage import main

from .conftest import ROOT
from .helpers import level_config

LN2 = math.log(2)


def heldout(run: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    model = Hierarchy.load(run, with_prior=False)
    data = load_dataset(model.config.data, total_downsample=model.config.total_downsample())
    return data.heldout, data.heldout_labels


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("progvq: error: "), err
    return err


# --------------------------------------------------------------------------- integer frequencies


def test_frequencies_are_exact_integers_close_to_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 300, dtype=torch.float64) * 4
    logits[0, :10] = -math.inf  # probability 0 still gets a frequency
    freq = frequencies(logits)
    assert freq.dtype == np.int64 and (freq.sum(1) == 2**PRECISION).all() and freq.min() >= 1
    assert np.array_equal(freq, frequencies(logits.clone()))
    # within the rounding of the logits to 1/256 bit where the probability matters
    bits = -np.log2(freq / 2**PRECISION)
    exact = (-torch.log_softmax(logits, 1) / LN2).numpy()
    likely = exact < 10
    assert np.abs(bits - exact)[likely].max() < 0.01
    # float32 logits give the table of the same values in float64
    assert np.array_equal(frequencies(logits[1:].float()), frequencies(logits[1:].float().double()))
    with pytest.raises(Exception, match="NaN"):
        frequencies(torch.full((1, 4), math.nan))


# --------------------------------------------------------------------------- every kind, on its own


def _untrained_level(kind: str):
    torch.manual_seed(0)
    decoder = DECODERS.entry(kind).config()
    # small networks: the defaults are sized for real data
    if hasattr(decoder, "pixelcnn"):
        decoder.pixelcnn = PixelCNNConfig(channels=8, layers=2, kernel_size=3)
    pixels = kind in PIXEL_DECODERS
    cfg = level_config(downsample=4 if pixels else 2, hidden=16, codes=16, dim=8, decoder=decoder)
    return build_level(cfg, channels=1, codes_below=0 if pixels else 16).double().eval(), pixels


@pytest.mark.parametrize("kind", DECODERS.kinds())
def test_every_decoder_kind_codes_its_level_exactly_at_its_likelihood(kind: str) -> None:
    level, pixels = _untrained_level(kind)
    gen = torch.Generator().manual_seed(1)
    if pixels:
        codes = torch.randint(0, 16, (3, 4, 4), generator=gen)
        target = torch.randint(0, 256, (3, 1, 16, 16), generator=gen, dtype=torch.uint8)
        with torch.no_grad():
            nats = -level.log_likelihood(to_unit(target).double(), codes)
    else:
        codes = torch.randint(0, 16, (3, 2, 2), generator=gen)
        target = torch.randint(0, 16, (3, 4, 4), generator=gen)
        with torch.no_grad():
            nats = -level.log_likelihood(target, codes)
    encoder = StreamEncoder()
    assert torch.equal(level.coding_walk(codes, encoder, target), target)
    decoded = level.coding_walk(codes, StreamDecoder(encoder.words()))
    assert decoded.dtype == target.dtype and torch.equal(decoded, target)
    bound = float(nats.sum()) / LN2
    assert abs(encoder.ideal_bits - bound) < 2e-3 * bound
    # the coder writes what its integer tables say, to a few words
    assert abs(32 * len(encoder.words()) - encoder.ideal_bits) < 96


@pytest.mark.parametrize("classes", [0, 3])
def test_the_prior_codes_its_class_and_codes(classes: int) -> None:
    torch.manual_seed(0)
    prior = GatedPixelCNN(8, channels=8, layers=3, kernel_size=3, num_classes=classes).double().eval()
    prior.requires_grad_(False)
    codes = torch.randint(0, 8, (5, 3, 3), generator=torch.Generator().manual_seed(2))
    encoder = StreamEncoder()
    _, labels = prior.coding_walk(encoder, 5, 3, 3, codes)
    decoded, decoded_labels = prior.coding_walk(StreamDecoder(encoder.words()), 5, 3, 3)
    assert torch.equal(decoded, codes)
    if classes:
        assert torch.equal(decoded_labels, labels)
        # the class coded is the one that makes the codes likeliest: at most log2(classes) over the marginal
        per_class = torch.stack([prior.log_prob(codes, torch.full((5,), y)) for y in range(classes)], 1)
        assert torch.equal(labels, per_class.argmax(1))
        bound = float(-prior.log_prob(codes).sum().detach()) / LN2
        assert bound - 1e-6 <= encoder.ideal_bits * (1 + 2e-3) and encoder.ideal_bits <= (bound + 5 * math.log2(3)) * (
            1 + 2e-3
        )
    else:
        assert decoded_labels is None and labels is None
        bound = float(-prior.log_prob(codes).sum().detach()) / LN2
        assert abs(encoder.ideal_bits - bound) < 2e-3 * bound


# --------------------------------------------------------------------------- whole runs, through the command line


@pytest.fixture(params=["tiny", "conditional"])
def trained(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_run" if request.param == "tiny" else "tiny_conditional_run")


@pytest.mark.trains
def test_compress_round_trip_is_exact_and_the_size_of_the_bound(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, _ = heldout(trained)
    packed, out = tmp_path / "heldout.pvq", tmp_path / "back.npz"
    assert main(["compress", str(trained), "--split", "heldout", "--out", str(packed)]) == 0
    assert "coded/bound" in capsys.readouterr().out
    assert main(["decompress", str(trained), str(packed), "--out", str(out)]) == 0
    with np.load(out) as back:
        got = back["images"]
        labelled = "labels" in back.files
    c, h, w = images.shape[1:]
    assert got.dtype == np.uint8 and got.shape == ((len(images), h, w) if c == 1 else tuple(images.shape))
    assert np.array_equal(got, images.numpy().reshape(got.shape))  # bit for bit
    # the same bytes again: compression is deterministic
    codec = Codec(trained)
    data = packed.read_bytes()
    assert codec.compress(images) == data
    layout = codec.last_layout
    assert layout.total == len(data)
    # the header: fixed bytes, a checksum per image and a length per stream
    assert layout.header <= 600 + 4 * len(images)
    bound = float(codec.bound_bits(images).sum())
    assert abs(8 * layout.coded - bound) <= 0.01 * bound
    assert labelled == bool(codec.model.num_classes)


@pytest.mark.trains
def test_decompress_to_a_folder_of_pngs(tiny_conditional_run: Path, tmp_path: Path) -> None:
    images, _ = heldout(tiny_conditional_run)
    first = tmp_path / "in"
    first.mkdir()
    for i in range(3):
        Image.fromarray(images[i, 0].numpy()).save(first / f"{i}.png")
    packed = tmp_path / "three.pvq"
    assert main(["compress", str(tiny_conditional_run), *sorted(map(str, first.iterdir())), "--out", str(packed)]) == 0
    assert main(["decompress", str(tiny_conditional_run), str(packed), "--out", str(tmp_path / "out")]) == 0
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")), images[i, 0].numpy())


@pytest.mark.trains
def test_decoding_on_avx2_kernels_gives_the_same_pixels(tiny_conditional_run: Path, tmp_path: Path) -> None:
    """Encoded with this CPU's default kernels (AVX-512 where it has them), decoded in a process held to AVX2."""
    images, _ = heldout(tiny_conditional_run)
    packed, out = tmp_path / "heldout.pvq", tmp_path / "back.npz"
    assert main(["compress", str(tiny_conditional_run), "--split", "heldout", "--out", str(packed)]) == 0
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "run_stage.py"), "decompress", str(tiny_conditional_run), str(packed)]
    done = subprocess.run(
        [*command, "--out", str(out)], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    with np.load(out) as back:
        assert np.array_equal(back["images"], images[:, 0].numpy())


@pytest.mark.trains
def test_encode_and_decode_codes(tiny_conditional_run: Path, tmp_path: Path) -> None:
    run = tiny_conditional_run
    images, labels = heldout(run)
    model = Hierarchy.load(run)
    codes_file = tmp_path / "codes.npz"
    assert main(["encode", str(run), "--split", "heldout", "--out", str(codes_file)]) == 0
    codes = model.encode(images)
    with np.load(codes_file) as saved:
        assert sorted(saved.files) == ["labels", "level1", "level2"]
        for k, z in enumerate(codes, start=1):
            assert saved[f"level{k}"].dtype == np.uint16 and np.array_equal(saved[f"level{k}"], z.numpy())
        assert np.array_equal(saved["labels"], labels.numpy())
    # the top level (the default) renders as Hierarchy.decode renders it; level 1 as a reconstruction
    assert main(["decode", str(run), str(codes_file), "--out", str(tmp_path / "top.png")]) == 0
    with np.load(tmp_path / "top.npz") as out:
        assert np.array_equal(out["images"], model.decode(codes[1], 2)[:, 0].numpy())
    assert main(["decode", str(run), str(codes_file), "--level", "1", "--out", str(tmp_path / "one.png")]) == 0
    with np.load(tmp_path / "one.npz") as out:
        assert np.array_equal(out["images"], model.decode(codes[0], 1)[:, 0].numpy())
    # images given as files encode as the split does
    for i in range(2):
        Image.fromarray(images[i, 0].numpy()).save(tmp_path / f"{i}.png")
    two = tmp_path / "two.npz"
    assert (
        main(["encode", str(run), "--images", str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--out", str(two)]) == 0
    )
    with np.load(two) as saved:
        assert "labels" not in saved.files and np.array_equal(saved["level2"], codes[1][:2].numpy())


# ------------------------------------------------------------------ refusals: one line, exit 2, nothing written


def _refit(body: bytes) -> bytes:
    """A file's body with the file checksum that fits it: a change only the deeper checks can see."""
    return body + struct.pack("<I", zlib.crc32(body))


def _another_run(data: bytes) -> bytes:
    """``data`` claiming another stage-1 checkpoint in its header."""
    _, version, length = struct.unpack_from("<8sHI", data)
    header = json.loads(data[14 : 14 + length])
    header["run"]["1"] = "0" * 64
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return _refit(struct.pack("<8sHI", MAGIC, version, len(text)) + text + data[14 + length : -4])


def _other_pixels(data: bytes) -> bytes:
    """``data`` with its first image's checksum changed: what a decoder computing other probabilities meets."""
    (length,) = struct.unpack_from("<I", data, 10)
    return _refit(_flip(data, 14 + length)[:-4])


@pytest.fixture(scope="module")
def packed(tiny_run: Path) -> bytes:
    """The tiny run's first 8 held-out images, compressed."""
    images, _ = heldout(tiny_run)
    return Codec(tiny_run).compress(images[:8])


def _flip(data: bytes, where: int) -> bytes:
    return data[:where] + bytes([data[where] ^ 0x10]) + data[where + 1 :]


BAD_FILES = {
    "truncated": lambda d: d[: len(d) // 2],
    "one byte short": lambda d: d[:-1],
    "flipped byte in the coded words": lambda d: _flip(d, len(d) - 12),
    "flipped byte in the header": lambda d: _flip(d, 20),
    "empty": lambda d: b"",
    "not ours": lambda d: b"\x89PNG\r\n\x1a\n" + d[8:],
    "another run": _another_run,
    "other pixels than coded": _other_pixels,
}


@pytest.mark.trains
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_refused(
    case: str, packed: bytes, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.pvq"
    data = BAD_FILES[case](packed)
    bad.write_bytes(data)
    out = tmp_path / "out.npz"
    out.write_bytes(b"before")
    assert main(["decompress", str(tiny_run), str(bad), "--out", str(out)]) == 2
    err = one_line_error(capsys)
    expected = {
        "another run": "another run",
        "other pixels than coded": "checksum mismatch",
        "empty": "not a progvq compressed file",
        "not ours": "not a progvq compressed file",
    }
    assert expected.get(case, "damaged") in err
    assert out.read_bytes() == b"before" and bad.read_bytes() == data


@pytest.mark.trains
def test_a_file_of_another_run_is_refused(
    tiny_run: Path, tiny_conditional_run: Path, packed: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f.pvq").write_bytes(packed)
    assert main(["decompress", str(tiny_conditional_run), str(tmp_path / "f.pvq"), "--out", str(tmp_path / "o")]) == 2
    assert "made with another run" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def _grey(tmp_path: Path, name: str, size: int) -> str:
    path = tmp_path / name
    Image.fromarray(np.zeros((size, size), np.uint8)).save(path)
    return str(path)


def _colour(tmp_path: Path, name: str, size: int) -> str:
    path = tmp_path / name
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0] = 200
    Image.fromarray(pixels).save(path)
    return str(path)


BAD_INPUTS = {
    "wrong size": (lambda t: ["compress", "RUN", _grey(t, "a.png", 20)], "the run's images are 16x16"),
    "colour": (lambda t: ["compress", "RUN", _colour(t, "c.png", 16)], "colour"),
    "npz of another size": (
        lambda t: (
            np.savez(t / "x.npz", images=np.zeros((2, 20, 20), np.uint8)) or ["compress", "RUN", str(t / "x.npz")]
        ),
        "1x20x20",
    ),
    "npz of no images": (
        lambda t: (
            np.savez(t / "e.npz", images=np.zeros((0, 16, 16), np.uint8)) or ["compress", "RUN", str(t / "e.npz")]
        ),
        "no images",
    ),
    "no input": (lambda t: ["compress", "RUN"], "give the images one way"),
    "missing file": (lambda t: ["compress", "RUN", str(t / "nothing.png")], "not found"),
    "encode, wrong size": (lambda t: ["encode", "RUN", "--images", _grey(t, "b.png", 28)], "16x16"),
    "decode, codes out of range": (
        lambda t: (
            np.savez(t / "c.npz", level2=np.full((2, 2, 2), 99, np.uint16)) or ["decode", "RUN", str(t / "c.npz")]
        ),
        "out of range",
    ),
    "decode, codes of another grid": (
        lambda t: np.savez(t / "g.npz", level1=np.zeros((2, 3, 3), np.uint16)) or ["decode", "RUN", str(t / "g.npz")],
        "expected integer codes N x 4 x 4",
    ),
    "decode, no such level": (
        lambda t: (
            np.savez(t / "l.npz", level1=np.zeros((2, 4, 4), np.uint16))
            or ["decode", "RUN", str(t / "l.npz"), "--level", "2"]
        ),
        "no codes of level 2",
    ),
}
OUTS = {"compress": "out.pvq", "encode": "out.npz", "decode": "out.png"}


@pytest.mark.trains
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused(case: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, needle = BAD_INPUTS[case]
    args = [str(tiny_run) if a == "RUN" else a for a in make(tmp_path)]
    out = tmp_path / OUTS[args[0]]
    out.write_bytes(b"before")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main([*args, "--out", str(out)]) == 2
    assert needle in one_line_error(capsys)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
