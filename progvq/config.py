"""Typed configuration: YAML loading, ``--set`` overrides and validation.

A config names the data, one section per level stage (``stages.1`` ..
``stages.L``) and the prior stage (``stages.prior``). Defaults live here and
nowhere else; every field a YAML file may hold is a dataclass field below.

Every mistake raises :class:`~progvq.errors.ConfigError` with one line that
names the file, the key and the value, e.g.::

    configs/x.yaml: stages.1.quantizer.codes: must be >= 2, got 1
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from .data import DEFAULT_PATHS, LABELLED_SOURCES, SHAPES_DEFAULT_SIZE, SHAPES_MIN_SIZE, SOURCES, DataConfig
from .errors import ConfigError, ProgvqError
from .fileio import read_limited
from .folder import CROPS, ON_UNREADABLE, RESIZES
from .kinds import DECODERS, PIXEL_DECODERS, PRIORS, QUANTIZERS, Trunk
from .pixelcnn import PixelCNNConfig, covers, layers_to_cover, reach_needed
from .quantize import VQConfig
from .registry import Registry

DEVICES = ("auto", "cpu", "cuda", "mps")
#: auto: bf16 where the hardware runs it natively (AMX or AVX-512 BF16, bf16 tensor cores), else fp32
PRECISIONS = ("auto", "fp32", "bf16")
DATA_SOURCES = SOURCES.kinds()

#: The loss parts each stage kind returns, with their default weights: the one place for both.
#: commit is the VQ-VAE beta; mse (level 1) adds the squared error of the decoder's point estimate
#: in [-1, 1] to the pixel likelihood.
LOSS_PARTS: dict[str, dict[str, float]] = {
    "pixels": {"recon": 1.0, "codebook": 1.0, "commit": 0.25, "mse": 0.0},
    "codes": {"recon": 1.0, "codebook": 1.0, "commit": 0.25},
    "prior": {"nll": 1.0},
}

#: The largest ``stages.prior.shifts``: each shift adds a copy of the training set's codes.
MAX_SHIFTS = 4

#: A run's config.yaml section of facts found in the data (its image shapes); never a setting.
RECORDED_KEY = "recorded"

#: Settings of how a run is computed, not of what it is: changing them never refuses a run folder.
RUNTIME_KEYS = ("device", "run_dir", "sample")
RUNTIME_STAGE_KEYS = ("precision", "log_every", "eval_every", "checkpoint_every")


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
    # bf16: forward and backward under bfloat16 autocast; the quantiser's distances and
    # codebook statistics and every likelihood stay fp32. auto: bf16 only where the
    # hardware runs it natively (AMX or AVX-512 BF16 CPUs, bf16 tensor cores), else fp32
    precision: str = "auto"
    # weights of the stage kind's loss parts (LOSS_PARTS); parts left out keep their defaults
    loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class LevelConfig(TrainConfig):
    """Stage k: an encoder/decoder pair for level k under a uniform prior."""

    downsample: int = 2  # grid of level k-1 / grid of level k (a power of 2)
    hidden: int = 128  # channels of the encoder and decoder trunks
    res_blocks: int = 2  # residual blocks at the code resolution, each side
    quantizer: Annotated[Any, QUANTIZERS] = field(default_factory=VQConfig)
    # D_k; null: the level's default, logistic (pixels) for level 1, factorised above
    decoder: Annotated[Any, DECODERS] = None

    @property
    def codes(self) -> int:
        """K_k, the number of codes of this level's quantiser."""
        return int(self.quantizer.num_codes)

    @property
    def code_dim(self) -> int:
        """Channels of the vectors the encoder produces for the quantiser."""
        return int(self.quantizer.dim)

    def trunk(self) -> Trunk:
        return Trunk(self.downsample, self.hidden, self.res_blocks)


@dataclass
class PriorConfig(TrainConfig):
    """The last stage: an autoregressive model of the top level's codes.

    In YAML its network sits under a key named after its kind: ``kind: pixelcnn`` and
    ``pixelcnn: {channels: ..., layers: ...}``.
    """

    kind: str = "pixelcnn"
    model: Any = field(default_factory=PixelCNNConfig)  # the kind's config dataclass
    # condition the prior on the image's class (data with labels: shapes, mnist with its labels file)
    class_conditional: bool = False
    # train also on the top codes of the training images shifted by up to this many pixels in each
    # direction (zeros shifted in): (2 shifts + 1)^2 times the codes, for a prior fit on few images
    shifts: int = 0


@dataclass
class SampleConfig:
    """Defaults for ``progvq sample`` (the command line may override them)."""

    temperature: float = 1.0  # temperature of the prior
    code_temperature: float = 1.0  # temperature of the code decoders of levels >= 2
    # temperature of the pixel decoder: 0 shows its point estimate (a logistic's location, a pixelcnn
    # decoder's mean), t > 0 draws the pixels
    pixel_temperature: float = 0.0
    # class guidance of a class-conditional prior: each top code from p(code | y)^(1+w) / p(code)^w
    # (GatedPixelCNN.sample); 0 draws from p(code | y) itself
    guidance: float = 0.0


@dataclass
class Config:
    """A whole run: data, seed, device and every stage."""

    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, Any] = field(default_factory=dict)  # "1".."L" -> LevelConfig, "prior" -> PriorConfig
    sample: SampleConfig = field(default_factory=SampleConfig)
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda | mps; auto takes CUDA, else MPS, else the CPU
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

    @staticmethod
    def stage_kind(name: str) -> str:
        """``pixels`` (stage 1), ``codes`` (stages 2..L) or ``prior``: what the stage trains, and so its loss parts."""
        return "prior" if name == "prior" else ("pixels" if name == "1" else "codes")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML- and ``weights_only``-safe), kind-tagged sections as in YAML."""
        out = _plain(self)
        out["stages"] = {name: _plain(self.stages[name]) for name in self.stage_names()}
        return out

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without the runtime settings: what a run folder must agree with."""
        out = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}
        out["stages"] = {
            n: {k: v for k, v in st.items() if k not in RUNTIME_STAGE_KEYS} for n, st in out["stages"].items()
        }
        return out


def _registry(tp: Any) -> Registry | None:
    """The registry of an ``Annotated[Any, REGISTRY]`` field, else None."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, Registry)), None)
    return None


def _plain(obj: Any) -> Any:
    """Config objects as plain data: dataclasses as dicts, a kind-tagged section with its ``kind`` first."""
    if isinstance(obj, PriorConfig):
        out = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "model"}
        out[obj.kind] = _plain(obj.model)
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        hints = typing.get_type_hints(type(obj), include_extras=True)
        out = {}
        for f in dataclasses.fields(obj):
            value, registry = getattr(obj, f.name), _registry(hints[f.name])
            tagged = registry is not None and value is not None
            out[f.name] = {"kind": registry.kind_of(value), **_plain(value)} if tagged else _plain(value)
        return out
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- parsing

#: Largest config file read: a config is a page of YAML; /dev/zero or a data file given by mistake must not
#: fill memory.
CONFIG_MAX_BYTES = 1 << 20
#: Longest rendering of a user's key or value in an error message.
_SHOW_MAX = 80
#: Integers must fit in 64 bits: torch, numpy and the RNGs take nothing wider.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
#: Seeds must fit in 32 bits (numpy's legacy seeding) and be non-negative.
_SEED_MAX = 2**32 - 1


def _bounded_repr() -> reprlib.Repr:
    """A ``repr`` that renders a bounded part of any value: a YAML alias bomb ("billion laughs") is a
    small file whose values expand to billions of items, which a plain ``repr`` would try to spell out."""
    shown = reprlib.Repr()
    shown.maxlevel = 3
    shown.maxlist = shown.maxtuple = shown.maxdict = shown.maxset = 4
    shown.maxstring = shown.maxother = shown.maxlong = _SHOW_MAX
    return shown


_BOUNDED = _bounded_repr()


def show(value: Any) -> str:
    """``repr(value)`` on one line, cut to a readable length (an error names the value, not all of it)."""
    try:
        text = _BOUNDED.repr(value)
    except RecursionError:  # a self-referencing YAML alias (a: &x [*x])
        text = f"<recursive {type(value).__name__}>"
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _key(key: Any) -> str:
    """A user's key as it goes into a key path: as typed when plain, else its repr (never a line break)."""
    text = str(key)
    if text and text.isprintable() and len(text) <= _SHOW_MAX:
        return text
    return show(key)


def _join(where: str, key: str) -> str:
    """The key path ``where.key`` (just ``key`` at the top level)."""
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


#: A decimal number as people write it (1e-3, .5, -2.5E+4): what a float key accepts as text.
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns it (ints widen to floats)."""
    registry = _registry(tp)
    if registry is not None:
        return _build_kind(registry, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {show(value)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        for arg in args:
            if isinstance(arg, type) and not isinstance(value, bool) and isinstance(value, arg):
                _coerce(value, arg, where)  # the right type, a wrong value: that error names the problem
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: expected {names}, got {show(value)}")
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {show(value)}")
        return {str(k): _coerce(v, val_tp, f"{where}.{_key(k)}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {show(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {show(value)}")
        if not _INT_MIN <= value <= _INT_MAX:
            raise ConfigError(f"{where}: expected an integer that fits in 64 bits, got {show(value)}")
        return value
    if tp is float:
        given = value
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-3 (no dot) and 1.0e3 without a sign as text; a number key means the number
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {show(given)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {show(value)}")
        if "\x00" in value:
            raise ConfigError(f"{where}: must not contain a NUL character, got {show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug, not a user error


def _build_kind(registry: Registry, raw: Any, where: str, default: str | None = None) -> Any:
    """A kind-tagged section ``{kind: NAME, ...}`` -> the dataclass that ``registry`` has for NAME."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a kind ({', '.join(registry.kinds())}), got {show(raw)}")
    raw = dict(raw)
    kind = raw.pop("kind", default)
    if kind is None:
        raise ConfigError(f"{_join(where, 'kind')}: missing (one of {', '.join(registry.kinds())})")
    if not isinstance(kind, str) or kind not in registry:
        raise ConfigError(f"{_join(where, 'kind')}: must be one of {', '.join(registry.kinds())}, got {show(kind)}")
    cls = registry.entry(kind).config
    own = _field_names(cls)
    for key in raw:
        # a key of another kind of the same section (a decoder option of another decoder): say which takes it
        takers = [k for k in registry.kinds() if k != kind and key in _field_names(registry.entry(k).config)]
        if isinstance(key, str) and key not in own and takers:
            raise ConfigError(
                f"{_join(where, key)}: unknown key (known: {', '.join(sorted(own)) or 'none'}); "
                f"only kind {' or '.join(takers)} takes it, not {kind}"
            )
    return _build(cls, raw, where)


def _field_names(cls: type) -> set[str]:
    """The keys a kind's config dataclass takes (none for a class that is not a dataclass)."""
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _build_prior(raw: Any, where: str) -> PriorConfig:
    """The prior stage: its own fields, and its network's under the key named after its ``kind``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {show(raw)}")
    raw = dict(raw)
    kind = raw.pop("kind", "pixelcnn")
    if not isinstance(kind, str) or kind not in PRIORS:
        raise ConfigError(f"{where}.kind: must be one of {', '.join(PRIORS.kinds())}, got {show(kind)}")
    section = raw.pop(kind, None)
    if "model" in raw:
        raise ConfigError(f"{where}.model: unknown key (the network's settings go under {kind}:)")
    cfg = _build(PriorConfig, raw, where)
    cfg.kind, cfg.model = kind, _build(PRIORS.entry(kind).config, section, f"{where}.{kind}")
    return cfg


def _is_section(tp: Any) -> bool:
    """Whether a field annotated ``tp`` holds a section of its own: a dataclass, or a kind-tagged one."""
    return _registry(tp) is not None or dataclasses.is_dataclass(tp)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys.

    A null section takes every default, and a null field that holds a section (``quantizer: ~``,
    ``data:`` with nothing under it) is that section left out: its field's default.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {show(raw)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)} - ({"model"} if cls is PriorConfig else set())
    for key in raw:
        if not isinstance(key, str) or key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{_join(where, _key(key))}: unknown key (known: {known})")
    # a null section goes to the field's own default rather than through _coerce: a kind-tagged
    # section has no kind to build without one, and a field whose default is None (a decoder: the
    # level's own kind, chosen in _validate) keeps it; a null section never reaches validation as None
    kwargs = {
        k: _coerce(v, hints[k], _join(where, k))
        for k, v in raw.items()
        if v is not None or not _is_section(hints[k])
    }
    return cls(**kwargs)


def _check(cond: bool, where: str, value: Any, need: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: must be {need}, got {show(value)}")


def _validate_train(cfg: TrainConfig, where: str) -> None:
    for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
        value = getattr(cfg, name)
        _check(value >= 1, f"{where}.{name}", value, ">= 1")
    _check(cfg.lr > 0, f"{where}.lr", cfg.lr, "> 0")
    _check(cfg.warmup >= 0, f"{where}.warmup", cfg.warmup, ">= 0")
    _check(0 <= cfg.min_lr_ratio <= 1, f"{where}.min_lr_ratio", cfg.min_lr_ratio, "in [0, 1]")
    _check(cfg.weight_decay >= 0, f"{where}.weight_decay", cfg.weight_decay, ">= 0")
    _check(cfg.grad_clip >= 0, f"{where}.grad_clip", cfg.grad_clip, ">= 0")
    _check(cfg.precision in PRECISIONS, f"{where}.precision", cfg.precision, "one of " + ", ".join(PRECISIONS))


def _validate_weights(cfg: TrainConfig, stage: str, where: str) -> None:
    """Check the loss weights against the parts the stage kind returns; parts left out keep their defaults."""
    defaults = LOSS_PARTS[Config.stage_kind(stage)]
    for name, value in cfg.loss_weights.items():
        if name not in defaults:
            raise ConfigError(
                f"{where}.loss_weights.{_key(name)}: this stage has no such loss part "
                f"(its parts: {', '.join(defaults)})"
            )
        _check(value >= 0, f"{where}.loss_weights.{name}", value, ">= 0")
    cfg.loss_weights = {**defaults, **cfg.loss_weights}


def _validate_kind(section: Any, where: str) -> None:
    """A kind's own range checks (its ``problems()``), reported at ``where.key``."""
    for key, value, need in section.problems():
        raise ConfigError(f"{where}.{key}: must be {need}, got {show(value)}")


def check_decoder_coverage(cfg: Config, height: int, width: int) -> None:
    """Refuse an autoregressive decoder whose PixelCNN does not see every earlier code of its grid.

    ``height`` x ``width`` is the image; level k's decoder models the level k-1 grid, the image
    divided by the downsampling of levels 1..k-1. Raises :class:`ConfigError` naming the level.
    """
    for k in range(2, cfg.num_levels + 1):
        level = cfg.level(k)
        height, width = height // cfg.level(k - 1).downsample, width // cfg.level(k - 1).downsample
        p = getattr(level.decoder, "pixelcnn", None)
        if not isinstance(p, PixelCNNConfig):
            continue
        if not covers(height, width, p.layers, p.kernel_size):
            need = layers_to_cover(height, width, p.kernel_size)
            raise ConfigError(
                f"stages.{k}.decoder.pixelcnn.layers: {p.layers} layers of kernel {p.kernel_size} "
                f"do not reach every earlier code of level {k - 1}'s {height}x{width} grid; "
                f"need layers * (kernel_size // 2) >= {reach_needed(height, width)}, "
                f"e.g. {need} layers of kernel {p.kernel_size}"
            )


def _validate(cfg: Config) -> None:
    d = cfg.data
    _check(d.source in DATA_SOURCES, "data.source", d.source, "one of " + ", ".join(DATA_SOURCES))
    _check(d.channels in (1, 3), "data.channels", d.channels, "1 or 3")
    _check(d.heldout >= 1, "data.heldout", d.heldout, ">= 1")
    _check(d.count >= 2, "data.count", d.count, ">= 2")
    if d.source == "shapes":
        _check(d.count > d.heldout, "data.count", d.count, f"> data.heldout ({d.heldout})")
    else:
        # mnist without a path reads the test set progvq ships (data.DEFAULT_PATHS)
        _check(d.path is not None or d.source in DEFAULT_PATHS, "data.path", d.path, f"a path for source {d.source!r}")
    if d.path is not None:
        _check(d.path.strip() != "", "data.path", d.path, "a path, not empty")
    if d.size is not None:
        if d.source == "shapes":
            _check(d.size >= SHAPES_MIN_SIZE, "data.size", d.size, f">= {SHAPES_MIN_SIZE} for source 'shapes'")
        _check(d.size >= 4, "data.size", d.size, ">= 4")
    if d.limit is not None:
        _check(d.limit > d.heldout, "data.limit", d.limit, f"> data.heldout ({d.heldout})")
    _check(d.resize in RESIZES, "data.resize", d.resize, "one of " + ", ".join(RESIZES))
    _check(d.crop in CROPS, "data.crop", d.crop, "one of " + ", ".join(CROPS))
    need = "one of " + ", ".join(ON_UNREADABLE)
    _check(d.on_unreadable in ON_UNREADABLE, "data.on_unreadable", d.on_unreadable, need)
    # the image folder's own keys: other sources have no files to resize, crop or skip
    for key, default in (("resize", "none"), ("crop", "none"), ("on_unreadable", "refuse")):
        value = getattr(d, key)
        _check(d.source == "folder" or value == default, f"data.{key}", value, f"{default!r} for source {d.source!r}")
    if d.resize != "none":
        # the longer side would exceed data.size, which only pads
        _check(d.crop != "none", "data.crop", d.crop, f"centre or random with data.resize {d.resize!r}")
    if d.crop != "none":
        _check(d.size is not None, "data.size", d.size, f"the crop's side with data.crop {d.crop!r}")
    _check(0 <= d.seed <= _SEED_MAX, "data.seed", d.seed, f"in [0, {_SEED_MAX}]")
    _check(0 <= cfg.seed <= _SEED_MAX, "seed", cfg.seed, f"in [0, {_SEED_MAX}]")
    for key in ("temperature", "code_temperature", "pixel_temperature", "guidance"):
        value = getattr(cfg.sample, key)
        _check(value >= 0, f"sample.{key}", value, ">= 0")  # the loader already refuses nan and inf
    _check(
        cfg.sample.guidance == 0 or cfg.prior.class_conditional,
        "sample.guidance",
        cfg.sample.guidance,
        "0 for an unconditional prior (stages.prior.class_conditional: false)",
    )
    _check(cfg.device in DEVICES, "device", cfg.device, "one of " + ", ".join(DEVICES))
    if cfg.run_dir is not None:
        _check(cfg.run_dir.strip() != "", "run_dir", cfg.run_dir, "a path or null, not empty")
    # the image side when the config alone decides it: data.size, or the shapes' default side
    side, side_name = d.size, f"data.size ({d.size})"
    if side is None and d.source == "shapes":
        side = SHAPES_DEFAULT_SIZE
        side_name = f"the image side ({SHAPES_DEFAULT_SIZE}, the shapes' default; data.size changes it)"

    factor = 1
    for name in cfg.stage_names()[:-1]:
        level: LevelConfig = cfg.stages[name]
        where = f"stages.{name}"
        _validate_train(level, where)
        ds = level.downsample
        _check(ds >= 1 and ds & (ds - 1) == 0, f"{where}.downsample", ds, "a power of 2")
        if name == "1":
            _check(ds >= 2, f"{where}.downsample", ds, ">= 2 (level 1 must be smaller than the image)")
        for key in ("hidden", "res_blocks"):
            value = getattr(level, key)
            least = 0 if key == "res_blocks" else 1
            _check(value >= least, f"{where}.{key}", value, f">= {least}")
        _validate_kind(level.quantizer, f"{where}.quantizer")
        pixels = name == "1"
        if level.decoder is None:
            level.decoder = DECODERS.entry("logistic" if pixels else "factorised").config()
        kind = DECODERS.kind_of(level.decoder)
        if pixels != (kind in PIXEL_DECODERS):
            if pixels:
                need = " or ".join(PIXEL_DECODERS)
            else:
                need = "one of " + ", ".join(k for k in DECODERS.kinds() if k not in PIXEL_DECODERS)
            what = "level 1 decodes pixels" if pixels else f"level {name} decodes the codes of level {int(name) - 1}"
            _check(False, f"{where}.decoder.kind", kind, f"{need} ({what})")
        _validate_kind(level.decoder, f"{where}.decoder")
        if getattr(level.decoder, "class_conditional", False):
            _validate_class_conditional(cfg, f"{where}.decoder.class_conditional")
        _validate_weights(level, name, where)
        if kind == "pixelcnn":
            # the decoder's point estimate (reconstructions, samples at pixel temperature 0) learns from it alone
            mse = level.loss_weights["mse"]
            need = "> 0 with a pixelcnn decoder (it trains the point estimate)"
            _check(mse > 0, f"{where}.loss_weights.mse", mse, need)
        factor *= ds
        if side is not None:
            _check(
                side % factor == 0,
                f"{where}.downsample",
                ds,
                f"such that {side_name} is divisible by the total downsampling ({factor})",
            )
    p: PriorConfig = cfg.stages["prior"]
    _validate_train(p, "stages.prior")
    _validate_kind(p.model, f"stages.prior.{p.kind}")
    _validate_weights(p, "prior", "stages.prior")
    # a shift of half the image or more leaves nothing of it
    _check(0 <= p.shifts <= MAX_SHIFTS, "stages.prior.shifts", p.shifts, f"in [0, {MAX_SHIFTS}]")
    if p.class_conditional:
        # shapes carry what was drawn; an mnist folder without its labels file is refused when it is read
        _check(
            d.source in LABELLED_SOURCES,
            "stages.prior.class_conditional",
            p.class_conditional,
            f"false for data source {d.source!r}, which has no labels "
            f"(sources with labels: {', '.join(LABELLED_SOURCES)})",
        )
    if side is not None:
        check_decoder_coverage(cfg, side, side)


def _validate_class_conditional(cfg: Config, key: str) -> None:
    """A code decoder given the class (``key``): labelled data, and a class-conditional prior, whose p(z_L | y)
    the bound marginalises over the classes together with the decoder's (and which codes the class first)."""
    source = cfg.data.source
    _check(
        source in LABELLED_SOURCES,
        key,
        True,
        f"false for data source {source!r}, which has no labels (sources with labels: {', '.join(LABELLED_SOURCES)})",
    )
    _check(
        cfg.prior.class_conditional,
        key,
        True,
        "false unless the prior is class-conditional too (stages.prior.class_conditional: true)",
    )


#: Keys of the prior's network at the top of its section, before sections were kind-tagged.
_OLD_PRIOR_KEYS = ("channels", "layers", "kernel_size", "dropout")


def upgrade_stage(name: str, raw: Any) -> Any:
    """A stage section in the layout of progvq 0.1 -> today's kind-tagged one; any other value as it is.

    0.1 wrote ``codes``/``code_dim`` beside ``quantizer: {ema, ...}``, ``decoder: factorised |
    autoregressive`` with a ``pixelcnn`` section beside it, and the prior's network keys at the top
    of its section. Run folders and checkpoints of 0.1 hold resolved configs in that layout, so
    they load, sample and resume as they were; configs written by hand in it keep working too.
    """
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    if name == "prior":
        if "kind" not in raw and any(key in raw for key in _OLD_PRIOR_KEYS):
            raw["pixelcnn"] = {key: raw.pop(key) for key in _OLD_PRIOR_KEYS if key in raw}
        return raw
    quantizer = raw.get("quantizer")
    # also into a `kind: vq` section, so `--set stages.1.codes=...` keeps working on today's configs
    vq = quantizer is None or (isinstance(quantizer, dict) and quantizer.get("kind", "vq") == "vq")
    if ("codes" in raw or "code_dim" in raw) and vq:
        moved = {"kind": "vq", **(quantizer or {})}
        if "codes" in raw:
            moved["codes"] = raw.pop("codes")
        if "code_dim" in raw:
            moved["dim"] = raw.pop("code_dim")
        raw["quantizer"] = moved
    elif isinstance(quantizer, dict) and "kind" not in quantizer and quantizer:
        raw["quantizer"] = {"kind": "vq", **quantizer}
    if isinstance(raw.get("decoder"), str):
        kind = raw.pop("decoder")
        pixelcnn = raw.pop("pixelcnn", None)
        if name == "1" and kind == "factorised":
            kind = "logistic"  # 0.1 called level 1's decoder factorised too
        keeps_pixelcnn = kind == "autoregressive" and pixelcnn is not None
        raw["decoder"] = {"kind": kind, **({"pixelcnn": pixelcnn} if keeps_pixelcnn else {})}
    elif "pixelcnn" in raw and raw.get("decoder") is None:
        raw.pop("pixelcnn")  # 0.1 wrote its defaults for every level, unused by a factorised decoder
    weights = raw.get("loss_weights")
    if name != "1" and isinstance(weights, dict) and weights.get("mse") == 0:
        raw["loss_weights"] = {k: v for k, v in weights.items() if k != "mse"}  # 0.1 listed level 1's part everywhere
    return raw


def config_from_dict(raw: Any) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (keys without a file prefix)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"top level: expected a mapping, got {show(raw)}")
    raw = dict(raw)
    stages_raw = raw.pop("stages", None)
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"stages: expected a mapping of stages (1, 2, ..., prior), got {show(stages_raw)}")
    cfg = _build(Config, raw, "")
    given: dict[str, Any] = {}
    for key in stages_raw:
        name = _key(key)
        if name in given:
            raise ConfigError(f"stages.{name}: given twice (as {show(given[name])} and {show(key)})")
        given[name] = key
    names = list(given)
    if "prior" not in names:
        raise ConfigError("stages.prior: missing (every run ends with a prior stage)")
    levels = sorted((n for n in names if n != "prior"), key=lambda n: (not n.isdigit(), n))
    expected = [str(k) for k in range(1, len(levels) + 1)]
    for got, want in zip(levels, expected, strict=True):
        if got != want:
            raise ConfigError(
                f"stages.{got}: unknown stage (stages are 1, 2, ... numbered from 1 without gaps, and prior)"
            )
    if not levels:
        raise ConfigError("stages: at least one level stage (stages.1) is needed")
    stages: dict[str, Any] = {}
    for name, key in given.items():
        section = upgrade_stage(name, stages_raw[key])
        where = f"stages.{name}"
        stages[name] = _build_prior(section, where) if name == "prior" else _build(LevelConfig, section, where)
    cfg.stages = {name: stages[name] for name in expected + ["prior"]}
    _validate(cfg)
    return cfg


def _strip_prefix(err: ConfigError) -> str:
    return str(err).removeprefix("config.")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stages.1.steps=500"`` -> (["stages", "1", "steps"], 500); the value is YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {show(text)}: expected KEY=VALUE, e.g. stages.1.steps=500")
    path = [part.strip() for part in key.split(".")]
    if not all(path):
        raise ConfigError(f"--set {show(text)}: empty part in the key {key.strip()!r} (parts are separated by one dot)")
    try:
        parsed = _parse_yaml(value) if value.strip() else None
    except (yaml.YAMLError, RecursionError):
        parsed = value  # not YAML: take the text as it is
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (stage keys compared as text)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict):
                raise ConfigError(f"--set {show(text)}: {'.'.join(path[:i])} is not a mapping")
            match = next((k for k in node if str(k) == part), None)
            if match is None:
                node[part] = {}
                match = part
            if node[match] is None:
                node[match] = {}
            node = node[match]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {show(text)}: {'.'.join(path[:-1])} is not a mapping")
        last = next((k for k in node if str(k) == path[-1]), path[-1])
        node[last] = value
    return raw


class _DuplicateKey(yaml.YAMLError):
    """A mapping of a YAML file gives one key twice."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" merges; keys given beside it override it, as YAML intends
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the base class reports it with its position
                break
            if first is not None:
                lines = f"lines {first.start_mark.line + 1} and {key_node.start_mark.line + 1}"
                raise _DuplicateKey(f"key {show(key)} given twice ({lines})")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # a scalar that matches a type's pattern but not its range (2001-02-30, "!!int abc") makes
        # the constructors raise ValueError & co. without a position: give it one, as a YAML error
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as err:
            value = show(node.value) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {value} as {node.tag.rsplit(':', 1)[-1]} ({err})", node.start_mark
            ) from None


def _parse_yaml(text: str) -> Any:
    """YAML text to plain data, refusing duplicate keys; raises ``yaml.YAMLError`` or ``RecursionError``."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: builds plain data only


def _yaml_error(path: Path, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = " ".join(str(getattr(err, "problem", None) or getattr(err, "context", None) or "invalid YAML").split())
    return ConfigError(f"{path}: malformed YAML{at}: {problem}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate.

    Errors name the file, e.g. ``configs/a.yaml: stages.1.quantizer.codes: must be >= 2, got 1``.
    """
    path = Path(path)
    try:
        data = read_limited(path, "config", CONFIG_MAX_BYTES)
    except ProgvqError as err:
        raise ConfigError(str(err)) from None
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark is not part of the YAML
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (byte {err.start} is not UTF-8)") from None
    try:
        raw = _parse_yaml(text)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nested too deeply") from None
    if raw is None:
        if not overrides:
            raise ConfigError(f"{path}: empty config (it needs at least a stages section: 1, ..., prior)")
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    # a run folder's config.yaml may serve as a config: what it recorded about the data is no setting
    raw.pop(RECORDED_KEY, None)
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
