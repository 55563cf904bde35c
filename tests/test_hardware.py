"""precision: auto picks bf16 only where the CPU runs it natively; an explicit bf16 elsewhere warns once."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from progvq import hardware
from progvq.checkpoint import checkpoint_path, load_checkpoint
from progvq.config import load_config
from progvq.hardware import describe, resolve_precision
from run_stage import main

from .conftest import TINY

CPU = torch.device("cpu")
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU flags the code sees, with no capability cap in the environment."""
    for name in CAPS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hardware, "_warned", set())

    def use(*flags: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma", *flags}))

    return use


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        (("amx_bf16", "amx_tile", "avx512f"), {}, "bf16"),  # Sapphire Rapids and later
        (("avx512_bf16", "avx512f"), {}, "bf16"),  # Cooper Lake, Zen 4
        ((), {}, "fp32"),  # AVX2 only: an AMD EPYC of the Zen 2/3 kind, older Intel
        (("avx512f",), {}, "fp32"),  # AVX-512 without its bf16 instructions
        (("amx_bf16", "avx512_bf16"), {"ATEN_CPU_CAPABILITY": "avx2"}, "fp32"),  # capped by the environment
        (("amx_bf16", "avx512_bf16"), {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "fp32"),
        (("amx_bf16", "avx512_bf16"), {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "bf16"),
    ],
)
def test_auto_takes_bf16_only_where_native(fake_cpu, monkeypatch: pytest.MonkeyPatch, flags, env, expected) -> None:
    fake_cpu(*flags)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        assert resolve_precision("auto", CPU) == expected
        assert resolve_precision("fp32", CPU) == "fp32"


def test_explicit_bf16_without_native_support_warns_once(fake_cpu) -> None:
    fake_cpu()
    slow = r"stages\.1\.precision: bf16 will be slow here.*neither AMX nor AVX-512 BF16"
    with pytest.warns(UserWarning, match=slow) as caught:
        assert resolve_precision("bf16", CPU, "stages.1.precision") == "bf16"  # kept: the user asked
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU, "stages.1.precision") == "bf16"  # once per setting
    fake_cpu("amx_bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU, "stages.2.precision") == "bf16"  # native: nothing to say


def test_describe_names_the_cpu_and_its_bf16_units(fake_cpu) -> None:
    fake_cpu("amx_bf16")
    line = describe(CPU)
    assert line.startswith("cpu: ") and "AMX-BF16" in line and "\n" not in line


def test_default_precision_is_auto() -> None:
    cfg = load_config(TINY)
    assert all(cfg.stages[name].precision == "auto" for name in cfg.stage_names())


@pytest.mark.trains
@pytest.mark.parametrize("flags, expected", [(("amx_bf16",), "bf16"), ((), "fp32")])
def test_a_stage_records_the_precision_auto_chose(
    fake_cpu,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags,
    expected,
) -> None:
    fake_cpu(*flags)
    run = tmp_path / "run"
    args = ["train", str(TINY), "--stage", "1", "--run-dir", str(run), "--no-progress", "--set", "stages.1.steps=2"]
    assert main(args) == 0
    info = load_checkpoint(checkpoint_path(run, "1"))["trained_with"]
    assert info["precision"] == expected and info["hardware"].startswith("cpu: ")
    assert "warning" not in capsys.readouterr().err


@pytest.mark.trains
def test_cli_says_once_that_explicit_bf16_will_be_slow(
    fake_cpu,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_cpu()
    run = tmp_path / "run"
    args = ["train", str(TINY), "--stage", "1", "--run-dir", str(run), "--no-progress"]
    args += ["--set", "stages.1.steps=2", "--set", "stages.1.precision=bf16"]
    assert main(args) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].startswith("progvq: warning: stages.1.precision: bf16 will be slow here")
    assert load_checkpoint(checkpoint_path(run, "1"))["trained_with"]["precision"] == "bf16"
