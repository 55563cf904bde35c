"""Pieces every stage kind shares."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from progvq.quantize import QuantizerOutput


def quantizer_metrics(quant: QuantizerOutput) -> dict[str, Tensor]:
    """Codebook usage figures of one training batch."""
    return {"perplexity": quant.perplexity.detach(), "codes_used": quant.codes_used.float()}


def pairs_grid(originals: Tensor, recon: Tensor, per_row: int = 8) -> Tensor:
    """Interleave rows of originals and reconstructions: (N, C, H, W) x 2 -> (2N, C, H, W)."""
    rows = []
    for i in range(0, len(originals), per_row):
        rows += [originals[i : i + per_row].cpu(), recon[i : i + per_row].cpu()]
    return torch.cat(rows)


def uniform_rate(grid: tuple[int, int], codes: int, image_shape: tuple[int, int, int]) -> float:
    """Bits/dim of an image spent on a (h, w) grid of codes under the fixed uniform prior: log2 K per position.

    ``image_shape`` is the data's own (C, H, W), not the padded one: figures are per original dim.
    """
    return grid[0] * grid[1] * math.log2(codes) / math.prod(image_shape)
