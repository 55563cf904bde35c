"""Tests for progvq.fsq: grid, index mapping, known answers, straight-through gradient, usage, state."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from progvq.fsq import FiniteScalarQuantizer, FSQConfig
from progvq.quantize import code_usage

LEVEL_SETS = [[8, 5, 5, 5], [2, 3], [4], [3, 4, 2, 7]]


def half_offset_shift(level: int) -> tuple[int, float, float]:
    """(m, o, s) of one channel, in float64: m = floor(L/2), o = 1/2 for even L, s = atanh(o / m)."""
    m = level // 2
    o = 0.5 if level % 2 == 0 else 0.0
    return m, o, math.atanh(o / m)


def grid(level: int) -> list[float]:
    """The L normalised values of a channel, ascending: q / m for q = -m .. L - 1 - m."""
    m = level // 2
    # in float32, as the module divides
    return ((torch.arange(level) - m).float() / m).tolist()


def preimage(fsq: FiniteScalarQuantizer, indices: torch.Tensor, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) codes -> (B, D, H, W) float32 encoder outputs that quantise to them, far from any boundary.

    Decodes each index by mixed radix (first channel least significant), aims f(z) at the
    integer level q (+ jitter, |jitter| <= 0.3, in units of one step) and inverts
    f(z) = m tanh(z + s) - o. The outermost levels of odd L sit at the saturated ends of f's
    range, so the aim there is pulled a quarter step inwards.
    """
    zs = []
    rest = indices.long()
    for c, level in enumerate(fsq.levels):
        digit = rest % level
        rest = rest // level
        m, o, s = half_offset_shift(level)
        target = (digit - m).double()
        if jitter is not None:
            target = target + jitter[:, c].double()
        target = target.clamp(-m - o + 0.25, m - o - 0.25)
        zs.append(torch.atanh((target + o) / m) - s)
    return torch.stack(zs, 1).float()


def all_codes(fsq: FiniteScalarQuantizer) -> torch.Tensor:
    """Every index once, as a (K, 1, 1) batch."""
    return torch.arange(fsq.num_codes).view(-1, 1, 1)


# ------------------------------------------------------------------ construction


def test_sizes() -> None:
    fsq = FiniteScalarQuantizer([8, 5, 5, 5])
    assert (fsq.num_codes, fsq.dim, fsq.levels) == (1000, 4, (8, 5, 5, 5))
    assert isinstance(fsq.num_codes, int) and isinstance(fsq.dim, int)
    assert FiniteScalarQuantizer((2,)).num_codes == 2


def test_config_sizes_are_the_quantisers() -> None:
    """The config's code count and vector size, which the level is built around, are the module's."""
    cfg = FSQConfig(levels=[8, 5, 5, 5])
    fsq = cfg.build()
    assert isinstance(fsq, FiniteScalarQuantizer) and fsq.levels == (8, 5, 5, 5)
    assert (cfg.num_codes, cfg.dim) == (fsq.num_codes, fsq.dim) == (1000, 4)
    assert cfg.problems() == []
    # what the module would refuse, the config refuses first (in one line naming the key)
    for levels in ([], [3, 1]):
        assert FSQConfig(levels=levels).problems() == [("levels", levels, "a non-empty list of integers >= 2")]
    assert FSQConfig(levels=[2] * 25).problems()[0][0] == "levels"  # 2**25 codes: too many to count


@pytest.mark.parametrize("levels", [[], [1], [0, 3], [3, 1], [2.5], [True, 3]])
def test_bad_levels(levels: list) -> None:
    with pytest.raises(ValueError):
        FiniteScalarQuantizer(levels)


def test_bad_shapes() -> None:
    fsq = FiniteScalarQuantizer([3, 4])
    with pytest.raises(ValueError):
        fsq(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError):
        fsq.nearest(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError):
        fsq.lookup(torch.zeros(1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        fsq.lookup(torch.full((1, 1, 1), 12))
    with pytest.raises(ValueError):
        fsq.lookup(torch.full((1, 1, 1), -1))
    with pytest.raises(TypeError):
        fsq.lookup(torch.zeros(1, 1, 1))


# ------------------------------------------------------------------ index mapping and grid


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_index_round_trip(levels: list[int]) -> None:
    """Every index -> lookup -> an encoder output on that grid point -> nearest/forward -> the same index."""
    fsq = FiniteScalarQuantizer(levels)
    codes = all_codes(fsq)
    vectors = fsq.lookup(codes)  # (K, D, 1, 1)
    assert vectors.dtype == torch.float32 and vectors.shape == (fsq.num_codes, fsq.dim, 1, 1)
    # lookup is mixed radix with the first channel least significant: itertools.product varies
    # its last factor fastest, so enumerate the channels reversed
    expected = [list(reversed(p)) for p in itertools.product(*[grid(n) for n in reversed(levels)])]
    assert vectors.flatten(1).tolist() == expected
    z = preimage(fsq, codes)
    assert torch.equal(fsq.nearest(z), codes)
    out = fsq(z)
    assert torch.equal(out.indices, codes)
    assert torch.equal(out.quantized, vectors)


def test_index_known_answers() -> None:
    """Mixed radix by hand for levels [3, 4]: index = (q0 + 1) + 3 * (q1 + 2)."""
    fsq = FiniteScalarQuantizer([3, 4])
    z = torch.tensor([[10.0, -10.0], [-10.0, 10.0], [0.0, 0.0], [10.0, 10.0]]).T.reshape(1, 2, 1, 4)
    assert fsq.nearest(z).tolist() == [[[2 + 3 * 0, 0 + 3 * 3, 1 + 3 * 2, 2 + 3 * 3]]]
    assert fsq.lookup(torch.tensor([[[2, 9, 7, 11]]])).flatten(2).tolist() == [
        [[1.0, -1.0, 0.0, 1.0], [-1.0, 0.5, 0.0, 0.5]]
    ]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_values_on_grid_and_all_reached(levels: list[int]) -> None:
    fsq = FiniteScalarQuantizer(levels)
    gen = torch.Generator().manual_seed(0)
    # wide enough that every level, the saturated ends included, is hit many times
    z = torch.randn(16, fsq.dim, 32, 32, generator=gen) * 3
    z[0, :, 0, 0], z[0, :, 0, 1] = 1e6, -1e6  # tanh exactly +-1 in float32
    out = fsq(z)
    for c, level in enumerate(levels):
        values = torch.unique(out.quantized[:, c]).tolist()
        assert values == grid(level), (c, values)
        assert -1.0 <= values[0] and values[-1] <= 1.0
    assert out.indices.dtype == torch.int64 and out.indices.shape == (16, 32, 32)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < fsq.num_codes


# ------------------------------------------------------------------ known answers


def test_known_answers_three_levels() -> None:
    """L = 3: m = 1, f(z) = tanh(z); code 1 from tanh(z) >= 1/2, i.e. z >= atanh(1/2) = 0.5493."""
    fsq = FiniteScalarQuantizer([3])
    z = torch.tensor([0.0, 50.0, -50.0, 0.5, 0.6, -0.6, 1e6]).view(1, 1, 1, -1)
    out = fsq(z)
    assert out.quantized.flatten().tolist() == [0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 1.0]
    assert out.indices.flatten().tolist() == [1, 2, 0, 1, 2, 0, 2]


def test_known_answers_four_levels() -> None:
    """L = 4: m = 2, o = 1/2, s = atanh(1/4) = 0.2554, f(z) = 2 tanh(z + s) - 1/2 in (-2.5, 1.5).

    Levels -2 .. 1, normalised -1, -1/2, 0, 1/2. Boundaries in z: f = -3/2 at
    -atanh(1/2) - s = -0.8047, f = -1/2 at -s = -0.2554, f = 1/2 at atanh(1/2) - s = 0.2939.
    At z = +-50 tanh is exactly +-1: f = 1.5 rounds (half to even) to 2 and f = -2.5 to -2,
    so the top one needs the clamp to level 1.
    """
    fsq = FiniteScalarQuantizer([4])
    z = torch.tensor([0.0, 50.0, -50.0, 0.25, 0.35, -0.2, -0.3, -0.8, -0.81, -1.0]).view(1, 1, 1, -1)
    out = fsq(z)
    assert out.quantized.flatten().tolist() == [0.0, 0.5, -1.0, 0.0, 0.5, 0.0, -0.5, -0.5, -1.0, -1.0]
    assert out.indices.flatten().tolist() == [2, 3, 0, 2, 3, 2, 1, 1, 0, 0]


def test_known_answers_two_levels() -> None:
    """L = 2: m = 1, o = 1/2, s = atanh(1/2); f(z) = tanh(z + s) - 1/2; level 0 from z >= -s = -0.5493."""
    fsq = FiniteScalarQuantizer([2])
    z = torch.tensor([0.0, 50.0, -50.0, -0.5, -0.6]).view(1, 1, 1, -1)
    out = fsq(z)
    assert out.quantized.flatten().tolist() == [0.0, 0.0, -1.0, 0.0, -1.0]
    assert out.indices.flatten().tolist() == [1, 1, 0, 1, 0]


# ------------------------------------------------------------------ gradient


def test_straight_through_gradient() -> None:
    """d sum(quantized * w) / dz = w * d(f(z) / m)/dz = w * (1 - tanh^2(z + s)): rounding passes the gradient."""
    levels = [3, 4, 2, 8, 5]
    fsq = FiniteScalarQuantizer(levels)
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(2, len(levels), 5, 6, generator=gen) * 1.5).requires_grad_()
    w = torch.randn(2, len(levels), 5, 6, generator=gen)
    out = fsq(z)
    (out.quantized * w).sum().backward()
    shift = torch.tensor([half_offset_shift(n)[2] for n in levels], dtype=torch.float64).view(1, -1, 1, 1)
    analytic = w.double() * (1 - torch.tanh(z.detach().double() + shift) ** 2)
    assert z.grad is not None
    torch.testing.assert_close(z.grad.double(), analytic, rtol=1e-5, atol=1e-6)
    # ... while the forward value is exactly a grid point, not z plus a rounding error
    assert torch.equal(out.quantized.detach(), fsq.lookup(out.indices))


# ------------------------------------------------------------------ losses and usage


def test_no_codebook_loss_a_commit_term_in_z_space_and_usage() -> None:
    fsq = FiniteScalarQuantizer([8, 5, 5, 5])
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(4, 4, 8, 8, generator=gen).requires_grad_()
    out = fsq(z)
    loss = out.codebook_loss
    assert loss.shape == () and float(loss) == 0.0 and not loss.requires_grad
    assert loss.device == z.device and loss.dtype == torch.float32
    # commit: the mean squared distance, in z-space, to the centre of each value's cell, where the
    # bound meets the grid point: atanh((q + o) / m) - s per channel (kept off the saturated ends)
    half, offset, shift, _ = fsq._constants()
    _, q, _ = fsq._quantize(z.detach())
    target = torch.atanh(((q + offset) / half).clamp(-0.95, 0.95)) - shift
    assert float(out.commit_loss.detach()) == pytest.approx(float((z.detach() - target).pow(2).mean()), rel=1e-6)
    assert float(fsq(target).commit_loss) == pytest.approx(0.0, abs=1e-10)  # at a cell centre: nothing to pull
    # its gradient does not vanish where tanh is flat: it brings a runaway z back
    far = torch.full((1, 4, 1, 1), 50.0, requires_grad=True)
    fsq(far).commit_loss.backward()
    assert far.grad is not None and bool((far.grad > 0.1).all())
    # a weighted sum trains the rest
    total = out.quantized.square().mean() + 1.0 * out.codebook_loss + 0.25 * out.commit_loss
    total.backward()
    assert z.grad is not None and bool(z.grad.abs().sum() > 0)
    perplexity, used = code_usage(out.indices, fsq.num_codes)
    assert out.perplexity.dtype == torch.float32 and out.perplexity.shape == ()
    assert out.codes_used.dtype == torch.int64 and out.codes_used.shape == ()
    assert float(out.perplexity) == pytest.approx(perplexity, rel=1e-6)
    assert int(out.codes_used) == used == len(torch.unique(out.indices))
    assert 1 < used <= 256


def test_usage_of_equal_codes() -> None:
    """k codes used equally often: perplexity k, k codes used."""
    fsq = FiniteScalarQuantizer([3, 4])
    codes = torch.tensor([0, 5, 11, 7]).repeat(3).view(2, 2, 3)
    out = fsq(preimage(fsq, codes))
    assert torch.equal(out.indices, codes)
    assert float(out.perplexity) == pytest.approx(4.0, rel=1e-6) and int(out.codes_used) == 4
    one = fsq(torch.zeros(2, 2, 3, 3))
    assert float(one.perplexity) == pytest.approx(1.0) and int(one.codes_used) == 1


# ------------------------------------------------------------------ nearest, lookup, precision


def test_nearest_matches_forward_and_keeps_state() -> None:
    fsq = FiniteScalarQuantizer([8, 5, 5, 5])
    buffers = {k: v.clone() for k, v in fsq.named_buffers()}
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(3, 4, 6, 7, generator=gen) * 2).requires_grad_()
    codes = fsq.nearest(z)
    assert codes.dtype == torch.int64 and codes.shape == (3, 6, 7) and not codes.requires_grad
    out = fsq(z)
    assert torch.equal(codes, out.indices)
    assert torch.equal(fsq.lookup(codes), out.quantized.detach())
    fsq.eval()
    assert torch.equal(fsq.nearest(z), codes) and torch.equal(fsq(z).indices, codes)
    assert {k: v for k, v in fsq.named_buffers()}.keys() == buffers.keys()
    for k, v in fsq.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert fsq.state_dict() == {}


def test_bf16_autocast_matches_float32() -> None:
    """Away from rounding boundaries a bf16 input under bf16 autocast gives float32's codes and values."""
    fsq = FiniteScalarQuantizer([8, 5, 5, 5])
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(fsq.num_codes, (4, 8, 8), generator=gen)
    jitter = (torch.rand(4, fsq.dim, 8, 8, generator=gen) - 0.5) * 0.6
    z = preimage(fsq, codes, jitter)
    ref = fsq(z)
    assert torch.equal(ref.indices, codes)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        low = fsq(z.bfloat16())
        low32 = fsq(z)
        near = fsq.nearest(z.bfloat16())
    assert torch.equal(low.indices, codes) and torch.equal(near, codes) and torch.equal(low32.indices, codes)
    assert low.quantized.dtype == torch.bfloat16 and low32.quantized.dtype == torch.float32
    # the grid of [8, 5, 5, 5] (multiples of 1/4 and 1/2) is exact in bf16
    assert torch.equal(low.quantized.float(), ref.quantized)
    assert torch.equal(low32.quantized, ref.quantized)


def test_module_dtype_cast_keeps_grid() -> None:
    """Casting the whole module to another float dtype leaves the integer buffers, hence the grid, alone."""
    fsq = FiniteScalarQuantizer([3, 4, 7])
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2
    ref = fsq(z)
    fsq.to(torch.bfloat16)
    out = fsq(z)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.quantized, ref.quantized)


# ------------------------------------------------------------------ state


def test_state_dict_round_trip() -> None:
    fsq = FiniteScalarQuantizer([8, 5, 5, 5])
    z = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(6)) * 2
    state = fsq.state_dict()
    other = FiniteScalarQuantizer([8, 5, 5, 5])
    other.load_state_dict(state, strict=True)
    assert torch.equal(other(z).quantized, fsq(z).quantized)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    again = FiniteScalarQuantizer([8, 5, 5, 5])
    again.load_state_dict(loaded, strict=True)
    assert torch.equal(again.nearest(z), fsq.nearest(z))
    # a vector quantiser's state is not mistaken for this one's
    with pytest.raises(RuntimeError):
        again.load_state_dict({"codebook": torch.zeros(1000, 4)}, strict=True)
