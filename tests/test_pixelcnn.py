"""Tests for the gated PixelCNN prior: exact causality, no blind spot, conditioning, sampling, fitting."""

import math

import pytest
import torch

from progvq.pixelcnn import GatedPixelCNN, PixelCNNConfig, bits_per_code, code_log_prob

from .helpers import assert_same_tensors

K = 8  # codebook size for the small random models
S = 5  # grid side for the receptive-field tests


def _model(seed: int = 0, **kwargs) -> GatedPixelCNN:
    torch.manual_seed(seed)
    kwargs.setdefault("channels", 16)
    return GatedPixelCNN(K, **kwargs).double().eval()


def _conditioning(model: GatedPixelCNN, b: int, h: int, w: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    if model.cond_channels:
        out["cond"] = torch.randn(b, model.cond_channels, h, w, generator=g, dtype=torch.float64)
    if model.num_classes:
        out["label"] = torch.randint(model.num_classes, (b,), generator=g)
    return out


# (kernel_size, layers) with layers * (kernel_size // 2) >= S - 1 fully cover the S x S grid.
COVERING = [(3, 4), (5, 2)]
CAUSAL = [*COVERING, (3, 3), (5, 3)]


@pytest.mark.parametrize(("kernel_size", "layers"), CAUSAL)
def test_causal_under_perturbation(kernel_size: int, layers: int) -> None:
    model = _model(kernel_size=kernel_size, layers=layers, cond_channels=3, num_classes=4)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(K, (3, S, S), generator=g)
    extra = _conditioning(model, 3, S, S)
    base = model(codes, **extra).flatten(2)  # (B, K, S*S)
    for t in range(S * S):
        changed = codes.flatten(1).clone()
        # Replace the code at t and every later position with a different one.
        changed[:, t:] = (changed[:, t:] + torch.randint(1, K, changed[:, t:].shape, generator=g)) % K
        out = model(changed.view_as(codes), **extra).flatten(2)
        torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], rtol=0, atol=1e-6)
        if t + 1 < S * S:  # later outputs do move, so the check above is not vacuous
            assert (out[:, :, t + 1 :] - base[:, :, t + 1 :]).abs().max() > 1e-4


@pytest.mark.parametrize(("kernel_size", "layers"), COVERING)
def test_dependencies_are_exactly_the_past(kernel_size: int, layers: int) -> None:
    """Gradient support of the logits at p == all positions strictly before p: causal, no blind spot."""
    model = _model(kernel_size=kernel_size, layers=layers, cond_channels=2, num_classes=3)
    codes = torch.randint(K, (1, S, S), generator=torch.Generator().manual_seed(3))
    x = model.embed(codes).permute(0, 3, 1, 2).detach().requires_grad_()  # (1, C, S, S)
    extra = _conditioning(model, 1, S, S)
    logits = model.forward_embedded(x, **extra).flatten(2)  # (1, K, S*S)
    for t in range(S * S):
        (grad,) = torch.autograd.grad(logits[0, :, t].sum(), x, retain_graph=True)
        seen = grad[0].abs().sum(0).flatten() > 0  # (S*S,)
        expected = torch.arange(S * S) < t
        assert torch.equal(seen, expected), f"position {divmod(t, S)} sees {seen.view(S, S).int()}"


def test_receptive_field_limit_matches_docstring() -> None:
    """With layers * (kernel_size // 2) = 3 < S - 1, (1, 0) cannot reach (0, 4), but reaches (0, 3)."""
    model = _model(kernel_size=3, layers=3)
    codes = torch.randint(K, (1, S, S), generator=torch.Generator().manual_seed(3))
    x = model.embed(codes).permute(0, 3, 1, 2).detach().requires_grad_()  # (1, C, S, S)
    (grad,) = torch.autograd.grad(model.forward_embedded(x)[0, :, 1, 0].sum(), x)
    seen = grad[0].abs().sum(0) > 0  # (S, S)
    assert not seen[0, 4] and seen[0, :4].all() and not seen[1:].any()


def test_first_position_depends_only_on_conditioning() -> None:
    model = _model(layers=3, cond_channels=2, num_classes=3)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(K, (2, 1, S, S), generator=g)
    extra = _conditioning(model, 1, S, S)
    out_a, out_b = model(a, **extra), model(b, **extra)
    torch.testing.assert_close(out_a[:, :, 0, 0], out_b[:, :, 0, 0], rtol=0, atol=0)
    # (0, 1) sees (0, 0); (1, 0) sees row 0.
    assert not torch.allclose(out_a[:, :, 0, 1], out_b[:, :, 0, 1])
    assert not torch.allclose(out_a[:, :, 1, 0], out_b[:, :, 1, 0])


def test_conditioning_changes_first_position() -> None:
    model = _model(layers=2, cond_channels=2, num_classes=3)
    codes = torch.zeros(1, 3, 3, dtype=torch.long)
    cond = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    label = torch.tensor([0])
    base = model(codes, cond, label)[:, :, 0, 0]
    assert (model(codes, cond + 1.0, label)[:, :, 0, 0] - base).abs().max() > 1e-4
    assert (model(codes, cond, label + 1)[:, :, 0, 0] - base).abs().max() > 1e-4


def test_conditioning_arguments_are_checked() -> None:
    plain = _model(layers=1)
    conditioned = _model(layers=1, cond_channels=2, num_classes=3)
    codes = torch.zeros(2, 3, 3, dtype=torch.long)
    cond = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    label = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="cond_channels=0"):
        plain(codes, cond=cond)
    with pytest.raises(ValueError, match="num_classes=0"):
        plain(codes, label=label)
    with pytest.raises(ValueError, match="cond must be"):
        conditioned(codes, label=label)
    with pytest.raises(ValueError, match="label must be"):
        conditioned(codes, cond=cond)
    with pytest.raises(ValueError, match="cond must be"):
        conditioned(codes, cond[:, :, :2], label)
    assert conditioned(codes, cond, label).shape == (2, K, 3, 3)


def test_sample_shape_dtype_and_seeding() -> None:
    model = _model(layers=3, cond_channels=2, num_classes=3)
    extra = _conditioning(model, 6, 4, 4)

    def draw(seed: int) -> torch.Tensor:
        return model.sample(6, 4, 4, generator=torch.Generator().manual_seed(seed), **extra)

    s = draw(0)
    assert s.shape == (6, 4, 4) and s.dtype == torch.long
    assert 0 <= s.min() and s.max() < K
    assert torch.equal(s, draw(0))
    assert not torch.equal(s, draw(1))


def test_sample_temperature_zero_is_greedy() -> None:
    model = _model(layers=3)
    s = model.sample(4, 4, 4, temperature=0.0)
    # Causality makes one forward pass on the finished sample reproduce every step's logits.
    assert torch.equal(s, model(s).argmax(1))


def test_sample_uses_eval_mode_and_restores_it() -> None:
    model = _model(layers=3, dropout=0.5)
    model.train()
    in_train = model.sample(4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    in_eval = model.sample(4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert not model.training
    assert torch.equal(in_train, in_eval)  # dropout was off while sampling
    model.train()
    model.blocks[0].eval()  # a mixed setting is restored module by module
    model.sample(1, 2, 2)
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, 2, 2, temperature=-1.0)


def _agrees(count: int, n: int, p: float, alpha: float = 1e-9) -> bool:
    """Whether ``count`` successes of ``n`` draws are consistent with probability ``p``.

    Bernstein's inequality: for a fixed ``p`` the frequency strays further than the bound
    with probability below ``alpha``, so a correct sampler fails this for almost no seed.
    """
    log_term = math.log(2 / alpha)
    bound = math.sqrt(2 * p * (1 - p) * log_term / n) + log_term / (3 * n)
    return abs(count / n - p) <= bound


@pytest.mark.trains
def test_fits_copy_left_distribution() -> None:
    """Codes on a 1x6 grid: first uniform over 4, each later one copies its left neighbour.

    The true entropy is 2 bits for the first code and 0 for the rest: 2/6 bits per code.
    Training runs until the fit is within ``gap`` bits per code of that, measured exactly on
    the 4 sequences of the distribution, which must happen within a bounded number of steps
    (how many it takes depends on the CPU's kernels, whether it happens does not). The
    sampler is then checked against the fitted model's own probabilities, whose copy
    probability the reached fit bounds from below.
    """
    # the gap is reached within 100 steps with AVX-512 and with AVX2 kernels; 2000 is a generous bound
    gap, check_every, max_steps = 0.005, 25, 2000
    torch.manual_seed(0)
    model = GatedPixelCNN(4, channels=16, layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sequences = torch.arange(4).view(4, 1, 1).expand(4, 1, 6).contiguous()  # every sequence, each of probability 1/4

    def batch(n: int) -> torch.Tensor:
        return torch.randint(4, (n, 1, 1)).expand(n, 1, 6).contiguous()  # (n, 1, 6)

    def exact_bits() -> float:
        model.eval()
        with torch.no_grad():
            bits = bits_per_code(model(sequences), sequences).item()
        model.train()
        return bits

    excess = math.inf
    for step in range(1, max_steps + 1):
        codes = batch(64)
        loss = bits_per_code(model(codes), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0:
            excess = exact_bits() - 2 / 6
            if excess < gap:
                break
    assert excess < gap, f"{excess} bits per code above the entropy after {max_steps} steps"
    model.eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(model(sequences).double(), 1)  # (4, K, 1, 6)
    first = log_probs[0, :, 0, 0].exp()  # (4,) p(first code); position (0, 0) sees no code
    # p(copy) = sum over the 4 sequences of the model's probability of each; by Jensen it is at
    # least 4 * 2^(-mean bits per sequence) = 2^(-6 * excess): above 0.979 for excess < 0.005
    # (the slack covers excess being measured in float32)
    p_copy = log_probs.gather(1, sequences[:, None]).sum((1, 2, 3)).exp().sum().item()
    assert p_copy >= 2 ** (-6 * excess) - 1e-6, (p_copy, excess)
    n = 4096
    s = model.sample(n, 1, 6, generator=torch.Generator().manual_seed(0))
    copies = int((s == s[:, :, :1]).all(dim=2).sum())
    assert _agrees(copies, n, p_copy), (copies, n, p_copy)
    assert copies / n > 0.95  # what the two checks above imply for excess < 0.005
    # the first code follows the model's marginal, which the fit keeps near uniform (each >= 0.09)
    counts = torch.bincount(s[:, 0, 0], minlength=4)
    assert all(_agrees(int(c), n, float(p)) for c, p in zip(counts, first, strict=True)), (counts, first)
    assert len(s[:, 0, 0].unique()) == 4


def test_bits_per_code_hand_computed() -> None:
    codes = torch.randint(K, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    assert bits_per_code(torch.zeros(2, K, 3, 3), codes).item() == pytest.approx(math.log2(K))
    # p = (1/2, 1/4, 1/4) at each of two positions; codes 0 and 1 cost 1 and 2 bits.
    logits = torch.tensor([0.5, 0.25, 0.25]).log().view(1, 3, 1, 1).expand(1, 3, 1, 2)
    assert bits_per_code(logits, torch.tensor([[[0, 1]]])).item() == pytest.approx(1.5)


# ---------------------------------------------------------------- cached sampler

# (kernel_size, layers, cond_channels, num_classes, dropout): the cached sampler's special
# cases are the type-A first block, the last block (skip only), ring buffers of r + 1 rows
# and conditioning from a spatial map, a label, both or neither.
SAMPLERS = [
    (3, 4, 3, 4, 0.0),
    (3, 1, 0, 0, 0.0),
    (5, 2, 2, 0, 0.3),
    (7, 3, 0, 3, 0.5),
    (3, 3, 0, 0, 0.2),
]


def _sampler_model(
    dtype: torch.dtype, kernel_size: int, layers: int, cond: int, classes: int, dropout: float
) -> GatedPixelCNN:
    torch.manual_seed(kernel_size * 100 + layers)
    return GatedPixelCNN(
        K, channels=16, layers=layers, kernel_size=kernel_size, cond_channels=cond, num_classes=classes, dropout=dropout
    ).to(dtype)


def _cast(extra: dict, dtype: torch.dtype) -> dict:
    """Floating conditioning tensors in ``dtype`` (``_conditioning`` makes float64)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in extra.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("kernel_size", "layers", "cond", "classes", "dropout"), SAMPLERS)
def test_cached_logits_equal_forward(
    dtype: torch.dtype, kernel_size: int, layers: int, cond: int, classes: int, dropout: float
) -> None:
    """Teacher-forced, the cached sampler computes at every position the logits of one full forward pass."""
    model = _sampler_model(dtype, kernel_size, layers, cond, classes, dropout).eval()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    # Non-square, wider than the kernel, narrower than it, a single row and a single position.
    for n, h, w in [(3, 4, 6), (2, 5, 2), (2, 1, 4), (1, 1, 1)]:
        codes = torch.randint(K, (n, h, w), generator=torch.Generator().manual_seed(h * w))
        extra = _cast(_conditioning(model, n, h, w), dtype)
        with torch.no_grad():
            expected = model(codes, **extra)
        got = model._cached_logits(codes, **extra)
        assert got.dtype == dtype and got.shape == (n, K, h, w)
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_cached_sampler_logits_are_the_forward_logits_of_its_sample() -> None:
    """While drawing, every position's logits equal the full forward pass on the finished sample."""
    model = _model(layers=3, kernel_size=5, cond_channels=2, num_classes=3)
    n, h, w = 3, 4, 5
    extra = _conditioning(model, n, h, w)
    seen = torch.full((n, K, h, w), math.nan, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)

    def choose(logits: torch.Tensor, i: int, j: int) -> torch.Tensor:
        seen[:, :, i, j] = logits
        return torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)

    codes = torch.zeros(n, h, w, dtype=torch.long)
    with torch.no_grad():
        model._run_cached(n, h, w, extra["cond"], extra["label"], choose, codes)
        expected = model(codes, **extra)
    assert len(codes.unique()) > 1
    torch.testing.assert_close(seen, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("kernel_size", "layers", "cond", "classes", "dropout"), SAMPLERS)
def test_cached_sample_equals_naive(
    dtype: torch.dtype, kernel_size: int, layers: int, cond: int, classes: int, dropout: float
) -> None:
    """Same seed, same codes: exact equality, not closeness, in float64 and float32."""
    model = _sampler_model(dtype, kernel_size, layers, cond, classes, dropout).train()  # sampling switches to eval
    n, h, w = 4, 4, 5
    extra = _cast(_conditioning(model, n, h, w), dtype)

    def draw(method: str, temperature: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.sample(n, h, w, temperature=temperature, generator=g, method=method, **extra)

    for seed in range(3):
        for temperature in (1.0, 0.7, 0.0):
            assert torch.equal(draw("cached", temperature, seed), draw("naive", temperature, seed)), (seed, temperature)
    assert model.training


def test_cached_sample_matches_naive_on_global_generator() -> None:
    model = _model(layers=3, num_classes=2)
    label = torch.tensor([0, 1, 1])
    draws = []
    for method in ("cached", "naive"):
        torch.manual_seed(7)
        draws.append(model.sample(3, 3, 4, label=label, method=method))
        draws.append(torch.rand(2))  # the global stream advanced by the same amount
    assert all(torch.equal(a, b) for a, b in zip(draws[:2], draws[2:]))


def _known(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(K, (n, h, w), generator=g), torch.rand(n, h, w, generator=g) < 0.4


@pytest.mark.parametrize("method", ["cached", "naive"])
def test_known_codes_are_kept_and_condition_the_rest(method: str) -> None:
    model = _model(layers=4, cond_channels=2, num_classes=3)
    n, h, w = 5, 4, 5
    extra = _conditioning(model, n, h, w)
    codes, mask = _known(n, h, w, seed=3)

    def draw(known: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return model.sample(n, h, w, generator=g, known=known, method=method, **extra)

    s, free = draw((codes, mask)), draw(None)
    assert torch.equal(s[mask], codes[mask])
    # Same random numbers at every position, so free codes that differ from the unconstrained
    # draw differ because they are conditioned on the known codes.
    assert not torch.equal(s[~mask], free[~mask])
    # Greedy: every free code is the argmax of the logits given everything before it, known codes included.
    greedy = model.sample(n, h, w, temperature=0.0, known=(codes, mask), method=method, **extra)
    assert torch.equal(greedy[mask], codes[mask])
    assert torch.equal(greedy[~mask], model(greedy, **extra).argmax(1)[~mask])


def test_known_cached_equals_naive_and_keeps_the_generator_stream() -> None:
    model = _model(layers=3, kernel_size=5, cond_channels=2)
    n, h, w = 4, 5, 4
    extra = _conditioning(model, n, h, w)
    codes, mask = _known(n, h, w, seed=4)

    def draw(method: str, known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return model.sample(n, h, w, generator=torch.Generator().manual_seed(1), known=known, method=method, **extra)

    with_known = [draw(m, (codes, mask)) for m in ("cached", "naive")]
    assert torch.equal(*with_known)
    # Known codes equal to what the same seed draws anyway change nothing: a code is drawn
    # (and the generator advanced) at every position whether it is known or not.
    free = draw("cached")
    assert torch.equal(draw("cached", (free, mask)), free)
    assert torch.equal(draw("naive", (free, mask)), free)
    everything = torch.ones_like(mask)
    assert torch.equal(draw("cached", (codes, everything)), codes)


def test_sample_arguments_are_checked() -> None:
    model = _model(layers=2)
    codes, mask = _known(2, 3, 3, seed=0)
    with pytest.raises(ValueError, match="method"):
        model.sample(2, 3, 3, method="fast")
    with pytest.raises(ValueError, match="known codes must be"):
        model.sample(2, 3, 3, known=(codes[:, :2], mask))
    with pytest.raises(ValueError, match="known mask must be"):
        model.sample(2, 3, 3, known=(codes, mask.long()))
    with pytest.raises(ValueError, match="lie in"):
        model.sample(2, 3, 3, known=(codes + K, mask | True))
    # Out-of-range values where the mask is False are ignored (they are never used).
    assert model.sample(2, 3, 3, known=(codes + K, torch.zeros_like(mask))).max() < K
    with pytest.raises(ValueError, match="cond_channels=0"):
        model.sample(2, 3, 3, cond=torch.zeros(2, 1, 3, 3, dtype=torch.float64))


def test_log_prob_is_the_sum_of_the_forward_logits_per_position_log_probs() -> None:
    """log_prob_per_position is log softmax of the logits at each code; log_prob sums it, and without
    labels a class-conditional model gives the marginal over uniform classes."""
    model = _model(num_classes=3)
    codes = torch.randint(K, (4, S, S), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1])
    logits = model(codes, label=labels)
    by_hand = torch.log_softmax(logits, 1).gather(1, codes[:, None])[:, 0]  # (4, S, S)
    torch.testing.assert_close(code_log_prob(logits, codes), by_hand, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.log_prob_per_position(codes, labels), by_hand, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.log_prob(codes, labels), by_hand.sum((1, 2)), rtol=0, atol=1e-10)
    per_class = torch.stack([model.log_prob(codes, torch.full((4,), y)) for y in range(3)], 1)  # (4, 3)
    torch.testing.assert_close(model.log_prob(codes), torch.logsumexp(per_class, 1) - math.log(3), rtol=0, atol=1e-10)
    assert not torch.allclose(per_class[:, 0], per_class[:, 1])  # the classes differ, so the marginal is no one class's
    plain = _model()
    logits = plain(codes)
    by_hand = torch.log_softmax(logits, 1).gather(1, codes[:, None]).sum((1, 2, 3))
    torch.testing.assert_close(plain.log_prob(codes), by_hand, rtol=0, atol=1e-10)
    # bf16 logits are read in float32: a likelihood needs more than bf16's 8 bits of mantissa
    coarse = logits.bfloat16()
    assert code_log_prob(coarse, codes).dtype == torch.float32
    torch.testing.assert_close(code_log_prob(coarse, codes), code_log_prob(coarse.float(), codes), rtol=0, atol=0)


def test_from_config_builds_the_configured_network() -> None:
    cfg = PixelCNNConfig(channels=12, layers=3, kernel_size=5, dropout=0.2)
    torch.manual_seed(0)
    built = GatedPixelCNN.from_config(cfg, K, cond_channels=6, num_classes=2)
    torch.manual_seed(0)
    direct = GatedPixelCNN(K, channels=12, layers=3, kernel_size=5, dropout=0.2, cond_channels=6, num_classes=2)
    assert_same_tensors(built.state_dict(), direct.state_dict())
    assert (built.num_codes, built.cond_channels, built.num_classes) == (K, 6, 2)
    assert {m.p for m in built.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}
    assert PixelCNNConfig(kernel_size=4, dropout=1.0).problems() == [
        ("kernel_size", 4, "odd and >= 3"),
        ("dropout", 1.0, "in [0, 1)"),
    ]


def test_unused_parameters_is_what_a_backward_leaves_without_a_gradient() -> None:
    """The last block's horizontal output feeds nothing: DistributedDataParallel must look for unused parameters."""
    model = _model(layers=3).train()
    codes = torch.randint(K, (2, S, S), generator=torch.Generator().manual_seed(0))
    (-code_log_prob(model(codes), codes).sum()).backward()
    unused = sorted(name for name, p in model.named_parameters() if p.grad is None)
    assert GatedPixelCNN.unused_parameters and unused == ["blocks.2.h_out.bias", "blocks.2.h_out.weight"]


# --------------------------------------------------------------------------- class guidance


def _guidance_model() -> GatedPixelCNN:
    torch.manual_seed(0)
    model = GatedPixelCNN(7, channels=16, layers=3, kernel_size=3, num_classes=4)
    for p in model.parameters():
        p.data.normal_(0, 0.5)  # far from uniform
    for block in model.blocks:
        block.label_bias.weight.data.mul_(0.1)  # classes that differ a little: guidance has work to do
    return model.eval()


def _guided_reference(model: GatedPixelCNN, label: torch.Tensor, w: float, height: int, width: int) -> torch.Tensor:
    """Greedy guided codes computed the long way: full forward passes under every class at every position,
    p(y | codes so far) from the log-likelihood of the codes drawn so far under each class."""
    import torch.nn.functional as F

    n, classes = len(label), model.num_classes
    codes = torch.zeros(n, height, width, dtype=torch.long)
    with torch.no_grad():
        for i in range(height):
            for j in range(width):
                per_class = [F.log_softmax(model(codes, label=torch.full((n,), y)).double(), 1) for y in range(classes)]
                logp = torch.stack([lp[:, :, i, j] for lp in per_class], 1)  # (n, C, K)
                drawn = torch.stack([lp.gather(1, codes[:, None])[:, 0] for lp in per_class], 1)  # (n, C, H, W)
                before = (torch.arange(height * width) < i * width + j).view(height, width)
                posterior = F.log_softmax((drawn * before).flatten(2).sum(2), 1)
                marginal = torch.logsumexp(posterior[:, :, None] + logp, 1)
                asked = logp[torch.arange(n), label]
                codes[:, i, j] = (asked + w * (asked - marginal)).argmax(1)
    return codes


@pytest.mark.parametrize("method", ["cached", "naive"])
def test_guided_sample_is_the_guided_distribution(method: str) -> None:
    """p(code | y)^(1+w) / p(code)^w with p(code) the model's own mixture over classes: a known answer."""
    model = _guidance_model()
    label = torch.tensor([0, 1, 2, 3, 1])
    got = model.sample(5, 3, 4, temperature=0, label=label, guidance=1.5, method=method)  # type: ignore[arg-type]
    assert torch.equal(got, _guided_reference(model, label, 1.5, 3, 4))
    plain = model.sample(5, 3, 4, temperature=0, label=label)
    assert not torch.equal(got, plain)  # guidance changed something on this model


def test_guidance_zero_is_the_plain_draw_and_is_checked() -> None:
    model = _guidance_model()
    label = torch.tensor([2, 0, 3])
    a = model.sample(3, 3, 3, label=label, generator=torch.Generator().manual_seed(4))
    b = model.sample(3, 3, 3, label=label, generator=torch.Generator().manual_seed(4), guidance=0.0)
    assert torch.equal(a, b)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="guidance"):
            model.sample(3, 3, 3, label=label, guidance=bad)
    with pytest.raises(ValueError, match="class-conditional"):
        GatedPixelCNN(7, channels=8, layers=2).sample(3, 3, 3, guidance=1.0)


def test_guidance_raises_the_asked_class_posterior() -> None:
    """Guided samples are likelier under their class, relative to the others, than plain ones (same seeds)."""
    model = _guidance_model()
    label = torch.arange(4).repeat(16)
    posteriors = []
    for w in (0.0, 3.0):
        codes = model.sample(64, 3, 3, label=label, generator=torch.Generator().manual_seed(7), guidance=w)
        with torch.no_grad():
            per_class = torch.stack([model.log_prob(codes, torch.full((64,), y)) for y in range(4)], 1)
        posteriors.append(torch.softmax(per_class, 1)[torch.arange(64), label].mean())
    assert posteriors[1] > posteriors[0] + 0.05
