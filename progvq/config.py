"""Typed configuration: YAML loading, ``--set`` overrides and validation.

A config names the data, one section per level stage (``stages.1`` ..
``stages.L``) and the prior stage (``stages.prior``). Defaults live here and
nowhere else; every field a YAML file may hold is a dataclass field below.

Every mistake raises :class:`~progvq.errors.ConfigError` with one line that
names the file, the key and the value, e.g.::

    configs/x.yaml: stages.1.codes: must be >= 2, got 1
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DATA_SOURCES = ("shapes", "mnist", "folder", "array")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class QuantizerConfig:
    """Vector-quantiser options (see :class:`progvq.quantize.VectorQuantizer`)."""

    ema: bool = True  # EMA codebook updates instead of the codebook loss
    decay: float = 0.99  # EMA decay for codebook statistics and usage
    init_from_data: bool = True  # first batch's encoder outputs seed the codebook
    restart: bool = True  # dead codes jump to recent encoder outputs
    restart_threshold: float = 1.0  # dead: fewer assignments per batch (EMA) than this
    restart_every: int = 50  # training steps between dead-code checks


@dataclass
class TrainConfig:
    """Optimisation fields shared by every stage kind."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100  # linear warm-up steps, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    log_every: int = 50  # scalars to TensorBoard
    eval_every: int = 500  # held-out metrics and images
    checkpoint_every: int = 500


@dataclass
class LevelConfig(TrainConfig):
    """Stage k: an encoder/decoder pair for level k under a uniform prior."""

    downsample: int = 2  # grid of level k-1 / grid of level k (a power of 2)
    codes: int = 512  # codebook size K_k
    code_dim: int = 64  # codebook vector size
    hidden: int = 128  # channels of the encoder and decoder trunks
    res_blocks: int = 2  # residual blocks at the code resolution, each side
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    # commit is the VQ-VAE beta; mse (level 1 only) adds squared error of the decoder's
    # point estimate in [-1, 1] to the pixel likelihood
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"recon": 1.0, "codebook": 1.0, "commit": 0.25, "mse": 0.0}
    )


@dataclass
class PriorConfig(TrainConfig):
    """The last stage: a gated PixelCNN over the top level's codes."""

    channels: int = 128
    layers: int = 8
    kernel_size: int = 3
    dropout: float = 0.1
    loss_weights: dict[str, float] = field(default_factory=lambda: {"nll": 1.0})


@dataclass
class DataConfig:
    """Where images come from and how they are split."""

    source: str = "shapes"  # shapes | mnist | folder | array
    path: str | None = None  # folder (mnist, folder) or file (array)
    prefix: str = "t10k"  # mnist: files {prefix}-images-idx3-ubyte[.gz]
    key: str | None = None  # array: the .npz entry to read
    channels: int = 1  # shapes and folder: 1 (grey) or 3 (RGB)
    size: int | None = None  # centre-pad images to size x size (shapes: their size)
    count: int = 6000  # shapes: how many to generate
    heldout: int = 500  # the last `heldout` images are the held-out split
    limit: int | None = None  # use only the first `limit` images
    seed: int = 0  # shapes: generator seed


@dataclass
class SampleConfig:
    """Defaults for ``progvq sample`` (the command line may override them)."""

    code_temperature: float = 1.0  # temperature of the code decoders of levels >= 2


@dataclass
class Config:
    """A whole run: data, seed, device and every stage."""

    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, Any] = field(default_factory=dict)  # "1".."L" -> LevelConfig, "prior" -> PriorConfig
    sample: SampleConfig = field(default_factory=SampleConfig)
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda
    run_dir: str | None = None  # default: runs/<config file stem>

    @property
    def num_levels(self) -> int:
        """L, the number of latent levels."""
        return len(self.stages) - 1

    def level(self, k: int) -> LevelConfig:
        """The config of level stage ``k`` (1-based)."""
        return self.stages[str(k)]

    @property
    def prior(self) -> PriorConfig:
        return self.stages["prior"]

    def total_downsample(self) -> int:
        """Image side / top grid side: the product of every level's downsampling."""
        return math.prod(self.level(k).downsample for k in range(1, self.num_levels + 1))

    def stage_names(self) -> list[str]:
        """Stages in training order: ``["1", ..., "L", "prior"]``."""
        return [str(k) for k in range(1, self.num_levels + 1)] + ["prior"]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML- and ``weights_only``-safe)."""
        out = dataclasses.asdict(self)
        out["stages"] = {name: dataclasses.asdict(self.stages[name]) for name in self.stage_names()}
        return out


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug, not a user error


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if str(key) not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}.{key}: unknown key (known: {known})")
    kwargs = {str(k): _coerce(v, hints[str(k)], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _check(cond: bool, where: str, value: Any, need: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: must be {need}, got {value!r}")


def _validate_train(cfg: TrainConfig, where: str) -> None:
    for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
        value = getattr(cfg, name)
        _check(value >= 1, f"{where}.{name}", value, ">= 1")
    _check(cfg.lr > 0, f"{where}.lr", cfg.lr, "> 0")
    _check(cfg.warmup >= 0, f"{where}.warmup", cfg.warmup, ">= 0")
    _check(0 <= cfg.min_lr_ratio <= 1, f"{where}.min_lr_ratio", cfg.min_lr_ratio, "in [0, 1]")
    _check(cfg.weight_decay >= 0, f"{where}.weight_decay", cfg.weight_decay, ">= 0")
    _check(cfg.grad_clip >= 0, f"{where}.grad_clip", cfg.grad_clip, ">= 0")


def _validate_weights(cfg: LevelConfig | PriorConfig, where: str) -> None:
    """Check the loss weights; parts a config leaves out keep their default weights."""
    defaults = type(cfg)().loss_weights
    for name, value in cfg.loss_weights.items():
        if name not in defaults:
            raise ConfigError(f"{where}.loss_weights.{name}: unknown loss part (known: {', '.join(defaults)})")
        _check(value >= 0, f"{where}.loss_weights.{name}", value, ">= 0")
    cfg.loss_weights = {**defaults, **cfg.loss_weights}


def _validate(cfg: Config) -> None:
    d = cfg.data
    _check(d.source in DATA_SOURCES, "data.source", d.source, "one of " + ", ".join(DATA_SOURCES))
    _check(d.channels in (1, 3), "data.channels", d.channels, "1 or 3")
    _check(d.heldout >= 1, "data.heldout", d.heldout, ">= 1")
    _check(d.count >= 2, "data.count", d.count, ">= 2")
    if d.source == "shapes":
        _check(d.count > d.heldout, "data.count", d.count, f"> data.heldout ({d.heldout})")
    else:
        _check(d.path is not None, "data.path", d.path, f"a path for source {d.source!r}")
    if d.size is not None:
        _check(d.size >= 4, "data.size", d.size, ">= 4")
    if d.limit is not None:
        _check(d.limit > d.heldout, "data.limit", d.limit, f"> data.heldout ({d.heldout})")
    _check(cfg.sample.code_temperature >= 0, "sample.code_temperature", cfg.sample.code_temperature, ">= 0")
    _check(cfg.device in DEVICES, "device", cfg.device, "one of " + ", ".join(DEVICES))

    factor = 1
    for name in cfg.stage_names()[:-1]:
        level: LevelConfig = cfg.stages[name]
        where = f"stages.{name}"
        _validate_train(level, where)
        ds = level.downsample
        _check(ds >= 1 and ds & (ds - 1) == 0, f"{where}.downsample", ds, "a power of 2")
        if name == "1":
            _check(ds >= 2, f"{where}.downsample", ds, ">= 2 (level 1 must be smaller than the image)")
        _check(level.codes >= 2, f"{where}.codes", level.codes, ">= 2")
        for key in ("code_dim", "hidden", "res_blocks"):
            value = getattr(level, key)
            _check(value >= (0 if key == "res_blocks" else 1), f"{where}.{key}", value, ">= 1" if key != "res_blocks" else ">= 0")
        q = level.quantizer
        _check(0 < q.decay < 1, f"{where}.quantizer.decay", q.decay, "in (0, 1)")
        _check(q.restart_every >= 1, f"{where}.quantizer.restart_every", q.restart_every, ">= 1")
        _check(q.restart_threshold >= 0, f"{where}.quantizer.restart_threshold", q.restart_threshold, ">= 0")
        _validate_weights(level, where)
        if name != "1":
            mse = level.loss_weights["mse"]
            _check(mse == 0, f"{where}.loss_weights.mse", mse, "0 (only level 1 decodes pixels)")
        factor *= ds
        if d.size is not None:
            _check(
                d.size % factor == 0,
                f"{where}.downsample",
                ds,
                f"such that data.size ({d.size}) is divisible by the total downsampling ({factor})",
            )
    p: PriorConfig = cfg.stages["prior"]
    _validate_train(p, "stages.prior")
    for key in ("channels", "layers"):
        _check(getattr(p, key) >= 1, f"stages.prior.{key}", getattr(p, key), ">= 1")
    _check(p.kernel_size >= 3 and p.kernel_size % 2 == 1, "stages.prior.kernel_size", p.kernel_size, "odd and >= 3")
    _check(0 <= p.dropout < 1, "stages.prior.dropout", p.dropout, "in [0, 1)")
    _validate_weights(p, "stages.prior")


def config_from_dict(raw: Any) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (keys without a file prefix)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"top level: expected a mapping, got {raw!r}")
    raw = dict(raw)
    stages_raw = raw.pop("stages", None)
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"stages: expected a mapping of stages (1, 2, ..., prior), got {stages_raw!r}")
    cfg = _build(Config, raw, "config")
    names = [str(k) for k in stages_raw]
    if "prior" not in names:
        raise ConfigError("stages.prior: missing (every run ends with a prior stage)")
    levels = sorted((n for n in names if n != "prior"), key=lambda n: (not n.isdigit(), n))
    expected = [str(k) for k in range(1, len(levels) + 1)]
    for got, want in zip(levels, expected, strict=True):
        if got != want:
            raise ConfigError(f"stages.{got}: unknown stage (stages are 1, 2, ... numbered from 1 without gaps, and prior)")
    if not levels:
        raise ConfigError("stages: at least one level stage (stages.1) is needed")
    stages: dict[str, Any] = {}
    for key, value in stages_raw.items():
        name = str(key)
        cls = PriorConfig if name == "prior" else LevelConfig
        stages[name] = _build(cls, value, f"stages.{name}")
    cfg.stages = {name: stages[name] for name in expected + ["prior"]}
    _validate(cfg)
    return cfg


def _strip_prefix(err: ConfigError) -> str:
    return str(err).removeprefix("config.")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stages.1.steps=500"`` -> (["stages", "1", "steps"], 500); the value is YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. stages.1.steps=500")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: take the text as it is
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (stage keys compared as text)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[:i])} is not a mapping")
            match = next((k for k in node if str(k) == part), None)
            if match is None:
                node[part] = {}
                match = part
            if node[match] is None:
                node[match] = {}
            node = node[match]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is not a mapping")
        last = next((k for k in node if str(k) == path[-1]), path[-1])
        node[last] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate.

    Errors name the file, e.g. ``configs/a.yaml: stages.1.codes: must be >= 2, got 1``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        raw = apply_overrides(raw, overrides or [])
        cfg = config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {_strip_prefix(err)}") from None
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / path.stem)
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
