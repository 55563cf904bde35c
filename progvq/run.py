"""A run directory: its config and the state of each stage.

Layout::

    RUN_DIR/config.yaml           the resolved config the run was created with
    RUN_DIR/stage-1/checkpoint.pt level 1 (and its TensorBoard events)
    RUN_DIR/stage-2/checkpoint.pt ...
    RUN_DIR/prior/checkpoint.pt   the PixelCNN prior
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .checkpoint import checkpoint_path, load_checkpoint
from .config import Config, config_from_dict, dump_config
from .errors import ConfigError, RunError
from .fileio import atomic_write

CONFIG_NAME = "config.yaml"


def read_run_config(run_dir: str | Path) -> Config:
    """The config a run was created with (``RUN_DIR/config.yaml``)."""
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not path.exists():
        raise RunError(f"{path}: missing; {run_dir} is not a progvq run directory")
    try:
        return config_from_dict(yaml.safe_load(path.read_text()))
    except (ConfigError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise RunError(f"{path}: unreadable run config ({first})") from None


def write_run_config(run_dir: str | Path, cfg: Config) -> None:
    text = dump_config(cfg).encode()
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

    def describe(self) -> str:
        if self.state == "partial":
            return f"partial (step {self.step} of {self.steps})"
        if self.state == "done":
            return f"done ({self.steps} steps)"
        return "missing"


def stage_state(run_dir: str | Path, name: str, cfg: Config) -> StageState:
    path = checkpoint_path(run_dir, name)
    if not path.exists():
        return StageState(name, "missing", 0, cfg.stages[name].steps)
    ckpt = load_checkpoint(path)
    step, steps = int(ckpt["step"]), int(cfg.stages[name].steps)
    return StageState(name, "done" if step >= steps else "partial", step, steps)


def run_status(run_dir: str | Path) -> list[StageState]:
    """Every stage of a run, in training order."""
    cfg = read_run_config(run_dir)
    return [stage_state(run_dir, name, cfg) for name in cfg.stage_names()]
