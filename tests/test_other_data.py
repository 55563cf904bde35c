"""configs/mnist.yaml pointed at another 28x28 data set of 10 classes trains and samples unchanged.

The recipe must not be tuned to digits alone: a data set in MNIST's idx layout (gzipped
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``) with other images and classes goes
through every stage, ``sample`` (unconditional and per class), ``eval`` and ``compress`` with
only ``data.path`` changed (and few steps, to keep the test short). The images here are
procedural shapes at 28x28, light on black for nine classes and dark on white for the tenth, so
the pixels' statistics differ from digits' too (large bright areas, a bright border the canvas
padding does not share).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from progvq.data import make_labelled_shapes
from progvq.hierarchy import Hierarchy
from run_stage import main

from .conftest import ROOT
from .helpers import idx_bytes

MNIST_CONFIG = ROOT / "configs" / "mnist.yaml"
FEW_STEPS = [f"stages.{s}.steps=2" for s in ("1", "2", "prior")]


def _write_other_data(folder: Path, n: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images (n, 28, 28) uint8 and labels (n,) in 0..9, written as gzipped idx files."""
    images, labels = (t.numpy() for t in make_labelled_shapes(n, size=28, seed=3))
    images, labels = images[:, 0].copy(), labels.copy()
    inverted = np.arange(n) % 10 == 9  # the tenth class: dark shapes on white
    images[inverted] = 255 - images[inverted]
    labels[inverted] = 9
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return images, labels


@pytest.mark.trains
def test_mnist_config_trains_and_samples_another_ten_class_data_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = _write_other_data(tmp_path / "other")
    assert sorted(set(labels.tolist())) == list(range(10))
    run = tmp_path / "run"
    sets = [f"data.path={tmp_path / 'other'}", *FEW_STEPS]
    args = ["train", str(MNIST_CONFIG), "--all", "--run-dir", str(run), "--no-progress"]
    assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0

    model = Hierarchy.load(run)
    assert model.prior.num_classes == 10  # the classes come from the labels file, not from the config

    out = tmp_path / "samples.png"
    assert main(["sample", str(run), "-n", "12", "--seed", "0", "--out", str(out)]) == 0
    drawn = np.load(out.with_suffix(".npz"))["images"]
    assert drawn.shape == (12, 28, 28) and drawn.dtype == np.uint8  # the data's own size, not the canvas
    nines = tmp_path / "nines.png"
    assert main(["sample", str(run), "-n", "4", "--label", "9", "--seed", "0", "--out", str(nines)]) == 0
    assert np.load(nines.with_suffix(".npz"))["images"].shape == (4, 28, 28)

    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    bound = report["bits_per_dim"]["total"]
    assert np.isfinite(bound) and bound > 0

    # images of this data set round-trip exactly through the coder of this run (a few: the coder
    # runs its models in float64, a few images a second)
    few, packed, unpacked = tmp_path / "few.npz", tmp_path / "few.pvq", tmp_path / "back.npz"
    np.savez(few, images=images[-6:])
    assert main(["compress", str(run), str(few), "--out", str(packed)]) == 0
    assert main(["decompress", str(run), str(packed), "--out", str(unpacked)]) == 0
    assert np.array_equal(np.load(unpacked)["images"].reshape(-1, 28, 28), images[-6:])
