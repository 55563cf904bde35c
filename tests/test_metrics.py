"""Figures of a level or a prior, against known answers and against their definitions by hand."""

from __future__ import annotations

import math

import pytest
import torch

from progvq.build import build_level
from progvq.canvas import Canvas
from progvq.levels import CodeLevel, FactorisedConfig, PixelLevel
from progvq.metrics import LN2, batches, level_metrics, prior_metrics, psnr, psnr_from_mse
from progvq.nets import to_unit
from progvq.pixelcnn import GatedPixelCNN
from progvq.quantize import code_usage

from .helpers import level_config


def test_psnr_known_answers() -> None:
    zeros = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    assert psnr(zeros, zeros + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE 1: 48.13 dB
    assert psnr_from_mse(255.0**2) == pytest.approx(0.0, abs=1e-12)
    assert psnr_from_mse(100.0) == pytest.approx(28.1308036, abs=1e-6)
    assert psnr(zeros, zeros) == float("inf")


def test_psnr_takes_one_mse_over_the_whole_split() -> None:
    """Not the mean of per-image PSNRs: an exact image does not make the split's PSNR infinite."""
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    recon = images.clone()
    recon[1] = 4  # squared error 16 on 4 of the 8 pixels: MSE 8
    assert psnr(images, recon) == pytest.approx(10 * math.log10(255**2 / 8), abs=1e-9)


def test_batches_are_consecutive_slices_the_last_one_shorter() -> None:
    parts = list(batches(torch.arange(10), 4))
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [p.tolist() for p in batches(torch.arange(4), 4)] == [[0, 1, 2, 3]]
    assert list(batches(torch.arange(0), 4)) == []


def test_pixel_level_figures_are_over_the_original_pixels() -> None:
    """A 3x3 image on a 4x4 canvas: bits per the 9 original dims (the padding's bits kept), PSNR over the 3x3."""
    torch.manual_seed(0)
    level = build_level(level_config(codes=4, dim=4), 1, 0)
    assert isinstance(level, PixelLevel)
    canvas = Canvas((1, 3, 3), (1, 4, 4))
    images = torch.randint(0, 256, (7, 1, 3, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    level.train()
    figures = level_metrics(level, images, batch_size=3, canvas=canvas)
    assert level.training  # the caller's mode is restored
    level.eval()
    with torch.no_grad():
        x = to_unit(canvas.pad(images))
        codes = level.encode(x)
        bits = -level.log_likelihood(x, codes).sum().item() / LN2
        recon = canvas.crop(level.decode(codes))
    perplexity, used = code_usage(codes, 4)
    assert set(figures) == {"psnr", "bits_per_dim", "codes_used", "usage", "perplexity"}
    assert figures["bits_per_dim"] == pytest.approx(bits / (7 * 9), rel=1e-5)
    mse = (recon.double() - images.double()).pow(2).mean().item()
    assert figures["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-6)
    assert figures["codes_used"] == used and figures["usage"] == used / 4
    assert figures["perplexity"] == pytest.approx(perplexity, rel=1e-6)


def test_pixel_level_without_a_canvas_takes_the_images_as_they_are() -> None:
    torch.manual_seed(0)
    level = build_level(level_config(codes=4, dim=4), 1, 0).eval()
    images = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    x = to_unit(images)
    with torch.no_grad():
        bits = -level.log_likelihood(x, level.encode(x)).sum().item() / LN2
    assert level_metrics(level, images)["bits_per_dim"] == pytest.approx(bits / (5 * 16), rel=1e-5)


def test_code_level_figures_match_their_definitions() -> None:
    torch.manual_seed(0)
    level = build_level(level_config(codes=4, dim=4, decoder=FactorisedConfig()), 1, 6).eval()
    assert isinstance(level, CodeLevel)
    below = torch.randint(0, 6, (10, 4, 4), generator=torch.Generator().manual_seed(3))
    figures = level_metrics(level, below, batch_size=4)
    with torch.no_grad():
        codes = level.encode(below)
        log_probs = torch.log_softmax(level.logits(codes).double(), 1)
    bits_per_code = -log_probs.gather(1, below[:, None]).sum().item() / below.numel() / LN2
    accuracy = (log_probs.argmax(1) == below).double().mean().item()
    perplexity, used = code_usage(codes, 4)
    assert set(figures) == {"accuracy", "bits_per_code", "codes_used", "usage", "perplexity"}
    assert figures["bits_per_code"] == pytest.approx(bits_per_code, rel=1e-5)
    assert figures["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert figures["codes_used"] == used and figures["usage"] == used / 4
    assert figures["perplexity"] == pytest.approx(perplexity, rel=1e-6)


def _zeroed(prior: GatedPixelCNN) -> GatedPixelCNN:
    with torch.no_grad():
        for param in prior.parameters():
            param.zero_()
    return prior


def test_a_uniform_prior_spends_log2_k_bits_per_code() -> None:
    codes = torch.randint(0, 8, (5, 3, 3), generator=torch.Generator().manual_seed(0))
    plain = _zeroed(GatedPixelCNN(8, channels=4, layers=1))
    assert prior_metrics(plain, codes, batch_size=2) == {"bits_per_code": pytest.approx(3.0, abs=1e-6)}
    conditional = _zeroed(GatedPixelCNN(8, channels=4, layers=1, num_classes=3))
    labels = torch.tensor([0, 1, 2, 0, 1])
    figures = prior_metrics(conditional, codes, batch_size=2, labels=labels)
    assert figures == {
        "bits_per_code": pytest.approx(3.0, abs=1e-6),
        "bits_per_code_given_label": pytest.approx(3.0, abs=1e-6),
    }
    # without labels only the marginal
    assert set(prior_metrics(conditional, codes)) == {"bits_per_code"}


def test_prior_bits_match_the_log_softmax_by_hand_in_eval_mode() -> None:
    torch.manual_seed(0)
    prior = GatedPixelCNN(5, channels=8, layers=2, dropout=0.5, num_classes=2)
    codes = torch.randint(0, 5, (7, 3, 3), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    prior.train()
    figures = prior_metrics(prior, codes, batch_size=3, labels=labels)
    assert prior.training  # the caller's mode is restored
    assert prior_metrics(prior, codes, batch_size=3, labels=labels) == figures  # no dropout while measuring
    prior.eval()
    with torch.no_grad():
        given = torch.log_softmax(prior(codes, label=labels).double(), 1).gather(1, codes[:, None]).sum()
        per_class = torch.stack(
            [
                torch.log_softmax(prior(codes, label=torch.full((7,), y)).double(), 1)
                .gather(1, codes[:, None])
                .flatten(1)
                .sum(1)
                for y in range(2)
            ]
        )  # (2, 7): log p(z | y) of each grid
    marginal = (torch.logsumexp(per_class, 0) - math.log(2)).sum()
    assert figures["bits_per_code_given_label"] == pytest.approx(-given.item() / codes.numel() / LN2, rel=1e-5)
    assert figures["bits_per_code"] == pytest.approx(-marginal.item() / codes.numel() / LN2, rel=1e-5)
