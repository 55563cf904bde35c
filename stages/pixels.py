"""Stage 1: pixels <-> level-1 codes, under a uniform prior on the codes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from progvq.build import build_level
from progvq.config import Config
from progvq.data import ImageData, on_canvas
from progvq.images import image_grid
from progvq.metrics import level_metrics
from progvq.nets import to_unit

from .common import pairs_grid, quantizer_metrics, uniform_rate


class PixelStage:
    """Trains E_1, C_1 and D_1 on images; the loss is the pixels' NLL plus VQ terms."""

    def __init__(self, cfg: Config, data: ImageData, device: torch.device) -> None:
        self.name = "1"
        self.settings = cfg.level(1)
        # channels_last: oneDNN's convolutions run 15-20% faster on CPU in that layout
        self.model = build_level(self.settings, data.channels, 0).to(device, memory_format=torch.channels_last)
        self.canvas = data.canvas
        # padded once here, so a batch is a single gather: (N, C, H', W') uint8 (a memory-mapped
        # image folder stays on disk, and each batch comes out of it padded)
        self.train_images = on_canvas(data.train, self.canvas, device)
        self.heldout = data.heldout  # (N, C, H, W) at the data's own size
        self.num_train = len(data.train)
        self.preview = data.heldout[:32].to(device)
        _, h, w = self.canvas.padded
        grid = (h // self.settings.downsample, w // self.settings.downsample)
        self.rate = uniform_rate(grid, self.settings.codes, self.canvas.shape)

    def batch(self, index: Tensor) -> Tensor:
        # (B, C, H, W) in [-1, 1]
        return to_unit(self.train_images[index]).contiguous(memory_format=torch.channels_last)

    def loss(self, model: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out = model(x)
        # the objective is per padded dim (its scale sets the balance with the VQ terms);
        # the reported figure is per dim of the data's own image
        recon = out.nll.mean() / out.dims
        parts = {
            "recon": recon,
            "codebook": out.quant.codebook_loss,
            "commit": out.quant.commit_loss,
            # the likelihood trains the location little where the scale is large (uncertain
            # stroke edges); squared error there pulls it towards the mean, which PSNR rewards
            "mse": F.mse_loss(out.prediction.float(), x.float()),
        }
        bits = out.nll.detach().mean() / (self.canvas.dims * math.log(2))
        metrics = {"bits_per_dim": bits, "rate_bits_per_dim": torch.tensor(self.rate)}
        return parts, metrics | quantizer_metrics(out.quant)

    def evaluate(self) -> dict[str, float]:
        return level_metrics(self.model, self.heldout, canvas=self.canvas)

    @torch.no_grad()
    def images(self) -> dict[str, Tensor]:
        recon = self.canvas.crop(self.model.decode(self.model.encode(to_unit(self.canvas.pad(self.preview)))))
        return {"reconstructions": image_grid(pairs_grid(self.preview, recon), nrow=8)}
