"""Every section of the config schema given an empty, null or wrong value: a Config or one line naming it.

The keys are not listed here: they come from walking the config dataclasses (:class:`Config`,
the level and prior stages, the kinds of every registry) for every field that holds a section
of its own (a dataclass, a kind-tagged section, a mapping), so a section added to the schema is
covered without an edit here. A key inside a kind's section (``stages.2.decoder.pixelcnn``
exists for an autoregressive decoder only) is tried on a variant of ``configs/tiny.yaml`` with
that kind chosen, at each level where the schema takes the kind.

Each key gets each of :data:`BAD_VALUES` two ways, as ``--set KEY=VALUE`` and written into the
YAML file, and must either load (only null and ``{}`` may; a null section is then its default:
the same Config as the field left out, or a stage with every key left out) or be refused by one
:class:`ConfigError` line about that key, naming the value given.
The command line is checked on a few of them: exit status 2, one line, no traceback, nothing
trained.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml

from progvq.config import Config, LevelConfig, PriorConfig, config_from_dict, load_config, show
from progvq.data import SOURCES
from progvq.errors import ConfigError
from progvq.kinds import PRIORS
from progvq.registry import Registry

from .conftest import ROOT, TINY
from .helpers import tiny_raw
from .test_bad_input import Case, Ctx, check_refusal, train_args, with_sets

#: What a section may be given by mistake: empty (YAML null), null spelt two ways, an empty list,
#: a number, an empty mapping and text.
BAD_VALUES = ("", "~", "null", "[]", "0", "{}", "text")

#: What ``Config.stages`` holds (its annotation says only ``dict[str, Any]``): two levels, so the
#: walk sees the pixel level and a code level above it, and the prior.
STAGES: dict[str, type] = {"1": LevelConfig, "2": LevelConfig, "prior": PriorConfig}

#: The walk's size on today's schema (data, sample, stages; each stage, its quantiser, decoder and
#: loss weights; the prior's network; each decoder's network): fewer means the walk broke.
MIN_SECTIONS = 16


@dataclasses.dataclass(frozen=True)
class Section:
    """A key that holds a section, and the kinds that must be chosen for it to exist."""

    key: str  # dotted, as --set takes it: "stages.2.decoder.pixelcnn"
    kinds: tuple[tuple[str, str], ...] = ()  # (key of a kind-tagged section, its kind), outermost first
    # an entry of a mapping (a stage) rather than a field: left out, it is no stage at all, not a default
    entry: bool = False

    def __str__(self) -> str:
        chosen = ",".join(f"{where}={kind}" for where, kind in self.kinds)
        return f"{self.key}[{chosen}]" if chosen else self.key


# --------------------------------------------------------------------------- the walk


def registry_of(tp: Any) -> Registry | None:
    """The registry of a kind-tagged field (``Annotated[Any, REGISTRY]``), else None."""
    if typing.get_origin(tp) is Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, Registry)), None)
    return None


def walk(cls: type, where: str, kinds: tuple[tuple[str, str], ...] = ()) -> Iterator[Section]:
    """Every key under ``where`` that holds a section, in dataclass ``cls`` and the sections inside it."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{where}.{f.name}" if where else f.name
        registry = registry_of(tp)
        if registry is not None:
            yield Section(key, kinds)
            for kind in registry.kinds():
                yield from walk(registry.entry(kind).config, key, (*kinds, (key, kind)))
        elif dataclasses.is_dataclass(tp):
            yield Section(key, kinds)
            yield from walk(tp, key, kinds)
        elif typing.get_origin(tp) is dict:
            yield Section(key, kinds)
        if cls is Config and f.name == "stages":
            for name, stage in STAGES.items():
                yield Section(f"{key}.{name}", kinds, entry=True)
                yield from walk(stage, f"{key}.{name}", kinds)
        if cls is Config and f.name == "data":
            # every data source reads one shared section (today all DataConfig; the dedup drops repeats)
            for source in SOURCES.kinds():
                yield from walk(SOURCES.entry(source).config, key, kinds)
        if cls is PriorConfig and f.name == "model":
            # the prior's network (annotated Any) sits under a key named after the prior's kind
            for kind in PRIORS.kinds():
                inner = (*kinds, (where, kind))
                yield Section(f"{where}.{kind}", inner)
                yield from walk(PRIORS.entry(kind).config, f"{where}.{kind}", inner)


def _match(node: dict[Any, Any], part: str) -> Any:
    """The key of ``node`` spelt ``part`` (tiny.yaml's stages are the integers 1 and 2), else ``part``."""
    return next((k for k in node if str(k) == part), part)


def node_at(raw: dict[Any, Any], parts: list[str]) -> dict[Any, Any]:
    """The mapping at ``parts`` of ``raw``, made as ``--set`` makes it where missing or null."""
    node = raw
    for part in parts:
        key = _match(node, part)
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    return node


def get_at(raw: dict[Any, Any], key: str) -> Any:
    *parts, last = key.split(".")
    node = node_at(raw, parts)
    return node.get(_match(node, last))


def set_at(raw: dict[Any, Any], key: str, value: Any) -> None:
    *parts, last = key.split(".")
    node = node_at(raw, parts)
    node[_match(node, last)] = value


def remove_at(raw: dict[Any, Any], key: str) -> None:
    *parts, last = key.split(".")
    node = node_at(raw, parts)
    node.pop(_match(node, last), None)


def with_kinds(kinds: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """tiny.yaml with each kind-tagged section of ``kinds`` of that kind (at its defaults, unless tiny.yaml
    already has that kind), and level 1's point estimate weighted, as a ``pixelcnn`` decoder needs."""
    raw = tiny_raw()
    set_at(raw, "stages.1.loss_weights", {"mse": 1.0})  # every pixel decoder takes it
    for where, kind in kinds:
        section = get_at(raw, where)
        if not (isinstance(section, dict) and section.get("kind") == kind):
            set_at(raw, where, {"kind": kind})
    return raw


def loads(raw: dict[str, Any]) -> bool:
    try:
        config_from_dict(copy.deepcopy(raw))
    except ConfigError:
        return False
    return True


def sections() -> tuple[list[Section], dict[tuple[tuple[str, str], ...], dict[str, Any]], set[tuple[str, str]]]:
    """The keys to try (each once, in walk order); the config tried for each choice of kinds that loads;
    every (section, kind) the walk met. A key whose kinds do not load together (an autoregressive
    decoder at level 1, which decodes pixels) is left out."""
    found = list(dict.fromkeys(walk(Config, "")))
    variants = {s.kinds: with_kinds(s.kinds) for s in found if s.kinds}
    variants = {kinds: raw for kinds, raw in variants.items() if loads(raw)}
    keys = [s for s in found if not s.kinds or s.kinds in variants]
    return keys, variants, {placed for s in found for placed in s.kinds}


SECTIONS, VARIANTS, PLACEMENTS = sections()


def test_the_walk_finds_every_section() -> None:
    keys = {s.key for s in SECTIONS}
    assert len(SECTIONS) >= MIN_SECTIONS, [str(s) for s in SECTIONS]
    assert {"data", "sample", "stages", "stages.1", "stages.prior", "stages.prior.pixelcnn"} <= keys, keys
    for k in ("1", "2"):
        assert {f"stages.{k}.{name}" for name in ("quantizer", "decoder", "loss_weights")} <= keys, keys
    # each network of a decoder kind, at the level that takes the kind
    assert {"stages.1.decoder.pixelcnn", "stages.2.decoder.pixelcnn"} <= keys, keys


def test_every_kind_with_a_section_loads_somewhere() -> None:
    """A kind whose sections load at no level would have its keys left out without a word."""
    loaded = {(where.rsplit(".", 1)[-1], kind) for kinds in VARIANTS for where, kind in kinds}
    met = {(where.rsplit(".", 1)[-1], kind) for where, kind in PLACEMENTS}
    assert {("decoder", "pixelcnn"), ("decoder", "autoregressive"), ("prior", "pixelcnn")} <= met, met
    assert met <= loaded, f"kinds that load at no level of tiny.yaml: {sorted(met - loaded)}"


# --------------------------------------------------------------------------- the table


def _cases() -> list[Any]:
    return [
        pytest.param(section, value, route, id=f"{section}={value or 'empty'}-{route}")
        for section in SECTIONS
        for value in BAD_VALUES
        for route in ("set", "file")
    ]


def test_the_table_is_big() -> None:
    assert len(_cases()) >= MIN_SECTIONS * len(BAD_VALUES) * 2


def load(section: Section, raw: dict[str, Any], route: str, value: str, tmp_path: Path) -> tuple[Path, Any]:
    """The Config (or the ConfigError) of ``value`` at the section's key by ``route``; with the file read."""
    path = tmp_path / "config.yaml"
    overrides = []
    if route == "set":
        overrides = [f"{section.key}={value}"]
        if not section.kinds:
            path = TINY  # tiny.yaml as it ships
    else:
        raw = copy.deepcopy(raw)
        set_at(raw, section.key, yaml.safe_load(value))
    if path != TINY:
        path.write_text(yaml.safe_dump(raw))
    try:
        return path, load_config(path, overrides)
    except ConfigError as err:
        return path, err


@pytest.mark.parametrize(("section", "value", "route"), _cases())
def test_a_bad_section_gives_its_default_or_one_line_naming_it(
    section: Section, value: str, route: str, tmp_path: Path
) -> None:
    raw = VARIANTS[section.kinds] if section.kinds else tiny_raw()
    path, result = load(section, raw, route, value, tmp_path)
    given = yaml.safe_load(value)
    if isinstance(result, ConfigError):
        message = str(result)
        assert "\n" not in message and "\r" not in message, repr(message)
        body = message.removeprefix(f"{path}: ")
        assert body != message, message
        # about this key or one inside it (stages.1.quantizer.kind: missing), not some other key
        assert body.startswith(section.key) and body[len(section.key)] in ":.", message
        if given not in (None, {}):
            assert show(given) in body, message
        return
    assert isinstance(result, Config)
    # only nothing (null, or a mapping that leaves every key out) may stand for a section
    assert given in (None, {}), f"{section.key}={value!r} loaded"
    assert config_from_dict(result.to_dict()) == result
    if given is None:
        # a null section is its default: the field left out, or a stage with every key left out
        default = copy.deepcopy(raw)
        if section.entry:
            set_at(default, section.key, {})
        else:
            remove_at(default, section.key)
        other = tmp_path / "default" / path.name  # the same name: the same default run_dir
        other.parent.mkdir()
        other.write_text(yaml.safe_dump(default))
        assert result == load_config(other)


# --------------------------------------------------------------------------- through the command line


def null_quantizer_in_the_file(ctx: Ctx) -> list[str]:
    """``train bad.yaml --stage prior``, bad.yaml being tiny.yaml with ``quantizer:`` and nothing under it."""
    text = TINY.read_text()
    written = "quantizer: {kind: vq, codes: 16, dim: 8, restart_every: 2}"
    assert written in text  # else this row no longer tests a null quantizer
    return train_args(ctx, ctx.write("bad.yaml", text.replace(written, "quantizer:", 1)), verb=("--stage", "prior"))


CLI_CASES = [
    Case(
        "section", "quantizer-empty-list", with_sets("stages.1.quantizer=[]"),
        ("tiny.yaml", "stages.1.quantizer: expected a mapping with a kind (vq, fsq), got []"),
    ),
    Case(
        "section", "quantizer-zero", with_sets("stages.2.quantizer=0"),
        ("stages.2.quantizer: expected a mapping with a kind (vq, fsq), got 0",),
    ),
    Case(
        "section", "decoder-without-kind", with_sets("stages.2.decoder={{}}"),
        ("stages.2.decoder.kind: missing (one of logistic, factorised, pixelcnn, autoregressive)",),
    ),
    Case(
        "section", "prior-network-text", with_sets("stages.prior.pixelcnn=text"),
        ("stages.prior.pixelcnn: expected a mapping, got 'text'",),
    ),
    Case("section", "data-zero", with_sets("data=0"), ("data: expected a mapping, got 0",)),
    Case(
        "section", "stages-empty", with_sets("stages="),
        ("stages: expected a mapping of stages (1, 2, ..., prior), got None",),
    ),
    # a null section loads as its default: the command goes on to its own check, which refuses it
    # before anything trains (stage prior needs the level stages first)
    Case(
        "section", "null-quantizer-loads",
        lambda ctx: train_args(ctx, TINY, "stages.1.quantizer=", verb=("--stage", "prior")),
        ("stage prior needs stage 1, which is missing",),
    ),
    Case(
        "section", "null-quantizer-in-the-file-loads", null_quantizer_in_the_file,
        ("stage prior needs stage 1, which is missing",),
    ),
]



@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CLI_CASES])
def test_a_bad_section_on_the_command_line_is_one_line_status_2(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_refusal(case, tmp_path, request, capsys, monkeypatch)


def test_the_installed_command_prints_one_line_for_a_bad_section(tmp_path: Path) -> None:
    """``python run_stage.py`` itself, as a user runs it: the one line, no traceback, no run folder."""
    run_dir = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "run_stage.py"), "train", str(TINY), "--all", "--no-progress"]
    argv += ["--set", "stages.1.quantizer=[]", "--run-dir", str(run_dir)]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    expected = "stages.1.quantizer: expected a mapping with a kind (vq, fsq), got []"
    assert done.stderr == f"progvq: error: {TINY}: {expected}\n"
    assert not run_dir.exists()
