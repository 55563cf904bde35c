"""Train every stage of a tiny run, alone or as one rank of a torchrun job, and keep each rank's weights.

tests/test_distributed.py runs this once as a single process and once under
``torchrun --nproc_per_node 2``; each rank writes ``OUT/rank{R}-{stage}.pt``
with the state of the model it trained (all parameters and buffers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

import stages
from progvq.config import load_config
from progvq.distributed import teardown

_fit = stages.fit


def main(config: str, run_dir: str, out: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    rank = int(os.environ.get("RANK", "0"))

    def fit_and_keep(stage: stages.Stage, *args: Any, **kwargs: Any) -> stages.FitResult:
        result = _fit(stage, *args, **kwargs)
        state = {k: v.detach().clone() for k, v in stage.model.state_dict().items()}
        torch.save(state, Path(out) / f"rank{rank}-{stage.name}.pt")
        return result

    stages.fit = fit_and_keep
    try:
        stages.train_all(cfg, Path(run_dir), progress=False, log=lambda message: None)
    finally:
        teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
