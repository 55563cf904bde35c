"""One latent level: encoder E_k, quantiser with codebook C_k, decoder D_k.

``PixelLevel`` is level 1 (pixels <-> codes); its decoder is a discretised
logistic per pixel, so its likelihood has a real number of bits.
``CodeLevel`` is level k >= 2 (level k-1 codes <-> level k codes); its decoder
is a categorical over the K_(k-1) codes at every position of level k-1.

Both share one interface, which the training stages and :mod:`progvq.hierarchy`
rely on:

- ``forward(inputs) -> LevelOutput``: training pass (quantiser state may update)
- ``encode(inputs) -> codes``: the deterministic encoder, no state change
- ``log_likelihood(target, codes) -> (B,)`` nats of D_k(target | codes)
- ``decode(codes, temperature, generator)``: a value of level k-1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import LevelConfig
from .nets import Decoder, Encoder, discretized_logistic_logp, to_uint8
from .quantize import QuantizerOutput, VectorQuantizer


@dataclass
class LevelOutput:
    """A training pass of one level."""

    quant: QuantizerOutput  # codes, straight-through vectors, codebook/commit losses, usage
    nll: Tensor  # (B,) nats of the input under the decoder, summed over its dims
    dims: int  # how many dims of the input `nll` sums over (for per-dim figures)
    prediction: Tensor  # pixels: (B, C, H, W) point estimate in [-1, 1] (differentiable); codes: (B, h, w) argmax


def _quantizer(cfg: LevelConfig) -> VectorQuantizer:
    q = cfg.quantizer
    return VectorQuantizer(
        cfg.codes,
        cfg.code_dim,
        ema=q.ema,
        decay=q.decay,
        init_from_data=q.init_from_data,
        restart=q.restart,
        restart_threshold=q.restart_threshold,
        restart_every=q.restart_every,
    )


class PixelLevel(nn.Module):
    """Level 1: images (B, C, H, W) in [-1, 1] <-> codes (B, H/f, W/f)."""

    def __init__(self, cfg: LevelConfig, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.factor = cfg.downsample
        self.encoder = Encoder(channels, cfg.hidden, cfg.code_dim, cfg.downsample, cfg.res_blocks)
        self.quantizer = _quantizer(cfg)
        # two maps per channel: the logistic's location and log-scale
        self.decoder = Decoder(cfg.code_dim, cfg.hidden, 2 * channels, cfg.downsample, cfg.res_blocks)

    def _params(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.decoder(vectors).float().chunk(2, dim=1)  # (B, C, H, W) each
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


class CodeLevel(nn.Module):
    """Level k >= 2: codes of level k-1 (B, h, w) <-> codes (B, h/f, w/f)."""

    def __init__(self, cfg: LevelConfig, codes_below: int) -> None:
        super().__init__()
        self.codes_below = codes_below
        self.factor = cfg.downsample
        # a learned embedding: the level below's codebook geometry is not ours to rely on
        self.embed = nn.Embedding(codes_below, cfg.hidden)
        self.encoder = Encoder(cfg.hidden, cfg.hidden, cfg.code_dim, cfg.downsample, cfg.res_blocks)
        self.quantizer = _quantizer(cfg)
        self.decoder = Decoder(cfg.code_dim, cfg.hidden, codes_below, cfg.downsample, cfg.res_blocks, head_kernel=1)

    def _embed(self, below: Tensor) -> Tensor:
        return rearrange(self.embed(below), "b h w c -> b c h w")  # (B, h, w) -> (B, hidden, h, w)

    def logits(self, codes: Tensor) -> Tensor:
        """Codes (B, h', w') -> logits (B, K_(k-1), h, w) over the level below."""
        return self.decoder(self.quantizer.lookup(codes)).float()

    def forward(self, below: Tensor) -> LevelOutput:
        """below: level k-1 codes (B, h, w) int64."""
        quant = self.quantizer(self.encoder(self._embed(below)))
        logits = self.decoder(quant.quantized).float()
        nll = F.cross_entropy(logits, below, reduction="none").flatten(1).sum(1)
        return LevelOutput(quant, nll, below[0].numel(), logits.argmax(1))

    @torch.no_grad()
    def encode(self, below: Tensor) -> Tensor:
        """Level k-1 codes (B, h, w) -> level k codes (B, h/f, w/f)."""
        return self.quantizer.nearest(self.encoder(self._embed(below)))

    def log_likelihood(self, below: Tensor, codes: Tensor) -> Tensor:
        """(B,) nats of the level k-1 codes given level k codes."""
        logits = self.logits(codes)
        return -F.cross_entropy(logits, below, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def decode(self, codes: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Level k codes (B, h', w') -> level k-1 codes (B, h, w).

        Each position is drawn independently from softmax(logits / temperature);
        temperature 0 takes the most likely code.
        """
        logits = self.logits(codes)
        if temperature <= 0:
            return logits.argmax(1)
        b, _, h, w = logits.shape
        probs = rearrange(F.softmax(logits / temperature, dim=1), "b k h w -> (b h w) k")
        return torch.multinomial(probs, 1, generator=generator).view(b, h, w)


Level = PixelLevel | CodeLevel


def build_level(cfg: LevelConfig, k: int, channels: int, codes_below: int) -> Level:
    """The model of level ``k``: a :class:`PixelLevel` for k = 1, else a :class:`CodeLevel`."""
    return PixelLevel(cfg, channels) if k == 1 else CodeLevel(cfg, codes_below)
