"""MNIST quality benchmark: factorised vs autoregressive decoders, class-conditional samples, inpainting.

    python benchmarks/quality.py [--factorised-run runs/quality-factorised] [--ar-run runs/quality-ar]
                                 [--docs docs] [--quick]

Run from the project root (the configs read the MNIST test set the package ships). What it does:

1. Trains ``configs/mnist-ar.yaml`` with a factorised level-2 decoder and an unconditional prior
   (what ``mnist.yaml`` was before its pixelcnn decoder), and as it is (autoregressive level-2 decoder,
   class-conditional prior); both have a logistic pixel decoder. The
   second reuses the first run's stage 1 (the configs' level 1 is the same), as ``train --all
   --from`` does, so only its stage 2 and prior are trained. To tell the decoder's part from
   the prior's, each also gets the other kind of prior on the same codes (stages 1 and 2
   reused, only the prior trained). Stages already done are not retrained (the JSON
   says which), so a second call only evaluates.
2. Held-out figures of both: the likelihood bound in bits/dim by level, PSNR, code accuracy.
3. Sample grids to ``docs/``: 64 samples of each hierarchy, and the class-conditional prior's
   samples with one class per column.
4. A small CNN classifier trained on the 9,000 training digits (its held-out accuracy is
   reported, also on the hierarchies' reconstructions); it classifies 100 class-conditional
   samples per class (how often a sample shows the class it was asked for).
5. Inpainting: every held-out digit with its bottom half, then its right half, masked is
   completed 4 times by each hierarchy; the classifier says how often a completion is the
   original digit (chance: 10%), beside its accuracy on the masked digit with the hole left
   black (the baseline). Grids of some completions go to ``docs/``.

Prints JSON with every figure and the run times (also written to ``docs/quality.json``).
``--quick`` trains a few steps per stage and evaluates 100 held-out digits: a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from progvq.config import load_config
from progvq.data import ImageData, load_dataset
from progvq.hardware import describe
from progvq.hierarchy import Hierarchy
from progvq.images import image_grid, save_png
from progvq.inpaint import box_mask, inpaint_batch, masked_view
from progvq.run import Run
from stages import adopt, train_stage

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    f"stages.{s}.{k}={v}" for s in ("1", "2", "prior") for k, v in (("steps", 20), ("eval_every", 20), ("warmup", 5))
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(
    config: Path,
    run_dir: Path,
    overrides: list[str],
    reuse: Path | None = None,
    stages: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train every stage not done yet, after reusing ``reuse``'s equal stages (``train --all --from``);
    seconds per stage.

    ``stages`` names the stages expected to be reused, so a config that drifted from the run it
    reuses shows up as an error here rather than as a silently retrained stage.
    """
    cfg = load_config(config, overrides)
    run = Run(run_dir)
    if reuse is not None:
        adopted = adopt(cfg, run, Run(reuse), log=log) if not run.exists() else list(stages)
        missing = [name for name in stages if name not in adopted and run.state(name, cfg).state != "done"]
        if missing:
            raise SystemExit(f"{config}: stages {missing} of {reuse} were expected to be reused")
    times: dict[str, Any] = {}
    for name in cfg.stage_names():
        before = run.state(name, cfg).state == "done"
        start = time.perf_counter()
        result = train_stage(cfg, name, run, progress=False, log=log)
        times[name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "train_seconds": round(result.train_seconds, 1),
            "steps": result.step,
        }
        if before:
            times[name]["trained_before"] = str(reuse) if name in stages else "in this run directory"
    return times


# --------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """A small CNN: uint8 images (B, C, H, W) -> logits (B, classes); by default 28x28 grey digits, 10 classes.

    Three convolution and pooling blocks, then a head whose input is what ``height`` x ``width``
    (at least 8 each) leaves after three halvings (3x3 for digits).
    """

    def __init__(self, channels: int = 1, height: int = 28, width: int = 28, classes: int = 10) -> None:
        super().__init__()
        if min(height, width) < 8:
            raise ValueError(f"images of {height}x{width}: the classifier needs at least 8x8")
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 3x3
            nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(64 * (height // 8) * (width // 8), 128), nn.ReLU(), nn.Linear(128, classes),
        )  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.float() / 127.5 - 1.0)

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 1000) -> Tensor:
        """uint8 (N, C, H, W) -> (N,) int64 classes."""
        self.eval()
        return torch.cat([self(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def fit_classifier(
    data: ImageData,
    make_model: Callable[[], nn.Module],
    epochs: int,
    seed: int,
    *,
    lr: float,
    weight_decay: float,
    batch: int,
    augment: Callable[[Tensor, torch.Generator], Tensor],
) -> nn.Module:
    """The classifiers' one training loop: AdamW under a one-cycle schedule on the training split.

    ``make_model`` is called after the seed is set; each epoch draws a permutation from a generator
    seeded with ``seed``, and ``augment`` maps each batch of uint8 images (B, C, H, W) with it.
    """
    assert data.train_labels is not None
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train)
    batch = min(batch, n)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(2, epochs * (n // batch)))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            index = order[i : i + batch]
            loss = F.cross_entropy(model(augment(data.train[index], gen)), data.train_labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def train_classifier(
    data: ImageData, epochs: int, seed: int = 0, *, classes: int = 10, max_shift: int = 2
) -> Classifier:
    """Train on the training split, each batch shifted by up to ``max_shift`` pixels (rolled), so it
    judges shapes, not positions; digits sit in a 4-pixel border. ``max_shift`` 0 draws no shift."""

    def shift(x: Tensor, gen: torch.Generator) -> Tensor:
        if not max_shift:
            return x
        dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
        return torch.roll(x, shifts=(dy, dx), dims=(2, 3))

    model = fit_classifier(
        data, lambda: Classifier(*data.image_shape, classes), epochs, seed,
        lr=2e-3, weight_decay=1e-4, batch=64, augment=shift,
    )
    assert isinstance(model, Classifier)
    return model


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return round(float((pred == labels).float().mean()), 4)


# --------------------------------------------------------------------------- inpainting


MASKS = {"bottom": (0, 14, 28, 28), "right": (14, 0, 28, 28)}  # x0, y0, x1, y1 of the missing box, on the 28x28 digit


def inpainting(
    model: Hierarchy,
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    mask: Tensor,
    n: int,
    candidates: int,
    chunk: int = 100,
) -> tuple[dict[str, Any], Tensor]:
    """Complete every image n times; how often the classifier calls a completion the original digit."""
    start = time.perf_counter()
    done = torch.cat(
        [
            inpaint_batch(model, images[i : i + chunk], mask, n, seed=i, candidates=candidates)
            for i in range(0, len(images), chunk)
        ]
    )  # (N, n, 1, 28, 28)
    seconds = time.perf_counter() - start
    pred = classifier.predict(done.flatten(0, 1)).view(len(images), n)
    hits = pred == labels[:, None]
    figures = {
        "completions_classified_as_original": round(float(hits.float().mean()), 4),
        "digits_with_a_correct_completion": round(float(hits.any(1).float().mean()), 4),
        "candidates": candidates,
        "seconds": round(seconds, 1),
        "ms_per_completion": round(1000 * seconds / done[:, :, 0, 0, 0].numel(), 2),
    }
    return figures, done


def inpainting_grid(images: Tensor, mask: Tensor, done: Tensor, path: Path, count: int = 10) -> None:
    """Rows: original, masked input, then the completions of each of ``count`` digits (one per column)."""
    columns = [torch.cat([images[i : i + 1], masked_view(images[i], mask)[None], done[i]]) for i in range(count)]
    grid = torch.stack(columns, 1).flatten(0, 1)  # row-major: one row per kind, one column per digit
    save_png(image_grid(grid, nrow=count), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factorised-run", default="runs/quality-factorised")
    parser.add_argument("--ar-run", default="runs/quality-ar")
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--classifier-epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a few steps per stage, 100 held-out digits")
    args = parser.parse_args()
    overrides = QUICK if args.quick else []
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    fact, ar = Path(args.factorised_run), Path(args.ar_run)
    mnist_ar = ROOT / "configs" / "mnist-ar.yaml"
    # the factorised hierarchy is mnist-ar.yaml with a factorised level-2 decoder
    factorised = ["stages.2.decoder={kind: factorised}"]
    # name: (config, overrides, run directory, run whose equal stages it reuses, stages it reuses)
    plan = {
        "factorised": (mnist_ar, [*factorised, "stages.prior.class_conditional=false"], fact, None, ()),
        "autoregressive": (mnist_ar, [], ar, fact, ("1",)),
        "factorised_class_conditional": (
            mnist_ar,
            factorised,
            fact.with_name(fact.name + "-cc"),
            fact,
            ("1", "2"),
        ),
        "autoregressive_unconditional": (
            mnist_ar,
            ["stages.prior.class_conditional=false"],
            ar.with_name(ar.name + "-uncond"),
            ar,
            ("1", "2"),
        ),
    }
    figures: dict[str, Any] = {
        "hardware": describe(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "training": {},
    }
    wall = time.perf_counter()

    # 1. training, each run after the one it reuses stages from
    for name, (config, sets, run_dir, reuse, reused) in plan.items():
        figures["training"][name] = train(config, run_dir, [*overrides, *sets], reuse, reused)

    models = {name: Hierarchy.load(run_dir) for name, (_, _, run_dir, _, _) in plan.items()}
    figures["trained_with"] = {name: model.trained_with for name, model in models.items()}
    figures["pixels"] = "per dim of the data's own 28x28 digit; the padding's bits stay in the bound"
    data = load_dataset(models["factorised"].config.data, models["factorised"].config.total_downsample())
    assert data.train_labels is not None and data.heldout_labels is not None
    heldout, heldout_labels = data.heldout, data.heldout_labels
    if args.quick:
        heldout, heldout_labels = heldout[:100], heldout_labels[:100]
    # 2. held-out figures: bits/dim by level (for the class-conditional prior: the marginal over classes)
    figures["heldout"] = {}
    for kind, model in models.items():
        start = time.perf_counter()
        report = model.evaluate(heldout, labels=heldout_labels if model.num_classes else None)
        report["eval_seconds"] = round(time.perf_counter() - start, 1)
        figures["heldout"][kind] = report
        log(f"{kind}: {json.dumps(report['bits_per_dim'])}")

    # 3. samples
    figures["sampling"] = {}
    for kind in ("factorised", "autoregressive"):
        model = models[kind]
        start = time.perf_counter()
        samples = model.sample(64, seed=0, label=torch.arange(64) % 8 if model.num_classes else None)
        figures["sampling"][f"{kind}_64_seconds"] = round(time.perf_counter() - start, 2)
        save_png(image_grid(samples, nrow=8), docs / f"quality_{kind}_samples.png")
    per_class = models["autoregressive"].sample(80, seed=1)  # classes 0..9 in turn: one class per column
    save_png(image_grid(per_class, nrow=10), docs / "quality_class_samples.png")

    # 4. classifier
    start = time.perf_counter()
    classifier = train_classifier(data, args.classifier_epochs)
    figures["classifier"] = {"seconds": round(time.perf_counter() - start, 1), "epochs": args.classifier_epochs}
    figures["classifier"]["heldout_accuracy"] = accuracy(classifier.predict(data.heldout), data.heldout_labels)
    for kind in ("factorised", "autoregressive"):
        model = models[kind]
        recon = torch.cat(
            [model.reconstruct(heldout[i : i + 500], level=model.num_levels) for i in range(0, len(heldout), 500)]
        )
        key = f"accuracy_on_{kind}_reconstructions_through_level_2"
        figures["classifier"][key] = accuracy(classifier.predict(recon), heldout_labels)
    wanted = torch.arange(1000) % 10
    figures["class_conditional_samples"] = {"samples": 1000}
    for kind in ("autoregressive", "factorised_class_conditional"):
        samples = torch.cat(
            [models[kind].sample(200, seed=10 + i, label=wanted[i : i + 200]) for i in range(0, 1000, 200)]
        )
        key = f"{kind}_classified_as_the_class_asked_for"
        figures["class_conditional_samples"][key] = accuracy(classifier.predict(samples), wanted)
    for kind in ("factorised", "autoregressive_unconditional"):
        counts = torch.bincount(classifier.predict(models[kind].sample(1000, seed=10)), minlength=10).tolist()
        figures["class_conditional_samples"][f"{kind}_unconditional_samples_per_class"] = counts

    # 5. inpainting
    figures["inpainting"] = {"digits": len(heldout), "completions_per_digit": args.completions, "chance": 0.1}
    # the unconditional priors with 1 and 10 candidates, the class-conditional ones with one per class
    settings = [(kind, c) for kind in ("factorised", "autoregressive_unconditional") for c in (1, 10)]
    settings += [("factorised_class_conditional", 10), ("autoregressive", 10)]
    for name, box in MASKS.items():
        mask = box_mask(28, 28, box)
        baseline = heldout.masked_fill(mask, 0)  # the hole left black
        part: dict[str, Any] = {
            "box_x0_y0_x1_y1": list(box),
            "baseline_masked_input_accuracy": accuracy(classifier.predict(baseline), heldout_labels),
        }
        for kind, candidates in settings:
            result, done = inpainting(
                models[kind], classifier, heldout, heldout_labels, mask, args.completions, candidates
            )
            part[f"{kind}_candidates_{candidates}"] = result
            log(f"inpainting {name} {kind} x{candidates}: {result}")
            if (kind, candidates) in (("factorised", 1), ("autoregressive", 10)):
                inpainting_grid(heldout, mask, done, docs / f"quality_inpaint_{name}_{kind}.png")
        figures["inpainting"][name] = part

    figures["total_minutes"] = round((time.perf_counter() - wall) / 60, 2)
    text = json.dumps(figures, indent=2)
    (docs / "quality.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
