"""Sample figures against known answers: Fréchet distance, k-NN precision and recall, memorisation, labels."""

from __future__ import annotations

import math

import pytest
import torch

from progvq import score
from progvq.score import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    label_figures,
    memorised,
    nearest,
    precision_recall,
)


def _gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """(n, D) float64 draws from N(mean (D,), cov (D, D))."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, len(mean), generator=gen, dtype=torch.float64)
    return mean + noise @ torch.linalg.cholesky(cov).T


def _spd(d: int, seed: int) -> torch.Tensor:
    """A random symmetric positive definite (d, d) float64 matrix."""
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_of_a_set_with_itself_is_zero() -> None:
    x = _gaussian(500, torch.zeros(16, dtype=torch.float64), _spd(16, 0), seed=1)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x.float(), x.float()) == pytest.approx(0.0, abs=1e-4)


def test_frechet_from_stats_diagonal_closed_form() -> None:
    # diagonal covariances commute: |m_a - m_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    mean_a = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    mean_b = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    var_a = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    var_b = torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    expected = 9 + 16 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    got = frechet_distance_from_stats(mean_a, torch.diag(var_a), mean_b, torch.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_from_stats_scaled_and_general_covariances() -> None:
    cov = _spd(6, 3)
    mean = torch.zeros(6, dtype=torch.float64)
    # cov_b = c cov_a: tr(a) (1 + c - 2 sqrt(c)) = (1 - sqrt(c))^2 tr(a)
    got = frechet_distance_from_stats(mean, cov, mean, 4 * cov)
    assert got == pytest.approx(float(cov.trace()), rel=1e-10)
    # two covariances that do not commute: tr((A B)^(1/2)) from the eigenvalues of the product
    other = _spd(6, 4)
    roots = torch.linalg.eigvals(cov @ other).sqrt().real.sum()
    expected = float(cov.trace() + other.trace() - 2 * roots)
    assert frechet_distance_from_stats(mean, cov, mean, other) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_stats(mean, other, mean, cov) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_large_samples_approaches_the_gaussians() -> None:
    d = 4
    mean_a, mean_b = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    var_a = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    var_b = torch.tensor([1.5, 1.0, 0.5, 3.0], dtype=torch.float64)
    exact = float((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    a = _gaussian(40_000, mean_a, torch.diag(var_a), seed=5)
    b = _gaussian(40_000, mean_b, torch.diag(var_b), seed=6)
    assert frechet_distance(a, b) == pytest.approx(exact, abs=0.02)
    mean, cov = gaussian_stats(a)
    assert torch.allclose(mean, mean_a, atol=0.03) and torch.allclose(cov, torch.diag(var_a), atol=0.05)


def test_frechet_refusals() -> None:
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"expected feature vectors \(N, D\)"):
        frechet_distance(torch.randn(10), torch.randn(10))
    with pytest.raises(ValueError, match="at least 2 points"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


# --------------------------------------------------------------------------- precision and recall


def _cluster(n: int, centre: float, d: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return centre + torch.randn(n, d, generator=gen, dtype=torch.float64)


def test_precision_recall_identical_and_disjoint() -> None:
    x = _cluster(200, 0.0)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, _cluster(200, 1000.0, seed=1)) == (0.0, 0.0)


def test_precision_recall_half_overlap() -> None:
    a, b = _cluster(150, 0.0, seed=2), _cluster(150, 1000.0, seed=3)
    both = torch.cat([a, b])
    # samples that are the real cluster a only: all realistic, half of the data covered
    assert precision_recall(both, a) == (1.0, 0.5)
    # samples spread over a and a far cluster b, of data a only: half of them realistic, all of it covered
    assert precision_recall(a, both) == (0.5, 1.0)


def test_precision_recall_matches_brute_force_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(score, "_BLOCK", 64)  # several blocks of rows, the last one partial
    real, fake = _cluster(300, 0.0, seed=4), _cluster(250, 0.7, seed=5)

    def reference(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
        def radii(x: torch.Tensor) -> torch.Tensor:
            return torch.cdist(x, x).sort(1).values[:, k]  # column 0 is the point itself

        precision = (torch.cdist(fake, real) <= radii(real)[None]).any(1).double().mean()
        recall = (torch.cdist(real, fake) <= radii(fake)[None]).any(1).double().mean()
        return float(precision), float(recall)

    for k in (1, 3, 5):
        got = precision_recall(real, fake, k=k)
        want = reference(real, fake, k)
        assert got == pytest.approx(want, abs=1 / 250)  # ties at the ball's edge may differ by a point
        assert 0.3 < got[0] < 1 and 0.3 < got[1] < 1
    with pytest.raises(ValueError, match="1 <= k < the number of points"):
        precision_recall(real[:3], fake, k=3)


def test_nearest_reads_exact_copies_as_zero() -> None:
    train = torch.randint(0, 256, (50, 784)).double()
    points = torch.cat([train[[7, 3]], train[:1] + 1])
    distances, index = nearest(points, train)
    assert distances.shape == index.shape == (3, 1)
    assert index[:2, 0].tolist() == [7, 3] and distances[:2, 0].tolist() == [0.0, 0.0]
    assert distances[2, 0] == pytest.approx(math.sqrt(784))
    two, which = nearest(points, train, k=2)
    assert torch.equal(which[:, 0], index[:, 0]) and (two[:, 1] >= two[:, 0]).all()
    assert torch.equal(two[:, 1], torch.cdist(points, train).sort(1).values[:, 1])


# --------------------------------------------------------------------------- memorisation


def test_memorised_copies_fresh_draws_and_far_samples() -> None:
    train, heldout = _cluster(2000, 0.0, d=8, seed=6), _cluster(2000, 0.0, d=8, seed=7)
    copies = memorised(train[:300], train, heldout)
    assert copies["share_under"] == 1.0 and copies["exact_copies"] == 1.0 and copies["share_lone_copies"] == 1.0
    assert copies["ratio"] == pytest.approx(1 / score.MEMORISED_QUANTILE)
    assert copies["share_expected"] == copies["quantile"] == score.MEMORISED_QUANTILE
    fresh = memorised(_cluster(2000, 0.0, d=8, seed=8), train, heldout)
    assert fresh["share_under"] == pytest.approx(0.05, abs=0.02) and fresh["exact_copies"] == 0.0
    assert fresh["median_distance"] == pytest.approx(fresh["heldout_median_distance"], rel=0.05)
    assert fresh["share_lone_copies"] == pytest.approx(fresh["heldout_share_lone_copies"], abs=0.02)
    far = memorised(_cluster(300, 50.0, d=8, seed=9), train, heldout)
    assert far["share_under"] == 0.0 and far["median_distance"] > 10 * far["heldout_median_distance"]
    assert memorised(train[:300], train, heldout, quantile=0.2)["share_expected"] == 0.2


def test_memorised_tells_a_copy_from_a_sample_near_everything() -> None:
    # points on the unit sphere of 50 dims are about sqrt(2) apart; its centre (a "blank image") is 1
    # from every one of them: under the held-out threshold, yet no copy of any
    def sphere(n: int, seed: int) -> torch.Tensor:
        x = torch.randn(n, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return x / x.norm(dim=1, keepdim=True)

    train, heldout = sphere(500, 10), sphere(500, 11)
    blank = memorised(torch.zeros(20, 50, dtype=torch.float64), train, heldout)
    assert blank["share_under"] == 1.0 and blank["share_lone_copies"] == 0.0 and blank["exact_copies"] == 0.0
    nudged = train[:20] + 0.01 * sphere(20, 12)  # near-copies: far nearer one training point than any other
    near = memorised(nudged, train, heldout)
    assert near["share_lone_copies"] == 1.0 and near["exact_copies"] == 0.0
    assert near["heldout_share_lone_copies"] == 0.0


# --------------------------------------------------------------------------- classifier figures


def test_label_figures_by_hand() -> None:
    probs = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # class 0, confidence 1
            [0.0, 0.9, 0.1, 0.0],  # class 1, 0.9: confident (>= 0.9)
            [0.6, 0.4, 0.0, 0.0],  # class 0, 0.6
            [0.1, 0.2, 0.3, 0.4],  # class 3, 0.4
        ],
        dtype=torch.float64,
    )
    figures = label_figures(probs)
    assert figures["mean_confidence"] == pytest.approx((1 + 0.9 + 0.6 + 0.4) / 4)
    assert figures["share_confident"] == 0.5
    assert figures["histogram"] == [2, 1, 0, 1]
    assert figures["label_entropy_bits"] == pytest.approx(1.5)  # shares 1/2, 1/4, 1/4
    assert figures["max_entropy_bits"] == 2.0 and "share_as_asked" not in figures
    asked = torch.tensor([0, 1, 1, 3])
    assert label_figures(probs, asked)["share_as_asked"] == 0.75


def test_label_figures_entropy_extremes() -> None:
    uniform = torch.eye(10).repeat(3, 1)  # every class predicted 3 times, each with confidence 1
    figures = label_figures(uniform, torch.arange(30) % 10)
    assert figures["label_entropy_bits"] == pytest.approx(math.log2(10))
    assert figures["share_as_asked"] == 1.0 and figures["share_confident"] == 1.0
    one = torch.tensor([[0.2, 0.8]]).repeat(5, 1)
    figures = label_figures(one)
    assert figures["label_entropy_bits"] == 0.0 and figures["share_confident"] == 0.0
    with pytest.raises(ValueError, match=r"asked: expected \(5,\) classes"):
        label_figures(one, torch.zeros(4, dtype=torch.long))
