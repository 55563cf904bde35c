"""Train every stage of a tiny run, alone or as one rank of a torchrun job, and keep what each rank did.

tests/test_distributed.py runs this as a single process and under
``torchrun --nproc_per_node 2``::

    ddp_worker.py CONFIG RUN_DIR OUT [--set KEY=VALUE ...] [--split N] [--reference DIR]

Each rank ``R`` writes to ``OUT``:

- ``rank{R}-{stage}.pt``: the state of the model it trained (all parameters and buffers);
- ``dropout-rank{R}-{stage}.pt``: for a model with dropout, which units its first dropout
  layer dropped in its first training step (``dropped``, bool, the layer's output shape)
  and which had a non-zero input (``live``);
- ``writes-rank{R}.txt``: every file operation it made under ``RUN_DIR`` that writes
  (an open for writing, a rename, a removal, a new folder), one a line, as Python's
  audit hooks saw them; appended to, so two launches on one run add up.

``--split N``: each stage trains to step N and stops; the stage is then trained again from
its checkpoint to the end, as a resume does (train_stage reseeds every generator and builds
model and optimiser anew, so only the checkpoint carries state across). The last stage is
left at step N, for a later launch without ``--split`` to resume in new processes.

``--reference DIR``: once a stage is done, rank 0 keeps its checkpoint as
``OUT/checkpoint-{stage}.pt`` and puts the one of the run in ``DIR`` in its place, so the
next stage trains on the same lower levels as that run. Two runs' stages then differ only
by their own training: a code that a rounding difference flipped below cannot move them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import stages
from progvq.checkpoint import checkpoint_path
from progvq.config import load_config
from progvq.distributed import teardown

_fit = stages.fit
# open flags that make an open a write
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link", "os.symlink", "shutil.rmtree"}


def _watch_writes(root: Path, record: list[str]) -> None:
    """Append to ``record`` every file operation under ``root`` that writes, from now on.

    Audit hooks see every open and rename made through Python (torch.save into a
    file object, TensorBoard's event files, mkstemp); ``root`` need not exist yet.
    """
    prefix = os.path.join(os.path.realpath(root), "")

    def under(path: Any) -> bool:
        if isinstance(path, int):  # a file descriptor: its open was seen already
            return False
        try:
            return os.path.join(os.path.realpath(os.fsdecode(path)), "").startswith(prefix)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, _, flags = args
            if isinstance(flags, int) and flags & _WRITING and under(path):
                record.append(f"open {os.fsdecode(path)}")
        elif event in _CHANGES and args and (under(args[0]) or (event == "os.rename" and under(args[1]))):
            record.append(f"{event} {' '.join(os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes)))}")

    sys.addaudithook(hook)


def _record_dropout(model: nn.Module, path: Path) -> Any:
    """Save which units the first dropout layer of ``model`` drops in its first training call."""
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if not layers:
        return None

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training and not path.exists():
            # a unit is dropped where the layer zeroed a non-zero input (a masked convolution
            # leaves some inputs zero, e.g. where the vertical stack sees nothing above)
            live = inputs[0] != 0
            torch.save({"dropped": live & (output == 0), "live": live}, path)

    return layers[0].register_forward_hook(hook)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--split", type=int)
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []
    _watch_writes(args.run_dir, writes)

    def fit_and_keep(stage: stages.Stage, *a: Any, **kw: Any) -> stages.FitResult:
        handle = _record_dropout(stage.model, args.out / f"dropout-rank{rank}-{stage.name}.pt")
        try:
            result = _fit(stage, *a, **kw)
        finally:
            if handle is not None:
                handle.remove()
        state = {k: v.detach().clone() for k, v in stage.model.state_dict().items()}
        torch.save(state, args.out / f"rank{rank}-{stage.name}.pt")
        if args.reference is not None and result.done and rank == 0:
            # before train_stage's barrier: the other ranks read the next stage's inputs after it
            here = checkpoint_path(args.run_dir, stage.name)
            shutil.copyfile(here, args.out / f"checkpoint-{stage.name}.pt")
            shutil.copyfile(checkpoint_path(args.reference, stage.name), here)
        return result

    stages.fit = fit_and_keep
    quiet = {"progress": False, "log": lambda message: None}
    names = cfg.stage_names()
    try:
        for name in names:
            if args.split is not None:
                stages.train_stage(cfg, name, args.run_dir, until=args.split, **quiet)
                if name == names[-1]:
                    break
            if not stages.train_stage(cfg, name, args.run_dir, **quiet).done:
                break
    finally:
        teardown()
        with open(args.out / f"writes-rank{rank}.txt", "a") as f:
            f.writelines(f"{line}\n" for line in writes)


if __name__ == "__main__":
    main(sys.argv[1:])
