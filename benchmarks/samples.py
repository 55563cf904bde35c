"""Sample quality: trained runs' samples seen through a classifier of their data, beside real images.

    python benchmarks/samples.py --run RUN [--run RUN2 ...] [--n 1000] [--seed 1] [--data mnist|shapes|cifar10]
                                 [--json OUT] [--grid-dir DIR] [--out DIR] [--quick]
    python benchmarks/samples.py --config configs/mnist.yaml --config configs/mnist-flat.yaml [--runs-dir runs]
    python benchmarks/samples.py --data mnist        # the same two configs
    python benchmarks/samples.py --data cifar10 [--config configs/cifar10.yaml] --set data.path=data/cifar10/train
    python benchmarks/samples.py --data cifar10 --set data.path=data/cifar10/train --baselines-only

Run from the project root (the MNIST configs read the test set the package ships). What it does:

1. With ``--config`` (repeatable; ``--data mnist`` alone means ``mnist.yaml`` then
   ``mnist-flat.yaml``, ``--data cifar10`` alone ``cifar10.yaml`` then ``cifar10-flat.yaml``
   where that config exists), trains each config into ``RUNS_DIR/<config name>`` first, stages
   already done left as they are; ``--set KEY=VALUE`` (repeatable) overrides each config's
   settings as ``progvq train --set`` does, e.g. ``data.path``. A config whose leading stages
   equal an earlier one's reuses them (``train --all --from``). A one-level config after a
   hierarchy (the flat baseline) gets as much training time as the hierarchy: its prior trains
   for the seconds the hierarchy spent on the stages it does not share, at the seconds per step
   a short probe measures (``--flat-steps`` fixes the steps instead). Seconds per stage are kept
   in ``OUT/training-times.json``, so later calls report them too.
2. A classifier of the data, trained on the training split and cached in ``OUT`` (one file per
   data set, loadable with ``torch.load(..., weights_only=True)``), so that no figure depends on
   which runs are scored: MNIST gets ``benchmarks/quality.py``'s digit classifier, shapes the same
   network for their size and their nine classes (``progvq.data.SHAPE_CLASSES``). CIFAR-10 (an
   image folder of 32x32 colour images in its ten class folders, ``airplane`` ... ``truck``; a
   slice of it too) gets :class:`ColourClassifier`, four convolutions with batch norm trained
   :data:`COLOUR_EPOCHS` epochs on random crops and mirror images (3 to 4 minutes and 72.6%
   held-out accuracy on one core). An image folder's held-out split is the run's own: the
   ``data.heldout`` images that ``data.seed`` and their paths pick (see ``load_dataset``).
3. For every run: N samples (a class-conditional prior draws its classes at the training split's
   class frequencies), and the figures of :mod:`progvq.score` on the classifier's penultimate
   features (128 numbers per image): the Fréchet distance to the held-out split, beside the floor,
   the distance of N training images to it; the classifier's confidence and the entropy of its
   labels, beside real held-out images'; k-NN precision and recall (k = 3) against the held-out
   split; memorisation, on pixels and on features; for a class-conditional prior, N more samples
   asking for the classes in turn and the share classified as asked. Also the run's held-out
   bound in bits/dim of the data's own pixels, in total and by level, and its training seconds
   per stage where known.
4. Beside the bound, on the same held-out images: each image as a PNG file (Pillow,
   ``optimize=True, compress_level=9``) and as a WebP lossless file (``lossless=True,
   method=6``), in bits per dim (file bytes * 8 / (C * H * W), averaged over the images).
   ``--baselines-only`` prints these two alone for the held-out split of the first ``--run`` or
   config (``--set`` applied), reading the data but training and sampling nothing.

Prints a markdown table; writes every figure as JSON (``--json``, default ``OUT/samples.json``)
and, with ``--grid-dir``, a grid of 64 samples per run (``samples_<run>.png``). ``--quick``
trains the classifier one epoch (and configs a few steps per stage, into ``<name>-quick``
folders): a smoke test.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's packages, also when progvq is not installed

from quality import Classifier, fit_classifier, log, train, train_classifier  # after the path is set

from progvq.config import Config, load_config
from progvq.data import SHAPE_CLASSES, ImageData, load_dataset
from progvq.errors import ProgvqError
from progvq.fileio import atomic_write
from progvq.folder import list_folder
from progvq.hardware import describe
from progvq.hierarchy import Hierarchy
from progvq.images import image_grid, save_png
from progvq.metrics import batches
from progvq.run import Run
from progvq.score import frechet_distance, label_figures, memorised, precision_recall
from stages import adopt, train_stage

#: The configs ``--data`` trains when neither ``--run`` nor ``--config`` is given.
DEFAULT_CONFIGS = {
    "mnist": ["configs/mnist.yaml", "configs/mnist-flat.yaml"],
    "shapes": ["configs/shapes.yaml"],
    "cifar10": ["configs/cifar10.yaml", "configs/cifar10-flat.yaml"],
}
#: Default configs left out, with a line saying so, where they do not exist: a flat baseline is
#: scored only once there is a config for it.
OPTIONAL_CONFIGS = {"configs/cifar10-flat.yaml"}
#: ``--data`` -> the ``data.source`` its runs read.
DATA_SOURCES = {"mnist": "mnist", "shapes": "shapes", "cifar10": "folder"}
#: CIFAR-10's classes in label order: the sorted class folders ``progvq data get cifar10`` writes.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Training steps of the prior in the probe that measures a flat prior's seconds per step.
PROBE_STEPS, QUICK_PROBE_STEPS = 40, 5
#: Classifier epochs: quality.py's 6 for the 9,000 digits; 15 for others. Shapes' nine classes (how
#: many shapes of which kinds, one shape partly hidden by another) are harder: on 2,500 training
#: images 12 epochs (468 steps) gave 81% held-out accuracy, 4 epochs 34%.
DIGIT_EPOCHS, OTHER_EPOCHS = 6, 15
#: Epochs of the CIFAR-10 classifier and the pixels its random crops may shift an image by.
COLOUR_EPOCHS, COLOUR_PAD = 4, 4
K = 3  # neighbours of the precision and recall estimate
CHUNK = 250  # samples drawn per call: bounds the memory of the samplers' caches


# --------------------------------------------------------------------------- training


def quick_overrides(cfg: Config) -> list[str]:
    """A few steps for every stage of ``cfg`` (only the stages it has: ``--set`` would add others)."""
    settings = (("steps", 20), ("eval_every", 20), ("warmup", 5))
    return [f"stages.{s}.{k}={v}" for s in cfg.stage_names() for k, v in settings]


def shared_stages(cfg: Config, other: Config) -> tuple[str, ...]:
    """The leading stages of ``cfg`` that ``other`` trained the same way (same data and seed): they can be reused."""
    mine, theirs = cfg.identity(), other.identity()
    if mine["data"] != theirs["data"] or mine["seed"] != theirs["seed"]:
        return ()
    shared: list[str] = []
    for name in cfg.stage_names()[:-1]:
        if theirs["stages"].get(name) != mine["stages"][name]:
            return tuple(shared)
        shared.append(name)
    # the prior too, only on the same levels
    if cfg.num_levels == other.num_levels and mine["stages"]["prior"] == theirs["stages"]["prior"]:
        shared.append("prior")
    return tuple(shared)


def read_times(path: Path) -> dict[str, dict[str, Any]]:
    """``OUT/training-times.json``: resolved run folder -> stage -> {"train_seconds", "steps"}; {} before the first."""
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def seconds_per_prior_step(config: Path, overrides: list[str], reference: Path, steps: int) -> float:
    """Seconds one training step of ``config``'s prior takes here, from a probe of ``steps`` steps.

    The probe trains in a temporary folder on ``reference``'s stage 1 (copied, as ``--from``
    does); only its training steps are timed (no evaluation, logging or saving).
    """
    sets = [f"stages.prior.{key}={steps}" for key in ("steps", "eval_every", "checkpoint_every", "log_every")]
    cfg = load_config(config, [*overrides, *sets])
    with tempfile.TemporaryDirectory(prefix="samples-probe-") as tmp:
        run = Run(Path(tmp) / "run")
        adopt(cfg, run, Run(reference), log=lambda message: None)
        result = train_stage(cfg, "prior", run, progress=False, log=lambda message: None)
    return result.train_seconds / steps


def train_configs(
    configs: list[Path],
    runs_dir: Path,
    *,
    sets: list[str],
    quick: bool,
    flat_steps: int | None,
    times_path: Path,
) -> tuple[list[Path], dict[str, Any]]:
    """Train every config not done yet (see the module docstring), each with the overrides ``sets``
    (``--set``); its run folders and what training did."""
    times = read_times(times_path)
    done: list[tuple[Config, Path]] = []  # configs trained so far, with their run folders
    report: dict[str, Any] = {}
    for config in configs:
        overrides = list(sets)
        if quick:
            overrides += quick_overrides(load_config(config, overrides))
        cfg = load_config(config, overrides)
        run_dir = runs_dir / (config.stem + ("-quick" if quick else ""))
        # reuse the earliest run that shares stages with this one
        reuse, reused = next(((path, s) for other, path in done if (s := shared_stages(cfg, other))), (None, ()))
        entry: dict[str, Any] = {"config": str(config), "run": str(run_dir)}
        hierarchy = next(((other, path) for other, path in done if other.num_levels > 1), None)
        if cfg.num_levels == 1 and hierarchy is not None and reused and reuse == hierarchy[1]:
            steps, how = flat_prior_steps(config, overrides, run_dir, hierarchy[1], reused, times, flat_steps, quick)
            overrides.append(f"stages.prior.steps={steps}")
            cfg = load_config(config, overrides)
            entry["prior_steps"] = {"steps": steps, **how}
        entry["overrides"] = list(overrides)
        entry["stages"] = train(config, run_dir, overrides, reuse, reused)
        record = times.setdefault(str(run_dir.resolve()), {})
        for name, figures in entry["stages"].items():
            if "trained_before" not in figures:
                record[name] = {"train_seconds": figures["train_seconds"], "steps": figures["steps"]}
                continue
            if reuse is not None and name in reused and name not in record:
                # a reused stage's seconds are those of the run it comes from, where known
                known = times.get(str(reuse.resolve()), {}).get(name)
                if known is not None:
                    record[name] = known
            # this call spent no time on it: show the seconds it was trained in, where known
            figures.pop("seconds")
            figures["train_seconds"] = record.get(name, {}).get("train_seconds", "not recorded")
        write_json(times_path, times)
        done.append((cfg, run_dir))
        report[run_dir.name] = entry
    return [path for _, path in done], report


def flat_prior_steps(
    config: Path,
    overrides: list[str],
    run_dir: Path,
    hierarchy: Path,
    reused: tuple[str, ...],
    times: dict[str, dict[str, Any]],
    flat_steps: int | None,
    quick: bool,
) -> tuple[int, dict[str, Any]]:
    """The prior steps that give the flat run ``config`` the hierarchy's training time, and how they were found.

    The budget is the seconds the hierarchy spent on the stages the flat run does not share
    (its stage 2 and prior); an existing flat run keeps the steps it was made with, since a run
    folder refuses another config.
    """
    if flat_steps is not None:
        return flat_steps, {"from": "--flat-steps"}
    if Run(run_dir).exists():
        return int(Run(run_dir).config.stages["prior"].steps), {"from": f"the existing run {run_dir}"}
    recorded = times.get(str(hierarchy.resolve()), {})
    names = [name for name in Run(hierarchy).config.stage_names() if name not in reused]
    if any(name not in recorded for name in names):
        default = int(load_config(config, overrides).stages["prior"].steps)
        log(
            f"{config}: no training seconds recorded for stages {names} of {hierarchy} "
            f"(trained elsewhere); the flat prior keeps its {default} steps (--flat-steps sets them)"
        )
        return default, {"from": "the config (the hierarchy's training seconds are not recorded)"}
    budget = sum(float(recorded[name]["train_seconds"]) for name in names)
    probe = QUICK_PROBE_STEPS if quick else PROBE_STEPS
    per_step = seconds_per_prior_step(config, overrides, hierarchy, probe)
    steps = max(1, round(budget / per_step))
    log(f"{config}: prior {steps} steps = {budget:.1f} s of {hierarchy}'s stages {names} / {per_step:.4f} s per step")
    how = {"from": "time", "budget_seconds": round(budget, 1), "seconds_per_step": round(per_step, 5), "probe": probe}
    return steps, {**how, "budget_stages": names}


# --------------------------------------------------------------------------- classifier


def conv_block(inputs: int, outputs: int) -> list[nn.Module]:
    """A 3x3 convolution (no bias: batch norm follows), batch norm and ReLU."""
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]


class ColourClassifier(nn.Module):
    """A small CNN for 32x32 colour images: uint8 (B, 3, 32, 32) -> logits (B, classes).

    Four convolutions with batch norm, a halving after each of the first three, then two linear
    layers; the first gives the 128 penultimate features the figures are taken on, as
    :class:`quality.Classifier`'s does, and ``net[:-1]`` / ``net[-1]`` split it the same way.
    Most of its convolutions run at 16x16 and below, which keeps an epoch of CIFAR-10's 49,000
    training images under a minute on one CPU core.
    """

    def __init__(self, channels: int = 3, height: int = 32, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        if min(height, width) < 8:
            raise ValueError(f"images of {height}x{width}: the classifier needs at least 8x8")
        self.net = nn.Sequential(
            *conv_block(channels, 32), nn.MaxPool2d(2),  # 16x16
            *conv_block(32, 64), nn.MaxPool2d(2),  # 8x8
            *conv_block(64, 128), nn.MaxPool2d(2),  # 4x4
            *conv_block(128, 128),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.2),
            nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, classes),
        )  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.float() / 127.5 - 1.0)


def crop_and_flip(images: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """uint8 (B, C, H, W) -> each image cut at a random offset from its copy padded by ``pad`` black
    pixels a side, and mirrored left to right with probability 1/2 (the usual CIFAR augmentation)."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train_colour_classifier(data: ImageData, epochs: int, seed: int = 0, *, classes: int = 10) -> ColourClassifier:
    """Train :class:`ColourClassifier` on the training split, batches of 128 cropped and flipped anew.

    AdamW under a one-cycle schedule, as :func:`quality.train_classifier`. No label smoothing: it
    would cap the classifier's confidence near 0.9, the threshold of the confidence figure.
    """
    model = fit_classifier(
        data,
        lambda: ColourClassifier(*data.image_shape, classes),
        epochs,
        seed,
        lr=4e-3,
        weight_decay=5e-4,
        batch=128,
        augment=lambda x, gen: crop_and_flip(x, COLOUR_PAD, gen),
    )
    assert isinstance(model, ColourClassifier)
    return model


def is_cifar10(cfg: Config, data: ImageData) -> bool:
    """Whether ``cfg`` reads CIFAR-10 (or a slice of it): 32x32 colour images in its ten class folders."""
    if cfg.data.source != "folder" or cfg.data.path is None or data.image_shape != (3, 32, 32):
        return False
    return tuple(list_folder(Path(cfg.data.path)).classes) == CIFAR10_CLASSES


def classifier_for(
    cfg: Config, data: ImageData, out: Path, epochs: int | None
) -> tuple[Classifier | ColourClassifier, dict[str, Any]]:
    """The classifier of ``cfg``'s data: loaded from its file in ``out``, or trained on the training split and saved.

    CIFAR-10 gets :class:`ColourClassifier`, every other data set :class:`quality.Classifier`.
    ``epochs`` None takes :data:`DIGIT_EPOCHS` for MNIST digits, :data:`COLOUR_EPOCHS` for
    CIFAR-10, else :data:`OTHER_EPOCHS`. The file's name carries a digest of the data's config
    and the training settings, so another data set or split gets a classifier of its own.
    """
    if data.train_labels is None or data.heldout_labels is None:
        raise ProgvqError(f"data source {cfg.data.source!r} has no labels: the figures need a classifier of them")
    c, h, w = data.image_shape
    if cfg.data.source == "mnist" and (c, h, w) == (1, 28, 28):
        kind, classes, names = "digits", 10, [str(d) for d in range(10)]
    elif cfg.data.source == "shapes":
        kind, classes, names = "shapes", len(SHAPE_CLASSES), list(SHAPE_CLASSES)
    elif is_cifar10(cfg, data):
        kind, classes, names = "cifar10", len(CIFAR10_CLASSES), list(CIFAR10_CLASSES)
    else:
        kind, classes, names = "images", data.num_classes, [str(k) for k in range(data.num_classes)]
    if epochs is None:
        epochs = {"digits": DIGIT_EPOCHS, "cifar10": COLOUR_EPOCHS}.get(kind, OTHER_EPOCHS)
    meta: dict[str, Any] = {"kind": kind, "shape": [c, h, w], "classes": classes, "epochs": epochs, "seed": 0}
    if kind == "cifar10":
        meta["crop_pad"] = COLOUR_PAD  # only here, so the other data sets' cached classifiers keep their names
    key = json.dumps({"data": cfg.identity()["data"], **meta}, sort_keys=True)
    path = out / f"classifier-{cfg.data.source}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    model: Classifier | ColourClassifier = (
        ColourClassifier(c, h, w, classes) if kind == "cifar10" else Classifier(c, h, w, classes)
    )
    info: dict[str, Any] = {"file": str(path), **meta, "class_names": names}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        info["trained_before"] = True
    else:
        start = time.perf_counter()
        log(f"classifier: training on {len(data.train)} images, {epochs} epochs")
        if kind == "cifar10":
            model = train_colour_classifier(data, epochs, classes=classes)
        else:
            # no shifts but for digits: shapes sit anywhere, and a rolled copy would wrap the shapes
            # that touch a border around to the other side
            model = train_classifier(data, epochs, classes=classes, max_shift=2 if kind == "digits" else 0)
        info["seconds"] = round(time.perf_counter() - start, 1)
        state = {"state_dict": model.state_dict(), "meta": meta}
        atomic_write(path, lambda f: torch.save(state, f))
    model.eval()
    return model, info


@torch.no_grad()
def classify(model: Classifier | ColourClassifier, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """uint8 images (N, C, H, W) -> penultimate features (N, 128) float64 and class probabilities (N, K) float64."""
    model.eval()
    features, probs = [], []
    for chunk in batches(images, batch_size):
        hidden = model.net[:-1](chunk.float() / 127.5 - 1.0)  # the input scaling of Classifier.forward
        features.append(hidden.double())
        probs.append(model.net[-1](hidden).softmax(1).double())
    return torch.cat(features), torch.cat(probs)


# --------------------------------------------------------------------------- figures


def rounded(figures: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """``figures`` with its floats rounded (the JSON keeps what the estimates can tell)."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in figures.items()}


def sample_figures(
    images: Tensor, probs: Tensor, features: Tensor, asked: Tensor | None, ref: dict[str, Tensor]
) -> dict[str, Any]:
    """Every figure of a set of images (N, C, H, W) uint8 against the reference features and pixels in ``ref``."""
    precision, recall = precision_recall(ref["heldout_features"], features, k=K)
    return {
        "frechet_distance": round(frechet_distance(features, ref["heldout_features"]), 3),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        **rounded(label_figures(probs, asked)),
        "memorised_pixels": rounded(memorised(images.flatten(1).double(), ref["train_pixels"], ref["heldout_pixels"])),
        "memorised_features": rounded(memorised(features, ref["train_features"], ref["heldout_features"])),
    }


def draw(
    model: Hierarchy, n: int, seed: int, labels: Tensor | None, temperatures: dict[str, float] | None = None
) -> tuple[Tensor, float]:
    """``n`` samples (n, C, H, W) uint8 and the seconds taken; ``CHUNK`` per call, call j seeded ``seed * 1000 + j``.

    ``temperatures`` (keys of :meth:`Hierarchy.sample`) override the run's ``sample`` settings.
    """
    start = time.perf_counter()
    parts = []
    for j, begin in enumerate(range(0, n, CHUNK)):
        size = min(CHUNK, n - begin)
        label = None if labels is None else labels[begin : begin + size]
        parts.append(model.sample(size, seed=seed * 1000 + j, label=label, **(temperatures or {})))
    return torch.cat(parts), time.perf_counter() - start


@torch.no_grad()
def heldout_bits(model: Hierarchy, images: Tensor, batch_size: int = 500) -> dict[str, float]:
    """The bound in bits per dim of the data's own pixels on ``images`` (N, C, H, W), by level and in total.

    A class-conditional prior's is the marginal over its classes, so it compares with an
    unconditional prior's.
    """
    return {key: round(value, 4) for key, value in model.mean_bits(images, batch_size).items()}


def score_run(
    name: str,
    run_dir: Path,
    model: Hierarchy,
    classifier: Classifier | ColourClassifier,
    data: ImageData,
    ref: dict[str, Tensor],
    args: argparse.Namespace,
    times: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The figures of one run's samples, its held-out bits/dim and its training seconds."""
    labels = None
    if model.num_classes:
        # classes at the training split's frequencies, from a generator of their own
        assert data.train_labels is not None
        freq = torch.bincount(data.train_labels, minlength=model.num_classes)[: model.num_classes].double()
        gen = torch.Generator().manual_seed(args.seed)
        labels = torch.multinomial(freq / freq.sum(), args.n, replacement=True, generator=gen)
    temperatures = {
        key: getattr(args, key)
        for key in ("temperature", "code_temperature", "pixel_temperature", "guidance")
        if getattr(args, key) is not None and (key != "guidance" or model.num_classes)
    }
    samples, seconds = draw(model, args.n, args.seed, labels, temperatures)
    log(f"{name}: {args.n} samples in {seconds:.1f} s")
    features, probs = classify(classifier, samples)
    figures: dict[str, Any] = {
        "run": str(run_dir),
        "levels": model.num_levels,
        "class_conditional": bool(model.num_classes),
        "sample_seconds": round(seconds, 1),
        "temperatures": {
            key: temperatures.get(key, getattr(model.config.sample, key))
            for key in ("temperature", "code_temperature", "pixel_temperature", "guidance")
        },
        **sample_figures(samples, probs, features, labels, ref),
    }
    if model.num_classes:
        asked = torch.arange(args.n) % model.num_classes
        in_turn, _ = draw(model, args.n, args.seed + 1, asked, temperatures)
        turn_features, turn_probs = classify(classifier, in_turn)
        figures["classes_in_turn"] = {
            "frechet_distance": round(frechet_distance(turn_features, ref["heldout_features"]), 3),
            **rounded(label_figures(turn_probs, asked)),
        }
    start = time.perf_counter()
    figures["heldout_bits_per_dim"] = heldout_bits(model, data.heldout)
    figures["eval_seconds"] = round(time.perf_counter() - start, 1)
    figures["training_seconds"] = times.get(str(run_dir.resolve()), "not recorded")
    figures["trained_with"] = model.trained_with
    if args.grid_dir:
        grid_dir = Path(args.grid_dir)
        if model.num_classes:  # ten draws of every class, one class per column
            grid = image_grid(in_turn[: 10 * model.num_classes], nrow=model.num_classes)
        else:
            grid = image_grid(samples[:64], nrow=8)
        save_png(grid, grid_dir / f"samples_{name}.png")
        pixel_temperature = temperatures.get("pixel_temperature", model.config.sample.pixel_temperature)
        shown = None if data.heldout_labels is None or not model.num_classes else data.heldout_labels[:10]
        levels = through_levels(model, data.heldout[:10], pixel_temperature, args.seed, shown)
        save_png(levels, grid_dir / f"levels_{name}.png")
    return figures


@torch.no_grad()
def through_levels(
    model: Hierarchy, images: Tensor, pixel_temperature: float, seed: int, labels: Tensor | None = None
) -> Tensor:
    """A grid (C, H', W') of ``images`` (n, C, H, W) uint8, one per column: the originals in the first row, then
    each image rebuilt from its own codes of level 1, 2, ..., L alone (the codes below drawn at temperature 0,
    the most likely; the pixels at ``pixel_temperature``, as samples are). ``labels`` (n,): the images' classes,
    which class-conditional code decoders take."""
    codes = model.encode(images.to(model.device))
    rows = [images.cpu()]
    for k in range(1, model.num_levels + 1):
        gen = torch.Generator().manual_seed(seed)
        decoded = model.decode(
            codes[k - 1], k, code_temperature=0.0, pixel_temperature=pixel_temperature, generator=gen, labels=labels
        )
        rows.append(decoded.cpu())
    return image_grid(torch.cat(rows), nrow=len(images))


# --------------------------------------------------------------------------- lossless files

#: Pillow's settings for the lossless file baselines: its smallest PNG and WebP lossless files.
PNG_SETTINGS: dict[str, Any] = {"format": "PNG", "optimize": True, "compress_level": 9}
WEBP_SETTINGS: dict[str, Any] = {"format": "WEBP", "lossless": True, "method": 6}


def file_bytes(image: Tensor, settings: dict[str, Any]) -> int:
    """The size in bytes of one uint8 image (C, H, W), C 1 or 3, saved by Pillow with ``settings``."""
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB")
    buffer = io.BytesIO()
    picture.save(buffer, **settings)
    return buffer.tell()


def lossless_baselines(images: Tensor) -> dict[str, Any]:
    """Bits per dim of uint8 images (N, C, H, W) as PNG and WebP lossless files, averaged over the images.

    Each image is its own file (bytes * 8 / (C * H * W)): what a codec that sees one image at a
    time spends, beside the model's bound on the same images. The files' headers are counted,
    as a stored file carries them (a PNG's chunks take 57 bytes, 0.15 bits per dim of a 32x32
    colour image; a WebP file's 25). Grey images (C = 1) are saved as grey PNGs; WebP has no grey
    format, so Pillow saves them as RGB.
    """
    dims = images[0].numel()
    figures: dict[str, Any] = {"images": len(images)}
    for name, settings in (("png", PNG_SETTINGS), ("webp", WEBP_SETTINGS)):
        start = time.perf_counter()
        sizes = [file_bytes(image, settings) for image in images]
        figures[f"{name}_bits_per_dim"] = round(8 * sum(sizes) / (len(sizes) * dims), 4)
        figures[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    figures["settings"] = {
        "png": {k: v for k, v in PNG_SETTINGS.items() if k != "format"},
        "webp": {k: v for k, v in WEBP_SETTINGS.items() if k != "format"},
        "pillow": PIL.__version__,
    }
    return figures


# --------------------------------------------------------------------------- report


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def bound_cell(bits: dict[str, float]) -> str:
    """The held-out bound as its total and the parts it sums, e.g. ``1.304 = 1.026 + 0.216 + 0.062``."""
    parts = " + ".join(f"{value:.4f}" for key, value in bits.items() if key != "total")
    return f"{bits['total']:.4f} = {parts}" if parts else f"{bits['total']:.4f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per run, after the real held-out images, N training images (the floor) and the held-out
    images' PNG and WebP lossless files."""
    head = (
        "| images | FD to held-out | precision | recall | mean confidence | >= 0.9 | label entropy (bits) | as asked "
        "| memorised pixels: near, lone | memorised features: near, lone | bits/dim | training s | sampling s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    real, floor = result["reference"]["heldout"], result["reference"]["train"]
    lines.append(
        f"| held-out ({real['images']}, real) | - | - | - | {_cell(real['mean_confidence'])} "
        f"| {_cell(real['share_confident'])} | {_cell(real['label_entropy_bits'])} "
        f"| {_cell(real['share_as_asked'])} (accuracy) | - | - | - | - | - |"
    )
    lines.append(
        f"| training ({floor['images']}, the floor) | {_cell(floor['frechet_distance'])} | {_cell(floor['precision'])} "
        f"| {_cell(floor['recall'])} | {_cell(floor['mean_confidence'])} | {_cell(floor['share_confident'])} "
        f"| {_cell(floor['label_entropy_bits'])} | - | - | - | - | - | - |"
    )
    files = result["reference"]["lossless"]
    for label, key in (("PNG", "png"), ("WebP lossless", "webp")):
        lines.append(
            f"| held-out as {label} files ({files['images']}) | - | - | - | - | - | - | - | - | - "
            f"| {_cell(files[f'{key}_bits_per_dim'], 4)} | - | - |"
        )
    expected, held_lone = None, ""
    for name, run in result["runs"].items():
        px, ft = run["memorised_pixels"], run["memorised_features"]
        expected = px["share_expected"]
        held_lone = (
            f"{px['heldout_share_lone_copies']:.3f} in pixels, {ft['heldout_share_lone_copies']:.3f} in features"
        )
        turn = run.get("classes_in_turn", {}).get("share_as_asked")
        seconds = run["training_seconds"]
        total = round(sum(s["train_seconds"] for s in seconds.values()), 1) if isinstance(seconds, dict) else None
        lines.append(
            f"| {name} | {_cell(run['frechet_distance'])} | {_cell(run['precision'])} | {_cell(run['recall'])} "
            f"| {_cell(run['mean_confidence'])} | {_cell(run['share_confident'])} "
            f"| {_cell(run['label_entropy_bits'])} | {_cell(turn)} "
            f"| {_cell(px['share_under'])}, {_cell(px['share_lone_copies'])} "
            f"| {_cell(ft['share_under'])}, {_cell(ft['share_lone_copies'])} "
            f"| {bound_cell(run['heldout_bits_per_dim'])} "
            f"| {_cell(total, 1)} | {_cell(run['sample_seconds'], 1)} |"
        )
    if expected is not None:
        lines.append("")
        lines.append(
            f"Memorised, near: share of samples nearer a training image than {expected:.0%} of held-out images "
            f"are (expected {expected:.2f}); lone: share nearer one training image than a third of the distance "
            f"to the next (copies; held-out images: {held_lone}). Label entropy: at most "
            f"{result['reference']['heldout']['max_entropy_bits']:.3f} bits "
            f"({result['classifier']['classes']} classes)."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names, or whole paths where two runs share a name."""
    names = [path.name for path in run_dirs]
    return [path.name if names.count(path.name) == 1 else str(path).replace("/", "_") for path in run_dirs]


def default_configs(data: str) -> list[Path]:
    """The configs ``--data`` trains without ``--config``: :data:`DEFAULT_CONFIGS`, less the optional ones not there."""
    configs = []
    for name in DEFAULT_CONFIGS[data]:
        if name in OPTIONAL_CONFIGS and not (ROOT / name).exists():
            log(f"{name} not found: no flat baseline")
            continue
        configs.append(ROOT / name)
    return configs


def check_data(data_name: str, cfg: Config, data: ImageData, where: Path | str) -> None:
    """Refuse runs whose data is not ``--data``'s: another source, or for CIFAR-10 not its class folders at 32x32."""
    if cfg.data.source != DATA_SOURCES[data_name]:
        raise ProgvqError(f"{where}: its data source is {cfg.data.source!r}, not --data {data_name}'s")
    if data_name == "cifar10" and not is_cifar10(cfg, data):
        assert cfg.data.path is not None  # a folder source has read it
        classes = list_folder(Path(cfg.data.path)).classes
        raise ProgvqError(
            f"{where}: data.path {cfg.data.path} is not CIFAR-10 at 32x32: expected 3x32x32 images in the class "
            f"folders {', '.join(CIFAR10_CLASSES)}; got {'x'.join(map(str, data.image_shape))} images in "
            + (f"the class folders {', '.join(classes)}" if classes else "no class folders")
        )


def baselines_only(args: argparse.Namespace, configs: list[Path]) -> None:
    """``--baselines-only``: the held-out split's PNG and WebP bits/dim (first run or config), no training."""
    if args.run:
        cfg = Run(Path(args.run[0])).config
        where: Path | str = args.run[0]
    else:
        cfg = load_config(configs[0], args.set)
        where = configs[0]
    data = load_dataset(cfg.data, progress=False, log=log)
    if args.data is not None:
        check_data(args.data, cfg, data, where)
    figures = lossless_baselines(data.heldout)
    result = {"source": str(where), "data": cfg.identity()["data"], "lossless": figures}
    if args.json:
        write_json(Path(args.json), result)
    c, h, w = data.image_shape
    print(f"| {figures['images']} held-out {c}x{h}x{w} images of {where} | bits/dim |")
    print("|---|---|")
    for label, key in (("PNG", "png"), ("WebP lossless", "webp")):
        settings = ", ".join(f"{k}={v}" for k, v in figures["settings"][key].items())
        print(f"| {label} ({settings}) | {figures[f'{key}_bits_per_dim']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="a trained run folder (repeatable)")
    parser.add_argument("--config", action="append", default=[], help="train this config first (repeatable)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every config trained, as progvq train --set (repeatable)",
    )
    parser.add_argument("--runs-dir", default="runs", help="where --config runs are trained (default: runs)")
    parser.add_argument("--data", choices=sorted(DEFAULT_CONFIGS), help="the runs' data set (checked)")
    parser.add_argument("--n", type=int, default=1000, help="samples per run (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/samples-benchmark", help="classifier cache and training times")
    parser.add_argument("--json", help="figures as JSON (default: OUT/samples.json)")
    parser.add_argument("--grid-dir", help="a PNG grid of 64 samples per run")
    for flag in ("--temperature", "--code-temperature", "--pixel-temperature", "--guidance"):
        parser.add_argument(flag, type=float, help=f"sampling {flag[2:]} (default: each run's sample settings)")
    parser.add_argument("--flat-steps", type=int, help="a flat config's prior steps, instead of equal training time")
    parser.add_argument(
        "--classifier-epochs",
        type=int,
        help=f"default: {DIGIT_EPOCHS} for digits (quality.py's), {COLOUR_EPOCHS} for CIFAR-10, else {OTHER_EPOCHS}",
    )
    parser.add_argument("--quick", action="store_true", help="classifier 1 epoch; configs a few steps per stage")
    parser.add_argument(
        "--baselines-only",
        action="store_true",
        help="only the held-out split's PNG and WebP bits/dim (of the first --run or config): no training, no samples",
    )
    args = parser.parse_args()
    if args.n < K + 1:
        parser.error(f"--n must be at least {K + 1} (precision and recall use {K} neighbours)")
    configs = [Path(c) for c in args.config]
    if not configs and not args.run:
        if args.data is None:
            parser.error("give --run RUN, --config CONFIG or --data " + "|".join(sorted(DEFAULT_CONFIGS)))
        configs = default_configs(args.data)
    if args.set and not configs:
        parser.error("--set applies to the configs trained: give --config or --data without --run")
    if args.baselines_only:
        try:
            baselines_only(args, configs)
        except ProgvqError as err:
            raise SystemExit(f"samples.py: {err}") from None
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "training-times.json"
    result: dict[str, Any] = {
        "n": args.n,
        "seed": args.seed,
        "hardware": describe(torch.device("cpu")),
        "threads": torch.get_num_threads(),
    }
    wall = time.perf_counter()
    try:
        run_dirs = [Path(r) for r in args.run]
        if configs:
            trained, result["training"] = train_configs(
                configs,
                Path(args.runs_dir),
                sets=args.set,
                quick=args.quick,
                flat_steps=args.flat_steps,
                times_path=times_path,
            )
            run_dirs += trained
        models = [Hierarchy.load(path) for path in run_dirs]
        cfg = models[0].config
        for path, model in zip(run_dirs, models, strict=True):
            if model.config.identity()["data"] != cfg.identity()["data"]:
                raise ProgvqError(f"{path}: trained on other data than {run_dirs[0]}; score one data set per call")
        data = load_dataset(cfg.data, progress=False, log=log)  # the data's own images; each canvas pads them
        if args.data is not None:
            check_data(args.data, cfg, data, run_dirs[0])
        classifier, result["classifier"] = classifier_for(cfg, data, out, 1 if args.quick else args.classifier_epochs)
        assert data.heldout_labels is not None

        heldout_features, heldout_probs = classify(classifier, data.heldout)
        train_features, train_probs = classify(classifier, data.train)
        result["classifier"]["heldout_accuracy"] = round(
            float((heldout_probs.argmax(1) == data.heldout_labels).double().mean()), 4
        )
        ref = {
            "heldout_features": heldout_features,
            "train_features": train_features,
            "heldout_pixels": data.heldout.flatten(1).double(),
            "train_pixels": data.train.flatten(1).double(),
        }
        # the floor: N training images (a seeded choice) against the held-out split
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed))[: args.n]
        precision, recall = precision_recall(heldout_features, train_features[pick], k=K)
        result["data"] = {
            "config": cfg.identity()["data"],
            "train": len(data.train),
            "heldout": len(data.heldout),
            "image_shape": list(data.image_shape),
        }
        start = time.perf_counter()
        result["reference"] = {
            "heldout": {"images": len(data.heldout), **rounded(label_figures(heldout_probs, data.heldout_labels))},
            "train": {
                "images": len(pick),
                "frechet_distance": round(frechet_distance(train_features[pick], heldout_features), 3),
                "precision": round(precision, 4),
                "recall": round(recall, 4),
                **rounded(label_figures(train_probs[pick])),
            },
            # the same held-out images the runs' bound is taken on, each as a lossless file
            "lossless": lossless_baselines(data.heldout),
        }
        log(f"reference figures in {time.perf_counter() - start:.1f} s")
        times = read_times(times_path)
        result["runs"] = {}
        for name, path, model in zip(run_names(run_dirs), run_dirs, models, strict=True):
            result["runs"][name] = score_run(name, path, model, classifier, data, ref, args, times)
    except ProgvqError as err:
        raise SystemExit(f"samples.py: {err}") from None
    result["total_minutes"] = round((time.perf_counter() - wall) / 60, 2)
    write_json(Path(args.json) if args.json else out / "samples.json", result)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
