"""The samples benchmark's own pieces: lossless file baselines, the CIFAR-10 classifier and its crops, table cells."""

from __future__ import annotations

import importlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # samples.py imports quality.py beside it, as a script does

samples = importlib.import_module("samples")


def _images(n: int, channels: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, 32, 32), dtype=torch.uint8, generator=gen)


def test_lossless_files_are_lossless_and_counted_per_dim() -> None:
    images = _images(3, 3, 0)
    # the PNG Pillow writes with these settings gives back the pixels
    buffer = io.BytesIO()
    Image.fromarray(images[0].permute(1, 2, 0).numpy(), "RGB").save(buffer, **samples.PNG_SETTINGS)
    back = torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())))).permute(2, 0, 1)
    assert torch.equal(back, images[0])
    figures = samples.lossless_baselines(images)
    assert figures["images"] == 3
    sizes = [samples.file_bytes(image, samples.PNG_SETTINGS) for image in images]
    assert figures["png_bits_per_dim"] == pytest.approx(8 * sum(sizes) / (3 * 3 * 32 * 32), abs=1e-4)
    # noise does not compress: a little over 8 bits per dim, the headers on top
    assert 8 < figures["png_bits_per_dim"] < 8.5
    assert 8 < figures["webp_bits_per_dim"] < 8.5


def test_lossless_files_of_flat_and_grey_images() -> None:
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    figures = samples.lossless_baselines(flat)
    assert figures["png_bits_per_dim"] < 0.5 and figures["webp_bits_per_dim"] < 0.5
    grey = samples.lossless_baselines(_images(2, 1, 1))
    assert 8 < grey["png_bits_per_dim"] < 9  # one byte a pixel, saved as a grey PNG


def test_crop_and_flip_moves_pixels_without_changing_them() -> None:
    images = _images(16, 3, 2)
    gen = torch.Generator().manual_seed(0)
    same = samples.crop_and_flip(images, 0, gen)  # no padding: each image as it is or mirrored
    for image, out in zip(images, same, strict=True):
        assert torch.equal(out, image) or torch.equal(out, image.flip(2))
    shifted = samples.crop_and_flip(images, 4, gen)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    # each output is a window of the padded image: its centre 24x24 lies inside the original, shifted
    for image, out in zip(images, shifted, strict=True):
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
        windows = [padded[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(2)) for w in windows)


def test_colour_classifier_gives_128_features_and_logits() -> None:
    model = samples.ColourClassifier()
    features, probs = samples.classify(model, _images(5, 3, 3))
    assert features.shape == (5, 128) and probs.shape == (5, 10)
    assert torch.allclose(probs.sum(1), torch.ones(5, dtype=torch.float64))


def test_bound_cell_sums_its_levels() -> None:
    assert samples.bound_cell({"0": 1.0, "1": 0.25, "2": 0.05, "total": 1.3}) == "1.3000 = 1.0000 + 0.2500 + 0.0500"
    assert samples.bound_cell({"total": 2.0}) == "2.0000"


def test_missing_optional_config_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(samples.DEFAULT_CONFIGS, "cifar10", ["configs/tiny.yaml", "configs/no-such-flat.yaml"])
    monkeypatch.setattr(samples, "OPTIONAL_CONFIGS", {"configs/no-such-flat.yaml"})
    assert samples.default_configs("cifar10") == [samples.ROOT / "configs" / "tiny.yaml"]
