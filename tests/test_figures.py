"""Known answers for the figures of a hierarchy: the bound, its levels, bits vs nats, usage, sampling.

Each test computes its expectation independently of the code under test (by hand,
in float64, or by enumerating every code), so a figure off by a factor (nats for
bits, a halved term, padded dims for the original ones, peak 1 for 255) fails here. PSNR's
known answers are in test_metrics.py, the uniform rate's in test_stages.py.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from progvq.build import build_level
from progvq.canvas import Canvas
from progvq.config import load_config
from progvq.data import load_dataset
from progvq.hierarchy import Hierarchy
from progvq.nets import to_unit
from progvq.pixelcnn import GatedPixelCNN
from run_stage import main

from .conftest import TINY
from .helpers import level_config, tiny_raw

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- by hand


def logistic_bin_logp(values: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """log P(pixel = v) of 8-bit values (..) under a discretised logistic, in float64, written out bin by bin.

    Pixel v sits at c = 2v/255 - 1; its bin is [c - 1/255, c + 1/255], and the two edge bins
    take the tails. An independent rewrite of :func:`progvq.nets.discretized_logistic_logp`
    (no softplus tricks): the probability is a difference of two sigmoids.
    """
    v = values.double()
    c = v * 2 / 255 - 1
    s = torch.exp(log_scale.double().clamp(min=-7.0))
    mu = loc.double()
    upper = torch.where(v == 255, torch.ones_like(c), torch.sigmoid((c + 1 / 255 - mu) / s))
    lower = torch.where(v == 0, torch.zeros_like(c), torch.sigmoid((c - 1 / 255 - mu) / s))
    return torch.log(upper - lower)


def tiny_hierarchy(canvas: Canvas, seed: int = 0) -> Hierarchy:
    """Two levels and a prior small enough to enumerate: 2x2 level-1 codes of 2 kinds, one level-2 code of 2 kinds.

    Weights and codebooks are random (seeded) and spread out, so every code has a real
    probability; eval mode, float32.
    """
    torch.manual_seed(seed)
    level_cfg = level_config(res_blocks=0, codes=2, dim=3)
    one = build_level(level_cfg, canvas.shape[0], 0)
    two = build_level(level_cfg, 1, 2)
    prior = GatedPixelCNN(2, channels=4, layers=1, kernel_size=3)
    with torch.no_grad():
        for level in (one, two):
            level.quantizer.codebook.copy_(torch.randn(2, 3))
        for p in [*one.decoder.parameters(), *two.decoder.parameters(), *prior.parameters()]:
            p.mul_(3.0)  # sharper distributions than the default init, so the levels' terms differ clearly
    cfg = load_config(TINY)
    return Hierarchy(cfg, [one.eval(), two.eval()], prior.eval(), canvas)


def enumerate_log2_px(model: Hierarchy, image: Tensor) -> tuple[float, dict[str, float]]:
    """Exact -log2 p(x) summed over every (z_1, z_2), and each level's -log2 term at the encoder's codes.

    ``image`` (C, H, W) uint8 at the data's own size; the model's likelihood is of the padded
    image (the padding is a function of the image). Returns (exact bits, {"0", "1", "2": bits}).
    """
    padded = model.canvas.pad(image[None])  # (1, C, H', W')
    one, two = model.levels[0], model.levels[1]
    assert model.prior is not None
    (h1, w1), (h2, w2) = model.grid_shape(1), model.grid_shape(2)
    assert (h1, w1, h2, w2) == (2, 2, 1, 1)
    terms: dict[tuple[int, ...], float] = {}
    joint = []
    for z2_value in range(2):
        z2 = torch.full((1, 1, 1), z2_value)
        log_prior = torch.log_softmax(model.prior(z2).double(), 1)[0, z2_value, 0, 0]
        log_d2 = torch.log_softmax(two.logits(z2).double(), 1)[0]  # (2, 2, 2): code, row, col
        for z1_flat in itertools.product(range(2), repeat=4):
            z1 = torch.tensor(z1_flat).view(1, 2, 2)
            loc, log_scale = one._params(one.quantizer.lookup(z1))
            pixels = logistic_bin_logp(padded, loc, log_scale).sum()
            code_term = log_d2.gather(0, z1).sum()
            terms[(z2_value, *z1_flat)] = (pixels.item(), code_term.item(), log_prior.item())
            joint.append(pixels + code_term + log_prior)
    exact = -torch.logsumexp(torch.stack(joint), 0).item() / LN2
    codes = model.encode(image[None])
    key = (int(codes[1].item()), *codes[0].flatten().tolist())
    pixels, code_term, log_prior = terms[key]
    return exact, {"0": -pixels / LN2, "1": -code_term / LN2, "2": -log_prior / LN2}


# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("seed", range(4))
def test_bound_is_exact_sum_of_levels_and_above_the_enumerated_likelihood(seed: int) -> None:
    """-log2 p(x) summed over all 32 code pairs <= the bound = sum of its levels, per original dim."""
    canvas = Canvas((1, 3, 3), (1, 4, 4))  # a 3x3 image padded to 4x4: figures divide by 9
    model = tiny_hierarchy(canvas, seed)
    images = torch.randint(0, 256, (3, 1, 3, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    images[0] = 0  # black and white pixels sit in the edge bins
    images[1, 0, 0] = 255
    bound = model.nll(images)
    for i, image in enumerate(images):
        exact, levels = enumerate_log2_px(model, image)
        for key, bits in levels.items():  # each level's term, in bits per original dim (9, not 16)
            assert bound[key][i].item() == pytest.approx(bits / 9, rel=1e-4, abs=1e-6), key
        total = sum(levels.values())
        assert bound["total"][i].item() == pytest.approx(total / 9, rel=1e-4)
        assert bound["total"][i].item() == pytest.approx(sum(bound[k][i].item() for k in ("0", "1", "2")), rel=1e-6)
        assert total >= exact - 1e-6  # the encoder's codes are one term of the sum over all codes
        assert total - exact < 64  # and they carry real weight: not a loose number


def test_evaluate_figures_match_their_definitions_on_a_padded_canvas() -> None:
    """Every figure of :meth:`Hierarchy.evaluate`, recomputed by hand over the 3x3 original pixels."""
    canvas = Canvas((1, 3, 3), (1, 4, 4))
    model = tiny_hierarchy(canvas, 7)
    images = torch.randint(0, 256, (20, 1, 3, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    report = model.evaluate(images, batch_size=7)
    z1, z2 = model.encode(images)
    one, two = model.levels
    # level 1: bits per original dim of the pixels given z_1, the padding's bits included
    loc, log_scale = one._params(one.quantizer.lookup(z1))
    pixel_bits = -logistic_bin_logp(canvas.pad(images), loc, log_scale).flatten(1).sum(1) / LN2  # (20,)
    assert report["levels"]["1"]["bits_per_dim"] == pytest.approx(pixel_bits.mean().item() / 9, rel=1e-5)
    assert report["bits_per_dim"]["0"] == pytest.approx(pixel_bits.mean().item() / 9, rel=1e-5)
    # PSNR over the original region: 10 log10(255^2 / MSE), MSE over the 3x3 pixels only
    recon = torch.round((loc.clamp(-1, 1) + 1) * 127.5)[:, :, 0:3, 0:3]  # the canvas puts the image at (0, 0)
    assert canvas.top == 0 and canvas.left == 0
    mse = (recon.double() - images.double()).pow(2).mean().item()
    assert report["levels"]["1"]["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-6)
    assert report["levels"]["1"]["psnr_through"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-6)
    # level 2: bits per code of z_1 given z_2; in the bound, per original dim (4 codes per 9 dims)
    code_bits = -torch.log_softmax(two.logits(z2).double(), 1).gather(1, z1[:, None])[:, 0].flatten(1).sum(1) / LN2
    assert report["levels"]["2"]["bits_per_code"] == pytest.approx(code_bits.mean().item() / 4, rel=1e-5)
    assert report["bits_per_dim"]["1"] == pytest.approx(code_bits.mean().item() / 9, rel=1e-5)
    # the prior: bits per top code, and per original dim in the bound
    assert model.prior is not None
    prior_bits = -torch.log_softmax(model.prior(z2).double(), 1).gather(1, z2[:, None])[:, 0].flatten(1).sum(1) / LN2
    assert report["prior"]["bits_per_code"] == pytest.approx(prior_bits.mean().item(), rel=1e-5)
    assert report["bits_per_dim"]["2"] == pytest.approx(prior_bits.mean().item() / 9, rel=1e-5)
    total = (pixel_bits + code_bits + prior_bits).mean().item() / 9
    assert report["bits_per_dim"]["total"] == pytest.approx(total, rel=1e-5)
    # usage: the distinct codes of this split
    assert report["levels"]["1"]["codes_used"] == len(torch.unique(z1))
    assert report["levels"]["2"]["codes_used"] == len(torch.unique(z2))


# --------------------------------------------------------------------------- single figures


@pytest.mark.parametrize("scale, temperature", [(0.05, 1.0), (0.1, 1.0), (0.1, 0.5)])
def test_pixel_samples_follow_the_logistic_scale(scale: float, temperature: float) -> None:
    """Samples of D_1 at temperature t spread as a logistic of scale t s: std t s pi / sqrt(3) in [-1, 1] units."""
    torch.manual_seed(0)
    level = build_level(level_config(hidden=4, res_blocks=0, codes=2, dim=2), 1, 0).eval()
    head = level.decoder.net[-1]  # the last conv: (loc, log_scale) maps
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, math.log(scale)]))  # loc 0 (mid-grey), log-scale log(s) everywhere
    codes = torch.zeros(64, 8, 8, dtype=torch.long)
    drawn = level.decode(codes, temperature, torch.Generator().manual_seed(1))  # (64, 1, 16, 16) uint8
    values = to_unit(drawn).double().flatten()
    expected = temperature * scale * math.pi / math.sqrt(3)
    assert values.mean().item() == pytest.approx(0.0, abs=0.01)
    assert values.std().item() == pytest.approx(expected, rel=0.05)


# --------------------------------------------------------------------------- through the command line


def _array_run(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny config on an .npy of 12x12 images padded to 16x16: 120 noise images to train on, 1 plain one held out."""
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, (121, 12, 12), dtype=np.uint8)
    images[-1] = 200  # the held-out image: one grey square, so few codes
    np.save(tmp_path / "images.npy", images)
    raw = tiny_raw()
    raw["data"] = {"source": "array", "path": str(tmp_path / "images.npy"), "heldout": 1, "size": 16}
    raw["stages"][1]["quantizer"]["codes"] = 64
    for stage in raw["stages"].values():
        stage.update(steps=2, warmup=1, eval_every=2, checkpoint_every=2, log_every=1)
    config = tmp_path / "array.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, tmp_path / "run"


@pytest.mark.trains
def test_eval_reports_figures_of_the_original_pixels_and_the_heldout_codes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, run = _array_run(tmp_path)
    assert main(["train", str(config), "--all", "--run-dir", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    reports = {}
    for split in ("heldout", "train"):
        assert main(["eval", str(run), "--json", "--split", split]) == 0
        reports[split] = json.loads(capsys.readouterr().out)
    model = Hierarchy.load(run)
    data = load_dataset(model.config.data, model.config.total_downsample())
    assert model.image_shape == (1, 12, 12) and model.canvas.padded == (1, 16, 16)
    assert reports["heldout"]["pixels"] == {"original_shape": [1, 12, 12], "padded_shape": [1, 16, 16], "dims": 144}
    for split, images in (("heldout", data.heldout), ("train", data.train)):
        report = reports[split]
        codes = model.encode(images)
        # codes used: the distinct codes of this split, at every level
        for k, z in enumerate(codes, start=1):
            assert report["levels"][str(k)]["codes_used"] == len(torch.unique(z)), (split, k)
        # PSNR over the 12x12 pixels (reconstructions come back at that size)
        recon = model.reconstruct(images)
        assert recon.shape == images.shape
        mse = (recon.double() - images.double()).pow(2).mean().item()
        assert report["levels"]["1"]["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-6)
        # the pixel term per dim of the 12x12 image, by hand
        one = model.levels[0]
        loc, log_scale = one._params(one.quantizer.lookup(codes[0]))
        bits = -logistic_bin_logp(model.canvas.pad(images), loc, log_scale).flatten(1).sum(1) / LN2
        assert report["bits_per_dim"]["0"] == pytest.approx(bits.mean().item() / 144, rel=1e-4)
    # one held-out image has at most 4x4 level-1 codes; 120 noise images use more of the 64
    assert reports["heldout"]["levels"]["1"]["codes_used"] <= 16 < reports["train"]["levels"]["1"]["codes_used"]
    # the held-out figures each stage logged at its last step are eval's (held-out codes, original pixels)
    for stage in ("1", "2"):
        events = EventAccumulator(str(run / f"stage-{stage}"))
        events.Reload()
        for name in ("codes_used", "psnr" if stage == "1" else "psnr_through"):
            logged = events.Scalars(f"heldout/{name}")[-1].value
            assert logged == pytest.approx(reports["heldout"]["levels"][stage][name], rel=1e-5), (stage, name)
    # samples and their arrays come out at the data's own size
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "-n", "5", "--out", str(out)]) == 0
    assert np.load(out.with_suffix(".npz"))["images"].shape == (5, 12, 12)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["recorded"]
    assert recorded == {"original_shape": [1, 12, 12], "image_shape": [1, 16, 16]}


@pytest.mark.trains
def test_a_padded_run_samples_and_inpaints_at_the_data_size(
    tiny_conditional_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MNIST digits are 28x28 on a 32x32 canvas: every image in or out of the command line is 28x28."""
    from PIL import Image

    model = Hierarchy.load(tiny_conditional_run)
    assert model.image_shape == (1, 28, 28) and model.canvas.padded == (1, 32, 32)
    data = load_dataset(model.config.data, model.config.total_downsample())
    digit = data.heldout[0]  # (1, 28, 28)
    Image.fromarray(digit[0].numpy()).save(tmp_path / "digit.png")
    out = tmp_path / "done.png"
    args = ["inpaint", str(tiny_conditional_run), "--image", str(tmp_path / "digit.png"), "--box", "0,14,28,28"]
    assert main([*args, "-n", "3", "--out", str(out)]) == 0
    saved = np.load(out.with_suffix(".npz"))
    assert saved["images"].shape == (3, 28, 28) and saved["mask"].shape == (28, 28)
    known = ~saved["mask"]
    assert (saved["images"][:, known] == digit[0].numpy()[known]).all()  # the known pixels, exactly
    assert main(["sample", str(tiny_conditional_run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 28, 28)
    grid = np.asarray(Image.open(tmp_path / "s.png"))
    assert grid.shape == (2 + 1 * 30, 2 + 10 * 30)  # one row of ten 28x28 cells (a class per column) with 2-pixel gaps
    # a padded-size image is refused: the canvas is the model's business, not the user's
    Image.fromarray(model.canvas.pad(digit)[0].numpy()).save(tmp_path / "padded.png")
    capsys.readouterr()
    args = ["inpaint", str(tiny_conditional_run), "--image", str(tmp_path / "padded.png"), "--box", "0,0,4,4"]
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2
    assert "the run's images are 28x28" in capsys.readouterr().err
