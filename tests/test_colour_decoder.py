"""Level 1's ``pixelcnn`` decoder on colour images: PixelCNN++'s coupled mixture, exact in bits.

The mixture itself (normalised, its channel-by-channel factors equal to the joint), the level
(its likelihood is the entropy coder's code length, causal in raster order and within a pixel,
reproducible draws), the grey decoder's numbers kept as they were, and a tiny colour run through
the command line: train, eval, sample, compress and decompress.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from progvq.build import build_level
from progvq.codec import StreamDecoder, StreamEncoder
from progvq.levels import AutoregressivePixelLevel, PixelCNNDecoderConfig
from progvq.nets import (
    colour_mixture_logp,
    colour_mixture_outputs,
    split_colour_mixture,
    to_unit,
    walk_colour_mixture,
)
from progvq.pixelcnn import PixelCNNConfig, draw
from run_stage import main

from .conftest import TINY
from .helpers import level_config

LN2 = math.log(2)


def random_params(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """n pixels' coupled-mixture parameters (n, 10K) float64, scales wide enough to spread over many levels."""
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(n, colour_mixture_outputs(k, 3), generator=gen, dtype=torch.float64)
    params[:, k + 3 * k : k + 6 * k] = params[:, k + 3 * k : k + 6 * k] * 0.5 - 2.5  # log-scales about -2.5
    return params


def replay(params: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Walk the mixture choosing ``levels`` (n, 3): (the conditionals' log-probs summed (n,), each channel's
    logits (n, 256))."""
    seen: list[torch.Tensor] = []

    def choose(c: int, logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits)
        return levels[:, c]

    assert torch.equal(walk_colour_mixture(params, 3, choose), levels)
    total = sum(logits.gather(1, levels[:, c : c + 1])[:, 0] for c, logits in enumerate(seen))
    return total, seen


# --------------------------------------------------------------------------- the mixture


def test_the_parameters_are_ten_per_component_and_split_as_pixelcnn_pp() -> None:
    assert colour_mixture_outputs(5, 3) == 50 and colour_mixture_outputs(5, 1) == 15
    params = torch.arange(20.0).view(1, 20)  # K = 2
    weights, means, log_scales, coeffs = split_colour_mixture(params, 3)
    assert weights.tolist() == [[0.0, 1.0]]
    assert means.tolist() == [[[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]]
    assert log_scales.tolist() == [[[8.0, 9.0], [10.0, 11.0], [12.0, 13.0]]]
    assert torch.equal(coeffs, torch.tanh(torch.arange(14.0, 20.0).view(1, 3, 2)))  # alpha, beta, gamma


def test_each_channel_given_the_earlier_ones_sums_to_one_and_their_product_is_the_joint() -> None:
    k, n = 4, 50
    params = random_params(n, k)
    gen = torch.Generator().manual_seed(1)
    # colours the mixture itself draws, where every bin's mass is its CDF difference (not the fallback below)
    levels = walk_colour_mixture(params, 3, lambda c, logits: torch.multinomial(logits.exp(), 1, generator=gen)[:, 0])
    total, seen = replay(params, levels)
    # p(R), p(G | R), p(B | R, G): each over the 256 levels, to the discretised logistic's precision
    # (a bin of mass below 1e-5 takes density x width, the difference of its CDFs being cancellation)
    for logits in seen:
        assert torch.allclose(torch.logsumexp(logits, 1), torch.zeros(n, dtype=torch.float64), atol=1e-6)
    # the joint written out: sum_k w_k prod_c Logistic(x_c | mean_c(k), s_c(k)), the means coupled
    x = to_unit(levels).double()  # (n, 3)
    weights, means, log_scales, coeffs = split_colour_mixture(params, 3)
    alpha, beta, gamma = coeffs.unbind(1)  # (n, K) each
    coupled = torch.stack(
        [
            means[:, 0],
            means[:, 1] + alpha * x[:, :1],
            means[:, 2] + beta * x[:, :1] + gamma * x[:, 1:2],
        ],
        dim=1,
    )  # (n, 3, K)
    scales = log_scales.clamp(min=-7.0).exp()
    lower, upper = x[..., None] - 1 / 255, x[..., None] + 1 / 255
    cdf_up = torch.where(upper > 1, 1.0, torch.sigmoid((upper - coupled) / scales))
    cdf_low = torch.where(lower < -1, 0.0, torch.sigmoid((lower - coupled) / scales))
    probs = (torch.softmax(weights, 1) * (cdf_up - cdf_low).prod(1)).sum(1)  # (n,)
    # to the fallback's precision: a component far from the colour has bins below 1e-5 in it
    assert torch.allclose(total, probs.log(), rtol=0, atol=1e-5)
    # the joint as the likelihood computes it: the product of the conditionals, to rounding
    joint = colour_mixture_logp(x.view(n, 3, 1, 1), params.view(n, -1, 1, 1))  # (n, 1, 1)
    assert torch.allclose(joint.view(n), total, rtol=1e-12)


def test_the_joint_summed_over_every_green_and_blue_is_the_marginal_of_red() -> None:
    """Brute force over the 65,536 (G, B) of a few values of R: sum_(G, B) p(R, G, B) = p(R), the
    first conditional, itself normalised over the 256 R (so the 256^3 joint sums to 1)."""
    params = random_params(1, 2, seed=3)
    _, seen = replay(params, torch.tensor([[0, 0, 0]]))
    marginal = seen[0][0]  # (256,): log p(R)
    assert abs(torch.logsumexp(marginal, 0).item()) < 1e-6
    plane = to_unit(torch.arange(256)).double()
    g, b = torch.meshgrid(plane, plane, indexing="ij")
    for r in (0, 1, 77, int(marginal.argmax()), 200, 255):
        x = torch.stack([torch.full_like(g, float(plane[r])), g, b]).unsqueeze(0)  # (1, 3, 256, 256): every (G, B)
        total = torch.logsumexp(colour_mixture_logp(x, params.view(1, -1, 1, 1)).flatten(), 0)
        assert abs(total.exp().item() - marginal[r].exp().item()) < 1e-6, r


def test_a_later_channel_does_not_move_an_earlier_one_and_the_earlier_ones_move_it() -> None:
    params = random_params(20, 3, seed=4)
    levels = torch.randint(0, 256, (20, 3), generator=torch.Generator().manual_seed(5))
    _, base = replay(params, levels)
    for c in range(3):
        other = levels.clone()
        other[:, c] = 255 - other[:, c]
        _, changed = replay(params, other)
        for e in range(3):
            same = torch.equal(base[e], changed[e])
            assert same == (e <= c), (c, e)  # channel e's distribution sees channels < e only


# --------------------------------------------------------------------------- the level


def colour_level(layers: int = 2, mixture: int = 3) -> AutoregressivePixelLevel:
    torch.manual_seed(0)
    decoder = PixelCNNDecoderConfig(PixelCNNConfig(channels=8, layers=layers, kernel_size=3), mixture=mixture)
    cfg = level_config(downsample=4, hidden=16, codes=16, dim=8, decoder=decoder)
    level = build_level(cfg, channels=3, codes_below=0)
    assert isinstance(level, AutoregressivePixelLevel)
    return level.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_colour_level_shapes_and_parameters() -> None:
    level = colour_level()
    assert level.pixelcnn.embed.weight.shape == (3 * 256, 8)  # an embedding per level and channel
    assert level.pixelcnn.head[-1].out_channels == 30  # 10K, K = 3
    x = to_unit(images(2))
    out = level(x)
    assert out.nll.shape == (2,) and out.dims == 3 * 256 and out.prediction.shape == (2, 3, 16, 16)
    assert torch.equal(level._levels(x), images(2).long().permute(0, 2, 3, 1))
    assert torch.allclose(-level.log_likelihood(x, level.encode(x)), out.nll, rtol=1e-5)
    cond, _ = level._outputs(level.quantizer.lookup(level.encode(x)))
    with pytest.raises(ValueError, match=r"codes must be \(B, H, W, 3\) int64"):
        level.pixelcnn(level._levels(x)[..., 0], cond)  # one channel of a colour grid


def test_the_likelihood_is_the_code_length_of_the_coding_walk() -> None:
    """log p(x | z_1) summed over the per-channel conditionals the coder is given, and coded at that length."""
    level = colour_level().double()
    target = images(3)
    codes = torch.randint(0, 16, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        nats = level.log_likelihood(to_unit(target).double(), codes)
    steps: list[torch.Tensor] = []

    def record(logits: torch.Tensor, true: torch.Tensor | None) -> torch.Tensor:
        assert logits.shape == (3, 256) and true is not None
        steps.append(torch.log_softmax(logits, 1).gather(1, true[:, None])[:, 0])
        return true

    assert torch.equal(level.coding_walk(codes, record, target), target)
    assert len(steps) == 3 * 16 * 16  # R, G, B of every pixel
    assert torch.allclose(torch.stack(steps, 1).sum(1), nats, rtol=1e-6)
    # through the range coder and back, at the bound's length
    encoder = StreamEncoder()
    level.coding_walk(codes, encoder, target)
    assert torch.equal(level.coding_walk(codes, StreamDecoder(encoder.words())), target)
    bound = -float(nats.sum()) / LN2
    assert abs(encoder.ideal_bits - bound) < 2e-3 * bound


def test_a_pixel_sees_every_channel_of_the_earlier_pixels_and_nothing_from_itself_on() -> None:
    level = colour_level(layers=3)
    x = to_unit(images(1))
    cond, _ = level._outputs(level.quantizer.lookup(level.encode(x)))
    base = level.pixelcnn(level._levels(x), cond).flatten(2)  # (1, 10K, 256)
    i, j = 7, 9
    pos = i * 16 + j
    for c in range(3):
        changed = level._levels(x).clone()
        changed[0, i, j:, c] = 255 - changed[0, i, j:, c]  # channel c of this pixel and the rest of its row
        changed[0, i + 1 :, :, c] = 255 - changed[0, i + 1 :, :, c]  # and of every later row
        after = level.pixelcnn(changed, cond).flatten(2)
        assert torch.equal(base[..., : pos + 1], after[..., : pos + 1])  # up to and including (i, j)
        assert not torch.equal(base[..., pos + 1], after[..., pos + 1])  # the next pixel sees channel c


def test_decode_draws_reproducibly_and_greedily_at_a_tiny_temperature() -> None:
    level = colour_level()
    codes = level.encode(to_unit(images(2)))
    _, mean = level._outputs(level.quantizer.lookup(codes))
    assert torch.equal(level.decode(codes), ((mean.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    drawn = level.decode(codes, 1.0, torch.Generator().manual_seed(1))
    assert drawn.dtype == torch.uint8 and drawn.shape == (2, 3, 16, 16)
    assert torch.equal(drawn, level.decode(codes, 1.0, torch.Generator().manual_seed(1)))
    assert not torch.equal(drawn, level.decode(codes, 1.0, torch.Generator().manual_seed(2)))
    # far below the logit gaps, every channel is the most likely given all that came before it,
    # which teacher forcing on the drawn image reproduces
    greedy = level.decode(codes, 1e-6, torch.Generator().manual_seed(0))
    cond, _ = level._outputs(level.quantizer.lookup(codes))
    params = level.pixelcnn(level._levels(to_unit(greedy)), cond).permute(0, 2, 3, 1).reshape(512, -1)
    best = walk_colour_mixture(params, 3, lambda c, logits: logits.argmax(1))  # (512, 3)
    assert torch.equal(best, greedy.permute(0, 2, 3, 1).reshape(512, 3).long())


def test_the_naive_and_cached_loops_draw_the_same_colour_pixels() -> None:
    level = colour_level()
    cond, _ = level._outputs(level.quantizer.lookup(level.encode(to_unit(images(2)))))

    def run(method: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)

        def choose(out: torch.Tensor, i: int, j: int) -> torch.Tensor:
            return walk_colour_mixture(out, 3, lambda c, logits: draw(logits, 1.0, gen))

        return level.pixelcnn.fill(2, 16, 16, choose, cond=cond, method=method)

    cached = run("cached")
    assert cached.shape == (2, 16, 16, 3) and torch.equal(cached, run("naive"))
    with pytest.raises(ValueError, match="use fill"):
        level.pixelcnn.sample(2, 16, 16, cond=cond)


# --------------------------------------------------------------------------- grey: as it always was

#: figures of a seeded grey model in float64, computed before colour existed
GREY_LOG_LIKELIHOOD = [-1601.7137321667542, -1599.3668840056694]
GREY_DRAW_SHA256 = "07bbdf56f2e7350f"
GREY_IDEAL_BITS = 4618.1902843181615


def test_a_grey_decoder_has_its_parameters_and_numbers_unchanged() -> None:
    torch.manual_seed(0)
    decoder = PixelCNNDecoderConfig(PixelCNNConfig(channels=8, layers=2, kernel_size=3), mixture=3)
    cfg = level_config(downsample=4, hidden=16, codes=16, dim=8, decoder=decoder)
    level = build_level(cfg, channels=1, codes_below=0).double().eval()
    shapes = {key: tuple(value.shape) for key, value in level.state_dict().items()}
    assert len(shapes) == 63 and shapes["pixelcnn.embed.weight"] == (256, 8)
    assert shapes["pixelcnn.head.3.weight"] == (9, 8, 1, 1) and shapes["decoder.net.7.weight"] == (9, 4, 3, 3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 1, 16, 16), generator=gen, dtype=torch.uint8)
    codes = torch.randint(0, 16, (2, 4, 4), generator=gen)
    with torch.no_grad():
        nats = level.log_likelihood(to_unit(x).double(), codes)
    assert torch.allclose(nats, torch.tensor(GREY_LOG_LIKELIHOOD, dtype=torch.float64), rtol=1e-12)
    drawn = level.decode(codes, 1.0, torch.Generator().manual_seed(3))
    assert hashlib.sha256(drawn.numpy().tobytes()).hexdigest()[:16] == GREY_DRAW_SHA256
    encoder = StreamEncoder()
    level.coding_walk(codes, encoder, x)
    assert encoder.ideal_bits == pytest.approx(GREY_IDEAL_BITS, rel=1e-12)


# --------------------------------------------------------------------------- a colour run, end to end

COLOUR = [
    "data.channels=3",
    "stages.1.decoder={kind: pixelcnn, pixelcnn: {channels: 8, layers: 2, kernel_size: 3}, mixture: 2}",
    "stages.1.loss_weights.mse=1",
]


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("colour") / "run"
    sets = [arg for setting in COLOUR for arg in ("--set", setting)]
    assert main(["train", str(TINY), "--all", "--run-dir", str(run), "--no-progress", *sets]) == 0
    return run


@pytest.mark.trains
def test_a_colour_run_trains_evaluates_samples_and_compresses_exactly(
    colour_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from progvq.codec import Codec
    from progvq.data import load_dataset
    from progvq.hierarchy import Hierarchy

    model = Hierarchy.load(colour_run)
    assert model.image_shape == (3, 16, 16) and isinstance(model.levels[0], AutoregressivePixelLevel)
    capsys.readouterr()
    assert main(["eval", str(colour_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    bpd = report["bits_per_dim"]
    assert 0 < bpd["0"] < 8 and bpd["total"] == pytest.approx(bpd["0"] + bpd["1"] + bpd["2"], rel=1e-6)
    for temperature in ("0", "1"):
        out = tmp_path / f"s{temperature}.png"
        args = ["sample", str(colour_run), "-n", "4", "--seed", "1", "--pixel-temperature", temperature]
        assert main([*args, "--out", str(out)]) == 0
        with np.load(out.with_suffix(".npz")) as saved:
            got = saved["images"]
        assert got.dtype == np.uint8 and got.shape == (4, 3, 16, 16)
        expected = model.sample(4, seed=1, pixel_temperature=float(temperature))
        assert np.array_equal(got, expected.numpy().reshape(got.shape))
    data = load_dataset(model.config.data, total_downsample=model.config.total_downsample())
    heldout = data.heldout[:8]
    packed, back = tmp_path / "h.pvq", tmp_path / "back.npz"
    assert main(["compress", str(colour_run), "--split", "heldout", "--out", str(packed)]) == 0
    assert main(["decompress", str(colour_run), str(packed), "--out", str(back)]) == 0
    with np.load(back) as saved:
        assert np.array_equal(saved["images"], data.heldout.numpy())  # bit for bit
    codec = Codec(colour_run)
    codec.compress(heldout)
    bound = float(codec.bound_bits(heldout).sum())
    assert abs(8 * codec.last_layout.coded - bound) <= 0.01 * bound
