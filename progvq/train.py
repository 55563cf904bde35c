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
from .checkpoint import (
    CHECKPOINT_NAME,
    Found,
    changed_parent,
    first_nonfinite,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rank_rng_state,
    unfinished_writes,
)
from .config import Config, TrainConfig
from .data import data_change
from .distributed import Context, any_rank, gather_ranks, gather_to_main, local_slice, mean_across
from .errors import Interrupted, RunError, signal_handlers
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

    def loss(self, model: nn.Module, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Named, unweighted loss parts (scalars) and metrics (scalars) of one batch, computed through
        ``model`` (the stage's model, or its DistributedDataParallel wrapper, whose forward syncs gradients)."""

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
    with signal_handlers(_StopRequest.SIGNALS, stop):
        yield stop


@contextmanager
def _writer_thread_errors() -> Iterator[None]:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails (a full disk).

    The thread keeps the error and the writer raises it on the training thread at its next
    write or at close, where it becomes one line naming the events file.
    """
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.damaged-N`` so it is kept but never loaded again."""
    n = 1
    while (dest := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    path.rename(dest)
    return dest


def report_damage(name: str, log: Callable[[str], None]) -> Callable[[Path], None]:
    """What to do with a damaged checkpoint of stage ``name``: set it aside and say so (``on_damaged``)."""

    def damaged(path: Path) -> None:
        log(f"stage {name}: {path.name} is damaged, moved to {set_aside(path).name}; it will not be loaded")

    return damaged


def _quiet(message: str) -> None:
    """The log of ranks other than 0: they say nothing."""


def _wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` under DistributedDataParallel when there are several processes, else itself.

    The cross-process gather is injected into every module that has one (the quantisers),
    and DDP looks for unused parameters where a module says it has some: the loop asks
    the model, never its class.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    for module in model.modules():
        if hasattr(module, "gather"):
            module.gather = gather_ranks
    # Buffers (the quantiser's codebook and statistics) are kept identical by the
    # quantiser itself, so DDP need not sync them on every forward. Not static_graph,
    # which cannot look into the levels' dataclass outputs (their gradients went unsynced).
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # channels_last weights make DDP copy their gradients into its buckets (it says so
    # once per process); the copy is cheap next to the all-reduce, so the note is noise
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    unused = any(getattr(m, "unused_parameters", False) for m in model.modules())
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=unused)


def _scalar(x: Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


class Trainer:
    """Trains one stage: resume, step, log, evaluate, checkpoint. :meth:`run` is the loop.

    Checkpoints go to ``stage_dir/checkpoint.pt`` every ``checkpoint_every`` steps and when
    training stops; TensorBoard events go to ``stage_dir``. ``parents`` (stage -> digest of
    its checkpoint) and ``extra`` are stored in every checkpoint as they are; ``extra["data"]``,
    when given, is the data's record (:func:`progvq.data.data_record`), and a checkpoint of
    other data is not resumed. With ``ctx`` of
    several processes (torchrun) the model trains under DistributedDataParallel: each rank
    takes its slice of every global batch, gradients are averaged, and only rank 0 writes
    checkpoints, logs and images (see :mod:`progvq.distributed`).
    """

    def __init__(
        self,
        stage: Stage,
        config: Config,
        stage_dir: Path,
        *,
        parents: dict[str, str] | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
        extra: dict[str, Any] | None = None,
        ctx: Context | None = None,
    ) -> None:
        self.stage, self.config, self.cfg = stage, config, stage.settings
        self.model = stage.model
        self.device = next(self.model.parameters()).device
        self.ctx = ctx or Context(device=self.device)
        self.progress, self.log = (progress, log) if self.ctx.main else (False, _quiet)
        self.parents, self.extra = dict(parents or {}), dict(extra or {})
        self.stage_dir, self.ckpt_path = stage_dir, stage_dir / CHECKPOINT_NAME
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for every parameter's update, ~2.5x faster than the foreach path on CPU
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused)
        self.weights = {name: float(w) for name, w in self.cfg.loss_weights.items()}
        self.order = BatchOrder(stage.num_train, self.cfg.batch_size, config.seed)
        if self.order.batch_size % self.ctx.world:
            raise RunError(
                f"stages.{stage.name}.batch_size: {self.order.batch_size} "
                f"does not split evenly over {self.ctx.world} processes"
            )
        self.forward_model = _wrap(self.model, self.ctx)  # the loss runs through DDP's forward, which syncs gradients
        # bf16 autocast covers the forward pass (and so the backward); parameters, optimiser
        # state and the quantiser's statistics stay fp32. auto takes bf16 where it is native
        self.precision = resolve_precision(self.cfg.precision, self.device, f"stages.{stage.name}.precision")
        self.step, self.saved_at, self.metrics = 0, -1, {}
        self.writer: SummaryWriter | None = None

    # ------------------------------------------------------------------ resume

    def resume(self, found: Found | None) -> None:
        """Continue from ``found`` (the stage's newest good checkpoint), or start at step 0 when None."""
        for leftover in unfinished_writes(self.stage_dir) if self.ctx.main else []:
            # a temporary file of a write that a crash cut short; the file it was to replace is intact
            leftover.unlink()
            self.log(f"stage {self.stage.name}: removed {leftover.name}, an unfinished checkpoint write")
        if found is not None:
            ckpt, name = found.checkpoint, self.stage.name
            if found.fell_back:
                self.log(f"stage {name}: {found.problems[0]}; resuming from {found.path.name} instead")
            if ckpt["stage"] != name:
                raise RunError(f"{found.path}: holds stage {ckpt['stage']}, not stage {name}")
            changed = changed_parent(dict(ckpt.get("parents", {})), self.parents)
            if changed is not None:
                raise RunError(
                    f"{found.path}: stage {name} was started on another version of stage {changed} "
                    "(retrained since); "
                    f"train --stage {name} --restart trains it anew on the current one"
                )
            # a stage goes on only on the data it started on (a checkpoint that records none: unknown, taken)
            change = data_change(ckpt["extra"].get("data"), self.extra.get("data"))
            if change is not None:
                raise RunError(
                    f"{found.path}: stage {name} was started on other data ({change}); "
                    f"train --stage {name} --restart trains it anew on the data as it is now"
                )
            try:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as err:
                first = str(err).strip().splitlines()[0]
                raise RunError(f"{found.path}: does not fit this stage's model ({first[:160]})") from None
            self.step = self.saved_at = int(ckpt["step"])
            self.metrics = dict(ckpt.get("metrics", {}))
            self.log(f"stage {name}: resuming at step {self.step} of {self.cfg.steps}")
        # each rank's own generators: restored from the checkpoint, else rank 0's and ranks > 0 derived from them
        set_rank_rng_state(found.checkpoint if found is not None else None, self.ctx.rank)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One optimiser step at ``self.step``; the unweighted loss parts and the batch's metrics."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.stage.batch(local_slice(self.order(self.step), self.ctx))
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            parts, metrics = self.stage.loss(self.forward_model, batch)
        if parts.keys() != self.weights.keys():
            # the config's weights were checked against the stage kind's parts; a stage that returns
            # others is a stage whose kind is misdeclared
            raise RunError(
                f"stage {self.stage.name} returns loss parts {sorted(parts)}, its config weights {sorted(self.weights)}"
            )
        total = sum(self.weights[name] * value for name, value in parts.items())
        # a diverged step must not reach the weights, or a checkpoint: stop before the update
        if any_rank(not bool(torch.isfinite(total.detach())), self.ctx):
            figures = ", ".join(f"{name} {_scalar(value):.4g}" for name, value in parts.items())
            raise self._diverged(f"loss is not finite at step {self.step + 1} ({figures})")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return parts, metrics

    # ------------------------------------------------------------------ logging, evaluation, checkpoints

    def log_scalars(self, parts: dict[str, Tensor], metrics: dict[str, Tensor], speed: float) -> float:
        """The global batch's figures to TensorBoard (every rank joins the average); returns the weighted loss."""
        parts, metrics = mean_across(parts, self.ctx), mean_across(metrics, self.ctx)
        total = _scalar(sum(self.weights[name] * value for name, value in parts.items()))
        if self.writer is not None:
            self.writer.add_scalar("loss/total", total, self.step)
            for name, value in parts.items():
                self.writer.add_scalar(f"loss/{name}", _scalar(value), self.step)
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}", _scalar(value), self.step)
            self.writer.add_scalar("train/lr", lr_at(self.step - 1, self.cfg), self.step)
            self.writer.add_scalar("train/images_per_s", speed, self.step)
        return total

    def evaluate(self) -> str:
        """Held-out figures and images (rank 0 alone: evaluation draws from no global RNG and changes no state)."""
        assert self.writer is not None
        self.metrics = self.stage.evaluate()
        for name, value in self.metrics.items():
            self.writer.add_scalar(f"heldout/{name}", value, self.step)
        for name, grid in self.stage.images().items():
            self.writer.add_image(name, grid, self.step)
        figures = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        return f"stage {self.stage.name} step {self.step}: {figures}"

    def _diverged(self, what: str) -> RunError:
        """The one-line refusal of a stage whose training went non-finite; its last checkpoint stays as it was."""
        name = self.stage.name
        kept = (
            f"its last checkpoint (step {self.saved_at}, {self.ckpt_path}) is kept"
            if self.saved_at > 0
            else "no checkpoint of it was written"
        )
        return RunError(
            f"stage {name}: {what}; {kept}; lower stages.{name}.lr (now {self.cfg.lr:g}) or set "
            f"stages.{name}.grad_clip, then train --stage {name} --restart"
        )

    def checkpoint(self) -> None:
        """Write the checkpoint of ``self.step`` (every rank joins: rank 0 gathers their generator states)."""
        bad = first_nonfinite(self.model.state_dict())
        if any_rank(bad is not None, self.ctx):
            raise self._diverged(f"weights are not finite after step {self.step} ({bad or 'on another rank'})")
        self.saved_at = self.step
        rngs = gather_to_main(rng_state(), self.ctx)  # rank 0 gets all, in rank order
        if not self.ctx.main:
            return
        payload = {
            "stage": self.stage.name,
            "step": self.step,
            "steps": self.cfg.steps,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rngs[0],  # type: ignore[index]
            "rng_ranks": rngs,
            "parents": self.parents,
            "metrics": self.metrics,
            "extra": self.extra,
            # what the figures of this stage came from: the precision it trained in, and where
            "trained_with": {"precision": self.precision, "hardware": describe(self.device)},
        }
        save_checkpoint(payload, self.ckpt_path)

    # ------------------------------------------------------------------ the loop

    def _named(self, err: OSError) -> OSError:
        """``err`` naming a file: TensorBoard's writer reports a full disk without the events file's name."""
        if err.filename is not None:
            return err
        events = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
        name = getattr(events, "_file_name", None) or self.stage_dir / "events.out.tfevents.*"
        return OSError(err.errno, err.strerror or str(err), str(name))

    def run(self, until: int | None = None) -> FitResult:
        """Train to the configured steps (or to ``until``); a signal stops it with a checkpoint."""
        cfg, end = self.cfg, self.cfg.steps if until is None else min(until, self.cfg.steps)
        if self.step >= end:
            return FitResult(self.step, self.step >= cfg.steps, self.metrics)
        if self.ctx.main:
            self.writer = SummaryWriter(str(self.stage_dir), purge_step=self.step if self.step > 0 else None)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=f"stage {self.stage.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        seen, busy, total_seen, total_busy = 0, 0.0, 0, 0.0  # items and seconds of training steps
        with _stop_requests() as stop, _writer_thread_errors():
            try:
                while self.step < end:
                    tick = time.perf_counter()
                    parts, metrics = self.train_step()
                    busy += time.perf_counter() - tick  # speed counts training steps only
                    seen += self.order.batch_size
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == end:
                        loss = self.log_scalars(parts, metrics, seen / max(busy, 1e-9))
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{seen / max(busy, 1e-9):.0f}")
                        total_seen, total_busy, seen, busy = total_seen + seen, total_busy + busy, 0, 0.0
                    if (self.step % cfg.eval_every == 0 or self.step == cfg.steps) and self.writer is not None:
                        (bar.write if self.progress else self.log)(self.evaluate())
                    if self.step % cfg.checkpoint_every == 0 or self.step == end:
                        self.checkpoint()
                    # ranks may see a signal at different steps; they agree to stop at the same one
                    if any_rank(stop.name is not None, self.ctx) and self.step < end:
                        if self.saved_at != self.step:
                            self.checkpoint()
                        raise Interrupted(
                            stop.name or "a signal to another rank",
                            self.stage.name,
                            self.step,
                            cfg.steps,
                            str(self.ckpt_path),
                        )
            except OSError as err:
                raise self._named(err) from err
            finally:
                bar.close()
                if self.writer is not None:
                    try:
                        self.writer.close()
                    except OSError as err:
                        raise self._named(err) from err
        return FitResult(self.step, self.step >= cfg.steps, self.metrics, total_busy + busy, total_seen + seen)


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
    found: Found | None | bool = True,
) -> FitResult:
    """Train ``stage`` to its configured steps (or to ``until``), resuming from ``stage_dir``.

    ``found``: the stage's newest good checkpoint when the caller has read it already
    (a :class:`progvq.run.Run` does), None for none; True reads it here. ``on_ready`` is
    called once the model and any checkpoint to resume from have loaded, before the first
    step: the caller's chance to record the run only when it is known to be usable.
    """
    trainer = Trainer(stage, config, stage_dir, parents=parents, progress=progress, log=log, extra=extra, ctx=ctx)
    if found is True:
        on_damaged = report_damage(stage.name, trainer.log) if trainer.ctx.main else None
        found = load_latest(trainer.ckpt_path, map_location=trainer.device, on_damaged=on_damaged)
    trainer.resume(found or None)
    if on_ready is not None:
        on_ready()
    return trainer.run(until)
