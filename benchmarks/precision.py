"""bf16 against fp32 on MNIST stage 1: speed, and held-out PSNR at equal steps and at equal wall-clock.

    python benchmarks/precision.py [--config configs/mnist.yaml] [--steps 1600]

First measures the bf16/fp32 speed ratio of stage 1's training steps in
alternating short runs (so a neighbour's load on this shared machine hits both
alike; the median ratio is kept). Then trains stage 1 from the same seed, each
in a fresh run directory:

1. fp32 for ``--steps`` steps;
2. bf16 for ``--steps`` times the ratio: the steps that fit in the fp32 run's
   training time (the equal wall-clock comparison);
3. with ``--same-steps``, bf16 for ``--steps`` too (the cost of the lower
   precision alone).

Prints JSON with each run's steps, training seconds, images/s, held-out PSNR
and bits/dim. Run from the project root.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from progvq.hardware import describe  # after the path is set


def train(config: str, precision: str, steps: int) -> dict:
    from progvq.config import load_config
    from stages import train_stage

    cfg = load_config(
        config, [f"stages.1.precision={precision}", f"stages.1.steps={steps}", f"stages.1.eval_every={steps}"]
    )
    run = Path(tempfile.mkdtemp(prefix=f"precision-{precision}-"))
    result = train_stage(cfg, "1", run, progress=False, log=lambda m: None)
    return {
        "precision": precision,
        "steps": steps,
        "train_seconds": round(result.train_seconds, 1),
        "images_per_s": round(result.images / result.train_seconds, 1),
        "psnr": round(result.metrics["psnr"], 2),
        "bits_per_dim": round(result.metrics["bits_per_dim"], 4),
    }


def speed_ratio(config: str, rounds: int = 5, steps: int = 40) -> list[float]:
    """bf16/fp32 images/s of stage 1's training loop, one ratio per round of alternating short runs."""
    from progvq.checkpoint import seed_everything
    from progvq.config import load_config
    from progvq.train import fit
    from stages import build_stage

    ratios = []
    for _ in range(rounds):
        speed = {}
        for precision in ("fp32", "bf16"):
            cfg = load_config(
                config,
                [f"stages.1.precision={precision}", f"stages.1.steps={steps}", f"stages.1.eval_every={10**6}"],
            )
            seed_everything(0)
            stage = build_stage(cfg, "1", Path("unused"), torch.device("cpu"))
            stage_dir = Path(tempfile.mkdtemp(prefix="probe-"))
            fit(stage, cfg, stage_dir, progress=False, log=lambda m: None, until=5)  # kernels built, not timed
            result = fit(stage, cfg, stage_dir, progress=False, log=lambda m: None)
            speed[precision] = result.images / result.train_seconds
        ratios.append(round(speed["bf16"] / speed["fp32"], 3))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--same-steps", action="store_true", help="also train bf16 for --steps")
    args = parser.parse_args()
    ratios = speed_ratio(args.config)
    speedup = median(ratios)
    print(json.dumps({"speedup_each_round": ratios}), file=sys.stderr, flush=True)
    fp32 = train(args.config, "fp32", args.steps)
    print(json.dumps(fp32), file=sys.stderr, flush=True)
    equal_time = train(args.config, "bf16", round(args.steps * speedup))
    print(json.dumps(equal_time), file=sys.stderr, flush=True)
    report = {
        "hardware": describe(torch.device("cpu")),
        "speedup_each_round": ratios,
        "speedup": speedup,
        "fp32": fp32,
        "bf16_equal_wall_clock": equal_time,
        "psnr_bf16_minus_fp32_equal_wall_clock": round(equal_time["psnr"] - fp32["psnr"], 2),
    }
    if args.same_steps:
        same = train(args.config, "bf16", args.steps)
        report["bf16_same_steps"] = same
        report["psnr_bf16_minus_fp32_same_steps"] = round(same["psnr"] - fp32["psnr"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
