"""A run directory: its config and the state of each stage.

Layout::

    RUN_DIR/config.yaml           the resolved config the run was created with, and (under
                                  ``recorded``) the data's own image shape and the padded one
    RUN_DIR/stage-1/checkpoint.pt level 1 (and its TensorBoard events)
    RUN_DIR/stage-2/checkpoint.pt ...
    RUN_DIR/prior/checkpoint.pt   the PixelCNN prior

Beside each ``checkpoint.pt`` lies ``checkpoint.prev.pt``, the one before it.

Provenance: every checkpoint of stage k records, for each lower stage, the
digest of the checkpoint it was trained on. When a lower stage is retrained
its digest changes, and every stage above it becomes *stale*: trained on
codes the hierarchy no longer produces.

Every checkpoint also records what its data was (shapes, split counts, content digests; see
:func:`progvq.data.data_record`). A data set replaced under the same path is another data set:
training refuses to go on with it and reading commands refuse to hand it to the run's models
(:func:`check_run_data`); a stage trained on other data than a stage below it is stale.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .build import build_level, build_prior, is_class_conditional
from .canvas import Canvas
from .checkpoint import Found, checkpoint_path, latest_data_record, load_latest
from .config import CONFIG_MAX_BYTES, RECORDED_KEY, Config, config_from_dict, dump_config
from .data import ImageData, data_change, load_dataset
from .errors import ConfigError, ProgvqError, RunError
from .fileio import atomic_write, read_limited
from .kinds import Level

CONFIG_NAME = "config.yaml"


def read_run_config(run_dir: str | Path) -> Config:
    """The config a run was created with (``RUN_DIR/config.yaml``)."""
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not path.exists():
        raise RunError(f"{path}: missing; {run_dir} is not a progvq run directory")
    try:
        data = read_limited(path, "run config", CONFIG_MAX_BYTES)
    except ProgvqError as err:
        raise RunError(str(err)) from None
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
        if isinstance(raw, dict):
            raw.pop(RECORDED_KEY, None)  # facts about the data, not settings
        return config_from_dict(raw)
    except UnicodeDecodeError:
        raise RunError(f"{path}: unreadable run config (not UTF-8 text)") from None
    except (ConfigError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise RunError(f"{path}: unreadable run config ({first})") from None


def write_run_config(run_dir: str | Path, cfg: Config, canvas: Canvas | None = None) -> None:
    """Write ``RUN_DIR/config.yaml``: the resolved config, and what the data turned out to be.

    ``canvas`` records the data's own (C, H, W) and the padded shape the models take
    under ``recorded``, which is not part of the config (reading the file drops it).
    """
    text = dump_config(cfg)
    if canvas is not None:
        text += yaml.safe_dump({RECORDED_KEY: canvas.to_list()}, sort_keys=False, default_flow_style=None)
    text = text.encode()
    atomic_write(Path(run_dir) / CONFIG_NAME, lambda f: f.write(text))


def first_difference(a: object, b: object, where: str = "") -> tuple[str, object, object] | None:
    """The first key path at which two nested configs differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                return sub, a.get(key, "<absent>"), b.get(key, "<absent>")
            found = first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    return None if a == b else (where, a, b)


@dataclass
class StageState:
    """Where one stage stands."""

    name: str
    state: str  # "done", "partial" or "missing"
    step: int = 0
    steps: int = 0
    digest: str = ""  # content digest of the checkpoint in use
    parents: dict[str, str] = field(default_factory=dict)  # lower stage -> digest it was trained on
    stale: str = ""  # why the stage is stale; empty when it is not
    note: str = ""  # e.g. the newest checkpoint was damaged and the previous one is in use
    data: dict[str, Any] | None = None  # what the data was when it trained (None: not recorded)

    def describe(self) -> str:
        if self.state == "partial":
            text = f"partial (step {self.step} of {self.steps})"
        elif self.state == "done":
            text = f"done ({self.steps} steps)"
        else:
            text = "missing"
        if self.stale:
            text += f", STALE: {self.stale}"
        if self.note:
            text += f" [{self.note}]"
        return text


def stage_state(run_dir: str | Path, name: str, cfg: Config) -> StageState:
    """One stage's state from its newest good checkpoint (see :meth:`Run.state`)."""
    return Run(run_dir).state(name, cfg)


def mark_stale(states: list[StageState]) -> list[StageState]:
    """Set ``stale`` on every stage trained on lower checkpoints other than the current ones.

    ``states`` are in training order. A stage is stale when a lower stage it
    was trained on has been retrained (other digest) or removed, when a lower
    stage is itself stale, or when both record their data and a lower stage's
    is another data set as :func:`progvq.data.data_change` tells it (a stage
    folder copied in from a run on other data).
    """
    for i, state in enumerate(states):
        if state.state == "missing":
            continue
        for lower in states[:i]:
            recorded = state.parents.get(lower.name)
            label = "the prior" if lower.name == "prior" else f"stage {lower.name}"
            if lower.state == "missing":
                state.stale = f"{label} it was trained on is gone"
            elif recorded != lower.digest:
                state.stale = f"{label} was retrained after this stage was trained on it"
            elif change := data_change(lower.data, state.data, was=f"for {label}", is_="for this one"):
                state.stale = f"{label} was trained on other data ({change})"
            elif lower.stale:
                state.stale = f"{label} is stale"
            else:
                continue
            break
    return states


def check_run_data(run_dir: str | Path, now: dict[str, Any]) -> None:
    """Refuse (one line naming the run, the stage and the data) data whose record ``now`` is another data set
    than the one a stage of the run in ``run_dir`` was trained on: its models were made for that one (images
    of another size would not even pass through them). Stages that record no data (written before records
    were kept) are taken as they are, and a folder that holds no run is not checked."""
    run = Run(run_dir)
    if not run.exists():
        return
    for name in run.config.stage_names():
        change = data_change(run.data_record(name), now)
        if change is not None:
            label = "the prior" if name == "prior" else f"stage {name}"
            raise RunError(
                f"{run.path}: {label} was trained on other data ({change}); put that data back, "
                "or train a run on the data as it is now"
            )


def load_run_data(run_dir: str | Path, cfg: Config) -> ImageData:
    """The data of the run in ``run_dir`` (config ``cfg``), its folder cache kept there, refused in one line
    when it is another data set than its stages were trained on (:func:`check_run_data`)."""
    return load_dataset(
        cfg.data, cfg.total_downsample(), cache_dir=Path(run_dir), check=lambda record: check_run_data(run_dir, record)
    )


def run_status(run_dir: str | Path) -> list[StageState]:
    """Every stage of a run, in training order, with staleness marked."""
    return Run(run_dir).states()


class Run:
    """One run folder: its layout, its config and its stages' checkpoints, each read once.

    Every rule about the folder lives here: where a stage's checkpoint is, which
    checkpoint is in use (a damaged newest one falls back to the previous), whether a
    stage is done, stale, or fits the config, and how its model is rebuilt. A checkpoint
    file is read and its digest checked once per process (:meth:`found`); a stage that
    trains writes a new one and calls :meth:`forget`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._config: Config | None = None
        self._found: dict[str, Found | None] = {}

    # ------------------------------------------------------------------ layout

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    def checkpoint_path(self, name: str) -> Path:
        return checkpoint_path(self.path, name)

    def stage_dir(self, name: str) -> Path:
        return self.checkpoint_path(name).parent

    def exists(self) -> bool:
        """Whether the folder holds a run (its config)."""
        return self.config_path.exists()

    # ------------------------------------------------------------------ config

    @property
    def config(self) -> Config:
        """The config the run was created with, read once."""
        if self._config is None:
            self._config = read_run_config(self.path)
        return self._config

    def write_config(self, cfg: Config, canvas: Canvas | None = None) -> None:
        write_run_config(self.path, cfg, canvas)
        self._config = cfg

    # ------------------------------------------------------------------ stages

    def found(self, name: str, *, on_damaged: Any = None) -> Found | None:
        """Stage ``name``'s newest good checkpoint (cached: read and digest-checked once), or None."""
        if name not in self._found:
            self._found[name] = load_latest(self.checkpoint_path(name), on_damaged=on_damaged)
        return self._found[name]

    def forget(self, name: str) -> None:
        """Drop what is cached of stage ``name`` (its checkpoint was rewritten or moved)."""
        self._found.pop(name, None)

    def state(self, name: str, cfg: Config | None = None) -> StageState:
        """One stage's state (staleness is left to :meth:`states`)."""
        found = self.found(name)
        steps = int((cfg or self.config).stages[name].steps)
        if found is None:
            return StageState(name, "missing", 0, steps)
        ckpt = found.checkpoint
        step = int(ckpt["step"])
        note = f"{found.problems[0]}; using {found.path.name}" if found.fell_back else ""
        parents = {str(k): str(v) for k, v in dict(ckpt.get("parents", {})).items()}
        state = "done" if step >= steps else "partial"
        data = ckpt["extra"].get("data")
        return StageState(name, state, step, steps, str(ckpt["digest"]), parents, note=note, data=data)

    def data_record(self, name: str) -> dict[str, Any] | None:
        """What stage ``name``'s checkpoint in use records of its data; None when it has none or records none.

        From the checkpoint already read when there is one, else from what this process loaded of the
        unchanged file (:func:`progvq.checkpoint.latest_data_record`), so checking data read after the
        models costs no second read of their checkpoints.
        """
        if name in self._found:
            found = self._found[name]
            record = found.checkpoint["extra"].get("data") if found is not None else None
            return record if isinstance(record, dict) else None
        return latest_data_record(self.checkpoint_path(name))

    def states(self, cfg: Config | None = None, upto: str | None = None) -> list[StageState]:
        """Every stage (up to ``upto``) in training order, with staleness marked."""
        names = (cfg or self.config).stage_names()
        names = names[: names.index(upto) + 1] if upto in names else names
        return mark_stale([self.state(name, cfg) for name in names])

    def check_not_stale(self, *, allow_stale: bool = False, upto: str | None = None) -> list[StageState]:
        """:meth:`states`, raising :class:`RunError` if a stage (up to ``upto``) is stale."""
        states = self.states(upto=upto)
        for state in states if not allow_stale else []:
            if state.stale:
                label = "the prior" if state.name == "prior" else f"stage {state.name}"
                raise RunError(
                    f"{self.path}: {label} is stale ({state.stale}); retrain it with "
                    f"`train --stage {state.name} --restart`, or pass --allow-stale to use it anyway"
                )
        return states

    def check_consistent(self, names: list[str]) -> None:
        """Refuse (one line naming the file and key) stages ``names`` whose checkpoints do not make one
        hierarchy with each other and with the run config: a config.yaml edited by hand, a checkpoint
        of another stage put in a stage's folder, or a level that --allow-stale cannot bridge (a lower
        stage retrained with another codebook size). Each stage must be finished."""
        cfg = self.config
        known = set(cfg.stage_names())
        configs: dict[str, Config] = {}
        for name in names:
            path = self.checkpoint_path(name)
            ckpt = self.finished(name)
            if ckpt["stage"] != name:
                raise RunError(f"{path}: holds stage {ckpt['stage']}, not stage {name}")
            unknown = sorted(set(ckpt["parents"]) - known)
            if unknown:
                raise RunError(
                    f"{self.config_path}: stages: has no stage {unknown[0]}, but {path} was trained on one "
                    "(the run config was edited?)"
                )
            configs[name] = stage_cfg = self.stage_config(name)
            if name == "prior":
                levels = stage_cfg.num_levels
                if levels != cfg.num_levels:
                    raise RunError(
                        f"{path}: the prior was trained on level {levels}, but {self.config_path} has "
                        f"{cfg.num_levels} level(s) (the run config was edited?)"
                    )
        for name in names:
            k = cfg.num_levels + 1 if name == "prior" else int(name)
            below = str(k - 1)
            if k < 2 or below not in configs:
                continue
            # the codes stage k was trained on against the codes level k-1 now makes
            expected = configs[name].level(k - 1).codes
            made = configs[below].level(k - 1).codes
            if expected != made:
                raise RunError(
                    f"{self.checkpoint_path(name)}: level {below} had {expected} codes when this stage "
                    f"was trained, but now has {made} codes ({self.checkpoint_path(below)}); "
                    f"--allow-stale cannot bridge that: train --stage {name} --restart"
                )

    def finished(self, name: str) -> dict[str, Any]:
        """Stage ``name``'s checkpoint, which must have reached its last step."""
        path = self.checkpoint_path(name)
        found = self.found(name)
        if found is None:
            raise RunError(f"{self.path}: stage {name} is not trained (no {path.name} in {path.parent.name}/)")
        ckpt = found.checkpoint
        why = f" ({found.problems[0]}; {found.path.name} is the newest good one)" if found.fell_back else ""
        if int(ckpt["step"]) < int(ckpt["steps"]):
            raise RunError(
                f"{path}: stage {name} is unfinished (step {ckpt['step']} of {ckpt['steps']}){why}; "
                "train it to the end first"
            )
        if why:
            warnings.warn(f"stage {name}: using {found.path}{why}", stacklevel=3)
        return ckpt

    def stage_config(self, name: str) -> Config:
        """The config stored in stage ``name``'s finished checkpoint (what its model was built from)."""
        try:
            return config_from_dict(self.finished(name)["config"])
        except ConfigError as err:
            raise RunError(f"{self.checkpoint_path(name)}: its config is not readable ({err})") from None

    # ------------------------------------------------------------------ models

    def level(self, k: int, device: str | torch.device = "cpu") -> Level:
        """Level ``k``'s trained model, frozen (eval mode, no gradients), from its checkpoint's config."""
        name = str(k)
        cfg = self.stage_config(name)
        below = cfg.level(k - 1).codes if k > 1 else 0
        classes = level_classes(self.finished(name), cfg, k, self.checkpoint_path(name))
        model = build_level(cfg.level(k), cfg.data.channels, below, classes)
        self._restore(model, name, device)
        return model

    def prior(self, device: str | torch.device = "cpu") -> nn.Module:
        """The trained prior, frozen; its class count is the one its checkpoint records."""
        cfg = self.stage_config("prior")
        model = build_prior(cfg, prior_classes(self.finished("prior"), cfg, self.checkpoint_path("prior")))
        self._restore(model, "prior", device)
        return model

    def canvas(self, name: str) -> Canvas:
        """The canvas (the data's own image shape and the padded one) stage ``name`` was trained on."""
        return canvas_of(self.finished(name), self.path)

    def trained_with(self, name: str) -> dict[str, str]:
        """The precision and hardware stage ``name`` trained with (empty for checkpoints that predate it)."""
        info = self.finished(name).get("trained_with")
        return dict(info) if isinstance(info, dict) else {}

    def _restore(self, model: nn.Module, name: str, device: str | torch.device) -> None:
        try:
            model.load_state_dict(self.finished(name)["model"])
        except RuntimeError as err:
            first_line = str(err).splitlines()[0][:160]
            raise RunError(f"{self.checkpoint_path(name)}: weights do not fit its config ({first_line})") from None
        model.to(device).eval().requires_grad_(False)


def canvas_of(ckpt: dict[str, Any], where: str | Path) -> Canvas:
    """The canvas a checkpoint's stage was trained on (its ``extra``: the original and the padded shape).

    Checkpoints written before the original shape was recorded hold the padded one
    alone; their figures are then over the padded image, and a warning says so.
    """
    extra = ckpt.get("extra", {})
    if "image_shape" not in extra:
        raise RunError(f"{where}: a checkpoint does not record the image shape its models take (extra.image_shape)")
    padded = tuple(int(v) for v in extra["image_shape"])
    if "original_shape" not in extra:
        # only data.size pads, and never generated shapes (made at their size): otherwise nothing is lost
        data = ckpt.get("config", {}).get("data", {})
        if data.get("size") is not None and data.get("source") != "shapes":
            warnings.warn(
                f"{where}: its checkpoints predate the recording of the data's own size; "
                "figures are over the padded image",
                stacklevel=3,
            )
        return Canvas.unpadded(padded)  # type: ignore[arg-type]
    return Canvas(tuple(int(v) for v in extra["original_shape"]), padded)  # type: ignore[arg-type]


#: Where progvq 0.1 kept a class-conditional prior's classes: the rows of this weight.
_LEGACY_LABEL_WEIGHT = "blocks.0.label_bias.weight"


def prior_classes(ckpt: dict[str, Any], cfg: Config, path: Path) -> int:
    """How many classes a prior checkpoint was trained with (0: unconditional), as the checkpoint records it.

    Checkpoints of progvq 0.1 did not record it; for them (only) it is the row count of the
    label embedding, the one place that knew it.
    """
    if not cfg.prior.class_conditional:
        return 0
    recorded = ckpt.get("extra", {}).get("num_classes")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    weight = ckpt["model"].get(_LEGACY_LABEL_WEIGHT) if isinstance(ckpt.get("model"), dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise RunError(f"{path}: a class-conditional prior whose checkpoint records no class count (extra.num_classes)")
    return int(weight.shape[0])


def level_classes(ckpt: dict[str, Any], cfg: Config, k: int, path: Path) -> int:
    """How many classes level ``k``'s decoder was trained with (0: it takes no class), as its checkpoint's
    ``extra.num_classes`` records it; checkpoints written before decoders could take the class record
    nothing, and their decoders take none."""
    if not is_class_conditional(cfg.level(k)):
        return 0
    recorded = ckpt.get("extra", {}).get("num_classes")
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 1:
        raise RunError(
            f"{path}: a class-conditional decoder whose checkpoint records no class count (extra.num_classes)"
        )
    return recorded


def _lock_holder(path: Path) -> str:
    """The PID holding a lock on the folder ``path``, as /proc/locks tells it (Linux), else ''."""
    try:
        inode = os.stat(path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(inode):
                return fields[4]
    except (OSError, IndexError):
        pass
    return ""


@contextmanager
def training_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while a ``train`` command runs in it.

    A second trainer on the same folder is refused in one line naming the holder's PID:
    two would overwrite each other's checkpoints. The lock is ``flock`` on the folder
    itself, so no file is made, and the kernel releases it when the process ends in any
    way (a SIGKILL leaves no stale lock). Readers (sample, eval, status) never take it.
    A run folder made by this command is removed again when the command fails before any
    checkpoint was written in it (what it may hold then, a config, a data cache, the events of a
    step or two, is worth less than a folder the user never asked for).
    """
    path = Path(run_dir)
    made = [p for p in (path, *path.parents) if not p.exists()]  # the folders this call creates, deepest first
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(path)
            who = f"process {holder}" if holder else "another process"
            raise RunError(
                f"{path}: {who} is training this run; wait for it to finish (or stop it) and train again"
            ) from None
        yield
    except BaseException:
        if made and not any(path.rglob("checkpoint*.pt")):
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(fd)  # releases the lock
        for folder in made:
            try:
                folder.rmdir()  # only if (now) empty: a failed command leaves no folder behind
            except FileNotFoundError:
                continue  # removed with its content above
            except OSError:
                break
