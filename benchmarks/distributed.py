"""Training images/s of each stage kind with 1 process and with N processes (torchrun, gloo on CPU).

    python benchmarks/distributed.py [--config configs/mnist.yaml] [--steps 120] [--procs 2]

Prints JSON: for each stage kind and process count, the images/s of training
steps (the loop's own figure, logged to TensorBoard as train/images_per_s,
averaged after the first log interval). One process uses every core;
torchrun gives each of N processes 1 thread. The lower stages are trained for
a few steps first (speed does not depend on how well they are trained). Run
from the project root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from progvq.run import Run

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("1", "2", "prior")


def overrides(steps: int, measured: str | None) -> list[str]:
    flags = []
    for stage in STAGES:
        n = steps if stage == measured else 4
        settings = (("steps", n), ("log_every", 10), ("eval_every", 10**6), ("checkpoint_every", 10**6), ("warmup", 1))
        for key, value in settings:
            flags += ["--set", f"stages.{stage}.{key}={value}"]
    return flags


def images_per_s(stage_dir: Path) -> float:
    events = EventAccumulator(str(stage_dir))
    events.Reload()
    values = [e.value for e in events.Scalars("train/images_per_s")]
    return mean(values[1:]) if len(values) > 1 else values[0]  # the first interval builds kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="progvq-ddp-"))
    base = work / "base"
    # --force: other step counts than the base run
    cli = [str(ROOT / "run_stage.py"), "train", args.config, "--no-progress", "--force"]
    for stage in STAGES[:-1]:  # lower stages, briefly
        subprocess.run(
            [sys.executable, *cli, "--stage", stage, "--run-dir", str(base), *overrides(args.steps, None)],
            check=True,
            capture_output=True,
        )
    report = {"config": args.config, "steps": args.steps, "stages": {}}
    for stage in STAGES:
        row = {}
        for procs in (1, args.procs):
            run = work / f"{stage}-{procs}"
            subprocess.run(["cp", "-r", str(base), str(run)], check=True)
            stage_dir = Run(run).stage_dir(stage)  # the run folder's layout is the Run's to know
            subprocess.run(["rm", "-rf", str(stage_dir)], check=True)
            launch = [sys.executable] if procs == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(procs)]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // procs))}
            subprocess.run([*launch, *cli, "--stage", stage, "--run-dir", str(run), *overrides(args.steps, stage)],
                           check=True, capture_output=True, env=env)
            row[f"{procs}_process{'es' if procs > 1 else ''}_images_per_s"] = round(images_per_s(stage_dir), 1)
        report["stages"][stage] = row
        print(json.dumps({stage: row}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
