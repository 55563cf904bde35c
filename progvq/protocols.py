"""The small protocols the rest of the code relies on, beside the registries of :mod:`progvq.kinds`.

- :class:`~progvq.quantize.Quantizer`: what a level's quantiser gives (``vq``, ``fsq``).
- :class:`Prior`: what a prior over the top codes gives training, ``eval``, sampling and
  inpainting alike (``pixelcnn``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .quantize import Quantizer

__all__ = ["Prior", "Quantizer"]


class Prior(Protocol):
    """What every prior kind gives training, ``eval``, sampling and inpainting."""

    num_codes: int  # codes of the top level
    num_classes: int  # classes of a class-conditional prior; 0 when unconditional

    def log_prob(self, codes: Tensor, label: Tensor | None = None) -> Tensor:
        """(B,) nats of top-level grids (B, h, w); without labels a class-conditional prior's marginal."""

    def log_prob_per_position(self, codes: Tensor, label: Tensor | None = None) -> Tensor:
        """(B, h, w) nats of each code given the codes before it."""

    def sample(
        self,
        n: int,
        height: int,
        width: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        label: Tensor | None = None,
        known: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """(n, height, width) int64 codes; ``known`` = (codes, mask) kept where the mask is True."""
