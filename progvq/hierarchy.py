"""A trained hierarchy: encode, decode, sample, likelihood bound, evaluation.

This needs the library alone: every model is rebuilt from the config saved in
its own checkpoint, so a run directory is all a user has to keep.

Levels are numbered from the data up: ``levels[0]`` is level 1 (pixels <->
z_1), ``levels[L-1]`` level L; the prior models z_L.

A class-conditional prior (``stages.prior.class_conditional``) models
p(z_L | y) for a class y of ``num_classes``; sampling takes the class, and the
likelihood bound uses the marginal p(z_L) = mean_y p(z_L | y) (uniform over
the classes), so its figures compare with an unconditional prior's.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .canvas import Canvas
from .checkpoint import checkpoint_path, load_latest
from .config import Config, config_from_dict
from .errors import RunError
from .levels import CodeLevel, Level, PixelLevel, build_level
from .nets import to_unit
from .pixelcnn import GatedPixelCNN
from .quantize import code_usage
from .run import check_not_stale, read_run_config

LN2 = math.log(2.0)


def build_prior(cfg: Config, num_classes: int = 0) -> GatedPixelCNN:
    """The prior stage's model for config ``cfg``; ``num_classes`` > 0 for a class-conditional prior."""
    p = cfg.prior
    return GatedPixelCNN(
        cfg.level(cfg.num_levels).codes,
        channels=p.channels,
        layers=p.layers,
        kernel_size=p.kernel_size,
        dropout=p.dropout,
        num_classes=num_classes if p.class_conditional else 0,
    )


#: The state-dict entry whose rows are a class-conditional prior's classes.
_LABEL_WEIGHT = "blocks.0.label_bias.weight"


def _prior_classes(ckpt: dict[str, Any], cfg: Config, path: Path) -> int:
    """How many classes a prior checkpoint was trained with (0: unconditional).

    The count comes from the data (its labels), not the config, so it is read
    back from the weights: the label embedding has one row per class.
    """
    if not cfg.prior.class_conditional:
        return 0
    weight = ckpt["model"].get(_LABEL_WEIGHT) if isinstance(ckpt.get("model"), dict) else None
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise RunError(f"{path}: weights do not fit its config (a class-conditional prior without {_LABEL_WEIGHT})")
    return int(weight.shape[0])


def _batches(x: Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def _load(run_dir: Path, name: str, device: str | torch.device) -> dict[str, Any]:
    """Stage ``name``'s newest good checkpoint, which must have reached its last step."""
    path = checkpoint_path(run_dir, name)
    found = load_latest(path, map_location=device)
    if found is None:
        raise RunError(f"{run_dir}: stage {name} is not trained (no {path.name} in {path.parent.name}/)")
    ckpt = found.checkpoint
    why = f" ({found.problems[0]}; {found.path.name} is the newest good one)" if found.fell_back else ""
    if int(ckpt["step"]) < int(ckpt["steps"]):
        raise RunError(f"{path}: stage {name} is unfinished (step {ckpt['step']} of {ckpt['steps']}){why}; train it to the end first")
    if why:
        warnings.warn(f"stage {name}: using {found.path}{why}", stacklevel=3)
    return ckpt


def _restore(model: nn.Module, ckpt: dict[str, Any], path: Path, device: str | torch.device) -> None:
    """Load a checkpoint's weights into ``model`` and freeze it (eval mode, no gradients)."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise RunError(f"{path}: weights do not fit its config ({str(err).splitlines()[0][:160]})") from None
    model.to(device).eval().requires_grad_(False)


def canvas_of(ckpt: dict[str, Any], where: str | Path) -> Canvas:
    """The canvas a checkpoint's stage was trained on (its ``extra``: the original and the padded shape).

    Checkpoints written before the original shape was recorded hold the padded one
    alone; their figures are then over the padded image, and a warning says so.
    """
    extra = ckpt.get("extra", {})
    padded = tuple(int(v) for v in extra["image_shape"])
    if "original_shape" not in extra:
        warnings.warn(f"{where}: its checkpoints predate the recording of the data's own size; figures are over the padded image", stacklevel=3)
        return Canvas.unpadded(padded)  # type: ignore[arg-type]
    return Canvas(tuple(int(v) for v in extra["original_shape"]), padded)  # type: ignore[arg-type]


def load_level(run_dir: str | Path, k: int, device: str | torch.device = "cpu") -> tuple[Level, dict[str, Any]]:
    """Level ``k``'s trained model (eval mode, frozen) and its checkpoint."""
    ckpt = _load(Path(run_dir), str(k), device)
    cfg = config_from_dict(ckpt["config"])
    below = cfg.level(k - 1).codes if k > 1 else 0
    model = build_level(cfg.level(k), k, cfg.data.channels, below)
    _restore(model, ckpt, checkpoint_path(run_dir, str(k)), device)
    return model, ckpt


class Hierarchy(nn.Module):
    """Levels 1..L (and, when trained, the prior) of one run."""

    def __init__(self, config: Config, levels: list[Level], prior: GatedPixelCNN | None, canvas: Canvas) -> None:
        super().__init__()
        self.config = config
        self.levels = nn.ModuleList(levels)
        self.prior = prior
        # images in and out are at the data's own size; the levels see them on this canvas
        self.canvas = canvas
        # stage -> {"precision", "hardware"} it was trained with (checkpoints that record it)
        self.trained_with: dict[str, dict[str, str]] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the data's own images: what :meth:`encode` takes and :meth:`sample` gives."""
        return self.canvas.shape

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        *,
        num_levels: int | None = None,
        with_prior: bool = True,
        device: str | torch.device = "cpu",
        allow_stale: bool = False,
    ) -> Hierarchy:
        """Load a run's trained levels 1..num_levels (default: all) and its prior.

        Refuses (:class:`RunError`) a hierarchy with a stale part, one trained
        on a lower stage that has since been retrained, unless ``allow_stale``.
        """
        run_dir = Path(run_dir)
        cfg = read_run_config(run_dir)
        num_levels = cfg.num_levels if num_levels is None else num_levels
        check_not_stale(run_dir, allow_stale=allow_stale, upto="prior" if with_prior else str(num_levels))
        levels, ckpt, trained_with = [], None, {}
        for k in range(1, num_levels + 1):
            level, ckpt = load_level(run_dir, k, device)
            levels.append(level)
            trained_with[str(k)] = ckpt.get("trained_with")
        prior = None
        if with_prior:
            ckpt = _load(run_dir, "prior", device)
            prior_cfg = config_from_dict(ckpt["config"])
            path = checkpoint_path(run_dir, "prior")
            prior = build_prior(prior_cfg, _prior_classes(ckpt, prior_cfg, path))
            _restore(prior, ckpt, path, device)
            trained_with["prior"] = ckpt.get("trained_with")
        canvas = canvas_of(ckpt, run_dir) if ckpt is not None else Canvas.unpadded((cfg.data.channels, 0, 0))
        model = cls(cfg, levels, prior, canvas)
        model.trained_with = {name: dict(info) for name, info in trained_with.items() if isinstance(info, dict)}
        return model

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional prior; 0 when the prior is unconditional or absent."""
        return self.prior.num_classes if self.prior is not None else 0

    def labels_for(self, n: int, label: int | Tensor | None) -> Tensor | None:
        """The (n,) int64 class labels the prior needs for ``n`` samples, or None for an unconditional prior.

        ``label`` is one class for all, (n,) classes, or None: for a class-conditional prior
        the classes then cycle 0, 1, ..., so a grid of ``num_classes`` columns shows one class
        per column. Raises :class:`RunError` for a label the prior cannot take.
        """
        classes = self.num_classes
        if not classes:
            if label is not None:
                raise RunError("a label was given but this run's prior is not class-conditional (stages.prior.class_conditional: false)")
            return None
        if label is None:
            return torch.arange(n, device=self.device) % classes
        labels = torch.as_tensor(label, dtype=torch.long, device=self.device)
        labels = labels.expand(n).clone() if labels.dim() == 0 else labels
        if labels.shape != (n,):
            raise RunError(f"labels must be one class or {n} classes, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            bad = int(labels[(labels < 0) | (labels >= classes)][0])
            raise RunError(f"label {bad} is out of range: this run's prior has classes 0..{classes - 1}")
        return labels

    @property
    def device(self) -> torch.device:
        return next(self.levels[0].parameters()).device

    def grid_shape(self, k: int) -> tuple[int, int]:
        """(h, w) of level ``k``'s code grid (level 0 is the padded image)."""
        _, h, w = self.canvas.padded
        for level in self.levels[:k]:
            h, w = h // level.factor, w // level.factor
        return h, w

    # ------------------------------------------------------------------ encode / decode

    @torch.no_grad()
    def encode(self, images: Tensor) -> list[Tensor]:
        """uint8 images (B, C, H, W) of the data's own size -> codes [z_1 (B, h1, w1), ..., z_L]."""
        x = to_unit(self.canvas.pad(images.to(self.device)))
        codes = [self.levels[0].encode(x)]
        for level in self.levels[1:]:
            codes.append(level.encode(codes[-1]))
        return codes

    @torch.no_grad()
    def encode_split(self, images: Tensor, batch_size: int = 500) -> list[Tensor]:
        """:meth:`encode` of a whole split (N, C, H, W), ``batch_size`` images at a time."""
        parts = [self.encode(b) for b in _batches(images, batch_size)]
        return [torch.cat(level) for level in zip(*parts, strict=True)]

    @torch.no_grad()
    def decode(self, codes: Tensor, level: int, *, code_temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Codes of level ``level`` (B, h, w) -> uint8 images (B, C, H, W) of the data's own size.

        Levels below are drawn from their decoders at ``code_temperature``
        (0: the most likely code at every position); pixels are the decoder's mean.
        """
        z = codes.to(self.device)
        for k in range(level, 1, -1):
            z = self.levels[k - 1].decode(z, code_temperature, generator)
        return self.canvas.crop(self.levels[0].decode(z, 0.0))

    @torch.no_grad()
    def reconstruct(self, images: Tensor, level: int = 1) -> Tensor:
        """Encode to level ``level`` and decode back to pixels (most likely codes)."""
        return self.decode(self.encode(images)[level - 1], level)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        temperature: float = 1.0,
        code_temperature: float = 1.0,
        seed: int = 0,
        label: int | Tensor | None = None,
    ) -> Tensor:
        """Draw ``n`` images (n, C, H, W) uint8 from the whole hierarchy.

        z_L from the prior at ``temperature``; z_(k-1) from D_k(z_k) at
        ``code_temperature``; pixels from D_1(z_1) (its mean). ``label``: the
        class (one int, or (n,) ints) for a class-conditional prior; None
        cycles through the classes (see :meth:`labels_for`).
        """
        if self.prior is None:
            raise RunError("this hierarchy has no trained prior; train stage prior first")
        labels = self.labels_for(n, label)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        h, w = self.grid_shape(self.num_levels)
        top = self.prior.sample(n, h, w, temperature=temperature, generator=gen, label=labels)
        return self.decode(top, self.num_levels, code_temperature=code_temperature, generator=gen)

    # ------------------------------------------------------------------ likelihood

    @torch.no_grad()
    def nll(self, images: Tensor, codes: list[Tensor] | None = None, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Per-image bound on -log2 p(x), in bits per dim of x, split by level.

        ``images`` (B, C, H, W) uint8 are at the data's own size. The bits include
        the padding's (so the total bounds -log2 p(x) of the original image) and are
        divided by the original C x H x W, never the padded one. Keys ``"0"`` .. ``str(L)``: level 0 is -log D_1(x | z_1), level k in
        1..L-1 is -log D_(k+1)(z_k | z_(k+1)), level L is -log p(z_L) under the
        prior. ``"total"`` is their sum. Each value is (B,). ``codes`` are the
        encoder's codes of ``images`` when the caller already has them.

        A class-conditional prior gives -log p(z_L | y) for ``labels`` (B,)
        (a bound on -log p(x | y)) or, without labels, the marginal
        -log mean_y p(z_L | y) (a bound on -log p(x)).
        """
        if self.prior is None:
            raise RunError("the likelihood bound needs the prior; train stage prior first")
        x = to_unit(self.canvas.pad(images.to(self.device)))
        codes = self.encode(images) if codes is None else [z.to(self.device) for z in codes]
        dims = self.canvas.dims
        out: dict[str, Tensor] = {"0": -self.levels[0].log_likelihood(x, codes[0])}
        for k in range(1, self.num_levels):
            out[str(k)] = -self.levels[k].log_likelihood(codes[k - 1], codes[k])
        out[str(self.num_levels)] = -prior_log_prob(self.prior, codes[-1], labels)
        out = {key: value / (dims * LN2) for key, value in out.items()}
        out["total"] = sum(out.values())  # type: ignore[assignment]
        return out

    @torch.no_grad()
    def inpaint(self, image: Tensor, mask: Tensor, n: int, **options: Any) -> Tensor:
        """``n`` completions (n, C, H, W) uint8 of ``image`` (C, H, W) uint8 where ``mask`` (H, W) is True.

        See :func:`progvq.inpaint.inpaint` for the method and the options.
        """
        from .inpaint import inpaint  # inpaint builds on this module

        return inpaint(self, image, mask, n, **options)

    @torch.no_grad()
    def evaluate(self, images: Tensor, batch_size: int = 500, labels: Tensor | None = None) -> dict[str, Any]:
        """Every figure for a split of uint8 images (N, C, H, W).

        ``levels[k]``: level k's figures (see :func:`level_metrics`) plus the
        PSNR of images reconstructed through level k; ``prior``: bits per code
        of the top codes (see :func:`prior_metrics`; ``labels`` (N,) add the
        class-conditional figure); ``bits_per_dim``: the likelihood bound split
        by level (marginal over the classes for a class-conditional prior).
        """
        images = images.to(self.device)
        codes = self.encode_split(images, batch_size)
        report: dict[str, Any] = {"levels": {}}
        for k in range(1, self.num_levels + 1):
            inputs = images if k == 1 else codes[k - 2]
            figures = level_metrics(self.levels[k - 1], inputs, batch_size, canvas=self.canvas)
            recon = torch.cat([self.decode(z, k) for z in _batches(codes[k - 1], batch_size)])
            figures["psnr_through"] = psnr(images, recon)
            report["levels"][str(k)] = figures
        if self.prior is not None:
            report["prior"] = prior_metrics(self.prior, codes[-1], batch_size, labels)
            batched = zip(_batches(images, batch_size), *(_batches(z, batch_size) for z in codes), strict=True)
            parts = [self.nll(b, list(zs)) for b, *zs in batched]
            report["bits_per_dim"] = {key: float(torch.cat([p[key] for p in parts]).mean()) for key in parts[0]}
        return report


# ---------------------------------------------------------------------- figures


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of 8-bit images from their mean squared error."""
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def psnr(images: Tensor, recon: Tensor) -> float:
    """PSNR in dB over a whole split of uint8 images (one MSE for the split)."""
    return psnr_from_mse((images.float() - recon.float()).pow(2).mean().item())


@torch.no_grad()
def level_metrics(level: Level, inputs: Tensor, batch_size: int = 500, *, canvas: Canvas | None = None) -> dict[str, float]:
    """Held-out figures of one level.

    Level 1 (``inputs``: uint8 images (N, C, H, W) of the data's own size, placed on
    ``canvas`` for the level; None: unpadded): ``psnr`` of the decoder mean over the
    original region and ``bits_per_dim`` of the pixels given z_1, the padding's bits
    included, per original dim. Level k >= 2 (``inputs``: level
    k-1 codes): ``accuracy`` of the decoder's most likely code (for an
    autoregressive decoder, given the true codes before it) and
    ``bits_per_code``. Both: ``codes_used`` (count), ``usage`` (fraction of
    the codebook) and ``perplexity`` of the level's codes on this split.
    """
    was_training = level.training
    level.eval()
    nll, hits, sq_err, total, all_codes = 0.0, 0, 0.0, 0, []
    device = next(level.parameters()).device
    for batch in _batches(inputs, batch_size):
        batch = batch.to(device)
        if isinstance(level, PixelLevel):
            place = canvas or Canvas.unpadded(tuple(batch.shape[1:]))  # type: ignore[arg-type]
            x = to_unit(place.pad(batch))
            codes = level.encode(x)
            nll -= level.log_likelihood(x, codes).sum().item()
            sq_err += (place.crop(level.decode(codes)).float() - batch.float()).pow(2).sum().item()
        else:
            codes = level.encode(batch)
            logits = level.logits(codes, batch)  # an autoregressive decoder's are teacher-forced
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
        assert isinstance(level, CodeLevel)
        out["accuracy"] = hits / total
        out["bits_per_code"] = nll / total / LN2
    out["codes_used"] = float(used)
    out["usage"] = used / level.quantizer.num_codes
    out["perplexity"] = float(perplexity)
    return out


@torch.no_grad()
def prior_log_prob(prior: GatedPixelCNN, codes: Tensor, labels: Tensor | None = None) -> Tensor:
    """(B,) nats of top codes (B, h, w) under the prior, as it is (call in eval mode for figures).

    A class-conditional prior gives log p(codes | labels) for labels (B,), or without
    them the marginal log mean_y p(codes | y) over its classes (uniform p(y)).
    """
    if not prior.num_classes:
        if labels is not None:
            raise RunError("labels given but the prior is not class-conditional")
        return -F.cross_entropy(prior(codes), codes, reduction="none").flatten(1).sum(1)
    if labels is not None:
        return -F.cross_entropy(prior(codes, label=labels), codes, reduction="none").flatten(1).sum(1)
    per_class = torch.stack(
        [prior_log_prob(prior, codes, torch.full((len(codes),), y, dtype=torch.long, device=codes.device)) for y in range(prior.num_classes)],
        dim=1,
    )  # (B, classes)
    return torch.logsumexp(per_class, dim=1) - math.log(prior.num_classes)


@torch.no_grad()
def prior_metrics(prior: GatedPixelCNN, codes: Tensor, batch_size: int = 500, labels: Tensor | None = None) -> dict[str, float]:
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
            total -= prior_log_prob(prior, batch, y).sum().item()
        return total / codes.numel() / LN2

    out = {"bits_per_code": bits(False)}
    if prior.num_classes and labels is not None:
        out["bits_per_code_given_label"] = bits(True)
    prior.train(was_training)
    return out
