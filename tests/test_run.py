"""The run folder: one read per checkpoint and one data load per process, old folders, stage reuse (--from)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import progvq.checkpoint
import progvq.data
from progvq.checkpoint import load_checkpoint
from progvq.config import load_config
from progvq.hierarchy import Hierarchy
from progvq.run import Run
from run_stage import main

from .conftest import ROOT, TINY

OLD_RUN = ROOT / "tests" / "data" / "run-0.1"


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Counter]:
    """Counts of checkpoint reads (by file) and of data-set generations, in this process."""
    counts: dict[str, Counter] = {"reads": Counter(), "data": Counter()}
    real_load, real_shapes = progvq.checkpoint.load_checkpoint, progvq.data.make_labelled_shapes

    def load(path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        counts["reads"][str(Path(path))] += 1
        return real_load(path, *args, **kwargs)

    def shapes(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        counts["data"]["shapes"] += 1
        return real_shapes(*args, **kwargs)

    monkeypatch.setattr(progvq.checkpoint, "load_checkpoint", load)
    monkeypatch.setattr(progvq.data, "make_labelled_shapes", shapes)
    return counts


@pytest.mark.trains
def test_train_all_reads_each_checkpoint_once_and_the_data_once(tmp_path: Path, counted: dict[str, Counter]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--all", "--run-dir", str(run), "--no-progress"]) == 0
    assert counted["data"]["shapes"] == 1  # one data load for the three stages
    reads = counted["reads"]
    # stage 1 is read once (by stage 2, after it was written), stage 2 once (by the prior); the prior never
    assert reads == Counter({str(run / "stage-1" / "checkpoint.pt"): 1, str(run / "stage-2" / "checkpoint.pt"): 1})
    counted["reads"].clear()
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert sorted(reads.values()) == [1, 1, 1] and len(reads) == 3  # every checkpoint once: staleness, weights, shapes


def test_the_run_reads_a_checkpoint_once_until_told_it_changed(tiny_run: Path, counted: dict[str, Counter]) -> None:
    run = Run(tiny_run)
    for _ in range(3):
        run.states()
        run.level(1)
        run.prior()
    assert set(counted["reads"].values()) == {1} and len(counted["reads"]) == 3
    run.forget("1")
    run.level(1)
    assert counted["reads"][str(tiny_run / "stage-1" / "checkpoint.pt")] == 2


# --------------------------------------------------------------------------- a folder of progvq 0.1


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A copy of a finished tiny run written by progvq 0.1 (the old config layout, no recorded shapes)."""
    dest = tmp_path / "old"
    shutil.copytree(OLD_RUN, dest)
    return dest


def test_an_old_run_folder_loads_samples_and_evaluates(
    old_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = yaml.safe_load((old_run / "config.yaml").read_text())
    assert "code_dim" in raw["stages"]["1"] and "channels" in raw["stages"]["prior"]  # truly the old layout
    assert main(["status", str(old_run)]) == 0
    assert capsys.readouterr().out.count("done (6 steps)") == 3
    model = Hierarchy.load(old_run)
    assert model.image_shape == (1, 16, 16) and model.num_levels == 2 and model.levels[0].quantizer.num_codes == 16
    assert main(["sample", str(old_run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 16, 16)
    assert main(["eval", str(old_run), "--json"]) == 0
    assert "bits_per_dim" in capsys.readouterr().out


@pytest.mark.trains
def test_an_old_run_folder_resumes_and_retrains_with_todays_config(
    old_run: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["train", str(TINY), "--run-dir", str(old_run), "--no-progress"]
    # the same config in today's layout is the same run: nothing to train, nothing refused
    assert main([*base, "--all"]) == 0
    assert capsys.readouterr().out.count("already done") == 3
    before = load_checkpoint(old_run / "stage-2" / "checkpoint.pt")
    # more steps for stage 2 (--force adopts the new config): it resumes from the old checkpoint
    assert main([*base, "--stage", "2", "--set", "stages.2.steps=8", "--force"]) == 0
    after = load_checkpoint(old_run / "stage-2" / "checkpoint.pt")
    assert "resuming at step 6 of 8" in capsys.readouterr().out
    assert after["step"] == 8 and after["parents"] == before["parents"]
    assert after["config"]["stages"]["2"]["quantizer"]["kind"] == "vq"  # written in today's layout


# --------------------------------------------------------------------------- --from


@pytest.mark.trains
def test_from_reuses_equal_stages_and_keeps_their_provenance(
    tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "new"
    # the same stage 1, another stage 2: stage 1 is reused, stage 2 and the prior train here
    args = ["train", str(TINY), "--all", "--run-dir", str(run), "--no-progress", "--from", str(tiny_run)]
    args += ["--set", "stages.2.hidden=8"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"stage 1: reused from {tiny_run}" in out
    assert "stage 2 differs (stages.2.hidden: 16 there, 8 here): it trains here" in out
    ours, theirs = (load_checkpoint(r / "stage-1" / "checkpoint.pt") for r in (run, tiny_run))
    assert ours["digest"] == theirs["digest"]  # the very checkpoint: weights, provenance and all
    assert load_checkpoint(run / "stage-2" / "checkpoint.pt")["parents"] == {"1": theirs["digest"]}
    assert [s.state for s in Run(run).states()] == ["done"] * 3 and not any(s.stale for s in Run(run).states())
    assert load_config(run / "config.yaml").level(2).hidden == 8
    # runtime settings do not count: another device and precision still reuse every stage
    again = tmp_path / "again"
    args = ["train", str(TINY), "--all", "--run-dir", str(again), "--no-progress", "--from", str(tiny_run)]
    assert main([*args, "--set", "device=auto", "--set", "stages.1.precision=fp32"]) == 0
    assert capsys.readouterr().out.count("reused from") == 3


def test_from_refuses_when_not_even_stage_1_fits(
    tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "new"
    args = ["train", str(TINY), "--all", "--run-dir", str(run), "--no-progress", "--from", str(tiny_run)]
    args += ["--set", "stages.1.quantizer.codes=32"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "stage 1 differs (stages.1.quantizer.codes: 16 there, 32 here); nothing to reuse" in err
    assert not run.exists()
    assert main(["train", str(TINY), "--stage", "1", "--run-dir", str(run), "--from", str(tiny_run)]) == 2
    assert "--from goes with --all" in capsys.readouterr().err


def test_runtime_settings_are_not_the_runs_identity(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", str(TINY), "--all", "--run-dir", str(tiny_copy), "--no-progress"]
    for setting in ("device=auto", "stages.1.precision=bf16", "stages.2.log_every=1", "sample.code_temperature=0.5"):
        assert main([*base, "--set", setting]) == 0, setting
    assert main([*base, "--set", "stages.2.lr=0.5"]) == 2  # a setting of what the run is
    assert "stages.2.lr: 0.003 there, 0.5 now" in capsys.readouterr().err


def test_a_prior_checkpoint_records_its_class_count(tiny_run: Path) -> None:
    ckpt = load_checkpoint(tiny_run / "prior" / "checkpoint.pt")
    assert ckpt["extra"]["num_classes"] == 0 and "scheduler" not in ckpt and "data" not in ckpt
    assert isinstance(Run(tiny_run).prior(), torch.nn.Module)


def test_a_level_only_one_run_has_is_named_not_spelt_out() -> None:
    from stages import _brief

    assert _brief("<absent>") == "absent" and _brief({"steps": 2000, "hidden": 128}) == "a section"
    assert _brief(16) == "16" and _brief("vq") == "'vq'"
