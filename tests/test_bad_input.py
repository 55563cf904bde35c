"""Every user mistake through the real command line: one line on stderr, exit status 2, nothing lost.

One table, one row per mistake. Each row builds its bad input under ``tmp_path``
(config variants of ``configs/tiny.yaml``, damaged data files, a copy of the
trained tiny run), snapshots every file and folder there, runs ``main([...])``
and checks:

- exit status 2 and exactly one non-empty line on stderr, starting with ``progvq: error:``;
- that line names the offending thing (key path, file, value): every needle of the row is in it;
- no traceback;
- every file that existed before is still there with the same bytes, and nothing new was made.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from progvq.checkpoint import checkpoint_path, load_latest
from progvq.data import make_shapes
from run_stage import main

from .conftest import TINY
from .helpers import idx_bytes, tiny_raw

# --------------------------------------------------------------------------- helpers

WATCHDOG_S = 60  # seconds a row may take before it counts as a hang


@dataclass
class Ctx:
    """What a row's setup may use: the test's folder and, on demand, a trained run copied into it."""

    tmp: Path
    request: pytest.FixtureRequest

    def run(self) -> Path:
        """A private copy of the trained tiny run at ``tmp/run`` (the session's ``tiny_copy``)."""
        return self.request.getfixturevalue("tiny_copy")

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path


Setup = Callable[[Ctx], list[str]]


def trains(setup: Callable[..., Any]) -> Callable[..., Any]:
    """Flag a setup (or a run it prepares) that trains a model, so its row carries the ``trains`` marker."""
    setup.trains = True  # type: ignore[attr-defined]
    return setup


@dataclass
class Case:
    """One row: a kind, what goes wrong, how to set it up and what the error line must name."""

    kind: str
    name: str
    setup: Setup
    needles: tuple[str, ...]  # formatted with tmp=<the test's tmp_path>
    skip_if_root: bool = False
    new_files_ok: bool = False  # the command may create files (never change or remove old ones)
    marks: list[Any] = field(default_factory=list)

    @property
    def trains(self) -> bool:
        """Whether the row's setup trains a model (see :func:`trains`)."""
        return getattr(self.setup, "trains", False)


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every entry under ``root`` by relative path: a file's bytes, None for a folder, a word for anything
    else (a named pipe is never opened: reading it would block)."""
    out: dict[str, bytes | str | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            out[rel + "/"] = None
        elif stat.S_ISREG(mode):
            try:
                out[rel] = path.read_bytes()
            except PermissionError:
                out[rel] = b"<unreadable>"
        else:
            out[rel] = f"<mode {stat.S_IFMT(mode):o}>"
    return out


@contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in this thread if the block runs longer than ``seconds`` (a hang is a failure)."""

    def expired(*_: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_refusal(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[dict[str, bytes | str | None], dict[str, bytes | str | None]]:
    """Run a row's command (in ``tmp_path``, under a watchdog) and check its refusal: exit status 2, one
    ``progvq: error:`` line with every needle, no traceback, no temporary file's name, every entry
    present before unchanged after, and nothing new unless the row allows it (``new_files_ok``).
    Returns the snapshots before and after, for the rows' own checks of what is new."""
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/<name>, samples.png) land here too
    argv = case.setup(Ctx(tmp_path, request))
    before = snapshot(tmp_path)
    capsys.readouterr()
    with watchdog(WATCHDOG_S):
        try:
            code = main(argv)
        except SystemExit as exit_:  # as the installed command would exit
            code = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and err.endswith("\n"), err
    line = lines[0]
    assert line.startswith("progvq: error: ") and line.removeprefix("progvq: error: ").strip(), line
    assert "Traceback" not in err and ".tmp" not in line, line  # a temporary file's name means nothing to a user
    for needle in case.needles:
        assert needle.format(tmp=tmp_path) in line, line
    after = snapshot(tmp_path)
    changed = sorted(k for k, v in before.items() if after.get(k, b"<gone>") != v)
    assert not changed, f"changed or removed by a failed command: {changed}"
    if not case.new_files_ok:
        assert sorted(set(after) - set(before)) == [], "a failed command made files"
    return before, after


def case_params(cases: list[Case], *, all_train: bool = False) -> list[Any]:
    """One pytest param per row, named ``KIND-NAME``, with the row's own marks, ``trains`` where its setup
    trains (every row with ``all_train``), and skipped as root where root would read what a user cannot."""
    params = []
    for case in cases:
        marks = list(case.marks)
        if case.trains or all_train:
            marks.append(pytest.mark.trains)
        if case.skip_if_root:
            marks.append(pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file"))
        params.append(pytest.param(case, id=f"{case.kind}-{case.name}", marks=marks))
    return params


def train_args(ctx: Ctx, config: Path | str, *sets: str, verb: tuple[str, ...] = ("--all",)) -> list[str]:
    args = ["train", str(config), *verb, "--run-dir", str(ctx.tmp / "r"), "--no-progress"]
    for s in sets:
        args += ["--set", s.format(tmp=ctx.tmp)]
    return args


def with_sets(*sets: str) -> Setup:
    """``train configs/tiny.yaml --all --set ...`` into a fresh run directory."""
    return lambda ctx: train_args(ctx, TINY, *sets)


def with_text(text: str | bytes) -> Setup:
    """``train bad.yaml --all`` where bad.yaml holds ``text``."""
    return lambda ctx: train_args(ctx, ctx.write("bad.yaml", text))


def with_change(change: Callable[[dict[str, Any]], None]) -> Setup:
    """``train bad.yaml --all`` where bad.yaml is tiny.yaml changed by ``change`` (on the parsed dict)."""

    def setup(ctx: Ctx) -> list[str]:
        raw = tiny_raw()
        change(raw)
        return train_args(ctx, ctx.write("bad.yaml", yaml.safe_dump(raw)))

    return setup


def appended(extra: str) -> Setup:
    """tiny.yaml's own text with ``extra`` appended."""
    return with_text(TINY.read_text() + extra)


def images16(n: int = 12) -> np.ndarray:
    """``n`` grey 16x16 uint8 images (N, 16, 16)."""
    return make_shapes(n, size=16, seed=5)[:, 0].numpy()


def data_source(source: str, path: str, *extra: str) -> tuple[str, ...]:
    return (f"data.source={source}", f"data.path={path}", "data.heldout=2", *extra)



def images_and_labels(n_images: int, n_labels: int) -> Callable[[Path], None]:
    """Write an idx images file and an idx labels file (magic 2049) into a folder."""

    def write(folder: Path) -> None:
        (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images16(n_images)))
        (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(n_labels, np.uint8)))

    return write


def mnist_folder(content: Callable[[Path], None], *extra: str) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / "mnist"
        folder.mkdir()
        content(folder)
        return train_args(ctx, TINY, *data_source("mnist", str(folder), *extra))

    return setup


def png_folder(content: Callable[[Path], None], *extra: str, channels: int = 1) -> Setup:
    """A folder of ten good 16x16 PNGs, then changed by ``content``."""

    def setup(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / "pngs"
        folder.mkdir()
        for i, image in enumerate(images16(10)):
            Image.fromarray(image).save(folder / f"{i:02d}.png")
        content(folder)
        return train_args(ctx, TINY, *data_source("folder", str(folder), f"data.channels={channels}", *extra))

    return setup


def array_file(name: str, write: Callable[[Path], None], *extra: str) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / name
        write(path)
        return train_args(ctx, TINY, *data_source("array", str(path), *extra))

    return setup


def truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def damage_checkpoints(stage: str, damage: Callable[[Path], None]) -> Callable[[Ctx], Path]:
    """Damage every checkpoint file of ``stage`` in the run copy (the newest and any kept previous one)."""

    @trains
    def prepare(ctx: Ctx) -> Path:
        run = ctx.run()
        for path in sorted(checkpoint_path(run, stage).parent.glob("checkpoint*.pt")):
            damage(path)
        return run

    return prepare


def on_run(verb: str, prepare: Callable[[Ctx], Path], *args: str) -> Setup:
    """``progvq VERB RUN ...``; sample writes (would write) under tmp."""

    def setup(ctx: Ctx) -> list[str]:
        run = prepare(ctx)
        if verb == "train":
            return ["train", str(TINY), *args, "--run-dir", str(run), "--no-progress"]
        extra = ["--out", str(ctx.tmp / "s.png")] if verb == "sample" and "--out" not in args else []
        return [verb, str(run), *[a.format(tmp=ctx.tmp) for a in args], *extra]

    return trains(setup) if getattr(prepare, "trains", False) else setup


@trains
def trained(ctx: Ctx) -> Path:
    return ctx.run()


def not_a_run(ctx: Ctx) -> Path:
    folder = ctx.tmp / "notrun"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    return folder


def missing_dir(ctx: Ctx) -> Path:
    return ctx.tmp / "no" / "such" / "run"


def run_config(content: bytes) -> Callable[[Ctx], Path]:
    @trains
    def prepare(ctx: Ctx) -> Path:
        run = ctx.run()
        (run / "config.yaml").write_bytes(content)
        return run

    return prepare


def set_key(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *path, value = path_and_value

    def change(raw: dict[str, Any]) -> None:
        node = raw
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


@trains
def other_architecture_resume(ctx: Ctx) -> list[str]:
    """Stage 1 trained to step 3 of 6, then resumed with another width and --force."""
    run = ctx.tmp / "r"
    assert main(["train", str(TINY), "--stage", "1", "--until", "3", "--run-dir", str(run), "--no-progress"]) == 0
    args = ["train", str(TINY), "--stage", "1", "--run-dir", str(run), "--no-progress"]
    return [*args, "--set", "stages.1.hidden=32", "--force"]


def unreadable_config(ctx: Ctx) -> list[str]:
    path = ctx.write("locked.yaml", TINY.read_text())
    path.chmod(0)
    return train_args(ctx, path)


def run_dir_is_a_file(ctx: Ctx) -> list[str]:
    path = ctx.write("afile", "I am a file")
    return ["train", str(TINY), "--stage", "1", "--run-dir", str(path), "--no-progress"]


def config_is_a_directory(ctx: Ctx) -> list[str]:
    (ctx.tmp / "cfgdir.yaml").mkdir()
    return train_args(ctx, ctx.tmp / "cfgdir.yaml")


@trains
def out_under_a_file(ctx: Ctx) -> list[str]:
    blocker = ctx.write("blocker", "a file where a folder should be")
    return ["sample", str(ctx.run()), "-n", "2", "--out", str(blocker / "s.png")]


# --------------------------------------------------------------------------- the table


S = "stages"
CASES: list[Case] = [
    # ---- malformed YAML
    Case("yaml", "syntax-error", with_text("stages:\n  1: a: b\n"), ("bad.yaml", "malformed YAML at line 2, column 7")),
    Case("yaml", "tab-indent", with_text("stages:\n\t1: {}\n"), ("bad.yaml", "malformed YAML at line 2", "\\t")),
    Case("yaml", "unclosed-bracket", with_text("stages: {1: {steps: 3}\n"), ("bad.yaml", "malformed YAML")),
    Case("yaml", "scalar-top-level", with_text("42\n"), ("bad.yaml", "expected a mapping at the top level, got int")),
    Case(
        "yaml", "list-top-level", with_text("- 1\n- 2\n"),
        ("bad.yaml", "expected a mapping at the top level, got list"),
    ),
    Case("yaml", "empty-file", with_text(""), ("bad.yaml", "empty config")),
    Case("yaml", "only-comments", with_text("# a config\n"), ("bad.yaml", "empty config")),
    Case("yaml", "duplicate-key", appended("seed: 3\n"), ("bad.yaml", "key 'seed' given twice", "lines 7 and ")),
    Case(
        "yaml", "duplicate-stage", with_text(TINY.read_text().replace("  2:", "  1:")),
        ("bad.yaml", "key 1 given twice"),
    ),
    Case(
        "yaml", "not-utf8", with_text(b"stages:\n  1: {steps: \xff\xfe}\n"),
        ("bad.yaml", "not a YAML text file", "UTF-8"),
    ),
    Case(
        "yaml", "stages-not-a-mapping", with_text("stages: [1, 2]\n"),
        ("bad.yaml", "stages: expected a mapping of stages", "[1, 2]"),
    ),
    Case(
        "yaml", "impossible-date", with_text(TINY.read_text().replace("seed: 0", "seed: 2001-02-30")),
        ("bad.yaml", "line 7", "cannot read '2001-02-30' as timestamp"),
    ),
    Case(
        "yaml", "nested-too-deeply", with_text("seed: " + "[" * 3000 + "]" * 3000 + "\n"),
        ("bad.yaml", "nested too deeply"),
    ),
    # ---- unknown keys, at every level
    Case("unknown-key", "top", with_sets("colour=red"), ("tiny.yaml", "colour: unknown key", "known: data, device")),
    Case("unknown-key", "data", with_sets("data.colour=red"), ("data.colour: unknown key",)),
    Case("unknown-key", "stage", with_sets("stages.1.colour=red"), ("stages.1.colour: unknown key",)),
    Case("unknown-key", "prior", with_sets("stages.prior.colour=red"), ("stages.prior.colour: unknown key",)),
    Case(
        "unknown-key", "quantizer", with_sets("stages.2.quantizer.colour=red"),
        ("stages.2.quantizer.colour: unknown key", "known: codes, decay, dim, ema"),
    ),
    Case(
        "unknown-key", "fsq-quantizer", with_sets("stages.2.quantizer.kind=fsq"),
        ("stages.2.quantizer.codes: unknown key (known: levels)",),
    ),
    Case(
        "unknown-key", "decoder-pixelcnn",
        with_sets("stages.2.decoder.kind=autoregressive", "stages.2.decoder.pixelcnn.colour=red"),
        ("stages.2.decoder.pixelcnn.colour: unknown key", "known: channels, dropout, kernel_size, layers"),
    ),
    Case(
        "unknown-key", "prior-pixelcnn", with_sets("stages.prior.pixelcnn.colour=red"),
        ("stages.prior.pixelcnn.colour: unknown key", "known: channels, dropout, kernel_size, layers"),
    ),
    Case(
        "unknown-key", "quantizer-kind", with_sets("stages.1.quantizer.kind=x"),
        ("stages.1.quantizer.kind: must be one of vq, fsq, got 'x'",),
    ),
    Case(
        "unknown-key", "decoder-kind", with_sets("stages.2.decoder.kind=x"),
        ("stages.2.decoder.kind: must be one of logistic, factorised, pixelcnn, autoregressive, got 'x'",),
    ),
    Case(
        "unknown-key", "prior-kind", with_sets("stages.prior.kind=made"),
        ("stages.prior.kind: must be one of pixelcnn, got 'made'",),
    ),
    Case(
        "unknown-key", "loss-weights", with_sets("stages.1.loss_weights.kl=1"),
        ("stages.1.loss_weights.kl: this stage has no such loss part (its parts: recon, codebook, commit, mse)",),
    ),
    Case(
        "unknown-key", "prior-loss-weights", with_sets("stages.prior.loss_weights.recon=1"),
        ("stages.prior.loss_weights.recon: this stage has no such loss part (its parts: nll)",),
    ),
    Case("unknown-key", "sample", with_sets("sample.colour=red"), ("sample.colour: unknown key",)),
    Case("unknown-key", "stage-gap", with_sets("stages.4.steps=1"), ("stages.4: unknown stage",)),
    Case(
        "unknown-key", "stage-1-twice", with_text("stages:\n  1: {}\n  '1': {}\n  prior: {}\n"),
        ("stages.1: given twice",),
    ),
    Case("unknown-key", "key-with-newline", appended('"a\\nb": 1\n'), ("'a\\nb': unknown key",)),
    # ---- wrong types
    Case(
        "type", "string-for-int", with_sets("stages.1.steps=ten"),
        ("stages.1.steps: expected an integer, got 'ten'",),
    ),
    Case("type", "float-for-int", with_sets("stages.1.steps=2.5"), ("stages.1.steps: expected an integer, got 2.5",)),
    Case(
        "type", "bool-for-int", with_sets("stages.1.batch_size=true"),
        ("stages.1.batch_size: expected an integer, got True",),
    ),
    Case(
        "type", "bool-for-float", with_change(set_key(S, 1, "lr", True)),
        ("stages.1.lr: expected a number, got True",),
    ),
    Case(
        "type", "list-for-mapping", with_sets("stages.1.quantizer=[1, 2]"),
        ("stages.1.quantizer: expected a mapping with a kind (vq, fsq), got [1, 2]",),
    ),
    Case(
        "type", "list-for-prior-network", with_sets("stages.prior.pixelcnn=[1, 2]"),
        ("stages.prior.pixelcnn: expected a mapping, got [1, 2]",),
    ),
    Case("type", "list-for-data", with_sets("data=[1]"), ("data: expected a mapping, got [1]",)),
    Case("type", "null-for-int", with_sets("stages.1.steps=null"), ("stages.1.steps: expected an integer, got None",)),
    Case(
        "type", "null-for-loss-weights", with_sets("stages.1.loss_weights=null"),
        ("stages.1.loss_weights: expected a mapping, got None",),
    ),
    Case("type", "int-for-path", with_sets("data.path=5"), ("data.path: expected a string or null, got 5",)),
    Case(
        "type", "text-for-bool", with_sets("stages.1.quantizer.ema=yes please"),
        ("stages.1.quantizer.ema: expected true or false, got 'yes please'",),
    ),
    Case(
        "type", "date-for-int", with_sets("seed=2001-01-01"),
        ("seed: expected an integer, got datetime.date(2001, 1, 1)",),
    ),
    Case(
        "type", "int-beyond-64-bits", with_sets("stages.1.steps=" + "9" * 30),
        ("stages.1.steps: expected an integer that fits in 64 bits",),
    ),
    Case(
        "type", "int-beyond-float", with_sets("stages.1.lr=1" + "0" * 400),
        ("stages.1.lr: expected a finite number",),
    ),
    Case("type", "nan-lr", with_sets("stages.1.lr=.nan"), ("stages.1.lr: expected a finite number, got nan",)),
    Case(
        "type", "nul-in-path", with_sets("data.source=folder", 'data.path="a\\0b"'),
        ("data.path: must not contain a NUL character",),
    ),
    # ---- out-of-range values
    Case("range", "negative-lr", with_sets("stages.1.lr=-0.1"), ("stages.1.lr: must be > 0, got -0.1",)),
    Case("range", "zero-steps", with_sets("stages.2.steps=0"), ("stages.2.steps: must be >= 1, got 0",)),
    Case(
        "range", "batch-size-0", with_sets("stages.prior.batch_size=0"),
        ("stages.prior.batch_size: must be >= 1, got 0",),
    ),
    Case(
        "range", "negative-beta", with_sets("stages.1.loss_weights.commit=-1"),
        ("stages.1.loss_weights.commit: must be >= 0, got -1.0",),
    ),
    Case(
        "range", "one-code", with_sets("stages.2.quantizer.codes=1"),
        ("stages.2.quantizer.codes: must be >= 2, got 1",),
    ),
    Case(
        "range", "fsq-one-level", with_sets("stages.2.quantizer={{kind: fsq, levels: [1, 5]}}"),
        ("stages.2.quantizer.levels: must be a non-empty list of integers >= 2, got [1, 5]",),
    ),
    Case(
        "range", "code-decoder-at-level-1", with_sets("stages.1.decoder.kind=factorised"),
        ("stages.1.decoder.kind: must be logistic or pixelcnn (level 1 decodes pixels), got 'factorised'",),
    ),
    Case(
        "range", "pixel-decoder-at-level-2", with_sets("stages.2.decoder.kind=logistic"),
        (
            (
                "stages.2.decoder.kind: must be one of factorised, autoregressive "
                "(level 2 decodes the codes of level 1), got 'logistic'"
            ),
        ),
    ),
    Case(
        "range", "decoder-layers-0",
        with_sets("stages.2.decoder.kind=autoregressive", "stages.2.decoder.pixelcnn.layers=0"),
        ("stages.2.decoder.pixelcnn.layers: must be >= 1, got 0",),
    ),
    Case(
        "range", "downsample-not-power-of-2", with_sets("stages.1.downsample=3"),
        ("stages.1.downsample: must be a power of 2, got 3",),
    ),
    Case(
        "range", "downsample-too-big", with_sets("stages.1.downsample=32"),
        ("stages.1.downsample", "data.size (16)", "(32)"),
    ),
    Case(
        "range", "downsample-too-big-default-size", with_sets("data.size=null", "stages.1.downsample=32"),
        ("stages.2.downsample", "image side (32", "(64)"),
    ),
    Case(
        "range", "dropout-1", with_sets("stages.prior.pixelcnn.dropout=1"),
        ("stages.prior.pixelcnn.dropout: must be in [0, 1), got 1.0",),
    ),
    Case(
        "range", "negative-code-temperature", with_sets("sample.code_temperature=-1"),
        ("sample.code_temperature: must be >= 0, got -1.0",),
    ),
    Case(
        "range", "infinite-prior-temperature", with_sets("sample.temperature=.inf"),
        ("sample.temperature: expected a finite number, got inf",),
    ),
    Case("range", "negative-warmup", with_sets("stages.1.warmup=-1"), ("stages.1.warmup: must be >= 0, got -1",)),
    Case(
        "range", "checkpoint-every-0", with_sets("stages.1.checkpoint_every=0"),
        ("stages.1.checkpoint_every: must be >= 1, got 0",),
    ),
    Case(
        "range", "decay-1", with_sets("stages.1.quantizer.decay=1"),
        ("stages.1.quantizer.decay: must be in (0, 1), got 1.0",),
    ),
    Case(
        "range", "even-kernel", with_sets("stages.prior.pixelcnn.kernel_size=4"),
        ("stages.prior.pixelcnn.kernel_size: must be odd and >= 3, got 4",),
    ),
    Case(
        "range", "min-lr-ratio-2", with_sets("stages.2.min_lr_ratio=2"),
        ("stages.2.min_lr_ratio: must be in [0, 1], got 2.0",),
    ),
    Case("range", "two-channels", with_sets("data.channels=2"), ("data.channels: must be 1 or 3, got 2",)),
    Case("range", "shapes-size-4", with_sets("data.size=4"), ("data.size: must be >= 8 for source 'shapes', got 4",)),
    Case("range", "negative-seed", with_sets("seed=-1"), ("seed: must be in [0, 4294967295], got -1",)),
    Case("range", "negative-data-seed", with_sets("data.seed=-5"), ("data.seed: must be in [0, 4294967295], got -5",)),
    Case(
        "range", "limit-below-heldout", with_sets("data.limit=10"),
        ("data.limit: must be > data.heldout (64), got 10",),
    ),
    Case(
        "range", "heldout-above-count", with_sets("data.heldout=500"),
        ("data.count: must be > data.heldout (500), got 192",),
    ),
    Case(
        "range", "empty-data-path", with_sets("data.source=folder", 'data.path=""'),
        ("data.path: must be a path, not empty",),
    ),
    Case(
        "range", "empty-run-dir", with_change(set_key("run_dir", "")),
        ("run_dir: must be a path or null, not empty",),
    ),
    Case(
        "range", "unknown-device", with_sets("device=tpu"),
        ("device: must be one of auto, cpu, cuda, mps", "got 'tpu'"),
    ),
    Case(
        "range", "unknown-source", with_sets("data.source=web"),
        ("data.source: must be one of shapes, mnist, folder, array, got 'web'",),
    ),
    Case(
        "range", "mse-above-level-1", with_sets("stages.2.loss_weights.mse=1"),
        ("stages.2.loss_weights.mse: this stage has no such loss part (its parts: recon, codebook, commit)",),
    ),
    # ---- bad --set overrides
    Case("set", "no-equals", with_sets("stages.1.steps"), ("--set 'stages.1.steps': expected KEY=VALUE",)),
    Case("set", "empty-key", with_sets("=5"), ("--set '=5': expected KEY=VALUE",)),
    Case("set", "empty-key-part", with_sets("stages..steps=1"), ("--set 'stages..steps=1': empty part in the key",)),
    Case("set", "unknown-path", with_sets("optimiser.beta=0.9"), ("optimiser: unknown key",)),
    Case("set", "bad-yaml-value", with_sets("stages.1.steps=[1"), ("stages.1.steps: expected an integer, got '[1'",)),
    Case("set", "through-a-scalar", with_sets("seed.x=1"), ("--set 'seed.x=1': seed is not a mapping",)),
    # ---- the config file itself
    Case(
        "config-file", "missing", lambda ctx: train_args(ctx, ctx.tmp / "absent.yaml"),
        ("{tmp}/absent.yaml: config file not found",),
    ),
    Case("config-file", "is-a-directory", config_is_a_directory, ("{tmp}/cfgdir.yaml: is a directory",)),
    Case(
        "config-file", "unreadable", unreadable_config,
        ("locked.yaml: cannot read config (Permission denied)",),
        skip_if_root=True,
    ),
    # ---- data
    Case(
        "data", "missing-folder", with_sets("data.source=folder", "data.path={tmp}/nowhere"),
        ("{tmp}/nowhere: image folder not found",),
    ),
    Case("data", "folder-is-a-file", with_sets("data.source=folder", f"data.path={TINY}"), (f"{TINY}: not a folder",)),
    Case(
        "data", "truncated-idx",
        mnist_folder(lambda f: (f / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images16())[:-10])),
        ("t10k-images-idx3-ubyte: idx payload is 3062 bytes, header announces 12 x 16 x 16 = 3072",),
    ),
    Case(
        "data", "bad-idx-magic",
        mnist_folder(lambda f: (f / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images16(), magic=1234))),
        ("t10k-images-idx3-ubyte: not an idx file (magic 1234",),
    ),
    Case(
        "data", "truncated-gzip-idx",
        mnist_folder(
            lambda f: (f / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images16()))[:-20])
        ),
        ("t10k-images-idx3-ubyte.gz: cannot read idx file",),
    ),
    Case(
        "data", "no-idx-file", mnist_folder(lambda f: (f / "readme.txt").write_text("x")),
        ("{tmp}/mnist: no MNIST images file",),
    ),
    Case(
        "data", "label-count", mnist_folder(images_and_labels(12, 11)),
        ("t10k-labels-idx1-ubyte: 11 labels for 12 images",),
    ),
    Case(
        "data", "npz-without-images",
        array_file("other.npz", lambda p: np.savez(p, pixels=images16(), labels=np.zeros(12))),
        ("other.npz: npz holds several arrays and no 'images'", "pixels, labels"),
    ),
    Case(
        "data", "npz-key-not-there", array_file("other.npz", lambda p: np.savez(p, pixels=images16()), "data.key=imgs"),
        ("other.npz: no array 'imgs' in npz (keys: pixels)",),
    ),
    Case(
        "data", "npz-not-a-zip", array_file("cut.npz", lambda p: p.write_bytes(b"PK\x03\x04 cut short")),
        ("cut.npz: cannot load array",),
    ),
    Case(
        "data", "npy-pickled-objects",
        array_file("obj.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)),
        ("obj.npy: cannot load array", "allow_pickle=False"),
    ),
    Case(
        "data", "npy-int64", array_file("wide.npy", lambda p: np.save(p, images16().astype(np.int64))),
        ("wide.npy: dtype int64 not supported",),
    ),
    Case(
        "data", "npy-float-0-255", array_file("f.npy", lambda p: np.save(p, images16().astype(np.float32))),
        ("f.npy: float values must lie in [0, 1], found 0..",),
    ),
    Case(
        "data", "npy-2d", array_file("flat.npy", lambda p: np.save(p, images16()[:, 0])),
        ("flat.npy: 2-d array of shape (12, 16)",),
    ),
    Case(
        "data", "npy-two-channels", array_file("c2.npy", lambda p: np.save(p, np.zeros((12, 2, 16, 16), np.uint8))),
        ("c2.npy: shape (12, 2, 16, 16) has no channel axis of size 1 or 3",),
    ),
    Case(
        "data", "rgb-array-grey-config",
        array_file("rgb.npy", lambda p: np.save(p, np.zeros((12, 3, 16, 16), np.uint8))),
        ("rgb.npy: images have 3 channels but data.channels is 1",),
    ),
    Case(
        "data", "array-path-is-a-directory", lambda ctx: train_args(ctx, TINY, *data_source("array", str(ctx.tmp))),
        ("{tmp}: is a directory, expected a .npy or .npz file",),
    ),
    Case(
        "data", "images-larger-than-size",
        array_file("big.npy", lambda p: np.save(p, np.zeros((12, 20, 20), np.uint8))),
        ("big.npy: images are 20x20, larger than data.size (16)",),
    ),
    Case(
        "data", "images-not-divisible",
        array_file("odd.npy", lambda p: np.save(p, np.zeros((12, 12, 12), np.uint8)), "data.size=null"),
        ("odd.npy: images are 12x12, not divisible by the levels' total downsampling 8",),
    ),
    Case(
        "data", "png-not-a-png", png_folder(lambda f: (f / "05.png").write_bytes(b"hello, not a png")),
        ("pngs/05.png: cannot read image (UnidentifiedImageError",),
    ),
    Case(
        "data", "png-truncated", png_folder(lambda f: truncate(f / "05.png", 60)),
        ("pngs/05.png: cannot read image",),
    ),
    Case(
        "data", "png-mixed-sizes", png_folder(lambda f: Image.new("L", (16, 20)).save(f / "05.png")),
        ("pngs/05.png: image size 16x20 differs from 00.png's 16x16",),
    ),
    Case(
        "data", "png-rgb-with-3-channels-mixed-sizes",
        png_folder(lambda f: Image.new("RGB", (8, 8)).save(f / "07.png"), channels=3),
        ("pngs/07.png: image size 8x8 differs",),
    ),
    Case(
        "data", "empty-image-folder", png_folder(lambda f: [p.unlink() for p in f.glob("*.png")]),
        ("{tmp}/pngs: no image files (.png, .jpg, .jpeg)",),
    ),
    Case(
        "data", "fewer-images-than-heldout", array_file("few.npy", lambda p: np.save(p, images16(5)), "data.heldout=8"),
        ("few.npy: 5 images, need more than data.heldout (8)",),
    ),
    Case(
        "data", "nothing-left-to-train", array_file("few.npy", lambda p: np.save(p, images16(5)), "data.heldout=5"),
        ("few.npy: 5 images, need more than data.heldout (5)",),
    ),
    Case(
        "data", "no-data-path", with_sets("data.source=array"),
        ("data.path: must be a path for source 'array', got None",),
    ),
    # ---- run directories and checkpoints
    Case(
        "run", "other-config-without-force",
        on_run("train", trained, "--stage", "1", "--set", "stages.1.quantizer.codes=32"),
        ("was created with a different config (stages.1.quantizer.codes: 16 there, 32 now)", "--force"),
    ),
    Case(
        "run", "other-architecture-with-force", other_architecture_resume,
        ("{tmp}/r/stage-1/checkpoint.pt: does not fit this stage's model",),
        new_files_ok=True,
    ),
    Case(
        "run", "truncated-checkpoint-status", on_run("status", damage_checkpoints("2", truncate)),
        ("{tmp}/run/stage-2/checkpoint.pt: not a loadable checkpoint",),
    ),
    Case(
        "run", "truncated-checkpoint-train", on_run("train", damage_checkpoints("2", truncate), "--stage", "prior"),
        ("{tmp}/run/stage-2/checkpoint.pt: not a loadable checkpoint",),
    ),
    Case(
        "run", "truncated-checkpoint-sample", on_run("sample", damage_checkpoints("1", truncate)),
        ("{tmp}/run/stage-1/checkpoint.pt: not a loadable checkpoint",),
    ),
    Case(
        "run", "plain-tensor-checkpoint-sample",
        on_run("sample", damage_checkpoints("prior", lambda p: torch.save(torch.zeros(3), p))),
        ("{tmp}/run/prior/checkpoint.pt: not a progvq checkpoint",),
    ),
    Case(
        "run", "plain-tensor-checkpoint-eval",
        on_run("eval", damage_checkpoints("1", lambda p: torch.save(torch.zeros(3), p))),
        ("{tmp}/run/stage-1/checkpoint.pt: not a progvq checkpoint",),
    ),
    Case("run", "sample-missing-run", on_run("sample", missing_dir), ("{tmp}/no/such/run: no such run directory",)),
    Case("run", "eval-missing-run", on_run("eval", missing_dir), ("{tmp}/no/such/run: no such run directory",)),
    Case("run", "status-missing-run", on_run("status", missing_dir), ("{tmp}/no/such/run: no such run directory",)),
    Case(
        "run", "sample-not-a-run", on_run("sample", not_a_run),
        ("{tmp}/notrun/config.yaml: missing", "not a progvq run directory"),
    ),
    Case("run", "eval-not-a-run", on_run("eval", not_a_run), ("{tmp}/notrun/config.yaml: missing",)),
    Case("run", "status-not-a-run", on_run("status", not_a_run), ("{tmp}/notrun/config.yaml: missing",)),
    Case(
        "run", "run-config-malformed", on_run("status", run_config(b"stages: [\n")),
        ("{tmp}/run/config.yaml: unreadable run config",),
    ),
    Case("run", "run-config-not-utf8", on_run("status", run_config(b"\xff\xfe\x00junk")), ("{tmp}/run/config.yaml",)),
    Case("run", "run-dir-is-a-file", run_dir_is_a_file, ("{tmp}/afile",)),
    # ---- command-line values
    Case("cli", "n-0", on_run("sample", trained, "-n", "0"), ("-n: must be >= 1, got 0",)),
    Case(
        "cli", "negative-temperature", on_run("sample", trained, "--temperature", "-1"),
        ("--temperature: must be >= 0, got -1.0",),
    ),
    Case(
        "cli", "negative-code-temperature", on_run("sample", trained, "--code-temperature", "-1"),
        ("--code-temperature: must be >= 0, got -1.0",),
    ),
    Case(
        "cli", "nan-pixel-temperature", on_run("sample", trained, "--pixel-temperature", "nan"),
        ("--pixel-temperature: must be >= 0, got nan",),
    ),
    Case(
        "cli", "out-not-png", on_run("sample", trained, "--out", "{tmp}/s.jpg"),
        ("--out {tmp}/s.jpg: must end in .png",),
    ),
    Case("cli", "out-under-a-file", out_under_a_file, ("{tmp}/blocker",)),
    Case("cli", "negative-nrow", on_run("sample", trained, "-n", "2", "--nrow", "-1"), ("--nrow",)),
    Case("cli", "seed-beyond-64-bits", on_run("sample", trained, "-n", "2", "--seed", str(2**70)), ("--seed",)),
    Case(
        "cli", "until-0", lambda ctx: train_args(ctx, TINY, verb=("--stage", "1", "--until", "0")),
        ("--until: must be >= 1, got 0",),
    ),
    Case(
        "cli", "until-with-all", lambda ctx: train_args(ctx, TINY, verb=("--all", "--until", "3")),
        ("--until and --restart go with --stage, not --all",),
    ),
    Case(
        "cli", "unknown-stage", lambda ctx: train_args(ctx, TINY, verb=("--stage", "7")),
        ("--stage 7: no such stage in this config (stages: 1, 2, prior)",),
    ),
    Case(
        "cli", "stage-out-of-order", lambda ctx: train_args(ctx, TINY, verb=("--stage", "prior")),
        ("stage prior needs stage 1, which is missing",),
    ),
]


def test_table_is_big_and_unique() -> None:
    ids = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 45


@pytest.mark.parametrize("case", case_params(CASES))
def test_bad_input_is_one_line_status_2_and_keeps_files(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_refusal(case, tmp_path, request, capsys, monkeypatch)


# --------------------------------------------------------------------------- a full disk


def _no_space(*_: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full_while_saving(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str, Path, bytes]:
    """Stage 1 to step 3, then resume with every fsync failing with ENOSPC (the step-6 checkpoint cannot land)."""
    import progvq.fileio

    run = tmp_path / "r"
    args = ["train", str(TINY), "--stage", "1", "--run-dir", str(run), "--no-progress"]
    assert main([*args, "--until", "3"]) == 0
    old = checkpoint_path(run, "1").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(progvq.fileio.os, "fsync", _no_space)
    code = main(args)
    monkeypatch.undo()
    return code, capsys.readouterr().err, run, old


@pytest.mark.trains
def test_disk_full_while_saving_a_checkpoint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err, run, old = _disk_full_while_saving(tmp_path, monkeypatch, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("progvq: error: ") and "Traceback" not in err
    assert "No space left on device" in err
    # the step-3 checkpoint is intact, under its name or kept as the previous one, and it is what loads
    stage_dir = checkpoint_path(run, "1").parent
    assert old in [p.read_bytes() for p in stage_dir.glob("checkpoint*.pt")]
    found = load_latest(checkpoint_path(run, "1"))
    assert found is not None and found.checkpoint["step"] == 3
    assert not [p.name for p in stage_dir.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("stage 1: partial (step 3 of 6)")


@pytest.mark.trains
def test_disk_full_message_names_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err, run, _ = _disk_full_while_saving(tmp_path, monkeypatch, capsys)
    assert code == 2
    assert str(checkpoint_path(run, "1")) in err


def test_disk_full_while_writing_a_new_run_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import progvq.fileio

    monkeypatch.setattr(progvq.fileio.os, "fsync", _no_space)
    code = main(["train", str(TINY), "--stage", "1", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "config.yaml").exists()
    assert not list((tmp_path / "r").rglob("*.tmp"))


def test_snapshot_sees_changes(tmp_path: Path) -> None:
    """The file check of the table is not vacuous."""
    (tmp_path / "a").write_bytes(b"1")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_bytes(b"2")
    shutil.copy(tmp_path / "a", tmp_path / "b")
    after = snapshot(tmp_path)
    assert before != after and set(after) - set(before) == {"b"}
