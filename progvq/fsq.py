"""Finite scalar quantiser (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Instead of a learned codebook, every one of the D channels of the encoder
output is squashed into a bounded interval and rounded to one of ``L_i``
integer levels; the codes are the points of the product grid, so there are
``K = L_1 * ... * L_D`` of them and nothing to learn, initialise, restart or
keep in sync between ranks.

Per channel with ``L`` levels and ``m = floor(L / 2)``:

* **Bound.** ``f(z) = m * tanh(z + s) - o``, with ``o = 0`` and ``s = 0`` for odd
  ``L`` (the paper's ``floor(L/2) * tanh(z)``) and ``o = 1/2``,
  ``s = atanh(1 / (2m))`` for even ``L``.
* **Round** ``q = round(f(z))``, clamped to the ``L`` integers ``-m .. L - 1 - m``,
  with a straight-through gradient: the forward value is the grid point, the
  backward pass sees ``f``.
* **Normalise** ``q / m``: grid values in ``[-1, 1]`` (for odd ``L`` symmetric,
  ``-1 .. 1``; for even ``L`` ``-1 .. (m - 1) / m``).

Why even ``L`` needs the offset: ``m * tanh`` spans ``(-m, m)``, which rounds to
the ``2m + 1`` integers ``-m .. m`` -- right for odd ``L = 2m + 1``, one too many
for even ``L = 2m``. Lowering ``f`` by half a step moves its range to
``(-m - 1/2, m - 1/2)``, which rounds to exactly the ``2m`` integers
``-m .. m - 1``. The offset alone would put ``f(0) = -1/2`` on a rounding
boundary, so an encoder output near zero (the usual one at initialisation)
would flip between two codes on noise; shifting tanh's argument by
``s = atanh(1 / (2m))`` restores ``f(0) = 0``, the middle of code 0's cell,
without changing the range. The ends of that open range are reached in float32
(tanh saturates to exactly +-1 for ``|z|`` above ~9), and for even ``L`` they lie
on the outer rounding boundaries, where round-half-to-even could step outside
the grid (1.5 rounds to 2 when ``L = 4``): the clamp keeps them on the
outermost levels.

Indices are mixed radix over the digits ``q_i + m_i`` in ``[0, L_i)``, the first
channel least significant: ``index = sum_i (q_i + m_i) * prod_{j < i} L_j``.

Shapes: ``forward``/``nearest`` take ``z`` (B, D, H, W); ``indices`` are (B, H, W)
int64 and ``lookup`` maps them back to (B, D, H, W) float32 grid vectors.

The quantiser has no codebook and hence no codebook loss (a constant zero, so that
losses weighted as for :class:`progvq.quantize.VectorQuantizer` still add up). The
paper has no commitment loss either; here ``commit_loss`` is the squared distance, in
z-space, from each value to the centre of its code's cell (see ``_commit``), which
keeps the encoder off tanh's flat ends; a ``commit`` weight of 0 is the paper's FSQ. It keeps no state, so
under ``torch.distributed`` the ranks need no synchronisation; the per-batch
usage figures (perplexity, codes used) are then those of the rank's own slice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .quantize import QuantizerOutput, _histogram_stats

__all__ = ["FSQConfig", "FiniteScalarQuantizer"]


@dataclass
class FSQConfig:
    """``quantizer: {kind: fsq, levels: [8, 5, 5, 5]}``: no codebook, no codebook loss, no restarts."""

    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # values per channel; codes: their product

    @property
    def num_codes(self) -> int:
        return math.prod(self.levels)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, what it must be) for every value out of range."""
        if not self.levels or any(level < 2 for level in self.levels):
            return [("levels", self.levels, "a non-empty list of integers >= 2")]
        if self.num_codes > 2**24:
            return [("levels", self.levels, f"at most 2**24 codes in all (product {self.num_codes})")]
        return []

    def build(self) -> FiniteScalarQuantizer:
        return FiniteScalarQuantizer(self.levels)


class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantiser with ``levels[i]`` integer levels in channel ``i``.

    ``levels`` per channel, each >= 2, e.g. ``[8, 5, 5, 5]`` (1000 codes, dim 4), are
    kept as a tuple of ints in ``levels``; ``num_codes`` is the number of codes K, the
    product of the levels, and ``dim`` the number of channels D the encoder must
    output, ``len(levels)``.
    """

    radix: Tensor  # (D,) int64 levels per channel
    basis: Tensor  # (D,) int64 place value of each channel's digit in an index

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        levels = tuple(levels)
        if not levels or any(isinstance(n, bool) or int(n) != n or n < 2 for n in levels):
            raise ValueError(f"levels must be a non-empty sequence of integers >= 2, got {levels}")
        self.levels: tuple[int, ...] = tuple(int(n) for n in levels)
        self.num_codes: int = math.prod(self.levels)
        self.dim: int = len(self.levels)
        basis = [math.prod(self.levels[:i]) for i in range(self.dim)]
        # Integer buffers: they follow the module between devices, and a cast of the whole
        # model to another float dtype leaves them alone, so the grid stays exact. Not
        # persistent: they are a function of the constructor's argument, not learned state.
        self.register_buffer("radix", torch.tensor(self.levels, dtype=torch.long), persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, num_codes={self.num_codes}, dim={self.dim}"

    # ------------------------------------------------------------------ public

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise ``z`` (B, D, H, W); straight-through, so d quantized / dz = d(f(z) / m) / dz.

        Returns ``quantized`` (B, D, H, W) in ``z``'s dtype, ``indices`` (B, H, W) int64,
        zero losses and this batch's perplexity and number of codes used.
        """
        self._check_input(z)
        # Rounding needs float32: bf16 resolves only ~3 significant digits, so f would land on
        # the wrong side of a rounding boundary far more often than the input's own error.
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded, q, half = self._quantize(z.float())  # (B, D, H, W) twice, (D, 1, 1)
            normalised = bounded / half
            # Written so the forward value is exactly the grid point (z + (q - z).detach()
            # can be off by a rounding error); the gradient is still that of f(z) / m.
            st = (q / half).detach() + (normalised - normalised.detach())
            indices = self._to_index(q, half)
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_codes)
            perplexity, codes_used = _histogram_stats(counts)
            zero = torch.zeros((), device=z.device)
            commit = self._commit(z.float(), q, half)
        return QuantizerOutput(
            quantized=st.to(z.dtype),
            indices=indices,
            codebook_loss=zero,
            commit_loss=commit,
            perplexity=perplexity,
            codes_used=codes_used,
        )

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, H, W) int64 code indices, the same as ``forward``'s; no gradient."""
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            _, q, half = self._quantize(z.float())
            return self._to_index(q, half)

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, H, W) int code indices -> (B, D, H, W) float32 normalised grid vectors.

        The inverse of the index mapping: ``lookup(nearest(z))`` equals ``forward(z).quantized``.
        """
        if indices.ndim != 3:
            raise ValueError(f"expected indices of shape (B, H, W), got {tuple(indices.shape)}")
        if indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be integers, got {indices.dtype}")
        idx = indices.long()
        # One host sync, but an out-of-range index would otherwise decode silently to a
        # wrapped-around code.
        if idx.numel() and bool(((idx < 0) | (idx >= self.num_codes)).any()):
            raise ValueError(f"indices must lie in [0, {self.num_codes})")
        place = torch.div(idx.unsqueeze(1), self.basis.view(-1, 1, 1), rounding_mode="floor")  # (B, D, H, W)
        digits = place % self.radix.view(-1, 1, 1)  # (B, D, H, W) in [0, L_i)
        half, _, _, _ = self._constants()
        return (digits.float() - half) / half

    # ----------------------------------------------------------------- helpers

    def _check_input(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")

    def _constants(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-channel float32 constants, each (D, 1, 1) to broadcast over (B, D, H, W).

        Returns ``m = floor(L / 2)``, the offset ``o`` (1/2 for even L, else 0), the
        argument shift ``s = atanh(o / m)`` and the top integer level ``L - 1 - m``.
        Derived from the integer buffer on every call (D numbers), so they are float32
        whatever dtype the module has been cast to.
        """
        radix = self.radix.view(-1, 1, 1)
        m = torch.div(radix, 2, rounding_mode="floor")
        offset = (radix % 2 == 0).float() * 0.5
        half = m.float()
        return half, offset, torch.atanh(offset / half), (radix - 1 - m).float()

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, D, H, W) float32 -> (f(z), its integer level q, m), the first two (B, D, H, W), m (D, 1, 1).

        ``f(z) = m * tanh(z + s) - o`` lies in the open interval (-m - o, m - o); ``q`` is the
        nearest of the channel's L integers ``-m .. L - 1 - m``, as integer-valued float32.
        """
        half, offset, shift, top = self._constants()
        bounded = half * torch.tanh(z + shift) - offset
        # Only the saturated ends of the open range can round outside the grid (see the
        # module docstring); the clamp puts them on the outermost levels.
        q = torch.clamp(torch.round(bounded), min=-half, max=top)
        return bounded, q, half

    def _commit(self, z: Tensor, q: Tensor, half: Tensor) -> Tensor:
        """Scalar: mean squared distance in z-space from ``z`` (B, D, H, W) to the centre of its code's cell.

        The paper's FSQ has no such term (a ``commit`` weight of 0 gives exactly it). Without it,
        on MNIST the decoder's gradient pushed every position the same way until tanh saturated
        (|z| near 500 within 50 steps), where no gradient comes back, and one code remained. Taken
        in z-space its gradient does not vanish on tanh's flat ends, so z stays where codes change.
        """
        _, offset, shift, _ = self._constants()
        # the cell centre: where the bound hits the code's grid point (the outermost ones kept off +-1)
        target = torch.atanh(((q + offset) / half).clamp(-0.95, 0.95)) - shift
        return (z - target.detach()).pow(2).mean()

    def _to_index(self, q: Tensor, half: Tensor) -> Tensor:
        """(B, D, H, W) integer levels and m (D, 1, 1) -> (B, H, W) int64 mixed-radix indices."""
        digits = (q + half).long()  # (B, D, H, W) in [0, L_i)
        return (digits * self.basis.view(1, -1, 1, 1)).sum(1)
