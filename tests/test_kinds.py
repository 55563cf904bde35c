"""Kinds and their registries: FSQ works everywhere a VQ level does; the import graph has the seams it promises."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from progvq.build import build_level, build_prior
from progvq.checkpoint import load_checkpoint
from progvq.config import LevelConfig, config_from_dict, load_config
from progvq.errors import ConfigError
from progvq.fsq import FiniteScalarQuantizer, FSQConfig
from progvq.hierarchy import Hierarchy
from progvq.kinds import DECODERS, PRIORS, QUANTIZERS
from progvq.levels import AutoregressiveCodeLevel, AutoregressiveConfig, PixelLevel
from progvq.pixelcnn import GatedPixelCNN, PixelCNNConfig
from progvq.quantize import VectorQuantizer, VQConfig
from run_stage import main

from .conftest import ROOT, TINY
from .helpers import level_config

FSQ = ["stages.1.quantizer={kind: fsq, levels: [4, 4]}", "stages.2.quantizer={kind: fsq, levels: [3, 3]}"]


def test_registries_map_each_kind_to_its_dataclass_and_builder() -> None:
    assert QUANTIZERS.kinds() == ("vq", "fsq") and PRIORS.kinds() == ("pixelcnn",)
    assert DECODERS.kinds() == ("logistic", "factorised", "pixelcnn", "autoregressive")
    assert isinstance(QUANTIZERS.build(FSQConfig(levels=[8, 5, 5, 5])), FiniteScalarQuantizer)
    assert isinstance(QUANTIZERS.build(VQConfig(codes=8, dim=2)), VectorQuantizer)
    assert QUANTIZERS.kind_of(FSQConfig()) == "fsq"


def test_kind_tagged_sections_round_trip_and_refuse_unknown_kinds() -> None:
    cfg = load_config(
        TINY, [*FSQ, "stages.2.decoder={kind: autoregressive, pixelcnn: {channels: 8, layers: 3, kernel_size: 3}}"]
    )
    assert cfg.level(1).codes == 16 and cfg.level(1).code_dim == 2 and cfg.level(2).codes == 9
    assert isinstance(cfg.level(2).decoder, AutoregressiveConfig) and cfg.level(2).decoder.pixelcnn.channels == 8
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["stages"]["1"]["quantizer"] == {"kind": "fsq", "levels": [4, 4]}
    assert cfg.to_dict()["stages"]["prior"]["kind"] == "pixelcnn" and "pixelcnn" in cfg.to_dict()["stages"]["prior"]
    cases = {
        "stages.1.quantizer={kind: lfq}": "stages.1.quantizer.kind: must be one of vq, fsq, got 'lfq'",
        "stages.1.quantizer={kind: fsq, levels: [4, 1]}": (
            "stages.1.quantizer.levels: must be a non-empty list of integers >= 2"
        ),
        "stages.1.quantizer={kind: fsq, codes: 8}": "stages.1.quantizer.codes: unknown key (known: levels)",
        "stages.2.decoder={kind: logistic}": "stages.2.decoder.kind: must be one of factorised, autoregressive",
        "stages.1.decoder={kind: factorised}": (
            "stages.1.decoder.kind: must be logistic or pixelcnn (level 1 decodes pixels)"
        ),
        "stages.1.decoder={kind: pixelcnn}": "stages.1.loss_weights.mse: must be > 0 with a pixelcnn decoder",
        "stages.1.decoder={kind: pixelcnn, pixelcnn: {kernel_size: 4}}": (
            "stages.1.decoder.pixelcnn.kernel_size: must be odd and >= 3, got 4"
        ),
        "stages.prior.kind=transformer": "stages.prior.kind: must be one of pixelcnn, got 'transformer'",
        "stages.2.loss_weights.mse=1": (
            "stages.2.loss_weights.mse: this stage has no such loss part (its parts: recon, codebook, commit)"
        ),
    }
    for setting, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(TINY, [setting])
        assert message in str(err.value), setting
    colour = ["data.channels=3", "stages.1.decoder={kind: pixelcnn}", "stages.1.loss_weights.mse=1"]
    assert load_config(TINY, colour).level(1).decoder.pixelcnn.channels == PixelCNNConfig().channels


def test_one_pixelcnn_config_for_the_prior_and_the_decoder() -> None:
    cfg = load_config(TINY)
    prior = build_prior(cfg)
    assert isinstance(cfg.prior.model, PixelCNNConfig) and isinstance(prior, GatedPixelCNN) and prior.num_classes == 0
    level = build_level(LevelConfig(decoder=AutoregressiveConfig(pixelcnn=cfg.prior.model)), 1, 4)
    assert isinstance(level, AutoregressiveCodeLevel)
    assert len(level.pixelcnn.blocks) == len(prior.blocks) == cfg.prior.model.layers


def test_an_fsq_level_has_no_codebook_terms_and_round_trips_its_codes() -> None:
    torch.manual_seed(0)
    level = build_level(level_config(quantizer=FSQConfig(levels=[5, 3])), 1, 0)
    assert isinstance(level, PixelLevel) and level.quantizer.num_codes == 15
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = level(x)
    # no codebook; z pulled to its cell
    assert float(out.quant.codebook_loss.detach()) == 0 and float(out.quant.commit_loss.detach()) > 0
    assert torch.equal(out.quant.indices, level.encode(x))
    assert list(level.quantizer.state_dict()) == []  # nothing to learn, nothing to restart


@pytest.mark.trains
def test_fsq_works_everywhere_a_vq_level_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every stage kind, resume, bf16, eval, sampling and inpainting with FSQ at both levels."""
    run = tmp_path / "run"
    base = ["train", str(TINY), "--run-dir", str(run), "--no-progress", *(f"--set={s}" for s in FSQ)]
    assert main([*base, "--stage", "1", "--until", "3", "--set", "stages.1.precision=bf16"]) == 0
    assert main([*base, "--all", "--set", "stages.1.precision=bf16"]) == 0  # resumes stage 1, trains the rest
    assert load_checkpoint(run / "stage-1" / "checkpoint.pt")["trained_with"]["precision"] == "bf16"
    model = Hierarchy.load(run)
    assert [type(level.quantizer) for level in model.levels] == [FiniteScalarQuantizer] * 2
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["levels"]["1"]["codes_used"] <= 16 and report["levels"]["2"]["codes_used"] <= 9
    assert report["bits_per_dim"]["total"] > 0
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 16, 16)
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "in.png")
    args = ["inpaint", str(run), "--image", str(tmp_path / "in.png"), "--box", "0,8,16,16"]
    assert main([*args, "-n", "2", "--out", str(tmp_path / "i.png")]) == 0


@pytest.mark.trains
def test_a_resumed_fsq_stage_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg_sets = [f"--set={s}" for s in FSQ]
    for name, until in (("whole", None), ("split", 3)):
        base = ["train", str(TINY), "--stage", "1", "--run-dir", str(tmp_path / name), "--no-progress", *cfg_sets]
        if until is not None:
            assert main([*base, "--until", str(until)]) == 0
        assert main(base) == 0
    whole, split = (load_checkpoint(tmp_path / n / "stage-1" / "checkpoint.pt") for n in ("whole", "split"))
    assert whole["digest"] == split["digest"]


# --------------------------------------------------------------------------- the import graph


def _imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file, lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for path in [*sorted((ROOT / "progvq").glob("*.py")), *sorted((ROOT / "stages").glob("*.py"))]:
        package = path.parent.name
        name = f"{package}.{path.stem}" if path.stem != "__init__" else package
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y, from . import x
                    base = package if node.module is None else f"{package}.{node.module}"
                    found |= {base} if node.module else {f"{package}.{a.name}" for a in node.names}
                elif node.module and node.module.split(".")[0] in ("progvq", "stages"):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] in ("progvq", "stages")}
        graph[name] = {
            m for m in found if m != name and m not in ("progvq", "stages") or m == "stages" and package != "stages"
        }
    return graph


def test_the_import_graph_has_no_circle_and_points_one_way() -> None:
    graph = _imports()
    assert all(not any(m.startswith("stages") for m in deps) for mod, deps in graph.items() if mod.startswith("progvq"))
    # the loop imports no model: no quantiser, level, prior, kind or hierarchy
    models = {
        "progvq.quantize",
        "progvq.fsq",
        "progvq.levels",
        "progvq.pixelcnn",
        "progvq.kinds",
        "progvq.hierarchy",
        "progvq.build",
    }
    assert not graph["progvq.train"] & models
    # no circle: a depth-first walk never meets a module on its own path
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
