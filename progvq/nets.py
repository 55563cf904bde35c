"""Encoder/decoder building blocks shared by every level.

Both level kinds use the same trunk: strided convolutions down to the code
grid, residual blocks there, and transposed convolutions back up. Only the
input stem (pixels vs. an embedding of codes) and the output head (a
discretised logistic vs. a categorical) differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv1x1(relu(conv3x3(relu(x)))). (B, C, H, W) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _halvings(factor: int) -> int:
    steps = int(math.log2(factor))
    if 2**steps != factor:
        raise ValueError(f"downsampling factor {factor} is not a power of 2")
    return steps


class Encoder(nn.Module):
    """(B, in_ch, H, W) -> (B, out_ch, H/factor, W/factor).

    Each halving is a 4x4 stride-2 convolution; the trunk widens towards the
    code grid, where most of the work happens at a quarter of the cost.
    """

    def __init__(self, in_ch: int, hidden: int, out_ch: int, factor: int, res_blocks: int) -> None:
        super().__init__()
        steps = _halvings(factor)
        layers: list[nn.Module] = []
        ch = in_ch
        for i in range(steps):
            nxt = hidden // 2 ** (steps - 1 - i)
            layers += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch = nxt
        layers.append(nn.Conv2d(ch, hidden, 3, padding=1))
        layers += [ResBlock(hidden) for _ in range(res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden, out_ch, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(B, in_ch, h, w) -> (B, out_ch, h*factor, w*factor); mirror of :class:`Encoder`.

    ``head_kernel`` is the output layer's kernel: 3 for pixel parameters, 1 for
    code logits, where out_ch is a codebook size and a 3x3 head would cost
    more than the rest of the decoder.
    """

    def __init__(
        self,
        in_ch: int,
        hidden: int,
        out_ch: int,
        factor: int,
        res_blocks: int,
        head_kernel: int = 3,
    ) -> None:
        super().__init__()
        steps = _halvings(factor)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, hidden, 3, padding=1)]
        layers += [ResBlock(hidden) for _ in range(res_blocks)]
        layers.append(nn.ReLU())
        ch = hidden
        for i in range(steps):
            nxt = hidden // 2 ** (i + 1)
            layers += [nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1), nn.ReLU()]
            ch = nxt
        layers.append(nn.Conv2d(ch, out_ch, head_kernel, padding=head_kernel // 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# ------------------------------------------------------------------ pixel likelihood

BINS = 256
HALF_BIN = 1.0 / (BINS - 1)  # pixels live in [-1, 1]: 256 bins of width 2/255


def to_unit(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float in [-1, 1]."""
    return images.float() * (2.0 / 255.0) - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8 0..255 (clamped, rounded)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def discretized_logistic_logp(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability of 8-bit pixels under a discretised logistic, per element.

    x, loc, log_scale: (B, C, H, W), x in [-1, 1] on the 256-level grid.
    The edge bins take the whole tail mass, so the 256 probabilities sum to 1
    and the result is an exact log-likelihood (in nats) of the 8-bit data.
    """
    log_scale = log_scale.clamp(min=-7.0)
    inv_s = torch.exp(-log_scale)
    centered = x - loc
    plus = inv_s * (centered + HALF_BIN)
    minus = inv_s * (centered - HALF_BIN)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): mass below the bin's top
    log_sf_minus = -F.softplus(minus)  # log(1 - sigmoid(minus)): mass above the bin's bottom
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    # Where the bin's mass underflows, fall back to density * bin width.
    mid = inv_s * centered
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)
    log_mid = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid + math.log(2 * HALF_BIN),
    )
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_sf_minus, log_mid))


def logistic_mixture_logp(x: Tensor, params: Tensor) -> Tensor:
    """Log-probability of 8-bit pixels under a mixture of K discretised logistics, per pixel.

    x: (B, 1, H, W) in [-1, 1] on the 256-level grid (or any shape that broadcasts against
    one component's parameters); params: (B, 3K, H, W), the mixture's logits, locations and
    log-scales in that order. Returns (B, H, W) nats, exact: each component sums to 1 over
    the 256 levels (:func:`discretized_logistic_logp`), and so does their mixture.
    """
    weights, loc, log_scale = params.chunk(3, dim=1)  # (B, K, H, W) each
    per_component = discretized_logistic_logp(x, loc, log_scale)  # x broadcasts over the K components
    return torch.logsumexp(F.log_softmax(weights, dim=1) + per_component, dim=1)


def logistic_mixture_logits(params: Tensor) -> Tensor:
    """The mixture's log-probability of each of the 256 levels: params (n, 3K) -> logits (n, 256).

    What a sampler draws from, one position at a time; its log-softmax is itself (it sums to 1).
    """
    levels = torch.linspace(-1, 1, BINS, device=params.device, dtype=params.dtype)  # (256,)
    # every level against every row's K components: x (1, 1, 256), params (n, 3K, 1)
    return logistic_mixture_logp(levels.view(1, 1, BINS), params.unsqueeze(-1))  # (n, 256)


# ------------------------------------------------------------------ colour pixels: PixelCNN++'s coupled mixture


def coupling_pairs(channels: int) -> list[tuple[int, int]]:
    """The (channel, earlier channel) pairs of the coupling, in the order of its coefficients.

    Three channels give (1, 0), (2, 0), (2, 1): PixelCNN++'s alpha (G on R), beta (B on R) and
    gamma (B on G).
    """
    return [(c, e) for c in range(channels) for e in range(c)]


def colour_mixture_outputs(mixture: int, channels: int) -> int:
    """Numbers per pixel of a coupled mixture of ``mixture`` components over ``channels``: 10K for colour.

    K weights shared by the channels, then per channel K means and K log-scales, then K
    coefficients per :func:`coupling_pairs` pair.
    """
    return mixture * (1 + 2 * channels + len(coupling_pairs(channels)))


def split_colour_mixture(params: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A coupled mixture's parameters (B, P, ...) -> weights (B, K, ...), means (B, C, K, ...),
    log-scales (B, C, K, ...), coefficients in (-1, 1) (B, pairs, K, ...), the trailing dims kept.

    Along dim 1 the P = :func:`colour_mixture_outputs` numbers are the K mixture logits, then
    the C K means channel by channel, the C K log-scales likewise, then the raw coefficients,
    pair by pair, which tanh bounds (a channel can then move the next one's mean by at most
    its own value, as in PixelCNN++).
    """
    pairs = len(coupling_pairs(channels))
    k = params.shape[1] // (1 + 2 * channels + pairs)
    rest = params.shape[2:]
    weights, means, log_scales, coeffs = params.split([k, channels * k, channels * k, pairs * k], dim=1)
    b = params.shape[0]
    return (
        weights,
        means.reshape(b, channels, k, *rest),
        log_scales.reshape(b, channels, k, *rest),
        torch.tanh(coeffs.reshape(b, pairs, k, *rest)),
    )


def colour_mixture_logp(x: Tensor, params: Tensor) -> Tensor:
    """Log-probability of 8-bit colour pixels under PixelCNN++'s coupled mixture, per pixel.

    x: (B, C, H, W) in [-1, 1] on the 256-level grid; params: (B, P, H, W) as
    :func:`split_colour_mixture` reads them. Component k gives channel c a discretised logistic
    (:func:`discretized_logistic_logp`) of mean mu_c(k) + sum over earlier channels e of
    coeff_(c, e)(k) x_e (for RGB: mean_G = mu_G + alpha R, mean_B = mu_B + beta R + gamma G)
    and log-scale s_c(k); the channels of a pixel share the component, so
    p(x_ij) = sum_k w_k prod_c Logistic_disc(x_c | mean_c(k), s_c(k)), summed in log space.
    Returns (B, H, W) nats, exact: given the earlier channels each channel's 256
    probabilities sum to 1 under every component, so the 256^C joint ones do too.
    """
    channels = x.shape[1]
    weights, means, log_scales, coeffs = split_colour_mixture(params, channels)
    pair = {p: n for n, p in enumerate(coupling_pairs(channels))}
    total = F.log_softmax(weights, dim=1)  # (B, K, H, W)
    for c in range(channels):
        mean = means[:, c]
        for e in range(c):
            mean = mean + coeffs[:, pair[c, e]] * x[:, e : e + 1]
        total = total + discretized_logistic_logp(x[:, c : c + 1], mean, log_scales[:, c])
    return torch.logsumexp(total, dim=1)


def walk_colour_mixture(params: Tensor, channels: int, choose: Callable[[int, Tensor], Tensor]) -> Tensor:
    """One pixel of each of n images, channel by channel: params (n, P) -> levels (n, C) int64 in 0..255.

    For channel c it hands ``choose(c, logits (n, 256))`` the log-probabilities of the 256 levels
    given the channels already chosen, and goes on with the levels (n,) int64 it returns (drawn,
    or an entropy coder's symbols). Given the earlier channels x_<c, the mixture of c is
    p(x_c | x_<c) = sum_k p(k | x_<c) Logistic_disc(x_c | mean_c(k), s_c(k)) with the posterior
    p(k | x_<c) proportional to w_k prod_(e < c) Logistic_disc(x_e | mean_e(k), s_e(k)), so the
    product of the C conditionals is the joint of :func:`colour_mixture_logp`, and coding each
    channel by its conditional costs exactly the joint's bits.
    """
    weights, means, log_scales, coeffs = split_colour_mixture(params, channels)  # (n, K), (n, C, K) ...
    pair = {p: n for n, p in enumerate(coupling_pairs(channels))}
    grid = to_unit(torch.arange(BINS, device=params.device)).to(params.dtype)  # (256,): as the data has them
    posterior = F.log_softmax(weights, dim=1)  # (n, K): log p(k | the channels chosen so far)
    values: list[Tensor] = []  # the chosen channels in [-1, 1], (n, 1) each
    out = []
    for c in range(channels):
        mean = means[:, c]
        for e in range(c):
            mean = mean + coeffs[:, pair[c, e]] * values[e]
        per_level = discretized_logistic_logp(grid, mean[..., None], log_scales[:, c, :, None])  # (n, K, 256)
        joint = posterior[..., None] + per_level  # log p(k, x_c | x_<c)
        chosen = choose(c, torch.logsumexp(joint, dim=1))
        out.append(chosen)
        at = joint.gather(2, chosen.view(-1, 1, 1).expand(-1, joint.shape[1], 1))[..., 0]  # (n, K)
        posterior = F.log_softmax(at, dim=1)
        values.append(grid[chosen].unsqueeze(1))
    return torch.stack(out, dim=1)
