"""Hostile input through the real command line: edited run folders, non-finite numbers, unbounded
sizes and files, failed restarts, output pairs, the command line itself and late refusals.

Each row of the table runs ``main([...])`` in this process under a watchdog (a hang fails the
row instead of the suite) and checks what ``tests/test_bad_input.py`` checks: exit status 2,
exactly one ``progvq: error:`` line naming the file, key or flag (never a temporary file), no
traceback, and every file present before byte-identical after (nothing new either). Named
pipes are recorded by kind, never read. A full disk (a real tmpfs) and a second trainer (a
real lock holder) need other processes and have their own tests below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from progvq.checkpoint import checkpoint_path, payload_digest
from run_stage import main

from .conftest import ROOT, TINY
from .helpers import idx_bytes, tiny_raw
from .test_bad_input import (
    WATCHDOG_S,
    Case,
    Ctx,
    case_params,
    check_refusal,
    images16,
    png_folder,
    train_args,
    trains,
    watchdog,
)
from .test_bad_input import snapshot as snap

# --------------------------------------------------------------------------- helpers


def stage_files(run: Path, stage: str) -> list[Path]:
    """The checkpoint files of ``stage`` (the newest and the kept previous one)."""
    return sorted(checkpoint_path(run, stage).parent.glob("checkpoint*.pt"))


def rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change a checkpoint's dict and write it back with its digest recomputed (an edit the digest cannot see)."""
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    ckpt["digest"] = payload_digest(ckpt)
    torch.save(ckpt, path)


def edited(stage: str, change: Callable[[dict[str, Any]], None], *, newest_only: bool = False) -> Callable[[Ctx], Path]:
    """The trained run with every checkpoint of ``stage`` (or the newest alone) edited by ``change``."""

    @trains
    def prepare(ctx: Ctx) -> Path:
        run = ctx.run()
        files = [checkpoint_path(run, stage)] if newest_only else stage_files(run, stage)
        for path in files:
            rewrite(path, change)
        return run

    return prepare


def run_config_edited(change: Callable[[dict[str, Any]], None]) -> Callable[[Ctx], Path]:
    @trains
    def prepare(ctx: Ctx) -> Path:
        run = ctx.run()
        raw = yaml.safe_load((run / "config.yaml").read_text())
        change(raw)
        (run / "config.yaml").write_text(yaml.safe_dump(raw))
        return run

    return prepare


def prepared(action: Callable[[Path, Ctx], None]) -> Callable[[Ctx], Path]:
    """The trained run after ``action(run, ctx)``."""

    @trains
    def prepare(ctx: Ctx) -> Path:
        run = ctx.run()
        action(run, ctx)
        return run

    return prepare


def verb(name: str, prepare: Callable[[Ctx], Path], *args: str) -> Callable[[Ctx], list[str]]:
    """``progvq NAME RUN ARGS...`` on the run ``prepare`` makes (sample and inpaint write under tmp)."""

    def setup(ctx: Ctx) -> list[str]:
        run = prepare(ctx)
        if name == "train":
            return ["train", str(TINY), *[a.format(tmp=ctx.tmp) for a in args], "--run-dir", str(run), "--no-progress"]
        extra: list[str] = []
        if name in ("sample", "inpaint") and "--out" not in args:
            extra = ["--out", str(ctx.tmp / "out.png")]
        if name == "inpaint" and "--image" not in args:
            image = ctx.tmp / "digit.png"
            from PIL import Image

            Image.fromarray(images16(1)[0]).save(image)
            extra += ["--image", str(image), "--box", "4,4,12,12"]
        return [name, str(run), *[a.format(tmp=ctx.tmp) for a in args], *extra]

    return trains(setup) if getattr(prepare, "trains", False) else setup


@trains
def trained(ctx: Ctx) -> Path:
    return ctx.run()


def fifo(ctx: Ctx, name: str) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def alias_bomb(depth: int = 9, width: int = 9) -> str:
    """YAML anchors that expand to width**depth items (a billion laughs) in a few hundred bytes."""
    lines = [f"b0: &b0 [{', '.join(['lol'] * width)}]"]
    lines += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]" for i in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


def inline_bomb(depth: int = 9, width: int = 9) -> str:
    """A flow-style YAML value whose anchors expand to width**depth items: a bomb at any key."""
    items = [f"&c0 [{', '.join(['lol'] * width)}]"]
    items += [f"&c{i} [{', '.join([f'*c{i - 1}'] * width)}]" for i in range(1, depth + 1)]
    return "[" + ", ".join(items) + "]"


def tiny_with(path: tuple[str, ...], value: str) -> Callable[[Ctx], list[str]]:
    """``train bad.yaml --all``: tiny.yaml with the value at ``path`` replaced by the YAML text ``value``."""

    def setup(ctx: Ctx) -> list[str]:
        raw = tiny_raw()
        node = raw
        for key in path[:-1]:
            node = node[int(key) if key.isdigit() else key]
        node[path[-1]] = "@@VALUE@@"
        text = yaml.safe_dump(raw, sort_keys=False).replace("'@@VALUE@@'", value)
        return config_text(ctx, text)

    return setup


def config_text(ctx: Ctx, text: str) -> list[str]:
    return train_args(ctx, ctx.write("bad.yaml", text))


def sets(*values: str, stage: str = "--all") -> Callable[[Ctx], list[str]]:
    """``train tiny.yaml`` (--all or --stage N) into a fresh run folder with ``--set`` values."""
    verb_args = ("--all",) if stage == "--all" else ("--stage", stage)
    return lambda ctx: train_args(ctx, TINY, *values, verb=verb_args)


def mnist_without_labels(ctx: Ctx) -> str:
    folder = ctx.tmp / "mnist"
    folder.mkdir(exist_ok=True)
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images16(12)))
    return str(folder)


def restart(stage: str, *values: str, prepare: Callable[[Ctx], Path] = trained) -> Callable[[Ctx], list[str]]:
    """``train --stage STAGE --restart --force --set ...`` on a finished run: it must stay as it was."""
    args = ["--stage", stage, "--restart", "--force"]
    for value in values:
        args += ["--set", value]
    return verb("train", prepare, *args)


def remove_stage(stage: str) -> Callable[[Path, Ctx], None]:
    return lambda run, ctx: shutil.rmtree(checkpoint_path(run, stage).parent)


def retrain_stage_1_with_codes(codes: int) -> Callable[[Path, Ctx], None]:
    """Stage 1 retrained (--restart --force) with another codebook size: the stages above are stale."""

    def action(run: Path, ctx: Ctx) -> None:
        args = ["train", str(TINY), "--stage", "1", "--restart", "--force", "--run-dir", str(run), "--no-progress"]
        assert main([*args, "--set", f"stages.1.quantizer.codes={codes}"]) == 0

    return action


def set_nan(name_part: str, value: float) -> Callable[[dict[str, Any]], None]:
    def change(ckpt: dict[str, Any]) -> None:
        key = next(k for k, v in ckpt["model"].items() if name_part in k and v.is_floating_point())
        ckpt["model"][key] = ckpt["model"][key].clone().fill_(value)

    return change


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda ckpt: ckpt.pop(key)


def put(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda ckpt: ckpt.update({key: value})


def stage_config(stage: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda ckpt: ckpt["config"]["stages"][stage].update({key: value})


def blocked_output(*names: str) -> Callable[[Path, Ctx], None]:
    """An earlier output pair (out.png, out.npz), then each of ``names`` replaced by a folder."""

    def action(run: Path, ctx: Ctx) -> None:
        (ctx.tmp / "out.png").write_bytes(b"an earlier grid")
        (ctx.tmp / "out.npz").write_bytes(b"an earlier array")
        for name in names:
            (ctx.tmp / name).unlink()
            (ctx.tmp / name).mkdir()
            (ctx.tmp / name / "keep").write_text("mine")

    return action


def with_run_file(name: str, make: Callable[[Path, Ctx], None]) -> Callable[[Ctx], Path]:
    """The trained run with its file ``name`` (relative to the run) replaced by what ``make`` puts there."""

    @trains
    def prepare(ctx: Ctx) -> Path:
        run = ctx.run()
        path = run / name
        path.unlink()
        make(path, ctx)
        return run

    return prepare


def make_fifo(path: Path, ctx: Ctx) -> None:
    os.mkfifo(path)


def make_big(size: int) -> Callable[[Path, Ctx], None]:
    return lambda path, ctx: path.write_bytes(b"# padding\n" * (size // 10))


def make_text(text: str) -> Callable[[Path, Ctx], None]:
    return lambda path, ctx: path.write_text(text)


def make_dir(path: Path, ctx: Ctx) -> None:
    path.mkdir()


def both_checkpoints(stage: str, make: Callable[[Path, Ctx], None]) -> Callable[[Ctx], Path]:
    @trains
    def prepare(ctx: Ctx) -> Path:
        run = ctx.run()
        for path in stage_files(run, stage):
            path.unlink()
            make(path, ctx)
        return run

    return prepare


def huge(n: int) -> str:
    return str(n)


def _symlink(ctx: Ctx, name: str, target: str) -> Path:
    path = ctx.tmp / name
    path.symlink_to(target)
    return path


def _copy_stage_files(source: str, dest: str) -> Callable[[Path, Ctx], None]:
    def action(run: Path, ctx: Ctx) -> None:
        for path in stage_files(run, dest):
            path.unlink()
        for path in stage_files(run, source):
            shutil.copy2(path, checkpoint_path(run, dest).parent / path.name)

    return action


def _add_level_3(raw: dict[str, Any]) -> None:
    """The run config given a third level the prior was never trained on."""
    raw["stages"] = {"1": raw["stages"]["1"], "2": raw["stages"]["2"], "3": raw["stages"]["2"],
                     "prior": raw["stages"]["prior"]}


# --------------------------------------------------------------------------- the table

BOMB = alias_bomb()
T = "{tmp}"
CASES: list[Case] = [
    # ---- a failed command must not break a finished run (the run stays byte-identical)
    Case(
        "restart", "data-missing",
        restart("1", "data.source=mnist", f"data.path={T}/nowhere"), (f"{T}/nowhere",),
    ),
    Case("restart", "model-too-large", restart("1", "stages.1.hidden=1000000"), ("stages.1: a model of",)),
    Case("restart", "prior-too-large", restart("prior", "stages.prior.pixelcnn.channels=1000000"), ("stages.prior",)),
    Case(
        "restart", "prior-without-labels",
        lambda ctx: restart(
            "prior", "data.source=mnist", f"data.path={mnist_without_labels(ctx)}", "data.heldout=2",
            "stages.prior.class_conditional=true",
        )(ctx),
        ("no labels", "class_conditional"),
    ),
    Case("restart", "diverges-stage-1", restart("1", "stages.1.lr=1.0e+30"), ("stage 1: loss is not finite at step",)),
    Case("restart", "diverges-stage-2", restart("2", "stages.2.lr=1.0e+30"), ("stage 2: loss is not finite at step",)),
    Case(
        "restart", "diverges-prior", restart("prior", "stages.prior.lr=1.0e+30"),
        ("stage prior: loss is not finite at step",),
    ),
    Case(
        "restart", "infinite-loss-weight", restart("1", "stages.1.loss_weights.recon=1.0e+300"),
        ("stage 1: loss is not finite", "recon"),
    ),
    Case(
        "restart", "stage-below-gone", restart("2", prepare=prepared(remove_stage("1"))),
        ("stage 2 needs stage 1, which is missing",),
    ),
    Case(
        "restart", "forced-config-does-not-fit", verb("train", trained, "--stage", "1", "--force", "--set",
                                                      "stages.1.steps=9", "--set", "stages.1.hidden=24"),
        ("stage-1/checkpoint.pt", "does not fit"),
    ),
    # ---- non-finite numbers
    Case(
        "nonfinite", "nan-weights-stage-1", verb("sample", edited("1", set_nan("weight", float("nan")))),
        ("stage-1/checkpoint", "not finite"),
    ),
    Case(
        "nonfinite", "inf-weights-prior", verb("eval", edited("prior", set_nan("weight", float("inf")))),
        ("prior/checkpoint", "not finite"),
    ),
    Case(
        "nonfinite", "nan-codebook-stage-2", verb("sample", edited("2", set_nan("codebook", float("nan")))),
        ("stage-2/checkpoint", "not finite"),
    ),
    Case(
        "nonfinite", "nan-newest-only", verb("eval", edited("1", set_nan("weight", float("nan")), newest_only=True),
                                              "--allow-stale"),
        ("stage-1/checkpoint.pt", "weights are not finite"),
    ),
    Case(
        "nonfinite", "nan-weights-resume", verb("train", edited("1", set_nan("weight", float("nan"))),
                                                 "--stage", "1"),
        ("stage-1/checkpoint", "not finite"),
    ),
    Case("nonfinite", "inf-temperature", verb("sample", trained, "--temperature", "inf"), ("--temperature",)),
    Case("nonfinite", "nan-code-temperature", verb("sample", trained, "--code-temperature", "nan"),
         ("--code-temperature",)),
    Case("nonfinite", "nan-guidance", verb("sample", trained, "--guidance", "nan"), ("--guidance",)),
    Case("nonfinite", "inf-lr", sets("stages.1.lr=.inf"), ("stages.1.lr: expected a finite number",)),
    Case("nonfinite", "huge-lr-text", sets("stages.1.lr=1e400"), ("stages.1.lr", "1e400")),
    # ---- unbounded input
    Case("unbounded", "bomb-as-stages", lambda ctx: config_text(ctx, BOMB + "stages: *b9\n"),
         ("bad.yaml", "stages: expected a mapping")),
    Case("unbounded", "bomb-as-data", tiny_with(("data",), inline_bomb()), ("bad.yaml", "data: expected a mapping")),
    Case("unbounded", "bomb-as-a-number", tiny_with(("stages", "1", "hidden"), inline_bomb()),
         ("bad.yaml", "stages.1.hidden: expected an integer")),
    Case("unbounded", "bomb-as-a-seed", tiny_with(("seed",), inline_bomb()), ("bad.yaml", "seed")),
    Case("unbounded", "bomb-as-a-kind", tiny_with(("stages", "prior", "kind"), inline_bomb()),
         ("bad.yaml", "stages.prior.kind")),
    Case("unbounded", "bomb-beside-known-keys", lambda ctx: config_text(ctx, TINY.read_text() + "extra: "
                                                                       + inline_bomb() + "\n"),
         ("bad.yaml", "extra: unknown key")),
    Case("unbounded", "bomb-in-run-config", verb("status", with_run_file("config.yaml", make_text(BOMB))),
         ("config.yaml",)),
    Case("unbounded", "dev-zero-config", lambda ctx: train_args(ctx, "/dev/zero"),
         ("/dev/zero", "character device")),
    Case("unbounded", "fifo-config", lambda ctx: train_args(ctx, fifo(ctx, "pipe.yaml")), ("pipe.yaml", "named pipe")),
    Case("unbounded", "symlink-to-dev-zero", lambda ctx: train_args(ctx, _symlink(ctx, "zero.yaml", "/dev/zero")),
         ("zero.yaml", "character device")),
    Case("unbounded", "huge-config", lambda ctx: train_args(ctx, ctx.write("big.yaml", "# x\n" * 400_000)),
         ("big.yaml", "too large")),
    Case("unbounded", "fifo-run-config-status", verb("status", with_run_file("config.yaml", make_fifo)),
         ("config.yaml", "named pipe")),
    Case("unbounded", "fifo-run-config-sample", verb("sample", with_run_file("config.yaml", make_fifo)),
         ("config.yaml", "named pipe")),
    Case("unbounded", "fifo-run-config-train", verb("train", with_run_file("config.yaml", make_fifo), "--all"),
         ("config.yaml", "named pipe")),
    Case("unbounded", "huge-run-config", verb("eval", with_run_file("config.yaml", make_big(2_000_000))),
         ("config.yaml", "too large")),
    Case("unbounded", "fifo-checkpoints", verb("sample", both_checkpoints("1", make_fifo)),
         ("stage-1/checkpoint", "named pipe")),
    Case("unbounded", "fifo-checkpoints-status", verb("status", both_checkpoints("prior", make_fifo)),
         ("prior/checkpoint", "named pipe")),
    Case("unbounded", "checkpoint-is-a-folder", verb("eval", both_checkpoints("2", make_dir)),
         ("stage-2/checkpoint", "is a directory")),
    Case("unbounded", "fifo-image", lambda ctx: verb("inpaint", trained, "--image", str(fifo(ctx, "in.png")),
                                                     "--box", "0,0,4,4")(ctx), ("in.png",)),
    # ---- a run folder edited or damaged by hand
    Case("edited", "level-removed-eval", verb("eval", run_config_edited(lambda c: c["stages"].pop("2"))),
         ("config.yaml", "no stage 2")),
    Case("edited", "level-removed-sample", verb("sample", run_config_edited(lambda c: c["stages"].pop("2"))),
         ("config.yaml", "no stage 2")),
    Case("edited", "level-removed-inpaint", verb("inpaint", run_config_edited(lambda c: c["stages"].pop("2"))),
         ("config.yaml", "no stage 2")),
    Case("edited", "no-step", verb("sample", edited("1", drop("step"))), ("stage-1/checkpoint", "'step'")),
    Case("edited", "no-extra", verb("eval", edited("2", drop("extra"))), ("stage-2/checkpoint", "'extra'")),
    Case("edited", "no-parents", verb("sample", edited("prior", drop("parents"))), ("prior/checkpoint", "'parents'")),
    Case("edited", "no-model", verb("eval", edited("1", drop("model"))), ("stage-1/checkpoint", "'model'")),
    Case("edited", "no-step-status", verb("status", edited("2", drop("step"))), ("stage-2/checkpoint", "'step'")),
    Case("edited", "step-is-text", verb("sample", edited("1", put("step", "six"))), ("stage-1/checkpoint", "'step'")),
    Case("edited", "negative-steps", verb("eval", edited("prior", put("steps", -1))), ("prior/checkpoint", "'steps'")),
    Case("edited", "config-not-a-mapping", verb("sample", edited("2", put("config", [1, 2]))),
         ("stage-2/checkpoint", "'config'")),
    Case("edited", "digest-not-text", verb("sample", edited("prior", put("parents", {"1": 5}))),
         ("prior/checkpoint", "'parents'")),
    Case("edited", "bad-image-shape", verb("eval", edited("1", lambda c: c["extra"].update(image_shape=[1, 16]))),
         ("stage-1/checkpoint", "'extra'")),
    Case("edited", "stage-mismatch", verb("eval", edited("1", put("stage", "2")), "--allow-stale"),
         ("stage-1/checkpoint.pt", "holds stage 2, not stage 1")),
    Case("edited", "other-stage-copied-in", verb("sample", prepared(_copy_stage_files("2", "1")), "--allow-stale"),
         ("stage-1/checkpoint.pt", "holds stage 2")),
    Case("edited", "invalid-config-in-checkpoint", verb("eval", edited("2", stage_config("2", "hidden", -3)),
                                                        "--allow-stale"),
         ("stage-2/checkpoint.pt", "stages.2.hidden")),
    Case("edited", "other-codes-eval", verb("eval", prepared(retrain_stage_1_with_codes(12)), "--allow-stale"),
         ("stage-2/checkpoint.pt", "16 codes", "12 codes")),
    Case("edited", "other-codes-sample", verb("sample", prepared(retrain_stage_1_with_codes(12)), "--allow-stale"),
         ("stage-2/checkpoint.pt", "16 codes", "12 codes")),
    Case("edited", "level-added", verb("sample", run_config_edited(_add_level_3), "--allow-stale"),
         ("stage 3 is not trained",)),
    # ---- sizes that validate but cannot be allocated
    Case("sizes", "hidden-1e12", sets("stages.1.hidden=1000000000000"), ("stages.1",)),
    Case("sizes", "hidden-1e6", sets("stages.1.hidden=1000000"), ("stages.1: a model of", "would take")),
    Case("sizes", "codes-1e10", sets("stages.1.quantizer.codes=10000000000"), ("stages.1",)),
    Case("sizes", "code-dim-1e9", sets("stages.2.quantizer.dim=1000000000"), ("stages.2",)),
    Case("sizes", "prior-channels-1e6", sets("stages.prior.pixelcnn.channels=1000000"), ("stages.prior",)),
    Case("sizes", "count-1e12", sets("data.count=1000000000000"), ("data.count", "would take")),
    Case("sizes", "count-1e12-one-stage", sets("data.count=1000000000000", stage="1"), ("data.count",)),
    Case("sizes", "sample-n-1e12", verb("sample", trained, "-n", huge(10**12)), ("-n 1000000000000", "would take")),
    Case("sizes", "sample-n-1e10", verb("sample", trained, "-n", huge(10**10)), ("-n 10000000000",)),
    Case("sizes", "nrow-2-62", verb("sample", trained, "-n", "4", "--nrow", huge(2**62)), ("--nrow", "would take")),
    Case("sizes", "inpaint-candidates", verb("inpaint", trained, "--candidates", huge(10**12)),
         ("--candidates 1000000000000", "would take")),
    Case("sizes", "inpaint-n", verb("inpaint", trained, "-n", huge(10**12)), ("-n 1000000000000",)),
    Case("sizes", "inpaint-nrow", verb("inpaint", trained, "--nrow", huge(2**40)), ("--nrow",)),
    # ---- outputs written as a pair: neither or both
    Case("outputs", "npz-is-a-folder", verb("sample", prepared(blocked_output("out.npz")), "-n", "2"),
         (f"{T}/out.npz", "is a directory")),
    Case("outputs", "png-is-a-folder", verb("sample", prepared(blocked_output("out.png")), "-n", "2"),
         (f"{T}/out.png", "is a directory")),
    Case("outputs", "inpaint-npz-is-a-folder", verb("inpaint", prepared(blocked_output("out.npz"))),
         (f"{T}/out.npz", "is a directory")),
    Case("outputs", "out-folder-is-a-file", lambda ctx: verb("sample", trained, "--out",
                                                             str(ctx.write("plain", "x") / "s.png"))(ctx),
         ("plain",)),
    # ---- the command line itself
    Case("cli", "n-not-a-number", verb("sample", trained, "-n", "abc"), ("argument -n", "--help")),
    Case("cli", "no-command", lambda ctx: [], ("COMMAND", "progvq --help")),
    Case("cli", "unknown-command", lambda ctx: ["bogus"], ("invalid choice: 'bogus'", "--help")),
    Case("cli", "unknown-option", verb("sample", trained, "--bogus"), ("--bogus", "--help")),
    Case("cli", "run-dir-empty", lambda ctx: ["train", str(TINY), "--all", "--run-dir", ""], ("--run-dir",)),
    Case("cli", "run-dir-blank", lambda ctx: ["train", str(TINY), "--all", "--run-dir", "  "], ("--run-dir",)),
    Case("cli", "seed-not-a-number", verb("sample", trained, "--seed", "x"), ("--seed", "--help")),
    Case("cli", "nrow-fraction", verb("sample", trained, "--nrow", "1.5"), ("--nrow", "--help")),
    Case("cli", "temperature-text", verb("sample", trained, "--temperature", "hot"), ("--temperature", "--help")),
    Case("cli", "train-neither-stage-nor-all", lambda ctx: ["train", str(TINY)], ("--stage", "progvq train --help")),
    Case("cli", "train-stage-and-all", lambda ctx: ["train", str(TINY), "--stage", "1", "--all"],
         ("--all", "--help")),
    Case("cli", "inpaint-no-image", verb("inpaint", trained, "--image"), ("--image", "--help")),
    Case("cli", "eval-bad-split", verb("eval", trained, "--split", "test"), ("--split", "--help")),
    Case("cli", "guidance-unconditional", verb("sample", trained, "--guidance", "1"),
         ("--guidance 1", "not class-conditional")),
    Case("cli", "guidance-in-config-unconditional", sets("sample.guidance=2"),
         ("sample.guidance", "unconditional prior")),
    Case("cli", "negative-guidance-in-config", sets("sample.guidance=-1"), ("sample.guidance", ">= 0")),
    Case("cli", "set-text-for-int", sets("stages.1.hidden=1e3"), ("stages.1.hidden: expected an integer",)),
    # ---- late refusals: train --all checks what it can before its first step
    Case("late", "conditional-prior-without-labels", lambda ctx: train_args(
        ctx, TINY, "data.source=mnist", f"data.path={mnist_without_labels(ctx)}", "data.heldout=2",
        "stages.prior.class_conditional=true"), ("no labels", "class_conditional")),
    Case("late", "conditional-prior-flat-folder",
         png_folder(lambda folder: None, "stages.prior.class_conditional=true"),
         ("pngs", "no class folders", "class_conditional")),
    Case("late", "prior-too-large", sets("stages.prior.pixelcnn.channels=200000"), ("stages.prior",)),
    Case("late", "stage-2-too-large", sets("stages.2.hidden=300000"), ("stages.2",)),
    Case("late", "prior-layers-too-many", sets("stages.prior.pixelcnn.channels=4096",
                                               "stages.prior.pixelcnn.layers=20000"), ("stages.prior",)),
]


def test_table_is_big_unique_and_covers_every_kind() -> None:
    ids = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 75
    assert {c.kind for c in CASES} == {"restart", "nonfinite", "unbounded", "edited", "sizes", "outputs", "cli", "late"}


@pytest.mark.parametrize("case", case_params(CASES))
def test_hostile_input_is_one_line_status_2_and_keeps_files(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_refusal(case, tmp_path, request, capsys, monkeypatch)


# --------------------------------------------------------------------------- temperatures and numbers accepted


@pytest.mark.trains
@pytest.mark.parametrize(
    "flags",
    [
        ("--temperature", "1e-300", "--code-temperature", "0", "--pixel-temperature", "0"),
        ("--temperature", "0", "--code-temperature", "5e-324", "--pixel-temperature", "0"),
        ("--temperature", "5e-324", "--code-temperature", "1e-300", "--pixel-temperature", "0"),
    ],
    ids=["prior-1e-300", "codes-5e-324", "both-tiny"],
)
def test_a_tiny_temperature_samples_the_most_likely_code(
    flags: tuple[str, ...], tiny_run: Path, tmp_path: Path
) -> None:
    """Any temperature > 0 draws; as it nears 0 the draw is the most likely code, as at temperature 0."""
    tiny = tmp_path / "tiny.png"
    zero = tmp_path / "zero.png"
    common = ["sample", str(tiny_run), "-n", "8", "--seed", "3"]
    assert main([*common, *flags, "--out", str(tiny)]) == 0
    zeros = ["--temperature", "0", "--code-temperature", "0", "--pixel-temperature", "0"]
    assert main([*common, *zeros, "--out", str(zero)]) == 0
    assert np.array_equal(np.load(tiny.with_suffix(".npz"))["images"], np.load(zero.with_suffix(".npz"))["images"])


def test_numbers_written_without_a_dot_are_numbers_for_number_keys(tmp_path: Path) -> None:
    from progvq.config import load_config

    cfg = load_config(TINY, ["stages.1.lr=1e-3", "stages.2.lr=5E-4", "sample.temperature=.5e0"])
    assert (cfg.level(1).lr, cfg.level(2).lr, cfg.sample.temperature) == (1e-3, 5e-4, 0.5)
    (tmp_path / "c.yaml").write_text(TINY.read_text().replace("lr: 0.003", "lr: 3e-3"))
    assert load_config(tmp_path / "c.yaml").level(1).lr == 3e-3


# --------------------------------------------------------------------------- one trainer per run folder


_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(120)
    """
)


@contextmanager
def lock_holder(folder: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the training lock of ``folder`` (as a trainer does)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.trains
def test_a_second_trainer_is_refused_naming_the_holder(
    tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snap(tiny_copy)
    with lock_holder(tiny_copy) as holder:
        capsys.readouterr()
        with watchdog(WATCHDOG_S):
            code = main(["train", str(TINY), "--stage", "1", "--restart", "--run-dir", str(tiny_copy), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("progvq: error: ")
        assert str(tiny_copy) in err and f"process {holder.pid} is training this run" in err
        assert snap(tiny_copy) == before
        # readers never wait for the lock
        with watchdog(WATCHDOG_S):
            assert main(["status", str(tiny_copy)]) == 0
            assert main(["sample", str(tiny_copy), "-n", "2", "--out", str(tmp_path / "s.png")]) == 0
            assert main(["eval", str(tiny_copy), "--json"]) == 0


@pytest.mark.trains
def test_a_killed_trainer_leaves_no_stale_lock(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with lock_holder(tiny_copy) as holder:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
        with watchdog(WATCHDOG_S):
            assert main(["train", str(TINY), "--all", "--run-dir", str(tiny_copy), "--no-progress"]) == 0
    assert "already done" in capsys.readouterr().out


def test_a_refused_new_run_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The lock is taken on the run folder; one made only to be locked goes again when the command fails."""
    run = tmp_path / "deep" / "new" / "run"
    args = ["train", str(TINY), "--all", "--run-dir", str(run), "--set", "data.source=mnist"]
    assert main([*args, "--set", f"data.path={tmp_path / 'nowhere'}"]) == 2
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- a real full disk

_DRIVER = ROOT / "tests" / "disk_full_driver.py"

#: name -> (bytes left free on the disk, the command with {m} the mount point and {run} the trained run on it,
#: what the error line names, whether every file must stay as it was: a run that trained some steps before
#: the disk filled keeps those, in its newest good checkpoint)
DISK_CASES: dict[str, tuple[int, list[str], tuple[str, ...], bool]] = {
    "new-checkpoint": (
        300_000, ["train", str(TINY), "--stage", "1", "--run-dir", "{m}/new", "--no-progress"],
        ("{m}/new/stage-1/checkpoint.pt", "No space left on device"), False,
    ),
    "new-run-config": (
        0, ["train", str(TINY), "--stage", "1", "--run-dir", "{m}/new", "--no-progress"],
        ("{m}/new/config.yaml", "No space left on device"), True,
    ),
    "forced-run-config": (
        0, ["train", str(TINY), "--stage", "1", "--run-dir", "{run}", "--no-progress", "--force",
            "--set", "stages.1.steps=9"],
        ("{run}/config.yaml", "No space left on device"), True,
    ),
    "events": (
        8_000, ["train", str(TINY), "--stage", "1", "--run-dir", "{run}", "--no-progress", "--force",
                "--set", "stages.1.steps=400", "--set", "stages.1.log_every=1"],
        ("{run}/stage-1/events.out.tfevents.", "No space left on device"), False,
    ),
    "restart-checkpoint": (
        60_000, ["train", str(TINY), "--stage", "1", "--restart", "--run-dir", "{run}", "--no-progress"],
        ("{run}/stage-1/checkpoint.pt", "No space left on device"), True,
    ),
    "sample-pair": (
        0, ["sample", "{run}", "-n", "16", "--out", "{m}/old.png"], ("{m}/old.", "No space left on device"), True,
    ),
    "inpaint-pair": (
        0, ["inpaint", "{run}", "--image", "{m}/digit.png", "--box", "2,2,9,9", "--out", "{m}/old.png"],
        ("{m}/old.", "No space left on device"), True,
    ),
    "encode": (
        0, ["encode", "{run}", "--split", "heldout", "--out", "{m}/codes.npz"],
        ("{m}/codes.npz", "No space left on device"), True,
    ),
    "compress": (
        0, ["compress", "{run}", "--split", "heldout", "--out", "{m}/held.pvq"],
        ("{m}/held.pvq", "No space left on device"), True,
    ),
}


@pytest.fixture(scope="module")
def disk_full_results(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every full-disk case, run once in a private mount namespace where each gets its own small tmpfs."""
    work = tmp_path_factory.mktemp("diskfull")
    spec = work / "spec.json"
    spec.write_text(json.dumps({"run": str(tiny_run), "work": str(work), "cases": DISK_CASES}))
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True, check=False
    ) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no user and mount namespaces here (unshare refused): cannot mount a small filesystem")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, str(_DRIVER), str(spec)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - start < 300
    return {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}


@pytest.mark.trains
@pytest.mark.parametrize("name", list(DISK_CASES))
def test_a_real_full_disk_is_one_line_and_keeps_files(name: str, disk_full_results: dict[str, dict[str, Any]]) -> None:
    _, _, needles, strict = DISK_CASES[name]
    result = disk_full_results[name]
    err = result["err"]
    assert result["code"] == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("progvq: error: ") and "Traceback" not in err, err
    assert ".tmp" not in err
    for needle in needles:
        assert needle.format(m=result["mount"], run=result["run"]) in err, err
    assert not any(".tmp" in p for p in result["new"]), result["new"]  # no half-written file left
    if strict:
        assert result["changed"] == [], f"changed or removed: {result['changed']}"
        assert [p for p in result["new"] if not p.startswith("new/")] == [], result["new"]
    else:
        # it trained before the disk filled: what it wrote last is a loadable checkpoint
        assert result["loadable"], result


# --------------------------------------------------------------------------- a stage that diverges part-way


@pytest.mark.trains
def test_a_stage_diverging_after_a_checkpoint_keeps_it(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stage 2 retrained to step 3, then resumed with a learning rate that diverges: one line naming the stage
    and the step, the step-3 checkpoint kept as the newest, finite, and the stage never marked done."""
    args = ["train", str(TINY), "--stage", "2", "--run-dir", str(tiny_copy), "--no-progress"]
    assert main([*args, "--restart", "--until", "3"]) == 0
    kept = checkpoint_path(tiny_copy, "2").read_bytes()
    capsys.readouterr()
    assert main([*args, "--force", "--set", "stages.2.lr=1.0e+30"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    step = re.search(r"stage 2: loss is not finite at step (\d+) ", err)
    assert step is not None and int(step.group(1)) > 3 and "its last checkpoint (step 3" in err
    assert checkpoint_path(tiny_copy, "2").read_bytes() == kept
    capsys.readouterr()
    assert main(["status", str(tiny_copy)]) == 0
    assert "stage 2: partial (step 3 of 6)" in capsys.readouterr().out
