"""Crash safety: kills, signals, damaged checkpoints, provenance, hostile files, determinism."""

from __future__ import annotations

import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from progvq.checkpoint import (
    PREVIOUS_NAME,
    checkpoint_path,
    load_checkpoint,
    load_latest,
    payload_digest,
)
from progvq.errors import RunError
from run_stage import main

from . import crash_harness
from .conftest import ROOT, TINY
from .helpers import Payload, train


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("progvq: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------- kills


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    work = tmp_path_factory.mktemp("crash")
    steps = 150  # room for every planned interruption even when the machine is fast
    return crash_harness.reference(work, steps), steps


@pytest.mark.parametrize("stage", crash_harness.STAGES)
@pytest.mark.trains
def test_killed_and_signalled_runs_end_bit_identical(stage: str, reference: tuple[Path, int], tmp_path: Path) -> None:
    """The short harness: 3 SIGKILLs and one SIGTERM/SIGINT per stage kind (the full one runs 10+)."""
    ref, steps = reference
    report = crash_harness.interrupt_stage(ref, tmp_path, stage, steps, kills=3, signals=1, seed=1)
    assert report.kills == 3 and report.signals == 1, report
    # one of the three kills damages the newest checkpoint: the fallback is exercised every time, never vacuously
    assert report.damage_planned == 1 and report.damaged == 1, report
    assert report.fallbacks == report.damaged, report  # every damaged checkpoint was noticed and stepped over
    assert report.identical, report
    assert not list(checkpoint_path(tmp_path / f"interrupted-{stage}", stage).parent.glob(".checkpoint*.tmp"))


@pytest.mark.trains
def test_sigterm_checkpoints_the_current_step_and_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = crash_harness.train_command(run, "1", 400)
    proc = subprocess.Popen(
        command, env=crash_harness.ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    stage_dir = checkpoint_path(run, "1").parent
    assert crash_harness._wait_for_write(proc, stage_dir, timeout=120)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    found = re.search(
        r"SIGTERM: stage 1 stopped at step (\d+) of 400; checkpoint written to (\S+); "
        r"to resume, run the same command again: progvq train ",
        last,
    )
    assert found, last
    ckpt = load_checkpoint(found.group(2))
    assert ckpt["step"] == int(found.group(1)) > 0


# ---------------------------------------------------------------------------- damaged checkpoints


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        # a byte in the middle of the largest stored tensor: the file still unpickles, only the digest can tell
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"not a checkpoint at all")


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "garbage"])
@pytest.mark.trains
def test_damaged_checkpoint_is_set_aside_and_the_previous_used(
    how: str,
    tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run = tmp_path / "run"
    assert train(run, "--stage", "1") == 0  # checkpoints at steps 3 (previous) and 6 (newest)
    latest = checkpoint_path(run, "1")
    assert load_checkpoint(latest.with_name(PREVIOUS_NAME))["step"] == 3
    _damage(latest, how)
    with pytest.raises(RunError, match="checkpoint"):
        load_checkpoint(latest)
    found = load_latest(latest)
    assert found is not None and found.path.name == PREVIOUS_NAME and found.checkpoint["step"] == 3 and found.fell_back
    capsys.readouterr()
    # status reports it; sample refuses the unfinished stage and says why
    assert main(["status", str(run)]) == 0
    assert "stage 1: partial (step 3 of 6) [" in capsys.readouterr().out
    # training moves the damaged file aside, resumes from step 3 and ends where an uninterrupted run ends
    assert train(run, "--stage", "1") == 0
    out = capsys.readouterr().out
    assert "resuming from checkpoint.prev.pt instead" in out and "resuming at step 3 of 6" in out
    assert (latest.parent / "checkpoint.pt.damaged-1").exists()
    assert load_checkpoint(latest)["digest"] == load_checkpoint(checkpoint_path(tiny_run, "1"))["digest"]


@pytest.mark.trains
def test_flipped_byte_is_caught_by_the_digest(tiny_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    ckpt = load_checkpoint(checkpoint_path(tiny_run, "1"))
    name = next(k for k in ckpt["model"] if ckpt["model"][k].numel() > 100)
    ckpt["model"][name].view(-1)[7] += 1e-3  # a change torch.load cannot notice
    torch.save(ckpt, path)
    with pytest.raises(RunError, match="damaged checkpoint"):
        load_checkpoint(path)
    assert payload_digest(ckpt) != ckpt["digest"]


@pytest.mark.trains
def test_both_checkpoints_damaged_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert train(run, "--stage", "1") == 0
    latest = checkpoint_path(run, "1")
    _damage(latest, "truncate")
    _damage(latest.with_name(PREVIOUS_NAME), "garbage")
    capsys.readouterr()
    assert main(["status", str(run)]) == 2
    assert "checkpoint.pt" in one_error_line(capsys)
    # training is refused too, and again: with nothing to resume from, nothing is moved aside
    # (else the next train would start the stage anew as if it had never been trained)
    for _ in range(2):
        assert train(run, "--stage", "1") == 2
        assert "checkpoint.pt" in one_error_line(capsys)
    assert latest.exists() and latest.with_name(PREVIOUS_NAME).exists()
    assert not list(latest.parent.glob("*.damaged-*"))


@pytest.mark.trains
def test_leftover_temporary_file_of_a_cut_write_is_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert train(run, "--stage", "1", "--until", "3") == 0
    leftover = checkpoint_path(run, "1").parent / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert train(run, "--stage", "1") == 0
    assert not leftover.exists()
    assert "removed .checkpoint.pt.abc123.tmp" in capsys.readouterr().out


# ---------------------------------------------------------------------------- provenance


@pytest.mark.trains
def test_retraining_a_lower_stage_makes_the_stages_above_stale(
    tiny_copy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run = tiny_copy
    out = str(tmp_path / "s.png")
    # retrain stage 1 differently (another learning rate)
    assert train(run, "--stage", "1", "--restart", "--force", "--set", "stages.1.lr=0.002") == 0
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[0] == "stage 1: done (6 steps)"
    assert status[1].startswith("stage 2: done (6 steps), STALE: stage 1 was retrained")
    assert status[2].startswith("prior: done (6 steps), STALE: stage 1 was retrained")
    # sample and eval refuse, unless told otherwise
    assert main(["sample", str(run), "-n", "4", "--out", out]) == 2
    line = one_error_line(capsys)
    assert "stage 2 is stale" in line and "--allow-stale" in line
    assert main(["eval", str(run)]) == 2
    assert "stale" in one_error_line(capsys)
    assert main(["sample", str(run), "-n", "4", "--out", out, "--allow-stale"]) == 0
    assert main(["eval", str(run), "--allow-stale", "--json"]) == 0
    capsys.readouterr()
    # stage 2 cannot resume or count as done on the new stage 1; the prior cannot build on the stale stage 2
    assert train(run, "--stage", "2", "--set", "stages.1.lr=0.002") == 2
    assert "--restart" in one_error_line(capsys)
    assert train(run, "--stage", "prior", "--set", "stages.1.lr=0.002") == 2
    assert "stage 2, which is stale" in one_error_line(capsys)
    # retraining stage 2 clears it; the prior stays stale until it is retrained too
    assert train(run, "--stage", "2", "--restart", "--set", "stages.1.lr=0.002") == 0
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[1] == "stage 2: done (6 steps)" and "STALE" in status[2]
    assert train(run, "--stage", "prior", "--restart", "--set", "stages.1.lr=0.002") == 0
    assert main(["sample", str(run), "-n", "4", "--out", out]) == 0


@pytest.mark.trains
def test_retraining_identically_is_not_stale(tiny_copy: Path, capsys: pytest.CaptureFixture) -> None:
    """The same config and seed give the same stage 1 content, so nothing above it goes stale."""
    assert train(tiny_copy, "--stage", "1", "--restart") == 0
    capsys.readouterr()
    assert main(["status", str(tiny_copy)]) == 0
    assert "STALE" not in capsys.readouterr().out


@pytest.mark.trains
def test_removed_lower_stage_makes_the_stages_above_stale(tiny_copy: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.rmtree(checkpoint_path(tiny_copy, "2").parent)
    assert main(["status", str(tiny_copy)]) == 0
    prior_line = capsys.readouterr().out.splitlines()[2]
    assert prior_line.startswith("prior: done (6 steps), STALE: stage 2 it was trained on is gone")


# ---------------------------------------------------------------------------- hostile files



@pytest.mark.parametrize("kind", ["torch", "pickle", "inside"])
@pytest.mark.trains
def test_checkpoint_that_runs_code_when_unpickled_is_refused(
    kind: str,
    tiny_copy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    marker = tmp_path / "pwned"
    path = checkpoint_path(tiny_copy, "prior")
    evil = Payload(marker)
    if kind == "torch":
        torch.save(evil, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:  # a real checkpoint with the payload hidden among its values
        ckpt = load_checkpoint(path)
        ckpt["metrics"] = {"psnr": evil}
        torch.save(ckpt, path)
    (path.parent / PREVIOUS_NAME).unlink()  # no fallback: the hostile file is the only one
    for args in (["status", str(tiny_copy)], ["sample", str(tiny_copy), "--out", str(tmp_path / "s.png")]):
        capsys.readouterr()
        assert main(args) == 2
        line = one_error_line(capsys)
        assert "not a loadable checkpoint" in line and "system" in line
    assert train(tiny_copy, "--stage", "prior") == 2
    assert "not a loadable checkpoint" in one_error_line(capsys)
    assert not marker.exists()
    assert path.exists()  # refused, not deleted


def test_pickle_that_torch_cannot_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    path.write_bytes(pickle.dumps(Payload(tmp_path / "pwned"), protocol=5))
    with pytest.raises(RunError, match="not a loadable checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------- determinism


@pytest.mark.trains
def test_two_fresh_processes_write_identical_checkpoints(tmp_path: Path) -> None:
    for name in ("a", "b"):
        subprocess.run(
            [
                *(sys.executable, str(ROOT / "run_stage.py"), "train", str(TINY)),
                *("--stage", "1", "--run-dir", str(tmp_path / name), "--no-progress"),
            ],
            env=crash_harness.ENV,
            check=True,
            capture_output=True,
        )
    a, b = (checkpoint_path(tmp_path / name, "1") for name in ("a", "b"))
    assert load_checkpoint(a)["digest"] == load_checkpoint(b)["digest"]
    assert a.read_bytes() == b.read_bytes()
