"""Every model kind a config can name, one registry line each.

- ``QUANTIZERS``: ``quantizer: {kind: vq | fsq, ...}`` of a level; builds a :class:`~progvq.quantize.Quantizer`.
- ``DECODERS``: ``decoder: {kind: logistic | factorised | autoregressive, ...}`` of a level; builds the
  whole level (encoder, quantiser, decoder) around its decoder. ``logistic`` and ``pixelcnn`` decode pixels
  (level 1), the others the codes of the level below.
- ``PRIORS``: ``stages.prior: {kind: pixelcnn, pixelcnn: {...}}``; builds a model with the prior
  protocol (:class:`progvq.hierarchy.Prior`).
- Data sources: :data:`progvq.data.SOURCES`.

A builder takes the kind's config dataclass and what the surrounding stage knows.
"""

from __future__ import annotations

from .fsq import FSQConfig
from .levels import (
    AutoregressiveCodeLevel,
    AutoregressiveConfig,
    AutoregressivePixelLevel,
    CodeLevel,
    FactorisedConfig,
    Level,
    LogisticConfig,
    MakeQuantizer,
    PixelCNNDecoderConfig,
    PixelLevel,
    Trunk,
)
from .pixelcnn import GatedPixelCNN, PixelCNNConfig
from .quantize import VQConfig
from .registry import Registry


def _autoregressive(
    d: AutoregressiveConfig, t: Trunk, q: MakeQuantizer, dim: int, below: int, classes: int
) -> AutoregressiveCodeLevel:
    """An autoregressive code level; ``classes`` (> 0) only when its config asks for the class."""
    if d.class_conditional and classes < 1:
        raise ValueError("a class-conditional decoder needs the number of classes (> 0)")
    return AutoregressiveCodeLevel(t, q, below, dim, d.pixelcnn, classes if d.class_conditional else 0)


QUANTIZERS = Registry("quantizer")
QUANTIZERS.add("vq", VQConfig, VQConfig.build)
QUANTIZERS.add("fsq", FSQConfig, FSQConfig.build)

# a decoder builder: (its config, trunk, make_quantizer, code dim, channels of the images, codes of the level
# below, classes of the data: what a class-conditional decoder is conditioned on, 0 when there are none)
DECODERS = Registry("decoder")
DECODERS.add("logistic", LogisticConfig, lambda d, t, q, dim, channels, below, classes: PixelLevel(t, q, channels, dim))
DECODERS.add("factorised", FactorisedConfig, lambda d, t, q, dim, channels, below, classes: CodeLevel(t, q, below, dim))
DECODERS.add(
    "pixelcnn",
    PixelCNNDecoderConfig,
    lambda d, t, q, dim, channels, below, classes: AutoregressivePixelLevel(t, q, channels, dim, d),
)
DECODERS.add(
    "autoregressive",
    AutoregressiveConfig,
    lambda d, t, q, dim, channels, below, classes: _autoregressive(d, t, q, dim, below, classes),
)
#: decoder kinds that model pixels (level 1); every other kind models the codes of the level below
PIXEL_DECODERS = ("logistic", "pixelcnn")

# a prior builder: (its config, codes of the top level, classes: 0 for an unconditional prior)
PRIORS = Registry("prior")
PRIORS.add(
    "pixelcnn", PixelCNNConfig, lambda p, codes, classes: GatedPixelCNN.from_config(p, codes, num_classes=classes)
)

__all__ = ["DECODERS", "PIXEL_DECODERS", "PRIORS", "QUANTIZERS", "Level", "MakeQuantizer", "Trunk"]
