"""Config loading, overrides and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from progvq.config import LevelConfig, load_config
from progvq.errors import ConfigError

from .conftest import ROOT, TINY


def write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("name", ["tiny", "shapes", "mnist"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.stage_names() == ["1", "2", "prior"]
    assert cfg.run_dir == f"runs/{name}"
    assert isinstance(cfg.level(1), LevelConfig)


def test_defaults_fill_missing_fields(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"stages": {1: {"downsample": 4}, "prior": {}}}))
    assert cfg.level(1).codes == LevelConfig().codes
    assert cfg.level(1).loss_weights == {"recon": 1.0, "codebook": 1.0, "commit": 0.25, "mse": 0.0}
    assert cfg.prior.loss_weights == {"nll": 1.0}
    assert cfg.total_downsample() == 4


def test_partial_loss_weights_keep_the_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["stages.1.loss_weights.mse=5"])
    assert cfg.level(1).loss_weights == {"recon": 1.0, "codebook": 1.0, "commit": 0.25, "mse": 5.0}
    raw = tiny_raw()
    raw["stages"][2]["loss_weights"] = {"commit": 0.5}
    assert load_config(write(tmp_path, raw)).level(2).loss_weights == {"recon": 1.0, "codebook": 1.0, "commit": 0.5, "mse": 0.0}


def test_overrides_apply_with_yaml_types() -> None:
    cfg = load_config(TINY, ["stages.1.steps=11", "stages.prior.dropout=0.5", "data.path=some/dir", "seed=3"])
    assert cfg.level(1).steps == 11 and cfg.prior.dropout == 0.5 and cfg.seed == 3
    assert cfg.data.path == "some/dir"
    cfg = load_config(TINY, ["stages.1.quantizer.ema=false"])
    assert cfg.level(1).quantizer.ema is False


def test_to_dict_round_trip() -> None:
    from progvq.config import config_from_dict

    cfg = load_config(TINY)
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("stages", "1", "codes", 1), "stages.1.codes: must be >= 2, got 1"),
        (("stages", "1", "codez", 4), "stages.1.codez: unknown key"),
        (("stages", "1", "steps", "ten"), "stages.1.steps: expected an integer, got 'ten'"),
        (("stages", "1", "lr", True), "stages.1.lr: expected a number, got True"),
        (("stages", "1", "downsample", 3), "stages.1.downsample: must be a power of 2, got 3"),
        (("stages", "2", "downsample", 8), "stages.2.downsample: must be such that data.size (16) is divisible by the total downsampling (32), got 8"),
        (("stages", "1", "quantizer", {"decay": 1.5}), "stages.1.quantizer.decay: must be in (0, 1), got 1.5"),
        (("stages", "1", "loss_weights", {"recon": 1, "kl": 1}), "stages.1.loss_weights.kl: unknown loss part"),
        (("stages", "2", "loss_weights", {"mse": 1}), "stages.2.loss_weights.mse: must be 0 (only level 1 decodes pixels), got 1.0"),
        (("stages", "1", "loss_weights", {"commit": -1}), "stages.1.loss_weights.commit: must be >= 0, got -1.0"),
        (("stages", "prior", "kernel_size", 4), "stages.prior.kernel_size: must be odd and >= 3, got 4"),
        (("data", "source", "web"), "data.source: must be one of shapes, mnist, folder, array, got 'web'"),
        (("data", "heldout", 500), "data.count: must be > data.heldout (500), got 192"),
        (("device", None, "tpu"), "device: must be one of auto, cpu, cuda, mps, got 'tpu'"),
        (("colour", None, "red"), "colour: unknown key"),
    ],
)
def test_bad_values_name_file_key_and_value(tmp_path: Path, change: tuple, message: str) -> None:
    raw = tiny_raw()
    *path, value = change
    node = raw
    path = [p for p in path if p is not None]
    for part in path[:-1]:
        node = node[int(part) if part.isdigit() else part]
    node[int(path[-1]) if path[-1].isdigit() else path[-1]] = value
    cfg_path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    assert str(err.value).startswith(f"{cfg_path}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_stage_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stages.prior: missing"):
        load_config(write(tmp_path, {"stages": {1: {}}}))
    with pytest.raises(ConfigError, match="stages.3: unknown stage"):
        load_config(write(tmp_path, {"stages": {1: {}, 3: {}, "prior": {}}}))
    with pytest.raises(ConfigError, match="at least one level stage"):
        load_config(write(tmp_path, {"stages": {"prior": {}}}))


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"malformed YAML at line 2, column 7: mapping values are not allowed here"):
        load_config(write(tmp_path, "stages:\n  1: a: b\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(TINY, ["stages.1.steps"])
