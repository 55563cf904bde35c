"""Autoregressive decoders for levels >= 2 and the class-conditional prior."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from progvq.build import build_level
from progvq.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from progvq.config import load_config
from progvq.data import load_dataset
from progvq.errors import ConfigError, RunError
from progvq.hierarchy import Hierarchy
from progvq.levels import AutoregressiveCodeLevel, AutoregressiveConfig, CodeLevel
from progvq.pixelcnn import GatedPixelCNN, PixelCNNConfig, covers
from progvq.quantize import VQConfig
from run_stage import main

from .conftest import MNIST_DIR, TINY, TINY_CONDITIONAL
from .helpers import assert_same_tensors, level_config, write_weights


def _ar_level(codes_below: int = 3, quantizer: VQConfig | None = None, **pixelcnn) -> AutoregressiveCodeLevel:
    """A small autoregressive level in float64 (exact comparisons), eval mode."""
    torch.manual_seed(0)
    pc = PixelCNNConfig(**{"channels": 8, "layers": 2, "kernel_size": 3, **pixelcnn})
    q = quantizer or VQConfig()
    q.codes, q.dim = 4, 4
    cfg = level_config(quantizer=q, decoder=AutoregressiveConfig(pixelcnn=pc))
    level = build_level(cfg, 1, codes_below)
    assert isinstance(level, AutoregressiveCodeLevel) and level.autoregressive
    return level.double().eval()


def _force_label(prior: GatedPixelCNN, scale: float = 50.0) -> GatedPixelCNN:
    """Set a class-conditional prior's weights so that class y draws code y % K at every position.

    Every weight is zeroed but one path from the label to the logits: the last block's label
    bias opens gate channel y % K for class y (tanh(20) * sigmoid(20) is 1 in float32), its
    skip and the head carry that channel to the logit of code y % K, ``scale`` above every
    other logit (p(another code) < K e^-scale). The codes before a position play no part.
    """
    k, c = prior.num_codes, prior.embed.embedding_dim
    assert prior.num_classes and c >= k
    with torch.no_grad():
        for p in prior.parameters():
            p.zero_()
        block = prior.blocks[-1]
        # label-bias channels: [0, 2C) the vertical stack; [2C, 3C) and [3C, 4C) the tanh and sigmoid
        # halves of the horizontal stack's gate, whose output is the block's skip
        for y in range(prior.num_classes):
            block.label_bias.weight[y, 2 * c + y % k] = 20.0
            block.label_bias.weight[y, 3 * c :] = 20.0
        block.skip.weight.copy_(torch.eye(c)[:, :, None, None])
        prior.head[1].weight.copy_(torch.eye(c)[:, :, None, None])
        prior.head[3].weight[:, :k, 0, 0] = scale * torch.eye(k)
    return prior.eval()


# --------------------------------------------------------------------------- autoregressive decoder


def test_autoregressive_decoder_is_a_normalised_distribution() -> None:
    """Summed over all 3^4 grids of 2x2 level-1 codes, D_2(z_1 | z_2) is 1: the bits are a real likelihood."""
    level = _ar_level(codes_below=3)
    grids = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 2, 2)  # (81, 2, 2)
    for top in (0, 3):
        codes = torch.full((len(grids), 1, 1), top)
        total = torch.logsumexp(level.log_likelihood(grids, codes), 0).exp().item()
        assert total == pytest.approx(1.0, abs=1e-12)


def test_teacher_forced_likelihood_is_the_sum_of_the_samplers_per_position_log_probs() -> None:
    level = _ar_level(codes_below=5, layers=3)
    g = torch.Generator().manual_seed(1)
    below = torch.randint(5, (3, 4, 6), generator=g)
    codes = torch.randint(4, (3, 2, 3), generator=g)
    cond = level.condition(codes)
    # the logits the cached sampler computes position by position, given the true codes before
    logits = level.pixelcnn._cached_logits(below, cond)
    per_position = torch.log_softmax(logits, 1).gather(1, below[:, None])[:, 0]  # (3, 4, 6)
    torch.testing.assert_close(level.log_likelihood(below, codes), per_position.flatten(1).sum(1), rtol=0, atol=1e-10)
    # and the training pass (float32: the quantiser's) reports the same negative log-likelihood
    frozen = VQConfig(ema=False, init_from_data=False, restart=False)  # the codebook stays as it is
    level = _ar_level(codes_below=5, layers=3, quantizer=frozen).float()
    out = level.train()(below)
    level.eval()
    torch.testing.assert_close(out.nll, -level.log_likelihood(below, out.quant.indices), rtol=1e-5, atol=1e-4)
    assert out.dims == 24 and out.prediction.shape == below.shape


def test_autoregressive_decode_is_the_cached_sampler_and_equals_naive() -> None:
    level = _ar_level(codes_below=5, layers=3)
    codes = torch.randint(4, (4, 2, 2), generator=torch.Generator().manual_seed(2))
    cond = level.condition(codes)
    for seed, temperature in itertools.product(range(3), (1.0, 0.5)):
        drawn = level.decode(codes, temperature, torch.Generator().manual_seed(seed))
        assert drawn.shape == (4, 4, 4)
        naive = level.pixelcnn.sample(
            4,
            4,
            4,
            temperature=temperature,
            cond=cond,
            generator=torch.Generator().manual_seed(seed),
            method="naive",
        )
        assert torch.equal(drawn, naive)
    # temperature 0: every code is the most likely one given the codes before it
    greedy = level.decode(codes, 0.0)
    assert torch.equal(greedy, level.logits(codes, greedy).argmax(1))
    # known codes are kept, the rest conditioned on them
    known = torch.randint(5, (4, 4, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    kept = level.decode(codes, 1.0, torch.Generator().manual_seed(0), known=(known, mask))
    assert torch.equal(kept[mask], known[mask])


def test_factorised_decode_keeps_known_codes_without_changing_the_stream() -> None:
    torch.manual_seed(0)
    level = build_level(level_config(codes=4, dim=4), 1, 6).eval()
    assert isinstance(level, CodeLevel)
    codes = torch.randint(4, (3, 2, 2))
    free = level.decode(codes, 1.0, torch.Generator().manual_seed(0))
    known = torch.randint(6, (3, 4, 4))
    mask = torch.rand(3, 4, 4) < 0.5
    kept = level.decode(codes, 1.0, torch.Generator().manual_seed(0), known=(known, mask))
    assert torch.equal(kept[mask], known[mask]) and torch.equal(kept[~mask], free[~mask])


@pytest.mark.parametrize(
    ("h", "w", "layers", "kernel_size"),
    [(4, 4, 2, 3), (4, 4, 3, 3), (3, 5, 2, 5), (1, 5, 1, 5), (1, 5, 1, 3), (5, 2, 1, 7)],
)
def test_covers_matches_the_gradient_support(h: int, w: int, layers: int, kernel_size: int) -> None:
    """covers() says whether the last position sees every earlier one, as the gradients do."""
    torch.manual_seed(0)
    model = GatedPixelCNN(4, channels=16, layers=layers, kernel_size=kernel_size).double().eval()
    x = model.embed(torch.randint(4, (1, h, w))).permute(0, 3, 1, 2).detach().requires_grad_()
    logits = model.forward_embedded(x)
    sees_all = True
    for i, j in itertools.product(range(h), range(w)):
        (grad,) = torch.autograd.grad(logits[0, :, i, j].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(0).flatten() > 0
        sees_all &= bool(seen[: i * w + j].all())
    assert sees_all == covers(h, w, layers, kernel_size)


#: ``--set`` making tiny.yaml's level 2 autoregressive
_AR = ["stages.2.decoder.kind=autoregressive"]


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (
            ["stages.1.decoder.kind=autoregressive"],
            "stages.1.decoder.kind: must be logistic or pixelcnn (level 1 decodes pixels), got 'autoregressive'",
        ),
        (
            ["stages.2.decoder.kind=logistic"],
            (
                "stages.2.decoder.kind: must be one of factorised, autoregressive "
                "(level 2 decodes the codes of level 1), got 'logistic'"
            ),
        ),
        (
            ["stages.2.decoder.kind=lstm"],
            "stages.2.decoder.kind: must be one of logistic, factorised, pixelcnn, autoregressive, got 'lstm'",
        ),
        (
            [*_AR, "stages.2.decoder.pixelcnn.kernel_size=4"],
            "stages.2.decoder.pixelcnn.kernel_size: must be odd and >= 3, got 4",
        ),
        (
            [*_AR, "stages.2.decoder.pixelcnn.dropout=1"],
            "stages.2.decoder.pixelcnn.dropout: must be in [0, 1), got 1.0",
        ),
        ([*_AR, "stages.2.decoder.pixelcnn.colour=1"], "stages.2.decoder.pixelcnn.colour: unknown key"),
        # a factorised decoder has no network to configure
        (
            ["stages.2.decoder.kind=factorised", "stages.2.decoder.pixelcnn.layers=3"],
            "stages.2.decoder.pixelcnn: unknown key",
        ),
        # a decoder section names its kind
        (
            ["stages.2.decoder.pixelcnn.layers=3"],
            "stages.2.decoder.kind: missing (one of logistic, factorised, pixelcnn, autoregressive)",
        ),
        (
            [*_AR, "stages.2.decoder.pixelcnn.layers=1"],
            (
                "stages.2.decoder.pixelcnn.layers: 1 layers of kernel 5 "
                "do not reach every earlier code of level 1's 4x4 grid; "
                "need layers * (kernel_size // 2) >= 3, e.g. 2 layers of kernel 5"
            ),
        ),
        # the layout of progvq 0.1 (decoder named beside its pixelcnn section) is read as today's, and the
        # error names today's key
        (
            ["stages.2.decoder=autoregressive", "stages.2.pixelcnn.layers=1"],
            (
                "stages.2.decoder.pixelcnn.layers: 1 layers of kernel 5 "
                "do not reach every earlier code of level 1's 4x4 grid; "
                "need layers * (kernel_size // 2) >= 3, e.g. 2 layers of kernel 5"
            ),
        ),
        (
            ["stages.1.decoder=autoregressive"],
            "stages.1.decoder.kind: must be logistic or pixelcnn (level 1 decodes pixels), got 'autoregressive'",
        ),
        (
            ["data={source: array, path: images.npy}", "stages.prior.class_conditional=true"],
            "stages.prior.class_conditional: must be false for data source 'array', which has no labels",
        ),
    ],
)
def test_config_refusals(sets: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, sets)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.trains
def test_coverage_is_checked_when_only_the_data_knows_the_image_side(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An array source without data.size: the level-2 decoder's reach is checked once the images are read."""
    from progvq.data import make_shapes

    path = tmp_path / "images.npz"
    np.savez(path, images=make_shapes(40, size=32, seed=0)[:, 0].numpy())  # 32x32 -> level 1 is 8x8
    sets = ["data.source=array", f"data.path={path}", "data.size=null", "data.heldout=8", "stages.1.steps=1"]
    sets += [*_AR, "stages.2.decoder.pixelcnn.layers=2"]
    run = tmp_path / "r"
    args = ["train", str(TINY), "--run-dir", str(run), "--no-progress", *[x for s in sets for x in ("--set", s)]]
    assert main([*args, "--stage", "1"]) == 0  # level 1 does not care
    capsys.readouterr()
    assert main([*args, "--stage", "2"]) == 2
    err = capsys.readouterr().err
    assert (
        "stages.2.decoder.pixelcnn.layers: 2 layers of kernel 5 do not reach every earlier code of level 1's 8x8 grid"
        in err
    )
    assert err.count("\n") == 1
    assert not (run / "stage-2").exists()


# --------------------------------------------------------------------------- the trained conditional run


@pytest.mark.trains
def test_conditional_run_is_what_its_config_says(tiny_conditional_run: Path) -> None:
    model = Hierarchy.load(tiny_conditional_run)
    assert model.image_shape == (1, 28, 28) and model.canvas.padded == (1, 32, 32) and model.num_levels == 2
    assert isinstance(model.levels[1], AutoregressiveCodeLevel) and model.num_classes == 10
    assert model.grid_shape(1) == (8, 8) and model.grid_shape(2) == (4, 4)
    # the prior's class count is recorded, not read off its weights
    assert load_checkpoint(checkpoint_path(tiny_conditional_run, "prior"))["extra"]["num_classes"] == 10


def test_prior_logits_depend_on_the_label() -> None:
    """Any two classes give other distributions at every position, the first one (which sees only the label)
    included."""
    torch.manual_seed(0)
    prior = GatedPixelCNN(8, channels=16, layers=3, num_classes=10).double().eval()
    codes = torch.randint(8, (2, 4, 4))
    # (10, 2, 8, 4, 4)
    log_probs = torch.stack([torch.log_softmax(prior(codes, label=torch.full((2,), y)), 1) for y in range(10)])
    for a, b in itertools.combinations(range(10), 2):
        gap = (log_probs[a] - log_probs[b]).abs().amax(dim=1)  # (2, 4, 4): the largest difference at each position
        assert (gap > 1e-6).all(), (a, b)


@pytest.mark.parametrize("method", ["cached", "naive"])
def test_the_sampler_passes_the_label_to_every_position(method: str) -> None:
    """A prior built so that class y means code y % 8 draws exactly that, for a batch of mixed labels."""
    prior = _force_label(GatedPixelCNN(8, channels=16, layers=3, num_classes=10))
    labels = torch.arange(20) % 10
    wanted = (labels % 8).view(-1, 1, 1).expand(-1, 4, 4)
    # the property built in: given class y, code y % 8 is certain whatever the codes before it
    any_codes = torch.randint(8, (20, 4, 4), generator=torch.Generator().manual_seed(0))
    p = torch.softmax(prior(any_codes, label=labels), 1).gather(1, wanted[:, None]).squeeze(1)
    assert (p > 1 - 1e-6).all()
    drawn = prior.sample(20, 4, 4, label=labels, generator=torch.Generator().manual_seed(0), method=method)
    assert torch.equal(drawn, wanted)


@pytest.mark.trains
def test_samples_follow_the_label(tiny_conditional_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hierarchy.sample and ``progvq sample`` hand the class to the prior: with a prior set so that
    class y draws code y % 8, the top codes drawn are exactly those of the classes asked for."""
    model = Hierarchy.load(tiny_conditional_run)
    assert model.prior is not None and model.num_classes == 10
    model.prior.eval()  # no dropout: the differences come from the class alone
    # the trained prior's distributions depend on the class (it loaded its label weights)
    codes = torch.randint(model.prior.num_codes, (2, *model.grid_shape(2)), generator=torch.Generator().manual_seed(0))
    log_probs = [torch.log_softmax(model.prior(codes, label=torch.full((2,), y)), 1) for y in range(10)]
    assert all(not torch.equal(log_probs[a], log_probs[b]) for a, b in itertools.combinations(range(10), 2))
    # the same run with the label-forcing prior in its checkpoint
    run = tmp_path / "run"
    shutil.copytree(tiny_conditional_run, run)
    write_weights(run, "prior", _force_label(model.prior))
    # record what every class-conditional draw of the prior returns (the level-2 decoder's draws take no label)
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    sample = GatedPixelCNN.sample

    def recording(self: GatedPixelCNN, *args: object, **kwargs: object) -> torch.Tensor:
        codes = sample(self, *args, **kwargs)
        if kwargs.get("label") is not None:
            drawn.append((kwargs["label"].clone(), codes.clone()))  # type: ignore[union-attr]
        return codes

    monkeypatch.setattr(GatedPixelCNN, "sample", recording)
    forced = Hierarchy.load(run)
    h, w = forced.grid_shape(2)

    def last_draw(n: int, labels: list[int]) -> None:
        assert len(drawn) == 1, "one draw of the top codes per call"
        got_labels, top = drawn.pop()
        assert got_labels.tolist() == labels
        assert torch.equal(top, (got_labels % 8).view(n, 1, 1).expand(n, h, w))

    code_temperature = forced.config.sample.code_temperature  # what the command line uses by default
    three = forced.sample(8, seed=0, label=3, code_temperature=code_temperature)
    last_draw(8, [3] * 8)
    assert torch.equal(three, forced.sample(8, seed=0, label=3, code_temperature=code_temperature))
    last_draw(8, [3] * 8)
    forced.sample(12, seed=0, label=torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 5, 5]))
    last_draw(12, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 5, 5])
    # without a label the classes come in turn
    assert torch.equal(forced.labels_for(12, None), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    forced.sample(12, seed=0)
    last_draw(12, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    # the command line: --label reaches the prior, and its images are the API's for the same seed
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "-n", "8", "--label", "3", "--out", str(out)]) == 0
    last_draw(8, [3] * 8)
    assert np.array_equal(np.load(out.with_suffix(".npz"))["images"], three[:, 0].numpy())
    assert main(["sample", str(run), "-n", "12", "--out", str(out)]) == 0
    last_draw(12, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])


@pytest.mark.parametrize(
    ("run", "label", "needle"),
    [
        ("tiny_conditional_run", "10", "--label 10: out of range; the prior of {run} has classes 0..9"),
        ("tiny_conditional_run", "-1", "--label -1: out of range"),
        (
            "tiny_run",
            "3",
            "--label 3: the prior of {run} is not class-conditional (stages.prior.class_conditional: false)",
        ),
    ],
)
@pytest.mark.trains
def test_label_refusals(
    run: str,
    label: str,
    needle: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = request.getfixturevalue(run)
    capsys.readouterr()
    assert main(["sample", str(run_dir), f"--label={label}", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert needle.format(run=run_dir) in err and err.count("\n") == 1
    assert not (tmp_path / "s.png").exists()


@pytest.mark.trains
def test_eval_of_the_conditional_run(tiny_conditional_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(tiny_conditional_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    bpd, prior = report["bits_per_dim"], report["prior"]
    assert bpd["total"] == pytest.approx(bpd["0"] + bpd["1"] + bpd["2"], rel=1e-6)
    # 4x4 top codes per 28x28 digit: per dim of the digit's own pixels, not the 32x32 canvas;
    # the level-2 term is the autoregressive decoder's, 8x8 codes per image
    assert bpd["2"] == pytest.approx(prior["bits_per_code"] * 16 / 784, rel=1e-5)
    assert bpd["1"] == pytest.approx(report["levels"]["2"]["bits_per_code"] * 64 / 784, rel=1e-4)
    assert "bits_per_code_given_label" in prior
    # by hand: log p(z) = logsumexp_y log p(z | y) - log 10
    model = Hierarchy.load(tiny_conditional_run)
    data = load_dataset(model.config.data, model.config.total_downsample())
    labels = data.heldout_labels
    assert model.prior is not None and labels is not None
    top = model.encode(data.heldout)[-1]
    per_class = torch.stack(
        [
            -torch.nn.functional.cross_entropy(
                model.prior(top, label=torch.full((len(top),), y)), top, reduction="none"
            ).sum((1, 2))
            for y in range(10)
        ],
        1,
    )
    marginal = (torch.logsumexp(per_class, 1) - math.log(10)).mean().item()
    assert -marginal / 16 / math.log(2) == pytest.approx(prior["bits_per_code"], rel=1e-5)
    given = per_class.gather(1, labels[:, None]).mean().item()
    assert -given / 16 / math.log(2) == pytest.approx(prior["bits_per_code_given_label"], rel=1e-5)
    # Per image, in bits: since mean_y p(z | y) >= p(z | y_true) / 10, the marginal costs at most
    # log2(10) bits more than the true class; as a mean over the classes it lies between the best
    # and the worst class.
    class_bits = -per_class / math.log(2)  # (N, 10)
    true_bits = class_bits.gather(1, labels[:, None])[:, 0]
    marginal_bits = -model.prior.log_prob(top) / math.log(2)  # (N,)
    slack = 1e-4  # float32 rounding of about 50 bits per image
    assert (marginal_bits <= true_bits + math.log2(10) + slack).all()
    assert (marginal_bits >= class_bits.min(1).values - slack).all()
    assert (marginal_bits <= class_bits.max(1).values + slack).all()
    # Hierarchy.nll's top term is the marginal without labels and the true class's with them, per
    # dim of the image; the levels below do not depend on the class
    dims = data.heldout[0].numel()
    unlabelled, labelled = model.nll(data.heldout), model.nll(data.heldout, labels=labels)
    torch.testing.assert_close(unlabelled["2"] * dims, marginal_bits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(labelled["2"] * dims, true_bits, rtol=1e-5, atol=1e-4)
    assert torch.equal(unlabelled["0"], labelled["0"]) and torch.equal(unlabelled["1"], labelled["1"])
    assert ((unlabelled["total"] - labelled["total"]) * dims <= math.log2(10) + slack).all()


def test_the_marginal_reaches_both_ends_of_its_bound() -> None:
    """-log2 mean_y p(z | y) is the true class's bits + log2(10) where only the true class explains
    z, and every class's bits where the class plays no part: both ends of the bound, by construction."""
    prior = _force_label(GatedPixelCNN(10, channels=10, layers=2, num_classes=10))
    labels = torch.arange(10)
    top = labels.view(-1, 1, 1).expand(-1, 4, 4).contiguous()  # each class's own codes
    true_bits = -prior.log_prob(top, labels) / math.log(2)
    marginal_bits = -prior.log_prob(top) / math.log(2)
    assert true_bits.abs().max() < 1e-6  # certain given the class
    torch.testing.assert_close(marginal_bits, true_bits + math.log2(10), rtol=0, atol=1e-5)
    # a prior blind to the class: every class gives the same numbers, and so does the marginal
    torch.manual_seed(0)
    blind = GatedPixelCNN(10, channels=16, layers=2, num_classes=10).eval()
    with torch.no_grad():
        for block in blind.blocks:
            block.label_bias.weight.zero_()
    codes = torch.randint(10, (6, 4, 4))
    per_class = torch.stack([blind.log_prob(codes, torch.full((6,), y)) for y in range(10)], 1)
    assert torch.equal(per_class, per_class[:, :1].expand(-1, 10))
    torch.testing.assert_close(blind.log_prob(codes), per_class[:, 0], rtol=0, atol=1e-5)


@pytest.mark.trains
def test_prior_batches_carry_the_images_labels(tiny_conditional_run: Path) -> None:
    from progvq.run import Run
    from stages import Pipeline
    from stages.prior import PriorStage

    cfg = load_config(TINY_CONDITIONAL, [f"data.path={MNIST_DIR}"])
    data = load_dataset(cfg.data, cfg.total_downsample())
    stage = PriorStage(cfg, Pipeline(cfg, Run(tiny_conditional_run), torch.device("cpu")))
    index = torch.tensor([5, 0, 17])
    codes, labels = stage.batch(index)
    assert data.train_labels is not None and torch.equal(labels, data.train_labels[index])
    assert torch.equal(codes, Hierarchy.load(tiny_conditional_run).encode(data.train[index])[-1])
    assert stage.model.num_classes == 10 == data.num_classes
    assert stage.extra == {"num_classes": 10}  # recorded in its checkpoints, so a loader need not guess it


@pytest.mark.trains
def test_class_conditional_prior_needs_a_labels_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An idx folder without its labels file: the prior stage is refused in one line, nothing written for it."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    shutil.copy(MNIST_DIR / "t10k-images-idx3-ubyte.gz", folder)
    if not (folder / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("no MNIST images")
    run = tmp_path / "r"
    args = ["train", str(TINY_CONDITIONAL), "--run-dir", str(run), "--no-progress", "--set", f"data.path={folder}"]
    assert main([*args, "--stage", "1"]) == 0 and main([*args, "--stage", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--stage", "prior"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{folder}: no labels (t10k-labels-idx1-ubyte[.gz]) beside the images, "
        "but stages.prior.class_conditional is true"
    ) in err
    assert not (run / "prior").exists()


@pytest.mark.parametrize("stage", ["2", "prior"])
@pytest.mark.trains
def test_resume_equals_uninterrupted(stage: str, tiny_conditional_run: Path, tmp_path: Path) -> None:
    """The autoregressive level and the class-conditional prior resume bit for bit (dropout draws included)."""
    dirs = []
    for name in ("straight", "resumed"):
        dest = tmp_path / name
        shutil.copytree(tiny_conditional_run, dest)
        for above in ("2", "prior") if stage == "2" else ("prior",):
            shutil.rmtree(checkpoint_path(dest, above).parent)
        dirs.append(dest)
    args = ["train", str(TINY_CONDITIONAL), "--no-progress", "--stage", stage, "--set", f"data.path={MNIST_DIR}"]
    straight, resumed = dirs
    assert main([*args, "--run-dir", str(straight)]) == 0
    assert main([*args, "--run-dir", str(resumed), "--until", "4"]) == 0
    assert main([*args, "--run-dir", str(resumed)]) == 0
    a, b = load_checkpoint(checkpoint_path(straight, stage)), load_checkpoint(checkpoint_path(resumed, stage))
    assert a["step"] == b["step"] == a["steps"] > 4
    assert_same_tensors(a["model"], b["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def _as_saved_before_these_options(name: str, section: dict) -> dict:
    """A stage section of today's layout as progvq wrote it before decoders, their pixelcnn sections
    and class_conditional existed: codes and code_dim beside the quantizer's options (no kind), the
    prior's network keys at the top of its section, every level's loss weights naming mse."""
    section = dict(section)
    if name == "prior":
        network = section.pop(section.pop("kind"))
        section.pop("class_conditional")
        return {**section, **network}
    quantizer = dict(section.pop("quantizer"))
    assert quantizer.pop("kind") == "vq"
    section.pop("decoder")
    loss_weights = {"mse": 0.0, **section.pop("loss_weights")}
    return {
        **section,
        "codes": quantizer.pop("codes"),
        "code_dim": quantizer.pop("dim"),
        "quantizer": quantizer,
        "loss_weights": loss_weights,
    }


@pytest.mark.trains
def test_checkpoints_from_before_these_options_still_load(tiny_copy: Path) -> None:
    """Configs saved without decoder, pixelcnn and class_conditional, in the layout of their day,
    read as the factorised, unconditional model."""
    before = Hierarchy.load(tiny_copy).sample(4, seed=0)
    for stage in ("1", "2", "prior"):
        path = checkpoint_path(tiny_copy, stage)
        ckpt = load_checkpoint(path)
        stages = ckpt["config"]["stages"]
        ckpt["config"]["stages"] = {
            name: _as_saved_before_these_options(name, section) for name, section in stages.items()
        }
        assert not any(
            key in section
            for section in ckpt["config"]["stages"].values()
            for key in ("decoder", "pixelcnn", "class_conditional")
        )
        save_checkpoint(ckpt, path)
    model = Hierarchy.load(tiny_copy, allow_stale=True)  # new digests: the stages above stage 1 read as retrained
    assert type(model.levels[1]) is CodeLevel and model.num_classes == 0
    assert torch.equal(model.sample(4, seed=0), before)


@pytest.mark.trains
def test_shapes_train_a_class_conditional_prior_on_what_was_drawn(tmp_path: Path) -> None:
    """The shapes source labels each image with what it drew, so a prior can be conditioned on it."""
    from progvq.data import SHAPE_CLASSES

    run = tmp_path / "r"
    args = ["train", str(TINY), "--all", "--run-dir", str(run), "--no-progress"]
    assert main([*args, "--set", "stages.prior.class_conditional=true"]) == 0
    model = Hierarchy.load(run)
    assert model.num_classes == len(SHAPE_CLASSES) == 9
    assert load_checkpoint(checkpoint_path(run, "prior"))["extra"]["num_classes"] == 9
    images = model.sample(4, seed=0, label=8)
    assert images.shape == (4, 1, 16, 16) and images.dtype == torch.uint8
    with pytest.raises(RunError, match="label 9 is out of range"):
        model.sample(1, seed=0, label=9)
