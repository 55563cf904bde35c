"""Tests for progvq.data: procedural shapes, idx/MNIST, image folders, arrays, padding."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progvq.data import (
    load_array,
    load_image_folder,
    load_mnist,
    make_shapes,
    pad_to,
    read_idx,
)
from progvq.errors import DataError, ProgvqError

from .conftest import MNIST_DIR
from .helpers import idx_bytes

# sha256 of make_shapes(8, seed=0).numpy().tobytes(), recorded when it was written.
PINNED_SHAPES_SHA256 = (
    "80af6a91fc1474f4d35c4422442973be749facb39bbd642d43754dea7dc7bf9d"
)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def write_idx(
    path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = False
) -> Path:
    """Write a uint8 array (N,) or (N, rows, cols) as an idx file, optionally gzipped."""
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images, shape (n, h, w)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


# --------------------------------------------------------------------------- #
# make_shapes
# --------------------------------------------------------------------------- #


def test_make_shapes_shape_and_dtype() -> None:
    x = make_shapes(10)
    assert x.shape == (10, 1, 32, 32)
    assert x.dtype == torch.uint8
    y = make_shapes(3, size=20, channels=3, seed=5)
    assert y.shape == (3, 3, 20, 20)
    assert make_shapes(0).shape == (0, 1, 32, 32)


def test_make_shapes_deterministic() -> None:
    a = make_shapes(20, seed=7)
    b = make_shapes(20, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, make_shapes(20, seed=8))
    # Images within one set differ from each other too.
    assert not torch.equal(a[0], a[1])


def test_make_shapes_pinned_bytes() -> None:
    # Same seed -> same bytes on every machine. If the generator is changed on
    # purpose, data sets change with it: update this digest deliberately.
    digest = hashlib.sha256(make_shapes(8, seed=0).numpy().tobytes()).hexdigest()
    assert digest == PINNED_SHAPES_SHA256


def test_make_shapes_content() -> None:
    x = make_shapes(200, seed=3)
    flat = x.reshape(200, -1)
    # Every image has a clearly visible shape ...
    assert (flat.amax(dim=1) >= 96).all()
    assert ((flat >= 64).sum(dim=1) >= 10).all()
    # ... on a mostly black background.
    black = (flat == 0).float().mean(dim=1)
    assert (black >= 0.35).all()
    assert black.mean() > 0.7
    # Supersampled edges: intermediate values appear, not just background/fill.
    assert ((flat > 0) & (flat < 64)).any(dim=1).float().mean() > 0.9


def test_make_shapes_rgb_has_colour() -> None:
    x = make_shapes(50, channels=3, seed=1).int()
    assert x.shape == (50, 3, 32, 32)
    # Colours are not grey: channels differ somewhere in most images.
    spread = (x.amax(dim=1) - x.amin(dim=1)).reshape(50, -1).amax(dim=1)
    assert (spread > 40).float().mean() > 0.8
    assert (x.reshape(50, -1).amax(dim=1) >= 160).all()


@pytest.mark.parametrize(
    "kwargs", [{"n": -1}, {"n": 2, "size": 4}, {"n": 2, "channels": 2}]
)
def test_make_shapes_bad_arguments(kwargs: dict[str, int]) -> None:
    n = kwargs.pop("n")
    with pytest.raises(DataError, match="make_shapes"):
        make_shapes(n, **kwargs)


# --------------------------------------------------------------------------- #
# read_idx
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images = random_images(5, 7, 4)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    got = read_idx(write_idx(tmp_path / f"img{suffix}", images, gz=gz))
    assert got.dtype == np.uint8
    assert got.shape == (5, 7, 4)
    np.testing.assert_array_equal(got, images)
    assert got.flags.writeable
    got_labels = read_idx(write_idx(tmp_path / f"lab{suffix}", labels, gz=gz))
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    images = random_images(2, 3, 3)
    # gzip data without .gz, and raw data with .gz: both read.
    np.testing.assert_array_equal(
        read_idx(write_idx(tmp_path / "a", images, gz=True)), images
    )
    np.testing.assert_array_equal(
        read_idx(write_idx(tmp_path / "b.gz", images)), images
    )


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_wrong_magic(tmp_path: Path, gz: bool) -> None:
    path = write_idx(tmp_path / "bad.idx", random_images(2, 3, 3), magic=1234, gz=gz)
    with pytest.raises(DataError, match=r"bad\.idx.*magic 1234") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_payload(tmp_path: Path, gz: bool) -> None:
    images = random_images(4, 5, 5)
    data = (2051).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in images.shape
    )
    data += images.tobytes()[:-7]
    path = tmp_path / "short.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(
        DataError, match=r"short\.idx.*payload is 93 bytes.*4 x 5 x 5 = 100"
    ):
        read_idx(path)


def test_read_idx_payload_too_long(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "long.idx", random_images(2, 2, 2))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match=r"long\.idx.*payload is 9 bytes"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "head.idx"
    path.write_bytes((2051).to_bytes(4, "big") + b"\x00\x00\x00\x02")
    with pytest.raises(DataError, match=r"head\.idx.*truncated idx header"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"head\.idx.*only 2 bytes"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    good = gzip.compress(b"\x00\x00\x08\x01" + (100).to_bytes(4, "big") + bytes(100))
    path = tmp_path / "cut.gz"
    path.write_bytes(good[: len(good) // 2])  # gzip stream cut in the middle
    with pytest.raises(DataError, match=r"cut\.gz.*cannot read idx"):
        read_idx(path)
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 5)
    with pytest.raises(DataError, match=r"cut\.gz"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope-idx3-ubyte.*not found"):
        read_idx(tmp_path / "nope-idx3-ubyte")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path)  # a folder is not a file


# --------------------------------------------------------------------------- #
# load_mnist
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist(tmp_path: Path, gz: bool) -> None:
    images = random_images(6, 28, 28, seed=2)
    labels = np.array([0, 9, 2, 7, 7, 1], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz=gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz=gz)
    x, y = load_mnist(tmp_path)
    assert x.shape == (6, 1, 28, 28)
    assert x.dtype == torch.uint8
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    assert y is not None
    assert y.dtype == torch.int64
    assert y.tolist() == [0, 9, 2, 7, 7, 1]


def test_load_mnist_prefix_and_no_labels(tmp_path: Path) -> None:
    images = random_images(3, 28, 28)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    x, y = load_mnist(tmp_path, prefix="train")
    assert y is None
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    # The t10k files are not there.
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_load_mnist_label_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", random_images(4, 28, 28))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(3, dtype=np.uint8))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte: 3 labels for 4 images"
    ):
        load_mnist(tmp_path)


def test_load_mnist_swapped_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.arange(3, dtype=np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: holds labels"):
        load_mnist(tmp_path)


def test_load_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent.*not found"):
        load_mnist(tmp_path / "absent")
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "t10k-images-idx3-ubyte and t10k-images-idx3-ubyte.gz" in message


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="shared MNIST folder not present")
def test_load_shared_mnist() -> None:
    x, y = load_mnist(MNIST_DIR)
    assert x.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.uint8
    assert y is not None
    assert y.shape == (10000,)
    assert int(y.min()) == 0
    assert int(y.max()) == 9
    # Known facts about MNIST's test set, computed once from the published files:
    # the first digit is a 7, the digit counts, and the exact pixel sums.
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(y).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert int(x[0].sum()) == 18454
    assert int(x.sum(dtype=torch.int64)) == 264923200
    assert 33.79 < float(x.float().mean()) < 33.80


# --------------------------------------------------------------------------- #
# load_image_folder
# --------------------------------------------------------------------------- #


def test_load_image_folder_png_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, size=(6, 9), dtype=np.uint8) for _ in range(3)]
    # Written out of name order, with mixed-case suffixes: read back sorted by name.
    for name, arr in zip(["b.png", "a.PNG", "c.png"], gray, strict=True):
        Image.fromarray(arr, mode="L").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    Image.fromarray(gray[0]).save(tmp_path / "sub" / "ignored.png")
    x = load_image_folder(tmp_path, channels=1)
    assert x.shape == (3, 1, 6, 9)
    assert x.dtype == torch.uint8
    np.testing.assert_array_equal(
        x[:, 0].numpy(), np.stack([gray[1], gray[0], gray[2]])
    )


def test_load_image_folder_rgb_exact(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    for i, arr in enumerate(rgb):
        Image.fromarray(arr, mode="RGB").save(tmp_path / f"{i}.png")
    x = load_image_folder(tmp_path, channels=3)
    assert x.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), rgb)


def test_load_image_folder_jpeg(tmp_path: Path) -> None:
    # JPEG is lossy: flat colours survive closely, not exactly.
    Image.new("RGB", (16, 16), (200, 40, 90)).save(tmp_path / "x.jpg", quality=95)
    Image.new("RGB", (16, 16), (10, 250, 30)).save(tmp_path / "y.JPEG", quality=95)
    x = load_image_folder(tmp_path, channels=3).int()
    assert x.shape == (2, 3, 16, 16)
    expected = torch.tensor([[200, 40, 90], [10, 250, 30]])[:, :, None, None]
    assert (x - expected).abs().max() <= 6


def test_load_image_folder_mode_conversion(tmp_path: Path) -> None:
    Image.new("RGB", (4, 3), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (4, 3), 77).save(tmp_path / "zgray.png")
    gray = load_image_folder(tmp_path, channels=1)
    assert gray.shape == (2, 1, 3, 4)
    # Pillow's RGB -> L is L = (299 R + 587 G + 114 B) / 1000.
    assert gray[0].unique().tolist() == [76]
    assert gray[1].unique().tolist() == [77]
    rgb = load_image_folder(tmp_path, channels=3)
    assert rgb.shape == (2, 3, 3, 4)
    assert rgb[0, :, 0, 0].tolist() == [255, 0, 0]
    assert rgb[1, :, 0, 0].tolist() == [77, 77, 77]  # gray replicated to 3 channels


def test_load_image_folder_mixed_sizes(tmp_path: Path) -> None:
    for name, size in [
        ("a.png", (8, 8)),
        ("b.png", (8, 8)),
        ("c.png", (10, 6)),
        ("d.png", (5, 5)),
    ]:
        Image.new("L", size, 9).save(tmp_path / name)
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path, channels=1)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "c.png"))
    assert "10x6" in message
    assert "8x8" in message
    assert "d.png" not in message


def test_load_image_folder_corrupt_file(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 9).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match=r"b\.png: cannot read image"):
        load_image_folder(tmp_path, channels=1)


def test_load_image_folder_truncated_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.png: cannot read image"):
        load_image_folder(tmp_path, channels=1)


def test_load_image_folder_empty_missing_and_bad_channels(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path, channels=1)
    with pytest.raises(DataError, match=r"missing.*not found"):
        load_image_folder(tmp_path / "missing", channels=1)
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        load_image_folder(tmp_path, channels=2)


# --------------------------------------------------------------------------- #
# load_array
# --------------------------------------------------------------------------- #


def test_load_array_npy_nhw(tmp_path: Path) -> None:
    arr = random_images(4, 5, 6)
    np.save(tmp_path / "a.npy", arr)
    x = load_array(tmp_path / "a.npy")
    assert x.shape == (4, 1, 5, 6)
    assert x.dtype == torch.uint8
    np.testing.assert_array_equal(x[:, 0].numpy(), arr)


def test_load_array_channels_last_and_first(tmp_path: Path) -> None:
    nchw = np.random.default_rng(3).integers(0, 256, size=(2, 3, 5, 6), dtype=np.uint8)
    np.save(tmp_path / "last.npy", nchw.transpose(0, 2, 3, 1))  # N x H x W x 3
    np.save(tmp_path / "first.npy", nchw)  # N x 3 x H x W
    for name in ("last.npy", "first.npy"):
        x = load_array(tmp_path / name)
        assert x.shape == (2, 3, 5, 6)
        assert x.is_contiguous()
        np.testing.assert_array_equal(x.numpy(), nchw)
    # N x H x W x 1 is channels-last too.
    np.save(tmp_path / "one.npy", nchw[:, :1].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(load_array(tmp_path / "one.npy").numpy(), nchw[:, :1])


def test_load_array_ambiguous_is_channels_first(tmp_path: Path) -> None:
    # Axis 1 and the last axis both 1 or 3: the documented rule reads N x C x H x W.
    arr = random_images(2, 3, 15).reshape(2, 3, 5, 3)
    np.save(tmp_path / "amb.npy", arr)
    np.testing.assert_array_equal(load_array(tmp_path / "amb.npy").numpy(), arr)


def test_load_array_npz_keys(tmp_path: Path) -> None:
    imgs = random_images(3, 4, 4, seed=4)
    other = random_images(2, 4, 4, seed=5)
    np.savez(tmp_path / "named.npz", images=imgs, labels=np.arange(3))
    np.testing.assert_array_equal(
        load_array(tmp_path / "named.npz")[:, 0].numpy(), imgs
    )
    np.testing.assert_array_equal(
        load_array(tmp_path / "named.npz", key="images")[:, 0].numpy(), imgs
    )
    np.savez_compressed(tmp_path / "custom.npz", train=imgs, test=other)
    np.testing.assert_array_equal(
        load_array(tmp_path / "custom.npz", key="test")[:, 0].numpy(), other
    )
    np.savez(tmp_path / "single.npz", pixels=other)
    np.testing.assert_array_equal(
        load_array(tmp_path / "single.npz")[:, 0].numpy(), other
    )


def test_load_array_npz_ambiguous_or_unknown_key(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "two.npz", train=random_images(1, 2, 2), test=random_images(1, 2, 2)
    )
    with pytest.raises(DataError, match=r"two\.npz: .*several arrays.*train, test"):
        load_array(tmp_path / "two.npz")
    with pytest.raises(DataError, match=r"two\.npz: no array 'valid'.*train, test"):
        load_array(tmp_path / "two.npz", key="valid")
    np.save(tmp_path / "plain.npy", random_images(1, 2, 2))
    with pytest.raises(DataError, match=r"plain\.npy: key 'images' given"):
        load_array(tmp_path / "plain.npy", key="images")


def test_load_array_float(tmp_path: Path) -> None:
    arr = np.array([0.0, 1.0, 0.5, 0.2, 1 / 255, 0.999], dtype=np.float32).reshape(
        1, 2, 3
    )
    np.save(tmp_path / "f.npy", arr)
    x = load_array(tmp_path / "f.npy")
    assert x.dtype == torch.uint8
    # 0.5 * 255 = 127.5 rounds half to even -> 128; 0.2 * 255 = 51; 0.999 * 255 = 254.7.
    assert x.flatten().tolist() == [0, 255, 128, 51, 1, 255]


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.zeros((4, 5), np.uint8), "2-d array"),
        (np.zeros((1, 2, 3, 4, 5), np.uint8), "5-d array"),
        (np.zeros((2, 5, 6, 7), np.uint8), "no channel axis"),
        (np.zeros((2, 5, 6), np.int64), "dtype int64 not supported"),
        (np.zeros((2, 5, 6), np.bool_), "dtype bool not supported"),
        (np.full((2, 5, 6), 2.0), r"float values must lie in \[0, 1\], found 2\.\.2"),
        (np.full((2, 5, 6), -0.5, np.float32), "float values must lie"),
        (np.full((2, 5, 6), np.nan), "float values must lie"),
        (np.zeros((0, 5, 6), np.uint8), "no images"),
    ],
)
def test_load_array_refused(tmp_path: Path, array: np.ndarray, pattern: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=rf"bad\.npy: .*{pattern}"):
        load_array(tmp_path / "bad.npy")


def test_load_array_names_npz_member(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", images=np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=r"m\.npz\[images\]: 2-d array"):
        load_array(tmp_path / "m.npz")


def test_load_array_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.npy: array file not found"):
        load_array(tmp_path / "gone.npy")
    (tmp_path / "junk.npy").write_bytes(b"definitely not numpy")
    with pytest.raises(DataError, match=r"junk\.npy: cannot load array"):
        load_array(tmp_path / "junk.npy")
    np.save(tmp_path / "cut.npy", random_images(10, 10, 10))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:300])
    with pytest.raises(DataError, match=r"cut\.npy: cannot load array"):
        load_array(tmp_path / "cut.npy")
    # Object arrays need pickle, which is refused.
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy: cannot load array"):
        load_array(tmp_path / "obj.npy")


# --------------------------------------------------------------------------- #
# pad_to
# --------------------------------------------------------------------------- #


def test_pad_to_centres() -> None:
    images = torch.randint(1, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = pad_to(images, 32)
    assert out.shape == (2, 1, 32, 32)
    assert out.dtype == torch.uint8
    assert torch.equal(out[:, :, 2:30, 2:30], images)
    # Exactly the 2-pixel border is zero (inputs were >= 1).
    assert int((out == 0).sum()) == 2 * (32 * 32 - 28 * 28)


def test_pad_to_odd_and_rectangular() -> None:
    images = torch.ones(1, 3, 3, 4)
    out = pad_to(images, 6)
    assert out.shape == (1, 3, 6, 6)
    assert out.dtype == torch.float32
    # 3 spare rows: 1 above, 2 below; 2 spare columns: 1 each side.
    assert torch.equal(out[:, :, 1:4, 1:5], images)
    assert float(out.sum()) == images.numel()
    # Same size is a copy, not an error.
    assert torch.equal(pad_to(images[:, :, :, :3], 3), images[:, :, :, :3])


def test_pad_to_refuses() -> None:
    images = torch.zeros(1, 1, 28, 30, dtype=torch.uint8)
    with pytest.raises(DataError, match=r"cannot pad 28x30 images to 29x29"):
        pad_to(images, 29)
    with pytest.raises(DataError, match="N x C x H x W"):
        pad_to(torch.zeros(28, 28), 32)


def test_errors_are_progvq_errors() -> None:
    assert issubclass(DataError, ProgvqError)


# --------------------------------------------------------------------------- load_dataset


def _cfg(**kw):
    from progvq.config import DataConfig

    return DataConfig(**kw)


def test_load_dataset_shapes_split_and_seed() -> None:
    from progvq.data import load_dataset

    data = load_dataset(_cfg(source="shapes", count=50, heldout=10, size=16), total_downsample=8)
    assert data.train.shape == (40, 1, 16, 16) and data.heldout.shape == (10, 1, 16, 16)
    assert data.image_shape == (1, 16, 16) and data.channels == 1
    everything = make_shapes(50, size=16, seed=0)
    assert torch.equal(torch.cat([data.train, data.heldout]), everything)
    other = load_dataset(_cfg(source="shapes", count=50, heldout=10, size=16, seed=1))
    assert not torch.equal(other.train, data.train)


def test_load_dataset_mnist_convention_and_padding() -> None:
    from progvq.data import load_dataset

    if not MNIST_DIR.exists():
        pytest.skip("no ../shared/data/mnist")
    data = load_dataset(_cfg(source="mnist", path=str(MNIST_DIR), size=32, heldout=1000), total_downsample=8)
    # the images keep their own 28x28; the canvas centres them on 32x32 for the models
    assert data.train.shape == (9000, 1, 28, 28) and data.heldout.shape == (1000, 1, 28, 28)
    assert data.canvas.shape == (1, 28, 28) and data.canvas.padded == (1, 32, 32) and data.canvas.dims == 784
    assert data.train_labels is not None and data.train_labels[:3].tolist() == [7, 2, 1]
    raw, labels = load_mnist(MNIST_DIR)
    assert torch.equal(data.heldout, raw[9000:])
    assert torch.equal(data.heldout_labels, labels[9000:])
    padded = data.canvas.pad(data.train)
    assert padded.shape == (9000, 1, 32, 32) and torch.equal(padded[:, :, 2:30, 2:30], data.train)
    assert padded[:, :, :2].sum() == 0 and padded[:, :, 30:].sum() == 0  # the padding is black
    assert torch.equal(data.canvas.crop(padded), data.train)


def test_load_dataset_refusals(tmp_path: Path) -> None:
    from progvq.data import load_dataset

    arr = tmp_path / "a.npy"
    np.save(arr, np.zeros((20, 12, 12, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"a.npy: images have 3 channels but data.channels is 1"):
        load_dataset(_cfg(source="array", path=str(arr), heldout=5))
    with pytest.raises(DataError, match=r"images are 12x12, not divisible by the levels' total downsampling 8"):
        load_dataset(_cfg(source="array", path=str(arr), channels=3, heldout=5), total_downsample=8)
    padded = load_dataset(_cfg(source="array", path=str(arr), channels=3, heldout=5, size=16), 8)
    assert padded.train.shape == (15, 3, 12, 12) and padded.canvas.padded == (3, 16, 16)
    with pytest.raises(DataError, match=r"20 images, need more than data.heldout \(20\)"):
        load_dataset(_cfg(source="array", path=str(arr), channels=3, heldout=20))


# --------------------------------------------------------------------------- shape labels

# sha256 of the images make_shapes drew before it recorded labels: recording them must leave the
# images as they were, since data sets, tests and trained runs depend on them.
SHAPES_SHA256_BEFORE_LABELS = {
    (300, 32, 1, 1): "57095534251a23f890effa1ad52acb8d2cea7f440abca3ac7fe7285582c048c3",
    (64, 16, 3, 5): "db5bdf666d649bfc1f62b2d71a749b85bd3390b0f57db4978709e056901355d3",
    (50, 28, 1, 3): "5fd11995f4b622f7797a2064b7ac32d20fa9816caf6c757b804a4553cc41fb09",
}


@pytest.mark.parametrize("n, size, channels, seed", list(SHAPES_SHA256_BEFORE_LABELS))
def test_labelled_shapes_keep_the_images(n: int, size: int, channels: int, seed: int) -> None:
    from progvq.data import make_labelled_shapes

    images, labels = make_labelled_shapes(n, size=size, channels=channels, seed=seed)
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    assert digest == SHAPES_SHA256_BEFORE_LABELS[(n, size, channels, seed)]
    assert torch.equal(images, make_shapes(n, size=size, channels=channels, seed=seed))
    assert labels.shape == (n,) and labels.dtype == torch.int64


def test_shape_classes_table() -> None:
    from progvq.data import SHAPE_CLASSES, SHAPE_KINDS

    # one class per count (1 or 2) and sorted multiset of kinds: 3 + 6
    assert len(SHAPE_CLASSES) == len(set(SHAPE_CLASSES)) == 9
    singles = [name for name in SHAPE_CLASSES if "+" not in name]
    pairs = [tuple(name.split("+")) for name in SHAPE_CLASSES if "+" in name]
    assert tuple(singles) == SHAPE_KINDS
    assert sorted(pairs) == sorted({tuple(sorted((a, b))) for a in SHAPE_KINDS for b in SHAPE_KINDS})
    assert all(list(pair) == sorted(pair) for pair in pairs)


def test_shape_labels_deterministic_and_drawn_as_designed() -> None:
    from progvq.data import make_labelled_shapes

    images, labels = make_labelled_shapes(3000, size=16, seed=11)
    again_images, again = make_labelled_shapes(3000, size=16, seed=11)
    assert torch.equal(labels, again) and torch.equal(images, again_images)
    assert not torch.equal(labels, make_labelled_shapes(3000, size=16, seed=12)[1])
    assert labels.min() >= 0 and labels.max() <= 8
    # one or two shapes with equal odds, each of three kinds with equal odds: a single kind 1/6,
    # a pair of equal kinds 1/18, a pair of different kinds 1/9 (either order of drawing)
    expected = torch.tensor([1 / 6] * 3 + [1 / 18, 1 / 9, 1 / 9, 1 / 18, 1 / 9, 1 / 18])
    share = torch.bincount(labels, minlength=9).double() / len(labels)
    assert torch.allclose(share, expected.double(), atol=0.025), share


def test_shape_labels_match_a_recount() -> None:
    """What the images show agrees with their labels: how many colours, and the one shape's kind."""
    from progvq.data import SHAPE_CLASSES, make_labelled_shapes

    images, labels = make_labelled_shapes(600, size=32, channels=3, seed=4)
    single = labels < 3

    def one_colour(image: torch.Tensor) -> bool:
        # every pixel of a single shape is its colour times its coverage, up to rounding: the cross
        # products with the brightest pixel (fully covered) vanish to within half a grey level each
        p = image.reshape(3, -1).T.long()  # (H W, 3)
        c = p[p.sum(1).argmax()]
        cross = p[:, :, None] * c[None, None, :] - p[:, None, :] * c[None, :, None]
        return bool((cross.abs() <= 255).all())

    looks_single = torch.tensor([one_colour(image) for image in images])
    assert looks_single[single].all()
    # two shapes show two colours unless the later one hides the earlier or their colours are alike
    assert looks_single[~single].float().mean() < 0.03

    for image, label in zip(images[single], labels[single], strict=True):
        covered = image.amax(0) > 0  # (H, W)
        rows, cols = covered.any(1).nonzero(), covered.any(0).nonzero()
        box = covered[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        filled = float(box.float().mean())
        # a rectangle fills its bounding box; an ellipse about pi/4 of it; a triangle at most half,
        # a little more with its anti-aliased edges
        kind = "rectangle" if filled == 1.0 else "ellipse" if filled > 0.68 else "triangle"
        assert kind == SHAPE_CLASSES[int(label)]


def test_shapes_source_gives_labels_with_the_split() -> None:
    from progvq.data import load_dataset, make_labelled_shapes

    data = load_dataset(_cfg(source="shapes", count=60, heldout=10, size=16, limit=50, seed=2))
    images, labels = make_labelled_shapes(60, size=16, seed=2)
    assert torch.equal(torch.cat([data.train, data.heldout]), images[:50])
    assert data.train_labels is not None and data.heldout_labels is not None
    assert torch.equal(torch.cat([data.train_labels, data.heldout_labels]), labels[:50])
    assert data.num_classes == int(labels[:50].max()) + 1


@pytest.mark.parametrize("gz", [False, True])
def test_data_beyond_memory_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool
) -> None:
    import progvq.data

    images = random_images(12, 16, 16)
    content = b"".join(d.to_bytes(4, "big") for d in (2051, 12, 16, 16)) + images.tobytes()
    (tmp_path / "i").write_bytes(gzip.compress(content) if gz else content)
    np.save(tmp_path / "a.npy", images)
    monkeypatch.setattr(progvq.data, "_memory", lambda: 1000)  # a machine of 1000 bytes
    with pytest.raises(DataError, match=r"i: holds 0.0 GiB of images, more than this machine's"):
        read_idx(tmp_path / "i")
    with pytest.raises(DataError, match=r"a.npy: holds 0.0 GiB of images"):
        load_array(tmp_path / "a.npy")
