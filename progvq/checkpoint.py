"""Checkpoints: atomic save, safe load, RNG state, provenance.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
it loads with ``torch.load(weights_only=True)`` and can never run code:

- ``format``/``version``: what this file is
- ``stage``: "1".."L" or "prior"; ``step``: optimizer steps taken; ``steps``: the goal
- ``config``: the resolved run config (a nested dict)
- ``model``, ``optimizer``: state dicts; ``scheduler``: the schedule's state
- ``rng``: rank 0's python, numpy and torch generator states; ``rng_ranks``: every
  rank's, in rank order (one entry in a single process; see :func:`set_rank_rng_state`)
- ``parents``: for each lower stage, the sha256 of the checkpoint it was trained on
- ``extra``: what the stage's models were made for: the data's own image shape and the padded
  one, and under ``extra.data`` what the data was (its shapes, split counts and content
  digests: :func:`progvq.data.data_record`); checkpoints written before that record was kept
  have none, and their data counts as unknown, never as different
- ``versions``: progvq and torch versions that wrote it
- ``digest``: sha256 of everything above (see :func:`payload_digest`)

Integrity: a checkpoint is written atomically (temporary file, fsync, rename),
so a crash leaves the old file or the new one. The digest catches what a
rename cannot: a file damaged later (a truncated copy, a flipped bit). Before a
new checkpoint is written the old one is renamed ``checkpoint.prev.pt``;
:func:`load_latest` falls back to it when the newest is missing (a crash
between the two steps) or damaged, and never loads a damaged file.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .data import is_data_record
from .errors import ProgvqError, RunError
from .fileio import atomic_write, check_regular

FORMAT = "progvq-checkpoint"
VERSION = 2  # 2: content digest and a kept previous checkpoint
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"


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


def derive_rng_state(base: dict[str, Any], rank: int) -> None:
    """Seed every generator of ``rank`` from ``base`` (rank 0's states): a fixed function of the two.

    Under torchrun each rank draws from its own streams (its dropout masks are
    its own, as one process's masks over the whole batch would be), while all
    ranks build the model from the same seed, so its initial weights agree.
    """
    digest = hashlib.sha256()
    _feed(digest, base)
    digest.update(f"rank {rank}".encode())
    seed_everything(int.from_bytes(digest.digest()[:8], "little"))


def set_rank_rng_state(checkpoint: dict[str, Any] | None, rank: int) -> None:
    """Give this process (rank ``rank`` of a job) its own generator states before training.

    - A new stage (``checkpoint`` None): rank 0 keeps the states it has (so one
      process runs as it always did); rank r > 0 derives its own from them
      (:func:`derive_rng_state`).
    - A resumed stage: each rank restores its own entry of ``rng_ranks``. When
      the job has more processes than the one that saved it, rank r beyond
      those saved derives its states from rank 0's saved ones and r, so a
      resume is still a fixed function of the checkpoint (it cannot continue
      streams that never existed); with fewer, the extra saved streams are
      left unused. Checkpoints from before ``rng_ranks`` hold only ``rng``,
      which is rank 0's.
    """
    if checkpoint is None:
        if rank > 0:
            derive_rng_state(rng_state(), rank)
        return
    saved = list(checkpoint.get("rng_ranks") or [checkpoint["rng"]])
    if rank < len(saved):
        set_rng_state(saved[rank])
    else:
        derive_rng_state(saved[0], rank)


def changed_parent(recorded: dict[str, str], parents: dict[str, str]) -> str | None:
    """The first lower stage (in training order) whose digest differs between two ``parents`` records, or None.

    A stage records the digests of the lower stages it was trained on; a differing one means a
    lower stage was retrained (or removed) since, so the stage cannot simply go on.
    """

    def order(name: str) -> tuple[bool, int, str]:
        return (not name.isdigit(), int(name) if name.isdigit() else 0, name)

    differing = [k for k in set(recorded) | set(parents) if recorded.get(k) != parents.get(k)]
    return min(differing, key=order) if differing else None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` to ``digest``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key, value in obj.items():  # insertion order survives a save/load round trip
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for value in obj:
            _feed(digest, value)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        # repr is exact for floats and tells True from 1
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(
            f"checkpoint values must be tensors, numbers, strings, lists or dicts, not {type(obj).__name__}"
        )


def payload_digest(payload: dict[str, Any]) -> str:
    """sha256 over every value of a checkpoint dict except its ``digest`` entry.

    It hashes the values, not the file's bytes, so it names a checkpoint's
    content however it was serialised; the stages above one record it as
    their provenance.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != "digest"})
    return digest.hexdigest()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_shape(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_count(v) and v > 0 for v in value)


#: What every checkpoint holds, and what each entry must be: a file whose digest holds but
#: which lacks one (written by other code, or edited and re-digested) is refused by name.
_SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "stage": ("a stage name", lambda v: isinstance(v, str) and (v == "prior" or (v.isdigit() and int(v) >= 1))),
    "step": ("a count of steps", _is_count),
    "steps": ("a count of steps", _is_count),
    "config": ("a mapping", lambda v: isinstance(v, dict)),
    "model": (
        "a mapping of names to tensors",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
    ),
    "optimizer": ("a mapping", lambda v: isinstance(v, dict)),
    "parents": (
        "a mapping of stage names to digests",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(d, str) for k, d in v.items()),
    ),
    "metrics": ("a mapping", lambda v: isinstance(v, dict)),
    "extra": (
        "a mapping (with image shapes as [C, H, W] and a data record)",
        lambda v: (
            isinstance(v, dict)
            and all(_is_shape(v[key]) for key in ("image_shape", "original_shape") if key in v)
            and ("data" not in v or is_data_record(v["data"]))
        ),
    ),
}


def schema_problem(ckpt: dict[str, Any]) -> str | None:
    """What is missing or of the wrong kind in a checkpoint dict, in words; None when it is whole."""
    for key, (what, valid) in _SCHEMA.items():
        if key not in ckpt:
            return f"no {key!r} entry"
        if not valid(ckpt[key]):
            return f"{key!r} is not {what}"
    return None


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of a state dict holding NaN or inf, or None."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.prev.pt`` beside ``checkpoint.pt``."""
    path = Path(path)
    return path.with_name(PREVIOUS_NAME if path.name == CHECKPOINT_NAME else f"{path.stem}.prev{path.suffix}")


def unfinished_writes(stage_dir: str | Path) -> list[Path]:
    """Temporary files left in ``stage_dir`` by checkpoint writes that a crash cut short."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    return sorted(p for p in stage_dir.iterdir() if p.name.startswith(".checkpoint") and p.name.endswith(".tmp"))


def save_checkpoint(payload: dict[str, Any], path: str | Path, *, keep_previous: bool = True) -> str:
    """Write ``payload`` atomically (see :func:`progvq.fileio.atomic_write`) and return its digest.

    With ``keep_previous`` the checkpoint already at ``path`` is kept as
    :func:`previous_path` first.
    """
    path = Path(path)
    versions = {"progvq": __version__, "torch": str(torch.__version__)}
    header = {"format": FORMAT, "version": VERSION, "versions": versions}
    full = {**header, **payload}
    full["digest"] = payload_digest(full)
    # The old checkpoint becomes the previous one by a rename (the two names never share a
    # file) only once the new one is wholly on disk: a failed write (a full disk) changes
    # neither. Between the two renames only the previous one exists, which load_latest uses.
    atomic_write(path, lambda f: torch.save(full, f), previous=previous_path(path) if keep_previous else None)
    return full["digest"]


#: The data record (``extra.data``, None when absent) of every checkpoint file this process has loaded, by
#: the file's identity (see :func:`_file_key`): a command that loads a run's models and then its data
#: compares the two without reading the checkpoints again (see :func:`latest_data_record`).
_DATA_RECORDS: dict[tuple[str, int, int, int, int], dict[str, Any] | None] = {}
_DATA_RECORDS_MAX = 4096  # records are small; the bound only keeps a long-lived process from growing


def _file_key(path: Path) -> tuple[str, int, int, int, int]:
    """A file's path, device, inode, size and modification time: checkpoints are replaced by a rename, so a
    rewritten checkpoint has another key."""
    st = os.stat(path)
    return str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember(key: tuple[str, int, int, int, int], ckpt: dict[str, Any]) -> None:
    if len(_DATA_RECORDS) >= _DATA_RECORDS_MAX:
        _DATA_RECORDS.clear()
    record = ckpt["extra"].get("data")
    _DATA_RECORDS[key] = dict(record) if isinstance(record, dict) else None


def latest_data_record(path: str | Path) -> dict[str, Any] | None:
    """The data record of the checkpoint :func:`load_latest` would use at ``path`` (None: no checkpoint, no
    good one, or one that records none), read from what this process loaded already when the file is
    unchanged since."""
    for candidate in (Path(path), previous_path(path)):
        try:
            key = _file_key(candidate)
        except OSError:
            continue
        if key not in _DATA_RECORDS:
            try:
                load_checkpoint(candidate)
            except RunError:
                continue  # damaged: load_latest would fall back to the previous one too
        if key in _DATA_RECORDS:
            return _DATA_RECORDS[key]
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), check it is ours and that its digest holds."""
    path = Path(path)
    try:
        check_regular(path, "checkpoint")  # a named pipe would block torch.load forever
    except ProgvqError as err:
        raise RunError(str(err)) from None
    try:
        key = _file_key(path)  # before the read: a file replaced during it gets a key of its own
    except OSError:
        key = None
    try:
        with warnings.catch_warnings():
            # e.g. a pickle protocol torch does not expect: the load below succeeds or refuses on its own
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever a corrupt, truncated or hostile file raises, it is not loadable
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # torch's weights_only refusal names the forbidden global on a line of its own; its
        # first line advises weights_only=False, which must never reach a user as advice
        refused = next((ln for ln in lines if "GLOBAL" in ln), None)
        if refused is not None:
            what = re.search(r"GLOBAL (\S+)", refused)
            name = what.group(1) if what else refused[:120]
            raise RunError(f"{path}: not a loadable checkpoint: refused, loading it would call {name}") from None
        first = lines[0] if lines else type(err).__name__
        for i, ln in enumerate(lines[:-1]):
            if ln.endswith("WeightsUnpickler error:"):
                first = f"unsupported pickle content: {lines[i + 1]}"
        raise RunError(f"{path}: not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RunError(f"{path}: not a progvq checkpoint")
    if ckpt.get("version") != VERSION:
        raise RunError(f"{path}: checkpoint format version {ckpt.get('version')} (this progvq reads {VERSION})")
    try:
        digest = payload_digest(ckpt)
    except TypeError as err:
        raise RunError(f"{path}: damaged checkpoint ({err})") from None
    if ckpt.get("digest") != digest:
        raise RunError(f"{path}: damaged checkpoint (its content does not match its sha256 digest)")
    problem = schema_problem(ckpt)
    if problem is not None:
        raise RunError(f"{path}: not a usable checkpoint ({problem})")
    model = ckpt["model"]
    bad = first_nonfinite(model)
    if bad is not None:
        # training never writes such weights (it stops at a non-finite loss), so the file was made elsewhere
        raise RunError(f"{path}: weights are not finite (model.{bad} holds NaN or inf)")
    if key is not None:
        _remember(key, ckpt)
    return ckpt


@dataclass
class Found:
    """The newest loadable checkpoint of a stage, and what was wrong with newer ones."""

    path: Path  # the file loaded
    checkpoint: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # one line per newer file that could not be used

    @property
    def fell_back(self) -> bool:
        return bool(self.problems)


def load_latest(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    on_damaged: Callable[[Path], None] | None = None,
) -> Found | None:
    """The newest good checkpoint of ``path`` and its previous one, or None if neither exists.

    A damaged file is never returned: its problem is recorded and the previous
    checkpoint is tried. Once a good one is found, ``on_damaged`` (if given) is
    called with the path of each damaged file newer than it. Raises
    :class:`RunError` when files exist but none is loadable, and then calls
    nothing: a stage with no good checkpoint keeps its files in place, so it is
    refused again (never silently started anew) until someone looks at them.
    """
    path = Path(path)
    problems: list[str] = []
    damaged: list[Path] = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            checkpoint = load_checkpoint(candidate, map_location)
        except RunError as err:
            problems.append(str(err))
            damaged.append(candidate)
            continue
        if on_damaged is not None:
            for bad in damaged:
                on_damaged(bad)
        return Found(candidate, checkpoint, problems)
    if problems:
        if len(problems) == 1:
            raise RunError(f"{problems[0]}; no earlier good checkpoint to fall back to")
        raise RunError(f"{problems[0][:240]}; and {problems[1][:240]}")
    return None
