"""Stage kinds and the code that trains them in order.

``"1"`` is :class:`~stages.pixels.PixelStage`, ``"2"``.. ``"L"`` are
:class:`~stages.codes.CodeStage`, ``"prior"`` is :class:`~stages.prior.PriorStage`.
Each supplies model, batches and loss; :class:`progvq.train.Trainer` trains them all.
A :class:`Pipeline` serves them: the run folder (read once), the data (loaded once)
and every level's codes (encoded once, then handed to the stage above).

Every checkpoint records what its data was (:func:`progvq.data.data_record`, computed once per
process); a stage trains, resumes or is reused from another run only on the data its lower
stages and its own checkpoint were trained on.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from progvq.build import build_level, build_prior
from progvq.checkpoint import changed_parent, seed_everything
from progvq.config import Config, show
from progvq.data import SHAPES_DEFAULT_SIZE, ImageData, data_change, data_record, load_dataset, stage_record
from progvq.distributed import barrier, setup
from progvq.errors import ProgvqError, RunError
from progvq.fileio import atomic_write
from progvq.kinds import Level
from progvq.memory import check_generated_data_fits, check_model_fits
from progvq.metrics import batches
from progvq.nets import to_unit
from progvq.run import CONFIG_NAME, Run, StageState, first_difference
from progvq.train import FitResult, Stage, fit, report_damage

from .codes import CodeStage
from .pixels import PixelStage
from .prior import PriorStage, require_labels, uses_labels


class Pipeline:
    """What the stages of one training session share: the run, its data and the codes of each level.

    ``codes(k)`` are level k's codes of both splits, computed once from level k-1's
    through the frozen level k; a stage that trains makes its level's entries stale
    (:meth:`trained`).
    """

    def __init__(self, cfg: Config, run: Run, device: torch.device) -> None:
        self.cfg, self.run, self.device = cfg, run, device
        self._data: ImageData | None = None
        self._record: dict[str, Any] | None = None
        self._levels: dict[int, Level] = {}
        self._codes: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def data(self) -> ImageData:
        """The configured data set, loaded on first use."""
        if self._data is None:
            d = self.cfg.data
            check_generated_data_fits(d.source, d.count, d.channels, d.size or SHAPES_DEFAULT_SIZE)
            # an image folder is decoded once into a memory-mapped cache in the run folder; the data is
            # checked stage by stage (check_data), not against every stage at once: a restarted stage 1
            # may train on data that the stages above it were not trained on (they go stale)
            self._data = load_dataset(self.cfg.data, self.cfg.total_downsample(), cache_dir=self.run.path)
        return self._data

    @property
    def record(self) -> dict[str, Any]:
        """What the data is (:func:`progvq.data.data_record`), computed once, when first asked for."""
        if self._record is None:
            self._record = data_record(self.cfg.data, self.data)
        return self._record

    def level(self, k: int) -> Level:
        """Trained level ``k``, frozen, loaded once."""
        if k not in self._levels:
            self._levels[k] = self.run.level(k, self.device)
        return self._levels[k]

    @torch.no_grad()
    def codes(self, k: int, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """Level ``k``'s codes of the training and held-out splits, (N, h_k, w_k) int64 each."""
        if k not in self._codes:
            splits = (self.data.train, self.data.heldout) if k == 1 else self.codes(k - 1)
            train, heldout = (torch.cat([self._encode(k, b) for b in batches(split, batch_size)]) for split in splits)
            self._codes[k] = (train, heldout)
        return self._codes[k]

    @torch.no_grad()
    def shifted_codes(self, k: int, shifts: int, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """Level ``k``'s codes of the training images shifted by every (dy, dx) in [-shifts, shifts]^2
        but (0, 0), zeros shifted in: (S N, h_k, w_k) int64, and which training image each is (S N,)."""
        train = self.data.train
        codes, index = [], []
        for dy in range(-shifts, shifts + 1):
            for dx in range(-shifts, shifts + 1):
                if (dy, dx) == (0, 0):
                    continue
                for start, batch in zip(range(0, len(train), batch_size), batches(train, batch_size), strict=True):
                    z = shift_images(batch, dy, dx)
                    for level in range(1, k + 1):
                        z = self._encode(level, z)
                    codes.append(z)
                    index.append(torch.arange(start, start + len(batch)))
        return torch.cat(codes), torch.cat(index)

    def _encode(self, k: int, below: Tensor) -> Tensor:
        """A batch of level k-1 (uint8 images at the data's own size for k = 1) -> level k codes."""
        below = below.to(self.device)
        if k == 1:
            below = to_unit(self.data.canvas.pad(below))
        return self.level(k).encode(below)

    def trained(self, name: str) -> None:
        """Stage ``name`` wrote a new checkpoint: what was cached of it is stale."""
        self.run.forget(name)
        if name != "prior":
            for k in [k for k in self._levels if k >= int(name)]:
                self._levels.pop(k)
            for k in [k for k in self._codes if k >= int(name)]:
                self._codes.pop(k)


def shift_images(images: Tensor, dy: int, dx: int) -> Tensor:
    """Images (N, C, H, W) moved down by ``dy`` and right by ``dx`` pixels (negative: up, left), zeros shifted in."""
    _, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[:, :, top : top + h, left : left + w]


def build_stage(cfg: Config, name: str, pipeline: Pipeline) -> Stage:
    """The stage recipe for ``name``, with its model freshly initialised."""
    if name == "1":
        return PixelStage(cfg, pipeline.data, pipeline.device)
    if name == "prior":
        return PriorStage(cfg, pipeline)
    return CodeStage(cfg, int(name), pipeline)


def check_stage_fits(cfg: Config, name: str, device: torch.device) -> None:
    """Refuse stage ``name`` when its model's training state alone would not fit in memory (built on the
    meta device to count it, so nothing is allocated)."""
    if name == "prior":
        check_model_fits(lambda: build_prior(cfg, 0), "stages.prior", device)
        return
    k = int(name)
    codes_below = cfg.level(k - 1).codes if k > 1 else 0
    # the classes are not known before the data is read; a class-conditional decoder's table of biases per
    # class is a few numbers per class, nothing beside the rest of the model, so one class stands for them
    check_model_fits(
        lambda: build_level(cfg.level(k), cfg.data.channels, codes_below, 1), f"stages.{name}", device
    )


def check_run_config(cfg: Config, run: Run, *, force: bool = False) -> bool:
    """Whether ``run`` needs ``cfg`` written: it is new, or ``force`` adopts a changed config.

    A run directory made with another config is refused unless ``force``: its checkpoints
    would otherwise be mixed with models of another shape or data. Runtime settings (device,
    run folder, sampling defaults, precision, logging) are not part of the comparison.
    """
    if not run.exists():
        return True
    diff = first_difference(run.config.identity(), cfg.identity())
    if diff is None:
        return False
    if not force:
        key, was, now = diff
        raise RunError(
            f"{run.path} was created with a different config ({key}: {show(was)} there, {show(now)} now); "
            "use another --run-dir, or --force to adopt the new config"
        )
    return True


def _lower_parents(cfg: Config, run: Run, name: str) -> dict[str, str]:
    """The digests of the lower stages stage ``name`` trains on; each must be done and not stale."""
    names = cfg.stage_names()
    parents: dict[str, str] = {}
    for state in run.states(cfg, upto=names[names.index(name) - 1]) if names.index(name) else []:
        lower = state.name
        if state.state != "done":
            raise RunError(
                f"stage {name} needs stage {lower}, which is {state.describe()}; "
                f"train stage {lower} first (--stage {lower})"
            )
        if state.stale:
            raise RunError(
                f"stage {name} needs stage {lower}, which is stale ({state.stale}); "
                f"retrain it first (--stage {lower} --restart)"
            )
        parents[lower] = state.digest
    return parents


def check_data(cfg: Config, run: Run, name: str, pipeline: Pipeline, *, restart: bool = False) -> None:
    """Refuse to train stage ``name`` on data other than what its lower stages (and, unless ``restart``, its
    own checkpoint) were trained on: one line naming the stage to retrain and what differs in the data.

    What counts is what :func:`progvq.data.data_change` compares: the image shape always, and the
    content when the stage was read with the same ``data`` section as now (a file or folder replaced
    under the same path); a ``data`` section changed on purpose and adopted with ``--force`` trains on.
    The data is loaded (once, by ``pipeline``) only when one of those checkpoints records its data; one
    that records none (written before records were kept) is taken as it is.
    """
    names = cfg.stage_names()
    upto = names[: names.index(name) + (0 if restart else 1)]
    records = {stage: record for stage in upto if (record := run.data_record(stage)) is not None}
    for stage, record in records.items():
        change = data_change(record, pipeline.record)
        if change is None:
            continue
        state = run.state(stage, cfg).describe()
        how = "trained" if stage != name or state.startswith("done") else "started"
        label = "the prior" if stage == "prior" else f"stage {stage}"
        raise RunError(
            f"{run.path}: {label} ({state}) was {how} on other data ({change}); "
            f"train --stage {stage} --restart trains it anew on the data as it is now, or use another --run-dir"
        )


def train_stage(
    cfg: Config,
    name: str,
    run_dir: Path | Run,
    *,
    until: int | None = None,
    restart: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pipeline: Pipeline | None = None,
) -> FitResult:
    """Train stage ``name`` of a run to its end (or to step ``until``), resuming if it was started.

    The run directory and its config are written only once the stage's data and model
    are ready, so a bad data path leaves nothing behind.
    """
    names = cfg.stage_names()
    if name not in names:
        raise RunError(f"--stage {name}: no such stage in this config (stages: {', '.join(names)})")
    ctx = setup(cfg.device)  # one process, or one of several under torchrun
    if not ctx.main:
        progress, log = False, _quiet
    run = pipeline.run if pipeline is not None else run_dir if isinstance(run_dir, Run) else Run(run_dir)
    pipeline = pipeline or Pipeline(cfg, run, ctx.device)
    new_config = check_run_config(cfg, run, force=force)
    # every lower stage must be done and consistent: this stage is trained on their codes
    parents = _lower_parents(cfg, run, name)
    found = None  # --restart: the old training is not resumed, and is moved aside only when the new one starts
    if not restart:
        found = run.found(name, on_damaged=report_damage(name, log) if ctx.main else None)
    # before anything is built or written: the lower stages' data, and this stage's own unless restarted
    check_data(cfg, run, name, pipeline, restart=restart)
    if not restart:
        state = _checked_state(cfg, run, name, parents)
        if state.state == "done":
            log(f"stage {name}: already done ({state.steps} steps); train --stage {name} --restart trains it anew")
            return FitResult(state.step, True, {})
    check_stage_fits(cfg, name, ctx.device)
    # seed before the model is built, so initial weights are a function of (seed, stage)
    seed_everything(cfg.seed * 1000 + names.index(name))
    stage = build_stage(cfg, name, pipeline)

    kept: list[Path] = []
    config_file = run.path / CONFIG_NAME
    old_config = config_file.read_bytes() if new_config and config_file.is_file() else None

    def ready() -> None:
        # only now, with the data loaded and the model built: a bad config, missing data or a
        # checkpoint that does not fit must leave the run as it was (its config, a finished stage)
        if restart:
            if ctx.main:
                kept.extend(_keep_aside(run, name, log))
            barrier(ctx)  # every rank sees the stage directory as rank 0 left it
        if new_config and ctx.main:
            run.write_config(cfg, stage.canvas)

    # the shapes the models take and the data's own, and what the data is (its labels for a stage trained on them)
    record = stage_record(pipeline.record, uses_labels(cfg, name))
    extra = {**stage.canvas.to_list(), **getattr(stage, "extra", {}), "data": record}
    try:
        result = fit(
            stage,
            cfg,
            run.stage_dir(name),
            parents=parents,
            until=until,
            progress=progress,
            log=log,
            extra=extra,
            ctx=ctx,
            on_ready=ready,
            found=found,
        )
    except (ProgvqError, OSError, KeyboardInterrupt):  # a refusal, a full disk, a second Ctrl-C
        if kept and ctx.main and _put_back(run, name, kept[0], log) and old_config is not None:
            atomic_write(config_file, old_config)  # the run's config as it was, with the training put back
        raise
    finally:
        pipeline.trained(name)
    barrier(ctx)  # the next stage on any rank reads the checkpoint rank 0 has just written
    if not result.done:
        log(
            f"stage {name}: stopped at step {result.step} of {cfg.stages[name].steps}; "
            "run the same train command to continue"
        )
    return result


def _keep_aside(run: Run, name: str, log: Callable[[str], None]) -> list[Path]:
    """``--restart``: move stage ``name``'s folder to ``NAME.old-M`` (kept, never loaded again); [] if none."""
    stage_dir = run.stage_dir(name)
    if not stage_dir.exists():
        return []
    keep = _free_name(stage_dir)
    stage_dir.rename(keep)
    run.forget(name)
    log(f"stage {name}: previous training kept in {keep}")
    return [keep]


def _put_back(run: Run, name: str, kept: Path, log: Callable[[str], None]) -> bool:
    """A restart that failed before its first checkpoint gives the stage its previous training back.

    What the failed attempt wrote (TensorBoard events alone) is removed. A restart that got as
    far as a checkpoint keeps it, and the old training stays in ``kept``. Returns whether it
    was put back.
    """
    stage_dir = run.stage_dir(name)
    written = list(stage_dir.iterdir()) if stage_dir.is_dir() else []
    if any(not p.is_file() or not p.name.startswith("events.out.tfevents.") for p in written):
        return False
    for events in written:
        events.unlink()
    if stage_dir.exists():
        stage_dir.rmdir()
    kept.rename(stage_dir)
    run.forget(name)
    log(f"stage {name}: the restart failed before its first checkpoint; its previous training is back in place")
    return True


def _checked_state(cfg: Config, run: Run, name: str, parents: dict[str, str]) -> StageState:
    """Stage ``name``'s state, refused when it was started on other versions of the lower stages."""
    state = run.state(name, cfg)
    changed = changed_parent(state.parents, parents) if state.state != "missing" else None
    if changed is not None:
        raise RunError(
            f"{run.path}: stage {name} ({state.describe()}) was trained on an earlier version of stage {changed}; "
            f"train --stage {name} --restart trains it anew on the current one"
        )
    return state


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.name}.old-{n}")).exists():
        n += 1
    return candidate


def _stage_identity(cfg: Config, name: str) -> dict:
    """What stage ``name``'s model depends on: the data, the seed and the stages up to it (runtime settings aside)."""
    full = cfg.identity()
    names = cfg.stage_names()
    upto = names[: names.index(name) + 1]
    return {"data": full["data"], "seed": full["seed"], "stages": {n: full["stages"][n] for n in upto}}


def adopt(
    cfg: Config,
    run: Run,
    other: Run,
    *,
    log: Callable[[str], None] = print,
    data: dict[str, Any] | None = None,
) -> list[str]:
    """Copy ``other``'s finished stages whose config equals ``cfg``'s into ``run`` (in order, from stage 1).

    A stage is adopted when it is done and not stale there, missing here, and trained on the
    same data, seed and stages up to it; its checkpoint comes as it is, so its digest and
    parents (its provenance) are kept. ``data`` is the record of the data as it is now
    (:func:`progvq.data.data_record`): a stage that records another data set (other images under
    the same path) is not adopted; one that records none is. Returns the names adopted; refuses
    (one line naming the first differing key, or the data and what differs) when not even stage 1 can be.
    """
    if other.path.resolve() == run.path.resolve():
        raise RunError(f"--from {other.path}: that is this run's own folder")
    states = {state.name: state for state in other.states()}
    adopted = []
    for name in cfg.stage_names():
        state = states.get(name)
        if state is None or state.state != "done" or state.stale:
            why = "missing" if state is None else state.describe()
            if not adopted:
                raise RunError(f"--from {other.path}: its stage {name} cannot be reused ({why})")
            break
        diff = first_difference(_stage_identity(other.stage_config(name), name), _stage_identity(cfg, name))
        if diff is not None:
            key, was, now = diff
            message = f"stage {name} differs ({key}: {_brief(was)} there, {_brief(now)} here)"
            if not adopted:
                raise RunError(f"--from {other.path}: {message}; nothing to reuse")
            log(f"--from {other.path}: {message}: it trains here")
            break
        # the same config may name other data: the file or folder at data.path was replaced since
        change = data_change(state.data, data) if data is not None else None
        if change is not None:
            message = f"its stage {name} was trained on other data ({change})"
            if not adopted:
                raise RunError(f"--from {other.path}: {message}; nothing to reuse")
            log(f"--from {other.path}: {message}: it trains here")
            break
        if run.found(name) is None:
            _copy_stage(other, run, name)
            run.forget(name)
            adopted.append(name)
            log(f"stage {name}: reused from {other.path} ({state.describe()})")
    if adopted and not run.exists():
        run.write_config(cfg, other.canvas(adopted[-1]))
    return adopted


def _brief(value: object) -> str:
    """A config value for a one-line message; a whole section (a level only one run has) is not spelt out."""
    if value == "<absent>":
        return "absent"
    return "a section" if isinstance(value, dict) else show(value)


def _copy_stage(other: Run, run: Run, name: str) -> None:
    """Copy stage ``name``'s folder (checkpoints, TensorBoard events) atomically: a temporary folder, then a rename."""
    dest = run.stage_dir(name)
    if dest.exists():
        raise RunError(f"{dest}: exists; move it away or use --restart")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for item in other.stage_dir(name).iterdir():
            if item.is_file() and ".damaged-" not in item.name and not item.name.startswith("."):
                shutil.copy2(item, work / item.name)
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _preflight(cfg: Config, pipeline: Pipeline) -> None:
    """What ``train --all`` can refuse before its first step rather than after hours of the stages below:
    a model too large for memory, data that cannot be read, a class-conditional prior or decoder on data
    without labels."""
    for name in cfg.stage_names():
        check_stage_fits(cfg, name, pipeline.device)
    require_labels(cfg, pipeline.data)  # loads the data (once, for every stage): a missing file is refused now


def train_all(
    cfg: Config,
    run_dir: Path | Run,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    reuse: Path | None = None,
) -> None:
    """Train every stage that is not done yet, in order, on data loaded once (after adopting ``reuse``'s stages)."""
    ctx = setup(cfg.device)
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    pipeline = Pipeline(cfg, run, ctx.device)
    if reuse is not None and ctx.main:
        check_run_config(cfg, run, force=force)
        # the data is loaded before anything is copied: a stage of other data must not be adopted
        adopt(cfg, run, Run(reuse), log=log, data=pipeline.record)
    barrier(ctx)
    _preflight(cfg, pipeline)
    for name in cfg.stage_names():
        result = train_stage(cfg, name, run, force=force, progress=progress, log=log, pipeline=pipeline)
        if not result.done:
            return


__all__ = ["Pipeline", "adopt", "build_stage", "check_run_config", "train_all", "train_stage"]
