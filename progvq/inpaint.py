"""Inpainting: complete the masked part of an image with a trained hierarchy.

The mask is in pixel space, (H, W) bool, True where a pixel is missing. The
method (after the conditional hierarchical VAE of the inpainting seeds):

1. **Fill and encode.** Missing pixels are set to ``fill`` (0, the background
   of the shipped data) before encoding, so nothing of what the image holds
   there can reach any code: the result depends on the known pixels alone.
2. **Known codes.** A code of level k is known only if the whole patch of
   pixels it stands for is known: the mask, max-pooled by level k's
   cumulative downsampling, marks the codes to resample. (The encoders see
   a little beyond a code's patch, so a known code beside the hole encodes
   its known pixels next to the fill; it is kept all the same.)
3. **Top level.** The PixelCNN prior draws the unknown z_L codes, in raster
   order, each given every code before it, known ones included
   (``GatedPixelCNN.sample(known=...)``). Known codes *after* a position are
   not seen by the draw there; with ``candidates`` M > 1, M draws are made per
   completion and one is kept with probability proportional to the prior's
   probability of the known codes given the draw (sampling-importance-
   resampling), which corrects for them: as M grows the kept draw follows
   p(unknown | every known code). The same weights infer the class of a
   class-conditional prior given no ``label``: the candidates then cycle
   through the classes.
4. **Levels below.** For k = L..2 the unknown z_(k-1) codes are drawn from
   D_k(z_k), the known ones kept: a factorised decoder draws every position
   independently, an autoregressive one with its sampler given the known codes
   before each position (and a class-conditional one given the class the top
   level was drawn for).
5. **Pixels.** D_1(z_1)'s mean, with every known pixel pasted back, so the
   output equals the input wherever the mask is False.

The library never reads files except through :func:`read_image` and
:func:`read_mask`, which the command line uses; every user mistake raises
:class:`InpaintError` (a :class:`~progvq.errors.ProgvqError`), one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .errors import ProgvqError
from .hierarchy import Hierarchy
from .protocols import Prior

__all__ = [
    "Completion",
    "InpaintError",
    "box_mask",
    "complete",
    "inpaint",
    "inpaint_batch",
    "inpainting_arrays",
    "known_log_prob",
    "level_masks",
    "masked_view",
    "parse_box",
    "read_image",
    "read_mask",
]


class InpaintError(ProgvqError):
    """An image, mask or option that inpainting cannot use."""


@dataclass
class Completion:
    """What :func:`complete` returns.

    ``images`` (n, C, H, W) uint8 are the completions, equal to the input where the
    mask is False; ``codes`` per level k = 1..L, (n, h_k, w_k) int64, their codes;
    ``missing`` per level k = 1..L, (h_k, w_k) bool, True where the code was
    resampled; ``labels`` (n,) int64 the classes of a class-conditional prior, else None.
    """

    images: Tensor
    codes: list[Tensor]
    missing: list[Tensor]
    labels: Tensor | None


# --------------------------------------------------------------------------- masks


def level_masks(model: Hierarchy, mask: Tensor) -> list[Tensor]:
    """Pixel mask (..., H, W) bool (True: missing) -> per level k = 1..L, (..., h_k, w_k) bool.

    The mask is at the data's own size; on the padded canvas the padding is known
    (always zero). A code is missing as soon as one pixel of its patch is:
    max-pooling by the level's cumulative downsampling factor. Leading dims (a
    batch) are kept.
    """
    mask = model.canvas.pad_mask(mask)
    lead, (h, w) = mask.shape[:-2], mask.shape[-2:]
    flat = mask.reshape(-1, 1, h, w).float()  # (B, 1, H, W)
    out, factor = [], 1
    for level in model.levels:
        factor *= level.factor  # every level halves at least once (level 1 downsamples by >= 2)
        pooled = F.max_pool2d(flat, factor)  # (B, 1, H / factor, W / factor)
        out.append((pooled[:, 0] > 0).reshape(*lead, *pooled.shape[-2:]))
    return out


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> Tensor:
    """(H, W) bool mask, True inside the half-open box x0 <= x < x1, y0 <= y < y1 (pixels, x to the right).

    Raises :class:`InpaintError` for a box that is empty or reaches outside the image.
    """
    x0, y0, x1, y1 = box
    text = ",".join(str(v) for v in box)
    for name, value, top in (("x0", x0, width), ("y0", y0, height), ("x1", x1, width), ("y1", y1, height)):
        if not 0 <= value <= top:
            axis = "x" if name[0] == "x" else "y"
            raise InpaintError(
                f"--box {text}: {name} = {value} is outside the {width}x{height} image ({axis} in 0..{top})"
            )
    if x1 <= x0 or y1 <= y0:
        raise InpaintError(f"--box {text}: empty box (need x0 < x1 and y0 < y1; x1 and y1 are exclusive)")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def parse_box(text: str) -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` -> four ints; raises :class:`InpaintError` if it is not that."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InpaintError(f"--box {text}: expected four integers x0,y0,x1,y1 (pixels; x1 and y1 exclusive)")
    return values  # type: ignore[return-value]


def masked_view(image: Tensor, mask: Tensor, value: int = 128) -> Tensor:
    """The input with what is missing shown grey: (C, H, W) uint8, masked pixels set to ``value``."""
    return torch.where(mask[None], torch.full_like(image, value), image)


# --------------------------------------------------------------------------- completing


def _check_inputs(model: Hierarchy, images: Tensor, masks: Tensor) -> None:
    """images (B, C, H, W) uint8 of the run's shape, masks (B, H, W) bool, each marking a pixel."""
    c, h, w = model.image_shape
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise InpaintError(f"the image must be uint8 (C, H, W), got {images.dtype} of shape {tuple(images.shape[1:])}")
    if tuple(images.shape[1:]) != (c, h, w):
        raise InpaintError(
            f"the image is {'x'.join(map(str, images.shape[1:]))} (C x H x W) but the run's images are {c}x{h}x{w}"
        )
    if masks.dtype != torch.bool or tuple(masks.shape) != (len(images), h, w):
        raise InpaintError(
            f"the mask must be bool ({h}, {w}) like the image, got {masks.dtype} of shape {tuple(masks.shape[1:])}"
        )
    if not masks.flatten(1).any(1).all():
        raise InpaintError("the mask marks no pixel as missing: nothing to complete")
    if model.prior is None:
        raise InpaintError("inpainting needs the prior; train stage prior first")


@torch.no_grad()
def known_log_prob(prior: Prior, codes: Tensor, missing: Tensor, labels: Tensor | None = None) -> Tensor:
    """(B,) nats: sum over the known positions of log p(code | every code before it) under ``prior``.

    ``codes`` (B, h, w) int64 are complete grids, ``missing`` (h, w) or (B, h, w) bool marks
    the drawn positions. For a draw of the missing codes given the known ones before them,
    this is its importance weight towards p(missing | all known): the joint p(codes) is the
    proposal's probability times this. Positions before the first missing one add the same
    to every draw (or, for a class-conditional prior, say how well the class fits them).
    """
    was_training = prior.training
    prior.eval()
    try:
        logp = prior.log_prob_per_position(codes, labels)  # (B, h, w)
    finally:
        prior.train(was_training)
    return (logp * (~missing).float()).flatten(1).sum(1)


def _labels(model: Hierarchy, b: int, n: int, m: int, label: int | Tensor | None) -> tuple[Tensor | None, int]:
    """Labels (b * n * m,) for the candidates, ordered (image, completion, candidate), and m.

    ``label`` is one class, or (b, n) classes. A class-conditional prior without a label gets
    at least one candidate per class, the classes in turn (stratified draws of a uniform
    p(y)), and the importance weights pick one.
    """
    classes = model.num_classes
    if not classes:
        model.labels_for(b * n, None if label is None else torch.as_tensor(label).reshape(-1).expand(b * n))
        return None, m
    if label is None:
        m = classes * math.ceil(m / classes)
        return torch.arange(b * n * m, device=model.device) % classes, m
    given = torch.as_tensor(label, dtype=torch.long)
    given = given.expand(b, n) if given.dim() == 0 else given
    labels = model.labels_for(b * n, given.reshape(-1))
    assert labels is not None
    return labels.repeat_interleave(m), m


@dataclass
class _Options:
    seed: int
    temperature: float
    code_temperature: float
    candidates: int
    fill: int


def _check_options(
    model: Hierarchy,
    n: int,
    seed: int,
    temperature: float,
    code_temperature: float | None,
    candidates: int,
    fill: int,
) -> _Options:
    if n < 1:
        raise InpaintError(f"n must be >= 1, got {n}")
    if candidates < 1:
        raise InpaintError(f"candidates must be >= 1, got {candidates}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InpaintError(f"temperature must be >= 0, got {temperature}")
    code_temperature = model.config.sample.code_temperature if code_temperature is None else code_temperature
    if not (code_temperature >= 0 and math.isfinite(code_temperature)):
        raise InpaintError(f"code temperature must be >= 0, got {code_temperature}")
    if not 0 <= fill <= 255:
        raise InpaintError(f"fill must be a pixel value in 0..255, got {fill}")
    return _Options(seed, temperature, code_temperature, candidates, fill)


def _complete(
    model: Hierarchy,
    images: Tensor,
    masks: Tensor,
    n: int,
    opt: _Options,
    label: int | Tensor | None,
) -> Completion:
    """The method of the module docstring for a batch: images (B, C, H, W), masks (B, H, W).

    Returns images (B n, C, H, W), codes per level (B n, h_k, w_k), missing per level
    (B, h_k, w_k), labels (B n,) or None; completions of one image are consecutive.
    """
    b = len(images)
    device = model.device
    images, masks = images.to(device), masks.to(device)
    missing = level_masks(model, masks)  # per level (B, h_k, w_k)
    filled = torch.where(masks[:, None], torch.full_like(images, opt.fill), images)
    known_codes = model.encode(filled)  # per level (B, h_k, w_k)
    gen = torch.Generator(device=device).manual_seed(opt.seed)

    # top level: m candidates per completion from the prior, given the known codes before each position
    labels, m = _labels(model, b, n, opt.candidates, label)
    prior = model.prior
    assert prior is not None
    h, w = known_codes[-1].shape[1:]
    top_known = (known_codes[-1].repeat_interleave(n * m, 0), (~missing[-1]).repeat_interleave(n * m, 0))
    top = prior.sample(b * n * m, h, w, temperature=opt.temperature, generator=gen, label=labels, known=top_known)
    if m > 1:
        weights = known_log_prob(prior, top, ~top_known[1], labels).view(b * n, m)
        pick = torch.multinomial(torch.softmax(weights, dim=1), 1, generator=gen)[:, 0]  # (B n,)
        chosen = torch.arange(b * n, device=device) * m + pick
        top = top[chosen]
        labels = None if labels is None else labels[chosen]

    # levels below: the hierarchy's own top-down pass, unknown codes from the decoders, known ones kept
    known = {
        k: (known_codes[k - 1].repeat_interleave(n, 0), (~missing[k - 1]).repeat_interleave(n, 0))
        for k in range(1, model.num_levels)
    }
    # a class-conditional decoder completes its level given the completion's class, the prior's
    pixels, codes = model.decode(
        top,
        model.num_levels,
        code_temperature=opt.code_temperature,
        generator=gen,
        known=known,
        all_levels=True,
        labels=labels,
    )
    out = torch.where(masks.repeat_interleave(n, 0)[:, None], pixels, images.repeat_interleave(n, 0))
    return Completion(out, codes, missing, labels)


@torch.no_grad()
def complete(
    model: Hierarchy,
    image: Tensor,
    mask: Tensor,
    n: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    code_temperature: float | None = None,
    candidates: int = 1,
    label: int | Tensor | None = None,
    fill: int = 0,
) -> Completion:
    """``n`` completions of ``image`` (C, H, W) uint8 where ``mask`` (H, W) bool is True.

    ``temperature`` is the prior's, ``code_temperature`` the decoders' of levels >= 2
    (default: the run's ``sample.code_temperature``); ``candidates`` top-level draws per
    completion for the importance resampling of the module docstring (1: none);
    ``label`` the class for a class-conditional prior (one int or (n,) ints; None: inferred);
    ``fill`` the value that stands in for missing pixels when encoding. The same ``seed``
    gives the same completions. ``missing`` of the result is per level (h_k, w_k).
    """
    opt = _check_options(model, n, seed, temperature, code_temperature, candidates, fill)
    if image.dim() != 3:
        raise InpaintError(f"the image must be uint8 (C, H, W), got {image.dtype} of shape {tuple(image.shape)}")
    if mask.dim() != 2:
        raise InpaintError(
            f"the mask must be bool (H, W) like the image, got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    _check_inputs(model, image[None], mask[None])
    labels = None if label is None else torch.as_tensor(label).expand(n)[None]
    done = _complete(model, image[None], mask[None], n, opt, labels)
    return Completion(done.images, done.codes, [m[0] for m in done.missing], done.labels)


@torch.no_grad()
def inpaint(
    model: Hierarchy,
    image: Tensor,
    mask: Tensor,
    n: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    code_temperature: float | None = None,
    candidates: int = 1,
    label: int | Tensor | None = None,
    fill: int = 0,
) -> Tensor:
    """``n`` completions (n, C, H, W) uint8 of ``image`` (C, H, W) uint8 where ``mask`` (H, W) bool is True.

    Known pixels are returned unchanged. See :func:`complete` for the options and the module
    docstring for the method.
    """
    return complete(
        model,
        image,
        mask,
        n,
        seed=seed,
        temperature=temperature,
        code_temperature=code_temperature,
        candidates=candidates,
        label=label,
        fill=fill,
    ).images


@torch.no_grad()
def inpaint_batch(
    model: Hierarchy,
    images: Tensor,
    masks: Tensor,
    n: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    code_temperature: float | None = None,
    candidates: int = 1,
    label: int | Tensor | None = None,
    fill: int = 0,
) -> Tensor:
    """``n`` completions of each of ``images`` (B, C, H, W) uint8 under ``masks`` (B, H, W) bool: (B, n, C, H, W) uint8.

    One batched pass of :func:`complete` (much faster than B calls); ``label`` is one class or
    (B, n) classes. For the same seed the draws differ from B single calls (one generator
    serves the whole batch), but they follow the same distribution.
    """
    opt = _check_options(model, n, seed, temperature, code_temperature, candidates, fill)
    if masks.dim() == 2:
        masks = masks.expand(len(images), -1, -1)
    _check_inputs(model, images, masks)
    done = _complete(model, images, masks, n, opt, label)
    return done.images.view(len(images), n, *done.images.shape[1:])


# --------------------------------------------------------------------------- files

#: Pillow modes that convert to grey or RGB without guessing (16-bit and float images do not).
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def _open(path: Path, what: str, size: tuple[int, int], other: str) -> np.ndarray:
    """A PNG/JPEG file of ``size`` (width, height) as uint8 (H, W, 3), alpha dropped; InpaintError names the
    file on any problem. The size is read from the file's header and checked before any pixel is decoded
    (a 10,000 x 10,000 file is refused without taking 300 MB); ``other`` says what the size must match."""
    if not path.is_file():
        raise InpaintError(f"{path}: {what} not found" if not path.exists() else f"{path}: not a file")
    try:
        with Image.open(path) as img:
            if img.mode not in _MODES:
                raise InpaintError(f"{path}: {what} in Pillow mode {img.mode!r}, expected 8-bit grey or RGB")
            if img.size != size:
                raise InpaintError(
                    f"{path}: {what} is {img.size[0]}x{img.size[1]} (width x height), {other} {size[0]}x{size[1]}"
                )
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except InpaintError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InpaintError(f"{path}: cannot read {what} ({reason})") from None


def read_image(path: str | Path, shape: tuple[int, int, int]) -> Tensor:
    """An image file as uint8 (C, H, W) for a run of images ``shape`` = (C, H, W).

    A grey run takes grey images, or colour ones whose three channels are equal; a colour
    run takes either (grey is repeated). The size must be the run's exactly.
    """
    path = Path(path)
    c, h, w = shape
    rgb = _open(path, "image", (w, h), "the run's images are")
    if c == 1:
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise InpaintError(f"{path}: a colour image, but the run's images are grey (1 channel)")
        return torch.from_numpy(rgb[None, :, :, 0].copy())
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def read_mask(path: str | Path, height: int, width: int) -> Tensor:
    """A mask file as (H, W) bool: white (255) pixels are missing, black (0) ones known; nothing else."""
    path = Path(path)
    rgb = _open(path, "mask", (width, height), "the image is")
    bad = ~((rgb == 0).all(axis=2) | (rgb == 255).all(axis=2))
    if bad.any():
        y, x = (int(v) for v in np.argwhere(bad)[0])
        value = rgb[y, x, 0] if (rgb[y, x] == rgb[y, x, 0]).all() else tuple(int(v) for v in rgb[y, x])
        raise InpaintError(
            f"{path}: not a binary mask (pixel x={x}, y={y} is {value}; "
            "use 0 (black) for known pixels, 255 (white) for missing)"
        )
    mask = torch.from_numpy(rgb[..., 0] == 255)
    if not mask.any():
        raise InpaintError(f"{path}: the mask marks no pixel as missing (white, 255, marks the pixels to complete)")
    return mask


def inpainting_arrays(completion: Completion, image: Tensor, mask: Tensor) -> dict[str, np.ndarray]:
    """The arrays of one inpainting, as its ``.npz`` holds them: ``images`` (completions; N x H x W when grey,
    else N x C x H x W), ``original`` (H x W or C x H x W), ``mask`` (H x W bool, True missing), and ``labels``
    when the prior has classes.
    """
    grey = image.shape[0] == 1
    arrays = {
        "images": completion.images.cpu().numpy()[:, 0] if grey else completion.images.cpu().numpy(),
        "original": image.cpu().numpy()[0] if grey else image.cpu().numpy(),
        "mask": mask.cpu().numpy(),
    }
    if completion.labels is not None:
        arrays["labels"] = completion.labels.cpu().numpy()
    return arrays
