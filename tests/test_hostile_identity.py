"""A run's identity covers its data's content: the same data path holding other images is other data.

Each checkpoint records what its data was (shapes, split counts, content digests). The table runs
the real command line on runs whose data file or folder was replaced under the same path (other
sizes, other images of the same size, other counts, other labels) and checks what
``tests/test_bad_input.py`` checks: exit status 2, exactly one ``progvq: error:`` line naming the
data path and what differs, no traceback, and every file present before byte-identical after
(nothing new either). The plain tests below check what must still work: an unchanged data set
is adopted (a folder whose files were merely rewritten too), old checkpoints without the record
load and count as unknown, and a folder is named by its cache's digest, never read again.

The runs are trained once per module with relative data paths, so a row copies a run into its own
folder, writes the changed data beside it, and runs the command there.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import progvq.folder
from progvq.checkpoint import checkpoint_path, load_checkpoint
from progvq.config import load_config
from progvq.data import data_change, data_record, load_dataset
from run_stage import main

from .conftest import ROOT, TINY
from .helpers import idx_bytes
from .test_bad_input import Case, Ctx, case_params, check_refusal, trains
from .test_hostile import rewrite

# --------------------------------------------------------------------------- data and runs

#: What every run here overrides in tiny.yaml: images at their own size (16 or 24 or 32, all divisible
#: by the levels' total downsampling of 8), 32 of the 96 held out.
COMMON = ("data.size=null", "data.heldout=32")
#: Each kind of data file: its config values (paths relative to the folder the command runs in).
SOURCES = {
    "array": ("data.source=array", "data.path=x.npz"),
    "mnist": ("data.source=mnist", "data.path=mnist", "stages.prior.class_conditional=true"),
    "folder": ("data.source=folder", "data.path=pngs", "data.channels=1"),
}
#: The place each kind's data is written to, as its error line names it.
PLACE = {"array": "data.path x.npz", "mnist": "data.path mnist", "folder": "data.path pngs"}


def sets(kind: str) -> list[str]:
    """``--set`` options of a run on data of ``kind``."""
    args: list[str] = []
    for value in (*COMMON, *SOURCES[kind]):
        args += ["--set", value]
    return args


def shapes_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` grey generated images (N, size, size) uint8 and their labels (N,) uint8."""
    from progvq.data import make_labelled_shapes

    images, labels = make_labelled_shapes(n, size=size, seed=seed)
    return images[:, 0].numpy(), labels.numpy().astype(np.uint8)


def write_data(kind: str, where: Path, *, n: int = 96, size: int = 16, seed: int = 5, labels_seed: int = 0) -> None:
    """Write data of ``kind`` into ``where`` (replacing what is there): ``n`` images of ``size`` drawn from
    ``seed``; an MNIST folder also gets labels, shuffled by ``labels_seed`` (0: as drawn)."""
    images, labels = shapes_images(n, size, seed)
    if labels_seed:
        labels = np.random.default_rng(labels_seed).permutation(labels)
    if kind == "array":
        np.savez(where / "x.npz", images=images)
    elif kind == "mnist":
        folder = where / "mnist"
        folder.mkdir(exist_ok=True)
        (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    else:
        folder = where / "pngs"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:03d}.png")


def train_here(where: Path, kind: str, *verb: str) -> None:
    """``train tiny.yaml VERB`` into ``where/run`` on ``where``'s data of ``kind`` (run from ``where``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        args = ["train", str(TINY), *verb, "--run-dir", str(where / "run"), "--no-progress", *sets(kind)]
        assert main(args) == 0


def base(tmp_path_factory: pytest.TempPathFactory, kind: str, *verb: str) -> Path:
    where = tmp_path_factory.mktemp(f"identity-{kind}")
    write_data(kind, where)
    train_here(where, kind, *verb)
    return where


@pytest.fixture(scope="module")
def array_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``x.npz`` and ``run``, every stage of tiny.yaml trained on it."""
    return base(tmp_path_factory, "array", "--all")


@pytest.fixture(scope="module")
def mnist_conditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding an MNIST-format ``mnist/`` (images and labels) and ``run``, every stage trained on it
    with a class-conditional prior (the one stage that trains on the labels)."""
    return base(tmp_path_factory, "mnist", "--all")


@pytest.fixture(scope="module")
def folder_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``pngs/`` and ``run``, every stage trained on it (its data cache in the run)."""
    return base(tmp_path_factory, "folder", "--all")


@pytest.fixture(scope="module")
def array_partial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``x.npz`` and ``run`` with stage 1 stopped at step 3 of 6."""
    return base(tmp_path_factory, "array", "--stage", "1", "--until", "3")


def copied(ctx: Ctx, fixture: str, kind: str, **change: Any) -> Path:
    """The module's run of ``fixture`` copied into the row's folder, with its data rewritten by ``change``
    (see :func:`write_data`); returns the copy's run folder."""
    source = ctx.request.getfixturevalue(fixture)
    shutil.copytree(source / "run", ctx.tmp / "run")
    write_data(kind, ctx.tmp, **change)
    return ctx.tmp / "run"


def reuse(fixture: str, kind: str, **change: Any) -> Callable[[Ctx], list[str]]:
    """``train tiny.yaml --all --from RUN`` into a new run folder, after RUN's data was replaced."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        other = copied(ctx, fixture, kind, **change)
        return [
            "train",
            str(TINY),
            "--all",
            "--run-dir",
            str(ctx.tmp / "r"),
            "--from",
            str(other),
            "--no-progress",
            *sets(kind),
        ]

    return setup


def training(fixture: str, kind: str, *verb: str, remove: tuple[str, ...] = (), **change: Any) -> Callable[..., Any]:
    """``train tiny.yaml VERB`` in the run itself after its data was replaced (stage folders ``remove``d first)."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        run = copied(ctx, fixture, kind, **change)
        for stage in remove:
            shutil.rmtree(checkpoint_path(run, stage).parent)
        return ["train", str(TINY), *verb, "--run-dir", str(run), "--no-progress", *sets(kind)]

    return setup


def reading(
    command: str, fixture: str, kind: str, *args: str, before: Callable[[Path], None] | None = None, **change: Any
) -> Callable[..., Any]:
    """``progvq COMMAND RUN ARGS`` (``{tmp}`` in ARGS is the row's folder) after the run's data was replaced."""

    @trains
    def setup(ctx: Ctx) -> list[str]:
        run = copied(ctx, fixture, kind, **change)
        if before is not None:
            before(run)
        return [command, str(run), *[a.format(tmp=ctx.tmp) for a in args]]

    return setup


def restart_stage_1(run: Path) -> None:
    """Stage 1 trained anew on the data as it is now: stage 2 and the prior keep the old data's record."""
    train_here(run.parent, "array", "--stage", "1", "--restart")


def garbage_record(run: Path) -> None:
    """Every stage-1 checkpoint's data record replaced by a mapping of the wrong kinds, re-digested."""
    for path in sorted(checkpoint_path(run, "1").parent.glob("checkpoint*.pt")):
        rewrite(path, lambda ckpt: ckpt["extra"].update(data={"shape": "16x16", "images": 5}))


# --------------------------------------------------------------------------- the table

OTHER_SIZE = "16x16 images then, 32x32 now"
SAME_SIZE = "other images of the same size and number"
CASES: list[Case] = [
    # ---- --from: a stage trained on other data is not adopted; nothing is written
    Case(
        "from",
        "npz-other-size",
        reuse("array_full", "array", size=32),
        ("--from", PLACE["array"], "its stage 1 was trained on other data", OTHER_SIZE),
    ),
    Case(
        "from",
        "npz-same-size-other-images",
        reuse("array_full", "array", seed=6),
        ("--from", PLACE["array"], SAME_SIZE),
    ),
    Case(
        "from",
        "npz-more-images",
        reuse("array_full", "array", n=128),
        ("--from", PLACE["array"], "64 training and 32 held-out images then, 96 and 32 now"),
    ),
    Case(
        "from",
        "idx-other-size",
        reuse("mnist_conditional", "mnist", size=24),
        ("--from", PLACE["mnist"], "16x16 images then, 24x24 now"),
    ),
    Case(
        "from",
        "idx-same-size-other-images",
        reuse("mnist_conditional", "mnist", seed=7),
        ("--from", PLACE["mnist"], SAME_SIZE),
    ),
    Case(
        "from",
        "png-folder-other-images",
        reuse("folder_full", "folder", seed=8),
        ("--from", PLACE["folder"], SAME_SIZE),
    ),
    Case(
        "from",
        "png-folder-other-size",
        reuse("folder_full", "folder", size=24),
        ("--from", PLACE["folder"], "16x16 images then, 24x24 now"),
    ),
    # ---- training in a run whose data changed: nothing resumes, continues or trains on it
    Case(
        "train",
        "stage-2-after-stage-1-on-other-images",
        training("array_full", "array", "--stage", "2", remove=("2", "prior"), seed=6),
        ("stage 1 (done (6 steps)) was trained on other data", PLACE["array"], SAME_SIZE, "--stage 1 --restart"),
    ),
    Case(
        "train",
        "restart-stage-2-above-other-data",
        training("array_full", "array", "--stage", "2", "--restart", size=32),
        ("stage 1 (done (6 steps)) was trained on other data", PLACE["array"], OTHER_SIZE),
    ),
    Case(
        "train",
        "all-continuing",
        training("array_full", "array", "--all", remove=("prior",), seed=6),
        ("stage 1 (done (6 steps)) was trained on other data", PLACE["array"], SAME_SIZE),
    ),
    Case(
        "train",
        "all-finished",
        training("array_full", "array", "--all", size=32),
        ("stage 1 (done (6 steps))", PLACE["array"], OTHER_SIZE),
    ),
    Case(
        "train",
        "resume-partial-stage-1",
        training("array_partial", "array", "--stage", "1", seed=6),
        ("stage 1 (partial (step 3 of 6)) was started on other data", PLACE["array"], SAME_SIZE),
    ),
    Case(
        "train",
        "prior-idx-other-labels",
        training("mnist_conditional", "mnist", "--stage", "prior", labels_seed=3),
        ("the prior (done (6 steps)) was trained on other data", PLACE["mnist"], "the same images with other labels"),
    ),
    # ---- reading a run's data split: its models were made for the data it was trained on
    Case(
        "read",
        "eval-other-size",
        reading("eval", "array_full", "array", size=32),
        ("stage 1 was trained on other data", PLACE["array"], OTHER_SIZE),
    ),
    Case(
        "read",
        "eval-json-same-size",
        reading("eval", "array_full", "array", "--json", seed=6),
        ("stage 1 was trained on other data", PLACE["array"], SAME_SIZE),
    ),
    Case(
        "read",
        "eval-train-split-more-images",
        reading("eval", "array_full", "array", "--split", "train", n=128),
        (PLACE["array"], "64 training and 32 held-out images then, 96 and 32 now"),
    ),
    Case(
        "read",
        "encode-split-other-size",
        reading("encode", "array_full", "array", "--split", "heldout", "--out", "{tmp}/codes.npz", size=32),
        ("stage 1 was trained on other data", PLACE["array"], OTHER_SIZE),
    ),
    Case(
        "read",
        "encode-split-same-size",
        reading("encode", "array_full", "array", "--split", "train", "--out", "{tmp}/codes.npz", seed=6),
        (PLACE["array"], SAME_SIZE),
    ),
    Case(
        "read",
        "compress-split-other-size",
        reading("compress", "array_full", "array", "--split", "heldout", "--out", "{tmp}/x.pvq", size=32),
        ("stage 1 was trained on other data", PLACE["array"], OTHER_SIZE),
    ),
    Case(
        "read",
        "compress-split-same-size",
        reading("compress", "array_full", "array", "--split", "heldout", "--out", "{tmp}/x.pvq", seed=6),
        (PLACE["array"], SAME_SIZE),
    ),
    # labels are the data of the stage trained on them: a class-conditional prior
    Case(
        "read",
        "eval-idx-other-labels",
        reading("eval", "mnist_conditional", "mnist", labels_seed=3),
        ("the prior was trained on other data", PLACE["mnist"], "the same images with other labels"),
    ),
    Case(
        "read",
        "encode-split-idx-other-images",
        reading("encode", "mnist_conditional", "mnist", "--split", "heldout", "--out", "{tmp}/codes.npz", seed=7),
        ("stage 1 was trained on other data", PLACE["mnist"], SAME_SIZE),
    ),
    # an image folder of another size is refused from one file's header, before its cache is rebuilt
    Case(
        "read",
        "eval-png-folder-other-size",
        reading("eval", "folder_full", "folder", size=24),
        ("stage 1 was trained on other data", PLACE["folder"], "16x16 images then, 24x24 now"),
    ),
    Case(
        "read",
        "encode-png-folder-other-size",
        reading("encode", "folder_full", "folder", "--split", "heldout", "--out", "{tmp}/codes.npz", size=32),
        (PLACE["folder"], OTHER_SIZE),
    ),
    # stage 1 retrained on the new data: the stages above it keep the old data's record
    Case(
        "read",
        "eval-allow-stale-above-a-retrained-stage-1",
        reading("eval", "array_full", "array", "--allow-stale", before=restart_stage_1, size=32),
        ("stage 2 was trained on other data", PLACE["array"], OTHER_SIZE),
    ),
    # ---- a record edited into something else is refused by name, never compared
    Case(
        "edited",
        "garbage-record",
        reading("sample", "array_full", "array", "--out", "{tmp}/s.png", before=garbage_record),
        ("stage-1/checkpoint", "'extra'", "data record"),
    ),
]


def test_table_is_big_and_unique() -> None:
    ids = [f"{c.kind}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 10


@pytest.mark.parametrize("case", case_params(CASES, all_train=True))
def test_other_data_under_the_same_path_is_one_line_status_2_and_keeps_files(
    case: Case,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_refusal(case, tmp_path, request, capsys, monkeypatch)


# --------------------------------------------------------------------------- what still works


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The test's folder as the working folder (the runs' data paths are relative)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.mark.trains
def test_the_same_data_is_adopted_and_recorded(
    array_full: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(array_full / "run", here / "run")
    write_data("array", here)  # the same images, written again: same content, another file
    args = ["train", str(TINY), "--all", "--run-dir", str(here / "r"), "--from", str(here / "run"), "--no-progress"]
    assert main([*args, *sets("array")]) == 0
    assert capsys.readouterr().out.count("reused from") == 3
    ckpt = torch.load(here / "r" / "stage-1" / "checkpoint.pt", weights_only=True)
    record = ckpt["extra"]["data"]
    assert record["shape"] == [1, 16, 16] and (record["train"], record["heldout"]) == (64, 32)
    assert record["source"] == "array" and record["path"] == "x.npz" and len(record["images"]) == 40
    assert "labels" not in record and isinstance(record["config"], str)  # a level never reads labels
    assert main(["eval", str(here / "r"), "--json"]) == 0


@pytest.mark.trains
def test_a_folder_rewritten_with_the_same_pixels_is_the_same_data(
    folder_full: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(folder_full / "run", here / "run")
    write_data("folder", here)  # every file written anew (new times): the cache is rebuilt, its digest is the same
    assert main(["eval", str(here / "run"), "--json"]) == 0
    args = ["train", str(TINY), "--all", "--run-dir", str(here / "r"), "--from", str(here / "run"), "--no-progress"]
    assert main([*args, *sets("folder")]) == 0
    assert capsys.readouterr().out.count("reused from") == 3


@pytest.mark.trains
def test_training_on_a_changed_folder_is_refused_and_keeps_the_stages(
    folder_full: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(folder_full / "run", here / "run")
    shutil.rmtree(here / "run" / "prior")
    write_data("folder", here, seed=9)
    stage_files = {p: p.read_bytes() for p in (here / "run").rglob("*.pt")}
    config = (here / "run" / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", str(TINY), "--all", "--run-dir", str(here / "run"), "--no-progress", *sets("folder")]) == 2
    err = capsys.readouterr().err
    assert err.count("progvq: error:") == 1 and PLACE["folder"] in err and SAME_SIZE in err, err
    # the data cache follows the folder (it is a cache); the stages and the run's config stay as they were
    assert {p: p.read_bytes() for p in (here / "run").rglob("*.pt")} == stage_files
    assert (here / "run" / "config.yaml").read_bytes() == config and not (here / "run" / "prior").exists()


@pytest.mark.trains
def test_restarting_stage_1_on_new_data_makes_the_stages_above_stale(
    array_full: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(array_full / "run", here / "run")
    write_data("array", here, seed=6)
    train_here(here, "array", "--stage", "1", "--restart")
    capsys.readouterr()
    assert main(["status", str(here / "run")]) == 0
    out = capsys.readouterr().out
    assert "stage 2: done (6 steps), STALE: stage 1 was retrained" in out
    # stage 2 trains anew on the new data without complaint: stage 1 is now of that data
    train_here(here, "array", "--stage", "2", "--restart")
    assert (
        load_checkpoint(checkpoint_path(here / "run", "2"))["extra"]["data"]["images"]
        == (load_checkpoint(checkpoint_path(here / "run", "1"))["extra"]["data"]["images"])
    )


@pytest.mark.trains
def test_a_stage_of_other_data_than_the_one_below_is_stale(
    array_full: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(array_full / "run", here / "run")
    write_data("array", here)
    for path in sorted((here / "run" / "stage-2").glob("checkpoint*.pt")):  # as if copied in from another run
        rewrite(path, lambda ckpt: ckpt["extra"]["data"].update(images="0" * 40))
    assert main(["status", str(here / "run")]) == 0
    out = capsys.readouterr().out
    assert "stage 2: done (6 steps), STALE: stage 1 was trained on other data" in out
    assert "other images of the same size and number" in out
    assert main(["sample", str(here / "run"), "-n", "2", "--out", str(here / "s.png")]) == 2


@pytest.mark.trains
def test_other_labels_leave_the_levels_reusable_and_the_prior_trains_again(
    mnist_conditional: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(mnist_conditional / "run", here / "run")
    write_data("mnist", here, labels_seed=3)
    args = ["train", str(TINY), "--all", "--run-dir", str(here / "r"), "--from", str(here / "run"), "--no-progress"]
    assert main([*args, *sets("mnist")]) == 0
    out = capsys.readouterr().out
    assert out.count("reused from") == 2
    assert "its stage prior was trained on other data (data.path mnist: the same images with other labels)" in out
    prior = load_checkpoint(checkpoint_path(here / "r", "prior"))["extra"]["data"]
    assert prior["labels"] != load_checkpoint(checkpoint_path(here / "run", "prior"))["extra"]["data"]["labels"]


@pytest.mark.trains
def test_a_data_section_changed_with_force_trains_on(
    array_full: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # other images of the same size at another path, adopted on purpose: the levels are used as they are
    shutil.copytree(array_full / "run", here / "run")
    images, _ = shapes_images(96, 16, 11)
    np.savez(here / "y.npz", images=images)
    args = ["train", str(TINY), "--stage", "prior", "--restart", "--force", "--run-dir", str(here / "run")]
    assert main([*args, "--no-progress", *sets("array"), "--set", "data.path=y.npz"]) == 0
    assert load_checkpoint(checkpoint_path(here / "run", "prior"))["extra"]["data"]["path"] == "y.npz"
    # but not images of another shape: the levels were made for 16x16 images
    images, _ = shapes_images(96, 32, 11)
    np.savez(here / "y.npz", images=images)
    capsys.readouterr()
    assert main([*args, "--no-progress", *sets("array"), "--set", "data.path=y.npz"]) == 2
    assert "stage 1 (done (6 steps)) was trained on other data (data.path y.npz: 16x16 images then" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- checkpoints without the record


def strip_records(run: Path) -> None:
    """Every checkpoint of ``run`` as if written before data records were kept: no ``extra.data``, its
    digest recomputed, and the stages above given the new digests as parents (so none goes stale)."""
    digests: dict[str, str] = {}
    for stage in ("1", "2", "prior"):
        for path in sorted(checkpoint_path(run, stage).parent.glob("checkpoint*.pt"), reverse=True):

            def change(ckpt: dict[str, Any]) -> None:
                ckpt["extra"].pop("data")
                ckpt["parents"] = {lower: digests[lower] for lower in ckpt["parents"]}

            rewrite(path, change)
        digests[stage] = load_checkpoint(checkpoint_path(run, stage))["digest"]


OLD_RUN = ROOT / "tests" / "data" / "run-0.1"


def test_an_old_run_without_records_still_loads_evaluates_and_is_adopted(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(OLD_RUN, here / "old")
    assert "data" not in load_checkpoint(checkpoint_path(here / "old", "1"))["extra"]
    assert main(["status", str(here / "old")]) == 0 and "STALE" not in capsys.readouterr().out
    assert main(["eval", str(here / "old"), "--json"]) == 0
    args = ["train", str(TINY), "--all", "--run-dir", str(here / "r"), "--from", str(here / "old"), "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("reused from") == 3


@pytest.mark.trains
def test_checkpoints_without_the_record_count_as_unknown(
    array_full: Path, here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(array_full / "run", here / "run")
    strip_records(here / "run")
    write_data("array", here, seed=6)  # other images: nothing says so any more
    assert main(["eval", str(here / "run"), "--json"]) == 0
    args = ["train", str(TINY), "--all", "--run-dir", str(here / "r"), "--from", str(here / "run"), "--no-progress"]
    assert main([*args, *sets("array")]) == 0
    assert capsys.readouterr().out.count("reused from") == 3
    # training goes on: the stages it trains record the data as it is now
    train_here(here, "array", "--stage", "2", "--restart")
    assert load_checkpoint(checkpoint_path(here / "run", "2"))["extra"]["data"]["shape"] == [1, 16, 16]


# --------------------------------------------------------------------------- the record itself


def test_a_cached_folder_is_named_by_its_cache_digest_without_reading_the_images(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_data("folder", here, n=40)
    cfg = load_config(TINY, [*COMMON[:1], "data.heldout=8", *SOURCES["folder"]]).data
    data = load_dataset(cfg, 8, cache_dir=here / "run", progress=False)
    first = data_record(cfg, data)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cached images were read to name them")

    with monkeypatch.context() as mp:
        mp.setattr(progvq.folder.MappedImages, "__getitem__", refuse)
        assert data_record(cfg, data) == first
    assert first["shape"] == [1, 16, 16] and (first["train"], first["heldout"]) == (32, 8)
    # the same pixels in another run's cache are the same data
    again = load_dataset(cfg, 8, cache_dir=here / "other", progress=False)
    assert data_record(cfg, again) == first


def test_data_change_says_what_differs_and_nothing_when_unknown() -> None:
    now = {
        "source": "mnist",
        "path": "data/mnist",
        "shape": [1, 32, 32],
        "train": 9000,
        "heldout": 1000,
        "images": "a" * 40,
        "labels": "b" * 40,
    }
    assert data_change(dict(now), now) is None
    assert data_change(None, now) is None and data_change({"shape": [1]}, now) is None
    assert data_change({**now, "shape": [1, 28, 28]}, now) == "data.path data/mnist: 28x28 images then, 32x32 now"
    assert data_change({**now, "shape": [3, 32, 32]}, now) == (
        "data.path data/mnist: 32x32 colour images then, 32x32 grey now"
    )
    assert data_change({**now, "train": 8000}, now) == (
        "data.path data/mnist: 8000 training and 1000 held-out images then, 9000 and 1000 now"
    )
    assert data_change({**now, "images": "c" * 40}, now) == f"data.path data/mnist: {SAME_SIZE}"
    assert data_change({**now, "labels": "c" * 40}, now) == "data.path data/mnist: the same images with other labels"
    assert data_change({**now, "labels": ""}, now) == "data.path data/mnist: no labels then, labels now"
    # a shape known before the images are read: compared alone
    partial = {"source": "mnist", "path": "data/mnist", "shape": [1, 32, 32]}
    assert data_change({**now, "images": "c" * 40}, partial) is None
    assert data_change({**now, "shape": [1, 28, 28]}, partial) == "data.path data/mnist: 28x28 images then, 32x32 now"
