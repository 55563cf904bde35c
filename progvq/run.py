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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .canvas import Canvas
from .checkpoint import checkpoint_path, load_latest
from .config import Config, config_from_dict, dump_config
from .errors import ConfigError, RunError
from .fileio import atomic_write

CONFIG_NAME = "config.yaml"
#: The run config's section of facts found in the data (its image shapes); not a setting.
RECORDED_KEY = "recorded"


def read_run_config(run_dir: str | Path) -> Config:
    """The config a run was created with (``RUN_DIR/config.yaml``)."""
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not path.exists():
        raise RunError(f"{path}: missing; {run_dir} is not a progvq run directory")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
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
    """One stage's state from its newest good checkpoint (staleness is left to :func:`run_status`)."""
    found = load_latest(checkpoint_path(run_dir, name))
    steps = int(cfg.stages[name].steps)
    if found is None:
        return StageState(name, "missing", 0, steps)
    ckpt = found.checkpoint
    step = int(ckpt["step"])
    note = f"{found.problems[0]}; using {found.path.name}" if found.fell_back else ""
    parents = {str(k): str(v) for k, v in dict(ckpt.get("parents", {})).items()}
    return StageState(name, "done" if step >= steps else "partial", step, steps, str(ckpt["digest"]), parents, note=note)


def mark_stale(states: list[StageState]) -> list[StageState]:
    """Set ``stale`` on every stage trained on lower checkpoints other than the current ones.

    ``states`` are in training order. A stage is stale when a lower stage it
    was trained on has been retrained (other digest) or removed, or when a
    lower stage is itself stale.
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
            elif lower.stale:
                state.stale = f"{label} is stale"
            else:
                continue
            break
    return states


def run_status(run_dir: str | Path) -> list[StageState]:
    """Every stage of a run, in training order, with staleness marked."""
    cfg = read_run_config(run_dir)
    return mark_stale([stage_state(run_dir, name, cfg) for name in cfg.stage_names()])


def check_not_stale(run_dir: str | Path, *, allow_stale: bool = False, upto: str | None = None) -> list[StageState]:
    """:func:`run_status`, raising :class:`RunError` if a stage (up to ``upto``) is stale.

    ``sample`` and ``eval`` call this so a hierarchy whose parts no longer fit
    together is not used unless the user says so.
    """
    states = run_status(run_dir)
    if not allow_stale:
        names = [s.name for s in states]
        last = names.index(upto) if upto in names else len(states) - 1
        for state in states[: last + 1]:
            if state.stale:
                label = "the prior" if state.name == "prior" else f"stage {state.name}"
                raise RunError(
                    f"{run_dir}: {label} is stale ({state.stale}); retrain it with "
                    f"`train --stage {state.name} --restart`, or pass --allow-stale to use it anyway"
                )
    return states
