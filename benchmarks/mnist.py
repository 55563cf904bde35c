"""MNIST benchmark: train the whole hierarchy of configs/mnist.yaml and print its figures.

    python benchmarks/mnist.py [--run-dir runs/mnist-bench] [--samples docs/mnist_samples.png] [--set KEY=VALUE ...]

Prints JSON: wall-clock of each stage, stage-1 images/s, held-out figures per
level (PSNR, code accuracy, codes used), prior bits/code, the likelihood bound
in bits/dim split by level, and writes a grid of 64 samples. Run from the
project root (the config reads the MNIST test set the package ships). A run directory that
already has finished stages is reused; pass a fresh one to time everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from progvq.config import load_config
from progvq.data import load_dataset
from progvq.hardware import describe
from progvq.hierarchy import Hierarchy
from progvq.images import image_grid, save_npz, save_png
from stages import train_stage

ROOT = Path(__file__).resolve().parents[1]


def step_speed(cfg, steps: int = 20) -> float:
    """Images/s of bare stage-1 training steps on random data (no data loading, logging or evaluation)."""
    from progvq.build import build_level

    torch.manual_seed(0)
    level = build_level(cfg.level(1), cfg.data.channels, 0).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(level.parameters(), lr=1e-3)
    size = cfg.data.size or 32
    x = torch.rand(cfg.level(1).batch_size, cfg.data.channels, size, size) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last)
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        out = level(x)
        loss = out.nll.mean() + out.quant.commit_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    parser.add_argument("--run-dir", default="runs/mnist-bench")
    parser.add_argument("--samples", default=str(ROOT / "docs" / "mnist_samples.png"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir)
    # where the figures come from: the CPU, and (below) the precision each stage trained in
    figures: dict = {"hardware": describe(torch.device("cpu")), "threads": torch.get_num_threads(), "stages": {}}
    for name in cfg.stage_names():
        start = time.perf_counter()
        result = train_stage(cfg, name, run_dir, progress=False, log=lambda s: print(s, file=sys.stderr))
        seconds = time.perf_counter() - start
        figures["stages"][name] = {
            # everything: data, encoding of lower levels, training, evaluations, checkpoints
            "seconds": round(seconds, 1),
            "train_seconds": round(result.train_seconds, 1),  # training steps alone
            "steps": result.step,
            "images_per_s": round(result.images / max(result.train_seconds, 1e-9), 1),
        }
    figures["total_minutes"] = round(sum(s["seconds"] for s in figures["stages"].values()) / 60, 2)
    # the step speed of the stage-1 model alone, as a yardstick of how fast this machine is right now
    figures["stage1_step_images_per_s"] = round(step_speed(cfg), 1)

    model = Hierarchy.load(run_dir)
    data = load_dataset(model.config.data, model.config.total_downsample())
    start = time.perf_counter()
    figures["trained_with"] = model.trained_with
    figures["pixels"] = (
        f"per dim of the data's own {'x'.join(map(str, model.image_shape))} images; "
        "the padding's bits stay in the bound"
    )
    figures["heldout"] = model.evaluate(data.heldout)
    figures["eval_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    samples = model.sample(64, seed=0)  # at the run's sampling temperatures
    figures["sample_64_seconds"] = round(time.perf_counter() - start, 2)
    save_png(image_grid(samples, nrow=8), args.samples)
    save_npz(samples, Path(args.samples).with_suffix(".npz"))
    recon = model.reconstruct(data.heldout[:32], level=model.num_levels)
    pairs = torch.cat([torch.cat([data.heldout[i : i + 8], recon[i : i + 8]]) for i in range(0, 32, 8)])
    save_png(image_grid(pairs, nrow=8), Path(args.samples).with_name("mnist_reconstructions.png"))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
