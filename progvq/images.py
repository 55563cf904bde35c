"""Image grids and files: PNG grids and uint8 ``.npz`` arrays."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> Tensor:
    """uint8 (N, C, H, W) -> one uint8 (C, rows*(H+pad)+pad, nrow*(W+pad)+pad) grid, row-major."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def _atomic_write(path: Path, write: callable) -> None:  # type: ignore[valid-type]
    """Write through a temporary file in the same folder and rename, so no half file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(grid: Tensor, path: str | Path) -> None:
    """Save a uint8 (C, H, W) image (C = 1 or 3) as PNG."""
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    _atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def save_npz(images: Tensor, path: str | Path) -> None:
    """Save uint8 images as ``images``: N x H x W when grey, else N x C x H x W."""
    array = images.numpy()
    if array.shape[1] == 1:
        array = array[:, 0]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=array)

    _atomic_write(Path(path), write)
