"""The one training loop that every stage kind uses.

A stage (see :class:`Stage`) supplies its model, its batches, its named loss
parts, its held-out evaluation and the images to log. The loop owns the rest:
optimiser, learning-rate schedule, gradient clipping, data order, logging,
checkpoints and exact resume.

Exact resume rests on three things: the data order is a pure function of
(seed, step); the learning rate is a pure function of the step; and every
piece of state a step reads (model with its quantiser buffers, optimiser, RNG
states) is in the checkpoint. Evaluation and image logging draw from no
global RNG, so they may run at any step without changing the trajectory.

Crashes: checkpoints are atomic and carry a digest; a damaged newest one is
set aside and the previous one used (see :mod:`progvq.checkpoint`). SIGINT
and SIGTERM finish the current step, write a checkpoint and raise
:class:`~progvq.errors.Interrupted`; a second signal stops at once.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .canvas import Canvas
from .checkpoint import load_latest, rng_state, save_checkpoint, set_rank_rng_state, unfinished_writes
from .config import Config, TrainConfig
from .distributed import Context, any_rank, gather_to_main, local_slice, mean_across
from .errors import Interrupted, RunError
from .hardware import describe, resolve_precision


class Stage(Protocol):
    """What a stage kind gives the loop."""

    name: str  # "1".."L" or "prior"
    model: nn.Module  # what is trained and checkpointed
    num_train: int  # size of the training split
    canvas: Canvas  # the data's own (C, H, W) and the padded one the models take, saved for sampling
    settings: TrainConfig  # steps, batch size, lr, ... and loss_weights

    def batch(self, index: Tensor) -> Any:
        """Training items at ``index`` (B,), on the model's device."""

    def loss(self, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Named, unweighted loss parts (scalars) and metrics (scalars) of one batch."""

    def evaluate(self) -> dict[str, float]:
        """Held-out figures; must not touch any global RNG or model state."""

    def images(self) -> dict[str, Tensor]:
        """Image grids (C, H, W) uint8 to log; must not touch any global RNG."""


@dataclass
class FitResult:
    step: int  # steps taken in all, this call and earlier ones
    done: bool  # the stage reached its configured steps
    metrics: dict[str, float]  # the latest held-out figures
    train_seconds: float = 0.0  # time spent in training steps in this call (no evaluation, logging or saving)
    images: int = 0  # training items seen in this call


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


class BatchOrder:
    """Shuffled epochs without replacement; batch ``step`` is a pure function of (seed, step).

    Each epoch is a permutation drawn from its own generator seeded by
    (seed, epoch), so a resumed run needs only the step to find its place.
    The last partial batch of an epoch is dropped to keep batch sizes equal.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = min(batch_size, n)
        self.per_epoch = n // self.batch_size
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of training step ``step``."""
        return divmod(step, self.per_epoch)

    def __call__(self, step: int) -> Tensor:
        epoch, pos = self.position(step)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=gen)
            self._epoch = epoch
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


class _StopRequest:
    """Signal handler for SIGINT/SIGTERM: note the first signal, stop at once on the second.

    The loop polls :attr:`name` after every step, so a signal never cuts a
    step or a checkpoint write in half.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.name: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.name is not None:
            raise KeyboardInterrupt  # asked twice: the user wants out now; the last checkpoint is intact
        self.name = signal.Signals(signum).name



@contextmanager
def _stop_requests() -> Iterator[_StopRequest]:
    """Catch SIGINT/SIGTERM for the duration of the block; the previous handlers come back after."""
    stop = _StopRequest()
    previous: dict[int, Any] = {}
    # handlers can only be set from the main thread; elsewhere signals keep their defaults
    if threading.current_thread() is threading.main_thread():
        for sig in _StopRequest.SIGNALS:
            previous[sig] = signal.signal(sig, stop)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.damaged-N`` so it is kept but never loaded again."""
    n = 1
    while (dest := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    path.rename(dest)
    return dest


def _quiet(message: str) -> None:
    """The log of ranks other than 0: they say nothing."""


def _wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` under DistributedDataParallel when there are several processes, else itself."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (the quantiser's codebook and statistics) are kept identical by the
    # quantiser itself, so DDP need not sync them on every forward.
    # find_unused_parameters where some parameters never get a gradient (the last PixelCNN
    # block's horizontal output feeds nothing); not static_graph, which cannot look into
    # the levels' dataclass outputs (their gradients went unsynced).
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # channels_last weights make DDP copy their gradients into its buckets (it says so
    # once per process); the copy is cheap next to the all-reduce, so the note is noise
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    from .pixelcnn import GatedPixelCNN

    unused = any(isinstance(m, GatedPixelCNN) for m in model.modules())  # only PixelCNNs have them
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=unused)


def _scalar(x: Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def fit(
    stage: Stage,
    config: Config,
    stage_dir: Path,
    *,
    parents: dict[str, str] | None = None,
    until: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    extra: dict[str, Any] | None = None,
    ctx: Context | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FitResult:
    """Train ``stage`` to its configured steps (or to ``until``), resuming from ``stage_dir``.

    Checkpoints go to ``stage_dir/checkpoint.pt`` every ``checkpoint_every``
    steps and when training stops; TensorBoard events go to ``stage_dir``.
    ``parents`` (stage -> digest of its checkpoint) and ``extra`` are stored in
    every checkpoint as they are.

    With ``ctx`` of several processes (torchrun), the model trains under
    DistributedDataParallel: each rank takes its slice of every global batch,
    gradients are averaged, and only rank 0 writes checkpoints, logs and
    images (see :mod:`progvq.distributed`).

    ``on_ready`` is called once the model and any checkpoint to resume from
    have loaded, before the first step: the caller's chance to record the run
    only when it is known to be usable.
    """
    cfg = stage.settings
    model = stage.model
    device = next(model.parameters()).device
    ctx = ctx or Context(device=device)
    if not ctx.main:
        progress, log = False, _quiet
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for every parameter's update, ~2.5x faster than the foreach path on CPU
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))
    weights = {name: float(w) for name, w in cfg.loss_weights.items()}  # type: ignore[attr-defined]
    order = BatchOrder(stage.num_train, cfg.batch_size, config.seed)
    if order.batch_size % ctx.world:
        raise RunError(f"stages.{stage.name}.batch_size: {order.batch_size} does not split evenly over {ctx.world} processes")
    ddp = _wrap(model, ctx)
    # bf16 autocast covers the forward pass (and so the backward); parameters, optimiser
    # state and the quantiser's statistics stay fp32. auto takes bf16 where it is native
    precision = resolve_precision(cfg.precision, device, f"stages.{stage.name}.precision")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    ckpt_path = stage_dir / "checkpoint.pt"
    metrics: dict[str, float] = {}

    for leftover in unfinished_writes(stage_dir) if ctx.main else []:
        # a temporary file of a write that a crash cut short; the file it was to replace is intact
        leftover.unlink()
        log(f"stage {stage.name}: removed {leftover.name}, an unfinished checkpoint write")

    def damaged(path: Path) -> None:
        log(f"stage {stage.name}: {path.name} is damaged, moved to {_set_aside(path).name}; it will not be loaded")

    step = 0
    found = load_latest(ckpt_path, map_location=device, on_damaged=damaged if ctx.main else None)
    if found is not None:
        ckpt = found.checkpoint
        if found.fell_back:
            log(f"stage {stage.name}: {found.problems[0]}; resuming from {found.path.name} instead")
        if ckpt["stage"] != stage.name:
            raise RunError(f"{found.path}: holds stage {ckpt['stage']}, not stage {stage.name}")
        if parents is not None and dict(ckpt.get("parents", {})) != parents:
            changed = sorted(k for k in set(parents) | set(ckpt.get("parents", {})) if parents.get(k) != ckpt["parents"].get(k))
            raise RunError(
                f"{found.path}: stage {stage.name} was started on another version of stage {changed[0]} (retrained since); "
                f"train --stage {stage.name} --restart trains it anew on the current one"
            )
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0]
            raise RunError(f"{found.path}: does not fit this stage's model ({first[:160]})") from None
        step = int(ckpt["step"])
        metrics = dict(ckpt.get("metrics", {}))
        log(f"stage {stage.name}: resuming at step {step} of {cfg.steps}")
    # each rank's own generators: restored from the checkpoint, else rank 0's and ranks > 0 derived from them
    set_rank_rng_state(found.checkpoint if found is not None else None, ctx.rank)
    if on_ready is not None:
        on_ready()
    end = cfg.steps if until is None else min(until, cfg.steps)

    saved_at = step if found is not None else -1  # the step of the newest checkpoint on disk

    def checkpoint() -> None:
        nonlocal saved_at
        saved_at = step
        rngs = gather_to_main(rng_state(), ctx)  # every rank joins; rank 0 gets all, in rank order
        if not ctx.main:
            return
        epoch, pos = order.position(step)
        save_checkpoint(
            {
                "stage": stage.name,
                "step": step,
                "steps": cfg.steps,
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"kind": "warmup_cosine", "step": step, "lr": lr_at(max(step - 1, 0), cfg)},
                "rng": rngs[0],  # type: ignore[index]
                "rng_ranks": rngs,
                "data": {"seed": config.seed, "epoch": epoch, "position": pos, "batch_size": order.batch_size},
                "parents": dict(parents or {}),
                "metrics": metrics,
                "extra": dict(extra or {}),
                # what the figures of this stage came from: the precision it trained in, and where
                "trained_with": {"precision": precision, "hardware": describe(device)},
            },
            ckpt_path,
        )

    if step >= end:
        return FitResult(step, step >= cfg.steps, metrics)

    writer = SummaryWriter(str(stage_dir), purge_step=step if step > 0 else None) if ctx.main else None
    bar = tqdm(total=cfg.steps, initial=step, desc=f"stage {stage.name}", disable=not progress, dynamic_ncols=True)
    seen, busy = 0, 0.0  # items and seconds of training steps since the last log
    total_seen, total_busy = 0, 0.0
    with _stop_requests() as stop:
        try:
            while step < end:
                tick = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = stage.batch(local_slice(order(step), ctx))
                model.train()
                stage.model = ddp  # the loss runs through DDP's forward, which syncs gradients
                try:
                    with autocast:
                        parts, batch_metrics = stage.loss(batch)
                finally:
                    stage.model = model
                total = sum(weights[name] * value for name, value in parts.items())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                step += 1
                # speed counts training steps only, so evaluations do not pull it down
                busy += time.perf_counter() - tick
                seen += order.batch_size
                bar.update(1)

                if step % cfg.log_every == 0 or step == end:
                    speed = seen / max(busy, 1e-9)
                    total_seen, total_busy = total_seen + seen, total_busy + busy
                    seen, busy = 0, 0.0
                    # the global batch's figures: every rank joins the average, rank 0 logs it
                    parts, batch_metrics = mean_across(parts, ctx), mean_across(batch_metrics, ctx)
                    total = sum(weights[name] * value for name, value in parts.items())
                    if writer is not None:
                        writer.add_scalar("loss/total", _scalar(total), step)
                        for name, value in parts.items():
                            writer.add_scalar(f"loss/{name}", _scalar(value), step)
                        for name, value in batch_metrics.items():
                            writer.add_scalar(f"train/{name}", _scalar(value), step)
                        writer.add_scalar("train/lr", lr, step)
                        writer.add_scalar("train/images_per_s", speed, step)
                    bar.set_postfix(loss=f"{_scalar(total):.4f}", img_s=f"{speed:.0f}")
                if (step % cfg.eval_every == 0 or step == cfg.steps) and writer is not None:
                    # rank 0 alone: evaluation draws from no global RNG and changes no state
                    metrics = stage.evaluate()
                    for name, value in metrics.items():
                        writer.add_scalar(f"heldout/{name}", value, step)
                    for name, grid in stage.images().items():
                        writer.add_image(name, grid, step)
                    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    (bar.write if progress else log)(f"stage {stage.name} step {step}: {summary}")
                if step % cfg.checkpoint_every == 0 or step == end:
                    checkpoint()
                # ranks may see a signal at different steps; they agree to stop at the same one
                if any_rank(stop.name is not None, ctx) and step < end:
                    if saved_at != step:
                        checkpoint()
                    raise Interrupted(stop.name or "a signal to another rank", stage.name, step, cfg.steps, str(ckpt_path))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    return FitResult(step, step >= cfg.steps, metrics, total_busy + busy, total_seen + seen)
