"""progvq command line: train stages, sample, evaluate, show status.

    progvq train CONFIG --all                 train every stage not done yet
    progvq train CONFIG --stage 1|2|...|prior train (or resume) one stage
    progvq sample RUN_DIR -n 64 --out samples.png [--label 3]
    progvq inpaint RUN_DIR --image IN.png (--mask MASK.png | --box x0,y0,x1,y1) -n 16 --out OUT.png
    progvq eval RUN_DIR [--json]
    progvq status RUN_DIR
    progvq encode RUN_DIR (--images FILES... | --npz FILE | --split heldout) --out CODES.npz
    progvq decode RUN_DIR CODES.npz --out FILE.png [--level K] [--temperature T] [--label K]
    progvq compress RUN_DIR (FILES... | --split heldout) --out FILE.pvq
    progvq decompress RUN_DIR FILE.pvq --out OUT.npz|DIR
    progvq data get NAME [DIR] [--mirror URL]  download mnist, fashion-mnist or cifar10, checked
    progvq data list                          the data sets `data get` knows
    progvq data shapes OUT --count N          the shapes as PNG files in class folders

``python run_stage.py ...`` is the same program. User mistakes print one line
on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from progvq.errors import ProgvqError
from progvq.fileio import check_outputs

if TYPE_CHECKING:
    from torch import Tensor

    from progvq.hierarchy import Hierarchy


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one ``progvq: error:`` line and a pointer to ``--help`` (not its usage block)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("progvq").strip()
        hint = f"progvq {command} --help" if command else "progvq --help"
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for all
            print(f"progvq: error: {' '.join(message.split())} (see {hint})", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    from progvq import __version__

    parser = _Parser(
        prog="progvq", description="Train, sample and evaluate hierarchical VQ models one level at a time."
    )
    parser.add_argument("--version", action="version", version=f"progvq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one stage, or every stage not done yet")
    p.add_argument("config", help="YAML config file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", help="stage to train: 1, 2, ..., or prior")
    which.add_argument("--all", action="store_true", help="train every stage not done yet, in order")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. stages.1.steps=500 (repeatable)",
    )
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<config name>)")
    p.add_argument(
        "--until", type=int, metavar="STEP", help="stop (with a checkpoint) at this step; train again to continue"
    )
    p.add_argument(
        "--restart", action="store_true", help="keep the stage's old training aside (stage-N.old-M) and train it anew"
    )
    p.add_argument("--force", action="store_true", help="adopt this config for a run directory created with another")
    p.add_argument(
        "--from",
        dest="reuse",
        metavar="OTHER_RUN",
        help="reuse OTHER_RUN's finished stages whose config equals this one's (with --all)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="sample images from the whole hierarchy")
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="prior temperature; 0 takes the most likely code (default: the run's sample.temperature)",
    )
    p.add_argument(
        "--code-temperature",
        type=float,
        default=None,
        help="temperature of the code decoders of levels >= 2 (default: the run's sample.code_temperature)",
    )
    p.add_argument(
        "--pixel-temperature",
        type=float,
        default=None,
        help="temperature of the pixel decoder; 0 shows its point estimate (default: the run's "
        "sample.pixel_temperature)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="class guidance of a class-conditional prior, w >= 0: codes from p(code | y)^(1+w) / p(code)^w "
        "(default: the run's sample.guidance)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="PNG grid; the images also go to the same name with .npz")
    p.add_argument("--nrow", type=int, default=None, help="images per row of the grid")
    p.add_argument(
        "--label",
        type=int,
        default=None,
        help="class of every sample (class-conditional prior only; default: the classes in turn)",
    )
    p.add_argument(
        "--allow-stale",
        action="store_true",
        help="use the hierarchy even if a stage was trained on a lower stage since retrained",
    )

    p = sub.add_parser("inpaint", help="complete the masked part of an image")
    p.add_argument("run_dir")
    p.add_argument("--image", required=True, help="PNG (or JPEG) of the run's image size")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="PNG of the same size: white (255) pixels are completed, black (0) ones kept")
    where.add_argument("--box", metavar="x0,y0,x1,y1", help="complete the pixels x0 <= x < x1, y0 <= y < y1")
    p.add_argument("-n", type=int, default=16, help="number of completions (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature (default 1)")
    p.add_argument(
        "--code-temperature",
        type=float,
        default=None,
        help="temperature of the code decoders of levels >= 2 (default: the run's sample.code_temperature)",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="top-level draws per completion, one kept by importance weight (default 1)",
    )
    p.add_argument(
        "--label",
        type=int,
        default=None,
        help="class of the completions (class-conditional prior only; default: inferred)",
    )
    p.add_argument(
        "--out",
        default="inpainted.png",
        help="PNG grid (original, masked input, completions); arrays to the same name with .npz",
    )
    p.add_argument("--nrow", type=int, default=None, help="images per row of the grid")
    p.add_argument(
        "--allow-stale",
        action="store_true",
        help="use the hierarchy even if a stage was trained on a lower stage since retrained",
    )

    p = sub.add_parser("eval", help="held-out figures: bits/dim by level, reconstruction, codebook usage")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout")
    p.add_argument(
        "--allow-stale",
        action="store_true",
        help="evaluate even if a stage was trained on a lower stage since retrained",
    )

    p = sub.add_parser("status", help="each stage: done, partial (step N of M) or missing, and whether it is stale")
    p.add_argument("run_dir")

    p = sub.add_parser("encode", help="the codes of every level of images, to an npz")
    p.add_argument("run_dir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="FILE", help="PNG/JPEG images of the run's size")
    source.add_argument("--npz", metavar="FILE", help="an npz (or npy) of uint8 images")
    source.add_argument("--split", choices=["heldout", "train"], help="a split of the run's data (with its labels)")
    p.add_argument("--out", required=True, help="npz: level1, level2, ... (and labels when the data has them)")
    _stale_option(p)

    p = sub.add_parser("decode", help="render codes of any level (an npz of `encode`) down to images")
    p.add_argument("run_dir")
    p.add_argument("codes", help="npz with level1, level2, ... (`progvq encode` writes one)")
    p.add_argument("--level", type=int, default=None, help="which level's codes to render (default: the highest)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="temperature of the code decoders below that level; 0 (default) takes the most likely code",
    )
    p.add_argument(
        "--pixel-temperature", type=float, default=0.0, help="pixel decoder; 0 (default) shows its point estimate"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label",
        type=int,
        default=None,
        help="class of every image, for class-conditional decoders (default: the file's labels)",
    )
    p.add_argument("--out", required=True, help="PNG grid; the images also go to the same name with .npz")
    p.add_argument("--nrow", type=int, default=None, help="images per row of the grid")
    _stale_option(p)

    p = sub.add_parser("compress", help="losslessly compress images with the hierarchy (about the bound's size)")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="PNG/JPEG images of the run's size, or an npz of them")
    p.add_argument("--split", choices=["heldout", "train"], help="a split of the run's data instead of INPUT")
    p.add_argument("--out", required=True, help="the compressed file (.pvq)")
    _stale_option(p)

    p = sub.add_parser("decompress", help="the images of a compressed file, exactly")
    p.add_argument("run_dir")
    p.add_argument("file", help="a file of `progvq compress` made with this run")
    p.add_argument(
        "--out", required=True, help="OUT.npz (images, and labels for a class-conditional prior) or a folder of PNGs"
    )
    _stale_option(p)

    _data_parser(sub)
    return parser


def _data_parser(sub: argparse._SubParsersAction) -> None:
    """``progvq data get | list | shapes``: data sets as files."""
    p = sub.add_parser("data", help="download a known data set, or write the shapes as image files")
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="VERB")
    g = verbs.add_parser("get", help="download a known data set (mnist, fashion-mnist, cifar10) and check each file")
    g.add_argument("name", metavar="NAME", help="mnist, fashion-mnist or cifar10 (`progvq data list`)")
    g.add_argument("dir", metavar="DIR", nargs="?", help="the folder to write it to (default: data/NAME)")
    g.add_argument(
        "--mirror",
        metavar="URL",
        help="download each file from URL/NAME/FILE instead of its publisher (default: $PROGVQ_DATA_MIRROR if set)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    verbs.add_parser("list", help="the known data sets: where each comes from, its licence, files and checksums")
    s = verbs.add_parser("shapes", help="the generated shapes as PNG files in one folder per class")
    s.add_argument("out", metavar="OUT", help="the folder to write (class folders 0-ellipse ... 8-triangle+triangle)")
    s.add_argument("--count", type=int, default=6000, help="how many images (default 6000)")
    s.add_argument("--size", type=int, default=32, help="side in pixels (default 32)")
    s.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 grey, 3 colour (default 3)")
    s.add_argument("--seed", type=int, default=0)


def _stale_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-stale",
        action="store_true",
        help="use the hierarchy even if a stage was trained on a lower stage since retrained",
    )


def _positive(value: float, flag: str, low: float = 1) -> None:
    if not (value >= low and math.isfinite(value)):
        raise ProgvqError(f"{flag}: must be >= {low:g}, got {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from progvq.config import load_config
    from progvq.run import training_lock
    from stages import train_all, train_stage

    if args.run_dir is not None and not args.run_dir.strip():
        raise ProgvqError("--run-dir: empty; give a folder, or leave the option out to use the config's run_dir")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir if args.run_dir is not None else cfg.run_dir)
    if args.until is not None:
        _positive(args.until, "--until")
    progress = not args.no_progress
    if args.all and (args.until is not None or args.restart):
        raise ProgvqError("--until and --restart go with --stage, not --all")
    if not args.all and args.reuse is not None:
        raise ProgvqError("--from goes with --all: it adopts the stages it can and trains the rest")
    reuse = Path(args.reuse) if args.reuse is not None else None
    if reuse is not None and not reuse.is_dir():
        raise ProgvqError(f"--from {reuse}: no such run directory")
    # one trainer per run folder (under torchrun, rank 0 holds it for the job)
    with training_lock(run_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        if args.all:
            train_all(cfg, run_dir, force=args.force, progress=progress, reuse=reuse)
        else:
            train_stage(
                cfg, args.stage, run_dir, until=args.until, restart=args.restart, force=args.force, progress=progress
            )
    return 0


def _check_sampling(args: argparse.Namespace) -> Path:
    """The options ``sample`` and ``inpaint`` share; returns the PNG path of ``--out``."""
    _positive(args.n, "-n")
    for name in ("temperature", "code_temperature", "pixel_temperature", "guidance"):
        if getattr(args, name, None) is not None:
            _positive(getattr(args, name), "--" + name.replace("_", "-"), 0)
    if args.nrow is not None:
        _positive(args.nrow, "--nrow")
    if not 0 <= args.seed < 2**63:
        raise ProgvqError(f"--seed: must be in [0, 2**63), got {args.seed}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ProgvqError(f"--out {out}: must end in .png (the arrays go beside it as .npz)")
    return out


def _check_sizes(
    args: argparse.Namespace, shape: tuple[int, int, int], count: int, per_image: int = 0, what: str = ""
) -> None:
    """Refuse ``-n`` (with ``count`` images shown) or ``--nrow`` asking for more memory than there is.

    ``per_image``: working bytes per image beyond its pixels (the codes of every level, ...)."""
    from progvq.memory import check_fits

    c, h, w = shape
    pad = 2  # image_grid's
    nrow = args.nrow or max(1, math.isqrt(count - 1) + 1)
    rows = -(-count // nrow)
    grid = c * (rows * (h + pad) + pad) * (nrow * (w + pad) + pad)
    # the images, their array in the npz and the file's bytes: a few copies of every pixel
    what = what or f"-n {args.n}: {count} images of {c}x{h}x{w}"
    check_fits(count * (3 * c * h * w + per_image), what)
    check_fits(2 * grid, f"--nrow {nrow}: a grid of {rows} x {nrow} images of {c}x{h}x{w}")


def _check_label(label: int | None, classes: int, run_dir: str) -> None:
    """Refuse ``--label`` for an unconditional prior, or out of its classes."""
    if label is None:
        return
    if not classes:
        raise ProgvqError(
            f"--label {label}: the prior of {run_dir} is not class-conditional (stages.prior.class_conditional: false)"
        )
    if not 0 <= label < classes:
        raise ProgvqError(f"--label {label}: out of range; the prior of {run_dir} has classes 0..{classes - 1}")


def cmd_sample(args: argparse.Namespace) -> int:
    from progvq.hierarchy import Hierarchy
    from progvq.images import image_grid, images_array, save_grid_and_arrays

    out = _check_sampling(args)
    check_outputs([out, out.with_suffix(".npz")], [], args.run_dir)
    model = Hierarchy.load(args.run_dir, allow_stale=args.allow_stale)
    _check_label(args.label, model.num_classes, args.run_dir)
    if args.guidance and not model.num_classes:
        raise ProgvqError(
            f"--guidance {args.guidance:g}: the prior of {args.run_dir} is not class-conditional "
            "(stages.prior.class_conditional: false)"
        )
    _check_sizes(args, model.image_shape, args.n)
    images = model.sample(
        args.n,
        temperature=args.temperature,
        code_temperature=args.code_temperature,
        pixel_temperature=args.pixel_temperature,
        seed=args.seed,
        label=args.label,
        guidance=args.guidance,
    )
    # a class-conditional prior cycles the classes: one class per column
    nrow = args.nrow or (model.num_classes if model.num_classes and args.label is None else None)
    npz = save_grid_and_arrays(image_grid(images, nrow=nrow), out, images=images_array(images))
    print(f"wrote {out} and {npz} ({args.n} images)")
    return 0


def cmd_inpaint(args: argparse.Namespace) -> int:
    import torch

    from progvq.hierarchy import Hierarchy
    from progvq.images import image_grid, save_grid_and_arrays
    from progvq.inpaint import box_mask, complete, inpainting_arrays, masked_view, parse_box, read_image, read_mask

    out = _check_sampling(args)
    check_outputs([out, out.with_suffix(".npz")], [p for p in (args.image, args.mask) if p], args.run_dir)
    _positive(args.candidates, "--candidates")
    box = parse_box(args.box) if args.box is not None else None
    model = Hierarchy.load(args.run_dir, allow_stale=args.allow_stale)
    _check_label(args.label, model.num_classes, args.run_dir)
    c, h, w = model.image_shape
    # every candidate of every completion is drawn at once: its codes at every level and its float pixels
    codes = sum(a * b for a, b in (model.grid_shape(k) for k in range(1, model.num_levels + 1)))
    what = f"-n {args.n} --candidates {args.candidates}: {args.n * args.candidates} draws of {c}x{h}x{w} images"
    _check_sizes(args, (c, h, w), args.n + 2, per_image=args.candidates * (8 * codes + 8 * c * h * w), what=what)
    image = read_image(args.image, (c, h, w))
    mask = box_mask(h, w, box) if box is not None else read_mask(args.mask, h, w)
    done = complete(
        model,
        image,
        mask,
        args.n,
        seed=args.seed,
        temperature=args.temperature,
        code_temperature=args.code_temperature,
        candidates=args.candidates,
        label=args.label,
    )
    shown = torch.cat([image[None], masked_view(image, mask)[None], done.images.cpu()])
    npz = save_grid_and_arrays(image_grid(shown, nrow=args.nrow), out, **inpainting_arrays(done, image, mask))
    print(f"wrote {out} (original, masked input, {args.n} completions) and {npz}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from progvq.hardware import describe
    from progvq.hierarchy import Hierarchy
    from progvq.run import load_run_data

    model = Hierarchy.load(args.run_dir, allow_stale=args.allow_stale)
    data = load_run_data(args.run_dir, model.config)
    if model.num_classes:
        data.check_classes(model.num_classes)
    images = data.heldout if args.split == "heldout" else data.train
    labels = data.heldout_labels if args.split == "heldout" else data.train_labels
    report = model.evaluate(images, labels=labels if model.num_classes else None)
    report["split"] = {"name": args.split, "images": len(images)}
    canvas = model.canvas
    report["pixels"] = {"original_shape": list(canvas.shape), "padded_shape": list(canvas.padded), "dims": canvas.dims}
    report["trained_with"] = model.trained_with
    report["evaluated_on"] = {"precision": "fp32", "hardware": describe(model.device)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c, h, w = canvas.shape
    padded = ""
    if canvas.is_padded:
        padded = (
            f" (padded to {canvas.padded[1]}x{canvas.padded[2]} for the model; the padding's bits stay in the bound)"
        )
    print(
        f"{args.run_dir}: {args.split} split, {len(images)} images; "
        f"figures over the data's own {c}x{h}x{w} pixels{padded}"
    )
    trained = ", ".join(
        f"{'prior' if n == 'prior' else 'stage ' + n} {info.get('precision', '?')}"
        for n, info in model.trained_with.items()
    )
    places = sorted({str(info.get("hardware", "?")) for info in model.trained_with.values()})
    if trained:
        print(f"  trained in {trained}, on {'; '.join(places)}")
    print(f"  evaluated in fp32 on {report['evaluated_on']['hardware']}")
    for k, fig in report["levels"].items():
        if "psnr" in fig:
            main = f"PSNR {fig['psnr']:.2f} dB, {fig['bits_per_dim']:.4f} bits/dim"
        else:
            main = (
                f"code accuracy {fig['accuracy']:.3f}, {fig['bits_per_code']:.3f} bits/code, "
                f"PSNR through level {k} {fig['psnr_through']:.2f} dB"
            )
        print(
            f"  level {k}: {main}; codes used {int(fig['codes_used'])} ({fig['usage']:.0%}), "
            f"perplexity {fig['perplexity']:.1f}"
        )
    prior = report["prior"]
    given = ""
    if "bits_per_code_given_label" in prior:
        given = f" ({prior['bits_per_code_given_label']:.3f} given the class)"
    print(f"  prior: {prior['bits_per_code']:.3f} bits/code{given}")
    bpd = report["bits_per_dim"]
    top = model.num_levels
    print(f"  NLL bound {bpd['total']:.4f} bits per dim of the {c}x{h}x{w} image, by level:")
    for k in range(top + 1):
        what = "pixels | z1" if k == 0 else (f"z{k} under the prior" if k == top else f"z{k} | z{k + 1}")
        print(f"    level {k} ({what}): {bpd[str(k)]:.4f}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from progvq.run import run_status

    for state in run_status(args.run_dir):
        label = "prior" if state.name == "prior" else f"stage {state.name}"
        print(f"{label}: {state.describe()}")
    return 0


def _output(name: str, suffix: str, why: str = "") -> Path:
    """``--out`` as a path, refused unless it ends in ``suffix``."""
    out = Path(name)
    if out.suffix.lower() != suffix:
        raise ProgvqError(f"--out {out}: must end in {suffix}{why}")
    return out


def cmd_encode(args: argparse.Namespace) -> int:
    from progvq.codec import code_arrays, read_inputs
    from progvq.fileio import atomic_write
    from progvq.hierarchy import Hierarchy
    from progvq.images import npz_bytes

    out = _output(args.out, ".npz")
    check_outputs([out], [*(args.images or []), *([args.npz] if args.npz else [])], args.run_dir)
    model = Hierarchy.load(args.run_dir, allow_stale=args.allow_stale)
    images, labels = read_inputs(model, files=args.images, npz=args.npz, split=args.split, cache_dir=Path(args.run_dir))
    arrays = code_arrays(model, model.encode_split(images))
    if labels is not None:
        arrays["labels"] = labels.numpy()
    atomic_write(out, npz_bytes(**arrays))
    grids = ", ".join(
        f"level {k}: {'x'.join(map(str, model.grid_shape(k)))} of {model.config.level(k).codes} codes"
        for k in range(1, model.num_levels + 1)
    )
    print(f"wrote {out} ({len(images)} images; {grids}{'; labels' if labels is not None else ''})")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    import torch

    from progvq.codec import read_codes
    from progvq.hierarchy import Hierarchy
    from progvq.images import image_grid, images_array, save_grid_and_arrays

    out = _output(args.out, ".png", " (the arrays go beside it as .npz)")
    check_outputs([out, out.with_suffix(".npz")], [args.codes], args.run_dir)
    _positive(args.temperature, "--temperature", 0)
    _positive(args.pixel_temperature, "--pixel-temperature", 0)
    if args.nrow is not None:
        _positive(args.nrow, "--nrow")
    if not 0 <= args.seed < 2**63:
        raise ProgvqError(f"--seed: must be in [0, 2**63), got {args.seed}")
    model = Hierarchy.load(args.run_dir, allow_stale=args.allow_stale)
    codes, level = read_codes(model, args.codes, args.level)
    labels = _decode_labels(model, args, level, len(codes))
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.cat(
        [
            model.decode(
                z,
                level,
                code_temperature=args.temperature,
                pixel_temperature=args.pixel_temperature,
                generator=gen,
                labels=None if labels is None else labels[start : start + 500],
            )
            for start, z in zip(range(0, len(codes), 500), codes.split(500), strict=True)
        ]
    )
    npz = save_grid_and_arrays(image_grid(images, nrow=args.nrow), out, images=images_array(images))
    print(f"wrote {out} and {npz} ({len(images)} images from level {level})")
    return 0


def _decode_labels(model: Hierarchy, args: argparse.Namespace, level: int, count: int) -> Tensor | None:
    """The classes (count,) int64 that ``decode`` hands the class-conditional decoders below ``level``: ``--label``
    for every image, else the codes file's ``labels``; None when no decoder it runs takes the class. Refuses a
    class-conditional decoder given neither, and ``--label`` where no decoder takes it, in one line."""
    import torch

    from progvq.codec import read_code_labels

    needs = [k for k in model.conditional_levels if k <= level]
    if not needs:
        if args.label is not None:
            raise ProgvqError(
                f"--label {args.label}: no decoder below level {level} of {args.run_dir} is class-conditional"
            )
        return None
    classes = model.levels[needs[0] - 1].num_classes
    if args.label is not None:
        _check_label(args.label, classes, args.run_dir)
        return torch.full((count,), args.label, dtype=torch.long)
    labels = read_code_labels(args.codes, count, classes)
    if labels is None:
        raise ProgvqError(
            f"{args.codes}: no labels, and level {needs[-1]}'s decoder of {args.run_dir} is class-conditional; "
            "give --label K (or codes of `progvq encode --split`, which keeps the labels)"
        )
    return labels


def cmd_compress(args: argparse.Namespace) -> int:
    from progvq.codec import Codec, read_inputs
    from progvq.fileio import atomic_write

    if bool(args.inputs) == bool(args.split):
        raise ProgvqError("give the images one way: INPUT files (PNG, or an npz of images) or --split heldout|train")
    check_outputs([args.out], args.inputs, args.run_dir)
    codec = Codec(args.run_dir, allow_stale=args.allow_stale)
    images, _ = read_inputs(codec.model, files=args.inputs or None, split=args.split, cache_dir=Path(args.run_dir))
    data = codec.compress(images)
    atomic_write(args.out, data)
    layout, n, dims = codec.last_layout, len(images), codec.model.canvas.dims
    bound = float(codec.bound_bits(images).sum())
    c, h, w = codec.image_shape
    print(
        f"wrote {args.out}: {n} images of {c}x{h}x{w}, {len(data):,} bytes = {layout.header:,} header and checksums "
        f"+ {layout.coded:,} coded; coded {8 * layout.coded / n:.1f} bits per image ({8 * layout.coded / n / dims:.4f} "
        f"bits/dim), the bound {bound / n:.1f} ({bound / n / dims:.4f} bits/dim, coded/bound "
        f"{8 * layout.coded / bound:.4f})"
    )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from progvq.codec import Codec
    from progvq.fileio import atomic_write, atomic_write_all
    from progvq.images import images_array, npz_bytes, png_bytes

    path, out = Path(args.file), Path(args.out)
    if out.suffix.lower() != ".npz" and out.exists() and not out.is_dir():
        raise ProgvqError(f"--out {out}: not a folder (give OUT.npz or a folder)")
    check_outputs([out], [path], args.run_dir)
    codec = Codec(args.run_dir, allow_stale=args.allow_stale)
    done = codec.decompress(codec.read_file(path), where=str(path))
    pngs = [out / f"{i:05d}.png" for i in range(len(done.images))]
    check_outputs([out] if out.suffix.lower() == ".npz" else pngs, [path], args.run_dir)
    if out.suffix.lower() == ".npz":
        labels = {"labels": done.labels.numpy()} if done.labels is not None else {}
        atomic_write(out, npz_bytes(images=images_array(done.images), **labels))
    else:  # every PNG or none
        atomic_write_all({png: png_bytes(image) for png, image in zip(pngs, done.images, strict=True)})
    print(f"wrote {out} ({len(done.images)} images, exact)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from progvq import datasets

    if args.data_command == "list":
        print("\n".join(datasets.describe()))
        return 0
    if args.data_command == "shapes":
        import shutil

        from progvq.data import write_shapes_folder
        from progvq.memory import check_fits, human

        _positive(args.count, "--count")
        _positive(args.size, "--size", 8)
        raw = args.count * args.channels * args.size**2
        side = f"{args.channels}x{args.size}x{args.size}"
        what = f"--count {args.count} --size {args.size}: {args.count} images of {side}"
        check_fits(2 * raw, what)  # generated in memory, as uint8 images and one batch of floats
        place = next(p for p in (Path(args.out).absolute(), *Path(args.out).absolute().parents) if p.exists())
        free = shutil.disk_usage(place).free
        if raw + 1024 * args.count > free:  # a PNG holds at most about its raw pixels and a header
            raise ProgvqError(
                f"{what} may take up to {human(raw + 1024 * args.count)}, more than the "
                f"{human(free)} free on the disk of {place}"
            )
        write_shapes_folder(Path(args.out), args.count, size=args.size, channels=args.channels, seed=args.seed)
        print(f"wrote {args.count} {args.size}x{args.size} images to {args.out}")
        return 0
    dataset = datasets.known(args.name)
    mirror = args.mirror
    if mirror is not None:
        datasets.check_mirror(mirror, "--mirror")
    elif os.environ.get(datasets.MIRROR_VARIABLE):
        mirror = datasets.check_mirror(os.environ[datasets.MIRROR_VARIABLE], datasets.MIRROR_VARIABLE)
    folder = Path(args.dir if args.dir is not None else dataset.place)
    datasets.get(dataset.name, folder, mirror=mirror, progress=False if args.no_progress else None)
    print(f"{dataset.name} is in {folder}: {datasets.usage(dataset, folder)}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "inpaint": cmd_inpaint,
    "eval": cmd_eval,
    "status": cmd_status,
    "encode": cmd_encode,
    "decode": cmd_decode,
    "compress": cmd_compress,
    "decompress": cmd_decompress,
    "data": cmd_data,
}


def _one_line_warnings(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """warnings.showwarning for users: one line, no source location."""
    print(f"progvq: warning: {message}", file=sys.stderr if file is None else file)


_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), 127)} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP become :class:`~progvq.errors.Terminated`, raised where the program is, so
    temporary files are removed on the way out. Training catches SIGTERM itself for the length of a
    stage (it finishes the step and writes a checkpoint)."""
    from progvq.errors import Terminated

    raise Terminated(signum)


def _one_line(message: str) -> str:
    """``message`` with every control character (a newline in a file's name) written as an escape."""
    return message.translate(_CONTROL)


def main(argv: list[str] | None = None) -> int:
    from progvq.distributed import teardown
    from progvq.errors import Interrupted, Terminated, signal_handlers

    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    warnings.showwarning = _one_line_warnings
    again = "progvq " + shlex.join(argv) if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "the same torchrun command"
    # under torchrun every rank runs this; rank 0 speaks for all of them
    speak = os.environ.get("RANK", "0") == "0"

    def say(message: str) -> None:
        if speak:
            # a file name may hold a newline or another control character: the message stays one line
            print(_one_line(message), file=sys.stderr)

    with signal_handlers((signal.SIGTERM, signal.SIGHUP), _terminate):
        try:
            return COMMANDS[args.command](args)
        except Terminated as stop:
            say(f"progvq: stopped by {stop.signal_name}; no output was left half-written; to start again: {again}")
            return 128 + stop.signum
        except ProgvqError as err:
            say(f"progvq: error: {err}")
            return 2
        except OSError as err:
            # the environment refused (disk full, permissions): every write is atomic, so what was there is intact
            where = f"{err.filename}: " if err.filename else ""
            say(f"progvq: error: {where}{err.strerror or err}")
            return 2
        except Interrupted as stop:
            say(f"progvq: {stop}; to resume, run the same command again: {again}")
            return 128 + int(getattr(signal, stop.signal_name, signal.SIGTERM))
        except KeyboardInterrupt:
            # checkpoints are atomic, so the last one written is intact; a download keeps its .part file;
            # every other output is written whole or not at all
            if args.command in ("train", "data"):
                where = "the download" if args.command == "data" else "from the last checkpoint"
                say(f"progvq: interrupted; to resume {where}, run the same command again: {again}")
            else:
                say(f"progvq: interrupted; no output was left half-written; to start again: {again}")
            return 130
        finally:
            teardown()


if __name__ == "__main__":
    sys.exit(main())
