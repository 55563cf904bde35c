"""Image grids and files: PNG grids and uint8 ``.npz`` arrays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .fileio import atomic_write


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


def save_png(grid: Tensor, path: str | Path) -> None:
    """Save a uint8 (C, H, W) image (C = 1 or 3) as PNG."""
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_npz(images: Tensor, path: str | Path) -> None:
    """Save uint8 images as ``images``: N x H x W when grey, else N x C x H x W."""
    array = images.numpy()
    if array.shape[1] == 1:
        array = array[:, 0]

    atomic_write(path, lambda f: np.savez_compressed(f, images=array))
