"""Speed benchmark: how close each stage's training comes to this machine's matmul peak.

    python benchmarks/speed.py [--config configs/mnist.yaml] [--steps 60] [--out speed.json]

Prints JSON (and writes it to ``--out``):

- ``matmul``: fp32 and bf16 matmul peak of this machine, GFLOP/s, measured in this run;
- ``stages``: for each stage kind of the config (stage 1, stage 2, prior) and each
  precision: training images/s through the real training loop, FLOPs per step
  (forward and backward, counted with torch.utils.flop_counter), achieved GFLOP/s
  and its fraction of the fp32 matmul peak, and the peak resident memory of the
  process that trained it;
- ``sampling``: time to sample 64 images from the whole hierarchy; the PixelCNN
  prior's cached sampler against its naive one and against one forward pass at
  the same batch and grid (the ratio is the figure of merit), for the config's
  prior and for a prior of about 2M parameters on an 8x8 grid.

Each stage is measured in a fresh process (so its peak memory is its own) on a
short run of the config: the lower stages are trained for a few steps only,
which changes nothing about speed. Run from the project root.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from progvq.hardware import describe  # after the path is set


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` (median of repeated timings)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        tick = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tick)
    return 2 * n**3 / median(times) / 1e9


def _overrides(steps: int, precision: str, prepare: bool) -> list[str]:
    """Short stages: ``steps`` for the one measured, a few for the lower ones it needs."""
    flags = []
    for stage in ("1", "2", "prior"):
        n = 4 if prepare else steps
        flags += [
            f"stages.{stage}.steps={n}",
            f"stages.{stage}.eval_every={10**6}",
            f"stages.{stage}.checkpoint_every={10**6}",
            f"stages.{stage}.log_every={10**6}",
            f"stages.{stage}.precision={precision}",
            f"stages.{stage}.warmup=1",
        ]
    return flags


def measure_stage(config: str, name: str, run_dir: Path, steps: int, precision: str) -> dict:
    """Train stage ``name`` for ``steps`` in this process; speed, FLOPs and memory (lower stages must be done)."""
    from torch.utils.flop_counter import FlopCounterMode

    from progvq.checkpoint import seed_everything
    from progvq.config import load_config
    from progvq.train import fit
    from stages import build_stage

    cfg = load_config(config, _overrides(steps, precision, prepare=False))
    seed_everything(0)
    stage = build_stage(cfg, name, run_dir, torch.device("cpu"))
    warm = min(10, steps // 4)
    stage_dir = Path(tempfile.mkdtemp(prefix=f"speed-{name}-"))
    fit(stage, cfg, stage_dir, progress=False, log=lambda m: None, until=warm)  # first steps build oneDNN kernels
    result = fit(stage, cfg, stage_dir, progress=False, log=lambda m: None)
    images_per_s = result.images / result.train_seconds
    steps_per_s = (result.step - warm) / result.train_seconds

    # FLOPs of one training step: forward and backward of the stage's loss
    settings = stage.settings
    batch = stage.batch(torch.arange(settings.batch_size))
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        parts, _ = stage.loss(batch)
        sum(float(settings.loss_weights[k]) * v for k, v in parts.items()).backward()
    flops = counter.get_total_flops()
    return {
        "stage": name,
        "precision": precision,
        "batch_size": settings.batch_size,
        "images_per_s": round(images_per_s, 1),
        "gflop_per_step": round(flops / 1e9, 3),
        "achieved_gflop_s": round(flops * steps_per_s / 1e9, 1),
        "peak_rss_mb": _peak_rss_mb(),
    }


def measure_sampling(run_dir: Path) -> dict:
    """64 samples from the whole hierarchy; prior sampling (cached and naive) against a forward pass."""
    from progvq.hierarchy import Hierarchy
    from progvq.pixelcnn import GatedPixelCNN

    model = Hierarchy.load(run_dir)
    model.sample(8, seed=0)  # warm-up
    tick = time.perf_counter()
    model.sample(64, seed=1)
    hierarchy_s = time.perf_counter() - tick

    def prior_figures(prior: GatedPixelCNN, h: int, w: int) -> dict:
        prior.eval()
        codes = torch.randint(prior.num_codes, (64, h, w))
        with torch.no_grad():
            prior(codes)
            forward = median(_timed(lambda: prior(codes)) for _ in range(7))
        cached = median(
            _timed(lambda: prior.sample(64, h, w, generator=torch.Generator().manual_seed(0))) for _ in range(5)
        )
        naive = _timed(lambda: prior.sample(64, h, w, generator=torch.Generator().manual_seed(0), method="naive"))
        return {
            "params": sum(p.numel() for p in prior.parameters()),
            "grid": [h, w],
            "forward_s": round(forward, 4),
            "cached_sample_s": round(cached, 4),
            "naive_sample_s": round(naive, 4),
            "cached_over_forward": round(cached / forward, 2),
            "naive_over_forward": round(naive / forward, 2),
        }

    h, w = model.grid_shape(model.num_levels)
    torch.manual_seed(0)
    big = GatedPixelCNN(512, channels=112, layers=7, kernel_size=3)  # 2.07M parameters
    return {
        "hierarchy_64_samples_s": round(hierarchy_s, 3),
        "config_prior": prior_figures(model.prior, h, w),
        "prior_2m_8x8": prior_figures(big, 8, 8),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's peak before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _timed(fn: Callable[[], object]) -> float:
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"))
    parser.add_argument("--steps", type=int, default=60, help="training steps timed per stage and precision")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating measurements per stage and precision (median kept)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--measure", nargs=3, metavar=("STAGE", "RUN_DIR", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # a child process measuring one stage
        name, run_dir, precision = args.measure
        print(json.dumps(measure_stage(args.config, name, Path(run_dir), args.steps, precision)))
        return

    from progvq.config import load_config
    from stages import train_all

    report: dict = {
        "torch": torch.__version__,
        "hardware": describe(torch.device("cpu")),
        "threads": torch.get_num_threads(),
    }
    report["matmul"] = {
        "fp32_gflop_s": round(matmul_peak(torch.float32), 1),
        "bf16_gflop_s": round(matmul_peak(torch.bfloat16), 1),
    }
    peak = report["matmul"]["fp32_gflop_s"]

    run_dir = Path(tempfile.mkdtemp(prefix="speed-run-"))
    base = load_config(args.config, _overrides(args.steps, "fp32", prepare=True))
    train_all(base, run_dir, progress=False, log=lambda m: None)
    rows = []
    for name in ("1", "2", "prior"):
        # precisions alternate over rounds, so a neighbour's load hits each alike; medians are kept
        runs: dict[str, list[dict]] = {p: [] for p in args.precisions.split(",")}
        for _ in range(args.rounds):
            for precision, measured in runs.items():
                measure = ["--measure", name, str(run_dir), precision]
                child = subprocess.run(
                    [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), *measure],
                    capture_output=True, text=True, check=True, cwd=Path.cwd(),
                )
                measured.append(json.loads(child.stdout.strip().splitlines()[-1]))
        for precision, measured in runs.items():
            row = dict(measured[0])
            for key in ("images_per_s", "achieved_gflop_s", "peak_rss_mb"):
                row[key] = round(median(m[key] for m in measured), 1)
            row["images_per_s_each_round"] = [m["images_per_s"] for m in measured]
            row["fraction_of_fp32_peak"] = round(row["achieved_gflop_s"] / peak, 3)
            if precision != "fp32" and "fp32" in runs:
                pairs = zip(measured, runs["fp32"], strict=True)
                row["speedup_over_fp32_each_round"] = [
                    round(m["images_per_s"] / f["images_per_s"], 2) for m, f in pairs
                ]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report["stages"] = rows
    report["sampling"] = measure_sampling(run_dir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
