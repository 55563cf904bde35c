"""The hierarchy: shapes at the data's own size, given codes kept at every level, labels for the prior.

Most tests build a hierarchy from configs/tiny.yaml's models (freshly initialised, no
training), on a canvas that pads the 14x14 images to the 16x16 the levels take; what
they check holds for any weights. One test loads the trained tiny run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from progvq.build import build_levels, build_prior
from progvq.canvas import Canvas
from progvq.config import load_config
from progvq.data import load_dataset
from progvq.errors import RunError
from progvq.hierarchy import Hierarchy
from progvq.pixelcnn import GatedPixelCNN

from .conftest import TINY

CANVAS = Canvas((1, 14, 14), (1, 16, 16))
#: a third level under the prior: 16x16 pixels -> 4x4 -> 2x2 -> 1x1 codes
THIRD = "stages.3={downsample: 2, hidden: 8, res_blocks: 1, quantizer: {kind: vq, codes: 4, dim: 4}}"


def _hierarchy(*overrides: str, num_classes: int = 0, seed: int = 0) -> Hierarchy:
    """configs/tiny.yaml's levels and prior (with ``overrides``), seeded, in eval mode, on :data:`CANVAS`."""
    cfg = load_config(TINY, list(overrides))
    torch.manual_seed(seed)
    levels = [level.eval() for level in build_levels(cfg)]
    if num_classes:
        prior = GatedPixelCNN(cfg.level(cfg.num_levels).codes, channels=4, layers=1, num_classes=num_classes)
    else:
        prior = build_prior(cfg)
    return Hierarchy(cfg, levels, prior.eval(), CANVAS)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *CANVAS.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _given(model: Hierarchy, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes of level ``k`` (n, h_k, w_k) and a mask keeping about half of them (some of each)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *model.grid_shape(k))
    codes = torch.randint(0, model.levels[k - 1].quantizer.num_codes, shape, generator=gen)
    mask = torch.rand(shape, generator=gen) < 0.5
    mask.view(-1)[0], mask.view(-1)[-1] = True, False
    return codes, mask


# --------------------------------------------------------------------------- shapes


def test_encode_and_decode_take_and_give_the_datas_own_size() -> None:
    model = _hierarchy(THIRD)
    assert model.image_shape == (1, 14, 14) and model.num_levels == 3
    assert [model.grid_shape(k) for k in range(4)] == [(16, 16), (4, 4), (2, 2), (1, 1)]
    images = _images(5)
    codes = model.encode(images)
    assert [tuple(z.shape) for z in codes] == [(5, 4, 4), (5, 2, 2), (5, 1, 1)]
    assert all(z.dtype == torch.int64 for z in codes)
    for k, z in enumerate(codes, start=1):
        assert int(z.min()) >= 0 and int(z.max()) < model.levels[k - 1].quantizer.num_codes
        out = model.decode(z, k)
        assert out.shape == (5, 1, 14, 14) and out.dtype == torch.uint8
        assert torch.equal(model.reconstruct(images, level=k), out)
    # the split in batches encodes as the whole
    assert all(torch.equal(a, b) for a, b in zip(model.encode_split(images, 2), codes, strict=True))
    assert model.sample(3, seed=0).shape == (3, 1, 14, 14)


def test_level_1_sees_the_images_centred_on_zeros() -> None:
    model = _hierarchy()
    images = _images(2)
    with torch.no_grad():
        direct = model.levels[0].encode(CANVAS.pad(images).float() * (2 / 255) - 1)
    assert torch.equal(model.encode(images)[0], direct)
    with pytest.raises(ValueError, match="expected images of shape"):
        model.encode(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))  # the padded size is not the data's


@pytest.mark.trains
def test_a_trained_run_loads_with_its_shapes(tiny_run: Path) -> None:
    model = Hierarchy.load(tiny_run)
    assert model.num_levels == 2 and model.prior is not None and model.num_classes == 0
    assert model.image_shape == (1, 16, 16) and not model.canvas.is_padded
    data = load_dataset(model.config.data, model.config.total_downsample())
    codes = model.encode(data.heldout[:6])
    assert [tuple(z.shape) for z in codes] == [(6, 4, 4), (6, 2, 2)]
    assert model.decode(codes[-1], 2).shape == (6, 1, 16, 16)
    lower = Hierarchy.load(tiny_run, num_levels=1, with_prior=False)
    assert lower.num_levels == 1 and lower.prior is None
    assert torch.equal(lower.encode(data.heldout[:6])[0], codes[0])
    with pytest.raises(RunError, match=r"no level 3 \(the run has levels 1\.\.2\)"):
        Hierarchy.load(tiny_run, num_levels=3)


# --------------------------------------------------------------------------- given codes


def test_decode_keeps_the_given_codes_at_every_level_and_returns_them() -> None:
    model = _hierarchy(THIRD)
    top = model.encode(_images(4))[-1]
    known = {k: _given(model, k, 4, seed=k) for k in (1, 2)}
    pixels, drawn = model.decode(
        top, 3, code_temperature=1.0, generator=torch.Generator().manual_seed(5), known=known, all_levels=True
    )
    assert [tuple(z.shape) for z in drawn] == [(4, 4, 4), (4, 2, 2), (4, 1, 1)]
    assert torch.equal(drawn[-1], top)
    for k, (codes, mask) in known.items():
        assert torch.equal(drawn[k - 1][mask], codes[mask]), k
    # the pixels are level 1's decoder mean of the level-1 codes returned
    assert torch.equal(pixels, model.decode(drawn[0], 1))
    # everything known: the given codes come back whole, whatever the seed
    full = {k: (codes, torch.ones_like(mask)) for k, (codes, mask) in known.items()}
    for seed in (0, 1):
        _, again = model.decode(
            top, 3, code_temperature=1.0, generator=torch.Generator().manual_seed(seed), known=full, all_levels=True
        )
        assert all(torch.equal(again[k - 1], codes) for k, (codes, _) in known.items())
    # without all_levels only the images
    again_pixels = model.decode(top, 3, code_temperature=1.0, generator=torch.Generator().manual_seed(5), known=known)
    assert torch.equal(again_pixels, pixels)


def test_sample_keeps_the_given_top_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _hierarchy()
    codes, mask = _given(model, 2, 6, seed=3)
    tops: list[torch.Tensor] = []
    decode = model.decode

    def spy(top: torch.Tensor, level: int, **kwargs: object) -> torch.Tensor:
        tops.append(top.clone())
        return decode(top, level, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "decode", spy)
    for seed in (0, 1, 2):
        model.sample(6, seed=seed, known={2: (codes, mask)})
    assert len(tops) == 3
    for top in tops:
        assert torch.equal(top[mask], codes[mask])
    # the same seed draws the same free codes; the known ones are kept whatever the seed
    model.sample(6, seed=0, known={2: (codes, mask)})
    assert torch.equal(tops[-1], tops[0])


# --------------------------------------------------------------------------- labels


def test_labels_for_a_class_conditional_prior() -> None:
    model = _hierarchy(num_classes=3)
    assert model.num_classes == 3
    assert model.labels_for(7, None).tolist() == [0, 1, 2, 0, 1, 2, 0]  # the classes in turn
    assert model.labels_for(4, 2).tolist() == [2, 2, 2, 2]
    assert model.labels_for(3, torch.tensor([2, 0, 1])).tolist() == [2, 0, 1]
    assert model.labels_for(2, [1, 1]).dtype == torch.int64
    assert model.sample(4, seed=0, label=1).shape == (4, 1, 14, 14)


@pytest.mark.parametrize(
    ("label", "needle"),
    [
        (3, "label 3 is out of range: this run's prior has classes 0..2"),
        (-1, "label -1 is out of range: this run's prior has classes 0..2"),
        (torch.tensor([0, 1, 5, 2]), "label 5 is out of range"),
        (torch.tensor([0, 1]), r"labels must be one class or 4 classes, got shape \(2,\)"),
        (torch.zeros(4, 1, dtype=torch.long), r"labels must be one class or 4 classes, got shape \(4, 1\)"),
    ],
)
def test_labels_for_refuses_labels_the_prior_cannot_take(label: object, needle: str) -> None:
    model = _hierarchy(num_classes=3)
    with pytest.raises(RunError, match=needle):
        model.labels_for(4, label)  # type: ignore[arg-type]
    with pytest.raises(RunError, match=needle):
        model.sample(4, label=label)  # type: ignore[arg-type]


def test_an_unconditional_prior_takes_no_label() -> None:
    model = _hierarchy()
    assert model.num_classes == 0 and model.labels_for(5, None) is None
    with pytest.raises(RunError, match=r"not class-conditional \(stages\.prior\.class_conditional: false\)"):
        model.labels_for(5, 1)
    with pytest.raises(RunError, match="not class-conditional"):
        model.sample(2, label=0)


def test_a_hierarchy_without_a_prior_refuses_to_sample_and_to_bound() -> None:
    model = Hierarchy(load_config(TINY), _hierarchy().levels, None, CANVAS)  # type: ignore[arg-type]
    assert model.num_classes == 0
    with pytest.raises(RunError, match="no trained prior"):
        model.sample(2)
    with pytest.raises(RunError, match="needs the prior"):
        model.nll(_images(2))


def test_sample_takes_the_runs_temperatures_unless_given() -> None:
    """``sample`` settings of the config are the defaults of Hierarchy.sample; given values win."""
    cold = _hierarchy("sample={temperature: 0, code_temperature: 0, pixel_temperature: 0}")
    # every temperature 0: argmax everywhere, so the seed cannot matter
    assert torch.equal(cold.sample(6, seed=1), cold.sample(6, seed=2))
    assert torch.equal(cold.sample(6, seed=1), cold.sample(6, seed=7, temperature=0, code_temperature=0))
    warm = _hierarchy()
    assert warm.config.sample.temperature == 1.0
    assert torch.equal(warm.sample(6, seed=1), warm.sample(6, seed=1, temperature=1.0, code_temperature=1.0))
    # the same weights: given temperatures of 0 make the warm run draw what the cold one draws
    assert torch.equal(warm.sample(6, seed=3, temperature=0, code_temperature=0), cold.sample(6, seed=3))


def test_pixel_temperature_draws_the_pixels_of_a_pixelcnn_decoder() -> None:
    decoder = "stages.1.decoder={kind: pixelcnn, pixelcnn: {channels: 4, layers: 1, kernel_size: 3}, mixture: 2}"
    model = _hierarchy(decoder, "stages.1.loss_weights.mse=1")
    gen = torch.Generator().manual_seed(0)
    top = torch.randint(0, model.config.level(2).codes, (3, *model.grid_shape(2)), generator=gen)
    mean = model.decode(top, 2)
    drawn = model.decode(top, 2, pixel_temperature=1.0, generator=torch.Generator().manual_seed(0))
    again = model.decode(top, 2, pixel_temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert mean.shape == drawn.shape == (3, *CANVAS.shape) and torch.equal(drawn, again)
    assert not torch.equal(mean, drawn)  # an untrained mixture is wide: draws are not its mean
    # the point estimate is the level's mean of the same codes, cropped to the data's size
    codes = model.levels[1].decode(top, 0.0)
    assert torch.equal(mean, CANVAS.crop(model.levels[0].decode(codes, 0.0)))
