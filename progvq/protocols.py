"""The small protocols the rest of the code relies on, beside the registries of :mod:`progvq.kinds`.

- :class:`~progvq.quantize.Quantizer`: what a level's quantiser gives (``vq``, ``fsq``).
- :class:`Prior`: what a prior over the top codes gives training, ``eval``, sampling,
  inpainting and compression alike (``pixelcnn``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from .quantize import Quantizer

if TYPE_CHECKING:
    from .pixelcnn import CodeStep

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
        guidance: float = 0.0,
    ) -> Tensor:
        """(n, height, width) int64 codes; ``known`` = (codes, mask) kept where the mask is True; ``guidance``
        w > 0 (class-conditional only) draws from p(code | y)^(1+w) / p(code)^w."""

    def coding_walk(
        self,
        step: CodeStep,
        n: int,
        height: int,
        width: int,
        target: Tensor | None = None,
        label: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The prior as an entropy coder's model: every symbol it codes (a class first, when it has classes,
        then each top code in its order) goes through ``step``; returns (codes (n, height, width) int64,
        labels (n,) or None). ``target`` holds the codes to encode, ``label`` (n,) the class to code with
        them (None: the prior's own choice); None decodes them."""
