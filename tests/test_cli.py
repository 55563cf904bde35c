"""Every command-line verb end to end on configs/tiny.yaml, and exact resume per stage kind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progvq.checkpoint import checkpoint_path, file_sha256, load_checkpoint, payload_digest, save_checkpoint
from progvq.hierarchy import Hierarchy
from progvq.pixelcnn import GatedPixelCNN
from run_stage import main

from .conftest import ROOT, TINY
from .helpers import assert_same_tensors, train, uniform_prior, write_weights


def run(*args: str) -> int:
    return main([*args])


@pytest.mark.trains
def test_status_of_trained_run(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("status", str(tiny_run)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "stage 1: done (6 steps)",
        "stage 2: done (6 steps)",
        "prior: done (6 steps)",
    ]


@pytest.mark.trains
def test_status_partial_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(tmp_path / "r", "--stage", "1", "--until", "3") == 0
    capsys.readouterr()
    assert run("status", str(tmp_path / "r")) == 0
    assert capsys.readouterr().out.splitlines() == [
        "stage 1: partial (step 3 of 6)",
        "stage 2: missing",
        "prior: missing",
    ]



@pytest.mark.trains
def test_sample_writes_png_and_uint8_npz(
    tiny_run: Path,
    tiny_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "grid.png"
    assert run("sample", str(tiny_run), "-n", "10", "--seed", "3", "--out", str(out)) == 0
    images = np.load(out.with_suffix(".npz"))["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 16, 16)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 3 * 18, 2 + 4 * 18)  # ceil(sqrt(10)) = 4 per row, so 3 rows; 2-pixel padding
    # the same seed gives the same images
    again = tmp_path / "again.png"
    assert run("sample", str(tiny_run), "-n", "10", "--seed", "3", "--out", str(again)) == 0
    assert np.array_equal(np.load(again.with_suffix(".npz"))["images"], images)
    # Another seed draws other top codes. Whether other codes decode to other images depends on
    # what a few training steps made of the decoders (a collapsed one draws one image for every
    # seed), so the check is on the codes drawn, from a prior that is uniform by construction:
    # two seeds drawing the same 10 x 2 x 2 codes out of 8 has probability 8^-40.
    # every prior weight zeroed in the checkpoint (the stages below are untouched: nothing goes stale)
    write_weights(tiny_copy, "prior", uniform_prior(Hierarchy.load(tiny_copy)).prior)
    uniform = Hierarchy.load(tiny_copy).prior
    assert uniform is not None
    any_codes = torch.randint(uniform.num_codes, (3, 2, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform(any_codes), torch.zeros(3, uniform.num_codes, 2, 2))
    drawn: list[torch.Tensor] = []
    sample = GatedPixelCNN.sample

    def recording(self: GatedPixelCNN, *args: object, **kwargs: object) -> torch.Tensor:
        codes = sample(self, *args, **kwargs)
        drawn.append(codes.clone())
        return codes

    # the tiny run's level 2 decoder is factorised: no draw of its own
    monkeypatch.setattr(GatedPixelCNN, "sample", recording)

    def top_codes(seed: int) -> tuple[torch.Tensor, np.ndarray]:
        target = tmp_path / f"uniform-{seed}.png"
        assert run("sample", str(tiny_copy), "-n", "10", "--seed", str(seed), "--out", str(target)) == 0
        assert len(drawn) == 1, "one draw of the top codes per sample command"
        return drawn.pop(), np.load(target.with_suffix(".npz"))["images"]

    three, three_images = top_codes(3)
    assert three.shape == (10, 2, 2)
    again_codes, again_images = top_codes(3)
    assert torch.equal(again_codes, three) and np.array_equal(again_images, three_images)
    four, _ = top_codes(4)
    assert not torch.equal(four, three)


@pytest.mark.trains
def test_eval_json_figures(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("eval", str(tiny_run), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == {"name": "heldout", "images": 64}
    assert set(report["levels"]) == {"1", "2"}
    assert {"psnr", "bits_per_dim", "codes_used", "usage", "perplexity", "psnr_through"} <= set(report["levels"]["1"])
    assert {"accuracy", "bits_per_code", "codes_used", "usage"} <= set(report["levels"]["2"])
    bpd = report["bits_per_dim"]
    assert bpd["total"] == pytest.approx(bpd["0"] + bpd["1"] + bpd["2"], rel=1e-6)
    assert 0 < report["levels"]["1"]["usage"] <= 1
    # the level-2 term is the level-2 decoder's cross-entropy, per image dim instead of per code
    level2 = report["levels"]["2"]["bits_per_code"] * 16 / 256
    assert bpd["1"] == pytest.approx(level2, rel=1e-4)
    assert report["prior"]["bits_per_code"] * 4 / 256 == pytest.approx(bpd["2"], rel=1e-4)


@pytest.mark.trains
def test_eval_table(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("eval", str(tiny_run)) == 0
    out = capsys.readouterr().out
    assert "level 1: PSNR" in out and "NLL bound" in out and "level 2 (z2 under the prior)" in out


@pytest.mark.trains
def test_python_api_matches_cli(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command line (``main``, argument parsing included) gives what the Python API gives for the same run."""
    from progvq.data import load_dataset
    from progvq.run import run_status

    model = Hierarchy.load(tiny_run)
    assert model.num_levels == 2 and model.image_shape == (1, 16, 16)
    assert model.grid_shape(1) == (4, 4) and model.grid_shape(2) == (2, 2)
    data = load_dataset(model.config.data, model.config.total_downsample())
    codes = model.encode(data.heldout[:5])
    assert [tuple(c.shape) for c in codes] == [(5, 4, 4), (5, 2, 2)]
    recon = model.reconstruct(data.heldout[:5])
    assert recon.shape == (5, 1, 16, 16) and recon.dtype == torch.uint8
    nll = model.nll(data.heldout[:5])
    assert torch.allclose(nll["total"], nll["0"] + nll["1"] + nll["2"])
    # sample: the arrays beside the PNG are Hierarchy.sample's for the same seed and temperatures
    # (grey images: N x H x W); without --code-temperature the run's sample.code_temperature applies
    for flags, temperatures in (
        ([], {"temperature": 1.0, "code_temperature": model.config.sample.code_temperature}),
        (["--temperature", "0.5", "--code-temperature", "0"], {"temperature": 0.5, "code_temperature": 0.0}),
    ):
        out = tmp_path / "s.png"
        assert run("sample", str(tiny_run), "-n", "6", "--seed", "1", *flags, "--out", str(out)) == 0
        samples = model.sample(6, seed=1, **temperatures)
        assert samples.shape == (6, 1, 16, 16)
        assert np.array_equal(np.load(out.with_suffix(".npz"))["images"], samples[:, 0].numpy()), flags
    # eval --json: Hierarchy.evaluate's figures of the split (beside them the split's name and size,
    # and descriptions of the run that the API keeps elsewhere)
    for split in ("heldout", "train"):
        capsys.readouterr()
        assert run("eval", str(tiny_run), "--json", "--split", split) == 0
        cli = json.loads(capsys.readouterr().out)
        images = data.heldout if split == "heldout" else data.train
        assert cli["split"] == {"name": split, "images": len(images)}
        api = json.loads(json.dumps(model.evaluate(images)))
        assert {"levels", "prior", "bits_per_dim"} <= set(api)
        assert {key: cli[key] for key in api} == api
    # status: one line per stage of progvq.run.run_status
    capsys.readouterr()
    assert run("status", str(tiny_run)) == 0
    states = run_status(tiny_run)
    wanted = [f"{'prior' if s.name == 'prior' else f'stage {s.name}'}: {s.describe()}" for s in states]
    assert capsys.readouterr().out.splitlines() == wanted


def test_train_refuses_stage_whose_lower_level_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(tmp_path / "r", "--stage", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err == "progvq: error: stage 2 needs stage 1, which is missing; train stage 1 first (--stage 1)"


@pytest.mark.trains
def test_done_stage_is_not_retrained_and_restart_keeps_the_old(tiny_copy: Path, capsys: pytest.CaptureFixture) -> None:
    before = file_sha256(checkpoint_path(tiny_copy, "1"))
    assert train(tiny_copy, "--stage", "1") == 0
    assert "already done" in capsys.readouterr().out
    assert file_sha256(checkpoint_path(tiny_copy, "1")) == before
    assert train(tiny_copy, "--stage", "1", "--restart") == 0
    assert file_sha256(tiny_copy / "stage-1.old-1" / "checkpoint.pt") == before


@pytest.mark.trains
def test_run_dir_with_other_config_is_refused(tiny_copy: Path, capsys: pytest.CaptureFixture) -> None:
    before = (tiny_copy / "config.yaml").read_text()
    assert train(tiny_copy, "--stage", "1", "--set", "stages.1.quantizer.codes=32") == 2
    err = capsys.readouterr().err
    assert "was created with a different config (stages.1.quantizer.codes: 16 there, 32 now)" in err
    assert (tiny_copy / "config.yaml").read_text() == before
    # how a run is computed (device, logging, precision, sampling defaults) is no part of what it is
    runtime = [
        "device=auto",
        "stages.1.log_every=1",
        "stages.1.eval_every=7",
        "stages.1.checkpoint_every=5",
        "stages.1.precision=fp32",
        "sample.code_temperature=0.5",
    ]
    assert train(tiny_copy, "--stage", "1", *[x for o in runtime for x in ("--set", o)]) == 0
    assert "already done" in capsys.readouterr().out
    assert (tiny_copy / "config.yaml").read_text() == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "absent.yaml", "--all"], "absent.yaml: config file not found"),
        (["train", str(TINY), "--stage", "7"], "--stage 7: no such stage"),
        (
            ["train", str(TINY), "--all", "--set", "stages.1.quantizer.codes=1"],
            "stages.1.quantizer.codes: must be >= 2, got 1",
        ),
        (["sample", "no/such/run"], "no/such/run: no such run directory"),
        (["eval", "no/such/run"], "no/such/run: no such run directory"),
        (["status", "no/such/run"], "no/such/run: no such run directory"),
    ],
)
def test_user_errors_are_one_line_with_status_2(
    args: list[str],
    needle: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    if args[0] == "train":
        args = [*args, "--run-dir", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.trains
def test_sample_of_unfinished_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(tmp_path / "r", "--stage", "1", "--until", "3") == 0
    capsys.readouterr()
    assert run("sample", str(tmp_path / "r"), "--out", str(tmp_path / "s.png")) == 2
    assert "stage 1 is unfinished (step 3 of 6)" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


# --------------------------------------------------------------------------- exact resume


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}}


@pytest.mark.parametrize("stage", ["1", "2", "prior"])
@pytest.mark.trains
def test_resume_equals_uninterrupted(stage: str, tiny_run: Path, tmp_path: Path) -> None:
    """6 steps straight == 3 steps, stop, resume for 3 more: parameter for parameter, bit for bit."""
    dirs = []
    for name in ("straight", "resumed"):
        dest = tmp_path / name
        shutil.copytree(tiny_run, dest)
        shutil.rmtree(checkpoint_path(dest, stage).parent)  # this stage and above start fresh
        for above in ("2", "prior") if stage == "1" else ("prior",) if stage == "2" else ():
            shutil.rmtree(checkpoint_path(dest, above).parent)
        dirs.append(dest)
    straight, resumed = dirs
    assert train(straight, "--stage", stage) == 0
    assert train(resumed, "--stage", stage, "--until", "4") == 0  # 4 is not a checkpoint_every multiple
    assert load_checkpoint(checkpoint_path(resumed, stage))["step"] == 4
    assert train(resumed, "--stage", stage) == 0
    a, b = load_checkpoint(checkpoint_path(straight, stage)), load_checkpoint(checkpoint_path(resumed, stage))
    assert a["step"] == b["step"] == 6
    assert_same_tensors(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.trains
def test_checkpoint_contents(tiny_run: Path) -> None:
    ckpt = load_checkpoint(checkpoint_path(tiny_run, "2"))
    assert ckpt["stage"] == "2" and ckpt["step"] == ckpt["steps"] == 6
    quantizer = ckpt["config"]["stages"]["2"]["quantizer"]
    assert quantizer["kind"] == "vq" and quantizer["codes"] == 8
    assert ckpt["config"]["stages"]["2"]["decoder"] == {"kind": "factorised"}
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    # the data order and the learning rate are functions of the step alone: nothing else records them
    assert "data" not in ckpt and "scheduler" not in ckpt
    assert ckpt["config"]["stages"]["2"]["batch_size"] == 32
    assert ckpt["parents"] == {"1": load_checkpoint(checkpoint_path(tiny_run, "1"))["digest"]}
    assert ckpt["digest"] == payload_digest(ckpt)
    assert {"ema_count", "usage", "recent"} <= {k.split(".")[-1] for k in ckpt["model"]}
    assert ckpt["extra"]["image_shape"] == [1, 16, 16]
    prior = load_checkpoint(checkpoint_path(tiny_run, "prior"))
    assert prior["extra"]["num_classes"] == 0 and prior["config"]["stages"]["prior"]["kind"] == "pixelcnn"


@pytest.mark.trains
def test_run_stage_script_and_console_command(tiny_run: Path, tmp_path: Path) -> None:
    """``python run_stage.py`` and the installed ``progvq`` are one program."""
    script = subprocess.run(
        [sys.executable, str(ROOT / "run_stage.py"), "status", str(tiny_run)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert script.returncode == 0 and "prior: done" in script.stdout
    exe = shutil.which("progvq")
    if exe is None:
        pytest.skip("progvq is not installed as a console command (pip install -e .)")
    console = subprocess.run([exe, "status", str(tiny_run)], capture_output=True, text=True, check=False)
    assert console.stdout == script.stdout
    bad = subprocess.run([exe, "train", str(tmp_path / "x.yaml"), "--all"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("x.yaml: config file not found")


def test_bad_data_path_leaves_nothing_behind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mnist = ROOT / "configs" / "mnist.yaml"
    code = run(
        "train", str(mnist), "--all", "--run-dir", str(tmp_path / "r"), "--set", f"data.path={tmp_path / 'nowhere'}"
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("progvq: error: ") and "nowhere" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.trains
def test_train_stage_reports_what_it_trained(tmp_path: Path) -> None:
    from progvq.config import load_config
    from stages import train_stage

    cfg = load_config(TINY)
    first = train_stage(cfg, "1", tmp_path / "r", until=4, progress=False, log=lambda _: None)
    assert (first.step, first.done, first.images) == (4, False, 4 * 32)
    assert first.train_seconds > 0
    rest = train_stage(cfg, "1", tmp_path / "r", progress=False, log=lambda _: None)
    assert (rest.step, rest.done, rest.images) == (6, True, 2 * 32)
    assert set(rest.metrics) >= {"psnr", "bits_per_dim", "codes_used"}


@pytest.mark.parametrize("stage", ["1", "prior"])
@pytest.mark.trains
def test_checkpoint_whose_weights_do_not_fit_is_refused(
    stage: str,
    tiny_copy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    path = checkpoint_path(tiny_copy, stage)
    ckpt = load_checkpoint(path)
    # another architecture than the weights (not another codebook size, which the stage above refuses first)
    section = ckpt["config"]["stages"][stage]
    if stage == "1":
        section["hidden"] *= 2
    else:
        section["pixelcnn"]["channels"] *= 2
    save_checkpoint(ckpt, path)
    # editing stage 1 makes the stages above stale; look past that to the weights check
    assert run("sample", str(tiny_copy), "--out", str(tmp_path / "s.png"), "--allow-stale") == 2
    err = capsys.readouterr().err
    assert f"{path}: weights do not fit its config" in err and err.count("\n") == 1


@pytest.mark.parametrize("source", ["mnist", "folder", "array"])
@pytest.mark.trains
def test_every_data_source_trains_from_the_command_line(
    source: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    from progvq.data import make_shapes

    from .conftest import MNIST_DIR

    images = make_shapes(40, size=16, seed=5)  # (40, 1, 16, 16)
    if source == "mnist":
        if not MNIST_DIR.exists():
            pytest.skip("no ../shared/data/mnist")
        overrides = [f"data.path={MNIST_DIR}", "data.size=32", "data.limit=120", "data.heldout=20"]
        expected_shape = [1, 32, 32]
    elif source == "folder":
        folder = tmp_path / "pngs"
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")
        overrides, expected_shape = [f"data.path={folder}", "data.heldout=8"], [1, 16, 16]
    else:
        path = tmp_path / "images.npz"
        np.savez(path, images=images[:, 0].numpy())
        overrides, expected_shape = [f"data.path={path}", "data.heldout=8"], [1, 16, 16]
    args = [x for o in [f"data.source={source}", *overrides] for x in ("--set", o)]
    assert train(tmp_path / "r", "--stage", "1", "--until", "2", *args) == 0
    ckpt = load_checkpoint(checkpoint_path(tmp_path / "r", "1"))
    assert ckpt["step"] == 2 and ckpt["extra"]["image_shape"] == expected_shape
    assert ckpt["config"]["data"]["source"] == source
