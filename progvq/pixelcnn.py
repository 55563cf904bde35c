"""Gated PixelCNN prior over a grid of discrete codes.

After van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders": a vertical stack sees every row above the current one, a horizontal
stack sees the current row up to the current column, and gated activations
``tanh(a) * sigmoid(b)`` replace ReLUs. The vertical stack feeds the horizontal
one, so the receptive field has no blind spot.

Causality comes from padded and shifted convolutions rather than masked
kernels: a vertical convolution covers rows ``i - k//2 .. i`` of its input and a
horizontal one columns ``j - k//2 .. j``. In the first ("type A") block the
output is shifted down / right by one so a position never sees its own code;
every later ("type B") block may include the centre, because its inputs already
exclude it. The result is exact: ``logits[:, :, i, j]`` is a function of the
codes strictly before ``(i, j)`` in raster order only (plus ``cond``/``label``).

Receptive field with ``L`` layers and ``r = kernel_size // 2``: the output at
``(i, j)`` sees ``L * r + 1`` rows above and ``L * r`` columns either side in
them, and ``L * r + 1`` columns to the left in its own row. The binding limit
is the reach to the right in the rows above, so an ``H x W`` grid is fully
covered (every earlier code reaches every later position) once
``L * r >= max(H - 2, W - 1)``; e.g. 4 layers of kernel 3, or 2 of kernel 5, on
5x5; 7 layers of kernel 3, or 4 of kernel 5, on 8x8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _shift_down(x: Tensor) -> Tensor:
    """Move every row down by one, filling row 0 with zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def _shift_right(x: Tensor) -> Tensor:
    """Move every column right by one, filling column 0 with zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def _gate(x: Tensor) -> Tensor:
    """Gated activation: (B, 2C, H, W) -> (B, C, H, W)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class _StackConv(nn.Module):
    """Convolution for one stack, causal by padding on one side only.

    Vertical: output row ``i`` sees input rows ``i - r .. i``, columns ``j - r .. j + r``.
    Horizontal: output ``(i, j)`` sees input ``(i, j - r .. j)``.
    With ``exclude_centre`` the output is shifted by one so row ``i`` (vertical)
    or column ``j`` (horizontal) itself is excluded: the type-A case.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        vertical: bool,
        exclude_centre: bool,
    ) -> None:
        super().__init__()
        r = kernel_size // 2
        kernel = (r + 1, kernel_size) if vertical else (1, r + 1)
        # F.pad order: (left, right, top, bottom); nothing below or to the right.
        self.pad = (r, r, r, 0) if vertical else (r, 0, 0, 0)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel)
        shift = _shift_down if vertical else _shift_right
        self.shift = shift if exclude_centre else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        y = self.conv(F.pad(x, self.pad))
        return self.shift(y) if self.shift is not None else y


class _GatedBlock(nn.Module):
    """One gated layer: a vertical and a horizontal stack, plus a skip output."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        type_a: bool,
        dropout: float,
        cond_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        c = channels
        self.v_conv = _StackConv(c, 2 * c, kernel_size, vertical=True, exclude_centre=type_a)
        self.h_conv = _StackConv(c, 2 * c, kernel_size, vertical=False, exclude_centre=type_a)
        # The vertical features at row i only cover rows < i, so they may enter
        # the horizontal stack at (i, j) without a further shift.
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.skip = nn.Conv2d(c, c, 1)
        # Type A has no horizontal residual: its input at (i, j) is the code at (i, j).
        self.residual = not type_a
        self.dropout = nn.Dropout(dropout)
        # Conditioning is not autoregressive, so it needs no masking; one
        # projection serves both stacks (first 2C channels vertical, rest horizontal).
        self.cond_proj = nn.Conv2d(cond_channels, 4 * c, 1) if cond_channels else None
        self.label_bias = nn.Embedding(num_classes, 4 * c) if num_classes else None

    def forward(self, v: Tensor, h: Tensor, cond: Tensor | None, label: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """v, h (B, C, H, W); cond (B, cond_channels, H, W); label (B,) -> (v, h, skip), each (B, C, H, W)."""
        # Conditioning enters as an additive bias on the pre-activations of both stacks.
        terms = []
        if self.cond_proj is not None and cond is not None:
            terms.append(self.cond_proj(cond))  # (B, 4C, H, W)
        if self.label_bias is not None and label is not None:
            terms.append(self.label_bias(label)[:, :, None, None])  # (B, 4C, 1, 1)
        v_bias, h_bias = sum(terms).chunk(2, dim=1) if terms else (0.0, 0.0)

        v_pre = self.v_conv(v) + v_bias  # (B, 2C, H, W)
        h_pre = self.h_conv(h) + self.v_to_h(v_pre) + h_bias  # (B, 2C, H, W)
        v = self.dropout(_gate(v_pre))
        g = self.dropout(_gate(h_pre))  # (B, C, H, W)
        h_new = self.h_out(g)
        return v, h + h_new if self.residual else h_new, self.skip(g)


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(codes) = prod_ij p(code_ij | codes before (i, j) in raster order).

    Args:
        num_codes: codebook size K; codes are integers in ``[0, K)``.
        channels: width C of both stacks.
        layers: number of gated blocks (the first is type A).
        kernel_size: odd kernel size; each block grows the receptive field by ``kernel_size // 2``.
        dropout: dropout on the gated outputs inside every block.
        cond_channels: channels of an optional spatial conditioning map (0: none).
        num_classes: number of classes for an optional class label (0: none).
    """

    def __init__(
        self,
        num_codes: int,
        *,
        channels: int = 64,
        layers: int = 6,
        kernel_size: int = 3,
        dropout: float = 0.0,
        cond_channels: int = 0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if num_codes < 2 or channels < 1 or layers < 1:
            raise ValueError(f"need num_codes >= 2, channels >= 1, layers >= 1; got {num_codes}, {channels}, {layers}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.num_codes = num_codes
        self.cond_channels = cond_channels
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_codes, channels)
        self.blocks = nn.ModuleList(
            _GatedBlock(
                channels,
                kernel_size,
                type_a=i == 0,
                dropout=dropout,
                cond_channels=cond_channels,
                num_classes=num_classes,
            )
            for i in range(layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(),
            nn.Conv2d(channels, num_codes, 1),
        )

    def forward(self, codes: Tensor, cond: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """codes (B, H, W) int64 -> logits (B, num_codes, H, W)."""
        if codes.dim() != 3 or codes.dtype != torch.long:
            raise ValueError(f"codes must be (B, H, W) int64, got {tuple(codes.shape)} {codes.dtype}")
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, C, H, W)
        return self.forward_embedded(x, cond, label)

    def forward_embedded(self, x: Tensor, cond: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """Logits from already-embedded codes: x (B, C, H, W) float -> (B, num_codes, H, W).

        Exposed so tests (and analyses) can differentiate with respect to the input.
        """
        self._check_conditioning(x, cond, label)
        v, h = x, x
        skips = 0.0
        for block in self.blocks:
            v, h, skip = block(v, h, cond, label)
            skips = skips + skip
        return self.head(skips)

    def _check_conditioning(self, x: Tensor, cond: Tensor | None, label: Tensor | None) -> None:
        b, _, height, width = x.shape
        if self.cond_channels:
            if cond is None or cond.shape != (b, self.cond_channels, height, width):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must be {(b, self.cond_channels, height, width)}, got {got}")
        elif cond is not None:
            raise ValueError("cond given but the model was built with cond_channels=0")
        if self.num_classes:
            if label is None or label.shape != (b,):
                raise ValueError(f"label must be ({b},), got {None if label is None else tuple(label.shape)}")
        elif label is not None:
            raise ValueError("label given but the model was built with num_classes=0")

    @torch.no_grad()
    def sample(
        self,
        n: int,
        height: int,
        width: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        cond: Tensor | None = None,
        label: Tensor | None = None,
    ) -> Tensor:
        """Draw ``n`` code grids, (n, height, width) int64, one position at a time in raster order.

        ``temperature`` divides the logits; 0 means argmax. ``cond`` is (n, cond_channels,
        height, width) and ``label`` (n,) when the model uses them. Runs in eval mode
        (no dropout) and restores the caller's mode afterwards.

        This is the plain sampler: the whole network runs once per position,
        O(height * width) forward passes. A cached incremental sampler can replace
        the body behind the same signature.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.embed.weight.device
        codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
        # Remember every submodule's mode, not just the top one, so a caller's
        # mixed setting (e.g. some parts frozen in eval) survives sampling.
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            for i in range(height):
                for j in range(width):
                    logits = self(codes, cond, label)[:, :, i, j]  # (n, num_codes)
                    codes[:, i, j] = _draw(logits, temperature, generator)
        finally:
            for module, training in modes:
                module.training = training
        return codes


def _draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One code per row of logits (n, K) -> (n,) int64; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=1)
    probs = F.softmax(logits.float() / temperature, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def bits_per_code(logits: Tensor, codes: Tensor) -> Tensor:
    """Mean cross-entropy in bits: logits (B, K, H, W), codes (B, H, W) int64 -> scalar."""
    return F.cross_entropy(logits, codes) / math.log(2)
