"""Inpainting: known pixels and codes kept, seeds, no leak of the hidden pixels, masks, the CLI and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progvq.data import load_dataset
from progvq.hierarchy import Hierarchy
from progvq.inpaint import InpaintError, box_mask, complete, inpaint, inpaint_batch, known_log_prob, level_masks
from progvq.pixelcnn import GatedPixelCNN
from run_stage import main

from .helpers import uniform_prior

RUNS = ["tiny_run", "tiny_conditional_run"]


def _setup(request: pytest.FixtureRequest, name: str) -> tuple[Hierarchy, torch.Tensor]:
    """The trained run's hierarchy and its first held-out image (C, H, W) uint8."""
    model = Hierarchy.load(request.getfixturevalue(name))
    data = load_dataset(model.config.data, model.config.total_downsample())
    return model, data.heldout[0]


def _bottom_half(model: Hierarchy) -> torch.Tensor:
    _, h, w = model.image_shape
    return box_mask(h, w, (0, h // 2, w, h))



@pytest.mark.parametrize("name", RUNS)
@pytest.mark.trains
def test_known_pixels_and_codes_are_kept_at_every_level(name: str, request: pytest.FixtureRequest) -> None:
    model, image = _setup(request, name)
    mask = _bottom_half(model)
    done = complete(model, image, mask, 6, seed=0)
    assert done.images.shape == (6, *image.shape) and done.images.dtype == torch.uint8
    # known pixels: exactly the input's, in every completion
    assert torch.equal(done.images[:, :, ~mask], image[:, ~mask].expand(6, -1, -1))
    # the masked region is the level-1 decoder's mean for the completion's own level-1 codes
    # (not the input's pixels: test_hidden_pixels_do_not_reach_the_completions)
    assert torch.equal(done.images[:, :, mask], model.decode(done.codes[0], 1)[:, :, mask])
    # known codes: the encoder's codes of the input (missing pixels zeroed) at every level
    filled = torch.where(mask[None], torch.zeros_like(image), image)
    encoded = model.encode(filled[None])
    assert len(done.codes) == len(done.missing) == model.num_levels
    for k, (codes, missing, own) in enumerate(zip(done.codes, done.missing, encoded, strict=True), start=1):
        h, w = model.grid_shape(k)
        assert codes.shape == (6, h, w) and missing.shape == (h, w)
        # bottom half of the image: the bottom half of every grid is resampled, the top kept
        assert missing[: h // 2].logical_not().all() and missing[h // 2 :].all()
        assert torch.equal(codes[:, ~missing], own[0, ~missing].expand(6, -1))
    # the top level's unknown codes are drawn, one draw per completion: from a uniform prior six
    # completions agree on every unknown code (at least 2 of 8 codes each) with probability <= 64^-5
    drawn = complete(uniform_prior(model), image, mask, 6, seed=0)
    assert torch.equal(drawn.codes[-1][:, ~drawn.missing[-1]], done.codes[-1][:, ~done.missing[-1]])
    assert len({tuple(c[drawn.missing[-1]].tolist()) for c in drawn.codes[-1]}) > 1


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.trains
def test_seeds_repeat_and_differ(name: str, request: pytest.FixtureRequest) -> None:
    model, image = _setup(request, name)
    mask = _bottom_half(model)
    a = inpaint(model, image, mask, 8, seed=1)
    assert torch.equal(a, inpaint(model, image, mask, 8, seed=1))
    b = inpaint(model, image, mask, 8, seed=2)
    assert torch.equal(a[:, :, ~mask], b[:, :, ~mask])
    # inpainting is the hierarchy's own sampler given the known codes (one candidate per completion;
    # a class-conditional prior is given its class, else it would draw one candidate per class)
    label = 3 if model.num_classes else None
    filled = torch.where(mask[None], torch.zeros_like(image), image)
    known = {
        k: (codes.expand(8, -1, -1), (~missing).expand(8, -1, -1))
        for k, (codes, missing) in enumerate(
            zip(model.encode(filled[None]), level_masks(model, mask[None]), strict=True), start=1
        )
    }
    sampled = model.sample(8, seed=1, label=label, code_temperature=model.config.sample.code_temperature, known=known)
    assert torch.equal(torch.where(mask, sampled, image), inpaint(model, image, mask, 8, seed=1, label=label))
    # Another seed draws other codes in the hole. Whether they decode to other pixels depends on
    # what a few training steps made of the decoders, so the check is on the top codes drawn,
    # from a prior that is uniform by construction: 8 completions of at least 2 unknown codes of
    # 8 agree between two seeds with probability <= 64^-8.
    uniform = uniform_prior(model)
    one, again, two = (complete(uniform, image, mask, 8, seed=seed) for seed in (1, 1, 2))
    hole = one.missing[-1]
    assert hole.sum() >= 2
    assert all(torch.equal(x, y) for x, y in zip(one.codes, again.codes, strict=True))
    assert torch.equal(one.images, again.images)
    assert not torch.equal(one.codes[-1][:, hole], two.codes[-1][:, hole])
    assert torch.equal(one.codes[-1][:, ~hole], two.codes[-1][:, ~hole])


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.trains
def test_batch_keeps_every_images_known_pixels(name: str, request: pytest.FixtureRequest) -> None:
    model = Hierarchy.load(request.getfixturevalue(name))
    data = load_dataset(model.config.data, model.config.total_downsample())
    images = data.heldout[:3]
    _, h, w = model.image_shape
    masks = torch.stack([_bottom_half(model), box_mask(h, w, (w // 2, 0, w, h)), box_mask(h, w, (0, 0, 3, 5))])
    done = inpaint_batch(model, images, masks, 4, seed=0)
    assert done.shape == (3, 4, *model.image_shape) and done.dtype == torch.uint8
    for image, mask, completions in zip(images, masks, done, strict=True):
        assert torch.equal(completions[:, :, ~mask], image[:, ~mask].expand(4, -1, -1))
    assert torch.equal(done, inpaint_batch(model, images, masks, 4, seed=0))
    with pytest.raises(InpaintError, match="no pixel as missing"):
        inpaint_batch(model, images, torch.cat([masks[:2], torch.zeros_like(masks[:1])]), 2)


@pytest.mark.trains
def test_hidden_pixels_do_not_reach_the_completions(tiny_run: Path) -> None:
    """Whatever the image holds under the mask, the completions are the same: only the known pixels count."""
    model = Hierarchy.load(tiny_run)
    data = load_dataset(model.config.data, model.config.total_downsample())
    image, other = data.heldout[0], data.heldout[1]
    mask = _bottom_half(model)
    swapped = torch.where(mask[None], other, image)
    assert not torch.equal(swapped, image)
    assert torch.equal(inpaint(model, image, mask, 4, seed=0), inpaint(model, swapped, mask, 4, seed=0))


@pytest.mark.trains
def test_level_masks_are_conservative(tiny_run: Path) -> None:
    """One missing pixel makes its code missing at every level, and no other code."""
    model = Hierarchy.load(tiny_run)  # 16x16 -> 4x4 (factor 4) -> 2x2 (factor 8)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5, 9] = True
    level1, level2 = level_masks(model, mask)
    expected1 = torch.zeros(4, 4, dtype=torch.bool)
    expected1[1, 2] = True
    expected2 = torch.tensor([[False, True], [False, False]])
    assert torch.equal(level1, expected1) and torch.equal(level2, expected2)
    # a box covering whole patches marks exactly those
    assert level_masks(model, box_mask(16, 16, (4, 0, 8, 16)))[0].sum() == 4


@pytest.mark.trains
def test_the_whole_image_missing_is_sampling(tiny_run: Path) -> None:
    model = Hierarchy.load(tiny_run)
    data = load_dataset(model.config.data, model.config.total_downsample())
    done = complete(model, data.heldout[0], torch.ones(16, 16, dtype=torch.bool), 3, seed=0)
    assert all(m.all() for m in done.missing)
    assert done.images.shape == (3, 1, 16, 16)


@pytest.mark.trains
def test_importance_resampling_favours_draws_that_fit_the_later_known_codes(tiny_run: Path) -> None:
    """Top half missing: the known bottom codes come after the drawn ones, which the draw cannot see.

    Keeping one of 8 candidates by its weight raises the average log-probability of the known codes.
    The tiny run's prior has barely learnt any dependence between codes, so a random prior with
    strong weights stands in for it. The known codes are the trained encoder's, but the margin
    does not rest on them: for each of the 64 possible known rows of the 2x2 top grid the gain
    is over 1 nat, twenty times the 0.05 asserted.
    """
    model = Hierarchy.load(tiny_run)
    data = load_dataset(model.config.data, model.config.total_downsample())
    mask = box_mask(16, 16, (0, 0, 16, 8))
    torch.manual_seed(0)
    prior = GatedPixelCNN(model.levels[-1].quantizer.num_codes, channels=16, layers=2).eval().requires_grad_(False)
    for param in prior.parameters():
        param.mul_(4)
    model.prior = prior

    def mean_weight(candidates: int) -> float:
        done = complete(model, data.heldout[3], mask, 256, seed=0, candidates=candidates)
        return known_log_prob(prior, done.codes[-1], done.missing[-1]).mean().item()

    one, eight = mean_weight(1), mean_weight(8)
    assert eight > one + 0.05, (one, eight)


@pytest.mark.trains
def test_api_refuses_what_it_cannot_use(tiny_run: Path) -> None:
    model = Hierarchy.load(tiny_run)
    image = torch.zeros(1, 16, 16, dtype=torch.uint8)
    mask = box_mask(16, 16, (0, 8, 16, 16))
    with pytest.raises(InpaintError, match="the run's images are 1x16x16"):
        inpaint(model, torch.zeros(1, 8, 8, dtype=torch.uint8), mask, 2)
    with pytest.raises(InpaintError, match="mask must be bool"):
        inpaint(model, image, mask[:8], 2)
    with pytest.raises(InpaintError, match="no pixel as missing"):
        inpaint(model, image, torch.zeros_like(mask), 2)
    with pytest.raises(InpaintError, match="n must be >= 1"):
        inpaint(model, image, mask, 0)
    with pytest.raises(InpaintError, match="candidates"):
        inpaint(model, image, mask, 2, candidates=0)
    with pytest.raises(Exception, match="not class-conditional"):
        inpaint(model, image, mask, 2, label=1)


# --------------------------------------------------------------------------- command line


def _files(tmp_path: Path, model: Hierarchy, image: torch.Tensor) -> tuple[Path, Path]:
    """The image and a bottom-half mask as PNG files."""
    png = tmp_path / "in.png"
    Image.fromarray(image[0].numpy()).save(png)
    mask = np.zeros(model.image_shape[1:], dtype=np.uint8)
    mask[mask.shape[0] // 2 :] = 255
    mask_png = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_png)
    return png, mask_png


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.trains
def test_cli_writes_grid_and_arrays_like_the_api(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model, image = _setup(request, name)
    png, mask_png = _files(tmp_path, model, image)
    run = str(request.getfixturevalue(name))
    out = tmp_path / "out.png"
    args = ["inpaint", run, "--image", str(png), "--mask", str(mask_png)]
    assert main([*args, "-n", "7", "--seed", "5", "--out", str(out)]) == 0
    arrays = np.load(out.with_suffix(".npz"))
    _, h, w = model.image_shape
    assert arrays["images"].shape == (7, h, w) and arrays["images"].dtype == np.uint8
    assert np.array_equal(arrays["original"], image[0].numpy())
    assert np.array_equal(arrays["mask"], _bottom_half(model).numpy())
    assert np.array_equal(arrays["images"], inpaint(model, image, _bottom_half(model), 7, seed=5)[:, 0].numpy())
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 3 * (h + 2), 2 + 3 * (w + 2))  # original, masked input and 7 completions: 3 x 3
    # --box gives the same mask, so the same completions
    boxed = tmp_path / "boxed.png"
    box = f"0,{h // 2},{w},{h}"
    assert main(["inpaint", run, "--image", str(png), "--box", box, "-n", "7", "--seed", "5", "--out", str(boxed)]) == 0
    assert np.array_equal(np.load(boxed.with_suffix(".npz"))["images"], arrays["images"])


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)  # uint16 arrays make 16-bit PNGs
    return path


BAD = [
    # (name, what to pass after the run dir, the expected part of the one-line error)
    ("box-outside", ["--box", "0,8,17,16"], "--box 0,8,17,16: x1 = 17 is outside the 16x16 image (x in 0..16)"),
    ("box-negative", ["--box=-1,8,16,16"], "x0 = -1 is outside"),
    ("box-empty", ["--box", "4,8,4,16"], "--box 4,8,4,16: empty box"),
    ("box-not-four-numbers", ["--box", "1,2,3"], "--box 1,2,3: expected four integers x0,y0,x1,y1"),
    (
        "mask-wrong-size",
        ["--mask", "{tmp}/small_mask.png"],
        "{tmp}/small_mask.png: mask is 8x8 (width x height), the image is 16x16",
    ),
    (
        "mask-not-binary",
        ["--mask", "{tmp}/grey_mask.png"],
        "{tmp}/grey_mask.png: not a binary mask (pixel x=3, y=2 is 128;",
    ),
    ("mask-empty", ["--mask", "{tmp}/black_mask.png"], "{tmp}/black_mask.png: the mask marks no pixel as missing"),
    ("mask-missing", ["--mask", "{tmp}/nowhere.png"], "{tmp}/nowhere.png: mask not found"),
    ("mask-not-an-image", ["--mask", "{tmp}/text.png"], "{tmp}/text.png: cannot read mask"),
    ("mask-16-bit", ["--mask", "{tmp}/deep_mask.png"], "{tmp}/deep_mask.png: mask in Pillow mode"),
    (
        "image-wrong-size",
        ["--image", "{tmp}/small.png", "--box", "0,0,4,4"],
        "{tmp}/small.png: image is 8x8 (width x height), the run's images are 16x16",
    ),
    (
        "image-colour",
        ["--image", "{tmp}/colour.png", "--box", "0,0,4,4"],
        "{tmp}/colour.png: a colour image, but the run's images are grey",
    ),
    (
        "label-unconditional",
        ["--box", "0,0,4,4", "--label", "1"],
        "--label 1: the prior of {run} is not class-conditional",
    ),
    ("n-zero", ["--box", "0,0,4,4", "-n", "0"], "-n: must be >= 1, got 0"),
    ("candidates-zero", ["--box", "0,0,4,4", "--candidates", "0"], "--candidates: must be >= 1, got 0"),
    ("out-not-png", ["--box", "0,0,4,4", "--out", "{tmp}/x.jpg"], "--out {tmp}/x.jpg: must end in .png"),
]


@pytest.mark.parametrize(("name", "args", "needle"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.trains
def test_cli_refusals_are_one_line_status_2_and_write_nothing(
    name: str, args: list[str], needle: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = np.zeros((16, 16), dtype=np.uint8)
    _write(tmp_path / "in.png", image)
    _write(tmp_path / "small.png", np.zeros((8, 8), dtype=np.uint8))
    _write(tmp_path / "small_mask.png", np.full((8, 8), 255, dtype=np.uint8))
    grey = np.zeros((16, 16), dtype=np.uint8)
    grey[2, 3] = 128
    _write(tmp_path / "grey_mask.png", grey)
    _write(tmp_path / "black_mask.png", np.zeros((16, 16), dtype=np.uint8))
    _write(tmp_path / "deep_mask.png", np.zeros((16, 16), dtype=np.uint16))
    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[0, 0] = (255, 0, 0)
    _write(tmp_path / "colour.png", colour)
    (tmp_path / "text.png").write_text("not a png")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--image" not in args:
        args = ["--image", str(tmp_path / "in.png"), *args]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out.png")]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["inpaint", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("progvq: error: ") and "Traceback" not in err, err
    assert needle.format(tmp=tmp_path, run=tiny_run) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no grid, no arrays


@pytest.mark.trains
def test_cli_needs_a_mask_or_a_box_but_not_both(
    tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    png = _write(tmp_path / "in.png", np.zeros((16, 16), dtype=np.uint8))
    for extra in ([], ["--box", "0,0,4,4", "--mask", str(png)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["inpaint", str(tiny_run), "--image", str(png), *extra])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "one of the arguments --mask --box is required" in err and "not allowed with argument" in err


@pytest.mark.trains
def test_cli_respects_stale_stages(tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Like sample and eval: a stale hierarchy is refused unless --allow-stale."""
    from progvq.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    path = checkpoint_path(tiny_copy, "1")
    ckpt = load_checkpoint(path)
    ckpt["metrics"] = {"retrained": 1.0}  # another digest: stage 1 "retrained", the stages above stale
    save_checkpoint(ckpt, path)
    png = _write(tmp_path / "in.png", np.zeros((16, 16), dtype=np.uint8))
    args = ["inpaint", str(tiny_copy), "--image", str(png), "--box", "0,8,16,16"]
    args += ["-n", "2", "--out", str(tmp_path / "o.png")]
    assert main(args) == 2
    assert "stage 2 is stale" in capsys.readouterr().err
    assert main([*args, "--allow-stale"]) == 0
