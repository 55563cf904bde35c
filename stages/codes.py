"""Stage k >= 2: level k-1 codes <-> level k codes, under a uniform prior on level k.

Levels below k are frozen: their codes for the whole data set are computed
once here and served from memory, never re-encoded per step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from progvq.config import Config, check_decoder_coverage
from progvq.data import ImageData
from progvq.hierarchy import Hierarchy, level_metrics, load_level, psnr
from progvq.images import image_grid
from progvq.levels import build_level

from .common import pairs_grid, quantizer_metrics, uniform_rate


class CodeStage:
    """Trains E_k, C_k and D_k on the frozen level k-1 codes; loss: cross-entropy plus VQ terms.

    With ``decoder: autoregressive`` D_k is a PixelCNN trained by teacher forcing: its
    cross-entropy given the true level k-1 codes is the exact -log D_k(z_(k-1) | z_k).
    """

    def __init__(self, cfg: Config, k: int, run_dir: Path, data: ImageData, device: torch.device) -> None:
        self.name = str(k)
        self.settings = cfg.level(k)
        # the config alone may not know the image side (folder, array): check the PixelCNN's reach now
        self.canvas = data.canvas
        check_decoder_coverage(cfg, *self.canvas.padded[1:])
        lower = [load_level(run_dir, j, device)[0] for j in range(1, k)]
        self.model = build_level(self.settings, k, data.channels, cfg.level(k - 1).codes).to(device)
        # the chain used to show reconstructions: frozen levels plus the one in training
        self.chain = Hierarchy(cfg, [*lower, self.model], None, self.canvas)
        frozen = Hierarchy(cfg, lower, None, self.canvas)
        self.train_codes = frozen.encode_split(data.train)[-1]  # (N, h, w) level k-1 codes
        self.heldout_codes = frozen.encode_split(data.heldout)[-1]
        self.num_train = len(self.train_codes)
        self.preview = data.heldout[:32].to(device)  # (32, C, H, W) at the data's own size
        self.rate = uniform_rate(self.chain.grid_shape(k), self.settings.codes, self.canvas.shape)

    def batch(self, index: Tensor) -> Tensor:
        return self.train_codes[index]  # (B, h, w) int64

    def loss(self, below: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out = self.model(below)
        recon = out.nll.mean() / out.dims  # nats per code of level k-1
        parts = {"recon": recon, "codebook": out.quant.codebook_loss, "commit": out.quant.commit_loss}
        metrics = {
            "bits_per_code": recon.detach() / math.log(2),
            "accuracy": (out.prediction == below).float().mean(),
            "rate_bits_per_dim": torch.tensor(self.rate),
        }
        return parts, metrics | quantizer_metrics(out.quant)

    @torch.no_grad()
    def _reconstruct(self, images: Tensor) -> Tensor:
        k = int(self.name)
        return self.chain.decode(self.chain.encode(images)[k - 1], k)

    def evaluate(self) -> dict[str, float]:
        figures = level_metrics(self.model, self.heldout_codes)
        figures["psnr_through"] = psnr(self.preview.cpu(), self._reconstruct(self.preview).cpu())
        return figures

    def images(self) -> dict[str, Tensor]:
        return {"reconstructions": image_grid(pairs_grid(self.preview, self._reconstruct(self.preview)), nrow=8)}
