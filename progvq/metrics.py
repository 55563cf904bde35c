"""Figures of a trained level or prior: PSNR, bits per dim or per code, codebook usage.

Every per-dim figure is over the data's own pixels (see :mod:`progvq.canvas`); bits are
nats / ln 2. The training stages log these same figures, so TensorBoard and ``eval`` agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .canvas import Canvas
from .levels import CodeLevel, Level, PixelLevel
from .nets import to_unit
from .protocols import Prior
from .quantize import code_usage

LN2 = math.log(2.0)


def batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive slices of ``batch_size`` rows of ``x`` (the last may be shorter)."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of 8-bit images from their mean squared error."""
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def psnr(images: Tensor, recon: Tensor) -> float:
    """PSNR in dB over a whole split of uint8 images (one MSE for the split)."""
    return psnr_from_mse((images.float() - recon.float()).pow(2).mean().item())


@torch.no_grad()
def level_metrics(
    level: Level,
    inputs: Tensor,
    batch_size: int = 500,
    *,
    canvas: Canvas | None = None,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """Held-out figures of one level.

    Level 1 (``inputs``: uint8 images (N, C, H, W) of the data's own size, placed on
    ``canvas`` for the level; None: unpadded): ``psnr`` of the decoder mean over the
    original region and ``bits_per_dim`` of the pixels given z_1, the padding's bits
    included, per original dim. Level k >= 2 (``inputs``: level
    k-1 codes): ``accuracy`` of the decoder's most likely code (for an
    autoregressive decoder, given the true codes before it) and
    ``bits_per_code``. Both: ``codes_used`` (count), ``usage`` (fraction of
    the codebook) and ``perplexity`` of the level's codes on this split.

    A class-conditional decoder (``level.num_classes`` > 0) is given the classes ``labels`` (N,)
    int64; without them its ``bits_per_code`` is the level's own marginal over the classes,
    -log mean_y D_k(z_(k-1) | z_k, y) (uniform p(y)), and ``accuracy`` that of the most likely code
    under the classes' mean of the per-position distributions.
    """
    was_training = level.training
    level.eval()
    nll, hits, sq_err, total, all_codes = 0.0, 0, 0.0, 0, []
    device = next(level.parameters()).device
    for start, batch in zip(range(0, len(inputs), batch_size), batches(inputs, batch_size), strict=True):
        batch = batch.to(device)
        if isinstance(level, PixelLevel):
            place = canvas or Canvas.unpadded(tuple(batch.shape[1:]))  # type: ignore[arg-type]
            x = to_unit(place.pad(batch))
            codes = level.encode(x)
            nll -= level.log_likelihood(x, codes).sum().item()
            sq_err += (place.crop(level.decode(codes)).float() - batch.float()).pow(2).sum().item()
        elif level.num_classes and labels is None:
            codes = level.encode(batch)
            nll -= _marginal_log_likelihood(level, batch, codes).sum().item()
            hits += (_mixture_log_probs(level, batch, codes).argmax(1) == batch).sum().item()
        else:
            codes = level.encode(batch)
            y = None if labels is None else labels[start : start + len(batch)].to(device)
            logits = level.logits(codes, batch, y)  # an autoregressive decoder's are teacher-forced
            nll += F.cross_entropy(logits, batch, reduction="sum").item()
            hits += (logits.argmax(1) == batch).sum().item()
        total += batch[0].numel() * len(batch)  # the original pixels (or codes) of the batch
        all_codes.append(codes)
    level.train(was_training)
    perplexity, used = code_usage(torch.cat(all_codes), level.quantizer.num_codes)
    out: dict[str, float] = {}
    if isinstance(level, PixelLevel):
        out["psnr"] = psnr_from_mse(sq_err / total)
        out["bits_per_dim"] = nll / total / LN2
    else:
        out["accuracy"] = hits / total
        out["bits_per_code"] = nll / total / LN2
    out["codes_used"] = float(used)
    out["usage"] = used / level.quantizer.num_codes
    out["perplexity"] = float(perplexity)
    return out


def _marginal_log_likelihood(level: CodeLevel, below: Tensor, codes: Tensor) -> Tensor:
    """(B,) nats of level k-1 codes (B, h, w) under a class-conditional decoder's marginal over its classes."""
    per_class = level.log_likelihood_per_class(below, codes).double()  # (B, classes)
    return torch.logsumexp(per_class, dim=1) - math.log(level.num_classes)


def _mixture_log_probs(level: CodeLevel, below: Tensor, codes: Tensor) -> Tensor:
    """(B, K_(k-1), h, w): log of the classes' mean of a class-conditional decoder's teacher-forced
    per-position distributions (for a code accuracy without the class)."""
    per_class = [
        F.log_softmax(level.logits(codes, below, torch.full_like(below[:, 0, 0], y)).double(), dim=1)
        for y in range(level.num_classes)
    ]
    return torch.logsumexp(torch.stack(per_class), dim=0) - math.log(level.num_classes)


@torch.no_grad()
def prior_metrics(prior: Prior, codes: Tensor, batch_size: int = 500, labels: Tensor | None = None) -> dict[str, float]:
    """``bits_per_code`` of top-level codes (N, h, w) under the prior (eval mode).

    For a class-conditional prior it is the marginal over the classes; with
    ``labels`` (N,) ``bits_per_code_given_label`` adds the conditional figure.
    """
    was_training = prior.training
    prior.eval()
    device = next(prior.parameters()).device

    def bits(with_labels: bool) -> float:
        total = 0.0
        for i in range(0, len(codes), batch_size):
            batch = codes[i : i + batch_size].to(device)
            y = labels[i : i + batch_size].to(device) if with_labels and labels is not None else None
            total -= prior.log_prob(batch, y).sum().item()
        return total / codes.numel() / LN2

    out = {"bits_per_code": bits(False)}
    if prior.num_classes and labels is not None:
        out["bits_per_code_given_label"] = bits(True)
    prior.train(was_training)
    return out
