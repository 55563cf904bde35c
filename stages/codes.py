"""Stage k >= 2: level k-1 codes <-> level k codes, under a uniform prior on level k.

Levels below k are frozen: their codes for the whole data set come from the
pipeline, computed once, never re-encoded per step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from progvq.build import build_level, is_class_conditional
from progvq.config import Config, check_decoder_coverage
from progvq.hierarchy import Hierarchy
from progvq.images import image_grid
from progvq.metrics import level_metrics, psnr

from .common import pairs_grid, quantizer_metrics, uniform_rate
from .prior import require_labels

if TYPE_CHECKING:
    from . import Pipeline


class CodeStage:
    """Trains E_k, C_k and D_k on the frozen level k-1 codes; loss: cross-entropy plus VQ terms.

    With ``decoder: {kind: autoregressive}`` D_k is a PixelCNN trained by teacher forcing: its
    cross-entropy given the true level k-1 codes is the exact -log D_k(z_(k-1) | z_k). With
    ``class_conditional: true`` as well, its batches carry the training images' classes and the
    cross-entropy is -log D_k(z_(k-1) | z_k, y); held-out figures take the held-out classes.
    """

    def __init__(self, cfg: Config, k: int, pipeline: Pipeline) -> None:
        self.name = str(k)
        self.settings = cfg.level(k)
        data, device = pipeline.data, pipeline.device
        self.canvas = data.canvas
        # the config alone may not know the image side (folder, array): check the PixelCNN's reach now
        check_decoder_coverage(cfg, *self.canvas.padded[1:])
        self.train_labels: Tensor | None = None  # (N,) int64 when the decoder takes the class
        self.heldout_labels: Tensor | None = None
        num_classes = 0
        if is_class_conditional(self.settings):
            require_labels(cfg, data, [f"stages.{k}.decoder.class_conditional"])
            num_classes = data.num_classes
            self.train_labels, self.heldout_labels = data.train_labels.to(device), data.heldout_labels.to(device)
        lower = [pipeline.level(j) for j in range(1, k)]
        self.model = build_level(self.settings, data.channels, cfg.level(k - 1).codes, num_classes).to(device)
        # what a loader needs to rebuild the model, recorded rather than guessed from the weights
        self.extra = {"num_classes": self.model.num_classes}
        # the chain used to show reconstructions: frozen levels plus the one in training
        self.chain = Hierarchy(cfg, [*lower, self.model], None, self.canvas)
        self.train_codes, self.heldout_codes = pipeline.codes(k - 1)  # (N, h, w) level k-1 codes
        self.num_train = len(self.train_codes)
        self.preview = data.heldout[:32].to(device)  # (32, C, H, W) at the data's own size
        self.preview_labels = None if self.heldout_labels is None else self.heldout_labels[:32]
        self.rate = uniform_rate(self.chain.grid_shape(k), self.settings.codes, self.canvas.shape)

    def batch(self, index: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Level k-1 codes (B, h, w) int64; with a class-conditional decoder also their classes (B,) int64."""
        if self.train_labels is None:
            return self.train_codes[index]
        return self.train_codes[index], self.train_labels[index]

    def loss(
        self, model: nn.Module, batch: Tensor | tuple[Tensor, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        below, labels = batch if isinstance(batch, tuple) else (batch, None)
        out = model(below) if labels is None else model(below, label=labels)
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
        return self.chain.decode(self.chain.encode(images)[k - 1], k, labels=self.preview_labels)

    def evaluate(self) -> dict[str, float]:
        figures = level_metrics(self.model, self.heldout_codes, labels=self.heldout_labels)
        figures["psnr_through"] = psnr(self.preview.cpu(), self._reconstruct(self.preview).cpu())
        return figures

    def images(self) -> dict[str, Tensor]:
        return {"reconstructions": image_grid(pairs_grid(self.preview, self._reconstruct(self.preview)), nrow=8)}
