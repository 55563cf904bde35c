"""Image folder benchmark: a folder larger than one wants in memory, its memory-mapped cache, and training on it.

    OMP_NUM_THREADS=1 python benchmarks/folder.py [--out runs/bench-folder] [--count 200000] [--steps 300]

1. Writes ``--count`` small JPEGs of mixed sizes (24..48 pixels a side, coloured shapes in class folders)
   under ``OUT/images`` (kept: a second run reuses them), with ``--workers`` processes.
2. Builds the uint8 cache of the folder at 32x32 (shorter side scaled to 32, a random crop fixed per
   image) in ``OUT/run``, timed; then opens it again (reused: its digest is checked, nothing decoded).
3. Trains stage 1 of ``configs/folder-32.yaml`` for ``--steps`` steps, each time in a fresh process:
   batches read from the memory map, and from the same images copied into one in-memory tensor,
   in ``--rounds`` alternating rounds (medians reported).
   Reports the images/s of each (the training loop's own count) and the peak resident memory of each
   process against the cache's size, and that of the same training on 6,000 of the images (what the
   process takes whatever the data); and, apart from the model, the rate at which each path gathers
   random batches.

Prints JSON and writes it to ``OUT/folder.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from progvq.data import SHAPE_CLASSES, make_labelled_shapes  # after the path is set

CHUNK = 1000  # images drawn per generator call
SIDE = 48  # side the shapes are drawn at; each file is a random crop of 24..48 x 24..48 of one


def write_chunk(job: tuple[Path, int]) -> None:
    """Chunk ``k`` of the folder: CHUNK JPEGs of random sizes (a pure function of k)."""
    from PIL import Image

    folder, k = job
    images, labels = make_labelled_shapes(CHUNK, size=SIDE, channels=3, seed=1000 + k)
    rng = np.random.default_rng(k)
    for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist(), strict=True)):
        w, h = (int(v) for v in rng.integers(24, SIDE + 1, size=2))
        x, y = (int(v) for v in rng.integers(0, SIDE - np.array([w, h]) + 1))
        pixels = image.transpose(1, 2, 0)[y : y + h, x : x + w]
        Image.fromarray(np.ascontiguousarray(pixels)).save(
            folder / f"{label}-{SHAPE_CLASSES[label]}" / f"{k:04d}{i:03d}.jpg", quality=90
        )


def generate(folder: Path, count: int, workers: int) -> float:
    """Write the folder unless a complete one is there; seconds taken (0 when reused)."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(count):
        return 0.0
    for label, name in enumerate(SHAPE_CLASSES):
        (folder / f"{label}-{name}").mkdir(parents=True, exist_ok=True)
    jobs = [(folder, k) for k in range(count // CHUNK)]
    tick = time.perf_counter()
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            for n, _ in enumerate(pool.imap_unordered(write_chunk, jobs), 1):
                print(f"\rwriting images: {n * CHUNK}/{count}", end="", file=sys.stderr)
    else:
        for n, job in enumerate(jobs, 1):
            write_chunk(job)
            print(f"\rwriting images: {n * CHUNK}/{count}", end="", file=sys.stderr)
    print(file=sys.stderr)
    done.write_text(str(count))
    return time.perf_counter() - tick


def overrides(folder: Path, steps: int) -> list[str]:
    return [
        f"data.path={folder}",
        "data.crop=random",
        "data.heldout=1000",
        f"stages.1.steps={steps}",
        "stages.1.warmup=10",
        f"stages.1.eval_every={10**6}",
        f"stages.1.checkpoint_every={10**6}",
        f"stages.1.log_every={10**6}",
    ]


def _status_mb(key: str) -> float:
    """A field of /proc/self/status (kB) in MB; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def measure(path: str, folder: Path, run: Path, steps: int) -> dict[str, Any]:
    """Train stage 1 for ``steps`` in this process, batches from the memory map or from memory."""
    from progvq.checkpoint import seed_everything
    from progvq.config import load_config
    from progvq.data import load_dataset
    from progvq.train import fit
    from stages.pixels import PixelStage

    sets = overrides(folder, steps) + (["data.limit=6000"] if path == "small" else [])
    cfg = load_config(ROOT / "configs" / "folder-32.yaml", sets)
    if path == "small":
        run = run.with_name("run-small")  # its own cache: the big one stays as it is
    tick = time.perf_counter()
    data = load_dataset(cfg.data, cfg.total_downsample(), cache_dir=run, progress=False)
    open_s = time.perf_counter() - tick
    if path == "memory":
        data.train = data.train[:]  # every training image in one tensor (N, C, H, W)
    seed_everything(0)
    stage = PixelStage(cfg, data, torch.device("cpu"))
    gather = gather_rate(stage.train_images, stage.settings.batch_size)
    stage_dir = run / f"stage-1-{path}"
    shutil.rmtree(stage_dir, ignore_errors=True)  # an earlier benchmark's checkpoints would be resumed
    warm = 10
    fit(stage, cfg, stage_dir, progress=False, log=lambda m: None, until=warm)  # oneDNN builds its kernels
    result = fit(stage, cfg, stage_dir, progress=False, log=lambda m: None)
    return {
        "path": path,
        "open_s": round(open_s, 2),
        "train_images": len(data.train),
        "steps": result.step - warm,
        "images_per_s": round(result.images / result.train_seconds, 1),
        "gather_images_per_s": round(gather, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_anon_mb_at_end": _status_mb("RssAnon"),
        "rss_file_mb_at_end": _status_mb("RssFile"),
    }


def gather_rate(images: Any, batch_size: int, batches: int = 300) -> float:
    """Images/s of reading random batches (as the training loop draws them) into uint8 tensors."""
    gen = torch.Generator().manual_seed(0)
    n = len(images)
    tick = time.perf_counter()
    for _ in range(batches):
        images[torch.randint(n, (batch_size,), generator=gen)]
    return batches * batch_size / (time.perf_counter() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-folder")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two training runs")
    parser.add_argument("--measure", choices=("mapped", "memory", "small"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder, run = args.out / "images", args.out / "run"
    if args.measure:  # one training process of the two, started by the main one
        print(json.dumps(measure(args.measure, folder, run, args.steps)))
        return

    from progvq.config import load_config
    from progvq.data import load_dataset
    from progvq.folder import CACHE_DIR, MANIFEST

    figures: dict[str, Any] = {"count": args.count, "generate_s": round(generate(folder, args.count, args.workers), 1)}
    cfg = load_config(ROOT / "configs" / "folder-32.yaml", overrides(folder, args.steps))
    cache = run / CACHE_DIR
    if (cache / MANIFEST).exists():
        (cache / MANIFEST).unlink()  # build it in this run, timed
    tick = time.perf_counter()
    load_dataset(cfg.data, cfg.total_downsample(), cache_dir=run)
    build_s = time.perf_counter() - tick
    tick = time.perf_counter()
    load_dataset(cfg.data, cfg.total_downsample(), cache_dir=run)
    reuse_s = time.perf_counter() - tick
    manifest = json.loads((cache / MANIFEST).read_text())
    cache_mb = manifest["bytes"] / 2**20
    figures["cache"] = {
        "shape": manifest["shape"],
        "mb": round(cache_mb, 1),
        "build_s": round(build_s, 1),
        "build_images_per_s": round(args.count / build_s, 1),
        "reuse_s": round(reuse_s, 2),
    }
    # alternating rounds, each process fresh: the machine is shared and its speed drifts
    rounds: dict[str, list[dict[str, Any]]] = {"mapped": [], "memory": []}
    for r in range(args.rounds):
        for path in ("mapped", "memory") if r % 2 == 0 else ("memory", "mapped"):
            cmd = [sys.executable, __file__, "--out", str(args.out), "--steps", str(args.steps), "--measure", path]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            rounds[path].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rounds[path][-1]), file=sys.stderr)
    for path, runs in rounds.items():
        figures[path] = {
            "images_per_s": median(r["images_per_s"] for r in runs),
            "images_per_s_rounds": [r["images_per_s"] for r in runs],
            "gather_images_per_s": median(r["gather_images_per_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "rss_anon_mb_at_end": max(r["rss_anon_mb_at_end"] for r in runs),
            "rss_file_mb_at_end": max(r["rss_file_mb_at_end"] for r in runs),
            "open_s": median(r["open_s"] for r in runs),
            "steps": runs[0]["steps"],
            "train_images": runs[0]["train_images"],
        }
        figures[path]["peak_rss_over_cache"] = round(figures[path]["peak_rss_mb"] / cache_mb, 3)
    # what any training process of this stage takes: the same, on 6,000 of the images
    cmd = [sys.executable, __file__, "--out", str(args.out), "--steps", str(args.steps), "--measure", "small"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    small = json.loads(out.strip().splitlines()[-1])
    figures["small_peak_rss_mb"] = small["peak_rss_mb"]
    figures["mapped_over_memory_images_per_s"] = round(
        figures["mapped"]["images_per_s"] / figures["memory"]["images_per_s"], 3
    )
    figures["mapped_over_memory_images_per_s_rounds"] = [
        round(a["images_per_s"] / b["images_per_s"], 3) for a, b in zip(rounds["mapped"], rounds["memory"], strict=True)
    ]
    figures["mapped_over_memory_gather"] = round(
        figures["mapped"]["gather_images_per_s"] / figures["memory"]["gather_images_per_s"], 3
    )
    text = json.dumps(figures, indent=2)
    print(text)
    (args.out / "folder.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
