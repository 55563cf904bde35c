"""Two CPU processes (gloo, under torchrun) against one: identical ranks, the same losses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from progvq.checkpoint import checkpoint_path, load_checkpoint
from progvq.distributed import Context, local_slice

from .conftest import ROOT, TINY

STAGES = ("1", "2", "prior")
# a few steps of every stage, the loss logged at each; no prior dropout, whose masks
# depend on the per-rank batch shape and so differ from one process's by design
OVERRIDES = [f"stages.{s}.{k}={v}" for s in STAGES for k, v in (("steps", 4), ("log_every", 1), ("eval_every", 4), ("checkpoint_every", 2))]
OVERRIDES.append("stages.prior.dropout=0")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(run: Path, stage: str) -> list[float]:
    events = EventAccumulator(str(checkpoint_path(run, stage).parent))
    events.Reload()
    return [e.value for e in events.Scalars("loss/total")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    work = tmp_path_factory.mktemp("ddp")
    worker = str(ROOT / "tests" / "ddp_worker.py")
    out = {}
    for name, launcher in (("one", [sys.executable]), ("two", ["torchrun", "--standalone", "--nproc_per_node", "2"])):
        (work / name).mkdir()
        command = [*launcher, worker, str(TINY), str(work / name / "run"), str(work / name), *OVERRIDES]
        done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = work / name
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_both_ranks_hold_identical_weights(runs: dict[str, Path], stage: str) -> None:
    a = torch.load(runs["two"] / f"rank0-{stage}.pt", weights_only=True)
    b = torch.load(runs["two"] / f"rank1-{stage}.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:  # parameters and buffers: codebook, EMA statistics, restart buffer, counters
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stage", STAGES)
def test_loss_matches_one_process_on_the_same_global_batch(runs: dict[str, Path], stage: str) -> None:
    one, two = _losses(runs["one"] / "run", stage), _losses(runs["two"] / "run", stage)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_rank_0_alone_writes_and_the_weights_are_close_to_one_process(runs: dict[str, Path], stage: str) -> None:
    ckpt = load_checkpoint(checkpoint_path(runs["two"] / "run", stage))
    rank0 = torch.load(runs["two"] / f"rank0-{stage}.pt", weights_only=True)
    single = torch.load(runs["one"] / f"rank0-{stage}.pt", weights_only=True)
    for key, value in rank0.items():
        assert torch.equal(ckpt["model"][key], value), key
        if value.is_floating_point():
            torch.testing.assert_close(value, single[key], rtol=1e-3, atol=1e-4)
    assert not (runs["one"] / "rank1-1.pt").exists()


def test_global_batch_is_split_in_contiguous_slices() -> None:
    index = torch.arange(12)
    parts = [local_slice(index, Context(rank=r, world=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), index)
    assert torch.equal(local_slice(index, Context()), index)


def test_a_stage_resumes_with_another_number_of_processes(tmp_path: Path) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    run = tmp_path / "run"
    cli = [str(ROOT / "run_stage.py"), "train", str(TINY), "--stage", "1", "--run-dir", str(run), "--no-progress"]
    subprocess.run([sys.executable, *cli, "--until", "3"], env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert load_checkpoint(checkpoint_path(run, "1"))["step"] == 3
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", *cli], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 3 of 6" in done.stdout
    assert load_checkpoint(checkpoint_path(run, "1"))["step"] == 6
