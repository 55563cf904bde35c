"""Level models: encode/decode and likelihood consistency (the pixel likelihood itself: test_nets.py)."""

from __future__ import annotations

import torch

from progvq.build import build_level
from progvq.config import LevelConfig
from progvq.levels import (
    AutoregressivePixelLevel,
    CodeLevel,
    FactorisedConfig,
    LogisticConfig,
    PixelCNNDecoderConfig,
    PixelLevel,
)
from progvq.nets import logistic_mixture_logits, to_uint8, to_unit
from progvq.pixelcnn import PixelCNNConfig

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


def pixelcnn_level(layers: int = 2) -> AutoregressivePixelLevel:
    torch.manual_seed(0)
    decoder = PixelCNNDecoderConfig(PixelCNNConfig(channels=8, layers=layers, kernel_size=3), mixture=3)
    level = build_level(small_cfg(decoder=decoder), channels=1, codes_below=0)
    assert isinstance(level, AutoregressivePixelLevel)
    return level


def test_pixelcnn_decoder_likelihood_is_exact_and_agrees() -> None:
    level = pixelcnn_level().eval()
    x = to_unit(torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8))
    out = level(x)
    assert out.nll.shape == (3,) and out.dims == 256 and out.prediction.shape == (3, 1, 16, 16)
    codes = level.encode(x)
    assert torch.allclose(-level.log_likelihood(x, codes), out.nll, atol=1e-3)
    # the bound's term, pixel by pixel, is the 256-level distribution the sampler draws from
    cond, _ = level._outputs(level.quantizer.lookup(codes))
    levels = level._levels(x)
    assert torch.equal(levels, torch.round((x[:, 0] + 1) * 127.5).long())
    params = level.pixelcnn(levels, cond)  # (3, 3K, 16, 16)
    per_level = logistic_mixture_logits(params.permute(0, 2, 3, 1).reshape(-1, params.shape[1]))  # (768, 256)
    assert torch.allclose(torch.logsumexp(per_level, 1), torch.zeros(len(per_level)), atol=1e-4)  # sums to 1
    expected = per_level.gather(1, levels.reshape(-1, 1)).view(3, -1).sum(1)
    assert torch.allclose(level.log_likelihood(x, codes), expected, rtol=1e-4)


def test_pixelcnn_decoder_is_causal_in_raster_order() -> None:
    """A pixel's distribution depends on the pixels before it only, never on itself or later ones."""
    level = pixelcnn_level(layers=3).eval()
    x = to_unit(torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8))
    cond, _ = level._outputs(level.quantizer.lookup(level.encode(x)))
    base = level.pixelcnn(level._levels(x), cond)
    i, j = 7, 9
    changed = level._levels(x).clone()
    changed[0, i, j:] = 255 - changed[0, i, j:]  # this pixel and the rest of its row
    changed[0, i + 1 :] = 255 - changed[0, i + 1 :]  # and every later row
    after = level.pixelcnn(changed, cond)
    flat_base, flat_after = base.flatten(2), after.flatten(2)
    pos = i * 16 + j
    assert torch.equal(flat_base[..., : pos + 1], flat_after[..., : pos + 1])  # up to and including (i, j)
    assert not torch.equal(flat_base[..., pos + 1 :], flat_after[..., pos + 1 :])


def test_pixelcnn_decoder_decodes_point_estimate_and_draws() -> None:
    level = pixelcnn_level().eval()
    x = to_unit(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    codes = level.encode(x)
    _, mean = level._outputs(level.quantizer.lookup(codes))
    assert torch.equal(level.decode(codes), to_uint8(mean))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    drawn = level.decode(codes, 1.0, g1)
    assert drawn.dtype == torch.uint8 and drawn.shape == (2, 1, 16, 16)
    assert torch.equal(drawn, level.decode(codes, 1.0, g2))
    # at a temperature far below the logit gaps a draw is the greedy decode: each pixel the argmax given
    # the pixels drawn before it, which teacher forcing on the drawn image reproduces
    cond, _ = level._outputs(level.quantizer.lookup(codes))
    greedy = level.decode(codes, 1e-6, torch.Generator().manual_seed(0))
    params = level.pixelcnn(greedy[:, 0].long(), cond).permute(0, 2, 3, 1)  # (2, 16, 16, 3K)
    best = logistic_mixture_logits(params.reshape(-1, params.shape[-1])).argmax(1).view(2, 16, 16)
    assert torch.equal(best, greedy[:, 0].long())
