"""Checkpoint files: save and load, the content digest, the previous checkpoint to fall back to, RNG states."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from progvq.checkpoint import (
    FORMAT,
    PREVIOUS_NAME,
    VERSION,
    checkpoint_path,
    file_sha256,
    load_checkpoint,
    load_latest,
    payload_digest,
    previous_path,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rank_rng_state,
    set_rng_state,
    unfinished_writes,
)
from progvq.distributed import Context, gather_to_main
from progvq.errors import RunError

from .helpers import Payload


def _payload(step: int = 3) -> dict:
    return {
        "stage": "2",
        "step": step,
        "steps": 10,
        "config": {"seed": 0},
        "model": {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "n": torch.tensor(7)},
        "optimizer": {},
        "metrics": {"psnr": 21.5, "done": True},
        "parents": {"1": "ab" * 32},
        "extra": {"image_shape": [1, 16, 16]},
        "note": None,
    }


# --------------------------------------------------------------------------- save, load, digest


def test_save_load_round_trip_keeps_every_value_and_the_digest(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, "2")
    assert path == tmp_path / "stage-2" / "checkpoint.pt"
    assert checkpoint_path(tmp_path, "prior") == tmp_path / "prior" / "checkpoint.pt"
    digest = save_checkpoint(_payload(), path)
    ckpt = load_checkpoint(path)
    assert ckpt["digest"] == digest == payload_digest(ckpt)
    assert (ckpt["format"], ckpt["version"]) == (FORMAT, VERSION)
    assert set(ckpt["versions"]) == {"progvq", "torch"}
    for key, value in _payload().items():
        if key == "model":
            assert all(torch.equal(ckpt[key][k], v) for k, v in value.items())
        else:
            assert ckpt[key] == value, key
    # the digest names the content, not the file: the same payload saved again digests alike
    assert save_checkpoint(_payload(), tmp_path / "again.pt") == digest
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_digest_tells_every_change_of_value_and_type() -> None:
    base = payload_digest(_payload())
    assert payload_digest({**_payload(), "digest": "anything"}) == base  # its own entry is left out
    changed = []
    for change in (
        lambda p: p["model"]["w"].view(-1)[4].add_(1e-6),  # one element, a little
        lambda p: p["model"].update(w=p["model"]["w"].double()),  # the same numbers in another dtype
        lambda p: p["model"].update(w=p["model"]["w"].view(3, 2)),  # the same numbers in another shape
        lambda p: p["metrics"].update(done=1),  # True is not 1
        lambda p: p["metrics"].update(psnr=21.500000000000004),  # the next float
        lambda p: p.update(shape=(1, 16, 16)),  # a tuple is not a list
        lambda p: p.update(step=4),
    ):
        payload = _payload()
        change(payload)
        changed.append(payload_digest(payload))
    assert base not in changed and len(set(changed)) == len(changed)
    with pytest.raises(TypeError, match="checkpoint values must be tensors, numbers, strings, lists or dicts, not set"):
        payload_digest({"bad": {1, 2}})


def test_a_changed_value_fails_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_payload(), path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["w"][0, 0] += 1  # a file that still unpickles: only the digest can tell
    torch.save(ckpt, path)
    with pytest.raises(RunError, match="damaged checkpoint .its content does not match its sha256 digest."):
        load_checkpoint(path)


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "version": 1, "step": 3}, path)
    with pytest.raises(RunError, match=rf"checkpoint format version 1 \(this progvq reads {VERSION}\)"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- the previous checkpoint


def test_a_new_checkpoint_keeps_the_old_one_as_the_previous(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    assert previous_path(path) == tmp_path / PREVIOUS_NAME
    assert previous_path(tmp_path / "other.pt") == tmp_path / "other.prev.pt"
    first = save_checkpoint(_payload(step=3), path)
    second = save_checkpoint(_payload(step=6), path)
    assert load_checkpoint(path)["digest"] == second and load_checkpoint(previous_path(path))["digest"] == first
    save_checkpoint(_payload(step=9), path, keep_previous=False)  # overwrites, the previous one stays as it was
    assert load_checkpoint(path)["step"] == 9 and load_checkpoint(previous_path(path))["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", PREVIOUS_NAME])


def test_load_latest_takes_the_newest_good_one(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    assert load_latest(path) is None  # nothing yet
    save_checkpoint(_payload(step=3), path)
    save_checkpoint(_payload(step=6), path)
    found = load_latest(path)
    assert found is not None and found.path == path and found.checkpoint["step"] == 6 and not found.fell_back
    # a crash between the rename and the write leaves only the previous one: it is the newest
    path.unlink()
    found = load_latest(path)
    assert found is not None and found.path == previous_path(path) and found.checkpoint["step"] == 3
    assert not found.fell_back


def test_load_latest_falls_back_past_a_damaged_file_and_reports_it(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_payload(step=3), path)
    save_checkpoint(_payload(step=6), path)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    reported: list[Path] = []
    found = load_latest(path, on_damaged=reported.append)
    assert found is not None and found.checkpoint["step"] == 3 and found.path == previous_path(path)
    assert found.fell_back and len(found.problems) == 1 and "not a loadable checkpoint" in found.problems[0]
    assert reported == [path]


def test_load_latest_refuses_when_no_file_is_good_and_reports_nothing(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_payload(step=3), path)
    save_checkpoint(_payload(step=6), path)
    path.write_bytes(b"")
    previous_path(path).write_bytes(b"garbage")
    reported: list[Path] = []
    with pytest.raises(RunError, match="not a loadable checkpoint.*; and .*not a loadable checkpoint"):
        load_latest(path, on_damaged=reported.append)
    assert reported == []  # the files stay where they are
    previous_path(path).unlink()
    with pytest.raises(RunError, match="no earlier good checkpoint to fall back to"):
        load_latest(path)


def test_unfinished_writes_are_the_temporary_checkpoint_files(tmp_path: Path) -> None:
    assert unfinished_writes(tmp_path / "missing") == []
    save_checkpoint(_payload(), tmp_path / "checkpoint.pt")
    assert unfinished_writes(tmp_path) == []
    left = [tmp_path / ".checkpoint.pt.abc.tmp", tmp_path / ".checkpoint.pt.xyz.tmp"]
    for p in [*left, tmp_path / "notes.tmp", tmp_path / ".other.tmp"]:
        p.write_bytes(b"")
    assert unfinished_writes(tmp_path) == left


# --------------------------------------------------------------------------- generator states; weights-only files


def test_rng_state_round_trip() -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def _same(a: tuple[float, float, torch.Tensor], b: tuple[float, float, torch.Tensor]) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_a_new_stage_gives_each_rank_its_own_generators() -> None:
    seed_everything(3)
    base = rng_state()
    set_rank_rng_state(None, 0)
    rank0 = _draws()  # rank 0 keeps the states it had: one process runs as before
    set_rng_state(base)
    assert _same(rank0, _draws())
    firsts = []
    for rank in (1, 2):
        set_rng_state(base)
        set_rank_rng_state(None, rank)
        firsts.append(_draws())
        set_rng_state(base)
        set_rank_rng_state(None, rank)
        assert _same(firsts[-1], _draws())  # a fixed function of the states and the rank
    for a, b in ((rank0, firsts[0]), (rank0, firsts[1]), (firsts[0], firsts[1])):
        assert a[0] != b[0] and a[1] != b[1] and not torch.equal(a[2], b[2])


def test_a_resume_restores_each_ranks_own_generators() -> None:
    saved = []
    for seed in (10, 11):
        seed_everything(seed)
        saved.append(rng_state())
    expected = []
    for state in saved:
        set_rng_state(state)
        expected.append(_draws())
    ckpt = {"rng": saved[0], "rng_ranks": saved}
    for rank in (0, 1):
        seed_everything(99)
        set_rank_rng_state(ckpt, rank)
        assert _same(_draws(), expected[rank])
    # a rank the saved job did not have derives its own from rank 0's, as a new stage does
    set_rank_rng_state(ckpt, 2)
    third = _draws()
    set_rng_state(saved[0])
    set_rank_rng_state(None, 2)
    assert _same(third, _draws())
    # a checkpoint from before rng_ranks: its rng is rank 0's
    old = {"rng": saved[1]}
    set_rank_rng_state(old, 0)
    assert _same(_draws(), expected[1])
    set_rank_rng_state(old, 1)
    assert not _same(_draws(), expected[1])


def test_every_ranks_generators_load_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    ranks = gather_to_main(rng_state(), Context())
    assert ranks is not None and len(ranks) == 1
    seed_everything(1)
    ranks.append(rng_state())
    save_checkpoint({**_payload(1), "stage": "1", "rng": ranks[0], "rng_ranks": ranks}, path)
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["rng_ranks"]) == 2 and torch.equal(ckpt["rng"]["torch"], ckpt["rng_ranks"][0]["torch"])
    assert load_checkpoint(path)["rng_ranks"][1]["python"] == ranks[1]["python"]  # and its digest holds


def test_checkpoint_round_trip_is_weights_only_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "stage-1" / "checkpoint.pt"
    save_checkpoint({**_payload(3), "stage": "1", "rng": rng_state(), "model": {"w": torch.ones(2)}}, path)
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual permissions, not mkstemp's 0600
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert load_checkpoint(path)["format"] == "progvq-checkpoint"



@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the file is plain pickle, on purpose
def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "progvq-checkpoint", "x": payload}, f)
    with pytest.raises(RunError, match="not a loadable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint({"stage": "1", "step": 1}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RunError, match="not a loadable checkpoint"):
        load_checkpoint(cut)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(RunError, match="not a progvq checkpoint"):
        load_checkpoint(other)
    with pytest.raises(RunError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "none.pt")
