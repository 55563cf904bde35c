"""Class-conditional autoregressive code decoders: D_K(z_(K-1) | z_K, y) beside a class-conditional prior."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from progvq.build import build_level
from progvq.checkpoint import checkpoint_path
from progvq.codec import Codec
from progvq.data import load_dataset
from progvq.errors import RunError
from progvq.hierarchy import Hierarchy
from progvq.levels import AutoregressiveCodeLevel, AutoregressiveConfig
from progvq.metrics import LN2
from progvq.pixelcnn import PixelCNNConfig
from progvq.run import Run
from run_stage import main

from .conftest import MNIST_DIR, ROOT, TINY_CONDITIONAL
from .helpers import level_config

OLD_RUN = ROOT / "tests" / "data" / "run-0.1"

#: the tiny MNIST run with its level-2 decoder given the class, trained a few steps per stage
SETTINGS = [
    f"data.path={MNIST_DIR}",
    "stages.2.decoder.class_conditional=true",
    "stages.1.steps=8",
    "stages.1.eval_every=8",
    "stages.1.checkpoint_every=8",
    "stages.2.steps=4",
    "stages.2.eval_every=4",
    "stages.2.checkpoint_every=4",
    "stages.prior.steps=3",
]


def _train(run: Path, *settings: str) -> int:
    args = ["train", str(TINY_CONDITIONAL), "--all", "--run-dir", str(run), "--no-progress"]
    for setting in [*SETTINGS, *settings]:
        args += ["--set", setting]
    return main(args)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run (read-only)."""
    if not MNIST_DIR.exists():
        pytest.skip("no MNIST")
    path = tmp_path_factory.mktemp("conditional_levels") / "run"
    assert _train(path) == 0
    return path


@pytest.fixture(scope="module")
def model(run: Path) -> Hierarchy:
    return Hierarchy.load(run)


@pytest.fixture(scope="module")
def heldout(model: Hierarchy, run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """16 held-out images (16, 1, 28, 28) uint8 and their classes (16,)."""
    data = load_dataset(model.config.data, model.config.total_downsample())
    return data.heldout[:16], data.heldout_labels[:16]


def _one_line_refusal(capsys: pytest.CaptureFixture[str], status: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("progvq: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


# --------------------------------------------------------------------------- the bound


def test_unlabelled_bound_is_the_joint_marginal_over_classes(
    model: Hierarchy, heldout: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Without labels: -log mean_y [p(z_2 | y) D_2(z_1 | z_2, y)], computed by hand, plus the pixels' bits;
    and the exact relations it has with the bound given the class."""
    images, labels = heldout
    assert model.conditional_levels == [2] and model.num_classes == 10
    codes = model.encode(images)
    x_nats = -model.levels[0].log_likelihood(model.canvas.pad(images).float() / 127.5 - 1, codes[0]).double()
    per_class = torch.stack(
        [
            model.prior.log_prob(codes[1], torch.full((16,), y)).double()
            + model.levels[1].log_likelihood(codes[0], codes[1], torch.full((16,), y)).double()
            for y in range(10)
        ],
        dim=1,
    )  # (16, 10): log p(z_2 | y) + log D_2(z_1 | z_2, y)
    dims = model.canvas.dims
    joint = (x_nats - (torch.logsumexp(per_class, 1) - math.log(10))) / (dims * LN2)
    given = (x_nats[:, None] - per_class) / (dims * LN2)  # (16, 10): the bound given each class

    marginal = model.nll(images)
    labelled = model.nll(images, labels=labels)
    assert torch.allclose(marginal["total"].double(), joint, rtol=0, atol=1e-5)
    assert torch.allclose(labelled["total"].double(), given[torch.arange(16), labels], rtol=0, atol=1e-5)
    # the parts add up to the total, and the pixels' part is the same either way
    assert torch.allclose(sum(marginal[k].double() for k in ("0", "1", "2")), marginal["total"].double(), atol=1e-6)
    assert torch.equal(marginal["0"], labelled["0"])
    # -log mean_y q_y lies between -log max_y q_y and -log q_y + log 10 for every y, and below mean_y -log q_y
    slack = 1e-5
    assert (marginal["total"].double() <= labelled["total"].double() + math.log2(10) / dims + slack).all()
    assert (marginal["total"].double() <= given.min(1).values + math.log2(10) / dims + slack).all()
    assert (marginal["total"].double() >= given.min(1).values - slack).all()
    assert (marginal["total"].double() <= given.mean(1) + slack).all()
    # the prior's part is its own marginal; level 2's is the rest of the joint marginal
    assert torch.allclose(marginal["2"].double(), -model.prior.log_prob(codes[1]).double() / (dims * LN2), atol=1e-5)
    # mean_bits and evaluate report the same bound
    bits = model.mean_bits(images, batch_size=5)
    assert bits["total"] == pytest.approx(float(marginal["total"].mean()), abs=1e-5)
    assert model.mean_bits(images, labels=labels)["total"] == pytest.approx(float(labelled["total"].mean()), abs=1e-5)
    report = model.evaluate(images, batch_size=7, labels=labels)
    assert report["bits_per_dim"]["total"] == pytest.approx(bits["total"], abs=1e-5)
    # the level's held-out figure is given the class: its bits are level 2's labelled share
    level_bits = report["levels"]["2"]["bits_per_code"] * codes[0][0].numel()
    assert level_bits == pytest.approx(float(labelled["1"].mean()) * dims, rel=1e-4)


def test_decoding_needs_the_class(model: Hierarchy) -> None:
    top = torch.zeros(2, *model.grid_shape(2), dtype=torch.long)
    with pytest.raises(RunError, match=r"level 2's decoder is class-conditional"):
        model.decode(top, 2)
    with pytest.raises(RunError, match="out of range"):
        model.decode(top, 2, labels=torch.tensor([0, 10]))


# --------------------------------------------------------------------------- sampling


def _force_level_label(level: AutoregressiveCodeLevel, scale: float = 50.0) -> None:
    """Make the decoder draw code y % K below for class y at every position: every weight of its PixelCNN
    zeroed but the path from the label bias of the last block to that code's logit (see
    tests/test_conditional.py's prior of the same form)."""
    net = level.pixelcnn
    k, c = net.num_codes, net.embed.embedding_dim
    assert c >= k
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        block = net.blocks[-1]
        for y in range(net.num_classes):
            block.label_bias.weight[y, 2 * c + y % k] = 20.0
            block.label_bias.weight[y, 3 * c :] = 20.0
        block.skip.weight.copy_(torch.eye(c)[:, :, None, None])
        net.head[1].weight.copy_(torch.eye(c)[:, :, None, None])
        net.head[3].weight[:, :k, 0, 0] = scale * torch.eye(k)


def test_samples_are_deterministic_and_take_each_images_class(run: Path) -> None:
    model = Hierarchy.load(run)
    a = model.sample(6, seed=5, label=torch.tensor([0, 1, 2, 3, 4, 5]))
    assert torch.equal(a, model.sample(6, seed=5, label=torch.tensor([0, 1, 2, 3, 4, 5])))
    _force_level_label(model.levels[1])
    k = model.levels[1].codes_below
    top = torch.zeros(10, *model.grid_shape(2), dtype=torch.long)
    labels = torch.arange(10)
    _, codes = model.decode(top, 2, code_temperature=1.0, labels=labels, all_levels=True)
    assert torch.equal(codes[0], (labels % k)[:, None, None].expand_as(codes[0]))
    # sample hands the class the prior drew for to the decoder: its level-1 codes are that class's code
    seen: dict[str, Any] = {}
    sampler = model.levels[1].pixelcnn.sample

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.update(kwargs)
        return sampler(*args, **kwargs)

    model.levels[1].pixelcnn.sample = spy  # type: ignore[method-assign]
    one = model.sample(4, seed=1, label=3, guidance=0.5)
    assert torch.equal(seen["label"], torch.full((4,), 3)) and seen["guidance"] == 0.5
    assert torch.equal(one, model.sample(4, seed=1, label=3, guidance=0.5))
    threes, sevens = model.sample(4, seed=1, label=3), model.sample(4, seed=1, label=7)
    assert torch.equal(threes, model.sample(4, seed=1, label=3))
    assert not torch.equal(threes, sevens)


# --------------------------------------------------------------------------- compression


def test_compress_round_trips_exactly(run: Path, heldout: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = heldout
    codec = Codec(run)
    back = codec.decompress(codec.compress(images[:6]))
    assert torch.equal(back.images, images[:6])
    # the class coded first is the one under which the prior's and the decoder's codes are likeliest together
    assert back.labels is not None
    assert torch.equal(back.labels, codec.coder_model.infer_labels(codec.model.encode(images[:6])))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        (
            ["stages.2.decoder={kind: factorised, class_conditional: true}"],
            ("stages.2.decoder.class_conditional", "only kind autoregressive takes it"),
        ),
        (
            ["stages.1.decoder={kind: autoregressive, class_conditional: true}"],
            ("stages.1.decoder.kind", "level 1 decodes pixels"),
        ),
        (
            ["stages.1.decoder={kind: pixelcnn, class_conditional: true}"],
            ("stages.1.decoder.class_conditional", "only kind autoregressive takes it"),
        ),
        (
            ["stages.prior.class_conditional=false"],
            ("stages.2.decoder.class_conditional", "unless the prior is class-conditional"),
        ),
        (
            ["data.source=array", "data.path=images.npy"],
            ("stages.2.decoder.class_conditional", "which has no labels"),
        ),
    ],
)
def test_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: list[str], needles: tuple[str, ...]
) -> None:
    status = _train(tmp_path / "run", *settings)
    _one_line_refusal(capsys, status, *needles)
    assert not (tmp_path / "run").exists()


def test_refused_on_an_idx_folder_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not MNIST_DIR.exists():
        pytest.skip("no MNIST")
    folder = tmp_path / "mnist"
    folder.mkdir()
    shutil.copy(MNIST_DIR / "t10k-images-idx3-ubyte.gz", folder)
    status = _train(tmp_path / "run", f"data.path={folder}")
    _one_line_refusal(capsys, status, "no labels", "stages.2.decoder.class_conditional is true")


# --------------------------------------------------------------------------- checkpoints and the command line


def test_checkpoint_records_the_classes_and_the_level_rebuilds_from_the_folder(run: Path, tmp_path: Path) -> None:
    ckpt = torch.load(checkpoint_path(run, "2"), weights_only=True)
    assert ckpt["extra"]["num_classes"] == 10
    assert ckpt["extra"]["data"]["labels"]  # other labels are other data for this stage
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    level = Run(copy).level(2)  # the data is not read: the count comes from the checkpoint
    assert isinstance(level, AutoregressiveCodeLevel) and level.num_classes == 10
    # runs made before decoders took the class load as they were
    old = Hierarchy.load(OLD_RUN, allow_stale=True)
    assert old.conditional_levels == []


def test_decode_command_takes_the_files_labels_or_label(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], heldout: tuple[torch.Tensor, torch.Tensor]
) -> None:
    codes = tmp_path / "codes.npz"
    assert main(["encode", str(run), "--split", "heldout", "--out", str(codes)]) == 0
    assert main(["decode", str(run), str(codes), "--out", str(tmp_path / "a.png")]) == 0
    with np.load(codes) as arrays:
        unlabelled = {k: arrays[k] for k in arrays.files if k != "labels"}
    bare = tmp_path / "bare.npz"
    np.savez(bare, **unlabelled)
    capsys.readouterr()
    status = main(["decode", str(run), str(bare), "--out", str(tmp_path / "b.png")])
    _one_line_refusal(capsys, status, "no labels", "--label")
    assert main(["decode", str(run), str(bare), "--label", "4", "--out", str(tmp_path / "c.png")]) == 0
    status = main(["decode", str(run), str(bare), "--level", "1", "--label", "4", "--out", str(tmp_path / "d.png")])
    _one_line_refusal(capsys, status, "--label 4", "no decoder below level 1")


# --------------------------------------------------------------------------- the decoder itself


def test_the_masked_pixelcnn_stays_causal_with_the_label() -> None:
    """Changing a later code never changes an earlier position's logits, whatever the class; the class does."""
    torch.manual_seed(0)
    cfg = level_config(decoder=AutoregressiveConfig(PixelCNNConfig(channels=8, layers=3, kernel_size=3), True))
    level = build_level(cfg, 1, 5, num_classes=3).double().eval()
    assert isinstance(level, AutoregressiveCodeLevel) and level.num_classes == 3
    below = torch.randint(0, 5, (3, 4, 4))
    codes = torch.randint(0, 4, (3, 2, 2))
    labels = torch.tensor([0, 1, 2])
    logits = level.logits(codes, below, labels)
    for i in range(4):
        for j in range(4):
            changed = below.clone()
            changed[:, i, j] = (changed[:, i, j] + 1) % 5
            after = level.logits(codes, changed, labels)
            flat = i * 4 + j
            same = logits.flatten(2)[:, :, : flat + 1]  # positions up to (i, j) in raster order
            assert torch.equal(same, after.flatten(2)[:, :, : flat + 1])
    assert not torch.allclose(logits, level.logits(codes, below, torch.tensor([1, 2, 0])))
    # the per-class likelihoods are the labelled ones, class by class
    per_class = level.log_likelihood_per_class(below, codes)
    for y in range(3):
        assert torch.allclose(per_class[:, y], level.log_likelihood(below, codes, torch.full((3,), y)))
    with pytest.raises(ValueError):
        build_level(cfg, 1, 5)  # a class-conditional decoder needs its classes
