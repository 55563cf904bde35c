"""Stage kinds and the code that trains them in order.

``"1"`` is :class:`~stages.pixels.PixelStage`, ``"2"``.. ``"L"`` are
:class:`~stages.codes.CodeStage`, ``"prior"`` is :class:`~stages.prior.PriorStage`.
Each supplies model, batches and loss; :func:`progvq.train.fit` trains them all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from progvq.checkpoint import checkpoint_path, seed_everything
from progvq.config import Config
from progvq.data import load_dataset
from progvq.distributed import barrier, setup
from progvq.errors import RunError
from progvq.run import CONFIG_NAME, first_difference, mark_stale, read_run_config, stage_state, write_run_config
from progvq.train import FitResult, Stage, fit

from .codes import CodeStage
from .pixels import PixelStage
from .prior import PriorStage


def build_stage(cfg: Config, name: str, run_dir: Path, device: torch.device) -> Stage:
    """The stage recipe for ``name``, with its model freshly initialised."""
    data = load_dataset(cfg.data, total_downsample=cfg.total_downsample())
    if name == "1":
        return PixelStage(cfg, data, device)
    if name == "prior":
        return PriorStage(cfg, run_dir, data, device)
    return CodeStage(cfg, int(name), run_dir, data, device)


def check_run_config(cfg: Config, run_dir: Path, *, force: bool = False) -> bool:
    """Whether ``run_dir`` needs ``cfg`` written: it is new, or ``force`` adopts a changed config.

    A run directory made with another config is refused unless ``force``: its
    checkpoints would otherwise be mixed with models of another shape or data.
    Reads only; nothing is written here.
    """
    if not (run_dir / CONFIG_NAME).exists():
        return True
    old = read_run_config(run_dir)
    diff = first_difference(old.to_dict(), cfg.to_dict())
    if diff is None:
        return False
    if not force:
        key, was, now = diff
        raise RunError(
            f"{run_dir} was created with a different config ({key}: {was!r} there, {now!r} now); "
            "use another --run-dir, or --force to adopt the new config"
        )
    return True


def train_stage(
    cfg: Config,
    name: str,
    run_dir: Path,
    *,
    until: int | None = None,
    restart: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train stage ``name`` of a run to its end (or to step ``until``), resuming if it was started.

    The run directory and its config are written only once the stage's data
    and model are ready, so a bad data path leaves nothing behind.
    """
    names = cfg.stage_names()
    if name not in names:
        raise RunError(f"--stage {name}: no such stage in this config (stages: {', '.join(names)})")
    index = names.index(name)
    ctx = setup(cfg.device)  # one process, or one of several under torchrun
    if not ctx.main:
        progress, log = False, _quiet
    new_config = check_run_config(cfg, run_dir, force=force)
    # every lower stage must be done and consistent: this stage is trained on their codes
    lowers = mark_stale([stage_state(run_dir, lower, cfg) for lower in names[:index]])
    parents: dict[str, str] = {}
    for state in lowers:
        lower = state.name
        if state.state != "done":
            raise RunError(f"stage {name} needs stage {lower}, which is {state.describe()}; train stage {lower} first (--stage {lower})")
        if state.stale:
            raise RunError(f"stage {name} needs stage {lower}, which is stale ({state.stale}); retrain it first (--stage {lower} --restart)")
        parents[lower] = state.digest
    stage_dir = checkpoint_path(run_dir, name).parent
    if restart and stage_dir.exists() and ctx.main:
        keep = _free_name(stage_dir)
        stage_dir.rename(keep)
        log(f"stage {name}: previous training kept in {keep}")
    barrier(ctx)  # every rank sees the stage directory as rank 0 left it
    state = stage_state(run_dir, name, cfg)
    if state.state != "missing" and state.parents != parents:
        changed = next(k for k in names[:index] if state.parents.get(k) != parents.get(k))
        raise RunError(
            f"{run_dir}: stage {name} ({state.describe()}) was trained on an earlier version of stage {changed}; "
            f"train --stage {name} --restart trains it anew on the current one"
        )
    if state.state == "done":
        log(f"stage {name}: already done ({state.steps} steps); train --stage {name} --restart trains it anew")
        return FitResult(state.step, True, {})
    device = ctx.device
    # seed before the model is built, so initial weights are a function of (seed, stage)
    seed_everything(cfg.seed * 1000 + index)
    stage = build_stage(cfg, name, run_dir, device)

    def record_config() -> None:
        # only now: a checkpoint that does not fit the new config must leave the old one in place
        if new_config and ctx.main:
            write_run_config(run_dir, cfg, stage.canvas)

    extra = stage.canvas.to_list()  # the padded shape the models take, and the data's own
    result = fit(stage, cfg, stage_dir, parents=parents, until=until, progress=progress, log=log, extra=extra, ctx=ctx, on_ready=record_config)
    barrier(ctx)  # the next stage on any rank reads the checkpoint rank 0 has just written
    if not result.done:
        log(f"stage {name}: stopped at step {result.step} of {cfg.stages[name].steps}; run the same train command to continue")
    return result


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.name}.old-{n}")).exists():
        n += 1
    return candidate


def train_all(cfg: Config, run_dir: Path, *, force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> None:
    """Train every stage that is not done yet, in order."""
    for name in cfg.stage_names():
        result = train_stage(cfg, name, run_dir, force=force, progress=progress, log=log)
        if not result.done:
            return


__all__ = ["build_stage", "check_run_config", "train_all", "train_stage"]
