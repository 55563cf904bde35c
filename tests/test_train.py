"""The training loop's pure parts and checkpoint files."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from progvq.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rank_rng_state,
    set_rng_state,
)
from progvq.config import TrainConfig
from progvq.distributed import Context, gather_to_main
from progvq.errors import RunError
from progvq.train import BatchOrder, lr_at

from .helpers import Payload


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


def test_batch_order_is_a_permutation_per_epoch_and_a_function_of_step() -> None:
    order = BatchOrder(n=10, batch_size=3, seed=7)
    assert order.per_epoch == 3  # the last partial batch is dropped
    epoch0 = torch.cat([order(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9
    assert not torch.equal(torch.cat([order(s) for s in range(3, 6)]), epoch0)
    fresh = BatchOrder(n=10, batch_size=3, seed=7)
    assert torch.equal(fresh(4), order(4))  # no hidden state: a resumed run finds its batch
    assert not torch.equal(BatchOrder(10, 3, seed=8)(0), order(0))


def test_rng_state_round_trip() -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def _same(a: tuple[float, float, torch.Tensor], b: tuple[float, float, torch.Tensor]) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_a_new_stage_gives_each_rank_its_own_generators() -> None:
    seed_everything(3)
    base = rng_state()
    set_rank_rng_state(None, 0)
    rank0 = _draws()  # rank 0 keeps the states it had: one process runs as before
    set_rng_state(base)
    assert _same(rank0, _draws())
    firsts = []
    for rank in (1, 2):
        set_rng_state(base)
        set_rank_rng_state(None, rank)
        firsts.append(_draws())
        set_rng_state(base)
        set_rank_rng_state(None, rank)
        assert _same(firsts[-1], _draws())  # a fixed function of the states and the rank
    for a, b in ((rank0, firsts[0]), (rank0, firsts[1]), (firsts[0], firsts[1])):
        assert a[0] != b[0] and a[1] != b[1] and not torch.equal(a[2], b[2])


def test_a_resume_restores_each_ranks_own_generators() -> None:
    saved = []
    for seed in (10, 11):
        seed_everything(seed)
        saved.append(rng_state())
    expected = []
    for state in saved:
        set_rng_state(state)
        expected.append(_draws())
    ckpt = {"rng": saved[0], "rng_ranks": saved}
    for rank in (0, 1):
        seed_everything(99)
        set_rank_rng_state(ckpt, rank)
        assert _same(_draws(), expected[rank])
    # a rank the saved job did not have derives its own from rank 0's, as a new stage does
    set_rank_rng_state(ckpt, 2)
    third = _draws()
    set_rng_state(saved[0])
    set_rank_rng_state(None, 2)
    assert _same(third, _draws())
    # a checkpoint from before rng_ranks: its rng is rank 0's
    old = {"rng": saved[1]}
    set_rank_rng_state(old, 0)
    assert _same(_draws(), expected[1])
    set_rank_rng_state(old, 1)
    assert not _same(_draws(), expected[1])


def test_every_ranks_generators_load_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    ranks = gather_to_main(rng_state(), Context())
    assert ranks is not None and len(ranks) == 1
    seed_everything(1)
    ranks.append(rng_state())
    save_checkpoint({"stage": "1", "step": 1, "rng": ranks[0], "rng_ranks": ranks}, path)
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["rng_ranks"]) == 2 and torch.equal(ckpt["rng"]["torch"], ckpt["rng_ranks"][0]["torch"])
    assert load_checkpoint(path)["rng_ranks"][1]["python"] == ranks[1]["python"]  # and its digest holds


def test_checkpoint_round_trip_is_weights_only_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "stage-1" / "checkpoint.pt"
    save_checkpoint({"stage": "1", "step": 3, "rng": rng_state(), "model": {"w": torch.ones(2)}}, path)
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual permissions, not mkstemp's 0600
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert load_checkpoint(path)["format"] == "progvq-checkpoint"



@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the file is plain pickle, on purpose
def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "progvq-checkpoint", "x": payload}, f)
    with pytest.raises(RunError, match="not a loadable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint({"stage": "1", "step": 1}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RunError, match="not a loadable checkpoint"):
        load_checkpoint(cut)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(RunError, match="not a progvq checkpoint"):
        load_checkpoint(other)
    with pytest.raises(RunError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


@pytest.mark.parametrize("stage_name", ["1", "2", "prior"])
@pytest.mark.trains
def test_bf16_autocast_runs_the_nets_in_bf16_and_keeps_state_fp32(
    stage_name: str,
    tiny_run: Path,
    tmp_path: Path,
) -> None:
    from progvq.config import load_config
    from progvq.run import Run
    from progvq.train import fit
    from stages import Pipeline, build_stage

    from .conftest import TINY

    cfg = load_config(TINY, [f"stages.{stage_name}.precision=bf16", f"stages.{stage_name}.steps=3"])
    torch.manual_seed(0)
    stage = build_stage(cfg, stage_name, Pipeline(cfg, Run(tiny_run), torch.device("cpu")))
    seen: set[torch.dtype] = set()
    convs = [m for m in stage.model.modules() if isinstance(m, torch.nn.Conv2d)]
    # training forwards only (with gradients); held-out evaluation runs in fp32 under no_grad
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype) if torch.is_grad_enabled() else None)
        for m in convs
    ]
    result = fit(stage, cfg, tmp_path / "s", progress=False, log=lambda m: None)
    for h in hooks:
        h.remove()
    assert seen == {torch.bfloat16}  # every convolution ran in bf16
    assert result.step == 3
    ckpt = load_checkpoint(tmp_path / "s" / "checkpoint.pt")
    floats = {k: v.dtype for k, v in ckpt["model"].items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.float32}, floats  # weights, codebook and its statistics
    assert all(np.isfinite(v) for v in ckpt["metrics"].values())
