"""Lossless compression: progvq's files against PNG, WebP and the likelihood bound.

    python benchmarks/compress.py [--config configs/mnist.yaml] [--shapes-config configs/shapes.yaml]
                                  [--runs-dir runs/samples] [--n 1000] [--json OUT]

Run from the project root (the MNIST config reads the test set the package ships), with OMP_NUM_THREADS=1 for
timings comparable to the README's. What it does:

1. Trains each config into ``RUNS_DIR/<config name>`` if a stage is not done yet (the runs of
   ``benchmarks/samples.py``'s default ``--runs-dir runs/samples`` are the same, so they are reused).
2. On the first ``--n`` held-out images of the MNIST run (default: all 1,000): the size of
   ``progvq compress``'s file (header and checksums, coded words), each image as its own PNG
   (Pillow, ``optimize=True, compress_level=9``) and as its own lossless WebP (Pillow,
   ``lossless=True, quality=100, method=6``), summed, and the bound of ``progvq eval`` in bits;
   images/s of each encoder and decoder; every codec's round trip checked bit for bit.
3. The same round trip, with its sizes, on the shapes run's held-out images.

Prints a markdown table per data set and writes every figure as JSON (``--json``, default
``RUNS_DIR/compress.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's packages, also when progvq is not installed

from quality import log, train  # after the path is set

from progvq.codec import Codec
from progvq.config import load_config
from progvq.data import load_dataset
from progvq.fileio import atomic_write
from progvq.hardware import describe


def pillow_round_trip(images: Tensor, save: dict[str, Any]) -> dict[str, Any]:
    """Each uint8 image (N, C, H, W) as its own file with Pillow's ``save`` options: bytes, images/s, exact."""
    arrays = [a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0) for a in images.numpy()]
    start = time.perf_counter()
    files = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, **save)
        files.append(buffer.getvalue())
    encode = time.perf_counter() - start
    start = time.perf_counter()
    back = [np.asarray(Image.open(io.BytesIO(f)).convert("L" if a.ndim == 2 else "RGB")) for f, a in zip(files, arrays)]
    decode = time.perf_counter() - start
    return {
        "bytes": sum(map(len, files)),
        "encode_images_per_s": len(arrays) / encode,
        "decode_images_per_s": len(arrays) / decode,
        "exact": all(np.array_equal(a, b) for a, b in zip(arrays, back)),
    }


def progvq_round_trip(run: Path, images: Tensor) -> dict[str, Any]:
    """``progvq compress`` / ``decompress`` of ``images`` with ``run``: bytes by part, images/s, exact, the bound."""
    codec = Codec(run)
    start = time.perf_counter()
    data = codec.compress(images)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    back = codec.decompress(data)
    decode = time.perf_counter() - start
    layout = codec.last_layout
    assert layout is not None
    bound = codec.bound_bits(images)
    return {
        "bytes": len(data),
        "header_bytes": layout.header,
        "coded_bytes": layout.coded,
        "table_bits": layout.ideal_bits,
        "bound_bits": float(bound.sum()),
        "encode_images_per_s": len(images) / encode,
        "decode_images_per_s": len(images) / decode,
        "exact": torch.equal(back.images, images),
    }


def measure(run: Path, images: Tensor, with_pillow: bool) -> dict[str, Any]:
    c, h, w = images.shape[1:]
    out: dict[str, Any] = {"images": len(images), "dims": int(c * h * w), "run": str(run)}
    log(f"{run}: progvq on {len(images)} images")
    out["progvq"] = progvq_round_trip(run, images)
    if with_pillow:
        log("PNG and WebP")
        out["png"] = pillow_round_trip(images, {"format": "PNG", "optimize": True, "compress_level": 9})
        out["webp"] = pillow_round_trip(images, {"format": "WEBP", "lossless": True, "quality": 100, "method": 6})
    return out


def table(result: dict[str, Any]) -> str:
    """A markdown table of one data set's figures: bytes and bits/dim of the data's own pixels, speed."""
    n, dims = result["images"], result["dims"]
    p = result["progvq"]
    bound_bytes = p["bound_bits"] / 8

    def row(name: str, size: float, enc: float | None, dec: float | None, exact: bool | None) -> str:
        speed = f"{enc:,.0f} | {dec:,.0f}" if enc is not None else "- | -"
        ok = "-" if exact is None else ("yes" if exact else "NO")
        return (
            f"| {name} | {size:,.0f} | {size / n:,.1f} | {8 * size / (n * dims):.4f} | {size / bound_bytes:.4f} "
            f"| {speed} | {ok} |"
        )

    lines = [
        "| | bytes | bytes/image | bits/dim | / bound | encode images/s | decode images/s | exact |",
        "|---|---|---|---|---|---|---|---|",
        row("bound (-log2 p(x) of `progvq eval`)", bound_bytes, None, None, None),
        row("progvq: the file", p["bytes"], p["encode_images_per_s"], p["decode_images_per_s"], p["exact"]),
        row("progvq: coded words only", p["coded_bytes"], None, None, None),
    ]
    for key, name in (("png", "PNG, one file per image (optimize, level 9)"), ("webp", "WebP lossless, one per image")):
        if key in result:
            r = result[key]
            lines.append(row(name, r["bytes"], r["encode_images_per_s"], r["decode_images_per_s"], r["exact"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.yaml", help="the MNIST hierarchy (trained if not done)")
    parser.add_argument("--shapes-config", default="configs/shapes.yaml", help="the shapes hierarchy; '' skips it")
    parser.add_argument("--runs-dir", default="runs/samples", help="where the configs' runs are (default runs/samples)")
    parser.add_argument("--n", type=int, default=1000, help="held-out images (default 1000: all of MNIST's)")
    parser.add_argument("--json", help="figures as JSON (default: RUNS_DIR/compress.json)")
    args = parser.parse_args()
    runs = Path(args.runs_dir)
    result: dict[str, Any] = {"hardware": describe(torch.device("cpu")), "threads": torch.get_num_threads()}
    for key, config in (("mnist", args.config), ("shapes", args.shapes_config)):
        if not config:
            continue
        cfg = load_config(config)
        run = runs / Path(config).stem
        result[f"{key}_training"] = train(Path(config), run, [])
        data = load_dataset(cfg.data, total_downsample=cfg.total_downsample())
        result[key] = measure(run, data.heldout[: args.n], with_pillow=key == "mnist")
        print(f"\n{key} ({len(data.heldout[: args.n])} held-out images, {result['hardware']}):\n")
        print(table(result[key]))
    atomic_write(Path(args.json or runs / "compress.json"), lambda f: f.write(json.dumps(result, indent=2).encode()))


if __name__ == "__main__":
    main()
