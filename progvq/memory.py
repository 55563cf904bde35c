"""How much memory a request would take, checked before it is allocated.

A size that passes validation (``stages.1.hidden: 1000000000000``, ``sample -n 1e12``)
can still be far beyond any machine. Allocating it would end in an allocator's
traceback, or worse, in a machine swapping itself to a halt; these checks refuse it
first, in one line that says how much it would take.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import ProgvqError

#: Bytes per trained parameter: fp32 weights, their gradient and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def human(n: float) -> str:
    """A byte count for people: ``1.5 GiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # unreachable: the loop returns at PiB


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory a request may take now on ``device``: free GPU memory, else the system's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_bytes()


def physical_bytes() -> int:
    """This machine's memory in bytes (a very large number where it cannot be told: let the allocator decide)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_fits(nbytes: int, what: str, device: torch.device | str = "cpu") -> None:
    """Refuse ``what`` (e.g. ``"-n 10000000: 10000000 images of 1x28x28"``) when it would take more
    than the memory available."""
    available = available_bytes(device)
    if nbytes > available:
        raise ProgvqError(f"{what} would take {human(nbytes)}, more than the {human(available)} of memory available")


def parameter_count(build: Callable[[], nn.Module]) -> int:
    """Parameters (and buffers) of the model ``build()`` makes, built on the meta device: no memory is taken."""
    with torch.device("meta"):
        model = build()
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


def check_model_fits(build: Callable[[], nn.Module], where: str, device: torch.device | str = "cpu") -> None:
    """Refuse a model (``where``: its config key) whose training state alone would not fit in memory."""
    try:
        count = parameter_count(build)
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        # a single tensor of more bytes than 64 bits can count
        raise ProgvqError(f"{where}: a model too large to count its bytes (a tensor beyond 2**63 bytes)") from None
    check_fits(count * TRAINING_BYTES_PER_PARAMETER, f"{where}: a model of {count:,} parameters to train", device)


def check_generated_data_fits(source: str, count: int, channels: int, size: int) -> None:
    """Refuse generating ``count`` images of ``channels`` x ``size`` x ``size`` (``data.count``) that would not
    fit: the generated sources are made in memory, as uint8 arrays and their float tensors of one batch."""
    if source == "shapes":
        check_fits(2 * count * channels * size * size, f"data.count: {count} images of {channels}x{size}x{size}")
