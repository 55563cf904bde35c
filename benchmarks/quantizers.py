"""VQ against FSQ on MNIST stage 1: equal code count, equal steps.

    python benchmarks/quantizers.py [--steps 1600] [--work runs/quantizers]

Trains stage 1 of ``configs/mnist.yaml`` twice, once with its VQ quantiser (512 codes of
64 dims, EMA codebook, data init, dead-code restarts) and once with FSQ at levels
[8, 8, 8] (512 codes of 3 dims), everything else equal, and prints JSON: held-out PSNR
on the 28x28 digits, codes used and perplexity on the held-out split, the pixels' bits
per dim given z_1, the level's rate under the uniform prior (log2 512 per code) and
their sum, and training images/s. Run from the project root; nothing else may run
meanwhile (the speeds are compared).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from progvq.config import load_config
from progvq.hardware import describe
from progvq.run import Run
from stages import train_stage

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"vq": "{kind: vq, codes: 512, dim: 64}", "fsq": "{kind: fsq, levels: [8, 8, 8]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--work", default="runs/quantizers")
    args = parser.parse_args()
    report: dict = {"hardware": describe(torch.device("cpu")), "threads": torch.get_num_threads(), "steps": args.steps}
    for kind, section in KINDS.items():
        sets = [f"stages.1.quantizer={section}", f"stages.1.steps={args.steps}", f"stages.1.eval_every={args.steps}"]
        cfg = load_config(args.config, sets)
        run = Run(Path(args.work) / kind)
        start = time.perf_counter()
        result = train_stage(cfg, "1", run, progress=False, log=lambda m: print(m, file=sys.stderr))
        seconds = time.perf_counter() - start
        figures = result.metrics or run.finished("1")["metrics"]
        grid = (cfg.data.size // cfg.level(1).downsample) ** 2  # codes per image
        rate = grid * math.log2(cfg.level(1).codes) / 784  # per dim of the 28x28 digit
        report[kind] = {
            "codes": cfg.level(1).codes,
            "code_dim": cfg.level(1).code_dim,
            "heldout_psnr_db": round(figures["psnr"], 2),
            "codes_used": int(figures["codes_used"]),
            "perplexity": round(figures["perplexity"], 1),
            "pixel_bits_per_dim": round(figures["bits_per_dim"], 4),
            "rate_bits_per_dim": round(rate, 4),
            "stage_bound_bits_per_dim": round(figures["bits_per_dim"] + rate, 4),
            "images_per_s": round(result.images / max(result.train_seconds, 1e-9), 1) if result.images else None,
            "seconds": round(seconds, 1),
            "precision": run.trained_with("1").get("precision"),
        }
        print(json.dumps({kind: report[kind]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
