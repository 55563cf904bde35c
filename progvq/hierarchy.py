"""A trained hierarchy: encode, decode, sample, likelihood bound, evaluation.

This needs the library alone: every model is rebuilt from the config saved in
its own checkpoint (through :class:`progvq.run.Run`), so a run directory is all a
user has to keep.

Levels are numbered from the data up: ``levels[0]`` is level 1 (pixels <->
z_1), ``levels[L-1]`` level L; the prior models z_L.

A class-conditional prior (``stages.prior.class_conditional``) models
p(z_L | y) for a class y of ``num_classes``; sampling takes the class, and the
likelihood bound uses the marginal p(z_L) = mean_y p(z_L | y) (uniform over
the classes), so its figures compare with an unconditional prior's.

A code decoder may take the class too (``stages.K.decoder.class_conditional``, with a
class-conditional prior): D_K(z_(K-1) | z_K, y). Given the classes, each such level's bits are
given y and the total bounds -log p(x | y). Without them the class is marginalised jointly,
-log mean_y [p(z_L | y) prod_K D_K(z_(K-1) | z_K, y)] over the class-conditional levels K,
never level by level (a product of per-level marginals is no likelihood of one class); the
figure of each level is then its share in decode order (:meth:`Hierarchy.nll`). Sampling and
decoding hand every image's class to those levels, with the prior's class guidance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .canvas import Canvas
from .config import Config
from .errors import RunError
from .levels import Level
from .metrics import LN2, batches, level_metrics, prior_metrics, psnr
from .nets import to_unit
from .protocols import Prior
from .run import Run

#: Given codes per level k: (codes (B, h_k, w_k) int64, mask (B, h_k, w_k) bool, True where kept).
Known = dict[int, tuple[Tensor, Tensor]]


#: Images drawn at once by :meth:`Hierarchy.sample`; more are drawn in batches of this many.
SAMPLE_BATCH = 1000
#: Seeds of successive sample batches are this far apart (an odd 63-bit constant, so they never repeat).
_SEED_STRIDE = 0x1E3779B97F4A7C15


class Hierarchy(nn.Module):
    """Levels 1..L (and, when trained, the prior) of one run."""

    def __init__(self, config: Config, levels: list[Level], prior: Prior | None, canvas: Canvas) -> None:
        super().__init__()
        if prior is not None:
            for k, level in enumerate(levels, start=1):
                classes = getattr(level, "num_classes", 0)
                if classes and classes != prior.num_classes:
                    raise RunError(
                        f"level {k}'s decoder takes {classes} classes, but the prior has {prior.num_classes}: "
                        "they were trained on other labels"
                    )
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
        run_dir: str | Path | Run,
        *,
        num_levels: int | None = None,
        with_prior: bool = True,
        device: str | torch.device = "cpu",
        allow_stale: bool = False,
    ) -> Hierarchy:
        """A run's trained levels 1..num_levels (default: all) and its prior, through its :class:`Run`.

        Refuses (:class:`RunError`) a hierarchy with a stale part, one trained on a lower
        stage that has since been retrained, unless ``allow_stale``.
        """
        run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
        cfg = run.config
        num_levels = cfg.num_levels if num_levels is None else num_levels
        if not 1 <= num_levels <= cfg.num_levels:
            raise RunError(f"{run.path}: no level {num_levels} (the run has levels 1..{cfg.num_levels})")
        names = [*(str(k) for k in range(1, num_levels + 1)), *(["prior"] if with_prior else [])]
        run.check_not_stale(allow_stale=allow_stale, upto=names[-1])
        run.check_consistent(names)
        levels = [run.level(k, device) for k in range(1, num_levels + 1)]
        prior = run.prior(device) if with_prior else None
        model = cls(cfg, levels, prior, run.canvas(names[-1]))
        model.trained_with = {name: info for name in names if (info := run.trained_with(name))}
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
                raise RunError(
                    "a label was given but this run's prior is not class-conditional "
                    "(stages.prior.class_conditional: false)"
                )
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
    def conditional_levels(self) -> list[int]:
        """The levels k >= 2 whose decoder takes the image's class (``decoder.class_conditional``)."""
        return [k for k in range(2, self.num_levels + 1) if getattr(self.levels[k - 1], "num_classes", 0)]

    def _level_labels(self, k: int, labels: int | Tensor | None, n: int) -> Tensor | None:
        """The classes (n,) int64 that level ``k``'s decoder takes, or None for a decoder without classes;
        refuses (:class:`RunError`) a class-conditional level given no labels or labels it cannot take."""
        classes = getattr(self.levels[k - 1], "num_classes", 0)
        if not classes:
            return None
        if labels is None:
            raise RunError(
                f"level {k}'s decoder is class-conditional (stages.{k}.decoder.class_conditional): "
                "decoding through it needs each image's class (labels)"
            )
        given = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        given = given.expand(n).clone() if given.dim() == 0 else given
        if given.shape != (n,):
            raise RunError(f"labels must be one class or {n} classes, got shape {tuple(given.shape)}")
        if given.numel() and (given.min() < 0 or given.max() >= classes):
            bad = int(given[(given < 0) | (given >= classes)][0])
            raise RunError(f"label {bad} is out of range: level {k}'s decoder has classes 0..{classes - 1}")
        return given

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
        parts = [self.encode(b) for b in batches(images, batch_size)]
        return [torch.cat(level) for level in zip(*parts, strict=True)]

    @torch.no_grad()
    def decode(
        self,
        codes: Tensor,
        level: int,
        *,
        code_temperature: float = 0.0,
        pixel_temperature: float = 0.0,
        generator: torch.Generator | None = None,
        known: Known | None = None,
        all_levels: bool = False,
        labels: int | Tensor | None = None,
        guidance: float = 0.0,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Codes of level ``level`` (B, h, w) -> uint8 images (B, C, H, W) of the data's own size.

        Levels below are drawn from their decoders at ``code_temperature`` (0: the most
        likely code at every position); pixels at ``pixel_temperature`` (0: the pixel decoder's
        point estimate, its logistic's location or its mean; t > 0 draws them). ``known`` maps a
        level k to (codes (B, h_k, w_k) int64, mask (B, h_k, w_k) bool): where the mask is
        True the given codes are kept, and the rest of the level is drawn given them
        (inpainting). With ``all_levels`` the codes of levels 1..level come back too.
        ``labels`` (one class, or (B,) int64) are the images' classes, which every class-conditional
        decoder it passes through needs (:class:`RunError` without them); those decoders draw with
        class ``guidance`` w >= 0, as the prior (0: from D_k(z_(k-1) | z_k, y) itself).
        """
        known = known or {}
        z = codes.to(self.device)
        drawn = [z]
        for k in range(level, 1, -1):
            y = self._level_labels(k, labels, len(z))
            z = self.levels[k - 1].decode(
                z, code_temperature, generator, known=known.get(k - 1), label=y, guidance=guidance
            )
            drawn.insert(0, z)
        images = self.canvas.crop(self.levels[0].decode(z, pixel_temperature, generator))
        return (images, drawn) if all_levels else images

    @torch.no_grad()
    def reconstruct(self, images: Tensor, level: int = 1, labels: Tensor | None = None) -> Tensor:
        """Encode to level ``level`` and decode back to pixels (most likely codes).

        Class-conditional decoders below ``level`` take ``labels`` (B,), or without them the class
        :meth:`infer_labels` finds likeliest given the image's codes.
        """
        codes = self.encode(images)
        if labels is None and any(k <= level for k in self.conditional_levels):
            labels = self.infer_labels(codes)
        return self.decode(codes[level - 1], level, labels=labels)

    @torch.no_grad()
    def class_log_probs(self, codes: list[Tensor]) -> Tensor:
        """(B, classes) nats, float64: log p(z_L | y) + sum over the class-conditional levels K of
        log D_K(z_(K-1) | z_K, y), for the codes [z_1 (B, h1, w1), ..., z_L] of B images and every class y.

        The part of log p(x, y) that depends on y: every other term of the bound does not.
        """
        if self.prior is None or not self.num_classes:
            raise RunError("the classes' likelihoods need a class-conditional prior")
        codes = [z.to(self.device) for z in codes]
        z_top = codes[-1]
        per_class = torch.stack(
            [
                self.prior.log_prob(z_top, torch.full((len(z_top),), y, dtype=torch.long, device=self.device))
                for y in range(self.num_classes)
            ],
            dim=1,
        ).double()  # float64: the marginal subtracts nearly equal sums of many terms
        for k in self.conditional_levels:
            per_class = per_class + self.levels[k - 1].log_likelihood_per_class(codes[k - 2], codes[k - 1]).double()
        return per_class

    @torch.no_grad()
    def infer_labels(self, codes: list[Tensor]) -> Tensor:
        """The likeliest class (B,) int64 of B images given their codes [z_1, ..., z_L] (uniform p(y)):
        the argmax of :meth:`class_log_probs`."""
        return self.class_log_probs(codes).argmax(1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        temperature: float | None = None,
        code_temperature: float | None = None,
        pixel_temperature: float | None = None,
        seed: int = 0,
        label: int | Tensor | None = None,
        known: Known | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """Draw ``n`` images (n, C, H, W) uint8 from the whole hierarchy.

        z_L from the prior at ``temperature``; z_(k-1) from D_k(z_k) at
        ``code_temperature``; pixels from D_1(z_1) at ``pixel_temperature`` (0: its
        point estimate); each None takes the run's ``sample`` setting. ``label``: the
        class (one int, or (n,) ints) for a class-conditional prior; None
        cycles through the classes (see :meth:`labels_for`). ``known`` keeps given
        codes at any level, as in :meth:`decode` (the top level's too). ``guidance`` (None: the
        run's ``sample.guidance``) sharpens a class-conditional prior towards the class
        (:meth:`progvq.pixelcnn.GatedPixelCNN.sample`), and every class-conditional code decoder
        likewise; an unconditional prior takes 0 only. Class-conditional decoders are given each
        image's class, the one the prior drew it for.
        """
        if self.prior is None:
            raise RunError("this hierarchy has no trained prior; train stage prior first")
        settings = self.config.sample
        guidance = settings.guidance if guidance is None else guidance
        if guidance and not self.num_classes:
            raise RunError(f"guidance {guidance:g} needs a class-conditional prior; this run's prior has no classes")
        temperature = settings.temperature if temperature is None else temperature
        code_temperature = settings.code_temperature if code_temperature is None else code_temperature
        pixel_temperature = settings.pixel_temperature if pixel_temperature is None else pixel_temperature
        labels = self.labels_for(n, label)
        if known is None and n > SAMPLE_BATCH:
            # in batches, so memory stays that of one batch whatever n is; batch i draws from its own
            # stream (batch 0 from ``seed`` itself, so n <= SAMPLE_BATCH images are as they always were)
            return torch.cat(
                [
                    self.sample(
                        min(SAMPLE_BATCH, n - start),
                        temperature=temperature,
                        code_temperature=code_temperature,
                        pixel_temperature=pixel_temperature,
                        seed=(seed + i * _SEED_STRIDE) % 2**63,
                        label=None if labels is None else labels[start : start + SAMPLE_BATCH],
                        guidance=guidance,
                    )
                    for i, start in enumerate(range(0, n, SAMPLE_BATCH))
                ]
            )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        h, w = self.grid_shape(self.num_levels)
        known = known or {}
        top = self.prior.sample(
            n,
            h,
            w,
            temperature=temperature,
            generator=gen,
            label=labels,
            known=known.get(self.num_levels),
            guidance=guidance,
        )
        # class-conditional decoders are given each image's class too, with the prior's guidance
        return self.decode(
            top,
            self.num_levels,
            code_temperature=code_temperature,
            pixel_temperature=pixel_temperature,
            generator=gen,
            known=known,
            labels=labels,
            guidance=guidance,
        )

    # ------------------------------------------------------------------ likelihood

    @torch.no_grad()
    def nll(self, images: Tensor, codes: list[Tensor] | None = None, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Per-image bound on -log2 p(x), in bits per dim of x, split by level.

        ``images`` (B, C, H, W) uint8 are at the data's own size. The bits include
        the padding's (so the total bounds -log2 p(x) of the original image) and are
        divided by the original C x H x W, never the padded one. Keys ``"0"`` ..
        ``str(L)``: level 0 is -log D_1(x | z_1), level k in 1..L-1 is
        -log D_(k+1)(z_k | z_(k+1)), level L is -log p(z_L) under the prior.
        ``"total"`` is their sum. Each value is (B,). ``codes`` are the
        encoder's codes of ``images`` when the caller already has them.

        A class-conditional prior gives -log p(z_L | y) for ``labels`` (B,)
        (a bound on -log p(x | y)) or, without labels, the marginal
        -log mean_y p(z_L | y) (a bound on -log p(x)). Class-conditional code decoders
        are given ``labels`` too. Without labels the class is marginalised over the prior and
        those decoders at once: the total is -log mean_y [p(z_L | y) prod_K D_K(z_(K-1) | z_K, y)]
        plus the other levels' bits, split in decode order by the chain rule (the prior's part
        is its marginal as above; level K's is -log sum_y p(y | the codes above it)
        D_K(z_(K-1) | z_K, y)), so the parts add up to the joint marginal.
        """
        if self.prior is None:
            raise RunError("the likelihood bound needs the prior; train stage prior first")
        x = to_unit(self.canvas.pad(images.to(self.device)))
        codes = self.encode(images) if codes is None else [z.to(self.device) for z in codes]
        labels = None if labels is None else labels.to(self.device)
        dims = self.canvas.dims
        top = self.num_levels
        conditional = self.conditional_levels
        # nats by key: "0" the pixels, str(k) the codes z_k (under D_(k+1), or under the prior for k = L)
        nats: dict[str, Tensor] = {"0": -self.levels[0].log_likelihood(x, codes[0])}
        for k in range(2, top + 1):
            if labels is not None or k not in conditional:
                y = labels if k in conditional else None
                nats[str(k - 1)] = -self.levels[k - 1].log_likelihood(codes[k - 2], codes[k - 1], y)
        if labels is not None or not conditional:
            nats[str(top)] = -self.prior.log_prob(codes[-1], labels)
        else:
            nats.update(self._joint_marginal(codes))
        out = {str(k): nats[str(k)] / (dims * LN2) for k in range(top + 1)}
        out["total"] = sum(out.values())  # type: ignore[assignment]
        return out

    def _joint_marginal(self, codes: list[Tensor]) -> dict[str, Tensor]:
        """Nats (B,) float64 of the top codes and of each class-conditional level's codes, the class
        marginalised jointly (uniform p(y)) and split by the chain rule in decode order (see :meth:`nll`).

        ``running`` is log p(the codes decoded so far | y) per class (B, classes); each level's part is
        the growth of its log-mean over the classes, so the parts sum to
        -log mean_y [p(z_L | y) prod_K D_K(z_(K-1) | z_K, y)].
        """
        assert self.prior is not None
        z_top = codes[-1]
        running = torch.stack(
            [
                self.prior.log_prob(z_top, torch.full((len(z_top),), y, dtype=torch.long, device=self.device))
                for y in range(self.num_classes)
            ],
            dim=1,
        ).double()  # float64: the parts subtract nearly equal sums of many terms
        before = torch.logsumexp(running, dim=1)
        out = {str(self.num_levels): -(before - math.log(self.num_classes))}
        for k in sorted(self.conditional_levels, reverse=True):  # decode order: z_(L-1) first
            running = running + self.levels[k - 1].log_likelihood_per_class(codes[k - 2], codes[k - 1]).double()
            now = torch.logsumexp(running, dim=1)
            out[str(k - 1)] = -(now - before)
            before = now
        return out

    @torch.no_grad()
    def evaluate(self, images: Tensor, batch_size: int = 500, labels: Tensor | None = None) -> dict[str, Any]:
        """Every figure for a split of uint8 images (N, C, H, W).

        ``levels[k]``: level k's figures (see :func:`level_metrics`) plus the
        PSNR of images reconstructed through level k; ``prior``: bits per code
        of the top codes (see :func:`prior_metrics`; ``labels`` (N,) add the
        class-conditional figure); ``bits_per_dim``: the likelihood bound split
        by level (marginal over the classes for a class-conditional prior, jointly with the
        class-conditional decoders: :meth:`nll` without labels). A class-conditional decoder's
        level figures are given ``labels`` (without them: its own marginal over the classes), and
        reconstructions through it decode with them (without them: the classes :meth:`infer_labels` finds).
        """
        images = images.to(self.device)
        codes = self.encode_split(images, batch_size)
        conditional = self.conditional_levels
        decode_labels = labels
        if conditional and labels is None:
            per_batch = zip(*(batches(z, batch_size) for z in codes), strict=True)
            decode_labels = torch.cat([self.infer_labels(list(zs)) for zs in per_batch])
        report: dict[str, Any] = {"levels": {}}
        for k in range(1, self.num_levels + 1):
            inputs = images if k == 1 else codes[k - 2]
            given = labels if k in conditional else None
            figures = level_metrics(self.levels[k - 1], inputs, batch_size, canvas=self.canvas, labels=given)
            recon = torch.cat(
                [
                    self.decode(z, k, labels=None if decode_labels is None else decode_labels[i : i + batch_size])
                    for i, z in zip(range(0, len(codes[k - 1]), batch_size), batches(codes[k - 1], batch_size))
                ]
            )
            figures["psnr_through"] = psnr(images, recon)
            report["levels"][str(k)] = figures
        if self.prior is not None:
            report["prior"] = prior_metrics(self.prior, codes[-1], batch_size, labels)
            report["bits_per_dim"] = self.mean_bits(images, batch_size, codes)
        return report

    @torch.no_grad()
    def mean_bits(
        self,
        images: Tensor,
        batch_size: int = 500,
        codes: list[Tensor] | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, float]:
        """The bound of :meth:`nll` averaged over uint8 images (N, C, H, W), in batches: bits per dim
        of the data's own pixels by level and in total. ``codes``: their encoder codes, if known;
        ``labels`` (N,): their classes, for the bound given the class (None: marginal over the classes)."""
        codes = codes if codes is not None else self.encode_split(images.to(self.device), batch_size)
        starts = range(0, len(images), batch_size)
        batched = zip(starts, batches(images, batch_size), *(batches(z, batch_size) for z in codes), strict=True)
        parts = [self.nll(b, list(zs), None if labels is None else labels[i : i + batch_size]) for i, b, *zs in batched]
        return {key: float(torch.cat([p[key] for p in parts]).mean()) for key in parts[0]}
