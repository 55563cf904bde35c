"""Image grids and the files they go to: the grid's layout, PNG and npz round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progvq.images import image_grid, save_npz, save_png


def _numbered(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """Image i (n, c, h, w) uint8 filled with the value 10 * (i + 1), so its place in a grid can be read."""
    return (torch.arange(1, n + 1, dtype=torch.uint8) * 10).view(n, 1, 1, 1).expand(n, c, h, w).contiguous()


@pytest.mark.parametrize(
    ("n", "nrow", "rows", "cols"),
    [(5, None, 2, 3), (4, None, 2, 2), (1, None, 1, 1), (5, 5, 1, 5)],  # ceil(sqrt(n)) per row by default
)
def test_grid_places_images_row_major_with_padding(n: int, nrow: int | None, rows: int, cols: int) -> None:
    images = _numbered(n, 1, 3, 4)
    grid = image_grid(images, nrow=nrow)
    assert grid.dtype == torch.uint8 and grid.shape == (1, rows * (3 + 2) + 2, cols * (4 + 2) + 2)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = 2 + r * 5, 2 + col * 6
        assert torch.equal(grid[:, y : y + 3, x : x + 4], images[i]), i
    # everything else is the zero padding (and the empty cells of the last row)
    assert int(grid.sum()) == int(images.sum())


def test_grid_of_colour_images_with_its_own_padding() -> None:
    images = _numbered(3, 3, 2, 2)
    images[1, 2] = 255  # one channel of one image differs
    grid = image_grid(images, nrow=3, pad=1)
    assert grid.shape == (3, 1 * 3 + 1, 3 * 3 + 1)
    assert torch.equal(grid[:, 1:3, 4:6], images[1])
    assert grid[:, 0].sum() == 0 and grid[:, :, 0].sum() == 0


@pytest.mark.parametrize("channels", [1, 3])
def test_png_holds_the_grid(tmp_path: Path, channels: int) -> None:
    grid = torch.randint(0, 256, (channels, 7, 9), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = tmp_path / "sub" / "grid.png"  # the folder is made
    save_png(grid, path)
    image = Image.open(path)
    assert image.mode == ("L" if channels == 1 else "RGB") and image.size == (9, 7)
    array = np.asarray(image)
    back = torch.from_numpy(np.array(array[None] if channels == 1 else array.transpose(2, 0, 1)))
    assert torch.equal(back, grid)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left


def test_npz_holds_grey_images_without_their_channel_axis(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (4, 1, 5, 6), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    save_npz(images, tmp_path / "grey.npz")
    with np.load(tmp_path / "grey.npz") as saved:
        assert list(saved) == ["images"]
        array = saved["images"]
    assert array.dtype == np.uint8 and array.shape == (4, 5, 6)
    assert np.array_equal(array, images[:, 0].numpy())


def test_npz_holds_colour_images_channels_first(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (2, 3, 5, 6), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    save_npz(images, tmp_path / "colour.npz")
    with np.load(tmp_path / "colour.npz") as saved:
        array = saved["images"]
    assert array.dtype == np.uint8 and array.shape == (2, 3, 5, 6)
    assert np.array_equal(array, images.numpy())
