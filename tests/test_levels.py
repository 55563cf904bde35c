"""Level models: encode/decode and likelihood consistency (the pixel likelihood itself: test_nets.py)."""

from __future__ import annotations

import torch

from progvq.build import build_level
from progvq.config import LevelConfig
from progvq.levels import CodeLevel, FactorisedConfig, LogisticConfig, PixelLevel
from progvq.nets import to_unit

from .helpers import level_config


def small_cfg(**kw) -> LevelConfig:
    return level_config(downsample=4, hidden=16, codes=16, dim=8, **kw)


def test_pixel_level_shapes_and_likelihood_agree() -> None:
    torch.manual_seed(0)
    level = build_level(small_cfg(decoder=LogisticConfig()), channels=1, codes_below=0)
    assert isinstance(level, PixelLevel)
    x = to_unit(torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8))
    out = level(x)
    assert out.quant.indices.shape == (3, 4, 4) and out.nll.shape == (3,) and out.dims == 256
    level.eval()
    codes = level.encode(x)
    assert torch.equal(codes, level(x).quant.indices)
    assert torch.allclose(-level.log_likelihood(x, codes), level(x).nll, atol=1e-4)
    images = level.decode(codes)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 16, 16)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(level.decode(codes, 1.0, g1), level.decode(codes, 1.0, g2))


def test_code_level_decode_and_likelihood() -> None:
    torch.manual_seed(0)
    cfg = level_config(hidden=16, codes=8, dim=8, decoder=FactorisedConfig())
    level = build_level(cfg, channels=1, codes_below=16).eval()
    assert type(level) is CodeLevel
    below = torch.randint(0, 16, (4, 4, 4))
    codes = level.encode(below)
    assert codes.shape == (4, 2, 2)
    logits = level.logits(codes)
    assert logits.shape == (4, 16, 4, 4)
    assert torch.equal(level.decode(codes, 0.0), logits.argmax(1))
    expected = torch.log_softmax(logits, 1).gather(1, below[:, None]).flatten(1).sum(1)
    assert torch.allclose(level.log_likelihood(below, codes), expected, atol=1e-5)
    # a temperature far below the gap between the two best logits samples the argmax
    top2 = logits.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > 0
    assert torch.equal(level.decode(codes, gap / 100, torch.Generator().manual_seed(0)), logits.argmax(1))
