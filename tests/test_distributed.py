"""Two CPU processes (gloo, under torchrun): against one (identical ranks, the same losses), and
interrupted against uninterrupted (bit for bit on every rank); only rank 0 writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from progvq.checkpoint import checkpoint_path, load_checkpoint
from progvq.distributed import Context, local_slice

from .conftest import ROOT, TINY

STAGES = ("1", "2", "prior")
# a few steps of every stage, the loss logged at each
STEPS = [
    f"stages.{s}.{k}={v}"
    for s in STAGES
    for k, v in (("steps", 4), ("log_every", 1), ("eval_every", 4), ("checkpoint_every", 2))
]
# fp32: one process and two must compute alike; bf16 rounding would part them (precision auto takes bf16 on AMX CPUs)
STEPS += [f"stages.{s}.precision=fp32" for s in STAGES]
# against one process: no prior dropout, whose masks depend on the per-rank batch shape and so
# differ from one process's by design
OVERRIDES = [*STEPS, "stages.prior.pixelcnn.dropout=0"]
# interrupted against uninterrupted, two processes each: with dropout, each rank its own masks;
# every code counts as dead, so each restart (at steps 2 and 4) draws a new vector for every code
DROPOUT = [
    *STEPS,
    "stages.prior.pixelcnn.dropout=0.1",
    "stages.1.quantizer.restart_threshold=1000",
    "stages.2.quantizer.restart_threshold=1000",
]
SPLIT = 3  # the step the interrupted run stops at: between checkpoints, before a quantiser restart
TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _losses(run: Path, stage: str) -> list[float]:
    events = EventAccumulator(str(checkpoint_path(run, stage).parent))
    events.Reload()
    return [e.value for e in events.Scalars("loss/total")]


def _launch(launcher: list[str], out: Path, overrides: list[str], *flags: str) -> None:
    """Run tests/ddp_worker.py on the tiny config, its run in ``out/run``, its records in ``out``."""
    out.mkdir(exist_ok=True)
    sets = [arg for o in overrides for arg in ("--set", o)]
    command = [*launcher, str(ROOT / "tests" / "ddp_worker.py"), str(TINY), str(out / "run"), str(out), *sets, *flags]
    done = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four runs of every tiny stage (4 steps each), by name: the folder of each worker's records.

    - ``one``: a single process, no dropout;
    - ``two``: two processes, no dropout, each stage on the lower levels of ``one``;
    - ``whole``: two processes, prior dropout 0.1;
    - ``split``: ``whole`` stopped at step SPLIT of every stage and resumed, the prior's
      resume in a second torchrun job.
    """
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    work = tmp_path_factory.mktemp("ddp")
    _launch([sys.executable], work / "one", OVERRIDES)
    _launch(TORCHRUN, work / "two", OVERRIDES, "--reference", str(work / "one" / "run"))
    _launch(TORCHRUN, work / "whole", DROPOUT)
    _launch(TORCHRUN, work / "split", DROPOUT, "--split", str(SPLIT))
    _launch(TORCHRUN, work / "split", DROPOUT)
    return {name: work / name for name in ("one", "two", "whole", "split")}


def _weights(runs: dict[str, Path], name: str, rank: int, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(runs[name] / f"rank{rank}-{stage}.pt", weights_only=True)


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts, lists, tensors and plain values."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.trains
@pytest.mark.parametrize("name", ["two", "whole", "split"])
@pytest.mark.parametrize("stage", STAGES)
def test_both_ranks_hold_identical_weights(runs: dict[str, Path], name: str, stage: str) -> None:
    # parameters and buffers: codebook, EMA statistics, restart buffer, counters, the
    # quantiser's draw seed; with prior dropout too, though each rank drew its own masks
    _assert_equal(_weights(runs, name, 0, stage), _weights(runs, name, 1, stage))


@pytest.mark.trains
@pytest.mark.parametrize("stage", STAGES)
def test_loss_matches_one_process_on_the_same_global_batch(runs: dict[str, Path], stage: str) -> None:
    one, two = _losses(runs["one"] / "run", stage), _losses(runs["two"] / "run", stage)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


@pytest.mark.trains
@pytest.mark.parametrize("stage", STAGES)
def test_rank_0_checkpoints_the_weights_of_every_rank_close_to_one_process(runs: dict[str, Path], stage: str) -> None:
    ckpt = load_checkpoint(runs["two"] / f"checkpoint-{stage}.pt")  # the two-process one, kept before the swap
    rank0 = _weights(runs, "two", 0, stage)
    single = _weights(runs, "one", 0, stage)
    for key, value in rank0.items():
        assert torch.equal(ckpt["model"][key], value), key
        if value.is_floating_point():
            torch.testing.assert_close(value, single[key], rtol=1e-3, atol=1e-4)


def _files(run: Path) -> dict[str, int]:
    """Every file under ``run`` by its path there, TensorBoard event files counted per folder.

    Event files are named by host, process id and time, so only their number per folder
    can match between two runs.
    """
    found: dict[str, int] = {}
    for path in sorted(run.rglob("*")):
        if path.is_file():
            name = path.relative_to(run).as_posix()
            if path.name.startswith("events.out.tfevents."):
                name = f"{path.parent.relative_to(run).as_posix()}/<events>"
            found[name] = found.get(name, 0) + 1
    return found


@pytest.mark.trains
def test_only_rank_0_writes_to_the_run(runs: dict[str, Path]) -> None:
    for name in ("two", "whole", "split"):
        rank0 = (runs[name] / "writes-rank0.txt").read_text().splitlines()
        rank1 = (runs[name] / "writes-rank1.txt").read_text().splitlines()
        assert rank1 == [], f"{name}: rank 1 wrote {rank1[:5]}"
        # the watch sees what rank 0 writes: checkpoints (a temporary file renamed) and events
        for stage in STAGES:
            folder = checkpoint_path(runs[name] / "run", stage).parent
            renamed = f"{folder}/checkpoint.pt"
            assert any(line.startswith("os.rename") and line.endswith(renamed) for line in rank0), (name, stage)
            assert any(line.startswith(f"open {folder}/events.out.tfevents.") for line in rank0), (name, stage)
    # and what the watch cannot see (a write from C++) would show as a file one process does not write
    assert _files(runs["two"] / "run") == _files(runs["one"] / "run")
    assert _files(runs["whole"] / "run") == _files(runs["one"] / "run")


@pytest.mark.trains
@pytest.mark.parametrize("stage", STAGES)
def test_a_resumed_run_equals_the_uninterrupted_one_on_every_rank(runs: dict[str, Path], stage: str) -> None:
    for rank in (0, 1):
        _assert_equal(_weights(runs, "split", rank, stage), _weights(runs, "whole", rank, stage), f"rank {rank}")
    split = load_checkpoint(checkpoint_path(runs["split"] / "run", stage))
    whole = load_checkpoint(checkpoint_path(runs["whole"] / "run", stage))
    assert split["step"] == whole["step"] == 4
    assert len(whole["rng_ranks"]) == 2
    # every rank's generators, saved at the last step, are where they would be without the stop
    _assert_equal(split["rng_ranks"], whole["rng_ranks"], "rng_ranks")
    _assert_equal(split["rng"], whole["rng_ranks"][0], "rng")
    # and the split run did stop: each of its two sessions wrote its own event file
    stage_dir = checkpoint_path(runs["split"] / "run", stage).parent
    events = [p for p in stage_dir.iterdir() if p.name.startswith("events.out")]
    assert len(events) == 2


@pytest.mark.trains
def test_each_rank_draws_its_own_dropout_masks(runs: dict[str, Path]) -> None:
    drawn = [torch.load(runs["whole"] / f"dropout-rank{r}-prior.pt", weights_only=True) for r in (0, 1)]
    for d in drawn:
        rate = d["dropped"].sum() / d["live"].sum()
        assert 0.05 < rate < 0.15  # dropout 0.1 at work
    # one stream for both would drop the same units (where both inputs are live)
    both = drawn[0]["live"] & drawn[1]["live"]
    assert not torch.equal(drawn[0]["dropped"] & both, drawn[1]["dropped"] & both)
    states = load_checkpoint(checkpoint_path(runs["whole"] / "run", "prior"))["rng_ranks"]
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    assert states[0]["python"] != states[1]["python"]
    assert states[0]["numpy"]["keys"].ne(states[1]["numpy"]["keys"]).any()


def test_global_batch_is_split_in_contiguous_slices() -> None:
    index = torch.arange(12)
    parts = [local_slice(index, Context(rank=r, world=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), index)
    assert torch.equal(local_slice(index, Context()), index)


@pytest.mark.trains
def test_a_stage_resumes_with_another_number_of_processes(tmp_path: Path) -> None:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    run = tmp_path / "run"
    cli = [str(ROOT / "run_stage.py"), "train", str(TINY), "--stage", "1", "--run-dir", str(run), "--no-progress"]
    subprocess.run(
        [sys.executable, *cli, "--until", "3"], env=ENV, cwd=ROOT, check=True, capture_output=True, timeout=300
    )
    assert len(load_checkpoint(checkpoint_path(run, "1"))["rng_ranks"]) == 1
    done = subprocess.run(
        [*TORCHRUN, *cli], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 3 of 6" in done.stdout
    ckpt = load_checkpoint(checkpoint_path(run, "1"))
    assert ckpt["step"] == 6
    # rank 1, which the saved run did not have, drew its generators from rank 0's: its own streams
    assert len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])
