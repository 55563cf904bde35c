"""Image grids and files: PNG grids and uint8 ``.npz`` arrays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .fileio import atomic_write, atomic_write_all, serialise


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


def png_bytes(grid: Tensor) -> bytes:
    """A uint8 (C, H, W) image (C = 1 or 3) as the bytes of a PNG file."""
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    return serialise(lambda f: image.save(f, format="PNG"))


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """Named arrays as the bytes of a compressed ``.npz`` file."""
    return serialise(lambda f: np.savez_compressed(f, **arrays))


def images_array(images: Tensor) -> np.ndarray:
    """uint8 images (N, C, H, W) as saved: N x H x W when grey, else N x C x H x W."""
    array = images.cpu().numpy()
    return array[:, 0] if array.shape[1] == 1 else array


def save_png(grid: Tensor, path: str | Path) -> None:
    """Save a uint8 (C, H, W) image (C = 1 or 3) as PNG."""
    atomic_write(path, png_bytes(grid))


def save_npz(images: Tensor, path: str | Path) -> None:
    """Save uint8 images (N, C, H, W) as ``images``: N x H x W when grey, else N x C x H x W."""
    atomic_write(path, npz_bytes(images=images_array(images)))


def save_grid_and_arrays(grid: Tensor, png: str | Path, **arrays: np.ndarray) -> Path:
    """The PNG ``png`` of ``grid`` (C, H, W) and the arrays beside it (same name, ``.npz``), as one write:
    both files are replaced or neither is. Returns the ``.npz`` path."""
    png = Path(png)
    npz = png.with_suffix(".npz")
    atomic_write_all({png: png_bytes(grid), npz: npz_bytes(**arrays)})
    return npz
