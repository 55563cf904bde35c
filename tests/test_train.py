"""The training loop: its learning-rate schedule, batch order and precision (checkpoint files: test_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from progvq.checkpoint import load_checkpoint
from progvq.config import TrainConfig
from progvq.train import BatchOrder, lr_at


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
