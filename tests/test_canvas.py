"""The canvas: images of the data's own size placed on the padded one the levels take, and back."""

from __future__ import annotations

import pytest
import torch

from progvq.canvas import Canvas
from progvq.data import pad_to


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (n, c, h, w) with no zero pixel, so the padding is told apart from the image."""
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_canvas_pads_and_crops_as_pad_to() -> None:
    canvas = Canvas((1, 28, 28), (1, 32, 32))
    assert (canvas.top, canvas.left, canvas.dims) == (2, 2, 784)
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    padded = canvas.pad(x)
    assert torch.equal(canvas.crop(padded), x) and padded.sum() == x.sum()
    odd = Canvas((1, 3, 3), (1, 6, 6))  # the odd row and column go below and right
    assert (odd.top, odd.left) == (1, 1)
    mask = odd.pad_mask(torch.ones(3, 3, dtype=torch.bool))
    assert mask.sum() == 9 and mask[1:4, 1:4].all()


@pytest.mark.parametrize(
    ("shape", "padded", "top", "left"),
    [
        ((1, 28, 28), (1, 32, 32), 2, 2),
        ((3, 5, 7), (3, 8, 8), 1, 0),  # odd padding: the extra row goes below
        ((1, 4, 6), (1, 7, 9), 1, 1),  # odd in both: the extra row below, the extra column right
        ((1, 3, 3), (1, 4, 4), 0, 0),
        ((2, 6, 6), (2, 6, 6), 0, 0),
    ],
)
def test_pad_then_crop_is_the_identity_and_the_padding_is_zero(
    shape: tuple[int, int, int],
    padded: tuple[int, int, int],
    top: int,
    left: int,
) -> None:
    canvas = Canvas(shape, padded)
    c, h, w = shape
    assert (canvas.top, canvas.left) == (top, left)
    # what is left of the padding after the image goes below and to the right
    assert padded[1] - h - top in (top, top + 1) and padded[2] - w - left in (left, left + 1)
    images = _images(4, c, h, w)
    out = canvas.pad(images)
    assert out.shape == (4, *padded) and out.dtype == torch.uint8
    assert torch.equal(out[:, :, top : top + h, left : left + w], images)
    assert torch.equal(canvas.crop(out), images)
    assert int((out != 0).sum()) == images.numel()  # every non-zero pixel is the image's
    # the same placement as data.pad_to for a square canvas
    if padded[1] == padded[2]:
        assert torch.equal(out, pad_to(images, padded[1]))


def test_pad_keeps_leading_dims_and_dtype() -> None:
    canvas = Canvas((1, 3, 5), (1, 4, 8))
    x = torch.rand(2, 3, 1, 3, 5, dtype=torch.float64) + 1
    out = canvas.pad(x)
    assert out.shape == (2, 3, 1, 4, 8) and out.dtype == torch.float64
    assert torch.equal(canvas.crop(out), x)
    assert out.sum().item() == pytest.approx(x.sum().item(), rel=1e-12)


def test_crop_is_a_view_of_the_padded_images() -> None:
    canvas = Canvas((1, 2, 2), (1, 4, 4))
    padded = canvas.pad(_images(1, 1, 2, 2))
    canvas.crop(padded)[0, 0, 0, 0] = 0
    assert padded[0, 0, 1, 1] == 0


def test_pad_mask_marks_the_padding_known() -> None:
    canvas = Canvas((1, 3, 4), (1, 6, 7))  # top 1 (two rows below), left 1 (two columns right)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    mask[1] = True
    out = canvas.pad_mask(mask)
    assert out.shape == (2, 6, 7) and out.dtype == torch.bool
    assert torch.equal(out[:, 1:4, 1:5], mask)
    assert int(out.sum()) == int(mask.sum()) == 13  # the padding is never missing
    assert out[0, 1, 1] and not out[0, 0, 0]
    # the pixel mask cropped back is the mask given (masks are (..., H, W), images (..., C, H, W))
    assert torch.equal(canvas.crop(out[:, None])[:, 0], mask)


def test_an_unpadded_canvas_hands_the_images_back() -> None:
    canvas = Canvas.unpadded((3, 4, 4))
    assert canvas.shape == canvas.padded == (3, 4, 4) and not canvas.is_padded
    images = _images(2, 3, 4, 4)
    assert canvas.pad(images) is images
    assert torch.equal(canvas.crop(images), images)
    assert canvas.dims == 48
    assert Canvas((1, 3, 3), (1, 4, 4)).is_padded


def test_to_list_records_both_shapes() -> None:
    assert Canvas((1, 28, 28), (1, 32, 32)).to_list() == {"original_shape": [1, 28, 28], "image_shape": [1, 32, 32]}


def test_refusals() -> None:
    with pytest.raises(ValueError, match="cannot place 1x8x8 images on a 1x4x4 canvas"):
        Canvas((1, 8, 8), (1, 4, 4))
    with pytest.raises(ValueError, match="cannot place 3x4x4 images on a 1x4x4 canvas"):
        Canvas((3, 4, 4), (1, 4, 4))
    canvas = Canvas((1, 3, 3), (1, 4, 4))
    with pytest.raises(ValueError, match=r"pad: expected images of shape \(\.\.\., 1, 3, 3\), got \(2, 1, 4, 4\)"):
        canvas.pad(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"crop: expected images of shape \(\.\.\., 1, 4, 4\), got \(2, 1, 3, 3\)"):
        canvas.crop(torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"pad_mask: expected a \(\.\.\., 3, 3\) mask, got \(4, 4\)"):
        canvas.pad_mask(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pad: expected images"):
        canvas.pad(torch.zeros(3, 3))  # no channel axis
