"""Property tests of config loading: any input gives a valid Config or one ConfigError line, never a crash.

Malformed configs are random mutations of ``configs/tiny.yaml`` (keys deleted, unknown keys added,
values replaced by junk of every type, out-of-range numbers, random YAML text, character edits of the
file, random ``--set`` overrides). Valid configs are drawn field by field from the documented ranges
and must survive ``dump_config`` -> load unchanged.

Deterministic (``derandomize=True``, no example database) and small, so CI runs the same examples
every time in a few seconds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progvq.config import (
    DATA_SOURCES,
    DEVICES,
    LOSS_PARTS,
    PRECISIONS,
    Config,
    config_from_dict,
    dump_config,
    load_config,
)
from progvq.data import LABELLED_SOURCES, SHAPES_DEFAULT_SIZE
from progvq.errors import ConfigError
from progvq.pixelcnn import reach_needed
from run_stage import main

from .conftest import TINY
from .helpers import tiny_raw

FAST = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FEWER = settings(FAST, max_examples=60)

TINY_RAW: dict[str, Any] = tiny_raw()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example of this module (function-scoped tmp_path does not mix with @given)."""
    return tmp_path_factory.mktemp("config_properties")


# --------------------------------------------------------------------------- checks


def check_result(make: Any, prefix: str = "") -> Config | None:
    """``make()`` must return a Config or raise a one-line ConfigError (starting with ``prefix``); None if it raised."""
    try:
        cfg = make()
    except ConfigError as err:
        message = str(err)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        assert message.startswith(prefix), message
        return None
    assert isinstance(cfg, Config)
    # whatever validated also survives its own plain-dict form
    assert config_from_dict(cfg.to_dict()) == cfg
    return cfg


def check_cli_refuses(path: Path, workdir: Path, expected: str) -> None:
    """``progvq train PATH --all`` exits 2 with exactly ``progvq: error: EXPECTED`` and creates no run directory."""
    run_dir = workdir / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", str(path), "--all", "--run-dir", str(run_dir), "--no-progress"])
    assert code == 2
    assert err.getvalue() == f"progvq: error: {expected}\n"
    assert not run_dir.exists()


# --------------------------------------------------------------------------- junk and mutations

# values and keys that once got through as tracebacks or multi-line messages
TRICKY_VALUES = st.sampled_from(["a\nb", "\x00", "", " ", "k" * 300, 10**400, -(10**400), 2**63, float("nan")])
TRICKY_YAML = st.sampled_from(
    ["2001-02-30", "!!int x", "!!float x", "!!binary ?", "{a: 1, a: 2}", "[" * 200, "&a [*a]", "!!set {1}"]
)
SCALARS = st.one_of(
    TRICKY_VALUES,
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=4),
)
KEYS = st.one_of(
    st.text(min_size=1, max_size=10),
    st.integers(-3, 5),
    st.booleans(),
    st.none(),
    st.sampled_from(["a\nb", "", "k" * 300, "1.0"]),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)
OUT_OF_RANGE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, -0.5, 0.0, 1.0, 1.5, 2**31, 2**63, 2**64, -(2**63) - 1]),
    st.integers(-10, 10),
    st.floats(-10, 10),
)


def all_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Key paths of every value in a nested mapping."""
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out += all_paths(value, (*prefix, key))
    return out


def mapping_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Key paths of every mapping (the root is ``()``)."""
    if not isinstance(node, dict):
        return []
    out = [prefix]
    for key, value in node.items():
        out += mapping_paths(value, (*prefix, key))
    return out


def parent(raw: dict[str, Any], path: tuple[Any, ...]) -> dict[Any, Any]:
    node: Any = raw
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """tiny.yaml's mapping with 1 to 3 random mutations."""
    raw = copy.deepcopy(TINY_RAW)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "add", "junk", "number", "number"]))
        paths = all_paths(raw)
        if kind == "add" or not paths:
            where = draw(st.sampled_from(mapping_paths(raw)))
            node: Any = raw
            for key in where:
                node = node[key]
            node[draw(KEYS)] = draw(JUNK)
            continue
        path = draw(st.sampled_from(paths))
        if kind == "delete":
            del parent(raw, path)[path[-1]]
        else:
            parent(raw, path)[path[-1]] = draw(JUNK if kind == "junk" else OUT_OF_RANGE)
    return raw


def safe_dump(raw: Any) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- malformed configs


def check_file(path: Path, workdir: Path) -> None:
    """A config file loads to a valid Config, or is refused in one line by both the loader and the CLI."""
    try:
        load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith(f"{path}: ")
        check_cli_refuses(path, workdir, str(err))
        return
    check_result(lambda: load_config(path))


@FAST
@given(raw=mutated())
def test_mutated_dict_gives_config_or_one_line_error(raw: dict[str, Any]) -> None:
    check_result(lambda: config_from_dict(raw))


@FAST
@given(raw=st.one_of(JUNK, st.dictionaries(KEYS, JUNK, max_size=4)))
def test_any_junk_gives_config_or_one_line_error(raw: Any) -> None:
    check_result(lambda: config_from_dict(raw))


@FEWER
@given(raw=mutated())
def test_mutated_file_gives_config_or_one_line_error_and_the_cli_agrees(raw: dict[str, Any], workdir: Path) -> None:
    path = workdir / "mutated.yaml"
    path.write_text(safe_dump(raw))
    check_file(path, workdir)


@st.composite
def edited_text(draw: st.DrawFn) -> str:
    """tiny.yaml's text with characters inserted, deleted or lines duplicated: mostly YAML errors."""
    text = TINY.read_text()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "duplicate-line"]))
        if kind == "insert":
            marks = [":", "-", "\t", "[", "{", "'", '"', "&a", "*a", "!!", "#", " ", "\n", "?", "%", "\x00", "é"]
            bit = draw(st.one_of(st.sampled_from(marks), TRICKY_YAML))
            text = text[:at] + bit + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)) :]
        else:
            lines = text.splitlines(keepends=True)
            i = min(at, len(lines) - 1)
            text = "".join(lines[: i + 1] + [lines[i]] + lines[i + 1 :])
    return text


@FEWER
@given(text=st.one_of(edited_text(), st.text(max_size=80)))
def test_edited_or_random_text_gives_config_or_one_line_error_and_the_cli_agrees(text: str, workdir: Path) -> None:
    path = workdir / "text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_file(path, workdir)


@FAST
@given(data=st.binary(max_size=60))
def test_random_bytes_give_config_or_one_line_error(data: bytes, workdir: Path) -> None:
    path = workdir / "bytes.yaml"
    path.write_bytes(data)
    check_result(lambda: load_config(path), prefix=f"{path}: ")


SET_KEYS = st.one_of(
    st.sampled_from([".".join(map(str, p)) for p in all_paths(TINY_RAW)]),
    st.text(max_size=15),
)


@FAST
@given(key=SET_KEYS, value=st.one_of(st.text(max_size=15), TRICKY_YAML, JUNK.map(lambda v: yaml.safe_dump(v).strip())))
def test_random_overrides_give_config_or_one_line_error(key: str, value: str) -> None:
    check_result(lambda: load_config(TINY, [f"{key}={value}"]), prefix=f"{TINY}: ")


# --------------------------------------------------------------------------- valid configs round-trip

PLAIN_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # any text but NUL
PATH_TEXT = st.text(PLAIN_CHARS, min_size=1, max_size=12).filter(lambda s: s.strip() != "")
SMALL_INT = st.integers(1, 10_000)
UNIT = st.floats(0, 1)
NONNEG = st.floats(0, 1e6)


def train_fields(prior: bool, level: int = 0) -> dict[str, st.SearchStrategy[Any]]:
    weights = list(LOSS_PARTS[Config.stage_kind("prior" if prior else str(level))])
    return {
        "steps": SMALL_INT,
        "batch_size": st.integers(1, 4096),
        "lr": st.floats(1e-8, 10),
        "warmup": st.integers(0, 10_000),
        "min_lr_ratio": UNIT,
        "weight_decay": NONNEG,
        "grad_clip": NONNEG,
        "log_every": SMALL_INT,
        "eval_every": SMALL_INT,
        "checkpoint_every": SMALL_INT,
        "precision": st.sampled_from(PRECISIONS),
        "loss_weights": st.dictionaries(st.sampled_from(weights), NONNEG, max_size=len(weights)),
    }


VQ_FIELDS = {
    "ema": st.booleans(),
    "decay": st.floats(0, 1, exclude_min=True, exclude_max=True),
    "init_from_data": st.booleans(),
    "restart": st.booleans(),
    "restart_threshold": NONNEG,
    "restart_every": SMALL_INT,
}
VQ = st.fixed_dictionaries(
    {"kind": st.just("vq")}, optional={"codes": st.integers(2, 4096), "dim": st.integers(1, 256), **VQ_FIELDS}
)
# at most 16**4 = 65536 codes, far below the 2**24 limit
FSQ = st.fixed_dictionaries(
    {"kind": st.just("fsq")}, optional={"levels": st.lists(st.integers(2, 16), min_size=1, max_size=4)}
)


def pixelcnn_section(min_reach: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A PixelCNN's section; with ``min_reach``, layers that reach that far (a level decoder must cover its grid)."""

    @st.composite
    def section(draw: st.DrawFn) -> dict[str, Any]:
        kernel = draw(st.integers(1, 4)) * 2 + 1
        out = {"channels": draw(st.integers(1, 512)), "kernel_size": kernel}
        least = max(1, math.ceil(min_reach / (kernel // 2)))
        out["layers"] = draw(st.integers(least, least + 5))
        optional = draw(st.fixed_dictionaries({}, optional={"dropout": st.floats(0, 1, exclude_max=True)}))
        if min_reach == 0 and draw(st.booleans()):
            del out["layers"]  # the default, when nothing needs covering
        return {**out, **optional}

    return section()


@st.composite
def level_section(draw: st.DrawFn, level: int, downsample: int, grid_below: int) -> dict[str, Any]:
    """Stage ``level``'s section; ``grid_below`` is the side of the level below's grid (level >= 2).

    Mostly in today's kind-tagged layout; a VQ level sometimes in progvq 0.1's (``codes``/``code_dim``
    at the top, the decoder a string with ``pixelcnn`` beside it), which loads into the same Config.
    """
    out = {"downsample": downsample}
    optional = {"hidden": st.integers(1, 512), "res_blocks": st.integers(0, 4), **train_fields(False, level)}
    out.update(draw(st.fixed_dictionaries({}, optional=optional)))
    quantizer = draw(st.one_of(VQ, st.none(), FSQ))  # None: the default quantiser
    reach = reach_needed(grid_below, grid_below) if level >= 2 else 0
    if level == 1:
        decoder = draw(st.sampled_from([None, {"kind": "logistic"}]))
    else:
        decoder = draw(st.sampled_from(["autoregressive", None, "factorised"]))
        if decoder is not None:
            network = {"pixelcnn": draw(pixelcnn_section(reach))} if decoder == "autoregressive" else {}
            decoder = {"kind": decoder, **network}
    old = (quantizer is None or quantizer["kind"] == "vq") and draw(st.integers(0, 3)) == 3
    if not old:
        return {**out, **({"quantizer": quantizer} if quantizer else {}), **({"decoder": decoder} if decoder else {})}
    quantizer = dict(quantizer or {"kind": "vq"})
    del quantizer["kind"]
    for new, was in (("codes", "codes"), ("dim", "code_dim")):
        if new in quantizer:
            out[was] = quantizer.pop(new)
    if quantizer:
        out["quantizer"] = quantizer
    if decoder is not None:
        # 0.1 called level 1's factorised
        out["decoder"] = "factorised" if decoder["kind"] == "logistic" else decoder["kind"]
        out["pixelcnn"] = decoder.get("pixelcnn") or draw(pixelcnn_section())
    if level >= 2 and draw(st.booleans()):
        out["loss_weights"] = {**out.get("loss_weights", {}), "mse": 0.0}  # 0.1 listed level 1's part at every level
    return out


@st.composite
def prior_section(draw: st.DrawFn, labelled: bool) -> dict[str, Any]:
    """The prior's section, kind-tagged or with its network keys at the top as progvq 0.1 wrote it."""
    out = draw(st.fixed_dictionaries({}, optional=train_fields(True)))
    if labelled:  # only data with labels may condition the prior on them
        out["class_conditional"] = draw(st.booleans())
    network = draw(pixelcnn_section())
    if draw(st.booleans()):
        return {**out, **network}
    optional = {"kind": st.just("pixelcnn"), "pixelcnn": st.just(network)}
    return {**out, **draw(st.fixed_dictionaries({}, optional=optional))}


@st.composite
def valid_raw(draw: st.DrawFn) -> dict[str, Any]:
    """A config every field of which is in its documented range (optional fields often left to defaults)."""
    downs = [draw(st.sampled_from([2, 4]))] + draw(st.lists(st.sampled_from([1, 2, 4]), max_size=2))
    total = math.prod(downs)
    source = draw(st.sampled_from(DATA_SOURCES))
    smallest = 8 if source == "shapes" else 4
    size = draw(st.integers(math.ceil(smallest / total), 8).map(lambda m: m * total))
    if source == "shapes" and 32 % total == 0 and draw(st.booleans()):
        size = None
    heldout = draw(st.integers(1, 100))
    data: dict[str, Any] = {"source": source, "size": size, "heldout": heldout}
    if source == "shapes":
        data["count"] = draw(st.integers(heldout + 1, heldout + 1000))
    else:
        data["path"] = draw(PATH_TEXT)
    optional = {
        "prefix": st.text(PLAIN_CHARS, max_size=8),
        "key": st.one_of(st.none(), st.text(PLAIN_CHARS, max_size=8)),
        "channels": st.sampled_from([1, 3]),
        "limit": st.one_of(st.none(), st.integers(heldout + 1, 10**6)),
        "seed": st.integers(0, 2**32 - 1),
    }
    data.update(draw(st.fixed_dictionaries({}, optional=optional)))
    stages: dict[Any, Any] = {}
    side = size or SHAPES_DEFAULT_SIZE
    for k, ds in enumerate(downs, start=1):
        stages[draw(st.sampled_from([k, str(k)]))] = draw(level_section(k, ds, side))
        side //= ds
    stages["prior"] = draw(prior_section(source in LABELLED_SOURCES))
    top = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "seed": st.integers(0, 2**32 - 1),
                "device": st.sampled_from(DEVICES),
                "run_dir": st.one_of(st.none(), PATH_TEXT),
                "sample": st.fixed_dictionaries({}, optional={"code_temperature": st.floats(0, 100)}),
            },
        )
    )
    return {"data": data, "stages": stages, **top}


@FEWER
@given(raw=valid_raw())
def test_valid_configs_round_trip_through_dump_config(raw: dict[str, Any], workdir: Path) -> None:
    cfg = config_from_dict(raw)  # every drawn field is in range: it must be accepted
    text = dump_config(cfg)
    assert config_from_dict(yaml.safe_load(text)) == cfg
    path = workdir / "dumped.yaml"
    path.write_text(text)
    loaded = load_config(path)
    expected = cfg if cfg.run_dir is not None else dataclasses.replace(cfg, run_dir=str(Path("runs") / "dumped"))
    assert loaded == expected
    assert dump_config(loaded) == dump_config(expected)


def test_mutations_do_reach_every_kind_of_error() -> None:
    """A sanity check of the generators: the mutated configs above are mostly refused, for many reasons."""
    from hypothesis import find

    for needle in ("unknown key", "expected an integer", "expected a mapping", "must be"):

        def refused_with(raw: dict[str, Any], needle: str = needle) -> bool:
            try:
                config_from_dict(raw)
            except ConfigError as err:
                return needle in str(err)
            return False

        search = settings(database=None, derandomize=True, max_examples=500)
        assert refused_with(find(mutated(), refused_with, settings=search))
