"""What the machine runs fast: the precision ``auto`` picks, and a line naming the CPU for figures.

bfloat16 pays only where the hardware multiplies it natively: AMX or AVX-512 BF16
on a CPU, bf16 tensor cores on a GPU. Elsewhere torch emulates it: on an AVX2-only
CPU a bf16 matmul ran about 200x slower than fp32. So ``precision: auto`` (the
default) takes bf16 only on such hardware, and an explicit ``bf16`` elsewhere
trains but says once why it will be slow.

oneDNN, which runs the convolutions and matmuls, honours ``ONEDNN_MAX_CPU_ISA``
and ATen ``ATEN_CPU_CAPABILITY``: a cap below AVX-512 takes the native bf16
paths away even where the CPU has them, so they count here too.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

import torch

#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: ``ONEDNN_MAX_CPU_ISA`` values that still allow the native bf16 paths.
_ONEDNN_BF16_ISAS = (
    "ALL",
    "DEFAULT",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512_AMX_2",
)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: nothing is assumed)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def capped_below_avx512() -> bool:
    """Whether the environment keeps torch off the AVX-512 paths (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``)."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return aten in ("default", "avx2", "zvector", "vsx") or (onednn != "" and onednn not in _ONEDNN_BF16_ISAS)


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16) and torch may use it."""
    return bool(cpu_flags() & set(BF16_FLAGS)) and not capped_below_avx512()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively: a CPU per :func:`cpu_native_bf16`, a GPU with bf16 tensor cores."""
    if device.type == "cpu":
        return cpu_native_bf16()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False  # MPS and others: not known to pay, fp32 is the safe choice


_warned: set[str] = set()


def resolve_precision(requested: str, device: torch.device, where: str = "precision") -> str:
    """``auto`` -> ``bf16`` where ``device`` runs it natively, else ``fp32``; others as asked.

    An explicit ``bf16`` on a device without native bf16 is kept (the user asked) with a
    one-line warning, once per process and setting.
    """
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and not native_bf16(device) and where not in _warned:
        _warned.add(where)
        if device.type == "cpu":
            what = "this CPU has neither AMX nor AVX-512 BF16"
        else:
            what = f"{device.type} has no native bf16"
        if device.type == "cpu" and cpu_flags() & set(BF16_FLAGS):
            what = "ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA keeps torch off its AVX-512 bf16 paths"
        warnings.warn(
            f"{where}: bf16 will be slow here, often far slower than fp32 ({what}); `auto` would take fp32",
            stacklevel=2,
        )
    return requested


def describe(device: torch.device) -> str:
    """One line naming the hardware a figure came from, e.g. ``cpu: Intel Xeon (AVX512, AMX-BF16, AVX512-BF16)``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return device.type
    extras = [torch.backends.cpu.get_cpu_capability()]
    flags = cpu_flags()
    extras += [name.upper().replace("_", "-") for name in BF16_FLAGS if name in flags]
    if capped_below_avx512():
        extras.append("capped below AVX-512 by the environment")
    return f"cpu: {cpu_name()} ({', '.join(extras)})"
