"""Checkpoints: atomic save, safe load, RNG state, provenance.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
it loads with ``torch.load(weights_only=True)`` and can never run code:

- ``format``/``version``: what this file is
- ``stage``: "1".."L" or "prior"; ``step``: optimizer steps taken; ``steps``: the goal
- ``config``: the resolved run config (a nested dict)
- ``model``, ``optimizer``: state dicts; ``scheduler``: the schedule's state
- ``rng``: python, numpy and torch generator states; ``data``: epoch and position
- ``parents``: for each lower stage, the sha256 of the checkpoint it was trained on
- ``versions``: progvq and torch versions that wrote it
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import RunError
from .fileio import atomic_write

FORMAT = "progvq-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def stage_dir_name(stage: str) -> str:
    """Folder of a stage inside a run: ``stage-1``, ``stage-2``, ..., ``prior``."""
    return "prior" if stage == "prior" else f"stage-{stage}"


def checkpoint_path(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage_dir_name(stage) / CHECKPOINT_NAME


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as weights_only-safe values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate((state["python_version"], tuple(state["python"]), None))
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` atomically (see :func:`progvq.fileio.atomic_write`)."""
    header = {"format": FORMAT, "version": VERSION, "versions": {"progvq": __version__, "torch": str(torch.__version__)}}
    atomic_write(path, lambda f: torch.save({**header, **payload}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check it is ours."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever a corrupt, truncated or hostile file raises, it is not loadable
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # torch's weights_only refusal puts the reason on a line of its own
        first = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else type(err).__name__)
        raise RunError(f"{path}: not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RunError(f"{path}: not a progvq checkpoint")
    if ckpt.get("version") != VERSION:
        raise RunError(f"{path}: checkpoint format version {ckpt.get('version')} (this progvq reads {VERSION})")
    return ckpt
