"""Factories: the model of a level or of the prior from its config, through the kind registries.

The training stages, the loader of trained runs and the tests all build models
here, so a config means one model everywhere.
"""

from __future__ import annotations

from typing import Any

from .config import Config, LevelConfig
from .kinds import DECODERS, PRIORS, QUANTIZERS, Level


def build_level(cfg: LevelConfig, channels: int, codes_below: int, num_classes: int = 0) -> Level:
    """Level k's encoder, quantiser and decoder for its config; ``channels`` of the images (level 1),
    ``codes_below`` the codes of level k-1 (levels >= 2; ignored by a pixel decoder), ``num_classes``
    the data's classes (read only by a decoder whose config is class-conditional, which needs them)."""
    # a config built in Python rather than loaded leaves the decoder to the level: pixels at level 1
    decoder = cfg.decoder or DECODERS.entry("factorised" if codes_below else "logistic").config()
    return DECODERS.build(
        decoder, cfg.trunk(), lambda: QUANTIZERS.build(cfg.quantizer), cfg.code_dim, channels, codes_below, num_classes
    )


def is_class_conditional(cfg: LevelConfig) -> bool:
    """Whether level ``cfg``'s decoder takes the image's class (``decoder.class_conditional``)."""
    return bool(getattr(cfg.decoder, "class_conditional", False))


def build_prior(cfg: Config, num_classes: int = 0) -> Any:
    """The prior of config ``cfg`` over its top level's codes; ``num_classes`` > 0 for a class-conditional one."""
    p = cfg.prior
    return PRIORS.build(p.model, cfg.level(cfg.num_levels).codes, num_classes if p.class_conditional else 0)


def build_levels(cfg: Config, num_classes: int = 0) -> list[Level]:
    """Every level of ``cfg``, freshly initialised, in order; ``num_classes`` for class-conditional decoders."""
    return [
        build_level(cfg.level(k), cfg.data.channels, cfg.level(k - 1).codes if k > 1 else 0, num_classes)
        for k in range(1, cfg.num_levels + 1)
    ]
