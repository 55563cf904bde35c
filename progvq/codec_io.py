"""The inputs and outputs of ``progvq encode`` / ``decode`` / ``compress``: images from files, an npz or a
split, and the codes of every level as arrays.

A codes file (``progvq encode``) is an npz with ``level1`` .. ``levelL``: (N, h_k, w_k) code indices,
uint16 where the level's codebook has at most 65,536 codes (int32 otherwise), and ``labels`` (N,)
int64 when the images came with labels (a split of a labelled data set).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .codec import CodecError
from .data import load_array, load_dataset
from .hierarchy import Hierarchy
from .inpaint import read_image


def read_inputs(
    model: Hierarchy,
    *,
    files: list[str] | None = None,
    npz: str | None = None,
    split: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The images to encode, uint8 (N, C, H, W) at the run's own size, and their labels (N,) or None.

    Exactly one source: image ``files`` (PNG/JPEG; a ``.npz`` or ``.npy`` among them is read as an
    array of images), one ``npz`` (or ``.npy``) of images, or the run's data ``split`` (``heldout`` or
    ``train``, with the data's labels when it has them). Anything of another size or colour, or no
    image at all, is refused (:class:`~progvq.errors.ProgvqError`) naming the file.
    """
    given = [name for name, value in (("images", files), ("--npz", npz), ("--split", split)) if value]
    if len(given) != 1:
        raise CodecError("give the images one way: image files, --npz FILE or --split heldout|train")
    shape = model.image_shape
    if split:
        data = load_dataset(model.config.data, total_downsample=model.config.total_downsample())
        images, labels = (data.heldout, data.heldout_labels) if split == "heldout" else (data.train, data.train_labels)
        return images, labels
    parts = []
    for name in files or [npz]:
        path = Path(name)
        if path.suffix.lower() in (".npz", ".npy"):
            parts.append(_checked(load_array(path), shape, path))
        else:
            parts.append(read_image(path, shape)[None])
    return torch.cat(parts), None


def _checked(images: Tensor, shape: tuple[int, int, int], path: Path) -> Tensor:
    got = tuple(int(v) for v in images.shape[1:])
    if got != shape:
        raise CodecError(
            f"{path}: images are {'x'.join(map(str, got))} (C x H x W); the run's are {'x'.join(map(str, shape))}"
        )
    return images


def _codes_dtype(codes: int) -> type:
    """The smallest integer dtype of the codes file that holds indices 0 .. codes - 1."""
    return np.uint16 if codes <= 2**16 else np.int32


def code_arrays(model: Hierarchy, codes: list[Tensor]) -> dict[str, np.ndarray]:
    """Codes [z_1 (N, h1, w1), ..., z_L] -> ``{"level1": ..., "levelL": ...}`` arrays of a codes file."""
    return {
        f"level{k}": z.cpu().numpy().astype(_codes_dtype(model.config.level(k).codes))
        for k, z in enumerate(codes, start=1)
    }


def read_codes(model: Hierarchy, path: str | Path, level: int | None = None) -> tuple[Tensor, int]:
    """A codes file's codes of ``level`` (default: its highest level) as (N, h, w) int64, and that level.

    Refuses (:class:`CodecError`) a file that is not an npz of codes, a level it lacks or the run
    lacks, and codes of another grid or out of the level's codebook.
    """
    path = Path(path)
    if not path.is_file():
        raise CodecError(f"{path}: codes file not found" if not path.exists() else f"{path}: not a file")
    try:
        with np.load(path, allow_pickle=False) as loaded:
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise CodecError(f"{path}: not an npz of codes (`progvq encode` writes one)")
            have = sorted(int(key[5:]) for key in loaded.files if key.startswith("level") and key[5:].isdigit())
            if not have:
                raise CodecError(f"{path}: no codes (arrays level1, level2, ...; `progvq encode` writes them)")
            level = have[-1] if level is None else level
            if level not in have:
                raise CodecError(f"{path}: no codes of level {level} (it has levels {', '.join(map(str, have))})")
            array = loaded[f"level{level}"]
    except CodecError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CodecError(f"{path}: cannot read codes ({' '.join(str(err).split()) or type(err).__name__})") from None
    if not 1 <= level <= model.num_levels:
        raise CodecError(f"{path}: codes of level {level}, but the run has levels 1..{model.num_levels}")
    h, w = model.grid_shape(level)
    count = model.config.level(level).codes
    if array.ndim != 3 or tuple(array.shape[1:]) != (h, w) or not np.issubdtype(array.dtype, np.integer):
        raise CodecError(
            f"{path}[level{level}]: expected integer codes N x {h} x {w}, got {array.dtype} {tuple(array.shape)}"
        )
    if len(array) == 0:
        raise CodecError(f"{path}[level{level}]: no codes")
    if array.min() < 0 or array.max() >= count:
        raise CodecError(f"{path}[level{level}]: codes out of range 0..{count - 1}")
    return torch.from_numpy(array.astype(np.int64)), level
