"""The training recipes: the pipeline's codes and its cache, the stage kinds, their shared pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from progvq.config import LOSS_PARTS, Config, load_config
from progvq.errors import RunError
from progvq.nets import to_unit
from progvq.quantize import QuantizerOutput
from progvq.run import Run
from stages import Pipeline, build_stage, check_run_config, shift_images
from stages.codes import CodeStage
from stages.common import pairs_grid, quantizer_metrics, uniform_rate
from stages.pixels import PixelStage
from stages.prior import PriorStage

from .conftest import TINY

CPU = torch.device("cpu")


def _pipeline(run_dir: Path) -> Pipeline:
    run = Run(run_dir)
    return Pipeline(run.config, run, CPU)


# --------------------------------------------------------------------------- the pipeline


@pytest.mark.trains
def test_codes_are_the_data_encoded_through_the_runs_levels(tiny_run: Path) -> None:
    pipeline = _pipeline(tiny_run)
    run, data = pipeline.run, pipeline.data
    levels = [run.level(k, CPU) for k in (1, 2)]
    for split, index in ((data.train, 0), (data.heldout, 1)):
        with torch.no_grad():
            z1 = levels[0].encode(to_unit(data.canvas.pad(split)))
            z2 = levels[1].encode(z1)
        assert torch.equal(pipeline.codes(1)[index], z1)
        assert torch.equal(pipeline.codes(2)[index], z2)
    train, heldout = pipeline.codes(2)
    assert train.shape == (128, 2, 2) and heldout.shape == (64, 2, 2) and train.dtype == torch.int64
    assert pipeline.codes(2) is pipeline.codes(2)  # encoded once


def test_shift_images_moves_pixels_and_shifts_zeros_in() -> None:
    images = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    down_right = shift_images(images, 1, 2)
    assert down_right[0, 0].tolist() == [[0, 0, 0, 0], [0, 0, 1, 2], [0, 0, 5, 6], [0, 0, 9, 10]]
    up_left = shift_images(images, -1, -1)
    assert up_left[0, 0].tolist() == [[6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0], [0, 0, 0, 0]]
    assert torch.equal(shift_images(images, 0, 0), images)


@pytest.mark.trains
def test_shifted_codes_are_the_shifted_images_encoded_and_the_prior_trains_on_them(tiny_run: Path) -> None:
    pipeline = _pipeline(tiny_run)
    run, data = pipeline.run, pipeline.data
    codes, index = pipeline.shifted_codes(2, 1)
    n = len(data.train)
    assert codes.shape == (8 * n, 2, 2) and torch.equal(index, torch.arange(n).repeat(8))
    levels = [run.level(k, CPU) for k in (1, 2)]
    with torch.no_grad():  # the last shift is (1, 1): down and right
        expected = levels[1].encode(levels[0].encode(to_unit(data.canvas.pad(shift_images(data.train, 1, 1)))))
    assert torch.equal(codes[-n:], expected)
    cfg = load_config(TINY, ["stages.prior.shifts=1"])
    stage = PriorStage(cfg, pipeline)
    assert stage.num_train == 9 * n and torch.equal(stage.train_codes[:n], pipeline.codes(2)[0])
    assert torch.equal(stage.train_codes[n:], codes) and stage.train_labels is None
    labelled = PriorStage(load_config(TINY, ["stages.prior.shifts=1", "stages.prior.class_conditional=true"]), pipeline)
    assert labelled.train_labels is not None and data.train_labels is not None
    assert torch.equal(labelled.train_labels, data.train_labels.repeat(9))  # a shifted image keeps its class


@pytest.mark.trains
def test_a_trained_stage_drops_what_was_cached_at_and_above_it(
    tiny_run: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = _pipeline(tiny_run)
    forgotten: list[str] = []
    forget = pipeline.run.forget
    monkeypatch.setattr(pipeline.run, "forget", lambda name: (forgotten.append(name), forget(name)))
    levels = {k: pipeline.level(k) for k in (1, 2)}
    codes = {k: pipeline.codes(k) for k in (1, 2)}
    pipeline.trained("prior")  # no level: nothing cached goes
    assert all(pipeline.level(k) is levels[k] and pipeline.codes(k) is codes[k] for k in (1, 2))
    pipeline.trained("2")
    assert pipeline.level(1) is levels[1] and pipeline.codes(1) is codes[1]
    assert pipeline.level(2) is not levels[2] and pipeline.codes(2) is not codes[2]
    assert all(torch.equal(a, b) for a, b in zip(pipeline.codes(2), codes[2], strict=True))  # read again, unchanged
    level_2, codes_2 = pipeline.level(2), pipeline.codes(2)
    pipeline.trained("1")
    assert pipeline.level(1) is not levels[1] and pipeline.codes(1) is not codes[1]
    assert pipeline.level(2) is not level_2 and pipeline.codes(2) is not codes_2
    assert forgotten == ["prior", "2", "1"]


# --------------------------------------------------------------------------- the stage kinds


@pytest.mark.trains
@pytest.mark.parametrize(("name", "kind"), [("1", PixelStage), ("2", CodeStage), ("prior", PriorStage)])
def test_build_stage_gives_each_kind_with_its_loss_parts(name: str, kind: type, tiny_run: Path) -> None:
    pipeline = _pipeline(tiny_run)
    cfg = pipeline.cfg
    torch.manual_seed(0)
    stage = build_stage(cfg, name, pipeline)
    assert type(stage) is kind and stage.name == name
    assert stage.num_train == 128 and stage.canvas == pipeline.data.canvas
    expected = LOSS_PARTS[Config.stage_kind(name)]
    assert stage.settings.loss_weights.keys() == expected.keys()
    parts, metrics = stage.loss(stage.model, stage.batch(torch.arange(4)))
    assert parts.keys() == expected.keys()
    assert all(value.dim() == 0 and torch.isfinite(value) for value in [*parts.values(), *metrics.values()])


@pytest.mark.trains
def test_stage_batches_are_what_each_kind_trains_on(tiny_run: Path) -> None:
    pipeline = _pipeline(tiny_run)
    cfg, data = pipeline.cfg, pipeline.data
    index = torch.tensor([5, 0, 7])
    pixels = build_stage(cfg, "1", pipeline).batch(index)
    assert torch.equal(pixels, to_unit(data.train[index]))  # in [-1, 1]
    codes = build_stage(cfg, "2", pipeline).batch(index)
    assert torch.equal(codes, pipeline.codes(1)[0][index])
    top, labels = build_stage(cfg, "prior", pipeline).batch(index)
    assert torch.equal(top, pipeline.codes(2)[0][index]) and labels is None


@pytest.mark.trains
def test_a_run_folder_refuses_another_config_unless_forced(tiny_run: Path) -> None:
    run = Run(tiny_run)
    assert check_run_config(load_config(TINY), run) is False  # the same config: nothing to write
    assert check_run_config(load_config(TINY, ["device=auto", "stages.1.log_every=1"]), run) is False  # runtime
    other = load_config(TINY, ["stages.1.quantizer.codes=32"])
    with pytest.raises(RunError, match=r"different config \(stages\.1\.quantizer\.codes: 16 there, 32 now\)"):
        check_run_config(other, run)
    assert check_run_config(other, run, force=True) is True


def test_a_new_run_folder_takes_the_config(tmp_path: Path) -> None:
    assert check_run_config(load_config(TINY), Run(tmp_path / "new")) is True


# --------------------------------------------------------------------------- shared pieces


def test_uniform_rate_known_answers() -> None:
    """log2 K bits per code position, divided by the data's own dims."""
    assert uniform_rate((2, 2), 16, (1, 4, 4)) == pytest.approx(1.0, abs=1e-12)
    assert uniform_rate((8, 8), 512, (1, 28, 28)) == pytest.approx(64 * 9 / 784, abs=1e-12)
    assert uniform_rate((4, 4), 2, (3, 8, 8)) == pytest.approx(16 / 192, abs=1e-12)


def test_pairs_grid_interleaves_rows_of_originals_and_reconstructions() -> None:
    originals = torch.arange(5).view(5, 1, 1, 1)
    recon = originals + 10
    grid = pairs_grid(originals, recon, per_row=2)
    assert grid.flatten().tolist() == [0, 1, 10, 11, 2, 3, 12, 13, 4, 14]


def test_quantizer_metrics_are_detached_floats() -> None:
    perplexity = torch.tensor(3.5, requires_grad=True)
    zero = torch.zeros(())
    out = QuantizerOutput(torch.zeros(1), torch.zeros(1), zero, zero, perplexity, torch.tensor(7))
    figures = quantizer_metrics(out)
    assert figures.keys() == {"perplexity", "codes_used"}
    assert not figures["perplexity"].requires_grad and figures["perplexity"].item() == 3.5
    assert figures["codes_used"].dtype == torch.float32 and figures["codes_used"].item() == 7.0
