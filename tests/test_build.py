"""The factories: a level's and the prior's model from their configs, the same model for the same config."""

from __future__ import annotations

import torch

from progvq.build import build_level, build_levels, build_prior
from progvq.config import load_config
from progvq.fsq import FiniteScalarQuantizer, FSQConfig
from progvq.levels import AutoregressiveCodeLevel, AutoregressiveConfig, CodeLevel, PixelLevel
from progvq.pixelcnn import GatedPixelCNN
from progvq.quantize import VectorQuantizer

from .conftest import TINY
from .helpers import assert_same_tensors, level_config


def test_a_level_without_a_decoder_takes_its_levels_default() -> None:
    cfg = level_config(codes=6, dim=3)
    assert cfg.decoder is None
    pixels = build_level(cfg, 3, 0)  # no codes below: level 1, pixels
    assert isinstance(pixels, PixelLevel) and pixels.factor == 2
    assert pixels.decode(torch.zeros(2, 4, 4, dtype=torch.long)).shape == (2, 3, 8, 8)  # 3 channels
    codes = build_level(cfg, 3, 5).eval()  # 5 codes below: a factorised code level
    assert type(codes) is CodeLevel
    assert codes.logits(torch.zeros(2, 4, 4, dtype=torch.long)).shape == (2, 5, 8, 8)


def test_the_configured_decoder_and_quantiser_are_built() -> None:
    level = build_level(level_config(codes=6, dim=3, decoder=AutoregressiveConfig()), 1, 4)
    assert isinstance(level, AutoregressiveCodeLevel) and level.autoregressive
    assert isinstance(level.quantizer, VectorQuantizer)
    assert (level.quantizer.num_codes, level.quantizer.dim) == (6, 3)
    fsq = build_level(level_config(quantizer=FSQConfig(levels=[4, 3])), 1, 0)
    assert isinstance(fsq.quantizer, FiniteScalarQuantizer)
    assert (fsq.quantizer.num_codes, fsq.quantizer.dim) == (12, 2)


def test_build_levels_chains_each_level_on_the_codes_below() -> None:
    cfg = load_config(TINY)
    levels = build_levels(cfg)
    assert len(levels) == cfg.num_levels == 2
    one, two = levels
    assert isinstance(one, PixelLevel) and type(two) is CodeLevel
    assert (one.factor, two.factor) == (4, 2)
    assert one.quantizer.num_codes == 16 and two.quantizer.num_codes == 8
    z1 = torch.zeros(3, 4, 4, dtype=torch.long)
    assert two.eval().logits(two.encode(z1)).shape == (3, 16, 4, 4)  # a categorical over level 1's 16 codes


def test_build_prior_is_over_the_top_codes_and_conditional_only_when_configured() -> None:
    cfg = load_config(TINY)
    prior = build_prior(cfg, num_classes=10)
    assert isinstance(prior, GatedPixelCNN)
    assert prior.num_codes == cfg.level(cfg.num_levels).codes == 8
    assert prior.num_classes == 0  # stages.prior.class_conditional is false: the classes are not used
    cfg.prior.class_conditional = True
    assert build_prior(cfg, num_classes=10).num_classes == 10
    assert len(prior.blocks) == cfg.prior.model.layers


def test_the_same_config_and_seed_build_the_same_weights() -> None:
    cfg = load_config(TINY)
    built = []
    for _ in range(2):
        torch.manual_seed(4)
        built.append([*build_levels(cfg), build_prior(cfg)])
    for a, b in zip(*built, strict=True):
        assert_same_tensors(a.state_dict(), b.state_dict())
