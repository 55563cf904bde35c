"""The building blocks every level shares: trunks, residual blocks, pixel scaling, the pixel likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from progvq.nets import Decoder, Encoder, ResBlock, discretized_logistic_logp, to_uint8, to_unit


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_encoder_and_decoder_shapes(factor: int) -> None:
    torch.manual_seed(0)
    encoder = Encoder(in_ch=3, hidden=16, out_ch=5, factor=factor, res_blocks=1)
    decoder = Decoder(in_ch=5, hidden=16, out_ch=7, factor=factor, res_blocks=1)
    x = torch.randn(2, 3, 16, 24)
    z = encoder(x)
    assert z.shape == (2, 5, 16 // factor, 24 // factor)
    assert decoder(z).shape == (2, 7, 16, 24)
    # one 4x4 stride-2 convolution (or its transpose) per halving
    halvings = int(math.log2(factor))
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in encoder.modules()) == halvings
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in decoder.modules()) == halvings
    assert sum(isinstance(m, ResBlock) for m in encoder.modules()) == 1


@pytest.mark.parametrize("head_kernel", [1, 3])
def test_decoder_head_kernel(head_kernel: int) -> None:
    decoder = Decoder(in_ch=4, hidden=8, out_ch=6, factor=2, res_blocks=0, head_kernel=head_kernel)
    head = decoder.net[-1]
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (head_kernel, head_kernel)
    assert decoder(torch.randn(1, 4, 3, 5)).shape == (1, 6, 6, 10)


@pytest.mark.parametrize("factor", [3, 6, 12])
def test_a_factor_that_is_no_power_of_2_is_refused(factor: int) -> None:
    with pytest.raises(ValueError, match=f"downsampling factor {factor} is not a power of 2"):
        Encoder(1, 8, 4, factor, 0)
    with pytest.raises(ValueError, match=f"downsampling factor {factor} is not a power of 2"):
        Decoder(4, 8, 1, factor, 0)


def test_resblock_adds_its_branch_to_the_input() -> None:
    torch.manual_seed(0)
    block = ResBlock(4)
    x = torch.randn(2, 4, 5, 5)
    assert block(x).shape == x.shape
    branch = block.conv2(torch.relu(block.conv1(torch.relu(x))))
    torch.testing.assert_close(block(x), x + branch, rtol=0, atol=0)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    assert torch.equal(block(x), x)  # an empty branch: the identity


def test_to_unit_maps_0_to_255_onto_minus_1_to_1() -> None:
    u = torch.tensor([0, 255, 51], dtype=torch.uint8)
    assert to_unit(u).tolist() == pytest.approx([-1.0, 1.0, -0.6], abs=1e-6)
    assert to_unit(u).dtype == torch.float32


def test_uint8_round_trip() -> None:
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_unit(u)), u)


def test_to_uint8_clamps_and_rounds() -> None:
    x = torch.tensor([-3.0, -1.0, 1.0, 7.0, 0.0, 0.003, 0.005])
    # 0 -> 127.5 rounds to even (128); 0.003 -> 127.88 -> 128; 0.005 -> 128.14 -> 128
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 128, 128, 128]
    assert to_uint8(x).dtype == torch.uint8


def test_discretized_logistic_is_a_distribution_over_256_levels() -> None:
    x = to_unit(torch.arange(256, dtype=torch.uint8)).view(256, 1, 1, 1)
    for loc, log_scale in [(0.0, -2.0), (-1.3, -5.0), (0.7, 0.5), (0.999, -6.9), (2.0, -1.0)]:
        logp = discretized_logistic_logp(x, torch.full_like(x, loc), torch.full_like(x, log_scale))
        assert torch.logsumexp(logp.flatten(), 0).exp().item() == pytest.approx(1.0, abs=1e-4)


def test_discretized_logistic_known_value() -> None:
    # a bin in the middle: sigmoid((x + 1/255 - mu)/s) - sigmoid((x - 1/255 - mu)/s)
    x = torch.tensor([[[[to_unit(torch.tensor(128, dtype=torch.uint8)).item()]]]])
    mu, log_s = torch.zeros_like(x), torch.full_like(x, math.log(0.1))
    s, c = 0.1, x.item()
    expected = math.log(1 / (1 + math.exp(-(c + 1 / 255) / s)) - 1 / (1 + math.exp(-(c - 1 / 255) / s)))
    assert discretized_logistic_logp(x, mu, log_s).item() == pytest.approx(expected, abs=1e-5)
