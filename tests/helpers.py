"""What several test files share: the tiny config, small models, checkpoint edits, files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from progvq.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from progvq.config import LevelConfig
from progvq.hierarchy import Hierarchy
from progvq.quantize import VQConfig
from run_stage import main

from .conftest import TINY

# --------------------------------------------------------------------------- the tiny config


def tiny_raw() -> dict[str, Any]:
    """configs/tiny.yaml as plain data, to change and write out as a variant."""
    return yaml.safe_load(TINY.read_text())


def train(run_dir: Path, *args: str) -> int:
    """``progvq train configs/tiny.yaml --run-dir RUN_DIR --no-progress ARGS``; its exit status."""
    return main(["train", str(TINY), "--run-dir", str(run_dir), "--no-progress", *args])


# --------------------------------------------------------------------------- small models


def level_config(
    *,
    downsample: int = 2,
    hidden: int = 8,
    res_blocks: int = 1,
    codes: int = 4,
    dim: int = 4,
    **kw: Any,
) -> LevelConfig:
    """A small level's config: a VQ quantiser of ``codes`` vectors of ``dim`` unless ``kw`` gives a ``quantizer``.

    The other ``kw`` (``decoder``, ...) go to :class:`LevelConfig` as they are.
    """
    kw.setdefault("quantizer", VQConfig(codes=codes, dim=dim))
    return LevelConfig(downsample=downsample, hidden=hidden, res_blocks=res_blocks, **kw)


def uniform_prior(model: Hierarchy) -> Hierarchy:
    """``model`` with every prior weight zeroed: logits 0 everywhere, so every top code is drawn uniformly.

    What a few training steps make of a prior differs from one CPU to another (a prior that
    learnt to put nearly all its mass on one code draws the same codes for every seed), so
    tests that need draws to differ build a prior whose draws must. The importance weights
    of a class-conditional prior's candidates are then equal too, and the pick among them
    is uniform.
    """
    assert model.prior is not None
    with torch.no_grad():
        for param in model.prior.parameters():
            param.zero_()
    return model


# --------------------------------------------------------------------------- checkpoints


def write_weights(run_dir: Path, stage: str, module: nn.Module) -> None:
    """Write ``module``'s weights into stage ``stage``'s checkpoint of ``run_dir`` (a copy the test may change).

    The checkpoint goes through ``save_checkpoint``, so its digest holds and it loads; its
    digest changes, so the stages above ``stage`` go stale (the prior has none above it).
    """
    path = checkpoint_path(run_dir, stage)
    ckpt = load_checkpoint(path)
    ckpt["model"] = {key: value.clone() for key, value in module.state_dict().items()}
    save_checkpoint(ckpt, path)


def assert_same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Two state dicts (or a checkpoint's ``model``) hold the same names and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


class Payload:
    """Unpickling this runs a shell command that touches ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- files


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """A uint8 array (N,) or (N, rows, cols) as the bytes of an idx file (the MNIST format).

    ``magic`` defaults to 2049 (labels) for one axis and 2051 (images) for three.
    """
    if magic is None:
        magic = 2049 if array.ndim == 1 else 2051
    header = b"".join(d.to_bytes(4, "big") for d in (magic, *array.shape))
    return header + array.astype(np.uint8).tobytes()
