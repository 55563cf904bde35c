"""Where the data's own images sit on the padded canvas the convolutions see.

Images whose sides the levels' downsampling does not divide are centred on a
zero canvas (MNIST: 28x28 on 32x32; ``data.size``). The padding is an internal
detail: users give and get images of the data's own size, and every figure is
over the data's own pixels. The bound's bits still include the padding's (so
it bounds -log p of the original image: the padding is a deterministic
function of it, and its likelihood under the model is <= 1), but they are
divided by the original C x H x W; PSNR is taken over the original region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

Shape = tuple[int, int, int]  # (C, H, W)


@dataclass(frozen=True)
class Canvas:
    """The data's own shape (C, H, W) and the padded shape (C, H', W') the models work on."""

    shape: Shape
    padded: Shape

    def __post_init__(self) -> None:
        (c, h, w), (pc, ph, pw) = self.shape, self.padded
        if c != pc or ph < h or pw < w:
            raise ValueError(f"cannot place {c}x{h}x{w} images on a {pc}x{ph}x{pw} canvas")

    @classmethod
    def unpadded(cls, shape: Shape) -> Canvas:
        """A canvas that is the image itself (no padding)."""
        return cls(tuple(shape), tuple(shape))  # type: ignore[arg-type]

    @property
    def top(self) -> int:
        """Rows of padding above the image (the odd row, if any, goes below)."""
        return (self.padded[1] - self.shape[1]) // 2

    @property
    def left(self) -> int:
        """Columns of padding left of the image (the odd column, if any, goes right)."""
        return (self.padded[2] - self.shape[2]) // 2

    @property
    def dims(self) -> int:
        """C x H x W of the data's own images: what every per-dim figure divides by."""
        return math.prod(self.shape)

    @property
    def is_padded(self) -> bool:
        return self.shape != self.padded

    def pad(self, images: Tensor) -> Tensor:
        """(..., C, H, W) -> (..., C, H', W'), the image centred on zeros (any dtype)."""
        self._check(images, self.shape, "pad")
        if not self.is_padded:
            return images
        out = images.new_zeros((*images.shape[:-2], *self.padded[1:]))
        out[..., self.top : self.top + self.shape[1], self.left : self.left + self.shape[2]] = images
        return out

    def crop(self, images: Tensor) -> Tensor:
        """(..., C, H', W') -> (..., C, H, W): the original region of padded images (a view)."""
        self._check(images, self.padded, "crop")
        return images[..., self.top : self.top + self.shape[1], self.left : self.left + self.shape[2]]

    def pad_mask(self, mask: Tensor) -> Tensor:
        """A pixel mask (..., H, W) -> (..., H', W'); the padding is False (known: it is always zero)."""
        if tuple(mask.shape[-2:]) != self.shape[1:]:
            raise ValueError(
                f"pad_mask: expected a (..., {self.shape[1]}, {self.shape[2]}) mask, got {tuple(mask.shape)}"
            )
        out = mask.new_zeros((*mask.shape[:-2], *self.padded[1:]))
        out[..., self.top : self.top + self.shape[1], self.left : self.left + self.shape[2]] = mask
        return out

    def to_list(self) -> dict[str, list[int]]:
        """Plain values for a checkpoint or a run config."""
        return {"original_shape": list(self.shape), "image_shape": list(self.padded)}

    @staticmethod
    def _check(images: Tensor, shape: Shape, what: str) -> None:
        if images.dim() < 3 or tuple(images.shape[-3:]) != tuple(shape):
            want = "x".join(map(str, shape))
            raise ValueError(
                f"{what}: expected images of shape (..., {want.replace('x', ', ')}), got {tuple(images.shape)}"
            )
