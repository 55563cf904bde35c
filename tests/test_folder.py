"""Image folders: class labels, transforms, the held-out pick, the memory-mapped cache and exact resume on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import progvq.folder
from progvq.checkpoint import checkpoint_path, load_checkpoint
from progvq.config import DataConfig
from progvq.data import SHAPE_CLASSES, heldout_rows, load_dataset, make_labelled_shapes, write_shapes_folder
from progvq.errors import DataError
from progvq.folder import CACHE_DIR, FILES, MANIFEST, MappedImages, Transform, cached_folder, list_folder
from run_stage import main

from .conftest import TINY


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """A random uint8 image (h, w, channels) (h, w for grey)."""
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_noise(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = noise(h, w, seed)
    Image.fromarray(pixels).save(path)
    return pixels


def folder_cfg(path: Path, **kw: object) -> DataConfig:
    kw.setdefault("channels", 3)
    kw.setdefault("heldout", 2)
    return DataConfig(source="folder", path=str(path), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- listing and labels


def test_class_folders_give_sorted_labels_and_dot_files_are_skipped(tmp_path: Path) -> None:
    for cls, n in (("zebra", 2), ("ant", 3), ("mole/deep", 1)):
        for i in range(n):
            write_noise(tmp_path / cls / f"{i}.png", 8, 8, i)
    (tmp_path / "ant" / "._0.png").write_bytes(b"a resource fork, not an image")
    (tmp_path / ".hidden").mkdir()
    write_noise(tmp_path / ".hidden" / "x.png", 8, 8, 0)
    (tmp_path / "empty").mkdir()
    listing = list_folder(tmp_path)
    assert listing.classes == ["ant", "empty", "mole", "zebra"]  # sorted; a class may nest, or have no images
    assert [e.rel for e in listing.entries] == ["ant/0.png", "ant/1.png", "ant/2.png", "mole/deep/0.png",
                                                "zebra/0.png", "zebra/1.png"]
    assert [e.label for e in listing.entries] == [0, 0, 0, 2, 3, 3]


def test_images_beside_class_folders_are_refused(tmp_path: Path) -> None:
    write_noise(tmp_path / "a" / "0.png", 8, 8, 0)
    write_noise(tmp_path / "stray.png", 8, 8, 1)
    with pytest.raises(DataError, match=r"images both directly inside \(stray.png\) and in class folders \(a/\)"):
        list_folder(tmp_path)


def test_formats_and_channels(tmp_path: Path) -> None:
    ramp = np.arange(8, dtype=np.uint8) * 30  # smooth, which JPEG keeps well
    red, green, blue = ramp[:, None] + ramp[None, :] // 2, np.full((8, 8), 90, np.uint8), ramp[None, :].repeat(8, 0)
    pixels = np.stack([red, green, blue], 2)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.webp", lossless=True)
    Image.fromarray(pixels).save(tmp_path / "c.JPG", quality=95)
    data = load_dataset(folder_cfg(tmp_path, heldout=1, seed=0))
    everything = torch.cat([data.train, data.heldout]).int()
    assert everything.shape == (3, 3, 8, 8)
    exact = torch.from_numpy(pixels.transpose(2, 0, 1)).int()
    # PNG and lossless WebP hold the pixels exactly, JPEG nearly
    exact_count = sum(bool(torch.equal(image, exact)) for image in everything)
    assert exact_count == 2
    assert all((image - exact).abs().float().mean() < 12 for image in everything)
    grey = load_dataset(folder_cfg(tmp_path, heldout=1, channels=1))
    assert grey.heldout.shape[1:] == (1, 8, 8)


# --------------------------------------------------------------------------- transforms


def test_shorter_side_resize_and_centre_crop(tmp_path: Path) -> None:
    pixels = write_noise(tmp_path / "wide.png", 20, 40, 1)
    out = Transform(3, 10, "shorter-side", "centre").apply(Image.open(tmp_path / "wide.png"), tmp_path, "wide.png")
    want = Image.fromarray(pixels).resize((20, 10), Image.Resampling.BICUBIC).crop((5, 0, 15, 10))
    assert out.shape == (3, 10, 10)
    assert np.array_equal(out, np.asarray(want).transpose(2, 0, 1))


def test_random_crop_is_fixed_by_seed_and_path(tmp_path: Path) -> None:
    write_noise(tmp_path / "a.png", 30, 30, 1)
    image = Image.open(tmp_path / "a.png")
    crop = Transform(3, 8, "none", "random", seed=4)
    first = crop.apply(image, tmp_path, "a.png")
    assert np.array_equal(first, crop.apply(image, tmp_path, "a.png"))  # the same every time it is read
    others = [Transform(3, 8, "none", "random", seed=s).apply(image, tmp_path, "a.png") for s in range(5, 10)]
    assert any(not np.array_equal(first, o) for o in others)  # another seed, another place
    assert not np.array_equal(first, crop.apply(image, tmp_path, "b.png"))


def test_image_smaller_than_the_crop_is_refused_naming_it(tmp_path: Path) -> None:
    write_noise(tmp_path / "a.png", 16, 16, 0)
    write_noise(tmp_path / "small.png", 16, 6, 1)
    write_noise(tmp_path / "c.png", 16, 16, 2)
    with pytest.raises(DataError, match=r"small.png: image is 6x16, smaller than the 8x8 crop"):
        load_dataset(folder_cfg(tmp_path, size=8, crop="centre", heldout=1))


# --------------------------------------------------------------------------- the held-out pick


def test_heldout_pick_depends_on_seed_and_paths_only() -> None:
    paths = [f"c{i % 3}/{i:04d}.png" for i in range(200)]
    held = heldout_rows(paths, 20, seed=3)
    assert len(held) == 20 and list(held) == sorted(set(held.tolist()))
    assert np.array_equal(held, heldout_rows(paths, 20, seed=3))
    assert not np.array_equal(held, heldout_rows(paths, 20, seed=4))
    # one more file moves at most one image between the splits
    more = sorted([*paths, "c1/extra.png"])
    names = {paths[i] for i in held}
    names_more = {more[i] for i in heldout_rows(more, 20, seed=3)}
    assert len(names ^ names_more) <= 2


def test_class_folders_split_across_classes(tmp_path: Path) -> None:
    write_shapes_folder(tmp_path / "shapes", 90, size=8, channels=3, seed=1)
    data = load_dataset(folder_cfg(tmp_path / "shapes", heldout=30))
    assert data.heldout_labels is not None and data.train_labels is not None
    assert len(set(data.heldout_labels.tolist())) > 3  # not the last class folder alone
    images, labels = make_labelled_shapes(90, size=8, channels=3, seed=1)
    # every generated image is there, with its label
    got = {(bytes(x.numpy()), int(y)) for x, y in zip(data.heldout, data.heldout_labels, strict=True)}
    want = {(bytes(x.numpy()), int(y)) for x, y in zip(images, labels, strict=True)}
    assert got <= want
    assert data.num_classes == len(SHAPE_CLASSES)


# --------------------------------------------------------------------------- the cache


def lines() -> tuple[list[str], object]:
    said: list[str] = []
    return said, said.append


def test_cache_equals_memory_and_is_reused(tmp_path: Path) -> None:
    write_shapes_folder(tmp_path / "shapes", 40, size=8, channels=3, seed=2)
    cfg = folder_cfg(tmp_path / "shapes", heldout=5)
    said, log = lines()
    mapped = load_dataset(cfg, cache_dir=tmp_path / "run", log=log)
    memory = load_dataset(cfg)
    assert isinstance(mapped.train, MappedImages) and isinstance(memory.train, torch.Tensor)
    assert mapped.train.shape == memory.train.shape and len(mapped.train) == 35
    assert torch.equal(mapped.train[:], memory.train) and torch.equal(mapped.heldout, memory.heldout)
    assert torch.equal(mapped.train_labels, memory.train_labels)
    index = torch.tensor([7, 0, 34, 7])
    assert torch.equal(mapped.train[index], memory.train[index])
    cache = tmp_path / "run" / CACHE_DIR
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and MANIFEST in files and FILES in files
    assert (cache / FILES).read_text().splitlines()[0].split("\t")[0].startswith("0-ellipse/")
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = load_dataset(cfg, cache_dir=tmp_path / "run", log=log)
    assert torch.equal(again.train[:], memory.train)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp and said == []


def test_cache_rebuilt_when_the_folder_or_transform_changes(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    for i in range(6):
        write_noise(folder / f"{i}.png", 12, 12, i)
    run = tmp_path / "run"
    said, log = lines()
    load_dataset(folder_cfg(folder), cache_dir=run, log=log)
    write_noise(folder / "6.png", 12, 12, 6)
    data = load_dataset(folder_cfg(folder), cache_dir=run, log=log)
    assert len(data.train) + len(data.heldout) == 7
    assert said[-1].endswith("the folder holds 7 images, the cache 6; building the data cache again")
    write_noise(folder / "2.png", 12, 12, 22)  # rewritten in place
    data = load_dataset(folder_cfg(folder), cache_dir=run, log=log)
    assert said[-1].endswith("the folder's files changed since the cache was built; building the data cache again")
    assert any(np.array_equal(x.numpy(), noise(12, 12, 22).transpose(2, 0, 1)) for x in data.train[:])
    data = load_dataset(folder_cfg(folder, size=8, crop="centre"), cache_dir=run, log=log)
    assert data.heldout.shape[2:] == (8, 8) and "the transform differs" in said[-1]
    assert len(list((run / CACHE_DIR).glob("images-*.u8"))) == 1  # the earlier cache files are gone


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    write_shapes_folder(tmp_path / "shapes", 20, size=8, channels=3, seed=2)
    cfg = folder_cfg(tmp_path / "shapes")
    want = load_dataset(cfg)
    load_dataset(cfg, cache_dir=tmp_path / "run")
    cache = tmp_path / "run" / CACHE_DIR
    (images,) = cache.glob("images-*.u8")
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-10])
    elif damage == "flip":
        raw = bytearray(images.read_bytes())
        raw[100] ^= 0xFF
        images.write_bytes(bytes(raw))
    else:
        (cache / MANIFEST).write_text("{not json")
    said, log = lines()
    data = load_dataset(cfg, cache_dir=tmp_path / "run", log=log)
    assert torch.equal(data.train[:], want.train)
    if damage != "manifest":
        assert len(said) == 1 and "data cache damaged" in said[0]


def test_unreadable_files_skipped_when_asked(tmp_path: Path) -> None:
    for i in range(6):
        write_noise(tmp_path / "p" / f"{i}.png", 8, 8, i)
    (tmp_path / "p" / "3.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"3.png: cannot read image"):
        load_dataset(folder_cfg(tmp_path / "p"), cache_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # the folders made for the cache went with the failed build
    said, log = lines()
    data = load_dataset(folder_cfg(tmp_path / "p", on_unreadable="skip"), cache_dir=tmp_path / "run", log=log)
    assert len(data.train) + len(data.heldout) == 5
    assert said == [f"{tmp_path / 'p'}: 1 unreadable files skipped (first: 3.png: cannot read image "
                    "(UnidentifiedImageError: cannot identify image file " + repr(str(tmp_path / "p" / "3.png"))
                    + "))"]


def test_folder_changed_while_cached_keeps_the_old_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        write_noise(tmp_path / "p" / f"{i}.png", 8, 8, i)
    run = tmp_path / "run"
    load_dataset(folder_cfg(tmp_path / "p"), cache_dir=run)
    before = {p.name: p.read_bytes() for p in (run / CACHE_DIR).iterdir()}
    write_noise(tmp_path / "p" / "5.png", 8, 8, 5)  # a change: the cache must be rebuilt
    real = progvq.folder.decode

    def decode_and_meddle(folder: Path, entry: progvq.folder.Entry, transform: Transform) -> np.ndarray:
        if entry.rel == "2.png":
            write_noise(folder / "9.png", 8, 8, 9)
        return real(folder, entry, transform)

    monkeypatch.setattr(progvq.folder, "decode", decode_and_meddle)
    with pytest.raises(DataError, match="changed while its images were read"):
        load_dataset(folder_cfg(tmp_path / "p"), cache_dir=run)
    assert {p.name: p.read_bytes() for p in (run / CACHE_DIR).iterdir()} == before


def test_cache_builders_take_turns(tmp_path: Path) -> None:
    """The lock is on the cache folder itself: a second process would wait, then find the cache built."""
    write_shapes_folder(tmp_path / "s", 10, size=8, seed=0)
    listing = list_folder(tmp_path / "s")
    first = cached_folder(listing, Transform(3), tmp_path / "run")
    second = cached_folder(listing, Transform(3), tmp_path / "run")
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    manifest = json.loads((tmp_path / "run" / CACHE_DIR / MANIFEST).read_text())
    assert manifest["shape"] == [10, 3, 8, 8] and manifest["bytes"] == 10 * 3 * 64
    mode = (tmp_path / "run" / CACHE_DIR / manifest["file"]).stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# --------------------------------------------------------------------------- training on it


def test_training_on_a_cached_folder_resumes_exactly(tmp_path: Path) -> None:
    write_shapes_folder(tmp_path / "shapes", 120, size=16, channels=3, seed=3)
    sets = ["data.source=folder", f"data.path={tmp_path / 'shapes'}", "data.channels=3", "data.heldout=20"]
    sets += ["data.size=16", "data.crop=random", "stages.1.steps=4"]
    extra = [arg for s in sets for arg in ("--set", s)]

    def train(run: Path, *args: str) -> None:
        argv = ["train", str(TINY), "--stage", "1", "--run-dir", str(run), "--no-progress", *extra, *args]
        assert main(argv) == 0

    train(tmp_path / "straight")
    train(tmp_path / "resumed", "--until", "2")
    train(tmp_path / "resumed")
    a = load_checkpoint(checkpoint_path(tmp_path / "straight", "1"))["model"]
    b = load_checkpoint(checkpoint_path(tmp_path / "resumed", "1"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / CACHE_DIR / MANIFEST).is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_batches_of_a_cached_folder_land_on_the_gpu(tmp_path: Path) -> None:
    from progvq.canvas import Canvas
    from progvq.distributed import resolve_device

    device = resolve_device("auto")
    assert device.type == "cuda"  # auto takes CUDA where there is one
    write_shapes_folder(tmp_path / "s", 12, size=8, seed=0)
    data = load_dataset(folder_cfg(tmp_path / "s", heldout=2), cache_dir=tmp_path / "run")
    assert isinstance(data.train, MappedImages)
    placed = data.train.placed(Canvas((3, 8, 8), (3, 16, 16)), device)
    batch = placed[torch.tensor([0, 3])]
    assert batch.device.type == "cuda" and batch.shape == (2, 3, 16, 16)
    assert torch.equal(batch[:, :, 4:12, 4:12].cpu(), data.train[torch.tensor([0, 3])])
