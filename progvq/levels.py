"""One latent level: encoder E_k, quantiser with codebook C_k, decoder D_k.

``PixelLevel`` is level 1 (pixels <-> codes); its decoder is a discretised
logistic per pixel, so its likelihood has a real number of bits.
``AutoregressivePixelLevel`` (``decoder: {kind: pixelcnn}``) keeps that encoder and
quantiser and makes D_1 a gated PixelCNN over the pixels in raster order, each a
mixture of discretised logistics (for colour PixelCNN++'s, its channels coupled),
conditioned on z_1: the pixels given z_1 are most of the bound, and a
pixel's neighbours say much of what z_1 leaves open (where exactly a stroke's edge
falls). Its trunk also gives a point estimate of the image (trained by squared
error), which is its reconstruction and what samples show at pixel temperature 0.
``CodeLevel`` is level k >= 2 (level k-1 codes <-> level k codes); its decoder
is a categorical over the K_(k-1) codes at every position of level k-1, the
positions independent given z_k (``decoder: {kind: factorised}``, the default).
``AutoregressiveCodeLevel`` (``decoder: {kind: autoregressive}``) keeps the encoder
and quantiser and makes D_k a gated PixelCNN over the level k-1 codes in
raster order, conditioned on z_k: the codebook vectors of z_k go through the
same upsampling trunk as the factorised decoder, which here ends in a map of
conditioning features on the level k-1 grid instead of logits. Trained by
teacher forcing, its cross-entropy is an exact log-likelihood, so the bound of
:meth:`progvq.hierarchy.Hierarchy.nll` holds unchanged; it samples with the
PixelCNN's cached sampler. With ``class_conditional: true`` its PixelCNN also takes
the image's class y (a learned bias per class in every gated block), so D_k is
D_k(z_(k-1) | z_k, y), as VQ-VAE-2 conditions its lower PixelCNN on the class; the
hierarchy then marginalises the class jointly with the prior's.

Both share one interface, which the training stages and :mod:`progvq.hierarchy`
rely on:

- ``forward(inputs) -> LevelOutput``: training pass (quantiser state may update)
- ``encode(inputs) -> codes``: the deterministic encoder, no state change
- ``log_likelihood(target, codes) -> (B,)`` nats of D_k(target | codes)
- ``decode(codes, temperature, generator)``: a value of level k-1; code levels
  also take ``known=(codes, mask)`` to keep given level k-1 codes (inpainting)
- ``coding_walk(codes, step, target)``: D_k as an entropy coder's model, in its decode
  order (:data:`~progvq.pixelcnn.CodeStep`); :mod:`progvq.codec` needs nothing else of a level

Code levels also have ``num_classes`` (0 unless the decoder takes the class), and their
``forward``, ``logits``, ``log_likelihood``, ``decode`` and ``coding_walk`` take ``label``
(B,) int64: required by a class-conditional decoder, ignored by the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .nets import (
    BINS,
    Decoder,
    Encoder,
    colour_mixture_logp,
    colour_mixture_outputs,
    discretized_logistic_logp,
    logistic_mixture_logits,
    logistic_mixture_logp,
    to_uint8,
    to_unit,
    walk_colour_mixture,
)
from .pixelcnn import CodeStep, GatedPixelCNN, PixelCNNConfig, code_log_prob, draw
from .quantize import Quantizer, QuantizerOutput


@dataclass(frozen=True)
class Trunk:
    """The encoder/decoder trunk of a level: downsampling, width and residual blocks."""

    downsample: int  # grid of level k-1 / grid of level k (a power of 2)
    hidden: int  # channels of the encoder and decoder trunks
    res_blocks: int  # residual blocks at the code resolution, each side


@dataclass
class LogisticConfig:
    """``decoder: {kind: logistic}`` (level 1 only): a discretised logistic per pixel, given z_1."""

    def problems(self) -> list[tuple[str, Any, str]]:
        return []


@dataclass
class FactorisedConfig:
    """``decoder: {kind: factorised}`` (levels >= 2): one categorical per level k-1 position, independent given z_k."""

    def problems(self) -> list[tuple[str, Any, str]]:
        return []


@dataclass
class AutoregressiveConfig:
    """``decoder: {kind: autoregressive, pixelcnn: {...}}`` (levels >= 2): a gated PixelCNN over the level
    k-1 codes in raster order, conditioned on z_k upsampled to their grid."""

    pixelcnn: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    # D_k(z_(k-1) | z_k, y): the PixelCNN also takes the image's class (labelled data, with a
    # class-conditional prior, so the bound can marginalise the class over prior and decoders at once)
    class_conditional: bool = False

    def problems(self) -> list[tuple[str, Any, str]]:
        return [(f"pixelcnn.{key}", value, need) for key, value, need in self.pixelcnn.problems()]


MakeQuantizer = Callable[[], Quantizer]


@dataclass
class LevelOutput:
    """A training pass of one level."""

    quant: QuantizerOutput  # codes, straight-through vectors, codebook/commit losses, usage
    nll: Tensor  # (B,) nats of the input under the decoder, summed over its dims
    dims: int  # how many dims of the input `nll` sums over (for per-dim figures)
    prediction: Tensor  # pixels: (B, C, H, W) point estimate in [-1, 1] (differentiable); codes: (B, h, w) argmax


def _full(x: Tensor) -> Tensor:
    """Logits for a likelihood: float32 at least (bf16 autocast outputs are too coarse), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


class PixelLevel(nn.Module):
    """Level 1: images (B, C, H, W) in [-1, 1] <-> codes (B, H/f, W/f)."""

    def __init__(self, trunk: Trunk, make_quantizer: MakeQuantizer, channels: int, dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.factor = trunk.downsample
        self.encoder = Encoder(channels, trunk.hidden, dim, trunk.downsample, trunk.res_blocks)
        # built between the encoder and the decoder: the modules draw their initial weights in that order
        self.quantizer = make_quantizer()
        self.decoder = self._decoder_trunk(trunk, channels, dim)

    def _decoder_trunk(self, trunk: Trunk, channels: int, dim: int) -> nn.Module:
        """z_1 vectors (B, dim, h, w) -> two maps per channel: the logistic's location and log-scale."""
        return Decoder(dim, trunk.hidden, 2 * channels, trunk.downsample, trunk.res_blocks)

    def _params(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_scale = _full(self.decoder(vectors)).chunk(2, dim=1)  # (B, C, H, W) each
        return loc, log_scale

    def forward(self, x: Tensor) -> LevelOutput:
        """x: (B, C, H, W) in [-1, 1]."""
        quant = self.quantizer(self.encoder(x))
        loc, log_scale = self._params(quant.quantized)
        logp = discretized_logistic_logp(x, loc, log_scale)
        # the clamp lets a pixel at 0 or 255 sit anywhere past the edge, as the likelihood allows
        return LevelOutput(quant, -logp.flatten(1).sum(1), x[0].numel(), loc.clamp(-1, 1))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64."""
        return self.quantizer.nearest(self.encoder(x))

    def log_likelihood(self, x: Tensor, codes: Tensor) -> Tensor:
        """(B,) nats of the images x (B, C, H, W) given level-1 codes (B, h, w)."""
        loc, log_scale = self._params(self.quantizer.lookup(codes))
        return discretized_logistic_logp(x, loc, log_scale).flatten(1).sum(1)

    @torch.no_grad()
    def decode(self, codes: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Codes (B, h, w) -> images (B, C, H, W) uint8.

        temperature 0 gives the logistic's location (its median, the usual
        "reconstruction"); temperature t > 0 samples every pixel independently
        from the logistic with its scale multiplied by t.
        """
        loc, log_scale = self._params(self.quantizer.lookup(codes))
        if temperature <= 0:
            return to_uint8(loc)
        u = torch.rand(loc.shape, generator=generator, device=loc.device).clamp(1e-5, 1 - 1e-5)
        noise = torch.log(u) - torch.log1p(-u)  # standard logistic
        return to_uint8(loc + temperature * torch.exp(log_scale) * noise)

    @torch.no_grad()
    def coding_walk(self, codes: Tensor, step: CodeStep, target: Tensor | None = None) -> Tensor:
        """D_1 for an entropy coder: codes (B, h, w) -> pixels (B, C, H, W) uint8, one image row per step.

        Each step hands ``step`` the logits (B W, 256) of one row of one channel over the 256 grey
        levels (the discretised logistic's log-probabilities); ``target`` (B, C, H, W) uint8 are the
        true pixels when encoding. The pixels are independent given z_1, so any fixed order would do.
        """
        loc, log_scale = self._params(self.quantizer.lookup(codes))  # (B, C, H, W) each
        b, c, h, w = loc.shape
        grey = to_unit(torch.arange(BINS, device=loc.device)).to(loc.dtype)  # (256,): the levels as the data has them
        out = torch.empty(b, c, h, w, dtype=torch.long, device=loc.device)
        for ch in range(c):
            for i in range(h):
                logits = discretized_logistic_logp(grey, loc[:, ch, i, :, None], log_scale[:, ch, i, :, None])
                true = None if target is None else target[:, ch, i].reshape(-1).long()
                out[:, ch, i] = step(logits.reshape(b * w, BINS), true).view(b, w)
        return out.to(torch.uint8)


@dataclass
class PixelCNNDecoderConfig:
    """``decoder: {kind: pixelcnn, pixelcnn: {...}, mixture: K}`` (level 1): a gated PixelCNN over the
    pixels in raster order, conditioned on z_1 upsampled to the image, each pixel a mixture of K
    discretised logistics. A colour pixel's mixture is PixelCNN++'s (Salimans et al. 2017): the
    three channels share the K weights, and component k gives R, G and B a logistic each, of means
    mu_R, mu_G + alpha R and mu_B + beta R + gamma G (alpha, beta, gamma in (-1, 1) from the
    network), 10K numbers per pixel against a grey pixel's 3K. It needs no reach over the whole
    image: z_1 carries the layout, the PixelCNN the local detail."""

    pixelcnn: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    # components per pixel: ordered levels and few parameters (3K against a 256-way softmax's 256;
    # colour 10K against 256^3) learn from 9,000 images, and cost a fraction of the softmax's time
    mixture: int = 5

    def problems(self) -> list[tuple[str, Any, str]]:
        out = [(f"pixelcnn.{key}", value, need) for key, value, need in self.pixelcnn.problems()]
        if self.mixture < 1:
            out.append(("mixture", self.mixture, ">= 1"))
        return out


class AutoregressivePixelLevel(PixelLevel):
    """Level 1 with D_1 a gated PixelCNN over the pixels, conditioned on z_1.

    p(x | z_1) = prod_ij p(x[:, i, j] | x before (i, j) in raster order, z_1), so its bits are
    exact. A grey pixel's factor is a mixture of K discretised logistics over the 256 levels
    (:func:`~progvq.nets.logistic_mixture_logp`). A colour pixel's is PixelCNN++'s mixture over its
    C = 3 channels (:func:`~progvq.nets.colour_mixture_logp`): shared weights, and each component's
    G and B means moved linearly by the channels before them; entropy coding and sampling take the
    channels in turn, each from its distribution given the earlier ones
    (:func:`~progvq.nets.walk_colour_mixture`). The PixelCNN reads every channel of the earlier
    pixels as 256 levels (an embedding per level and channel, summed over a pixel's channels;
    :class:`~progvq.pixelcnn.GatedPixelCNN`'s ``code_channels``). A grey model has exactly the
    parameters and arithmetic it always had.
    The decoder trunk maps the z_1 vectors (B, dim, h, w) to (B, channels + C, H, W): a
    conditioning map for every gated block, and C channels of point estimate in [-1, 1]
    (squared error trains it: the stage's ``mse`` loss part), which :meth:`decode` returns at
    temperature 0.
    """

    def __init__(
        self, trunk: Trunk, make_quantizer: MakeQuantizer, channels: int, dim: int, config: PixelCNNDecoderConfig
    ) -> None:
        self._decoder_config = config  # read by _decoder_trunk, which the base class calls
        super().__init__(trunk, make_quantizer, channels, dim)

    def _decoder_trunk(self, trunk: Trunk, channels: int, dim: int) -> nn.Module:
        """z_1 vectors (B, dim, h, w) -> the conditioning map and the point estimate (B, channels + C, H, W)."""
        p = self._decoder_config.pixelcnn
        k = self._decoder_config.mixture
        self.cond_channels = p.channels
        # the PixelCNN is built here so the module order (and state-dict order) is fixed
        self.pixelcnn = GatedPixelCNN.from_config(
            p,
            BINS,
            cond_channels=p.channels,
            outputs=3 * k if channels == 1 else colour_mixture_outputs(k, channels),
            code_channels=channels,
        )
        return Decoder(dim, trunk.hidden, p.channels + channels, trunk.downsample, trunk.res_blocks)

    def _outputs(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """z_1 vectors (B, dim, h, w) -> conditioning map (B, channels, H, W), point estimate (B, C, H, W)."""
        out = self.decoder(vectors)
        return out[:, : self.cond_channels], out[:, self.cond_channels :].float()

    def _levels(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the PixelCNN's codes in 0..255, int64: grey (B, H, W),
        colour (B, H, W, C)."""
        if self.channels == 1:
            return to_uint8(x[:, 0]).long()
        return to_uint8(x).long().permute(0, 2, 3, 1)

    def _log_prob(self, x: Tensor, cond: Tensor) -> Tensor:
        """(B,) nats of images x (B, C, H, W) given the conditioning map (B, channels, H, W)."""
        params = _full(self.pixelcnn(self._levels(x), cond))  # (B, 3K or 10K, H, W), teacher-forced
        if self.channels == 1:
            return logistic_mixture_logp(x.float(), params).flatten(1).sum(1)
        return colour_mixture_logp(_full(x), params).flatten(1).sum(1)

    def forward(self, x: Tensor) -> LevelOutput:
        """x: (B, C, H, W) in [-1, 1]."""
        quant = self.quantizer(self.encoder(x))
        cond, mean = self._outputs(quant.quantized)
        return LevelOutput(quant, -self._log_prob(x, cond), x[0].numel(), mean)

    def log_likelihood(self, x: Tensor, codes: Tensor) -> Tensor:
        """(B,) nats of the images x (B, C, H, W) given level-1 codes (B, h, w)."""
        cond, _ = self._outputs(self.quantizer.lookup(codes))
        return self._log_prob(x, cond)

    @torch.no_grad()
    def decode(self, codes: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Codes (B, h, w) -> images (B, C, H, W) uint8.

        Temperature 0 gives the trunk's point estimate (no pixel drawn); t > 0 draws every
        pixel in raster order from the PixelCNN's 256-level distribution at temperature t
        (its cached sampler), a colour pixel's channels in turn, each given those before it.
        """
        cond, mean = self._outputs(self.quantizer.lookup(codes))
        if temperature <= 0:
            return to_uint8(mean)
        b, _, h, w = mean.shape
        if self.channels == 1:
            drawn = self.pixelcnn.sample(
                b,
                h,
                w,
                temperature=temperature,
                generator=generator,
                cond=_full(cond),
                to_logits=logistic_mixture_logits,
            )
            return drawn.to(torch.uint8).unsqueeze(1)

        def choose(out: Tensor, i: int, j: int) -> Tensor:
            return walk_colour_mixture(out, self.channels, lambda c, logits: draw(logits, temperature, generator))

        drawn = self.pixelcnn.fill(b, h, w, choose, cond=_full(cond))  # (B, H, W, C)
        return drawn.to(torch.uint8).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def coding_walk(self, codes: Tensor, step: CodeStep, target: Tensor | None = None) -> Tensor:
        """D_1 for an entropy coder: codes (B, h, w) -> pixels (B, C, H, W) uint8, one pixel per step in raster
        order (a colour pixel: one step per channel, R, G, B).

        Each step's logits (B, 256) are the mixture's log-probabilities of the levels given the
        pixels before it (the cached sampler's loop, :meth:`GatedPixelCNN.walk`) and, for colour, the
        channels of the pixel before it (:func:`~progvq.nets.walk_colour_mixture`), so the steps'
        bits add up to the joint's; ``target`` (B, C, H, W) uint8 are the true pixels when encoding.
        """
        cond, _ = self._outputs(self.quantizer.lookup(codes))
        b, _, h, w = cond.shape
        if self.channels == 1:
            true = None if target is None else target[:, 0].long()
            levels = self.pixelcnn.walk(b, h, w, step, true, cond=_full(cond), to_logits=logistic_mixture_logits)
            return levels.to(torch.uint8).unsqueeze(1)
        given = None if target is None else target.long().permute(0, 2, 3, 1)  # (B, H, W, C)

        def choose(out: Tensor, i: int, j: int) -> Tensor:
            def channel(c: int, logits: Tensor) -> Tensor:
                return step(logits, None if given is None else given[:, i, j, c])

            return walk_colour_mixture(out, self.channels, channel)

        levels = self.pixelcnn.fill(b, h, w, choose, cond=_full(cond))  # (B, H, W, C)
        return levels.to(torch.uint8).permute(0, 3, 1, 2).contiguous()


class CodeLevel(nn.Module):
    """Level k >= 2: codes of level k-1 (B, h, w) <-> codes (B, h/f, w/f); factorised decoder.

    ``label`` (B,) int64, taken by every method that runs the decoder, is ignored here: only a
    class-conditional decoder (:class:`AutoregressiveCodeLevel` with ``num_classes`` > 0) reads it.
    """

    autoregressive = False
    num_classes = 0  # classes the decoder is conditioned on; 0: none

    def __init__(self, trunk: Trunk, make_quantizer: MakeQuantizer, codes_below: int, dim: int) -> None:
        super().__init__()
        self.codes_below = codes_below
        self.factor = trunk.downsample
        # a learned embedding: the level below's codebook geometry is not ours to rely on
        self.embed = nn.Embedding(codes_below, trunk.hidden)
        self.encoder = Encoder(trunk.hidden, trunk.hidden, dim, trunk.downsample, trunk.res_blocks)
        self.quantizer = make_quantizer()
        self.decoder = self._decoder_trunk(trunk, codes_below, dim)

    def _decoder_trunk(self, trunk: Trunk, codes_below: int, dim: int) -> nn.Module:
        """z_k vectors (B, dim, h', w') -> logits (B, K_(k-1), h, w)."""
        return Decoder(dim, trunk.hidden, codes_below, trunk.downsample, trunk.res_blocks, head_kernel=1)

    def _embed(self, below: Tensor) -> Tensor:
        return rearrange(self.embed(below), "b h w c -> b c h w")  # (B, h, w) -> (B, hidden, h, w)

    def logits(self, codes: Tensor, below: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """Codes (B, h', w') -> logits (B, K_(k-1), h, w) over the level below.

        ``below`` (B, h, w) is unused here: the positions are independent given ``codes``
        (the autoregressive decoder needs it for teacher forcing).
        """
        return _full(self.decoder(self.quantizer.lookup(codes)))

    def forward(self, below: Tensor, label: Tensor | None = None) -> LevelOutput:
        """below: level k-1 codes (B, h, w) int64; label: (B,) int64 classes (class-conditional decoders)."""
        quant = self.quantizer(self.encoder(self._embed(below)))
        logits = self._train_logits(quant.quantized, below, label)
        nll = -code_log_prob(logits, below).flatten(1).sum(1)
        return LevelOutput(quant, nll, below[0].numel(), logits.argmax(1))

    def _train_logits(self, vectors: Tensor, below: Tensor, label: Tensor | None = None) -> Tensor:
        """Straight-through z_k vectors (B, code_dim, h', w') -> logits (B, K_(k-1), h, w)."""
        return _full(self.decoder(vectors))

    @torch.no_grad()
    def encode(self, below: Tensor) -> Tensor:
        """Level k-1 codes (B, h, w) -> level k codes (B, h/f, w/f)."""
        return self.quantizer.nearest(self.encoder(self._embed(below)))

    def log_likelihood(self, below: Tensor, codes: Tensor, label: Tensor | None = None) -> Tensor:
        """(B,) nats of the level k-1 codes (B, h, w) given level k codes (B, h', w') (and the class ``label`` (B,))."""
        logits = self.logits(codes, below, label)
        return code_log_prob(logits, below).flatten(1).sum(1)

    @torch.no_grad()
    def decode(
        self,
        codes: Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        known: tuple[Tensor, Tensor] | None = None,
        label: Tensor | None = None,
        guidance: float = 0.0,
    ) -> Tensor:
        """Level k codes (B, h', w') -> level k-1 codes (B, h, w).

        Each position is drawn independently from softmax(logits / temperature);
        temperature 0 takes the most likely code. ``known`` = (codes (B, h, w)
        int64, mask (B, h, w) bool) keeps the given codes where the mask is True.
        A code is drawn at every position either way, so the generator advances
        the same whatever is known. ``label`` and ``guidance`` concern a
        class-conditional decoder only.
        """
        logits = self.logits(codes)
        b, _, h, w = logits.shape
        drawn = draw(rearrange(logits, "b k h w -> (b h w) k"), temperature, generator).view(b, h, w)
        if known is None:
            return drawn
        given, mask = known
        return torch.where(mask, given, drawn)

    @torch.no_grad()
    def coding_walk(
        self, codes: Tensor, step: CodeStep, target: Tensor | None = None, label: Tensor | None = None
    ) -> Tensor:
        """D_k for an entropy coder: level k codes (B, h', w') -> level k-1 codes (B, h, w) int64, in one step.

        The positions are independent given ``codes``: one step of logits (B h w, K_(k-1)), in
        (image, row, column) order; ``target`` (B, h, w) are the true level k-1 codes when encoding.
        """
        logits = self.logits(codes)  # (B, K, h, w)
        b, _, h, w = logits.shape
        true = None if target is None else target.reshape(-1)
        return step(rearrange(logits, "b k h w -> (b h w) k"), true).view(b, h, w)


class AutoregressiveCodeLevel(CodeLevel):
    """Level k >= 2 with D_k a gated PixelCNN over the level k-1 codes, conditioned on z_k (and the class).

    p(z_(k-1) | z_k) = prod_ij p(z_(k-1)[i, j] | z_(k-1) before (i, j) in raster order, z_k).
    The conditioning map (B, channels, h, w) comes from the factorised decoder's trunk
    (z_k vectors upsampled to the level k-1 grid) and enters every gated block as a bias.
    With ``num_classes`` > 0 the image's class y (B,) enters every gated block too, as a learned
    bias per class (:class:`~progvq.pixelcnn.GatedPixelCNN`'s ``num_classes``): the factors are
    p(z_(k-1)[i, j] | before, z_k, y), and every method that runs the decoder needs ``label``.
    """

    autoregressive = True

    def __init__(
        self,
        trunk: Trunk,
        make_quantizer: MakeQuantizer,
        codes_below: int,
        dim: int,
        pixelcnn: PixelCNNConfig,
        num_classes: int = 0,
    ) -> None:
        self._pixelcnn_config = pixelcnn  # read by _decoder_trunk, which the base class calls
        self._num_classes = num_classes
        super().__init__(trunk, make_quantizer, codes_below, dim)
        self.num_classes = num_classes

    def _decoder_trunk(self, trunk: Trunk, codes_below: int, dim: int) -> nn.Module:
        p = self._pixelcnn_config
        # the PixelCNN is built here so the module order (and state-dict order) is fixed
        self.pixelcnn = GatedPixelCNN.from_config(
            p, codes_below, cond_channels=p.channels, num_classes=self._num_classes
        )
        return Decoder(dim, trunk.hidden, p.channels, trunk.downsample, trunk.res_blocks, head_kernel=1)

    def _label(self, label: Tensor | None) -> Tensor | None:
        """The class labels (B,) the PixelCNN takes: ``label`` for a class-conditional decoder, else None."""
        return label if self.num_classes else None

    def condition(self, codes: Tensor) -> Tensor:
        """Level k codes (B, h', w') -> conditioning map (B, channels, h, w) on the level k-1 grid."""
        return self.decoder(self.quantizer.lookup(codes))

    def logits(self, codes: Tensor, below: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, K_(k-1), h, w): position (i, j) given ``below`` (B, h, w) before it,
        ``codes`` and, for a class-conditional decoder, ``label`` (B,)."""
        if below is None:
            raise ValueError("an autoregressive decoder's logits need the level k-1 codes (teacher forcing)")
        return _full(self.pixelcnn(below, self.condition(codes), self._label(label)))

    def _train_logits(self, vectors: Tensor, below: Tensor, label: Tensor | None = None) -> Tensor:
        return _full(self.pixelcnn(below, self.decoder(vectors), self._label(label)))

    def log_likelihood_per_class(self, below: Tensor, codes: Tensor) -> Tensor:
        """(B, num_classes) nats: log D_k(z_(k-1) | z_k, y) of level k-1 codes (B, h, w) given level k codes
        (B, h', w') under every class y (a class-conditional decoder only).

        One teacher-forced pass per class, each on the batch (memory as one labelled pass); the
        conditioning map is computed once.
        """
        if not self.num_classes:
            raise ValueError("log_likelihood_per_class needs a class-conditional decoder")
        cond = self.condition(codes)
        per_class = [
            code_log_prob(_full(self.pixelcnn(below, cond, torch.full_like(below[:, 0, 0], y))), below)
            .flatten(1)
            .sum(1)
            for y in range(self.num_classes)
        ]
        return torch.stack(per_class, dim=1)

    @torch.no_grad()
    def decode(
        self,
        codes: Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        known: tuple[Tensor, Tensor] | None = None,
        label: Tensor | None = None,
        guidance: float = 0.0,
    ) -> Tensor:
        """Level k codes (B, h', w') -> level k-1 codes (B, h, w), one position at a time.

        The PixelCNN's cached sampler (:meth:`GatedPixelCNN.sample`) at ``temperature``
        (0: the most likely code given the codes drawn before); ``known`` as in
        :meth:`CodeLevel.decode`, and the free codes are conditioned on the known
        ones before them in raster order. A class-conditional decoder draws given ``label``
        (B,), with class ``guidance`` w >= 0 as the prior's (p(code | y)^(1+w) / p(code)^w);
        the others ignore both.
        """
        cond = _full(self.condition(codes))  # the sampler runs in the weights' precision
        b, _, h, w = cond.shape
        label = self._label(label)
        return self.pixelcnn.sample(
            b,
            h,
            w,
            temperature=temperature,
            generator=generator,
            cond=cond,
            label=label,
            known=known,
            guidance=guidance if label is not None else 0.0,
        )

    @torch.no_grad()
    def coding_walk(
        self, codes: Tensor, step: CodeStep, target: Tensor | None = None, label: Tensor | None = None
    ) -> Tensor:
        """D_k for an entropy coder: level k codes (B, h', w') -> level k-1 codes (B, h, w), one position per step
        in raster order (logits (B, K_(k-1)) given the codes before it: :meth:`GatedPixelCNN.walk`), given the
        class ``label`` (B,) for a class-conditional decoder (the class the prior's walk coded first)."""
        cond = _full(self.condition(codes))
        b, _, h, w = cond.shape
        return self.pixelcnn.walk(b, h, w, step, target, cond=cond, label=self._label(label))


Level = PixelLevel | CodeLevel
