"""Multi-process training with torchrun: process group, ranks, and the few collectives the loop needs.

Launch any stage on N processes with PyTorch's own launcher::

    torchrun --nproc_per_node N run_stage.py train CONFIG --stage K

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` reads them and joins the process group, with
NCCL on CUDA devices and gloo on CPUs. Without them (a plain ``progvq train``)
it is a single process and every helper here is a no-op.

How the work is split: the global batch of every step is the one a single
process would draw (:class:`progvq.train.BatchOrder`, a pure function of seed
and step), and rank ``r`` of ``W`` takes its ``r``-th contiguous slice. The
data order therefore does not depend on the number of processes, and a run
can resume with another one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import RunError


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, images and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA if present, else Apple's MPS if present, else the CPU; ``cuda`` picks this rank's GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RunError("device: cuda was asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunError("device: mps was asked for, but no MPS device is available")
    return torch.device(name)


def setup(device_name: str) -> Context:
    """Join the process group if launched as several processes; the device of this process."""
    if not launched():
        return Context(device=resolve_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "mps":
        raise RunError("device: mps cannot train on several processes (torch.distributed has no MPS backend)")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(index: Tensor, ctx: Context) -> Tensor:
    """This rank's contiguous share of a global batch of indices (B,) -> (B / world,)."""
    if not ctx.distributed:
        return index
    share = len(index) // ctx.world
    return index[ctx.rank * share : (ctx.rank + 1) * share]


def mean_across(values: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
    """Average scalar tensors over ranks (for logging the global batch's loss)."""
    if not ctx.distributed or not values:
        return values
    names = list(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names]).to(ctx.device)
    dist.all_reduce(stacked)
    stacked /= ctx.world
    return {n: stacked[i] for i, n in enumerate(names)}


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(obj: Any, ctx: Context) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``[obj]`` in one process); None on other ranks.

    Every rank must call it at the same point. ``obj`` travels pickled, so it
    may hold tensors (CPU ones: the generator states it is used for).
    """
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world if ctx.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_ranks(flat: Tensor) -> Tensor | None:
    """(N, D) of this rank -> (world * N, D) of all ranks in rank order; None in one process.

    Every rank must pass the same N (the global batch is split evenly). The trainer gives
    this to every quantiser that has a ``gather`` when it trains on several processes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat.contiguous())
    return torch.cat(parts)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
