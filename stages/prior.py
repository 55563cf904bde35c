"""The prior stage: an autoregressive model of the top level's codes, optionally given the class."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from progvq.build import build_prior, is_class_conditional
from progvq.config import Config
from progvq.errors import DataError
from progvq.hierarchy import Hierarchy
from progvq.images import image_grid
from progvq.metrics import prior_metrics
from progvq.pixelcnn import code_log_prob

if TYPE_CHECKING:
    from progvq.data import ImageData

    from . import Pipeline


class PriorStage:
    """Fits p(z_L), or p(z_L | y) with ``class_conditional``, by maximum likelihood on the frozen
    hierarchy's top codes."""

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.name = "prior"
        self.settings = cfg.prior
        data, device = pipeline.data, pipeline.device
        self.train_labels: Tensor | None = None  # (N,) int64 when class-conditional
        self.heldout_labels: Tensor | None = None
        num_classes = 0
        if cfg.prior.class_conditional:
            require_labels(cfg, data, ["stages.prior.class_conditional"])
            num_classes = data.num_classes
            self.train_labels, self.heldout_labels = data.train_labels.to(device), data.heldout_labels
        self.model = build_prior(cfg, num_classes).to(device)
        # what a loader needs to rebuild the model, recorded rather than guessed from the weights
        self.extra = {"num_classes": self.model.num_classes}
        self.canvas = data.canvas
        levels = [pipeline.level(k) for k in range(1, cfg.num_levels + 1)]
        self.hierarchy = Hierarchy(cfg, levels, self.model, self.canvas)  # samples use the prior being trained
        self.train_codes, self.heldout_codes = pipeline.codes(cfg.num_levels)  # (N, h, w) each
        if cfg.prior.shifts:
            # the shifted images' codes follow the originals; their labels are their originals'
            shifted, index = pipeline.shifted_codes(cfg.num_levels, cfg.prior.shifts)
            self.train_codes = torch.cat([self.train_codes, shifted.to(self.train_codes.device)])
            if self.train_labels is not None:
                labels = self.train_labels
                self.train_labels = torch.cat([labels, labels[index.to(labels.device)]])
        self.num_train = len(self.train_codes)
        self.seed = cfg.seed

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor | None]:
        """Top codes (B, h, w) int64 and their classes (B,) int64 (None when unconditional)."""
        return self.train_codes[index], None if self.train_labels is None else self.train_labels[index]

    def loss(
        self, model: nn.Module, batch: tuple[Tensor, Tensor | None]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        codes, labels = batch
        nll = -code_log_prob(model(codes, label=labels), codes).mean()  # nats per code
        return {"nll": nll}, {"bits_per_code": nll.detach() / math.log(2)}

    def evaluate(self) -> dict[str, float]:
        return prior_metrics(self.model, self.heldout_codes, labels=self.heldout_labels)

    def images(self) -> dict[str, Tensor]:
        # its own generator: no global RNG drawn; a class-conditional prior cycles the classes
        samples = self.hierarchy.sample(32, seed=self.seed)
        nrow = self.hierarchy.num_classes or 8  # one class per column
        return {"samples": image_grid(samples, nrow=nrow)}


def label_keys(cfg: Config) -> list[str]:
    """The config keys that make a stage read the data's labels: a class-conditional prior's and every
    class-conditional code decoder's."""
    keys = [
        f"stages.{k}.decoder.class_conditional"
        for k in range(2, cfg.num_levels + 1)
        if is_class_conditional(cfg.level(k))
    ]
    return keys + (["stages.prior.class_conditional"] if cfg.prior.class_conditional else [])


def uses_labels(cfg: Config, name: str) -> bool:
    """Whether stage ``name`` trains on the data's labels (its checkpoint's data record then keeps them)."""
    if name == "prior":
        return cfg.prior.class_conditional
    return name != "1" and is_class_conditional(cfg.level(int(name)))


def require_labels(cfg: Config, data: ImageData, keys: list[str] | None = None) -> None:
    """Refuse a stage given the class (``keys``: those of :func:`label_keys`, by default all of them) on data
    without labels (checked before any stage trains)."""
    keys = label_keys(cfg) if keys is None else keys
    if keys and (data.train_labels is None or data.heldout_labels is None):
        # the config allows only labelled sources; an idx folder may still lack its labels file, and an
        # image folder its class folders
        where = (
            "no class folders (each class's images in a folder of its own)"
            if cfg.data.source == "folder"
            else f"no labels ({cfg.data.prefix}-labels-idx1-ubyte[.gz]) beside the images"
        )
        raise DataError(f"{cfg.data.path}: {where}, but {keys[0]} is true")
