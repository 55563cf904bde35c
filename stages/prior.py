"""The prior stage: a gated PixelCNN over the top level's codes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from progvq.config import Config
from progvq.data import ImageData
from progvq.hierarchy import Hierarchy, build_prior, prior_metrics
from progvq.images import image_grid


class PriorStage:
    """Fits p(z_L) by maximum likelihood on the frozen hierarchy's top codes."""

    def __init__(self, cfg: Config, run_dir: Path, data: ImageData, device: torch.device) -> None:
        self.name = "prior"
        self.settings = cfg.prior
        self.model = build_prior(cfg).to(device)
        self.hierarchy = Hierarchy.load(run_dir, with_prior=False, device=device)
        self.hierarchy.prior = self.model  # so samples use the prior being trained
        self.train_codes = self.hierarchy.encode_split(data.train)[-1]  # (N, h, w)
        self.heldout_codes = self.hierarchy.encode_split(data.heldout)[-1]
        self.image_shape = data.image_shape  # (C, H, W)
        self.num_train = len(self.train_codes)
        self.seed = cfg.seed

    def batch(self, index: Tensor) -> Tensor:
        return self.train_codes[index]

    def loss(self, codes: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        nll = F.cross_entropy(self.model(codes), codes)  # nats per code
        return {"nll": nll}, {"bits_per_code": nll.detach() / math.log(2)}

    def evaluate(self) -> dict[str, float]:
        return prior_metrics(self.model, self.heldout_codes)

    def images(self) -> dict[str, Tensor]:
        samples = self.hierarchy.sample(32, seed=self.seed)  # its own generator: no global RNG drawn
        return {"samples": image_grid(samples, nrow=8)}
