"""Stage kinds and the code that trains them in order.

``"1"`` is :class:`~stages.pixels.PixelStage`, ``"2"``.. ``"L"`` are
:class:`~stages.codes.CodeStage`, ``"prior"`` is :class:`~stages.prior.PriorStage`.
Each supplies model, batches and loss; :func:`progvq.train.fit` trains them all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from progvq.checkpoint import checkpoint_path, file_sha256, seed_everything
from progvq.config import Config
from progvq.data import load_dataset
from progvq.errors import RunError
from progvq.run import first_difference, read_run_config, stage_state, write_run_config
from progvq.train import FitResult, Stage, fit

from .codes import CodeStage
from .pixels import PixelStage
from .prior import PriorStage


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def build_stage(cfg: Config, name: str, run_dir: Path, device: torch.device) -> Stage:
    """The stage recipe for ``name``, with its model freshly initialised."""
    data = load_dataset(cfg.data, total_downsample=cfg.total_downsample())
    if name == "1":
        return PixelStage(cfg, data, device)
    if name == "prior":
        return PriorStage(cfg, run_dir, data, device)
    return CodeStage(cfg, int(name), run_dir, data, device)


def prepare_run(cfg: Config, run_dir: Path, *, force: bool = False) -> None:
    """Create ``run_dir`` with its config, or check the config matches the one it has.

    A run directory made with another config is refused unless ``force``: its
    checkpoints would otherwise be mixed with models of another shape or data.
    """
    saved = run_dir / "config.yaml"
    if saved.exists():
        old = read_run_config(run_dir)
        diff = first_difference(old.to_dict(), cfg.to_dict())
        if diff is not None and not force:
            key, was, now = diff
            raise RunError(
                f"{run_dir} was created with a different config ({key}: {was!r} there, {now!r} now); "
                "use another --run-dir, or --force to adopt the new config"
            )
        if diff is None:
            return
    write_run_config(run_dir, cfg)


def train_stage(
    cfg: Config,
    name: str,
    run_dir: Path,
    *,
    until: int | None = None,
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train stage ``name`` of a run to its end (or to step ``until``), resuming if it was started."""
    names = cfg.stage_names()
    if name not in names:
        raise RunError(f"--stage {name}: no such stage in this config (stages: {', '.join(names)})")
    index = names.index(name)
    parents: dict[str, str] = {}
    for lower in names[:index]:
        state = stage_state(run_dir, lower, cfg)
        if state.state != "done":
            raise RunError(f"stage {name} needs stage {lower}, which is {state.describe()}; train stage {lower} first (--stage {lower})")
        parents[lower] = file_sha256(checkpoint_path(run_dir, lower))
    stage_dir = checkpoint_path(run_dir, name).parent
    if restart and stage_dir.exists():
        keep = _free_name(stage_dir)
        stage_dir.rename(keep)
        log(f"stage {name}: previous training kept in {keep}")
    state = stage_state(run_dir, name, cfg)
    if state.state == "done":
        log(f"stage {name}: already done ({state.steps} steps); --restart trains it anew")
        return FitResult(state.step, True, {})
    device = resolve_device(cfg.device)
    # seed before the model is built, so initial weights are a function of (seed, stage)
    seed_everything(cfg.seed * 1000 + index)
    stage = build_stage(cfg, name, run_dir, device)
    extra = {"image_shape": list(stage.image_shape)}
    result = fit(stage, cfg, stage_dir, parents=parents, until=until, progress=progress, log=log, extra=extra)
    if not result.done:
        log(f"stage {name}: stopped at step {result.step} of {cfg.stages[name].steps}; run the same train command to continue")
    return result


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.name}.old-{n}")).exists():
        n += 1
    return candidate


def train_all(cfg: Config, run_dir: Path, *, progress: bool = True, log: Callable[[str], None] = print) -> None:
    """Train every stage that is not done yet, in order."""
    for name in cfg.stage_names():
        result = train_stage(cfg, name, run_dir, progress=progress, log=log)
        if not result.done:
            return


__all__ = ["build_stage", "prepare_run", "resolve_device", "train_all", "train_stage"]
