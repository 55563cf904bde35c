"""Shared fixtures: the tiny config and a run trained on it once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from progvq.datasets import SHIPPED_MNIST
from run_stage import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
#: MNIST's published test set (the t10k idx files and their SHA256SUMS) kept beside the project
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
#: the t10k files the tests train and read: the shared folder where there is one, else the package's
#: own copy of the same published files, so that a fresh clone anywhere runs every MNIST test
MNIST_DIR = SHARED_MNIST if SHARED_MNIST.is_dir() else SHIPPED_MNIST


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # tiny tensors gain nothing from a second thread, and spinning threads slow a busy machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with every stage of configs/tiny.yaml trained (read-only for tests)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", str(TINY), "--all", "--run-dir", str(run), "--no-progress"]) == 0
    return run


@pytest.fixture
def tiny_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained tiny run that a test may change."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest)
    return dest


TINY_CONDITIONAL = ROOT / "configs" / "tiny-conditional.yaml"


@pytest.fixture(scope="session")
def tiny_conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny-conditional.yaml trained (MNIST, autoregressive level 2, class-conditional prior); read-only."""
    if not MNIST_DIR.exists():
        pytest.skip("no ../shared/data/mnist")
    run = tmp_path_factory.mktemp("tiny_conditional") / "run"
    args = ["train", str(TINY_CONDITIONAL), "--all", "--run-dir", str(run), "--no-progress"]
    args += ["--set", f"data.path={MNIST_DIR}"]
    assert main(args) == 0
    return run
