"""Tests for progvq.quantize: assignment, losses, EMA, init, restarts, state."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from progvq.distributed import gather_ranks
from progvq.quantize import VectorQuantizer, code_usage, no_gather


def image(points: list[list[float]] | torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """(B*H*W, D) points in (b, h, w) order -> (B, D, H, W)."""
    return rearrange(
        torch.as_tensor(points, dtype=torch.float32),
        "(b h w) d -> b d h w",
        b=b,
        h=h,
        w=w,
    )


def flat(z: torch.Tensor) -> torch.Tensor:
    return rearrange(z, "b d h w -> (b h w) d")


def make(codebook: list[list[float]] | torch.Tensor, **kwargs: object) -> VectorQuantizer:
    """A quantiser with this codebook and consistent EMA stats.

    No data init, and no restarts unless asked.
    """
    cb = torch.as_tensor(codebook, dtype=torch.float32)
    kwargs = {"init_from_data": False, "restart": False, **kwargs}
    vq = VectorQuantizer(cb.shape[0], cb.shape[1], **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        vq.codebook.copy_(cb)
        vq.ema_sum.copy_(cb)
        vq.draw_seed.fill_(0)  # its own draws, like the codebook, no longer depend on the global RNG
    return vq


def snapshot(vq: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def rows_among(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether every row of rows (R, D) is exactly some row of pool (P, D)."""
    return bool((rows[:, None, :] == pool[None, :, :]).all(-1).any(1).all())


CB4 = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]


def test_nearest_codes_hand_made() -> None:
    vq = make(CB4).eval()
    pts = [[0.1, 0.1], [0.9, 0.2], [0.2, 0.8], [-0.7, -0.9], [2.0, 0.0], [0.0, -0.3]]
    z = image(pts, 1, 2, 3)
    expected = torch.tensor([[[0, 1, 2], [3, 1, 0]]])

    out = vq(z)
    assert out.indices.dtype == torch.int64
    assert torch.equal(out.indices, expected)
    assert torch.equal(vq.nearest(z), expected)
    want = image(torch.tensor(CB4)[expected.flatten()], 1, 2, 3)
    assert torch.equal(out.quantized, want)
    assert torch.equal(vq.lookup(expected), want)


def test_straight_through_gradient_is_identity() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, ema=False, init_from_data=False)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(2, 3, 4, 5)
    out = vq(z)
    (out.quantized * w).sum().backward()
    assert z.grad is not None
    assert torch.equal(z.grad, w)
    # The forward value is the code vector bit for bit (z + (e - z) would round).
    assert torch.equal(out.quantized, vq.lookup(out.indices))


def test_losses_and_their_gradients() -> None:
    vq = make([[0.0, 0.0], [2.0, 2.0]], ema=False)
    # (0.5, 0) -> code 0, error (0.5, 0); (2, 3) -> code 1, error (0, 1).
    z = image([[0.5, 0.0], [2.0, 3.0]], 1, 1, 2).requires_grad_()
    out = vq(z)
    assert out.indices.tolist() == [[[0, 1]]]
    expected = (0.5**2 + 1.0**2) / 4  # mean over B*H*W*D = 4 elements
    assert out.codebook_loss.item() == pytest.approx(expected)
    assert out.commit_loss.item() == pytest.approx(expected)

    g_z, g_cb = torch.autograd.grad(out.codebook_loss, [z, vq.codebook], retain_graph=True, allow_unused=True)
    assert g_z is None
    # d/de mean((z - e)^2) = 2 (e - z) / 4 on the chosen rows
    torch.testing.assert_close(g_cb, torch.tensor([[-0.25, 0.0], [0.0, -0.5]]))

    g_z, g_cb = torch.autograd.grad(out.commit_loss, [z, vq.codebook], allow_unused=True)
    assert g_cb is None
    # d/dz mean((z - e)^2) = 2 (z - e) / 4
    torch.testing.assert_close(g_z, image([[0.25, 0.0], [0.0, 0.5]], 1, 1, 2))

    ema_out = make([[0.0, 0.0], [2.0, 2.0]], ema=True)(z)
    assert ema_out.codebook_loss.item() == 0.0
    assert ema_out.commit_loss.item() == pytest.approx(expected)


def test_ema_update_matches_formula() -> None:
    cb = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    decay, eps = 0.8, 0.1  # a large eps, so the Laplace smoothing shows
    vq = make(cb, ema=True, decay=decay, eps=eps).train()
    # Nearest codes 0, 0, 1, 0; code 2 unused.
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 1.0], [-1.0, 0.5]])
    out = vq(image(pts, 1, 2, 2))
    assert out.indices.flatten().tolist() == [0, 0, 1, 0]

    counts = torch.tensor([3.0, 1.0, 0.0])
    sums = torch.stack([pts[[0, 1, 3]].sum(0), pts[2], torch.zeros(2)])
    count = decay * torch.ones(3) + (1 - decay) * counts
    total = decay * cb + (1 - decay) * sums
    n = count.sum()
    smoothed = (count + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(vq.ema_count, count)
    torch.testing.assert_close(vq.ema_sum, total)
    torch.testing.assert_close(vq.codebook, total / smoothed[:, None])
    torch.testing.assert_close(vq.usage, decay * torch.ones(3) + (1 - decay) * counts)
    # The output uses the codebook from before the update.
    assert torch.equal(out.quantized, image(cb[[0, 0, 1, 0]], 1, 2, 2))


@pytest.mark.parametrize("n_vectors", [18, 4])  # more and fewer vectors than codes
def test_init_from_data(n_vectors: int) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, ema=False, init_from_data=True, restart=False).train()
    assert not vq.initialized
    z = torch.randn(n_vectors, 4, 1, 1)
    vq(z)
    assert vq.initialized
    assert rows_among(vq.codebook.detach(), flat(z))
    if n_vectors >= 8:  # without replacement: all rows distinct
        assert torch.unique(vq.codebook.detach(), dim=0).shape[0] == 8
    torch.testing.assert_close(vq.ema_sum / vq.ema_count[:, None], vq.codebook.detach())

    before = vq.codebook.detach().clone()
    vq(torch.randn(n_vectors, 4, 1, 1))  # initialises once only
    assert torch.equal(vq.codebook.detach(), before)


def restart_batches(n: int) -> list[torch.Tensor]:
    """Batches with half the vectors near (0, 0) and half near (1, 1)."""
    torch.manual_seed(1)
    return [image(torch.cat([0.1 * torch.rand(4, 2), 1 + 0.1 * torch.rand(4, 2)]), 2, 2, 2) for _ in range(n)]


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.trains
def test_dead_codes_restart_from_recent(ema: bool) -> None:
    # Codes 2 and 3 are far from all data and can never be chosen.
    cb = [[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]
    kw = {"ema": ema, "decay": 0.9, "buffer_size": 64, "restart_every": 3}
    vq = make(cb, restart=True, **kw).train()
    ref = make(cb, restart=False, **kw).train()
    batches = restart_batches(3)
    dead, live = [2, 3], [0, 1]

    for i, z in enumerate(batches):
        out = vq(z)
        ref(z)
        if i < 2:  # not yet a restart call
            assert_same_state(snapshot(vq), snapshot(ref))
    if not ema:  # the in-place restart must not break backward of this call's graph
        out.codebook_loss.backward()

    seen = torch.cat([flat(z) for z in batches])
    new = vq.codebook.detach()[dead]
    assert rows_among(new, seen)
    assert torch.equal(vq.codebook.detach()[live], ref.codebook.detach()[live])
    assert torch.equal(vq.usage[live], ref.usage[live])
    assert torch.equal(vq.usage[dead], torch.ones(2))  # reset to the threshold
    assert torch.equal(vq.ema_count[dead], torch.ones(2))
    assert torch.equal(vq.ema_sum[dead], new)
    assert int(vq.calls) == 3 and int(vq.recent_filled) == 24


def test_eval_and_nearest_change_no_state() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, restart_every=2, buffer_size=32).train()
    for _ in range(3):
        vq(torch.randn(2, 3, 4, 4))
    z = torch.randn(2, 3, 4, 4)

    before = snapshot(vq)
    vq.nearest(z)  # even in training mode
    assert_same_state(snapshot(vq), before)
    vq.eval()
    for _ in range(3):
        vq(z)
    vq.lookup(vq.nearest(z))
    assert_same_state(snapshot(vq), before)

    fresh = VectorQuantizer(16, 3).eval()  # eval never initialises from data
    before = snapshot(fresh)
    fresh(z)
    assert_same_state(snapshot(fresh), before)
    assert not fresh.initialized


def train_steps(vq: VectorQuantizer, batches: list[torch.Tensor]) -> None:
    vq.train()
    for z in batches:
        vq(z)


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.trains
def test_state_dict_round_trip(ema: bool) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 4, 4, 4) for _ in range(5)]
    a = VectorQuantizer(16, 4, ema=ema, restart_every=2, buffer_size=16)
    train_steps(a, batches[:3])
    b = VectorQuantizer(16, 4, ema=ema, restart_every=2, buffer_size=16)
    b.load_state_dict(a.state_dict())

    a.eval(), b.eval()
    oa, ob = a(batches[3]), b(batches[3])
    assert torch.equal(oa.indices, ob.indices)
    assert torch.equal(oa.quantized, ob.quantized)
    assert torch.equal(oa.commit_loss, ob.commit_loss)

    rng = torch.get_rng_state()
    train_steps(a, batches[3:])
    torch.set_rng_state(rng)
    train_steps(b, batches[3:])
    assert_same_state(snapshot(a), snapshot(b))


def seeded_run(seed: int, batches: list[torch.Tensor], resume_at: int | None = None) -> dict[str, torch.Tensor]:
    """Train a fresh quantiser on batches.

    With resume_at, checkpoint there and finish in a new object.
    """
    kw = {"restart_every": 2, "buffer_size": 16, "restart_threshold": 3.0}
    torch.manual_seed(seed)
    vq = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    if resume_at is None:
        train_steps(vq, batches)
        return snapshot(vq)
    train_steps(vq, batches[:resume_at])
    state, rng = snapshot(vq), torch.get_rng_state()
    torch.manual_seed(seed + 1000)  # disturb everything the checkpoint should restore
    resumed = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    train_steps(resumed, batches[resume_at:])
    return snapshot(resumed)


@pytest.mark.trains
def test_same_seed_is_bit_identical_and_resume_is_exact() -> None:
    g = torch.Generator().manual_seed(123)
    # 32 vectors per batch > buffer_size 16, so the random-subset path runs;
    # restarts every 2 calls.
    batches = [torch.randn(2, 4, 4, 4, generator=g) for _ in range(6)]
    first = seeded_run(0, batches)
    assert_same_state(first, seeded_run(0, batches))
    assert_same_state(first, seeded_run(0, batches, resume_at=3))
    other = seeded_run(1, batches)
    assert not torch.equal(first["codebook"], other["codebook"])


@pytest.mark.parametrize("ema", [True, False])
def test_an_injected_gather_updates_the_state_on_every_ranks_vectors(ema: bool) -> None:
    """One rank's slice with a gather of every rank's vectors: the state (data init, EMA, usage,
    ring buffer, restarts) moves as in one process on the whole batch; the outputs are the slice's."""
    # one process gathers nothing, and so does the trainer's gather outside a process group
    assert VectorQuantizer(4, 2).gather is no_gather
    assert no_gather(torch.zeros(3, 2)) is None and gather_ranks(torch.zeros(3, 2)) is None
    kw = {"ema": ema, "restart_every": 2, "buffer_size": 16, "restart_threshold": 100.0}
    g = torch.Generator().manual_seed(7)
    # 16 vectors each; every code restarts at calls 2 and 4
    batches = [torch.randn(4, 4, 2, 2, generator=g) for _ in range(4)]
    torch.manual_seed(0)
    whole = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    part = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    part.load_state_dict(whole.state_dict())
    whole.train(), part.train()
    for z in batches:
        mine, theirs = z[:2], z[2:]  # rank 0's images and rank 1's: rank order is batch order
        part.gather = lambda vectors, theirs=theirs: torch.cat([vectors, flat(theirs)])
        out_whole, out_part = whole(z), part(mine)
        assert torch.equal(out_part.indices, out_whole.indices[:2])
        assert torch.equal(out_part.quantized, out_whole.quantized[:2])
    assert_same_state(snapshot(part), snapshot(whole))
    # and the gather mattered: without it the slice alone moves the state elsewhere
    alone = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    alone.load_state_dict(snapshot(whole))
    with_gather = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    with_gather.load_state_dict(snapshot(whole))
    with_gather.gather = lambda vectors: torch.cat([vectors, flat(batches[0][2:])])
    alone(batches[0][:2]), with_gather(batches[0][:2])
    assert not torch.equal(alone.usage, with_gather.usage)


@pytest.mark.trains
def test_own_draws_ignore_the_global_rng_and_follow_the_state_dict() -> None:
    # data init, the ring buffer's random subset (32 vectors > 16 rows) and restarts
    # (every code dead at threshold 100, every 2 calls) all draw
    kw = {"restart_every": 2, "buffer_size": 16, "restart_threshold": 100.0}
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 4, 4, 4, generator=g) for _ in range(4)]  # the last call restarts
    torch.manual_seed(0)
    a = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    b = VectorQuantizer(16, 4, **kw)  # type: ignore[arg-type]
    assert int(a.draw_seed) != int(b.draw_seed)  # two quantisers, two streams
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)  # the global stream differs between the two, as between two ranks
    before = torch.get_rng_state()
    train_steps(a, batches)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn from it
    torch.manual_seed(2)
    train_steps(b, batches)
    assert_same_state(snapshot(a), snapshot(b))
    # and the draws did happen: the codebook, every code just restarted, is made of seen vectors
    assert rows_among(a.codebook, torch.cat([flat(z) for z in batches]))


def test_a_state_dict_from_before_draw_seed_still_loads() -> None:
    torch.manual_seed(0)
    old = VectorQuantizer(8, 4)
    state = {k: v for k, v in snapshot(old).items() if k != "draw_seed"}
    new = VectorQuantizer(8, 4)
    own = int(new.draw_seed)
    new.load_state_dict(state)  # strict
    assert int(new.draw_seed) == own  # it keeps its own
    assert torch.equal(new.codebook, old.codebook)


def test_perplexity_and_codes_used() -> None:
    assert code_usage(torch.tensor([0, 1, 2, 0, 1, 2]), 8) == (pytest.approx(3.0), 3)
    # Histogram (1/2, 1/4, 1/4): entropy 1.5 bits, perplexity 2 ** 1.5.
    assert code_usage(torch.tensor([[0, 0], [1, 2]]), 4) == (pytest.approx(2**1.5), 3)
    with pytest.raises(ValueError):
        code_usage(torch.tensor([0, 5]), 4)

    cb = torch.tensor([[float(i), 0.0] for i in range(8)])
    vq = make(cb).eval()
    out = vq(image(cb[[0, 1, 2, 3, 3, 2, 1, 0]], 2, 2, 2))  # 4 codes, twice each
    assert out.perplexity.item() == pytest.approx(4.0)
    assert out.codes_used.dtype == torch.int64 and int(out.codes_used) == 4
    assert math.isclose(code_usage(out.indices, 8)[0], out.perplexity.item(), rel_tol=1e-6)


def test_bf16_under_autocast_matches_float32() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, init_from_data=False, restart=False)
    # Rounded to bf16 first, so both paths see exactly the same values.
    z = (0.05 * torch.randn(2, 4, 6, 6)).bfloat16()
    vq.eval()
    ref = vq(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.quantized, ref.quantized.bfloat16())
    assert out.commit_loss.dtype == torch.float32

    vq.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vq(z)
    assert vq.codebook.dtype == torch.float32 and vq.ema_sum.dtype == torch.float32


def test_rejects_wrong_shape() -> None:
    vq = VectorQuantizer(4, 3)
    with pytest.raises(ValueError):
        vq(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError):
        vq.nearest(torch.randn(3, 4, 4))
