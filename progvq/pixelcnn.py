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
``L * r >= max(H - 2, W - 1)`` (a single row: ``L * r >= W - 2``); e.g. 4 layers of kernel 3, or 2 of kernel 5, on
5x5; 7 layers of kernel 3, or 4 of kernel 5, on 8x8 (:func:`covers`). A model
that does not cover its grid is still causal, but a code then ignores the
earlier codes beyond its reach; the autoregressive decoders of
:mod:`progvq.levels` are refused in that case (the prior is not: its grid
is small and its configs predate the check).

Sampling (``GatedPixelCNN.sample``) has two interchangeable methods that
return the same codes for the same generator state. ``"naive"`` runs the whole
network once per position. ``"cached"`` (the default) is the incremental
sampler of Ramachandran et al. 2017, "Fast Generation for Convolutional
Autoregressive Models", specialised to this architecture: every layer's
vertical stack at row ``i`` depends only on codes in rows ``< i``, so once row
``i - 1`` is drawn it is computed for the whole row at once from a cache of the
last ``r + 1`` rows of each layer's vertical input; then, column by column, the
horizontal stacks, skips and head are evaluated at the single position
``(i, j)`` from a cache of the current row of each layer's horizontal input.
Each layer output is computed once, so a whole sample costs about one forward
pass of arithmetic. It uses the module's own weights (no extra parameters), so
checkpoints are the same for both. Both methods can keep given codes fixed
(``known``, for inpainting) and condition the rest on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PixelCNNConfig:
    """A gated PixelCNN's shape, for both of its users: the prior (``stages.prior.pixelcnn``) and an
    autoregressive level decoder (``decoder: {kind: autoregressive, pixelcnn: ...}``). The only defaults.
    """

    channels: int = 64  # width of both stacks (and of a decoder's z_k conditioning map)
    layers: int = 4  # gated blocks; layers * (kernel_size // 2) should cover the grid (see covers)
    kernel_size: int = 5
    dropout: float = 0.0  # on the gated outputs inside every block

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, what it must be) for every value out of range."""
        out = [(key, getattr(self, key), ">= 1") for key in ("channels", "layers") if getattr(self, key) < 1]
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            out.append(("kernel_size", self.kernel_size, "odd and >= 3"))
        if not 0 <= self.dropout < 1:
            out.append(("dropout", self.dropout, "in [0, 1)"))
        return out


def reach_needed(height: int, width: int) -> int:
    """The ``layers * (kernel_size // 2)`` that a ``height x width`` grid needs to be covered (module docstring).

    A single row has no rows above, so only its own row's reach of ``L r + 1`` columns counts.
    """
    return max(0, width - 2) if height == 1 else max(height - 2, width - 1)


def covers(height: int, width: int, layers: int, kernel_size: int) -> bool:
    """Whether every position of a ``height x width`` grid sees every earlier position."""
    return layers * (kernel_size // 2) >= reach_needed(height, width)


def layers_to_cover(height: int, width: int, kernel_size: int) -> int:
    """The fewest layers of ``kernel_size`` that :func:`covers` a ``height x width`` grid (at least 1)."""
    return max(1, math.ceil(reach_needed(height, width) / (kernel_size // 2)))


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

    def conditioning_bias(self, cond: Tensor | None, label: Tensor | None) -> Tensor | None:
        """Additive pre-activation bias: (B, 4C, H, W), or (B, 4C, 1, 1) from a label alone, or None.

        Channels ``[:2C]`` go to the vertical stack, ``[2C:]`` to the horizontal one.
        """
        terms = []
        if self.cond_proj is not None and cond is not None:
            terms.append(self.cond_proj(cond))  # (B, 4C, H, W)
        if self.label_bias is not None and label is not None:
            terms.append(self.label_bias(label)[:, :, None, None])  # (B, 4C, 1, 1)
        return sum(terms) if terms else None

    def forward(self, v: Tensor, h: Tensor, cond: Tensor | None, label: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """v, h (B, C, H, W); cond (B, cond_channels, H, W); label (B,) -> (v, h, skip), each (B, C, H, W)."""
        # Conditioning enters as an additive bias on the pre-activations of both stacks.
        bias = self.conditioning_bias(cond, label)
        v_bias, h_bias = bias.chunk(2, dim=1) if bias is not None else (0.0, 0.0)

        v_pre = self.v_conv(v) + v_bias  # (B, 2C, H, W)
        h_pre = self.h_conv(h) + self.v_to_h(v_pre) + h_bias  # (B, 2C, H, W)
        v = self.dropout(_gate(v_pre))
        g = self.dropout(_gate(h_pre))  # (B, C, H, W)
        h_new = self.h_out(g)
        return v, h + h_new if self.residual else h_new, self.skip(g)


#: One step of a model's decode order, as an entropy coder sees it (the ``coding_walk`` methods here and in
#: :mod:`progvq.levels`): ``step(logits (n, K), true (n,) int64 or None) -> (n,) int64``. The logits (any
#: float; log-probabilities up to a constant per row) are the model's distribution over the step's n symbols.
#: Encoding, ``true`` holds their values and the coder writes and returns them; decoding, ``true`` is None
#: and the coder returns the symbols it reads. Either way the walk goes on with what ``step`` returns.
CodeStep = Callable[[Tensor, Tensor | None], Tensor]


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(codes) = prod_ij p(code_ij | codes before (i, j) in raster order).

    Codes are integers in ``[0, num_codes)``, the codebook size K. ``channels`` is the
    width C of both stacks and ``layers`` the number of gated blocks (the first is type
    A); each block grows the receptive field by ``kernel_size // 2`` (an odd kernel
    size). ``dropout`` acts on the gated outputs inside every block. ``cond_channels``
    are the channels of an optional spatial conditioning map and ``num_classes`` the
    classes of an optional class label (0: none, for either). ``outputs`` (0: ``num_codes``)
    is the width of the head: logits over the codes, or the parameters of another
    distribution over them, which :meth:`sample` turns into logits with ``to_logits``.

    ``code_channels`` > 1 makes every position hold that many codes (an image's colour channels):
    code grids are then (B, H, W, code_channels) int64, each channel has its own embedding of the
    ``num_codes`` values (rows ``c * num_codes ..`` of one table) and a position's input is their
    sum, and the head's output at a position is one distribution over all its channels, which a
    caller's ``choose`` (:meth:`fill`) turns into the channels' codes. The sum costs no
    generality: a concatenation of narrower embeddings followed by the first layer's linear maps
    is a special case of it (each channel's table may keep to its own slice of the width), and it
    keeps the stacks' width and one input row per position in the cached sampler.
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
        outputs: int = 0,
        code_channels: int = 1,
    ) -> None:
        super().__init__()
        if num_codes < 2 or channels < 1 or layers < 1:
            raise ValueError(f"need num_codes >= 2, channels >= 1, layers >= 1; got {num_codes}, {channels}, {layers}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.num_codes = num_codes
        self.cond_channels = cond_channels
        self.num_classes = num_classes
        self.code_channels = code_channels
        # one table for all channels (rows c * num_codes + code), so a one-channel model's is as it always was
        self.embed = nn.Embedding(num_codes * code_channels, channels)
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
            nn.Conv2d(channels, outputs or num_codes, 1),
        )

    #: the last block's horizontal output feeds nothing, so its conv never gets a gradient
    #: (DistributedDataParallel must be told; the trainer asks every module for this)
    unused_parameters = True

    @classmethod
    def from_config(
        cls,
        cfg: PixelCNNConfig,
        num_codes: int,
        *,
        cond_channels: int = 0,
        num_classes: int = 0,
        outputs: int = 0,
        code_channels: int = 1,
    ) -> GatedPixelCNN:
        return cls(
            num_codes,
            channels=cfg.channels,
            layers=cfg.layers,
            kernel_size=cfg.kernel_size,
            dropout=cfg.dropout,
            cond_channels=cond_channels,
            num_classes=num_classes,
            outputs=outputs,
            code_channels=code_channels,
        )

    def _embed_codes(self, codes: Tensor) -> Tensor:
        """Code grids (B, H, W) or (B, H, W, code_channels) int64 -> inputs (B, H, W, channels)."""
        if self.code_channels == 1:
            return self.embed(codes)
        offsets = torch.arange(self.code_channels, device=codes.device) * self.num_codes
        return self.embed(codes + offsets).sum(-2)

    def log_prob_per_position(self, codes: Tensor, label: Tensor | None = None) -> Tensor:
        """(B, H, W) nats: log p(code at (i, j) | the codes before it[, label]), in the module's mode."""
        return code_log_prob(self(codes, label=label), codes)

    def log_prob(self, codes: Tensor, label: Tensor | None = None) -> Tensor:
        """(B,) nats of whole grids (B, H, W): log p(codes | label), or for a class-conditional
        model without labels the marginal log mean_y p(codes | y) over its classes (uniform p(y)).
        """
        if label is not None or not self.num_classes:
            return self.log_prob_per_position(codes, label).flatten(1).sum(1)
        per_class = torch.stack(
            [
                self.log_prob(codes, torch.full((len(codes),), y, dtype=torch.long, device=codes.device))
                for y in range(self.num_classes)
            ],
            dim=1,
        )  # (B, classes)
        return torch.logsumexp(per_class, dim=1) - math.log(self.num_classes)

    def forward(self, codes: Tensor, cond: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """codes (B, H, W) int64 -> logits (B, num_codes, H, W) (or the head's ``outputs``);
        with ``code_channels`` > 1, codes (B, H, W, code_channels)."""
        shape = "(B, H, W)" if self.code_channels == 1 else f"(B, H, W, {self.code_channels})"
        wanted = 3 if self.code_channels == 1 else 4
        if codes.dim() != wanted or codes.dtype != torch.long or (wanted == 4 and codes.shape[3] != self.code_channels):
            raise ValueError(f"codes must be {shape} int64, got {tuple(codes.shape)} {codes.dtype}")
        x = self._embed_codes(codes).permute(0, 3, 1, 2)  # (B, C, H, W)
        return self.forward_embedded(x, cond, label)

    def forward_embedded(self, x: Tensor, cond: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """Logits from already-embedded codes: x (B, C, H, W) float -> (B, num_codes, H, W).

        Exposed so tests (and analyses) can differentiate with respect to the input.
        """
        b, _, height, width = x.shape
        self._check_conditioning(b, height, width, cond, label)
        v, h = x, x
        skips = 0.0
        for block in self.blocks:
            v, h, skip = block(v, h, cond, label)
            skips = skips + skip
        return self.head(skips)

    def _check_conditioning(self, b: int, height: int, width: int, cond: Tensor | None, label: Tensor | None) -> None:
        """Raise ValueError unless cond is (b, cond_channels, height, width) and label (b,) exactly when used."""
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
        known: tuple[Tensor, Tensor] | None = None,
        method: Literal["cached", "naive"] = "cached",
        to_logits: Callable[[Tensor], Tensor] | None = None,
        guidance: float = 0.0,
    ) -> Tensor:
        """Draw ``n`` code grids, (n, height, width) int64, one position at a time in raster order.

        ``temperature`` divides the logits; 0 means argmax. ``cond`` is (n, cond_channels,
        height, width) and ``label`` (n,) when the model uses them. Runs in eval mode
        (no dropout) and restores the caller's mode afterwards.

        ``known`` = (codes (n, height, width) int64, mask (n, height, width) bool) fixes
        the codes where ``mask`` is True (inpainting): they are kept, and every later
        position is conditioned on them. A code is still drawn for the whole batch at
        every position and then overwritten where known, so the generator advances
        exactly as without ``known``: the free positions of two calls with the same
        seed see the same random numbers whatever is known.

        ``method="naive"`` runs the whole network once per position, O(height * width)
        forward passes; ``"cached"`` (default) computes each layer output once (see the
        module docstring), about one forward pass of arithmetic. Both draw in the same
        order from the same generator calls, so for the same seed they return the same
        codes. They compute the logits by different summation orders, so in float32
        a draw could differ if a random number lands within rounding (~1e-6 relative)
        of a decision boundary; this has probability of order 1e-6 per draw.

        ``to_logits`` maps the head's output at one position, (n, outputs), to logits
        (n, num_codes) before the draw; needed when the head gives another distribution's
        parameters (``outputs``).

        ``guidance`` w > 0 (a class-conditional model, given ``label``) draws each code from
        p(code | y, before)^(1 + w) / p(code | before)^w, renormalised: the class's own
        distribution sharpened towards the codes that tell its class from the others (classifier-
        free guidance, with the unconditional p(code | before) = sum_y' p(y' | before)
        p(code | y', before) computed exactly from the model itself: every class is run beside
        each sample, and p(y' | before) follows from the codes drawn so far under a uniform p(y')).
        It costs ``num_classes`` times the arithmetic of a draw; w = 0 is the plain draw.
        """
        self._one_channel("sample")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not guidance >= 0 or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
        if guidance > 0:
            if not self.num_classes or label is None:
                raise ValueError("guidance needs a class-conditional model and labels")
            return self._sample_guided(
                n, height, width, temperature, generator, cond, label, known, method, to_logits, guidance
            )
        if method not in ("cached", "naive"):
            raise ValueError(f"method must be 'cached' or 'naive', got {method!r}")
        device = self.embed.weight.device
        self._check_conditioning(n, height, width, cond, label)
        if known is not None:
            self._check_known(known, n, height, width)

        def choose(logits: Tensor, i: int, j: int) -> Tensor:
            if to_logits is not None:
                logits = to_logits(logits)
            return _pick(logits, i, j, temperature, generator, known)

        codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
        self._fill(codes, cond, label, choose, method)
        return codes

    def _one_channel(self, method: str) -> None:
        """Raise ValueError for a model with several codes per position: one categorical per position
        cannot choose them, its caller's ``choose`` must (:meth:`fill`)."""
        if self.code_channels > 1:
            raise ValueError(f"{method} draws one code per position; with {self.code_channels} use fill")

    @torch.no_grad()
    def fill(
        self,
        n: int,
        height: int,
        width: int,
        choose: Callable[[Tensor, int, int], Tensor],
        *,
        cond: Tensor | None = None,
        label: Tensor | None = None,
        method: Literal["cached", "naive"] = "cached",
    ) -> Tensor:
        """Code grids chosen position by position in raster order by the caller: (n, height, width) int64,
        or (n, height, width, code_channels).

        ``choose(out (n, outputs), i, j)`` gets the head's output at ``(i, j)`` given the codes chosen
        before it and returns the codes there, (n,) or (n, code_channels) int64: drawn, or an entropy
        coder's symbols (what :meth:`sample` and :meth:`walk` do for one code per position).
        ``cond``, ``label`` and ``method`` as in :meth:`sample`; eval-mode arithmetic.
        """
        self._check_conditioning(n, height, width, cond, label)
        extra = () if self.code_channels == 1 else (self.code_channels,)
        codes = torch.zeros(n, height, width, *extra, dtype=torch.long, device=self.embed.weight.device)
        self._fill(codes, cond, label, choose, method)
        return codes

    def _fill(
        self,
        codes: Tensor,
        cond: Tensor | None,
        label: Tensor | None,
        choose: Callable[[Tensor, int, int], Tensor],
        method: Literal["cached", "naive"],
    ) -> None:
        """Fill ``codes`` (n, height, width[, code_channels]) int64 in raster order with
        ``choose(logits (n, outputs), i, j)``, in eval mode, by the cached loop or one forward pass per
        position (``method``)."""
        n, height, width = codes.shape[:3]
        # Remember every submodule's mode, not just the top one, so a caller's
        # mixed setting (e.g. some parts frozen in eval) survives sampling.
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            if method == "naive":
                for i in range(height):
                    for j in range(width):
                        codes[:, i, j] = choose(self(codes, cond, label)[:, :, i, j], i, j)
            else:
                self._run_cached(n, height, width, cond, label, choose, codes)
        finally:
            for module, training in modes:
                module.training = training

    def _sample_guided(
        self,
        n: int,
        height: int,
        width: int,
        temperature: float,
        generator: torch.Generator | None,
        cond: Tensor | None,
        label: Tensor,
        known: tuple[Tensor, Tensor] | None,
        method: Literal["cached", "naive"],
        to_logits: Callable[[Tensor], Tensor] | None,
        guidance: float,
    ) -> Tensor:
        """:meth:`sample` with ``guidance`` > 0: each sample drawn beside a copy of it under every class."""
        self._check_conditioning(n, height, width, cond, label)
        classes = self.num_classes
        every = torch.arange(classes, device=label.device).repeat(n)  # (n C,): sample-major, every class
        wide_cond = cond.repeat_interleave(classes, dim=0) if cond is not None else None
        rows = torch.arange(n, device=label.device)
        # log p(codes drawn so far | y), (n, C), in float64: it sums up to height * width terms
        so_far = torch.zeros(n, classes, dtype=torch.float64, device=label.device)

        def to_guided(out: Tensor) -> Tensor:
            logits = to_logits(out) if to_logits is not None else out
            logp = F.log_softmax(logits.double(), dim=1).view(n, classes, -1)  # (n, C, K)
            posterior = F.log_softmax(so_far, dim=1)  # log p(y | codes so far), uniform p(y)
            marginal = torch.logsumexp(posterior[:, :, None] + logp, dim=1)  # (n, K)
            asked = logp[rows, label]  # (n, K)
            return asked + guidance * (asked - marginal)

        def record(out: Tensor, drawn: Tensor) -> Tensor:
            logits = to_logits(out) if to_logits is not None else out
            logp = F.log_softmax(logits.double(), dim=1).view(n, classes, -1)
            so_far.add_(logp.gather(2, drawn[:, None, None].expand(n, classes, 1))[:, :, 0])
            return drawn.repeat_interleave(classes)  # every class's copy goes on with the same code

        wide = torch.zeros(n * classes, height, width, dtype=torch.long, device=self.embed.weight.device)
        narrow = wide.view(n, classes, height, width)[:, 0]

        def choose(out: Tensor, i: int, j: int) -> Tensor:
            drawn = _pick(to_guided(out), i, j, temperature, generator, known)
            return record(out, drawn)

        self._fill(wide, wide_cond, every, choose, method)
        return narrow.clone()

    @torch.no_grad()
    def walk(
        self,
        n: int,
        height: int,
        width: int,
        step: CodeStep,
        target: Tensor | None = None,
        *,
        cond: Tensor | None = None,
        label: Tensor | None = None,
        to_logits: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The cached sampler's loop with ``step`` (:data:`CodeStep`) choosing every position: codes (n, height, width).

        ``target`` (n, height, width) int64 are the true codes when encoding (None when decoding);
        ``cond``, ``label`` and ``to_logits`` as in :meth:`sample`. Encoding and decoding make the
        very same calls on tensors of the same shapes, fed the same codes, so they see bit-identical
        logits (a teacher-forced ``forward`` would round differently). Eval-mode arithmetic.
        """
        self._one_channel("walk")
        self._check_conditioning(n, height, width, cond, label)
        codes = torch.zeros(n, height, width, dtype=torch.long, device=self.embed.weight.device)

        def choose(out: Tensor, i: int, j: int) -> Tensor:
            logits = to_logits(out) if to_logits is not None else out
            return step(logits, None if target is None else target[:, i, j])

        self._run_cached(n, height, width, cond, label, choose, codes)
        return codes

    @torch.no_grad()
    def coding_walk(
        self,
        step: CodeStep,
        n: int,
        height: int,
        width: int,
        target: Tensor | None = None,
        label: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The prior as an entropy coder's model: (top codes (n, height, width) int64, labels (n,) or None).

        A class-conditional prior first codes a class, uniform over its classes; encoding, it takes
        ``label`` (n,) when given (a caller that codes more under the class chooses it), else the
        class under which ``target``'s codes are likeliest, which makes the shortest code (at most
        log2(classes) bits above the marginal -log2 p(codes), and close to it when one class explains
        the codes). Then every position in raster order (:meth:`walk`).
        """
        labels = None
        if self.num_classes:
            best = label if target is not None else None
            if target is not None and best is None:
                per_class = [
                    self.log_prob(target, torch.full((n,), y, dtype=torch.long, device=target.device))
                    for y in range(self.num_classes)
                ]
                best = torch.stack(per_class, dim=1).argmax(1)  # (n,)
            labels = step(self.embed.weight.new_zeros(n, self.num_classes), best)
        return self.walk(n, height, width, step, target, label=labels), labels

    def _check_known(self, known: tuple[Tensor, Tensor], n: int, height: int, width: int) -> None:
        """Raise ValueError unless known = (codes (n, H, W) int64, mask (n, H, W) bool) with valid known codes."""
        codes, mask = known
        shape = (n, height, width)
        if codes.shape != shape or codes.dtype != torch.long:
            raise ValueError(f"known codes must be {shape} int64, got {tuple(codes.shape)} {codes.dtype}")
        if mask.shape != shape or mask.dtype != torch.bool:
            raise ValueError(f"known mask must be {shape} bool, got {tuple(mask.shape)} {mask.dtype}")
        given = codes[mask]
        if given.numel() and (given.min() < 0 or given.max() >= self.num_codes):
            raise ValueError(f"known codes must lie in [0, {self.num_codes})")

    @torch.no_grad()
    def _cached_logits(self, codes: Tensor, cond: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """Teacher-forced run of the cached sampler: codes (B, H, W) int64 (or (B, H, W, code_channels))
        -> logits (B, num_codes, H, W) (or the head's ``outputs``).

        Every position takes its code from ``codes`` instead of drawing, and the
        logits the sampler computed there are recorded. By causality this equals
        ``self(codes, cond, label)`` in eval mode (up to rounding); exposed for tests.
        """
        b, height, width = codes.shape[:3]
        self._check_conditioning(b, height, width, cond, label)
        out = self.embed.weight.new_empty(b, self.head[-1].out_channels, height, width)

        def choose(logits: Tensor, i: int, j: int) -> Tensor:
            out[:, :, i, j] = logits
            return codes[:, i, j]

        self._run_cached(b, height, width, cond, label, choose, codes.clone())
        return out

    def _run_cached(
        self,
        n: int,
        height: int,
        width: int,
        cond: Tensor | None,
        label: Tensor | None,
        choose: Callable[[Tensor, int, int], Tensor],
        codes: Tensor,
    ) -> None:
        """Cached incremental sampling loop; fills ``codes`` (n, height, width) int64 in place.

        ``choose(logits (n, num_codes), i, j) -> (n,) int64`` picks the codes at
        ``(i, j)`` ((n, code_channels) when ``code_channels`` > 1; ``codes`` is then
        (n, height, width, code_channels)). Always eval-mode arithmetic (dropout is never applied).

        Caches, all channels last so that a column or a window is a matmul
        operand without copying, for layer ``l`` with ``r = kernel_size // 2``:

        - ``v_cols[l]`` (n, width, r + 1, 2r + 1, C): the ``r + 1`` rows of the
          layer's vertical input that its next output row needs, already unfolded
          (im2col): entry ``(w, s, dx)`` is the input at column ``w + dx - r`` of the
          row in slot ``s``, zero off the grid. Row ``q`` goes to slot ``q % (r + 1)``
          (a ring, with the kernel rows rotated to match), so no cached row is ever
          moved. Layer 0 holds the embedded codes of rows ``i - 1 - r .. i - 1``
          (type A), later layers their input rows ``i - r .. i``.
        - ``h_row[l]`` (n, r + width, C): the layer's horizontal input along the
          current row, after ``r`` zero columns; layer 0's is the embedded codes.
        - ``vh[l]`` (n, width, 2C): for the current row, the part of the horizontal
          pre-activation that does not depend on the row's codes (v_to_h of the
          vertical pre-activation, conditioning, conv bias).
        - ``gates`` (n, L C): every layer's gated horizontal output at the current
          position; all the skip convolutions then run as one matmul.

        The per-position loop dominates the Python overhead, so it only calls
        kernels, writing into buffers and views that are all made up front.
        """
        blocks = list(self.blocks)
        num_layers = len(blocks)
        c = self.embed.weight.shape[1]
        r = blocks[0].h_conv.conv.weight.shape[-1] - 1
        kw = 2 * r + 1
        embedding = self.embed.weight
        offsets = None
        if self.code_channels > 1:
            offsets = torch.arange(self.code_channels, device=embedding.device) * self.num_codes

        def new(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=embedding.dtype, device=embedding.device)

        prep = [_BlockWeights.of(block, cond=cond, label=label, height=height, width=width) for block in blocks]
        first = prep[0]
        # Transposed views, so that each linear map is x @ w (one addmm with the bias).
        # The skip sum over layers is one matmul of the concatenated gates: (n, L C) @ (L C, C).
        skip_w = torch.cat([block.skip.weight[:, :, 0, 0] for block in blocks], dim=1).t()
        skip_b = sum(block.skip.bias for block in blocks)
        head1, head2 = self.head[1], self.head[3]
        w1, b1, w2, b2 = head1.weight[:, :, 0, 0].t(), head1.bias, head2.weight[:, :, 0, 0].t(), head2.bias

        v_cols = [new(n, width, r + 1, kw, c) for _ in range(num_layers)]
        v_cols_2d = [t.view(n * width, -1) for t in v_cols]  # (n W, (r + 1)(2r + 1) C)
        # A new row (n, W, C) is written 2r + 1 times, shifted by dx - r and clipped to the grid.
        shifts = [
            (dx, slice(max(0, r - dx), min(width, width + r - dx)), slice(max(0, dx - r), min(width, width + dx - r)))
            for dx in range(kw)
            if max(0, r - dx) < min(width, width + r - dx)
        ]

        def push_row(layer: int, slot: int, row: Tensor) -> None:
            for dx, to, frm in shifts:
                v_cols[layer][:, to, slot, dx] = row[:, frm]

        h_row = [new(n, r + width, c) for _ in range(num_layers)]
        x_row = h_row[0]
        # Layer k's input window at column j, ((r + 1) C) flattened (strided views, BLAS-compatible),
        # and its input column j. Type A (layer 0) reads code columns j-1-r .. j-1 instead.
        h_win = [[h_row[k][:, j : j + r + 1].reshape(n, -1) for j in range(width)] for k in range(num_layers)]
        h_win[0] = [x_row[:, max(j - 1, 0) : j + r].reshape(n, -1) for j in range(width)]  # entry 0 unused
        h_col = [[h_row[k][:, r + j] for j in range(width)] for k in range(num_layers)]
        vh = [new(n, width, 2 * c) for _ in range(num_layers)]
        vh_2d = [t.view(n * width, 2 * c) for t in vh]
        vh_col = [[t[:, j] for j in range(width)] for t in vh]
        h_pre = new(n, 2 * c)
        h_pre_a, h_pre_b = h_pre[:, :c], h_pre[:, c:]
        vh0_a, vh0_b = vh[0][:, 0, :c], vh[0][:, 0, c:]  # layer 0, column 0: no conv term
        tanh_a, sigmoid_b, h_new, skips, hidden = new(n, c), new(n, c), new(n, c), new(n, c), new(n, c)
        gates = new(n, num_layers * c)
        g_cols = [gates[:, k * c : (k + 1) * c] for k in range(num_layers)]
        zero_v = new(n * width, 2 * c)

        for i in range(height):
            slot = i % (r + 1)
            # Vertical stacks of every layer for the whole of row i (rows < i are final).
            for k, p in enumerate(prep):
                if k == 0 and i == 0:  # type A, row 0: the shifted-in zero row, without the conv bias
                    v_pre = zero_v
                else:
                    # Slot s holds kernel row (s - phase) mod (r + 1): for type A the window
                    # ends at row i - 1, otherwise at row i.
                    phase = slot if k == 0 else (i + 1) % (r + 1)
                    v_pre = torch.addmm(p.v_bias, v_cols_2d[k], p.v_weights[phase])  # (n W, 2C)
                if p.v_cond is not None:
                    v_pre = v_pre + p.v_cond[:, i].reshape(n * width, -1)
                if k + 1 < num_layers:
                    push_row(k + 1, slot, _gate_last(v_pre).view(n, width, c))
                torch.addmm(p.v_to_h_bias, v_pre, p.v_to_h_weight, out=vh_2d[k])
                if p.h_cond is not None:
                    vh[k] += p.h_cond[:, i]
                if k > 0:
                    vh[k] += p.h_bias
                else:  # type A: column 0 is the shifted-in zero, without the conv bias
                    vh[k][:, 1:] += p.h_bias

            # Horizontal stacks, skips and head at the single position (i, j).
            for j in range(width):
                if j > 0:
                    torch.addmm(vh_col[0][j], h_win[0][j], first.h_weight, out=h_pre)
                    a, b = h_pre_a, h_pre_b
                else:
                    a, b = vh0_a, vh0_b
                torch.mul(torch.tanh(a, out=tanh_a), torch.sigmoid(b, out=sigmoid_b), out=g_cols[0])
                if num_layers > 1:  # type A has no residual
                    torch.addmm(first.h_out_bias, g_cols[0], first.h_out_weight, out=h_col[1][j])
                for k in range(1, num_layers):
                    p = prep[k]
                    torch.addmm(vh_col[k][j], h_win[k][j], p.h_weight, out=h_pre)
                    torch.mul(torch.tanh(h_pre_a, out=tanh_a), torch.sigmoid(h_pre_b, out=sigmoid_b), out=g_cols[k])
                    if k + 1 < num_layers:  # the last layer's horizontal output feeds nothing
                        torch.addmm(p.h_out_bias, g_cols[k], p.h_out_weight, out=h_new)
                        torch.add(h_col[k][j], h_new, out=h_col[k + 1][j])
                torch.addmm(skip_b, gates, skip_w, out=skips).relu_()
                torch.addmm(b1, skips, w1, out=hidden).relu_()
                logits = torch.addmm(b2, hidden, w2)  # (n, outputs), fresh: choose may keep it
                chosen = choose(logits, i, j)  # (n,), or (n, code_channels)
                codes[:, i, j] = chosen
                if offsets is None:
                    torch.index_select(embedding, 0, chosen, out=h_col[0][j])
                else:  # the sum of the channels' embeddings, as _embed_codes
                    h_col[0][j].copy_(embedding[chosen + offsets].sum(1))

            # Row i is final: it enters layer 0's vertical cache.
            push_row(0, slot, x_row[:, r:])


class _BlockWeights(NamedTuple):
    """One block's parameters laid out for the cached sampler (views or small copies, made per call).

    ``C`` channels, ``r = kernel_size // 2``, ``n`` samples; weights transposed for ``x @ w``.
    """

    v_weights: list[Tensor]  # r + 1 of ((r + 1)(2r + 1) C, 2C): vertical kernel per ring phase, see ``of``
    v_bias: Tensor  # (2C,)
    h_weight: Tensor  # ((r + 1) C, 2C): horizontal kernel, input index tap * C + channel
    h_bias: Tensor  # (2C,)
    v_to_h_weight: Tensor  # (2C, 2C)
    v_to_h_bias: Tensor  # (2C,)
    h_out_weight: Tensor  # (C, C)
    h_out_bias: Tensor  # (C,)
    v_cond: Tensor | None  # (n, H, W, 2C), possibly an expanded view: vertical conditioning bias
    h_cond: Tensor | None  # (n, H, W, 2C), possibly an expanded view: horizontal conditioning bias

    @classmethod
    def of(
        cls, block: _GatedBlock, *, cond: Tensor | None, label: Tensor | None, height: int, width: int
    ) -> _BlockWeights:
        """Lay out ``block`` for sampling an (height x width) grid with these cond (n, ., H, W) and label (n,)."""
        c = block.h_out.weight.shape[0]
        bias = block.conditioning_bias(cond, label)  # (n, 4C, H | 1, W | 1) or None
        v_cond = h_cond = None
        if bias is not None:
            # Channels last; a view when the bias comes from a label alone.
            bias = bias.expand(-1, -1, height, width).permute(0, 2, 3, 1)
            v_cond, h_cond = bias[..., : 2 * c], bias[..., 2 * c :]
        # Vertical kernel (2C, C, r+1, 2r+1) with its input index ordered (row, column, channel)
        # to match the sampler's unfolded channels-last cache. That cache is a ring whose
        # slot s holds kernel row (s - phase) mod (r + 1), so phase p uses the kernel rows
        # rolled by p: rotating r + 1 small weights once per call replaces moving cache rows.
        vw = block.v_conv.conv.weight.permute(0, 2, 3, 1)  # (2C, r+1, 2r+1, C)
        v_weights = [vw.roll(phase, dims=1).reshape(2 * c, -1).t() for phase in range(vw.shape[1])]
        hw = block.h_conv.conv.weight[:, :, 0, :]  # (2C, C, r + 1)
        return cls(
            v_weights=v_weights,
            v_bias=block.v_conv.conv.bias,
            h_weight=hw.permute(0, 2, 1).reshape(2 * c, -1).t(),
            h_bias=block.h_conv.conv.bias,
            v_to_h_weight=block.v_to_h.weight[:, :, 0, 0].t(),
            v_to_h_bias=block.v_to_h.bias,
            h_out_weight=block.h_out.weight[:, :, 0, 0].t(),
            h_out_bias=block.h_out.bias,
            v_cond=v_cond,
            h_cond=h_cond,
        )


def _gate_last(x: Tensor) -> Tensor:
    """Gated activation on channels-last rows: (..., 2C) -> (..., C)."""
    a, b = x.chunk(2, dim=-1)
    return torch.tanh(a) * torch.sigmoid(b)


def _pick(
    logits: Tensor,
    i: int,
    j: int,
    temperature: float,
    generator: torch.Generator | None,
    known: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Codes (n,) at (i, j): drawn from logits (n, K) for the whole batch, then overwritten where known.

    Drawing even where the code is known keeps the generator stream independent of ``known``.
    """
    drawn = draw(logits, temperature, generator)
    if known is None:
        return drawn
    codes, mask = known
    return torch.where(mask[:, i, j], codes[:, i, j], drawn)


def draw(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """One code per row of logits (n, K) -> (n,) int64 from softmax(logits / temperature); 0 is argmax.

    In float64 after subtracting each row's maximum, so that any temperature > 0, down to the
    smallest double, gives a distribution (its limit, the most likely code, as it nears 0)
    rather than the inf / inf of the raw quotient.
    """
    if temperature <= 0:
        return logits.argmax(dim=1)
    centred = logits.double() - logits.double().amax(dim=1, keepdim=True)
    probs = F.softmax(centred / temperature, dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def code_log_prob(logits: Tensor, codes: Tensor) -> Tensor:
    """Logits (B, K, H, W), codes (B, H, W) int64 -> (B, H, W) nats of each code: the one place the
    likelihood of codes is computed (prior, autoregressive decoders, inpainting weights).

    In float32 at least: bf16 logits are too coarse for a likelihood.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return -F.cross_entropy(logits, codes, reduction="none")


def bits_per_code(logits: Tensor, codes: Tensor) -> Tensor:
    """Mean cross-entropy in bits: logits (B, K, H, W), codes (B, H, W) int64 -> scalar."""
    return F.cross_entropy(logits, codes) / math.log(2)
