"""Config loading, overrides and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from progvq.config import LevelConfig, load_config
from progvq.errors import ConfigError

from .conftest import ROOT, TINY
from .helpers import tiny_raw


def write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path



SHIPPED_CONFIGS = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_found() -> None:
    assert {"quickstart", "tiny", "shapes", "mnist", "cifar10"} <= set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.stage_names()[0] == "1" and cfg.stage_names()[-1] == "prior"
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
    # levels >= 2 decode codes, so their loss has no pixel mse part at all
    assert load_config(write(tmp_path, raw)).level(2).loss_weights == {"recon": 1.0, "codebook": 1.0, "commit": 0.5}


def test_overrides_apply_with_yaml_types() -> None:
    cfg = load_config(TINY, ["stages.1.steps=11", "stages.prior.pixelcnn.dropout=0.5", "data.path=some/dir", "seed=3"])
    assert cfg.level(1).steps == 11 and cfg.prior.model.dropout == 0.5 and cfg.seed == 3
    assert cfg.data.path == "some/dir"
    cfg = load_config(TINY, ["stages.1.quantizer.ema=false"])
    assert cfg.level(1).quantizer.ema is False
    cfg = load_config(
        TINY, ["stages.1.quantizer.codes=32", "stages.2.decoder={kind: autoregressive, pixelcnn: {layers: 3}}"]
    )
    assert cfg.level(1).codes == 32 and cfg.level(2).decoder.pixelcnn.layers == 3


def test_to_dict_round_trip() -> None:
    from progvq.config import config_from_dict

    cfg = load_config(TINY)
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("stages", "1", "quantizer", "codes", 1), "stages.1.quantizer.codes: must be >= 2, got 1"),
        (("stages", "1", "codez", 4), "stages.1.codez: unknown key"),
        (
            ("stages", "1", "quantizer", "codez", 4),
            (
                "stages.1.quantizer.codez: unknown key (known: codes, decay, dim, ema, init_from_data, restart, "
                "restart_every, restart_threshold)"
            ),
        ),
        (("stages", "1", "quantizer", "kind", "x"), "stages.1.quantizer.kind: must be one of vq, fsq, got 'x'"),
        (
            ("stages", "1", "quantizer", {"kind": "fsq", "levels": [8, 1]}),
            "stages.1.quantizer.levels: must be a non-empty list of integers >= 2, got [8, 1]",
        ),
        (
            ("stages", "1", "quantizer", {"kind": "fsq", "codes": 8}),
            "stages.1.quantizer.codes: unknown key (known: levels)",
        ),
        (
            ("stages", "1", "decoder", {"kind": "factorised"}),
            "stages.1.decoder.kind: must be logistic or pixelcnn (level 1 decodes pixels), got 'factorised'",
        ),
        (
            ("stages", "2", "decoder", {"kind": "logistic"}),
            (
                "stages.2.decoder.kind: must be one of factorised, autoregressive "
                "(level 2 decodes the codes of level 1), got 'logistic'"
            ),
        ),
        (
            ("stages", "2", "decoder", {"kind": "autoregressive", "pixelcnn": {"layers": 0}}),
            "stages.2.decoder.pixelcnn.layers: must be >= 1, got 0",
        ),
        (("stages", "prior", "shifts", 5), "stages.prior.shifts: must be in [0, 4], got 5"),
        (("stages", "prior", "shifts", -1), "stages.prior.shifts: must be in [0, 4], got -1"),
        (("stages", "1", "steps", "ten"), "stages.1.steps: expected an integer, got 'ten'"),
        (("stages", "1", "lr", True), "stages.1.lr: expected a number, got True"),
        (("stages", "1", "downsample", 3), "stages.1.downsample: must be a power of 2, got 3"),
        (
            ("stages", "2", "downsample", 8),
            "stages.2.downsample: must be such that data.size (16) is divisible by the total downsampling (32), got 8",
        ),
        (("stages", "1", "quantizer", "decay", 1.5), "stages.1.quantizer.decay: must be in (0, 1), got 1.5"),
        (
            ("stages", "1", "loss_weights", {"recon": 1, "kl": 1}),
            "stages.1.loss_weights.kl: this stage has no such loss part (its parts: recon, codebook, commit, mse)",
        ),
        (
            ("stages", "2", "loss_weights", {"mse": 1}),
            "stages.2.loss_weights.mse: this stage has no such loss part (its parts: recon, codebook, commit)",
        ),
        (("stages", "1", "loss_weights", {"commit": -1}), "stages.1.loss_weights.commit: must be >= 0, got -1.0"),
        (
            ("stages", "prior", "pixelcnn", "kernel_size", 4),
            "stages.prior.pixelcnn.kernel_size: must be odd and >= 3, got 4",
        ),
        (
            ("stages", "prior", "pixelcnn", "size", 4),
            "stages.prior.pixelcnn.size: unknown key (known: channels, dropout, kernel_size, layers)",
        ),
        (("stages", "prior", "kind", "made"), "stages.prior.kind: must be one of pixelcnn, got 'made'"),
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


def old_layout_raw() -> dict:
    """tiny.yaml as progvq 0.1 wrote it: codes/code_dim at a level's top, the decoder as a string beside
    its ``pixelcnn`` section, the prior's network keys at the top of its section, mse listed at every level."""
    raw = tiny_raw()
    for k in (1, 2):
        level = raw["stages"][k]
        quantizer = level.pop("quantizer")
        assert quantizer.pop("kind") == "vq"
        level["codes"], level["code_dim"] = quantizer.pop("codes"), quantizer.pop("dim")
        level["quantizer"] = quantizer
        level["decoder"] = "factorised"
        level["pixelcnn"] = {"channels": 8, "layers": 3, "kernel_size": 3, "dropout": 0.0}
        level["loss_weights"] = {"recon": 1.0, "codebook": 1.0, "commit": 0.25, "mse": 0.0}
    prior = raw["stages"]["prior"]
    del prior["kind"]
    prior.update(prior.pop("pixelcnn"))
    return raw


def test_old_layout_loads_as_the_kind_tagged_one(tmp_path: Path) -> None:
    # all but run_dir & co.
    assert load_config(write(tmp_path, old_layout_raw())).identity() == load_config(TINY).identity()
    raw = old_layout_raw()
    raw["stages"][2]["decoder"] = "autoregressive"
    cfg = load_config(write(tmp_path, raw))
    assert cfg.level(2).decoder.pixelcnn.channels == 8 and cfg.level(2).codes == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("stages", "1", "codes", 1), "stages.1.quantizer.codes: must be >= 2, got 1"),
        (("stages", "2", "code_dim", 0), "stages.2.quantizer.dim: must be >= 1, got 0"),
        (("stages", "prior", "kernel_size", 4), "stages.prior.pixelcnn.kernel_size: must be odd and >= 3, got 4"),
        (
            ("stages", "2", "loss_weights", {"mse": 1}),
            "stages.2.loss_weights.mse: this stage has no such loss part (its parts: recon, codebook, commit)",
        ),
    ],
)
def test_old_layout_errors_name_the_new_key_path(tmp_path: Path, change: tuple, message: str) -> None:
    raw = old_layout_raw()
    *path, key, value = change
    node = raw
    for part in path:
        node = node[int(part) if part.isdigit() else part]
    node[key] = value
    cfg_path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path)
    assert str(err.value) == f"{cfg_path}: {message}"
